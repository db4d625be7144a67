"""Put a C1 map's symmetry axes in RELION's standard orientation (as ``relion_align_symmetry``).

For a map ``V`` and a point group ``G`` (geometry/symmetry.py) find the rotation ``Q`` and
shift ``t`` (voxels, ``(x, y, z)``) such that the moved map

    W = rotate_volume(V, Q, t),     W(p) = V(Q^T (p - t))     (p about the box centre D//2)

is as ``G``-symmetric as possible: ``W(R_g^T p) = W(p)``, i.e. the axes of ``V``'s symmetry
are carried onto RELION's axes for ``G`` (Cn and Dn: n-fold along z, Dn's 2-fold along x;
see geometry/symmetry.py). With ``t = 0`` this holds exactly when ``V`` is invariant under the
conjugates ``H_g = Q^T R_g Q``, which is what the global search scores. The answer is unique
only up to the normaliser of ``G`` (for example ``R_g Q`` is as good as ``Q``; for D2 any
permutation of the axes).

Steps: (1) centre: the density's centre of mass is moved to the box centre (it lies on every
symmetry axis); (2) global search on a low-passed copy Fourier-cropped to ``search_box``
voxels: ``n_global`` near-uniform rotations (super-Fibonacci, turned by a random rotation
from ``seed``), each scored by the mean Pearson correlation, within a soft sphere, of the
map with its copies moved by a few ``H_g``; (3) the best distinct candidates are refined by
Nelder-Mead over (rotation vector, shift), maximising ``symmetry_score`` of ``W`` (the full
group) on the small map, then the winner once more at up to ``refine_box`` voxels.
Deterministic for a given seed.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .geometry.rotations import random_rotations
from .geometry.symmetry import SymmetryGroup, parse_symmetry
from .progress import bar
from .symmetrize import symmetrize, symmetry_score
from .validate import (
    _background,
    _downsample,
    _select_distinct,
    _single_thread,
    rotate_volume,
    rotvec_to_matrix,
    spherical_mask,
    super_fibonacci_rotations,
)

__all__ = ["SymmetryAlignResult", "symmetry_align"]


@dataclass
class SymmetryAlignResult:
    """Outcome of :func:`symmetry_align`.

    ``rotation`` ``Q`` (3, 3) float64 and ``shift_px`` ``t`` (3,) voxels ``(x, y, z)`` with
    ``moved = rotate_volume(V, Q, t)``; ``aligned = symmetrize(moved, group)``.
    ``score`` = symmetry_score of ``moved`` (soft sphere), ``score_input`` that of the input
    as it was. ``shift_A`` is ``shift_px * apix``.
    """

    group: str
    rotation: torch.Tensor
    shift_px: torch.Tensor
    score: float
    score_input: float
    aligned: torch.Tensor
    moved: torch.Tensor
    apix: float = 1.0
    seconds: float = 0.0

    @property
    def shift_A(self) -> torch.Tensor:
        return self.shift_px * self.apix


def _centre_of_mass(vol: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x, y, z) voxel offset from the centre D//2 of the positive, background-free density."""
    D = vol.shape[-1]
    w = ((vol - _background(vol, mask)) * mask).clamp_min(0).double()
    k = torch.arange(D, dtype=torch.float64, device=vol.device) - D // 2
    s = w.sum().clamp_min(1e-30)
    return (
        torch.stack(
            [(w.sum((0, 1)) * k).sum(), (w.sum((0, 2)) * k).sum(), (w.sum((1, 2)) * k).sum()]
        )
        / s
    )


def _probe_elements(G: SymmetryGroup, k: int = 3) -> torch.Tensor:
    """Up to ``k`` non-identity operators, the generators first, no two inverse to each other
    (``corr(V, T_H V) = corr(T_{H^T} V, V)``: an inverse scores the same)."""
    ops = G.operators
    chosen: list[int] = []
    for i in range(1, G.order):
        if not any(np.abs(ops[i] - ops[j].T).max() < 1e-8 for j in chosen):
            chosen.append(i)
        if len(chosen) == k:
            break
    return G.torch()[torch.as_tensor(chosen)]


class _SymScore:
    """symmetry_score of ``rotate_volume(vol, Q, t)`` within a soft sphere fixed at the centre."""

    def __init__(self, vol: torch.Tensor, G: SymmetryGroup, mask: torch.Tensor):
        self.vol = vol - _background(vol, mask)
        self.G, self.mask = G, mask

    def __call__(self, Q: np.ndarray, t: np.ndarray) -> float:
        W = rotate_volume(
            self.vol,
            torch.as_tensor(Q, device=self.vol.device),
            torch.as_tensor(t, device=self.vol.device),
        )
        return symmetry_score(W, self.G, self.mask)


def _refine(
    score: _SymScore,
    Q0: np.ndarray,
    t0: np.ndarray,
    rot_step: float,
    shift_step: float,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    from scipy.optimize import minimize

    def params(x):
        return rotvec_to_matrix(x[:3] * rot_step) @ Q0, t0 + x[3:] * shift_step

    def f(x):
        return -score(*params(x))

    x0 = np.zeros(6)
    res = minimize(
        f,
        x0,
        method="Nelder-Mead",
        options={
            "initial_simplex": np.vstack([x0, np.eye(6)]),
            "xatol": 1e-2,
            "fatol": 1e-7,
            "maxfev": max_iter,
        },
    )
    Q, t = params(res.x)
    return Q, t, float(-res.fun)


def symmetry_align(
    volume,
    group,
    apix: float = 1.0,
    device=None,
    seed: int = 0,
    n_global: int = 2000,
    search_box: int = 24,
    refine_box: int | None = None,
    n_candidates: int = 3,
    center: bool = True,
    batch: int = 100,
    progress: bool = True,
) -> SymmetryAlignResult:
    """Rotation and shift that put ``volume``'s ``group`` symmetry in RELION's orientation.

    Args:
        volume: ``(D, D, D)`` map ``[z, y, x]``, D even and >= 8.
        group: :class:`SymmetryGroup` or RELION name; must be a rotation group other than C1.
        apix: voxel size (Å), only scales ``shift_A``.
        n_global, search_box: rotations tried and the box of the global search.
        refine_box: box of the final refinement (default: the full box capped at 32).
        center: move the centre of mass to the box centre first and refine the shift; with
            ``False`` the shift stays 0 (the axes are assumed to pass through D//2).

    Returns a :class:`SymmetryAlignResult` (module docstring for the method and convention).
    """
    t_start = time.perf_counter()
    G = group if isinstance(group, SymmetryGroup) else parse_symmetry(str(group))
    G.require_proper("symmetry-align")
    if G.order == 1:
        raise InputError("symmetry-align needs a symmetry other than C1")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    vol = torch.as_tensor(volume).to(dev, torch.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"expected a cubic 3D map, got shape {tuple(vol.shape)}")
    D = vol.shape[0]
    if D < 8 or D % 2:
        raise InputError(f"symmetry-align needs an even box of at least 8 voxels, got {D}")

    mask_full = spherical_mask(D, D / 2 - 2, edge=2.0, device=dev)
    score_input = symmetry_score(vol - _background(vol, mask_full), G, mask_full)
    c = _centre_of_mass(vol, mask_full).cpu() if center else torch.zeros(3, dtype=torch.float64)

    # ---- global search on a small centred copy: score the conjugates H_g = Q^T R_g Q
    d = min(D, search_box)
    d -= d % 2
    mask_d = spherical_mask(d, d / 2 - 2, edge=2.0, device=dev)
    small = _downsample(vol, d)
    c_d = c * (d / D)
    small0 = rotate_volume(
        small - _background(small, mask_d), torch.eye(3, dtype=torch.float64), -c_d.to(dev)
    )
    ref = small0 * mask_d
    ref = ref - (ref.sum() / mask_d.sum()) * mask_d
    gen = torch.Generator().manual_seed(int(seed))
    turn = random_rotations(1, generator=gen)[0]
    rots = turn @ super_fibonacci_rotations(n_global)  # (N, 3, 3) float64, candidate Q
    probes = _probe_elements(G)
    H = rots.transpose(1, 2)[:, None] @ probes[None] @ rots[:, None]  # (N, P, 3, 3)
    H = H.reshape(-1, 3, 3).to(dev)
    w = mask_d.reshape(-1)
    sw = w.sum()
    rnorm = ref.reshape(-1).norm().clamp_min(1e-30)
    scores = torch.empty(H.shape[0], dtype=torch.float64)
    nb = math.ceil(H.shape[0] / batch)
    pbar = bar(total=nb, desc="symmetry-align: global search", unit="batch") if progress else None
    with torch.no_grad():
        for b0 in range(0, H.shape[0], batch):
            moved = rotate_volume(small0, H[b0 : b0 + batch]).reshape(-1, d**3)
            mean = (moved * w).sum(1, keepdim=True) / sw
            mc = (moved - mean) * w
            den = ((mc * (moved - mean)).sum(1).sqrt() * rnorm).clamp_min(1e-30)
            cc = (mc @ ref.reshape(-1)) / den
            scores[b0 : b0 + batch] = cc.double().cpu()
            if pbar is not None:
                pbar.update(1)
    if pbar is not None:
        pbar.close()
    scores = scores.reshape(n_global, -1).mean(1)

    with _single_thread() if dev.type == "cpu" else contextlib.nullcontext():
        score_d = _SymScore(small, G, mask_d)
        best = None
        for i in _select_distinct(scores, rots, n_candidates, math.radians(15)):
            Q = rots[i].numpy()
            t = -(Q @ c_d.numpy())
            if center:
                Q, t, s = _refine(score_d, Q, t, math.radians(5), 0.5, 400)
            else:
                Q, t, s = _refine_rotation(score_d, Q, math.radians(5), 300)
            if best is None or s > best[2]:
                best = (Q, t, s)
        Q, t_d, _ = best
        r = min(D, refine_box or 32)
        r -= r % 2
        mask_r = spherical_mask(r, r / 2 - 2, edge=2.0, device=dev)
        score_r = _SymScore(_downsample(vol, r) if r < D else vol, G, mask_r)
        if center:
            Q, t_r, _ = _refine(score_r, Q, t_d * (r / d), math.radians(1.5), 0.3 * r / d, 500)
        else:
            Q, t_r, _ = _refine_rotation(score_r, Q, math.radians(1.5), 300)
        t = t_r * (D / r)

    Qt = torch.as_tensor(Q, dtype=torch.float64)
    tt = torch.as_tensor(t, dtype=torch.float64)
    moved = rotate_volume(vol, Qt.to(dev), tt.to(dev))
    score = symmetry_score(moved - _background(moved, mask_full), G, mask_full)
    return SymmetryAlignResult(
        group=G.name,
        rotation=Qt,
        shift_px=tt,
        score=score,
        score_input=score_input,
        aligned=symmetrize(moved, G).cpu(),
        moved=moved.cpu(),
        apix=float(apix),
        seconds=time.perf_counter() - t_start,
    )


def _refine_rotation(
    score: _SymScore, Q0: np.ndarray, rot_step: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Nelder-Mead over the rotation only (shift fixed at 0)."""
    from scipy.optimize import minimize

    z = np.zeros(3)

    def f(x):
        return -score(rotvec_to_matrix(x * rot_step) @ Q0, z)

    res = minimize(
        f,
        z,
        method="Nelder-Mead",
        options={
            "initial_simplex": np.vstack([z, np.eye(3)]),
            "xatol": 1e-2,
            "fatol": 1e-7,
            "maxfev": max_iter,
        },
    )
    return rotvec_to_matrix(res.x * rot_step) @ Q0, z.copy(), float(-res.fun)
