"""Held-out patience and the cut-off schedules (:mod:`cryorecon.optim.adaptive`)."""

from __future__ import annotations

import math

import pytest

from cryorecon.optim.adaptive import AdaptiveResolution, HeldoutPatience, PaperResolution
from cryorecon.optim.schedules import Schedule


def test_patience_counts_evaluations_without_improvement_and_restarts_with_omega():
    h = HeldoutPatience()
    for v in (10.0, 9.0, 9.5, 9.2):
        h.observe(0.02, v)
    assert h.best == 9.0 and h.since_improve == 2 and h.last == 9.2
    h.observe(0.025, 12.0)  # a finer cut-off has more coefficients: a new scale
    assert h.best == 12.0 and h.since_improve == 0
    copy = HeldoutPatience()
    copy.load_state_dict(h.state_dict())
    assert copy == h


def _drive(sched: AdaptiveResolution, curve, every: int = 10, iters: int = 2000) -> list[int]:
    """Feed held-out values ``curve(t_at_level)`` every ``every`` iterations; the raises."""
    raises, entered = [], 0
    for tau in range(every, iters + 1, every):
        if sched.observe(tau, curve(tau - entered) + 1000.0 * sched.steps):
            raises.append(tau)
            entered = tau
    return raises


def test_adaptive_raises_when_the_heldout_error_levels_off():
    s = AdaptiveResolution(
        start=1 / 40, max_=1 / 20, factor=1.15, min_iters=20, max_iters=400, patience=2, plateau=0.2
    )
    # improvement that halves every 30 iterations: gains fall under 20% of the first gain
    # after ~70 iterations, and two such evaluations in a row are needed
    raises = _drive(s, lambda t: 100.0 * 0.5 ** (t / 30.0))
    n_steps = math.ceil(math.log(40 / 20) / math.log(1.15))
    assert len(raises) == n_steps and s.at_final()
    gaps = [b - a for a, b in zip([0] + raises, raises)]
    assert all(60 <= g <= 110 for g in gaps), gaps
    assert s.omega_star() == pytest.approx(1 / 20)
    assert s.epsilon() == pytest.approx(max(1 / 16, 2.0 ** (1 - n_steps)))


def test_adaptive_waits_min_iters_and_forces_a_raise_at_max_iters():
    flat = AdaptiveResolution(start=0.02, max_=0.03, min_iters=50, max_iters=400)
    assert _drive(flat, lambda t: 5.0, iters=400)[0] == 50  # flat from the start: after min_iters
    steady = AdaptiveResolution(start=0.02, max_=0.03, min_iters=20, max_iters=120)
    assert _drive(steady, lambda t: -float(t), iters=300)[:2] == [120, 240]  # never levels off


def test_adaptive_caps_at_nyquist_and_round_trips_its_state():
    s = AdaptiveResolution(start=0.05, max_=0.2, nyquist=0.08, min_iters=10, max_iters=10)
    _drive(s, lambda t: 1.0, iters=500)
    assert s.omega_star() == pytest.approx(0.08) and s.at_final()
    t = AdaptiveResolution()
    t.load_state_dict(s.state_dict())
    assert t.omega_star() == s.omega_star() and t.history == s.history


def test_paper_schedule_behind_the_same_interface():
    sch = Schedule(omega_start=0.02, omega_step=0.005, omega_every=150, omega_max=0.04, apix=5.0)
    p = PaperResolution(sch)
    for tau in (1, 149, 150, 151, 600, 10**6):
        assert p.omega_star(tau) == sch.omega_star(tau) and p.epsilon(tau) == sch.epsilon(tau)
    assert not p.at_final(1) and p.at_final(10**6)
    assert p.observe(10, 1.0) is False


def test_paper_schedule_knows_its_final_iteration_and_adaptive_does_not():
    sch = Schedule(omega_start=0.02, omega_step=0.005, omega_every=150, omega_max=0.04, apix=5.0)
    p = PaperResolution(sch)
    final = p.final_iteration()
    assert p.at_final(final) and not p.at_final(final - 1)
    assert final == next(t for t in range(1, 10**4) if sch.omega_star(t) >= 0.04 - 1e-12)
    assert AdaptiveResolution().final_iteration() is None
