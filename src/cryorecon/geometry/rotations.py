"""Rotations in RELION's convention.

RELION (and the Heymann-Chagoyen-Belnap 2005 conventions) use ZYZ Euler angles
``(rot, tilt, psi)`` = ``rlnAngleRot, rlnAngleTilt, rlnAnglePsi``. The matrix
``A = Rz(psi) Ry(tilt) Rz(rot)`` (RELION's ``Euler_angles2matrix``) maps the particle's
(map's) frame to the image frame: a 2D image frequency (or position) ``(x, y)`` sits at
``x * A[0] + y * A[1]`` in the map's frame, i.e. the rows of A are the paper's
``n1, n2, d`` (Eq. 1: ``R = [n1, n2, d]^T``). Coordinates are ``(x, y, z)`` with volumes
stored ``[z, y, x]``. Angles are radians inside the package, degrees in files and CLI.
"""

from __future__ import annotations

import math

import torch


def euler_to_matrix(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION ``Euler_angles2matrix``: ZYZ angles in radians (broadcastable) -> (..., 3, 3)."""
    rot, tilt, psi = torch.broadcast_tensors(
        torch.as_tensor(rot), torch.as_tensor(tilt), torch.as_tensor(psi)
    )
    ca, sa = torch.cos(rot), torch.sin(rot)
    cb, sb = torch.cos(tilt), torch.sin(tilt)
    cg, sg = torch.cos(psi), torch.sin(psi)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    A = torch.stack(
        [
            torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
            torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
            torch.stack([sc, ss, cb], -1),
        ],
        -2,
    )
    return A


def matrix_to_euler(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`euler_to_matrix` (RELION ``Euler_matrix2angles``), radians.

    Returns ``(rot, tilt, psi)`` with tilt in [0, pi]. At tilt = 0 or pi the split between
    rot and psi is arbitrary; rot is set to 0 there.
    """
    A = torch.as_tensor(A)
    cb = A[..., 2, 2].clamp(-1.0, 1.0)
    sb = torch.sqrt(A[..., 2, 0] ** 2 + A[..., 2, 1] ** 2)
    tilt = torch.atan2(sb, cb)
    regular = sb > 16 * torch.finfo(A.dtype).eps
    rot = torch.where(regular, torch.atan2(A[..., 2, 1], A[..., 2, 0]), torch.zeros_like(cb))
    # With rot = 0 and sin(tilt) = 0 the first two columns are [[cos(tilt) cos(psi), sin(psi)],
    # [-cos(tilt) sin(psi), cos(psi)]], so the second column gives psi for tilt 0 and pi alike.
    psi = torch.where(
        regular,
        torch.atan2(A[..., 1, 2], -A[..., 0, 2]),
        torch.atan2(A[..., 0, 1], A[..., 1, 1]),
    )
    return rot, tilt, psi


def random_rotations(
    n: int, generator: torch.Generator | None = None, dtype=torch.float64
) -> torch.Tensor:
    """``n`` rotations uniform on SO(3) (Haar measure), from uniform random unit quaternions."""
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    return quaternion_to_matrix(q)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``(w, x, y, z)`` (..., 4) -> rotation matrices (..., 3, 3)."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def direction_inplane_to_matrix(directions: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """Rotation with viewing direction ``d`` (third row) and in-plane angle ``psi`` (Sec. 3.2).

    ``directions`` (..., 3) unit vectors in the map frame; ``psi`` (...) radians. The direction
    ``d = (sin(tilt) cos(rot), sin(tilt) sin(rot), cos(tilt))`` gives rot and tilt, and the
    result is ``euler_to_matrix(rot, tilt, psi)``, so ``A[2] == d``.
    """
    d = directions / directions.norm(dim=-1, keepdim=True)
    tilt = torch.acos(d[..., 2].clamp(-1.0, 1.0))
    rot = torch.atan2(d[..., 1], d[..., 0])
    return euler_to_matrix(rot, tilt, psi)


def deg2rad(x):
    return x * (math.pi / 180.0)


def rad2deg(x):
    return x * (180.0 / math.pi)
