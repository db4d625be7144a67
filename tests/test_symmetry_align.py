"""symmetry_align / ``cryorecon symmetry-align``: recover a known rotation up to the group."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from cryorecon import cli
from cryorecon.errors import InputError
from cryorecon.geometry.rotations import euler_to_matrix, random_rotations
from cryorecon.geometry.symmetry import parse_symmetry
from cryorecon.symmetrize import symmetry_score
from cryorecon.symmetry_align import symmetry_align
from cryorecon.validate import rotate_volume, rotation_angle
from test_symmetrize import orbit_map

# The alignment is defined up to the normaliser of the group in SO(3): for odd n that of Dn
# is D2n; that of D2 is O (the three 2-fold axes may be permuted).
CASES = {
    "D7": ("D14", [(6.0, 2.0, 3.0), (2.0, -3.0, -5.0)]),
    "D2": ("O", [(5.0, 2.0, 3.0), (-1.0, 6.0, -2.0)]),
}


def error_deg(E, normaliser: str) -> float:
    """Angle (degrees) from the rotation E to the nearest element of ``normaliser``."""
    return min(math.degrees(rotation_angle(E, n)) for n in parse_symmetry(normaliser).torch())


def rotated_symmetric_map(name, seed=11, shift=(0.0, 0.0, 0.0)):
    S = orbit_map(name, CASES[name][1], weights=[1.0, 0.6], sigma=1.8)
    K = random_rotations(1, generator=torch.Generator().manual_seed(seed))[0]
    return S, K, rotate_volume(S, K, torch.tensor(shift))


@pytest.mark.parametrize(
    "name,shift,center", [("D7", (1.5, -1.0, 0.5), True), ("D2", (0.0, 0.0, 0.0), False)]
)
def test_symmetry_align_recovers_a_known_rotation(name, shift, center):
    S, K, V = rotated_symmetric_map(name, shift=shift)
    assert symmetry_score(V, name) < 0.9
    res = symmetry_align(V, name, n_global=800, n_candidates=2, center=center, progress=False)
    if not center:
        assert torch.equal(res.shift_px, torch.zeros(3, dtype=torch.float64))
    # moved(p) = S(K^T Q^T (p - t - Q s)): aligned when Q K is in the normaliser, t = -Q s
    assert error_deg(res.rotation @ K, CASES[name][0]) < 2.0
    s = torch.tensor(shift, dtype=torch.float64)
    assert float((res.shift_px + res.rotation @ s).norm()) < 0.5
    assert res.score > 0.99 > res.score_input
    assert symmetry_score(res.aligned, name) > 0.99
    # the output is the symmetric original, in the standard orientation
    E = res.rotation @ K
    n = min(parse_symmetry(CASES[name][0]).torch(), key=lambda m: rotation_angle(E, m))
    want = rotate_volume(S, n)
    assert float((res.aligned - want).norm() / want.norm()) < 0.1


def test_symmetry_align_rejects_c1_and_improper():
    v = torch.rand(16, 16, 16)
    with pytest.raises(InputError):
        symmetry_align(v, "C1", progress=False)
    with pytest.raises(InputError):
        symmetry_align(v, "Cs", progress=False)
    with pytest.raises(InputError):
        symmetry_align(torch.rand(15, 15, 15), "D2", progress=False)


def _write(path, vol, apix=4.0):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(vol, dtype=np.float32))
        m.voxel_size = apix


def test_cli_symmetry_align(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ["symmetry_align"])
    S, K, V = rotated_symmetric_map("D7")
    _write(tmp_path / "in.mrc", V.numpy())
    out = tmp_path / "out.mrc"
    argv = [
        "-q",
        "symmetry-align",
        str(tmp_path / "in.mrc"),
        "--symmetry",
        "D7",
        "-o",
        str(out),
        "--n-global",
        "800",
    ]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    m = re.search(r"rot, tilt, psi\): (\S+) (\S+) (\S+) deg", text)
    Q = euler_to_matrix(
        *[torch.tensor(math.radians(float(x)), dtype=torch.float64) for x in m.groups()]
    )
    assert error_deg(Q @ K, "D14") < 2.0
    with mrcfile.open(out) as f:
        assert f.data.shape == (32, 32, 32)
        assert math.isclose(float(f.voxel_size.x), 4.0, rel_tol=1e-6)
        assert symmetry_score(torch.from_numpy(f.data.copy()), "D7") > 0.99
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["symmetry"] == "D7" and rec["symmetry_score"] > 0.99
    assert np.allclose(rec["rotation_matrix"], Q.numpy(), atol=1e-3)
    # refuses to overwrite without --force (exit 3); bad names exit 2 with one line
    assert cli.main(argv) == 3
    assert (
        cli.main(
            [
                "symmetry-align",
                str(tmp_path / "in.mrc"),
                "--symmetry",
                "X3",
                "-o",
                str(tmp_path / "o2.mrc"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "valid forms" in err[-1]


@pytest.mark.skipif(
    shutil.which("relion_align_symmetry") is None, reason="relion_align_symmetry not installed"
)
def test_agrees_with_relion_align_symmetry(tmp_path):
    """RELION prints the Euler angles of the same Q (rotation applied to the map)."""
    S, K, V = rotated_symmetric_map("D7")
    _write(tmp_path / "in.mrc", V.numpy())
    out = subprocess.run(
        [
            "relion_align_symmetry",
            "--i",
            str(tmp_path / "in.mrc"),
            "--sym",
            "D7",
            "--o",
            str(tmp_path / "relion.mrc"),
            "--angpix",
            "4",
            "--box_size",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    m = re.search(r"refined solution is ROT = (\S+) TILT = (\S+) PSI = (\S+)", out)
    Q_relion = euler_to_matrix(
        *[torch.tensor(math.radians(float(x)), dtype=torch.float64) for x in m.groups()]
    )
    res = symmetry_align(V, "D7", n_global=800, n_candidates=2, progress=False)
    # RELION's search is coarse (400 random orientations, then +-4 deg in 2 deg steps): it
    # lands within a few degrees of the standard orientation, ours within 2
    err_relion = error_deg(Q_relion @ K, "D14")
    assert err_relion < 8.0
    assert error_deg(res.rotation @ K, "D14") < min(2.0, err_relion)
    relion_map = torch.from_numpy(mrcfile.read(tmp_path / "relion.mrc").copy())
    best = max(
        float(
            torch.corrcoef(
                torch.stack([rotate_volume(res.moved, n).reshape(-1), relion_map.reshape(-1)])
            )[0, 1]
        )
        for n in parse_symmetry("D14").torch()
    )
    assert best > 0.95
