"""Decisions taken from the held-out error: when to raise omega*, when to stop.

The held-out error (mean negative log-likelihood of particles never trained on, evaluated
every few iterations at the current cut-off) only compares with itself at one cut-off: more
coefficients give a larger value. Both rules below therefore restart when omega* changes.

* :class:`HeldoutPatience`: how many evaluations in a row have not improved on the best one
  at this cut-off (the stopping rule at the final cut-off, Sec. 4).
* :class:`AdaptiveResolution`: the default schedule of omega*. The paper raises omega* by a
  fixed step every 150 iterations (Sec. 4.2, :class:`~cryorecon.optim.schedules.Schedule`),
  whatever the data; here omega* is multiplied by ``factor`` once the map has caught up with
  the current cut-off: after at least ``min_iters`` iterations at it, when ``patience``
  consecutive held-out evaluations have each gained less than ``plateau`` times the largest
  gain seen at this cut-off (or after ``max_iters`` iterations at it). The SAGD base step
  ``epsilon`` halves with each raise, as the paper's does with each of its steps (Sec. 3.3.2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class HeldoutPatience:
    """Best held-out error at the current cut-off and evaluations since it improved."""

    omega: float | None = None
    best: float = math.inf
    since_improve: int = 0
    last: float | None = None

    def observe(self, omega: float, value: float, rel_tol: float = 1e-6) -> None:
        if omega != self.omega:
            self.omega, self.best, self.since_improve = omega, value, 0
        elif value < self.best - rel_tol * abs(self.best):
            self.best, self.since_improve = value, 0
        else:
            self.since_improve += 1
        self.last = value

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, s: dict) -> None:
        for k, v in s.items():
            setattr(self, k, v)


@dataclass
class AdaptiveResolution:
    """omega* (1/Å) raised by the held-out error (see the module docstring).

    ``start`` and ``max_`` in 1/Å; ``nyquist`` caps both (1/(2 apix)). ``steps`` counts the
    raises so far; ``entered`` is the iteration at which the current cut-off began.
    """

    start: float = 1 / 40
    max_: float = 0.11
    factor: float = 1.15
    min_iters: int = 20
    max_iters: int = 400
    patience: int = 2
    plateau: float = 0.2
    nyquist: float | None = None
    eps_min: float = 1.0 / 16.0
    steps: int = 0
    entered: int = 0
    best: float = math.inf
    max_gain: float = 0.0
    flat: int = 0
    history: list = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.max_ if self.nyquist is None else min(self.max_, self.nyquist)

    def omega_star(self, tau: int | None = None) -> float:
        """The current cut-off (``tau`` is ignored: the state decides)."""
        return min(self.final, self.start * self.factor**self.steps)

    def at_final(self, tau: int | None = None) -> bool:
        return self.omega_star() >= self.final

    def final_iteration(self) -> int | None:
        """Unknown in advance: the data decide when each step comes (None)."""
        return None

    def epsilon(self, tau: int | None = None) -> float:
        """SAGD base learning rate: ``max(1/16, 2^(1 - steps))`` (Sec. 3.3.2's halving per step)."""
        return max(self.eps_min, 2.0 ** (1 - self.steps))

    def observe(self, tau: int, heldout: float) -> bool:
        """Take a held-out evaluation at iteration ``tau``; returns True when omega* rises."""
        if math.isfinite(self.best):
            gain = self.best - heldout
            self.max_gain = max(self.max_gain, gain)
            self.flat = self.flat + 1 if gain <= self.plateau * self.max_gain else 0
        self.best = min(self.best, heldout)
        if self.at_final():
            return False
        at = tau - self.entered
        if at >= self.max_iters or (at >= self.min_iters and self.flat >= self.patience):
            self.steps += 1
            self.entered, self.best, self.max_gain, self.flat = tau, math.inf, 0.0, 0
            self.history.append((tau, self.omega_star()))
            return True
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, s: dict) -> None:
        for k, v in s.items():
            setattr(self, k, list(v) if k == "history" else v)


@dataclass
class PaperResolution:
    """The paper's fixed schedule (Sec. 4.2) behind the same interface as
    :class:`AdaptiveResolution`: omega* and epsilon from the iteration count alone."""

    schedule: object

    def omega_star(self, tau: int) -> float:
        return self.schedule.omega_star(tau)

    def epsilon(self, tau: int) -> float:
        return self.schedule.epsilon(tau)

    def at_final(self, tau: int) -> bool:
        return self.schedule.omega_star(tau) >= self.schedule.omega_star(10**12)

    def final_iteration(self) -> int:
        """The first iteration at the final cut-off (the schedule is fixed in advance)."""
        lo, hi = 0, 1
        while not self.at_final(hi):
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.at_final(mid) else (mid, hi)
        return hi

    def observe(self, tau: int, heldout: float) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, s: dict) -> None:
        pass
