"""Point-group symmetry with RELION's names and axis conventions.

Groups (RELION 3.1 ``--sym`` names, case-insensitive):

* ``C1`` (no symmetry), ``Cn``: n-fold axis along z.
* ``Dn``: n-fold axis along z and a 2-fold axis along x (n 2-folds in the xy plane).
* ``T``: 3-fold along z, a 2-fold along ``(0, sqrt(2/3), sqrt(1/3))``.
* ``O``: 4-folds along x, y, z (3-folds along the cube diagonals).
* ``I1``..``I4``: RELION's four icosahedral settings; plain ``I`` is RELION's default ``I2``.
  ``I1`` and ``I2`` have 2-folds along x, y, z (the "222" settings, 5-folds in the yz resp.
  xz plane), ``I3`` and ``I4`` a 5-fold along z and a 2-fold along ``(-+sin a, 0, cos a)``,
  ``a = 31.72`` deg (``I3`` minus, ``I4`` plus).
* ``Ci`` (inversion) and ``Cs`` (mirror z -> -z): improper, order 2. Other improper groups
  (``Cnv, Cnh, Sn, Dnh, Dnd, Td, Th, Oh, Ih``) are rejected: maps of proteins are chiral.

Operators are ``(order, 3, 3)`` float64 orthogonal matrices acting on ``(x, y, z)`` column
vectors, the convention of :func:`cryorecon.validate.rotate_volume` and of RELION's Euler
matrices (geometry/rotations.py); element 0 is the identity. A map ``V`` has the symmetry
``G`` when ``V(R_g^T x) = V(x)`` for all ``g`` (equivalently ``V(R_g x) = V(x)``: a group
holds the inverse of each element), i.e. ``rotate_volume(V, R_g) == V``; this is what
RELION's ``--sym`` means. The sets of matrices equal those printed by
``relion_refine --sym NAME --print_symmetry_ops`` (its ``R`` matrices; tested).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError

__all__ = [
    "SymmetryGroup",
    "parse_symmetry",
    "axis_rotation",
    "VALID_FORMS",
    "direction_mask",
    "asymmetric_unit_mask",
    "asymmetric_unit_grid",
]

VALID_FORMS = "C1, Cn, Ci, Cs, Dn (n >= 2), T, O, I, I1, I2, I3, I4"

_PHI = (1.0 + math.sqrt(5.0)) / 2.0
_IMPROPER = re.compile(r"^(C\d+[VH]|S\d+|D\d+[HD]|T[DH]|OH|I\d?H)$")


@dataclass(frozen=True)
class SymmetryGroup:
    """A finite point group: RELION ``name``, ``order`` and ``operators`` ``(order, 3, 3)``.

    ``operators[0]`` is the identity; matrices act on ``(x, y, z)`` column vectors.
    ``proper`` is True when every operator is a rotation (determinant +1).
    """

    name: str
    operators: np.ndarray

    @property
    def order(self) -> int:
        return int(self.operators.shape[0])

    @property
    def proper(self) -> bool:
        return bool(np.all(np.linalg.det(self.operators) > 0))

    def require_proper(self, what: str) -> None:
        """Raise :class:`InputError` if the group has improper operators."""
        if not self.proper:
            raise InputError(
                f"{what} needs a rotation group; {self.name} has mirror operators "
                "(maps of proteins are chiral)"
            )

    def torch(self, dtype=None, device=None):
        """The operators as a torch tensor ``(order, 3, 3)`` (float64 unless ``dtype``)."""

        return torch.as_tensor(self.operators, dtype=dtype or torch.float64, device=device)


def axis_rotation(axis, angle: float) -> np.ndarray:
    """Rotation by ``angle`` (radians, right-handed) about ``axis`` (3,), float64 (3, 3)."""
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    K = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * (K @ K)


def _fold(axis, n: int) -> np.ndarray:
    return axis_rotation(axis, 2.0 * math.pi / n)


def _close(generators: list[np.ndarray], expected: int) -> np.ndarray:
    """All products of ``generators`` (closure), identity first; checks the order."""
    elems = [np.eye(3)]

    def known(m):
        return any(np.abs(m - e).max() < 1e-8 for e in elems)

    frontier = list(elems)
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                m = g @ a
                if not known(m):
                    elems.append(m)
                    new.append(m)
                    if len(elems) > expected:
                        raise AssertionError(f"generators give more than {expected} elements")
        frontier = new
    if len(elems) != expected:
        raise AssertionError(f"generators give {len(elems)} elements, expected {expected}")
    out = np.stack(elems)
    # Clean rounding: exact zeros and ones where the entries are within 1e-12 of them.
    for v in (0.0, 1.0, -1.0):
        out[np.abs(out - v) < 1e-12] = v
    return out


def _icosahedral(setting: int) -> np.ndarray:
    a = math.atan(1.0 / _PHI)  # angle between a 5-fold and its nearest 2-fold, 31.72 deg
    if setting == 1:
        gens = [_fold((0, 0, 1), 2), _fold((0, 1, _PHI), 5)]
    elif setting == 2:
        gens = [_fold((0, 0, 1), 2), _fold((1, 0, _PHI), 5)]
    elif setting == 3:
        gens = [_fold((0, 0, 1), 5), _fold((-math.sin(a), 0, math.cos(a)), 2)]
    else:
        gens = [_fold((0, 0, 1), 5), _fold((math.sin(a), 0, math.cos(a)), 2)]
    return _close(gens, 60)


def _bad(name: str, why: str = "") -> InputError:
    return InputError(f"unknown symmetry {name!r}{why}; valid forms: {VALID_FORMS}")


def parse_symmetry(name: str) -> SymmetryGroup:
    """The point group called ``name`` (RELION's ``--sym`` names, case-insensitive).

    Raises :class:`InputError` (one line, listing the valid forms) for an unknown name, and
    for improper groups other than ``Ci`` and ``Cs``.
    """
    if not isinstance(name, str):
        raise _bad(str(name))
    key = name.strip().upper()
    z, x = (0, 0, 1), (1, 0, 0)
    m = re.fullmatch(r"([CD])(\d+)", key)
    if m:
        n = int(m.group(2))
        if n < 1 or (m.group(1) == "D" and n < 2):
            raise _bad(
                name,
                f" (the order of {m.group(1)}n must be at least {1 if m.group(1) == 'C' else 2})",
            )
        if m.group(1) == "C":
            ops = _close([_fold(z, n)], n) if n > 1 else np.eye(3)[None]
            return SymmetryGroup(f"C{n}", ops)
        return SymmetryGroup(f"D{n}", _close([_fold(z, n), _fold(x, 2)], 2 * n))
    if key == "CI":
        return SymmetryGroup("Ci", np.stack([np.eye(3), -np.eye(3)]))
    if key == "CS":
        return SymmetryGroup("Cs", np.stack([np.eye(3), np.diag([1.0, 1.0, -1.0])]))
    if key == "T":
        return SymmetryGroup(
            "T", _close([_fold(z, 3), _fold((0, math.sqrt(2 / 3), math.sqrt(1 / 3)), 2)], 12)
        )
    if key == "O":
        return SymmetryGroup("O", _close([_fold(z, 4), _fold((1, 1, 1), 3)], 24))
    m = re.fullmatch(r"I([1-4]?)", key)
    if m:
        setting = int(m.group(1) or 2)
        return SymmetryGroup("I" + (m.group(1) or ""), _icosahedral(setting))
    if _IMPROPER.match(key):
        raise InputError(
            f"improper symmetry {name!r} (with mirrors) is not supported: maps of "
            f"proteins are chiral; valid forms: {VALID_FORMS}"
        )
    raise _bad(name)


# --------------------------------------------------------------------------------------------
# Asymmetric units of the pose quadrature
# --------------------------------------------------------------------------------------------

# A generic reference direction and rotation (fixed by no operator of any group here); the
# asymmetric unit is the set of poses "closest" to them within their orbit (Dirichlet domain).
_REF_DIRECTION = np.array([0.31, 0.17, 0.93]) / np.linalg.norm([0.31, 0.17, 0.93])
_REF_ROTATION = axis_rotation((0.43, -0.61, 0.67), 0.77)
_TIE = 1e-6  # cosines closer than this are a tie (grid rotations are float32)


def _keys(rotations, G: SymmetryGroup):
    """(N, K) direction key ``(A R_g)[2] . c`` and rotation key ``tr(C^T A R_g)``."""
    A = torch.as_tensor(rotations).to(torch.float64)
    ops = G.torch(device=A.device)
    c = torch.as_tensor(_REF_DIRECTION, device=A.device)
    C = torch.as_tensor(_REF_ROTATION, device=A.device)
    s1 = torch.einsum("nj,kjl,l->nk", A[:, 2, :], ops, c)  # third rows of A R_g, dot c
    s2 = torch.einsum("nij,kjl,il->nk", A, ops, C)
    return s1, s2


def direction_mask(directions, group) -> torch.Tensor:
    """Viewing directions ``d`` (M, 3) inside the asymmetric unit of the sphere: (M,) bool.

    The pose ``A`` (RELION, third row ``d``) and ``A R_g`` give the same image of a
    ``G``-symmetric map (:func:`asymmetric_unit_mask`), and ``(A R_g)[2] = R_g^T d``, so the
    directions form orbits ``{R_g^T d}``. ``d`` is kept when it is the member of its orbit
    closest to a fixed generic direction ``c`` (``d . c >= (R_g^T d) . c`` for every g, up to
    a 1e-6 tie): the Dirichlet domain of ``c``, one direction per orbit except on its
    boundary and on rotation axes (measure zero), where ties are all kept. Covers about
    ``1 / order`` of the sphere. Needs a rotation group (InputError otherwise).
    """
    G = group if isinstance(group, SymmetryGroup) else parse_symmetry(str(group))
    G.require_proper("an asymmetric unit of poses")
    d = torch.as_tensor(directions).to(torch.float64)
    c = torch.as_tensor(_REF_DIRECTION, device=d.device)
    s1 = torch.einsum("mj,kjl,l->mk", d, G.torch(device=d.device), c)  # (R_g^T d) . c
    return s1[:, 0] >= s1.max(dim=1).values - _TIE


def asymmetric_unit_mask(rotations, group, chunk: int = 2**16) -> torch.Tensor:
    """Poses ``A`` (N, 3, 3) that form one representative per symmetry orbit: (N,) bool.

    **Which side.** RELION's pose ``A`` puts image point ``(x, y)`` at ``A^T (x, y, z)`` in the
    map frame, so the projection image is ``I_A(x, y) = int V(A^T (x, y, z)) dz`` (Eq. 1). If
    ``V(R_g^T p) = V(p)`` for all ``g`` (the map has the symmetry), then

        I_{A R_g}(x, y) = int V(R_g^T A^T (x, y, z)) dz = int V(A^T (x, y, z)) dz = I_A(x, y),

    so the poses ``{A R_g : g in G}`` (the group on the right of A) see identical images and
    the marginal likelihood (Eq. 3) is the same at all of them; ``{R_g A}`` are not
    equivalent in general (tested with the slice operator). The third row (viewing
    direction) of ``A R_g`` is ``R_g^T d``; for Cn about z, ``A R_z(t)`` changes RELION's
    *rot* by ``t`` (psi and tilt unchanged), so the reduction is on rot (the direction's
    azimuth), not psi.

    **Criterion.** ``A`` is kept when it is the lexicographic maximum of its orbit for the
    keys ``((A R_g)[2] . c, tr(C^T A R_g))`` with a fixed generic direction ``c`` and rotation
    ``C`` (first key: the direction lies in :func:`direction_mask`'s asymmetric unit, ties
    within 1e-6 broken by the second key, which reduces the in-plane angle for directions on
    a rotation axis). Each orbit ``{A R_g}`` then has exactly one kept member except on
    measure-zero boundaries, and a uniform grid keeps about ``1 / order`` of its poses; for
    directions off the axes all in-plane angles of a kept direction are kept.

    The restricted quadrature sums over the kept poses with weights renormalised to 1
    (``log_w_R[mask] - logsumexp(log_w_R[mask])``), the uniform prior on the asymmetric unit.
    Needs a rotation group (InputError otherwise).
    """
    G = group if isinstance(group, SymmetryGroup) else parse_symmetry(str(group))
    G.require_proper("an asymmetric unit of poses")
    R = torch.as_tensor(rotations)
    out = torch.empty(R.shape[0], dtype=torch.bool, device=R.device)
    step = max(1, chunk // G.order)
    for i in range(0, R.shape[0], step):
        s1, s2 = _keys(R[i : i + step], G)
        better = (s1 > s1[:, :1] + _TIE) | ((s1 >= s1[:, :1] - _TIE) & (s2 > s2[:, :1]))
        out[i : i + step] = ~better.any(dim=1)
    return out


def asymmetric_unit_grid(grid, group):
    """A copy of a :class:`~cryorecon.geometry.grids.PoseGrid` restricted to the asymmetric unit.

    Keeps the directions of :func:`direction_mask` (all in-plane angles and shifts), so the
    grid stays a product ``directions x psi x shifts`` and everything that reads
    ``directions, psi, M_d, log_w_d, log_w_psi, log_p_R, rotations(), log_w_R()`` works as
    before. Weights (Eq. 4): a kept direction that ties with ``m`` members of its orbit (on a
    rotation axis, e.g. the poles for Cn and Dn, or on the unit's boundary) counts ``1 / m``;
    ``w_d`` is renormalised to sum to ``4 pi / order`` and ``p(R) = order / (8 pi^2)``
    (uniform on the asymmetric unit), so ``logsumexp(log_w_R()) == 0`` and the restricted sum
    of a ``G``-invariant integrand equals the full-grid sum up to quadrature error. The
    spacings ``r_d, r_psi, r_t`` are those of the full grid. ``C1`` returns ``grid`` itself.
    """
    import copy

    G = group if isinstance(group, SymmetryGroup) else parse_symmetry(str(group))
    G.require_proper("an asymmetric unit of poses")
    if G.order == 1:
        return grid
    d = grid.directions.to(torch.float64)
    c = torch.as_tensor(_REF_DIRECTION, device=d.device)
    s1 = torch.einsum("mj,kjl,l->mk", d, G.torch(device=d.device), c)
    top = s1.max(dim=1).values
    keep = s1[:, 0] >= top - _TIE
    ties = (s1 >= top[:, None] - _TIE).sum(1).to(torch.float64)[keep]
    out = copy.copy(grid)
    out.directions = grid.directions[keep].clone()
    out.M_d = int(keep.sum())
    w = 1.0 / ties
    log_w = torch.log(w / w.sum()) + math.log(4.0 * math.pi / G.order)
    out.log_w_d = log_w.to(grid.log_w_d.dtype)
    out.log_p_R = -math.log(8.0 * math.pi**2 / G.order)
    out.sizes = dict(grid.sizes, symmetry=G.name, M_d_full=grid.M_d)
    out.direction_index = torch.nonzero(keep).reshape(-1)
    return out
