"""Maps with point-group symmetry: averaging over a group and scoring how symmetric a map is.

Convention (geometry/symmetry.py, validate.py): a group operator ``R_g`` acts on ``(x, y, z)``
column vectors about the box centre ``D // 2``, and ``rotate_volume(V, R)`` is
``out(p) = V(R^T p)``. The symmetrised map

    S(V)(p) = (1 / |G|) sum_g V(R_g^T p)  =  (1 / |G|) sum_g rotate_volume(V, R_g)(p)

satisfies ``S(V)(R_h^T p) = (1/|G|) sum_g V((R_h R_g)^T p) = S(V)(p)`` for every ``h`` (the
sum runs over the group once more), which is RELION's meaning of ``--sym``: the map is
unchanged by every operator. Operators act on the map's coordinates (left side of the
position vector); since a group holds each inverse, averaging over ``R_g`` or ``R_g^T`` is
the same sum.

Exactness: the sum over the group is exact, the samples are not. Operators that map the
voxel grid onto itself (Cn with n in 1, 2, 4; D2, D4; O) about the centre are exact index
permutations inside the inscribed sphere, so there ``S`` is idempotent to float rounding.
Other operators (C3, C5, D7, T, I...) are read by trilinear interpolation, which is a mild
low-pass filter: ``S(S(V))`` differs from ``S(V)`` by a little high-frequency damping
(relative residual of order 1e-2 for smooth maps at box 32, more near Nyquist), so apply
``S`` once to a map or to each gradient, not repeatedly to the same map. Voxels outside the
inscribed sphere (box corners) rotate out of the box and read zeros.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .geometry.symmetry import SymmetryGroup, parse_symmetry
from .validate import rotate_volume

__all__ = ["symmetrize", "symmetry_score"]


def _group(group) -> SymmetryGroup:
    return group if isinstance(group, SymmetryGroup) else parse_symmetry(str(group))


def _check_volume(volume: torch.Tensor) -> None:
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"expected a cubic 3D map, got shape {tuple(volume.shape)}")


def symmetrize(volume, group, chunk: int = 12) -> torch.Tensor:
    """Average of ``volume`` over the rotations of ``group`` about the centre ``D // 2``.

    Args:
        volume: ``(D, D, D)`` real map ``[z, y, x]`` (any device; float32 or float64).
        group: a :class:`SymmetryGroup` or a RELION name (``"D7"``).
        chunk: operators interpolated per batch (bounds memory to ``chunk * D^3`` values).

    Returns ``S(V) = mean_g rotate_volume(V, R_g)`` (module docstring), same dtype and device.
    ``C1`` returns a copy. Improper groups (``Ci``, ``Cs``) average over their mirrors too.
    """
    G = _group(group)
    vol = torch.as_tensor(volume)
    _check_volume(vol)
    if G.order == 1:
        return vol.clone()
    ops = G.torch(dtype=torch.float64, device=vol.device)
    acc_dtype = torch.float64 if vol.dtype == torch.float64 else torch.float32
    acc = torch.zeros_like(vol, dtype=acc_dtype)
    for i in range(0, G.order, chunk):
        acc += rotate_volume(vol, ops[i : i + chunk]).to(acc.dtype).sum(0)
    return (acc / G.order).to(vol.dtype)


def symmetry_score(volume, group, mask=None) -> float:
    """Pearson correlation of ``volume`` with :func:`symmetrize` of it, in [-1, 1].

    1 for a map with the symmetry (up to interpolation); for a map without it, about
    ``1 / sqrt(order)`` or less (the symmetrised map keeps only the invariant part). ``mask``
    (``(D, D, D)`` weights, e.g. ``validate.spherical_mask``) restricts the correlation; the
    default is the whole box.
    """
    G = _group(group)
    v = torch.as_tensor(volume).to(torch.float64)
    s = symmetrize(v, G)
    w = (
        torch.ones_like(v)
        if mask is None
        else torch.as_tensor(mask, dtype=torch.float64, device=v.device)
    )
    sw = w.sum()
    a = v - (w * v).sum() / sw
    b = s - (w * s).sum() / sw
    num = (w * a * b).sum()
    den = torch.sqrt((w * a * a).sum() * (w * b * b).sum()).clamp_min(1e-300)
    return float(num / den)
