"""Iteration schedules of the paper: band limit, SAGD step, importance-sampling annealing.

* ``omega_star`` (Sec. 4.2): ``omega_* = min(0.11, 0.02 + 0.005 floor(tau / 150))`` in 1/Å,
  optionally capped at the Nyquist frequency ``1 / (2 apix)``. (The text says the start
  "corresponds to a wavelength of 40 Å", but 0.02 1/Å is 50 Å; we follow the formula.)
* ``epsilon`` (Sec. 3.3.2, Algorithm 1): SAGD base learning rate
  ``eps = max(1/16, 2^(1 - floor(tau / 150)))``.
* ``importance_alpha`` / ``importance_temperature`` (Sec. 3.4.1, Eq. 20): mixing weight of
  the uniform component ``alpha = max(0.05, 2^(-0.25 floor(tau_prev / 50)))`` and annealing
  temperature ``T = max(1.25, 2^(10 / floor(tau_prev / 50)))``, where ``tau_prev`` is the
  iteration at which the previous (importance) estimate was computed.

``tau`` counts SAGD iterations (minibatches) from 0. All functions accept ints (negative
values are treated as 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "omega_star",
    "epsilon",
    "importance_alpha",
    "importance_temperature",
    "Schedule",
]


def _floor_div(tau: int, every: int) -> int:
    if every <= 0:
        raise ValueError(f"'every' must be > 0, got {every}")
    return max(0, int(tau)) // int(every)


def omega_star(
    tau: int,
    start: float = 0.02,
    step: float = 0.005,
    every: int = 150,
    max_: float = 0.11,
    nyquist: float | None = None,
) -> float:
    """Band limit (1/Å) at iteration ``tau`` (Sec. 4.2):
    ``min(max_, start + step * floor(tau / every))``, and ``<= nyquist`` when given
    (``nyquist = 1 / (2 apix)`` in 1/Å)."""
    w = min(float(max_), float(start) + float(step) * _floor_div(tau, every))
    if nyquist is not None:
        w = min(w, float(nyquist))
    return w


def epsilon(tau: int, every: int = 150, min_: float = 1.0 / 16.0, start_exp: float = 1.0) -> float:
    """SAGD base learning rate (Sec. 3.3.2): ``max(1/16, 2^(1 - floor(tau / 150)))``."""
    return max(float(min_), 2.0 ** (float(start_exp) - _floor_div(tau, every)))


def importance_alpha(
    tau_prev: int, every: int = 50, rate: float = 0.25, min_: float = 0.05
) -> float:
    """Uniform mixing proportion of Eq. (20) (Sec. 3.4.1):
    ``max(0.05, 2^(-0.25 floor(tau_prev / 50)))``.

    Equals 1 (pure uniform importance distribution) for ``tau_prev < 50``."""
    return max(float(min_), 2.0 ** (-float(rate) * _floor_div(tau_prev, every)))


def importance_temperature(
    tau_prev: int, every: int = 50, scale: float = 10.0, min_: float = 1.25
) -> float:
    """Annealing temperature of Eq. (20) (Sec. 3.4.1): ``max(1.25, 2^(10 / floor(tau_prev / 50)))``.

    At ``floor(tau_prev / 50) = 0`` the formula divides by zero; we return ``math.inf``, the
    limit (``phi^(1/T) = 1``: a flat, kernel-smoothed component). It is harmless because
    ``importance_alpha`` is 1 there, so the importance distribution is uniform anyway.
    The value decreases monotonically: 1024 at n=1, 32 at n=2, ..., 1.25 from n=32 on."""
    n = _floor_div(tau_prev, every)
    if n == 0:
        return math.inf
    return max(float(min_), 2.0 ** (float(scale) / n))


@dataclass
class Schedule:
    """All iteration schedules with configurable parameters (defaults: the paper's values).

    ``omega_max`` is the final band limit in 1/Å (e.g. ``1/20`` for a 20 Å run; the paper
    uses 0.11, Sec. 4.2); ``apix`` (Å/pixel), when given, caps omega_* at Nyquist
    ``1 / (2 apix)``.
    """

    omega_start: float = 0.02
    omega_step: float = 0.005
    omega_every: int = 150
    omega_max: float = 0.11
    apix: float | None = None
    eps_every: int = 150
    eps_min: float = 1.0 / 16.0
    eps_start_exp: float = 1.0
    is_every: int = 50
    alpha_rate: float = 0.25
    alpha_min: float = 0.05
    temperature_scale: float = 10.0
    temperature_min: float = 1.25

    def __post_init__(self) -> None:
        if self.omega_max <= 0 or self.omega_start <= 0:
            raise ValueError("omega_start and omega_max must be > 0")
        if self.apix is not None and self.apix <= 0:
            raise ValueError("apix must be > 0")

    @classmethod
    def with_max_resolution(cls, resolution_A: float, **kw) -> Schedule:
        """Schedule whose final band limit is ``1 / resolution_A`` (1/Å)."""
        return cls(omega_max=1.0 / float(resolution_A), **kw)

    @property
    def nyquist(self) -> float | None:
        return None if self.apix is None else 1.0 / (2.0 * self.apix)

    def omega_star(self, tau: int) -> float:
        return omega_star(
            tau, self.omega_start, self.omega_step, self.omega_every, self.omega_max, self.nyquist
        )

    def epsilon(self, tau: int) -> float:
        return epsilon(tau, self.eps_every, self.eps_min, self.eps_start_exp)

    def alpha(self, tau_prev: int) -> float:
        return importance_alpha(tau_prev, self.is_every, self.alpha_rate, self.alpha_min)

    def temperature(self, tau_prev: int) -> float:
        return importance_temperature(
            tau_prev, self.is_every, self.temperature_scale, self.temperature_min
        )

    def final_omega_tau(self) -> int:
        """First iteration at which ``omega_star`` reaches its final (capped) value."""
        target = self.omega_star(10**12)
        if self.omega_start >= target or self.omega_step <= 0:
            return 0
        n = math.ceil((target - self.omega_start) / self.omega_step - 1e-9)
        return int(n) * int(self.omega_every)
