"""Point groups (geometry/symmetry.py) against RELION's own tables, and their algebra."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from cryorecon.errors import InputError
from cryorecon.geometry.symmetry import parse_symmetry

ORDERS = {
    "C1": 1,
    "C2": 2,
    "C5": 5,
    "C7": 7,
    "D2": 4,
    "D3": 6,
    "D7": 14,
    "T": 12,
    "O": 24,
    "I": 60,
    "I1": 60,
    "I2": 60,
    "I3": 60,
    "I4": 60,
    "Ci": 2,
    "Cs": 2,
}
RELION_NAMES = [
    "C1",
    "C2",
    "C5",
    "C7",
    "D2",
    "D3",
    "D7",
    "T",
    "O",
    "I1",
    "I2",
    "I3",
    "I4",
    "Ci",
    "Cs",
]


def relion_operators(name: str) -> np.ndarray:
    """The map operators R printed by ``relion_refine --sym NAME --print_symmetry_ops``.

    RELION also prints an L matrix for improper groups; it acts on the image side of its
    Euler-angle bookkeeping (``L A R``), not on the map, so it is not part of the set."""
    out = subprocess.run(
        ["relion_refine", "--sym", name, "--print_symmetry_ops"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    lines = out.splitlines()
    mats = []
    for i, line in enumerate(lines):
        if re.match(r"\s*R\(\d+\)=", line):
            mats.append([[float(v) for v in lines[i + k].split()] for k in (1, 2, 3)])
    return np.array(mats)


def same_set(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    if len(a) != len(b):
        return False
    dist = np.abs(a[:, None] - b[None]).max(axis=(-1, -2))
    return bool((dist.min(axis=1) < tol).all() and (dist.min(axis=0) < tol).all())


@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="relion_refine not installed")
@pytest.mark.parametrize("name", RELION_NAMES)
def test_operators_match_relion(name):
    ref = relion_operators(name)
    ours = parse_symmetry(name).operators
    # RELION prints 5 significant digits ("-0.44721"), so 1e-6 is below its print precision.
    assert same_set(ours, ref, 2e-5), name


@pytest.mark.skipif(shutil.which("relion_refine") is None, reason="relion_refine not installed")
def test_plain_I_is_relion_default_I2():
    assert same_set(parse_symmetry("I").operators, relion_operators("I"), 2e-5)
    assert same_set(parse_symmetry("I").operators, parse_symmetry("I2").operators, 1e-12)
    assert not same_set(parse_symmetry("I1").operators, parse_symmetry("I2").operators, 1e-3)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_group_order_closure_and_identity(name):
    G = parse_symmetry(name)
    ops = G.operators
    assert G.order == ORDERS[name] == len(ops)
    assert np.allclose(ops[0], np.eye(3))
    assert np.allclose(ops @ ops.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    # distinct elements
    d = np.abs(ops[:, None] - ops[None]).max(axis=(-1, -2)) + 10 * np.eye(len(ops))
    assert d.min() > 1e-6
    # closed under products and inverses
    prods = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    dist = np.abs(prods[:, None] - ops[None]).max(axis=(-1, -2))
    assert dist.min(axis=1).max() < 1e-10
    assert same_set(ops.transpose(0, 2, 1), ops, 1e-10)
    assert G.proper == (name not in ("Ci", "Cs"))


def test_axes_follow_relion_conventions():
    # Dn: n-fold along z, a 2-fold along x
    D7 = parse_symmetry("d7").operators
    assert D7.shape[0] == 14
    assert any(np.allclose(g, np.diag([1.0, -1.0, -1.0])) for g in D7)
    c = np.cos(2 * np.pi / 7)
    assert any(np.isclose(g[2, 2], 1) and np.isclose(g[0, 0], c) for g in D7)
    # O: 4-folds along x, y, z
    octa = parse_symmetry("O").operators
    for ax in range(3):
        assert sum(np.isclose(g[ax, ax], 1) and np.isclose(np.trace(g), 1) for g in octa) == 2
    assert parse_symmetry(" c7 ").name == "C7"


@pytest.mark.parametrize("bad", ["X5", "C0", "D1", "Dx", "", "I5", "C-2", "P1"])
def test_unknown_names_raise_input_error_listing_forms(bad):
    with pytest.raises(InputError) as e:
        parse_symmetry(bad)
    msg = str(e.value)
    assert "\n" not in msg and "Cn" in msg and "I4" in msg


@pytest.mark.parametrize("improper", ["C2v", "C3h", "S4", "D2h", "D3d", "Td", "Th", "Oh", "Ih"])
def test_improper_groups_rejected_clearly(improper):
    with pytest.raises(InputError, match="improper"):
        parse_symmetry(improper)


def test_require_proper():
    parse_symmetry("D2").require_proper("x")
    with pytest.raises(InputError, match="rotation group"):
        parse_symmetry("Ci").require_proper("pose masks")
