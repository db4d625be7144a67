"""Quadrature grids over poses and shifts (paper Sec. 3.2, Eq. 3-4).

The marginal likelihood (Eq. 3) integrates over rotations ``R`` in SO(3) and shifts ``t`` in
R^2. Eq. (4) replaces the double integral by a weighted sum over

* viewing directions ``d_j`` on the unit sphere S^2 (Saff & Kuijlaars spiral, ref. [40]),
  weights ``w^d = 4 pi / M_d``;
* in-plane angles ``psi_k`` uniform on [0, 2 pi), weights ``w^psi = 2 pi / M_psi``;
* shifts ``t_l`` from 2D Gauss-Hermite quadrature for the Gaussian prior ``p(t)``, weights
  ``w^t`` from the quadrature rule (the paper's rule); or, with ``shift_step``, a square
  lattice of spacing ``shift_step / omega_*`` inside a disc of ``SHIFT_RANGE_SIGMAS`` prior
  standard deviations, weights ``p(t_l)`` normalised (:func:`lattice_shifts`). The
  likelihood's peak in ``t`` is about ``1 / (2 pi omega_*)`` wide, so a rule whose nodes sit
  a prior sigma apart (Gauss-Hermite with few nodes) snaps every image to the nearest node;
  a lattice a fraction of the resolution apart does not.

``R_{j,k} = R(d_j, psi_k)`` is built with
:func:`cryorecon.geometry.rotations.direction_inplane_to_matrix` (third row = ``d_j``).
The full sphere of directions is used, not a hemisphere: with the in-plane angle as a
separate coordinate, ``d`` and ``-d`` are *not* equivalent views (they differ by a mirror,
which is not a rotation), so SO(3) = S^2 x S^1 needs every direction.

Grid sizes follow Sec. 3.2 (see :func:`quadrature_sizes`). Free functions return NumPy
float64 arrays; :class:`PoseGrid` holds torch tensors (float64 on CPU; rotations float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from cryorecon.geometry.rotations import direction_inplane_to_matrix

__all__ = [
    "saff_kuijlaars",
    "inplane_angles",
    "gauss_hermite_shifts",
    "lattice_shifts",
    "SHIFT_RANGE_SIGMAS",
    "quadrature_sizes",
    "nearest_neighbour_angles",
    "PoseGrid",
]

# Tolerance for ceil() of quantities that are integers up to rounding (e.g. r^2 = 16.0000001).
_CEIL_TOL = 1e-9


def _ceil(x: float) -> int:
    return int(math.ceil(x - _CEIL_TOL))


def saff_kuijlaars(M: int) -> np.ndarray:
    """``M`` approximately uniform unit vectors on S^2 (Saff & Kuijlaars 1997 spiral).

    The generalized spiral (paper ref. [40]): for ``k = 1..M``

        h_k = -1 + 2 (k - 1) / (M - 1),      theta_k = arccos(h_k),
        phi_k = (phi_{k-1} + 3.6 / sqrt(M) / sqrt(1 - h_k^2))  mod 2 pi,   phi_1 = phi_M = 0,

    and ``d_k = (sin theta cos phi, sin theta sin phi, cos theta)``. The points run from the
    south pole (k = 1) to the north pole (k = M) and cover the *full* sphere; neighbouring
    points are about ``3.6 / sqrt(M)`` radians apart, which is why Sec. 3.2 takes
    ``M_d = (3.6 / alpha)^2`` for an angular spacing ``alpha``.

    Returns a ``(M, 3)`` float64 array of unit vectors (``M = 1`` gives the north pole).
    """
    M = int(M)
    if M < 1:
        raise ValueError(f"saff_kuijlaars needs M >= 1, got {M}")
    if M == 1:
        return np.array([[0.0, 0.0, 1.0]])
    k = np.arange(M, dtype=np.float64)
    h = -1.0 + 2.0 * k / (M - 1)
    h[0], h[-1] = -1.0, 1.0
    theta = np.arccos(np.clip(h, -1.0, 1.0))
    step = np.zeros(M)
    inner = slice(1, M - 1)
    step[inner] = 3.6 / math.sqrt(M) / np.sqrt(1.0 - h[inner] ** 2)
    phi = np.mod(np.cumsum(step), 2.0 * math.pi)
    phi[0] = phi[-1] = 0.0
    st = np.sin(theta)
    d = np.stack([st * np.cos(phi), st * np.sin(phi), np.cos(theta)], axis=-1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


def inplane_angles(M: int) -> np.ndarray:
    """``M`` equally spaced in-plane angles ``2 pi k / M``, ``k = 0..M-1`` (in [0, 2 pi)),
    radians."""
    M = int(M)
    if M < 1:
        raise ValueError(f"inplane_angles needs M >= 1, got {M}")
    return 2.0 * math.pi * np.arange(M, dtype=np.float64) / M


def gauss_hermite_shifts(n_per_axis: int, sigma_px: float) -> tuple[np.ndarray, np.ndarray]:
    """2D tensor-product Gauss-Hermite rule for the shift prior ``p(t) = N(0, sigma^2 I)``.

    ``numpy.polynomial.hermite.hermgauss(n)`` gives nodes ``x_i`` and weights ``h_i`` with
    ``int exp(-x^2) f(x) dx ~ sum_i h_i f(x_i)``. Substituting ``t = sqrt(2) sigma x``,

        E_{N(0, sigma^2)}[f(t)] ~ sum_i (h_i / sqrt(pi)) f(sqrt(2) sigma x_i),

    exactly for polynomials of degree <= 2n - 1 per axis (so ``E[t^2] = sigma^2`` needs
    n >= 2, ``E[t^4] = 3 sigma^4`` needs n >= 3). The 2D rule is the tensor product.

    **The prior is folded into the weights**: the returned weights are ``w_l = w^t_l p(t_l)``
    of Eq. (4) combined, they sum to 1, and ``sum_l w_l f(t_l) ~ E_{p(t)}[f(t)]``. Callers
    must therefore *not* multiply by ``p(t_l)`` again.

    Returns ``points`` ``(n^2, 2)`` in pixels as ``(x, y)`` (shift of the particle from the
    image centre, the ``t`` of Eq. 2) and ``weights`` ``(n^2,)``, float64. Ordering is
    ``l = iy * n + ix`` (y-major). ``sigma_px <= 0`` gives the single point (0, 0), weight 1.
    """
    n = int(n_per_axis)
    if n < 1:
        raise ValueError(f"gauss_hermite_shifts needs n_per_axis >= 1, got {n}")
    if sigma_px <= 0:
        return np.zeros((1, 2)), np.ones(1)
    x, h = np.polynomial.hermite.hermgauss(n)
    nodes = math.sqrt(2.0) * float(sigma_px) * x
    w1 = h / math.sqrt(math.pi)
    w1 = w1 / w1.sum()  # exact up to rounding; removes the last ulp of drift
    yy, xx = np.meshgrid(nodes, nodes, indexing="ij")
    points = np.stack([xx.ravel(), yy.ravel()], axis=-1)
    weights = np.outer(w1, w1).ravel()
    return points, weights


SHIFT_RANGE_SIGMAS = 2.5


def lattice_shifts(
    spacing_px: float, sigma_px: float, range_sigmas: float = SHIFT_RANGE_SIGMAS
) -> tuple[np.ndarray, np.ndarray]:
    """Shifts on the square lattice ``spacing_px * (i, j)`` inside the disc
    ``|t| <= max(range_sigmas * sigma_px, spacing_px)`` (pixels), for the shift prior
    ``p(t) = N(0, sigma^2 I)``.

    **The prior is folded into the weights** (as :func:`gauss_hermite_shifts`): ``w_l`` is
    ``p(t_l)`` times the cell area, normalised to sum 1, so ``sum_l w_l f(t_l)`` is the
    midpoint rule for ``E_{p(t)}[f(t)]`` restricted to the disc. Returns ``points`` ``(n, 2)``
    in pixels as ``(x, y)``, y-major, the origin always among them, and ``weights`` ``(n,)``,
    float64. ``sigma_px <= 0`` gives the single point (0, 0), weight 1."""
    if spacing_px <= 0:
        raise ValueError(f"lattice_shifts needs spacing_px > 0, got {spacing_px}")
    if sigma_px <= 0:
        return np.zeros((1, 2)), np.ones(1)
    radius = max(range_sigmas * float(sigma_px), float(spacing_px))
    m = int(math.floor(radius / spacing_px + 1e-9))
    ij = np.arange(-m, m + 1) * float(spacing_px)
    yy, xx = np.meshgrid(ij, ij, indexing="ij")
    points = np.stack([xx.ravel(), yy.ravel()], axis=-1)
    points = points[(points**2).sum(-1) <= radius * radius * (1 + 1e-9)]
    logw = -(points**2).sum(-1) / (2.0 * float(sigma_px) ** 2)
    w = np.exp(logw - logw.max())
    return points, w / w.sum()


def quadrature_sizes(D: int, apix: float, omega_star: float) -> dict:
    """Grid sizes of Sec. 3.2 for box ``D``, pixel size ``apix`` (Å) and ``omega_star`` (1/Å).

    The paper writes ``D omega_*`` for the radius of the band limit in Fourier pixels; with
    ``omega_star`` in 1/Å that radius is ``r = D * apix * omega_star`` (capped at the Nyquist
    radius ``D / 2``). Then

    * ``alpha = 1/2 arccos((r^2 - 1) / (r^2 + 1))`` (= ``arctan(1 / r)``), the angle between
      neighbouring wave numbers at radius r;
    * ``M_d = ceil((3.6 / alpha)^2)`` directions, ``M_psi = ceil(2 pi / alpha)`` in-plane angles;
    * ``M_t = ceil(r^2)`` shifts (one full period at omega_*). With a tensor-product
      Gauss-Hermite rule we use ``n_t_per_axis = ceil(sqrt(M_t))`` nodes per axis, i.e.
      ``n_t_per_axis^2 >= M_t`` points in all.

    ``ceil`` ignores rounding excess below 1e-9. Returns a dict with keys ``r``, ``alpha``
    (radians), ``M_d``, ``M_psi``, ``M_t``, ``n_t_per_axis``.
    """
    if D <= 0 or apix <= 0 or omega_star <= 0:
        raise ValueError("quadrature_sizes needs D, apix, omega_star > 0")
    r = min(float(D) * float(apix) * float(omega_star), D / 2.0)
    r2 = r * r
    alpha = 0.5 * math.acos((r2 - 1.0) / (r2 + 1.0))
    M_t = max(1, _ceil(r2))
    return dict(
        r=r,
        alpha=alpha,
        M_d=max(1, _ceil((3.6 / alpha) ** 2)),
        M_psi=max(1, _ceil(2.0 * math.pi / alpha)),
        M_t=M_t,
        n_t_per_axis=max(1, _ceil(math.sqrt(M_t))),
    )


def nearest_neighbour_angles(directions: np.ndarray) -> np.ndarray:
    """Angle (radians) from each unit vector to its nearest other vector, ``(M,)``."""
    from scipy.spatial import cKDTree

    d = np.asarray(directions, dtype=np.float64)
    if len(d) < 2:
        return np.full(len(d), math.pi)
    dist, _ = cKDTree(d).query(d, k=2)
    chord = np.clip(dist[:, 1], 0.0, 2.0)
    return 2.0 * np.arcsin(chord / 2.0)


@dataclass
class PoseGrid:
    """Quadrature over SO(3) x R^2 of Eq. (4) for one band limit ``omega_star``.

    Parameters
    ----------
    D, apix, omega_star:
        Box size, pixel size (Å), band limit (1/Å); set the sizes via :func:`quadrature_sizes`.
    shift_sigma_px:
        Standard deviation (pixels) of the isotropic Gaussian shift prior ``p(t)``.
    scale:
        Coarsening factor (>= 1 coarser, for tests/benchmarks): angular spacing ``alpha`` is
        multiplied by ``scale`` (so ``M_d ~ (3.6 / (scale alpha))^2``, ``M_psi ~ 2 pi /
        (scale alpha)``) and the shift nodes per axis are divided by ``scale``.
    M_d, M_psi, n_t_per_axis:
        Explicit overrides of the sizes (take precedence over ``scale``).
    shift_step:
        ``None``: the paper's Gauss-Hermite shifts (``n_t_per_axis`` per axis). A number: the
        shifts of :func:`lattice_shifts` with spacing ``shift_step / (omega_star apix)``
        pixels (a fraction of the resolution; not scaled by ``scale``).

    Attributes (torch, float64, CPU)
    ----------
    directions ``(M_d, 3)``, psi ``(M_psi,)``, shifts ``(M_t, 2)`` (pixels, ``(x, y)``);
    log_w_d ``(M_d,)`` = log(4 pi / M_d); log_w_psi ``(M_psi,)`` = log(2 pi / M_psi);
    log_w_t ``(M_t,)`` = log Gauss-Hermite weights *with the prior p(t) folded in*
    (sum w_t = 1); log_p_R = -log(8 pi^2) (uniform p(R) on SO(3), a float).
    The rotation weights satisfy ``sum_jk w_d w_psi p(R) = 4 pi * 2 pi / (8 pi^2) = 1``;
    :meth:`log_w_R` returns them per rotation, so the full Eq. (4) reads
    ``p(I) ~ sum_{m, l} exp(log_w_R[m] + log_w_t[l]) p(I | R_m, t_l)``.
    r_d, r_psi, r_t: spacings for the kernels of Eq. (21)-(23): ``r_d`` = mean
    nearest-neighbour angle between directions (radians), ``r_psi = 2 pi / M_psi``,
    ``r_t`` = mean gap between adjacent 1D Gauss-Hermite nodes (pixels; ``shift_sigma_px``
    or 1 px when there is a single node).
    """

    D: int
    apix: float
    omega_star: float
    shift_sigma_px: float
    scale: float = 1.0
    M_d: int | None = None
    M_psi: int | None = None
    n_t_per_axis: int | None = None
    shift_step: float | None = None
    sizes: dict = field(init=False)

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError("scale must be > 0")
        s = quadrature_sizes(self.D, self.apix, self.omega_star)
        alpha = s["alpha"] * self.scale
        if self.M_d is None:
            self.M_d = max(1, _ceil((3.6 / alpha) ** 2))
        if self.M_psi is None:
            self.M_psi = max(1, _ceil(2.0 * math.pi / alpha))
        if self.n_t_per_axis is None:
            self.n_t_per_axis = max(1, _ceil(s["n_t_per_axis"] / self.scale))
        self.sizes = dict(s, alpha_used=alpha)

        dirs = saff_kuijlaars(self.M_d)
        psi = inplane_angles(self.M_psi)
        if self.shift_step is None:
            pts, wts = gauss_hermite_shifts(self.n_t_per_axis, self.shift_sigma_px)
        else:
            spacing = self.shift_step / (self.omega_star * self.apix)
            pts, wts = lattice_shifts(spacing, self.shift_sigma_px)
            self.n_t_per_axis = len(np.unique(pts[:, 0]))

        f64 = torch.float64
        self.directions = torch.as_tensor(dirs, dtype=f64)
        self.psi = torch.as_tensor(psi, dtype=f64)
        self.shifts = torch.as_tensor(pts, dtype=f64)
        self.log_w_d = torch.full((self.M_d,), math.log(4.0 * math.pi / self.M_d), dtype=f64)
        self.log_w_psi = torch.full((self.M_psi,), math.log(2.0 * math.pi / self.M_psi), dtype=f64)
        self.log_w_t = torch.as_tensor(np.log(wts), dtype=f64)
        self.log_p_R = -math.log(8.0 * math.pi**2)

        self.r_d = float(nearest_neighbour_angles(dirs).mean()) if self.M_d > 1 else math.pi
        self.r_psi = 2.0 * math.pi / self.M_psi
        n = len(np.unique(pts[:, 0]))
        if n > 1:
            xs = np.sort(np.unique(pts[:, 0]))
            self.r_t = float((xs[-1] - xs[0]) / (n - 1))
        else:
            self.r_t = float(self.shift_sigma_px) if self.shift_sigma_px > 0 else 1.0

    @property
    def M_t(self) -> int:
        return int(self.shifts.shape[0])

    @property
    def n_rotations(self) -> int:
        return int(self.M_d * self.M_psi)

    def rotations(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """``(M_d * M_psi, 3, 3)`` matrices ``R_{j,k}``, direction-major (index ``j * M_psi + k``).

        Built with :func:`direction_inplane_to_matrix`, so ``R[j * M_psi + k][2] == d_j``.
        """
        d = self.directions[:, None, :].expand(self.M_d, self.M_psi, 3)
        p = self.psi[None, :].expand(self.M_d, self.M_psi)
        R = direction_inplane_to_matrix(d, p).reshape(-1, 3, 3)
        return R.to(dtype=dtype, device=device)

    def log_w_R(self) -> torch.Tensor:
        """``(M_d * M_psi,)`` log of ``w_d w_psi p(R)`` per rotation (direction-major);
        logsumexp = 0."""
        return (self.log_w_d[:, None] + self.log_w_psi[None, :]).reshape(-1) + self.log_p_R
