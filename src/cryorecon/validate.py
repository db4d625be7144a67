"""Validation of reconstructions: Fourier shell correlation and alignment of two maps.

Paper Sec. 4.3: FSC is the normalised cross-correlation of two maps' Fourier coefficients
over shells of constant frequency; it needs the maps aligned, which is done by maximising the
overall normalised cross-correlation with a simplex search. Pure functions on tensors; no I/O.

Conventions (DESIGN.md):
- volumes ``[z, y, x]``, float32, rotation centre at index ``D // 2`` on every axis;
- positions and shifts are ``(x, y, z)`` vectors (voxels unless named ``*_A``);
- :func:`rotate_volume` defines the transform used everywhere here::

      out(p) = vol(M^T (p - t))

  with ``p`` the voxel position relative to the centre. For a proper rotation ``M = R`` the
  content is rotated *actively* by ``R`` about the centre and then moved by ``+t``.
  Pinned: ``M`` = +90 deg about z (``x -> y``) equals
  ``torch.roll(torch.rot90(vol, 1, dims=(2, 1)), 1, dims=2)`` (the roll re-centres on D//2
  for even D). With ``M = euler_to_matrix(rot, tilt, psi)`` (RELION's A), the z-projection of
  ``rotate_volume(vol, A)`` is the particle view at those angles, since RELION puts image
  point ``(x, y)`` at ``A^T (x, y, 0)`` in the map frame (see geometry/rotations.py).
- hand: :func:`flip_hand` mirrors ``z -> -z`` about the centre, ``out(x, y, z) = vol(x, y, -z)``,
  which equals ``rotate_volume(vol, diag(1, 1, -1))``. :func:`align` reports
  ``aligned = rotate_volume(flip_hand(mov) if flipped else mov, rotation, shift_px)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .fourier.transforms import fft3c, ifft3c
from .progress import bar, log

FSC_THRESHOLDS = (0.5, 0.143)
HAND_FLIP = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))  # (x, y, z) order


# --------------------------------------------------------------------------------------------
# FSC
# --------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != 3 or len(set(a.shape)) != 1:
        raise InputError(f"expected a cubic 3D map, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise InputError(f"box sizes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def shell_index(D: int, device=None) -> torch.Tensor:
    """Shell number ``round(|k|)`` (Fourier pixels) of every voxel of a centred D^3 spectrum."""
    k = torch.arange(D, device=device, dtype=torch.float64) - D // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.round(torch.sqrt(kx * kx + ky * ky + kz * kz)).long()


def fsc(a, b, apix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier shell correlation of two maps ``[z, y, x]`` of the same box ``D``.

    Shells are 1 Fourier pixel wide: shell ``n`` holds the coefficients with
    ``round(|k|) == n``, ``n = 0 .. D//2`` (Nyquist); corners beyond Nyquist are ignored.
    ``FSC_n = Re(sum A conj(B)) / sqrt(sum |A|^2 sum |B|^2)`` over the shell.

    Returns ``(freq, curve)``: float64 CPU tensors of shape ``(D//2 + 1,)``, ``freq`` in 1/Å
    (``n / (D * apix)``). A shell where either map has no power gets FSC 0.

    Example (``cryorecon.fsc``)::

        >>> import torch, cryorecon
        >>> a = torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> freq, curve = cryorecon.fsc(a, 2 * a, apix=2.0)
        >>> len(freq), float(freq[-1]), bool(torch.allclose(curve, torch.ones_like(curve)))
        (9, 0.25, True)
    """
    a = torch.as_tensor(a)
    b = torch.as_tensor(b).to(a.device)
    _check_pair(a, b)
    D = a.shape[0]
    A = fft3c(a.to(torch.float64))
    B = fft3c(b.to(torch.float64))
    n_shells = D // 2 + 1
    idx = shell_index(D, device=a.device).reshape(-1)
    keep = idx < n_shells
    idx = idx[keep]

    def shell_sum(x):
        return torch.zeros(n_shells, dtype=torch.float64, device=a.device).index_add_(
            0, idx, x.reshape(-1)[keep]
        )

    num = shell_sum((A * B.conj()).real)
    pa = shell_sum(A.abs() ** 2)
    pb = shell_sum(B.abs() ** 2)
    den = torch.sqrt(pa * pb)
    curve = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    freq = torch.arange(n_shells, dtype=torch.float64) / (D * apix)
    return freq, curve.cpu()


def shell_counts(D: int) -> torch.Tensor:
    """Number of voxels in each FSC shell (``D//2 + 1`` shells), as used by :func:`fsc`."""
    idx = shell_index(D).reshape(-1)
    return torch.bincount(idx[idx <= D // 2], minlength=D // 2 + 1)


def _as_float64_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def resolution_at(freq, curve, threshold: float) -> float:
    """Resolution (Å) where ``curve`` first drops below ``threshold``.

    The crossing frequency is interpolated linearly between the last shell at or above the
    threshold and the first one below it; the result is its inverse. If the curve never drops
    below the threshold, the Nyquist resolution ``1 / freq[-1]`` (= 2 apix) is returned; if it
    starts below (shell 0), ``inf``.
    """
    f = _as_float64_array(freq)
    c = _as_float64_array(curve)
    if f.shape != c.shape or f.ndim != 1 or f.size < 2:
        raise ValueError(
            f"resolution_at: freq and curve must be 1D of equal length >= 2, got {f.shape}, "
            f"{c.shape}"
        )
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return float(1.0 / f[-1])
    i = int(below[0])
    if i == 0:
        return math.inf
    c0, c1 = c[i - 1], c[i]
    w = (c0 - threshold) / (c0 - c1)
    fc = f[i - 1] + w * (f[i] - f[i - 1])
    return float(1.0 / fc) if fc > 0 else math.inf


def spherical_mask(
    D: int, radius: float, edge: float = 3.0, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Soft sphere about the centre D//2: 1 within ``radius`` voxels, cosine fall-off to 0
    over ``edge`` voxels beyond it. Shape ``(D, D, D)``."""
    k = torch.arange(D, device=device, dtype=torch.float64) - D // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    r = torch.sqrt(kx * kx + ky * ky + kz * kz)
    if edge <= 0:
        return (r <= radius).to(dtype)
    x = ((r - radius) / edge).clamp(0.0, 1.0)
    return (0.5 * (1 + torch.cos(math.pi * x))).to(dtype)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

_BASE_CACHE: dict = {}


def _base_coords(D: int, device, dtype) -> torch.Tensor:
    """Voxel positions ``(x, y, z)`` relative to the centre D//2, shape (D^3, 3), cached."""
    key = (D, str(device), dtype)
    p = _BASE_CACHE.get(key)
    if p is None:
        k = torch.arange(D, device=device, dtype=torch.float64) - D // 2
        pz, py, px = torch.meshgrid(k, k, k, indexing="ij")
        p = torch.stack([px, py, pz], -1).reshape(-1, 3).to(dtype)
        if len(_BASE_CACHE) > 8:
            _BASE_CACHE.clear()
        _BASE_CACHE[key] = p
    return p


def _sample_grid(D: int, M: torch.Tensor, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """grid_sample grid for ``out(p) = vol(M^T (p - t))``; M (B,3,3), t (B,3) in (x,y,z) voxels.

    Returns (1, B*D, D, D, 3) normalised for ``align_corners=True`` (index 0 -> -1,
    index D-1 -> +1); the last axis is (x, y, z) as grid_sample wants for ``[z, y, x]`` input.
    """
    s = 2.0 / (D - 1)
    M = M.double()
    # row-vector form: src = (p - t) @ M = p @ M - t @ M; grid = (src + D//2) * s - 1
    Ms = (M * s).to(dtype)
    off = (((D // 2) - (t.double()[:, None, :] @ M)) * s - 1.0).to(dtype)  # (B, 1, 3)
    base = _base_coords(D, M.device, dtype)
    if Ms.shape[0] == 1:  # a plain 2D GEMM is much faster than a broadcast batched matmul
        grid = torch.addmm(off[0], base, Ms[0])[None]
    else:
        grid = torch.matmul(base, Ms) + off  # (B, D^3, 3)
    return grid.reshape(1, -1, D, D, 3)


def rotate_volume(vol, R, shift=None) -> torch.Tensor:
    """Rotate (and shift) a volume: ``out(p) = vol(R^T (p - shift))``, trilinear, zero outside.

    Args:
        vol: ``(D, D, D)`` map ``[z, y, x]``; the rotation centre is index ``D // 2``.
        R: ``(3, 3)`` or ``(B, 3, 3)`` orthogonal matrix acting on ``(x, y, z)`` column vectors
            (a proper rotation, or improper, e.g. ``R @ HAND_FLIP``). The content is rotated
            actively by ``R``: a feature at ``q`` moves to ``R q + shift``.
        shift: ``(3,)`` or ``(B, 3)`` translation ``(tx, ty, tz)`` in voxels; ``None`` = 0.

    Returns ``(D, D, D)`` (or ``(B, D, D, D)`` for batched ``R``) in ``vol``'s dtype.
    Pinned by tests: ``R`` = +90 deg about z (``x -> y``) equals
    ``torch.roll(torch.rot90(vol, 1, dims=(2, 1)), 1, dims=2)`` for even D.
    """
    vol = torch.as_tensor(vol)
    D = vol.shape[-1]
    R = torch.as_tensor(R, device=vol.device)
    batched = R.ndim == 3
    M = R.reshape(-1, 3, 3)
    if shift is None:
        t = torch.zeros(M.shape[0], 3, dtype=torch.float64, device=vol.device)
    else:
        t = (
            torch.as_tensor(shift, dtype=torch.float64, device=vol.device)
            .reshape(-1, 3)
            .expand(M.shape[0], 3)
        )
    work = vol.float() if vol.dtype not in (torch.float32, torch.float64) else vol
    grid = _sample_grid(D, M, t, dtype=work.dtype)
    out = F.grid_sample(
        work[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    out = out.reshape(M.shape[0], D, D, D).to(vol.dtype)
    return out if batched else out[0]


def flip_hand(vol) -> torch.Tensor:
    """Mirror ``z -> -z`` about the centre D//2 (a change of hand): ``out[k] = vol[D - k]``.

    The plane ``k = 0`` (whose mirror ``D`` is outside the box) becomes 0, exactly as
    ``rotate_volume(vol, HAND_FLIP)`` does.
    """
    vol = torch.as_tensor(vol)
    out = torch.roll(torch.flip(vol, dims=(-3,)), 1, dims=-3)
    out[..., 0, :, :] = 0
    return out


def rotvec_to_matrix(w) -> np.ndarray:
    """Rotation vector (axis * angle, radians) -> 3x3 matrix (Rodrigues), float64 numpy."""
    w = np.asarray(w, dtype=np.float64)
    th = float(np.linalg.norm(w))
    K = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    if th < 1e-12:
        return np.eye(3) + K
    K /= th
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * (K @ K)


def rotation_angle(R1, R2) -> float:
    """Angle (radians) of the rotation ``R1 R2^T`` (geodesic distance on SO(3))."""
    R1 = np.asarray(torch.as_tensor(R1).double().cpu())
    R2 = np.asarray(torch.as_tensor(R2).double().cpu())
    c = (np.trace(R1 @ R2.T) - 1) / 2
    return float(np.arccos(np.clip(c, -1.0, 1.0)))


def super_fibonacci_rotations(n: int, dtype=torch.float64) -> torch.Tensor:
    """``n`` near-uniform rotations from a super-Fibonacci spiral on S^3 (Alexa, CVPR 2022)."""
    phi = math.sqrt(2.0)
    psi = 1.533751168755204288118041
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r = torch.sqrt(s / n)
    Rr = torch.sqrt(1.0 - s / n)
    alpha = 2 * math.pi * s / phi
    beta = 2 * math.pi * s / psi
    q = torch.stack(
        [r * torch.sin(alpha), r * torch.cos(alpha), Rr * torch.sin(beta), Rr * torch.cos(beta)], -1
    )
    from .geometry.rotations import quaternion_to_matrix

    return quaternion_to_matrix(q).to(dtype)


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


@dataclass
class AlignResult:
    """Outcome of :func:`align`.

    ``aligned = rotate_volume(flip_hand(mov) if flipped else mov, rotation, shift_px)``,
    equivalently ``rotate_volume(mov, matrix, shift_px)`` with ``matrix = rotation @ HAND_FLIP``
    when flipped.

    Attributes:
        rotation: (3, 3) float64 proper rotation (acting on (x, y, z)).
        shift_px: (3,) float64 translation (tx, ty, tz) in voxels; ``shift_A`` in Å.
        flipped: whether ``mov`` had to be mirrored (hand changed) to match ``ref``.
        cc: Pearson correlation of ``ref`` and ``aligned`` over the whole box.
        aligned: the transformed full-resolution ``mov``, (D, D, D) float32.
        cc_other_hand: best correlation found (downsampled search) with the other hand.
        seconds: wall time.
    """

    rotation: torch.Tensor
    shift_px: torch.Tensor
    flipped: bool
    cc: float
    aligned: torch.Tensor
    apix: float = 1.0
    cc_other_hand: float = float("nan")
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def shift_A(self) -> torch.Tensor:
        return self.shift_px * self.apix

    @property
    def matrix(self) -> torch.Tensor:
        """The (possibly improper) matrix ``M`` with
        ``aligned = rotate_volume(mov, M, shift_px)``."""
        return self.rotation @ HAND_FLIP if self.flipped else self.rotation


def _downsample(vol: torch.Tensor, d: int) -> torch.Tensor:
    """Fourier-crop a (D,D,D) map to (d,d,d) keeping the centre D//2 -> d//2, with a cosine
    low-pass tapering to zero at the new Nyquist (avoids ringing)."""
    D = vol.shape[-1]
    Fv = fft3c(vol.double())
    if d < D:
        lo = D // 2 - d // 2
        Fv = Fv[lo : lo + d, lo : lo + d, lo : lo + d]
    k = torch.arange(d, device=vol.device, dtype=torch.float64) - d // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    r = torch.sqrt(kx * kx + ky * ky + kz * kz) / (d / 2)
    taper = torch.where(
        r < 0.5, torch.ones_like(r), 0.5 * (1 + torch.cos(math.pi * ((r - 0.5) / 0.5).clamp(0, 1)))
    )
    return ifft3c(Fv * taper).real.float()


def _background(vol: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Background level of a map: its mean outside the (soft) mask, i.e. in the box corners."""
    out = mask < 1e-3
    return vol[out].mean() if bool(out.any()) else vol.mean()


def _prepare(vol: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Background-subtract, mask, make zero-mean within the mask and scale to unit norm."""
    v = (vol - _background(vol, mask)) * mask
    v = v - (v.sum() / mask.sum()) * mask
    return v / v.norm().clamp_min(1e-30)


class _Score:
    """Normalised cross-correlation of ``ref`` and the transformed ``mov`` over a soft sphere
    fixed in the reference frame: the ``mask``-weighted Pearson correlation.

    Only the reference is masked; ``mov`` is moved whole (background-subtracted, so the zero
    padding of :func:`rotate_volume` matches it), so the mask never cuts the two maps
    differently, which would bias the optimum.
    """

    def __init__(self, ref: torch.Tensor, mov: torch.Tensor, mask: torch.Tensor):
        w = mask.to(torch.float32)
        self.w, self.sw = w, w.sum()
        rbar = (w * ref).sum() / self.sw
        rc = w * (ref - rbar)
        self.rc = rc / torch.sqrt((rc * (ref - rbar)).sum()).clamp_min(1e-30)
        self.mov = mov - _background(mov, mask)

    def __call__(self, M: np.ndarray, t: np.ndarray) -> float:
        x = rotate_volume(self.mov, torch.as_tensor(M, device=self.mov.device), torch.as_tensor(t))
        wx = self.w * x
        var = (wx * x).sum() - wx.sum() ** 2 / self.sw
        return float((self.rc * x).sum() / torch.sqrt(var.clamp_min(1e-30)))


def _refine(
    score: _Score,
    R0: np.ndarray,
    t0: np.ndarray,
    hand: np.ndarray,
    rot_step: float,
    shift_step: float,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Nelder-Mead over (rotation vector, shift) around (R0, t0); returns (R, t, ncc).

    The parameters are scaled so that one unit is ``rot_step`` radians or ``shift_step``
    voxels; the initial simplex spans one unit along each axis.
    """
    from scipy.optimize import minimize

    def params(x):
        R = rotvec_to_matrix(x[:3] * rot_step) @ R0
        return R, t0 + x[3:] * shift_step

    def f(x):
        R, t = params(x)
        return -score(R @ hand, t)

    x0 = np.zeros(6)
    simplex = np.vstack([x0, np.eye(6)])
    res = minimize(
        f,
        x0,
        method="Nelder-Mead",
        options={"initial_simplex": simplex, "xatol": 1e-2, "fatol": 1e-7, "maxfev": max_iter},
    )
    R, t = params(res.x)
    return R, t, float(-res.fun)


class _single_thread:
    """Run torch on one CPU thread inside the block (restored after).

    The Nelder-Mead evaluations are small, serial and latency-bound: with several intra-op
    threads on a busy machine each evaluation waits for all threads to be scheduled (measured
    20x slower for 24^3 maps, 4-5x for 64^3 on a loaded 2-core machine).
    """

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)
        return False


def _select_distinct(
    scores: torch.Tensor, rots: torch.Tensor, k: int, min_angle: float
) -> list[int]:
    order = torch.argsort(scores, descending=True).tolist()
    chosen: list[int] = []
    for i in order:
        if all(rotation_angle(rots[i], rots[j]) > min_angle for j in chosen):
            chosen.append(i)
            if len(chosen) == k:
                break
    return chosen


def align(
    ref,
    mov,
    apix: float = 1.0,
    device=None,
    seed: int = 0,
    n_global: int = 3000,
    search_box: int = 24,
    refine_box: int | None = None,
    n_candidates: int = 3,
    max_shift: float = 0.25,
    batch: int = 150,
    try_flip: bool = True,
    progress: bool = True,
) -> AlignResult:
    """Align ``mov`` onto ``ref`` over rotation, translation and handedness.

    Maximises the normalised cross-correlation of ``ref`` and the transformed ``mov``
    (Sec. 4.3, simplex search), returning ``aligned = rotate_volume(mov, M, shift_px)`` with
    ``M = rotation`` or ``rotation @ HAND_FLIP`` (mirror z -> -z first) if ``flipped``.

    1. Global search: both maps low-passed (cosine taper) and Fourier-cropped to
       ``search_box`` voxels, background-subtracted and softly masked to the inscribed sphere.
       ``n_global`` near-uniform rotations (super-Fibonacci spiral on S^3, turned by a random
       rotation drawn from ``seed``) are applied in batches by trilinear interpolation; for
       each, the best translation (within ``max_shift * D`` per axis) is the peak of an FFT
       cross-correlation. The mirror hand is scored from the same rotated copies by
       correlating them with the mirrored reference (no extra interpolation).
    2. The ``n_candidates`` best rotations per hand (at least 20 deg apart) are refined by
       Nelder-Mead over 6 parameters (rotation vector about the current best, shift) on the
       small maps; the score is the Pearson correlation within a soft sphere fixed in the
       reference frame (only ``ref`` is masked, so the mask never biases the optimum). The
       hand with the higher score wins.
    3. The winner is refined again by Nelder-Mead at ``refine_box`` voxels (default: the full
       box, capped at 64 for speed) and the transform applied to the full-resolution ``mov``.

    ``AlignResult.cc`` is the plain Pearson correlation of ``ref`` and ``aligned`` over the
    whole box. Deterministic for a given ``seed``. ``apix`` (Å/voxel) only scales
    ``AlignResult.shift_A``. Raises :class:`InputError` if the boxes differ, are not cubic,
    odd or smaller than 8.

    Example (``cryorecon.align``): a map and a copy moved by 2 voxels along x::

        >>> import torch, cryorecon
        >>> g = torch.arange(16.0) - 8
        >>> z, y, x = torch.meshgrid(g, g, g, indexing="ij")
        >>> blobs = [(3, 0, 0, 3.0), (0, 2, 0, 2.0), (0, 0, -3, 1.5), (-2, -2, 2, 1.0)]
        >>> ref = sum(torch.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / (2 * s * s))
        ...           for a, b, c, s in blobs)
        >>> mov = torch.roll(ref, 2, dims=2)
        >>> res = cryorecon.align(ref, mov, n_global=500, progress=False)
        >>> res.cc > 0.95, res.flipped, [round(float(t)) for t in res.shift_px]
        (True, False, [-2, 0, 0])
    """
    t_start = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ref = torch.as_tensor(ref).to(dev, torch.float32)
    mov = torch.as_tensor(mov).to(dev, torch.float32)
    _check_pair(ref, mov)
    D = ref.shape[0]
    if D < 8 or D % 2:
        raise InputError(f"align needs an even box of at least 8 voxels, got {D}")

    # ---- 1. global search on small maps
    d = min(D, search_box)
    d -= d % 2
    mask_d = spherical_mask(d, d / 2 - 2, edge=2.0, device=dev)
    ref_small, mov_small = _downsample(ref, d), _downsample(mov, d)
    ref_d = _prepare(ref_small, mask_d)
    mov_d = _prepare(mov_small, mask_d)

    gen = torch.Generator().manual_seed(int(seed))
    from .geometry.rotations import random_rotations

    turn = random_rotations(1, generator=gen)[0]
    rots = (turn @ super_fibonacci_rotations(n_global)).to(dev)  # (N, 3, 3) float64

    hands = [torch.eye(3, dtype=torch.float64)] + ([HAND_FLIP] if try_flip else [])
    # The mirror hand costs no extra interpolation: cc(ref, T_{R F, t} mov) equals
    # cc(flip(ref), T_{F R F, F t} mov) (apply the flip F to both maps), so correlating each
    # rotated copy of mov with flip(ref) scores the hand-flipped transform with R' = F R F.
    refs_d = [ref_d] + ([flip_hand(ref_d)] if try_flip else [])
    Frefs = [torch.fft.rfftn(x, dim=(-3, -2, -1)) for x in refs_d]
    Fd = HAND_FLIP.to(dev)
    rots_h = [rots] + ([Fd @ rots @ Fd] if try_flip else [])
    smax = int(round(max_shift * d))
    k = torch.arange(d, device=dev)
    kc = torch.where(k > d // 2, k - d, k)  # circular shift value of each index
    sz, sy, sx = torch.meshgrid(kc, kc, kc, indexing="ij")
    allowed = ((sx.abs() <= smax) & (sy.abs() <= smax) & (sz.abs() <= smax)).reshape(-1)
    nb = math.ceil(n_global / batch)
    scores = torch.empty(len(hands), n_global, dtype=torch.float64)
    shifts = torch.empty(len(hands), n_global, 3, dtype=torch.float64)
    pbar = bar(total=nb, desc="align: global search", unit="batch") if progress else None
    with torch.no_grad():
        for b0 in range(0, n_global, batch):
            moved = rotate_volume(mov_d, rots[b0 : b0 + batch])  # (B, d, d, d)
            norms = moved.reshape(moved.shape[0], -1).norm(dim=1).clamp_min(1e-30)
            Fm = torch.fft.rfftn(moved, dim=(-3, -2, -1)).conj()
            for h, Fr in enumerate(Frefs):
                cc = torch.fft.irfftn(Fr * Fm, s=(d, d, d), dim=(-3, -2, -1))
                # cc[t] = sum_y ref(y) moved(y - t): the best t moves the rotated copy onto ref
                cc = cc.reshape(cc.shape[0], -1)
                cc = torch.where(allowed, cc, torch.full_like(cc, -math.inf))
                best, arg = cc.max(dim=1)
                scores[h, b0 : b0 + batch] = (best / norms).double().cpu()
                iz, iy, ix = arg // (d * d), (arg // d) % d, arg % d
                t = torch.stack([kc[ix], kc[iy], kc[iz]], -1).double()
                shifts[h, b0 : b0 + batch] = (
                    t @ hands[h].to(dev)
                ).cpu()  # F t for the flipped hand
            if pbar is not None:
                pbar.update(1)
    if pbar is not None:
        pbar.close()

    t_global = time.perf_counter()

    with _single_thread() if dev.type == "cpu" else contextlib.nullcontext():
        # ---- 2. refine the best distinct candidates per hand on the small maps
        score_d = _Score(ref_small, mov_small, mask_d)
        per_hand = []
        for h, hand in enumerate(hands):
            rh = rots_h[h].cpu()
            cands = _select_distinct(scores[h], rh, n_candidates, math.radians(20))
            best = None
            for i in cands:
                R, t, c = _refine(
                    score_d,
                    rh[i].numpy(),
                    shifts[h, i].numpy(),
                    hand.numpy(),
                    rot_step=math.radians(6),
                    shift_step=0.5,
                    max_iter=400,
                )
                log.debug(
                    "align: hand %d candidate %d global %.4f refined %.4f",
                    h,
                    i,
                    float(scores[h, i]),
                    c,
                )
                if best is None or c > best[2]:
                    best = (R, t, c)
            per_hand.append(best)
        h_best = int(np.argmax([p[2] for p in per_hand]))
        R, t_d, c_small = per_hand[h_best]
        hand = hands[h_best].numpy()
        cc_other = per_hand[1 - h_best][2] if len(hands) == 2 else float("nan")

        t_local = time.perf_counter()

        # ---- 3. final refinement at (up to) full size
        r = min(D, refine_box or 64)
        r -= r % 2
        mask_r = spherical_mask(r, r / 2 - 3, edge=3.0, device=dev)
        score_r = _Score(
            _downsample(ref, r) if r < D else ref, _downsample(mov, r) if r < D else mov, mask_r
        )
        t_r = t_d * (r / d)  # small voxels -> refine voxels
        R, t_r, c_full = _refine(
            score_r, R, t_r, hand, rot_step=math.radians(2), shift_step=0.5 * r / d, max_iter=600
        )
        t_full = t_r * (D / r)

    M = torch.as_tensor(R @ hand, device=dev)
    aligned = rotate_volume(mov, M, torch.as_tensor(t_full, device=dev))
    a = ref.double().reshape(-1) - ref.double().mean()
    bb = aligned.double().reshape(-1) - aligned.double().mean()
    cc = float((a @ bb) / (a.norm() * bb.norm()).clamp_min(1e-30))
    return AlignResult(
        rotation=torch.as_tensor(R, dtype=torch.float64),
        shift_px=torch.as_tensor(t_full, dtype=torch.float64),
        flipped=bool(h_best == 1),
        cc=cc,
        aligned=aligned.float().cpu(),
        apix=float(apix),
        cc_other_hand=float(cc_other),
        seconds=time.perf_counter() - t_start,
        details={
            "seconds_global": t_global - t_start,
            "seconds_local_small": t_local - t_global,
            "seconds_local_full": time.perf_counter() - t_local,
            "search_box": d,
            "refine_box": r,
            "ncc_search": float(c_small),
            "ncc_refine": float(c_full),
            "global_best": [float(scores[h].max()) for h in range(len(hands))],
        },
    )
