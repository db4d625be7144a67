"""The marginalisers behind one protocol (:mod:`cryorecon.model.objective`,
:mod:`cryorecon.model.search`) on a tiny simulated set at the true map.

Independent references: the exact quadrature is checked against a direct evaluation of Eq. 4
(:func:`~cryorecon.model.likelihood.marginal_loglik` on the level's own slices); the
coarse-to-fine search, allowed to keep every cell, must give the exact sum back, and with
its defaults it must stay a lower bound of it (it drops mass, never adds it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryorecon.fourier.slicing import spectrum_from_volume
from cryorecon.model.likelihood import marginal_loglik
from cryorecon.model.objective import ExactQuadrature
from cryorecon.model.search import CoarseToFine, SearchConfig, keep_mass
from cryorecon.preprocess import image_batch
from cryorecon.simulate import density_from_model, simulate_particles
from cryorecon.start import make_level

D, APIX, N, SNR = 24, 13.0, 12, 0.5
SHIFT_SIGMA_PX = 1.0
OMEGA = 1 / 45.0


@pytest.fixture(scope="module")
def problem():
    truth = density_from_model(None, D=D, apix=APIX)
    b = next(simulate_particles(truth, N, APIX, SNR, seed=5, batch_size=N, shift_range_px=1.0))
    lvl = make_level(OMEGA, D, APIX, SHIFT_SIGMA_PX, 2.0, "cpu")
    batch = image_batch(torch.from_numpy(b.images), b.ctf, APIX, lvl.halfplane, 0.8 * D)
    return truth, batch, lvl


def test_exact_quadrature_is_eq4(problem):
    V, batch, lvl = problem
    ev = ExactQuadrature(2).evaluate(V, batch, np.arange(N), lvl, tau=1)
    S = lvl.slice_op.slice(spectrum_from_volume(V, 2))
    ref = marginal_loglik(S, batch, lvl.shifts, lvl.log_w_rot, lvl.log_w_shift, want_grad=False)
    assert math.isclose(ev.value, -float(ref.loglik.sum()), rel_tol=1e-6)
    assert torch.allclose(ev.loglik.double(), ref.loglik.double(), rtol=1e-6, atol=1e-6)
    assert ev.fraction == 1.0 and ev.grad.shape == V.shape
    assert math.isclose(ev.refit(V), ev.value, rel_tol=1e-6)
    assert ev.refit(0.5 * V) != pytest.approx(ev.value, rel=1e-3)
    # the reported pose is the grid pose of largest posterior
    assert torch.allclose(ev.best_R, lvl.rotations[ref.best_rot])
    assert ((ev.max_prob > 0) & (ev.max_prob <= 1)).all()


def test_search_keeping_every_cell_is_exact(problem):
    """A faint map keeps every coarse posterior above float32 underflow, so with no mass
    dropped the search evaluates every cell of the final grid: its children must tile that
    grid exactly once with the right weights."""
    V, batch, lvl = problem
    V = 0.05 * V
    exact = ExactQuadrature(2).evaluate(V, batch, np.arange(N), lvl, tau=1, want_grad=True)
    everything = SearchConfig(epsilon=1e-12, max_rotations=10**6, max_shifts=10**6)
    search = CoarseToFine(D, APIX, SHIFT_SIGMA_PX, 2.0, 2, everything)
    ev = search.evaluate(V, batch, np.arange(N), lvl, tau=1, want_grad=True)
    assert math.isclose(ev.value, exact.value, rel_tol=1e-5)
    cos = float(
        (ev.grad.double() * exact.grad.double()).sum()
        / (ev.grad.double().norm() * exact.grad.double().norm())
    )
    assert cos > 0.9999


def test_default_search_is_a_lower_bound_and_cheaper(problem):
    V, batch, lvl = problem
    exact = ExactQuadrature(2).evaluate(V, batch, np.arange(N), lvl, tau=1, want_grad=False)
    ev = CoarseToFine(D, APIX, SHIFT_SIGMA_PX, 2.0, 2).evaluate(
        V, batch, np.arange(N), lvl, tau=1, want_grad=False
    )
    # r = 6.9 px here: level 0 (5.5 px) alone is a third of the final grid's poses
    assert ev.fraction < 0.75
    # log p_search <= log p per image (up to float32 rounding of the sums)
    assert (ev.loglik.double() <= exact.loglik.double() + 1e-3).all()


def test_keep_mass_keeps_the_smallest_set_carrying_the_mass():
    post = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]])
    ids, ok = keep_mass(post, None, mass=0.9, k_min=1, k_max=4)
    kept = [sorted(ids[i][ok[i]].tolist()) for i in range(2)]
    assert kept[0] == [0, 1, 2] and kept[1] == [0]
