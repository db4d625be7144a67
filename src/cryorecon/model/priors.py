"""Priors over the 3D density ``V`` (paper Sec. 3.3, Eq. 5-8, and Sec. 4.6).

Each prior provides ``neg_log_prior(V)`` (a scalar tensor, ``-log p(V)`` up to an additive
constant that does not depend on ``V``) and ``grad(V)`` (its analytic gradient with respect
to ``V``, same shape and dtype), for a real volume ``V`` of shape ``(D, D, D)`` (float32
torch, indexed ``[z, y, x]``). The SAGD objective (Eq. 6-8) uses ``-log p(V)`` and
``-d/dV log p(V) = grad(V)``; Eq. (7) spreads it as ``1/K`` per image, which is the
optimiser's business, not the prior's.

Priors
------
* :class:`ExponentialPrior` (Sec. 3.3, the paper's default):
  ``p(V) = prod_i lam exp(-lam V_i)`` on ``V >= 0``, so ``-log p = lam sum_i V_i - D^3 log lam``.
* :class:`UniformPrior` (Sec. 4.6): improper ``p(V_i) ∝ 1``; zero energy, zero gradient.
* :class:`CARPrior` (Sec. 4.6, ref. [7]): conditionally autoregressive Gaussian MRF with the
  26-neighbourhood, ``p(V_i | V_-i) = N(V_i | (1/26) sum_{j in Nbhd(i)} V_j, sigma_CAR^2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["Prior", "ExponentialPrior", "UniformPrior", "CARPrior", "make_prior", "PRIOR_NAMES"]


class Prior:
    """Interface: ``name``, ``neg_log_prior(V) -> scalar tensor``, ``grad(V) -> tensor like V``."""

    name: str = "prior"

    def neg_log_prior(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def grad(self, V: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        return self.neg_log_prior(V)


class ExponentialPrior(Prior):
    """Independent exponential prior (Sec. 3.3): ``p(V) = prod_i lam exp(-lam V_i)``, ``V_i >= 0``.

    ``neg_log_prior(V) = lam * sum_i V_i`` (the constant ``-D^3 log lam`` is dropped, as in
    Eq. 6); ``grad(V) = lam`` everywhere. The density is evaluated on all of ``V`` as this
    linear function: the support constraint ``V >= 0`` is enforced by the optimiser, which
    truncates negative voxels to zero after each step (Sec. 3.3.2).

    Choosing ``lam`` (documented default rule). ``lam`` is an inverse scale with units of
    1/density, so it must follow the scale of the reconstruction. We take the maximum
    likelihood estimate for an exponential distribution, ``lam = 1 / mean(V)``, for an
    expected mean voxel density:

    * ``ExponentialPrior(lam=...)`` uses ``lam`` as given;
    * ``ExponentialPrior(mean_density=m)`` gives ``lam = 1 / m``;
    * :meth:`from_volume` gives ``lam = 1 / mean(max(V, 0))`` from a volume (e.g. the
      initial estimate or a current iterate on the data's scale);
    * with neither argument, ``lam = 1`` (i.e. ``mean_density = 1``): only sensible when the
      data are normalised so that the mean voxel density is of order one.
    """

    name = "exponential"

    def __init__(self, lam: float | None = None, *, mean_density: float | None = None):
        if lam is not None and mean_density is not None:
            raise ValueError("give either lam or mean_density, not both")
        if lam is None:
            m = 1.0 if mean_density is None else float(mean_density)
            if not m > 0:
                raise ValueError(f"mean_density must be > 0, got {mean_density}")
            lam = 1.0 / m
        lam = float(lam)
        if not lam > 0 or not math.isfinite(lam):
            raise ValueError(f"lam must be finite and > 0, got {lam}")
        self.lam = lam

    @classmethod
    def from_volume(cls, V: torch.Tensor) -> ExponentialPrior:
        """``lam = 1 / mean(max(V, 0))``: the exponential MLE of the (positive part of the)
        volume."""
        m = float(torch.clamp(torch.as_tensor(V), min=0).mean())
        if not m > 0:
            raise ValueError("volume has no positive density; cannot set lam from it")
        return cls(mean_density=m)

    def neg_log_prior(self, V: torch.Tensor) -> torch.Tensor:
        return self.lam * V.sum()

    def grad(self, V: torch.Tensor) -> torch.Tensor:
        return torch.full_like(V, self.lam)

    def __repr__(self) -> str:
        return f"ExponentialPrior(lam={self.lam:g})"


class UniformPrior(Prior):
    """Improper uniform prior (Sec. 4.6), ``p(V_i) ∝ 1``: energy 0, gradient 0."""

    name = "uniform"

    def neg_log_prior(self, V: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=V.dtype, device=V.device)

    def grad(self, V: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(V)

    def __repr__(self) -> str:
        return "UniformPrior()"


class CARPrior(Prior):
    """Conditionally autoregressive (CAR) smoothness prior, 26-neighbourhood (Sec. 4.6, ref. [7]).

    The paper specifies the conditionals ``p(V_i | V_-i) = N((1/26) sum_{j~i} V_j, sigma^2)``.
    The joint Gaussian with exactly these conditionals (Besag's CAR) has precision
    ``Q = (I - W / 26) / sigma^2``, with ``W`` the 0/1 adjacency of the 26-neighbourhood
    (3x3x3 cube minus its centre). We use **zero padding** (voxels outside the box are 0, a
    Dirichlet boundary), so the divisor is 26 at every voxel, ``W`` is symmetric and ``Q`` is
    positive definite (a proper prior). The energy is the standard CAR energy

        -log p(V) = 1/(2 sigma^2) sum_i V_i (V_i - m_i),   m_i = (1/26) sum_{j~i} V_j,
                  = 1/(2 sigma^2) V^T (I - W/26) V      (+ const),

    and ``grad(V) = (V - m) / sigma^2`` with ``m = W V / 26`` computed by ``conv3d`` (zero
    padding). Note this is not ``1/(2 sigma^2) sum_i (V_i - m_i)^2``, whose conditionals differ.
    """

    name = "car"

    def __init__(self, sigma_car: float = 1.0):
        sigma_car = float(sigma_car)
        if not sigma_car > 0:
            raise ValueError(f"sigma_car must be > 0, got {sigma_car}")
        self.sigma_car = sigma_car

    @staticmethod
    def neighbour_mean(V: torch.Tensor) -> torch.Tensor:
        """``m_i = (1/26) sum_{j in 26-Nbhd(i)} V_j`` with zero padding, same shape as ``V``."""
        k = torch.ones((1, 1, 3, 3, 3), dtype=V.dtype, device=V.device)
        k[0, 0, 1, 1, 1] = 0.0
        k = k / 26.0
        return F.conv3d(V[None, None], k, padding=1)[0, 0]

    def neg_log_prior(self, V: torch.Tensor) -> torch.Tensor:
        m = self.neighbour_mean(V)
        return (V * (V - m)).sum() / (2.0 * self.sigma_car**2)

    def grad(self, V: torch.Tensor) -> torch.Tensor:
        return (V - self.neighbour_mean(V)) / self.sigma_car**2

    def __repr__(self) -> str:
        return f"CARPrior(sigma_car={self.sigma_car:g})"


PRIOR_NAMES = ("exponential", "uniform", "car")


def make_prior(name: str, **kw) -> Prior:
    """Prior by name: ``"exponential"`` (kw: ``lam`` or ``mean_density``, or ``volume`` for
    :meth:`ExponentialPrior.from_volume`), ``"uniform"``, ``"car"`` (kw: ``sigma_car``)."""
    key = name.strip().lower()
    if key in ("exponential", "exp"):
        if "volume" in kw:
            vol = kw.pop("volume")
            if kw:
                raise TypeError(f"unexpected arguments with volume=: {sorted(kw)}")
            return ExponentialPrior.from_volume(vol)
        return ExponentialPrior(**kw)
    if key in ("uniform", "none", "improper"):
        if kw:
            raise TypeError(f"uniform prior takes no arguments, got {sorted(kw)}")
        return UniformPrior()
    if key == "car":
        return CARPrior(**kw)
    raise ValueError(f"unknown prior {name!r}; choose from {PRIOR_NAMES}")
