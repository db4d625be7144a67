"""``cryorecon info``: summaries of the shared files and of a 100,000-particle STAR file."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest
import starfile

from cryorecon import cli
from cryorecon.io.particles import write_particles

CTF = dict(
    defocus_u=1.5e4, defocus_v=1.4e4, defocus_angle=30.0, voltage=300.0, cs=2.7, amp_contrast=0.1
)


def _info(args, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ["info"])  # only this command's module is needed
    rc = cli.main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _json(args, monkeypatch, capsys) -> dict:
    rc, out, err = _info([*args, "--json"], monkeypatch, capsys)
    assert rc == 0, err
    return json.loads(out)


def test_info_relion31(formats_dir, monkeypatch, capsys):
    d = formats_dir
    info = _json([d / "relion31.star"], monkeypatch, capsys)
    raw = starfile.read(d / "relion31.star", always_dict=True)
    dfs = raw["particles"][["rlnDefocusU", "rlnDefocusV"]].to_numpy()
    assert info["particles"] == 5 and info["box"] == 256
    assert info["pixel_size_A"] == [2.806]
    assert info["ctf"]["defocus_um"] == pytest.approx([dfs.min() / 1e4, dfs.max() / 1e4], abs=1e-4)
    assert info["ctf"]["voltage_kV"] == [300.0] and info["ctf"]["cs_mm"] == [0.01]
    assert info["ctf"]["amp_contrast"] == [0.1]
    assert info["poses"] is True and info["shifts"] is True
    assert info["stacks"] == 1 and info["stacks_found"] == 1
    assert info["stack_bytes"] == (d / "relion31.mrcs").stat().st_size
    assert info["optics_groups"] == [
        {
            "group": 1,
            "name": "opticsGroup1",
            "particles": 5,
            "pixel_size_A": 2.806,
            "voltage_kV": 300.0,
            "cs_mm": 0.01,
            "amp_contrast": 0.1,
        }
    ]
    rc, out, _ = _info([d / "relion31.star"], monkeypatch, capsys)
    assert rc == 0
    assert (
        "particles      5" in out and "box            256 px" in out and "poses          yes" in out
    )


def test_info_two_optics_groups_and_legacy(formats_dir, monkeypatch, capsys):
    d = formats_dir
    info = _json([d / "sample_particles_relion31.star"], monkeypatch, capsys)
    assert [g["voltage_kV"] for g in info["optics_groups"]] == [300.0, 200.0]
    assert [g["particles"] for g in info["optics_groups"]] == [8, 9]
    assert info["ctf"]["voltage_kV"] == [200.0, 300.0]
    legacy = _json([d / "empiar_10076_7.star"], monkeypatch, capsys)
    assert legacy["format"] == "RELION 3.0" and legacy["particles"] == 7 and legacy["box"] == 320
    assert legacy["poses"] is False
    assert legacy["stack_bytes"] == (d / "empiar_10076_7.mrc").stat().st_size
    cs = _json([d / "empiar_10076_7.cs"], monkeypatch, capsys)
    assert cs["format"] == "cryoSPARC" and cs["particles"] == 7
    assert cs["ctf"]["defocus_um"] == pytest.approx(legacy["ctf"]["defocus_um"], abs=1e-4)


def test_info_without_stacks(formats_dir, monkeypatch, capsys):
    d = formats_dir
    rc, _, err = _info([d / "relion5.star"], monkeypatch, capsys)
    assert rc == 2 and "toy_images_a.mrcs" in err  # stacks not shipped: an error by default
    r5 = _json([d / "relion5.star", "--no-stacks"], monkeypatch, capsys)
    assert (
        r5["particles"] == 17 and r5["box"] == 448 and r5["stacks"] == 2 and r5["stacks_found"] == 0
    )
    six = _json([d / "relion31.6opticsgroups.star", "--no-stacks"], monkeypatch, capsys)
    assert len(six["optics_groups"]) == 6 and six["pixel_size_A"] == [1.24, 1.25]
    p12 = _json([d / "cryosparc_P12_J24_001_particles.cs", "--no-stacks"], monkeypatch, capsys)
    raw = np.load(d / "cryosparc_P12_J24_001_particles.cs")
    assert p12["particles"] == len(raw) and p12["poses"] is True
    assert p12["box"] == int(raw["blob/shape"][0, 0])
    rc, out, _ = _info([d / "relion5.star", "--no-stacks"], monkeypatch, capsys)
    assert rc == 0 and "(2 not found)" in out


def test_info_100k_particles(tmp_path, monkeypatch, capsys):
    n = 100_000
    rng = np.random.default_rng(0)
    write_particles(
        tmp_path / "small.star", rng.normal(size=(10, 16, 16)).astype(np.float32), 1.2, CTF
    )
    blocks = starfile.read(tmp_path / "small.star", always_dict=True)
    num = np.char.zfill((np.arange(n) % 10 + 1).astype(str), 6)
    parts = pd.DataFrame(
        {
            "rlnImageName": np.char.add(num, "@small.mrcs"),
            "rlnDefocusU": rng.uniform(1e4, 3e4, n),
            "rlnDefocusV": rng.uniform(1e4, 3e4, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnOpticsGroup": np.ones(n, dtype=int),
        }
    )
    starfile.write({"optics": blocks["optics"], "particles": parts}, tmp_path / "big.star")
    t0 = time.perf_counter()
    info = _json([tmp_path / "big.star"], monkeypatch, capsys)
    elapsed = time.perf_counter() - t0
    assert info["particles"] == n and info["box"] == 16 and info["stacks"] == 1
    lo = min(parts["rlnDefocusU"].min(), parts["rlnDefocusV"].min()) / 1e4
    assert info["ctf"]["defocus_um"][0] == pytest.approx(lo, abs=1e-4)
    assert elapsed < 20, elapsed  # about 1 s here; generous for slow CI
    rc, out, _ = _info([tmp_path / "big.star"], monkeypatch, capsys)
    assert rc == 0 and "particles      100000" in out
