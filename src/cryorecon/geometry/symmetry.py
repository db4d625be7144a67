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

from ..errors import InputError

__all__ = ["SymmetryGroup", "parse_symmetry", "axis_rotation", "VALID_FORMS"]

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
            raise InputError(f"{what} needs a rotation group; {self.name} has mirror operators "
                             "(maps of proteins are chiral)")

    def torch(self, dtype=None, device=None):
        """The operators as a torch tensor ``(order, 3, 3)`` (float64 unless ``dtype``)."""
        import torch

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
            raise _bad(name, f" (the order of {m.group(1)}n must be at least "
                             f"{1 if m.group(1) == 'C' else 2})")
        if m.group(1) == "C":
            ops = _close([_fold(z, n)], n) if n > 1 else np.eye(3)[None]
            return SymmetryGroup(f"C{n}", ops)
        return SymmetryGroup(f"D{n}", _close([_fold(z, n), _fold(x, 2)], 2 * n))
    if key == "CI":
        return SymmetryGroup("Ci", np.stack([np.eye(3), -np.eye(3)]))
    if key == "CS":
        return SymmetryGroup("Cs", np.stack([np.eye(3), np.diag([1.0, 1.0, -1.0])]))
    if key == "T":
        return SymmetryGroup("T", _close([_fold(z, 3), _fold((0, math.sqrt(2 / 3),
                                                               math.sqrt(1 / 3)), 2)], 12))
    if key == "O":
        return SymmetryGroup("O", _close([_fold(z, 4), _fold((1, 1, 1), 3)], 24))
    m = re.fullmatch(r"I([1-4]?)", key)
    if m:
        setting = int(m.group(1) or 2)
        return SymmetryGroup("I" + (m.group(1) or ""), _icosahedral(setting))
    if _IMPROPER.match(key):
        raise InputError(f"improper symmetry {name!r} (with mirrors) is not supported: maps of "
                         f"proteins are chiral; valid forms: {VALID_FORMS}")
    raise _bad(name)
