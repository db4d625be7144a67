"""Poses out (:mod:`cryorecon.io.export`, ``cryorecon export``): RELION STAR 3.1+ and cryoSPARC .cs.

- Re-projection: particles simulated with known poses (GroEL-GroES, 32-voxel box, 9 Å/pixel,
  300 particles, SNR 0.05) are written without poses; the true poses are exported, the export
  is read back with the package's reader and back-projected, and the map must match the
  truth, while the same export with a flipped origin sign or transposed rotations must not.
- The golden ``relion_project`` images (../shared/data/relion_projections) pin the exported
  angles and origins to RELION's meaning, at a pixel size of 2 Å so pixels and Å differ.
- Every input column survives unchanged, for real RELION 3.0 / 3.1 / 5 files.
- The .cs round trip: exported poses read back through io/cryosparc.py, and checked against
  cryoDRGN's formula (A_relion = expmap(pose)^T).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryorecon import cli
from cryorecon.backproject import wiener_backproject
from cryorecon.errors import InputError, OutputExistsError
from cryorecon.fourier.slicing import project
from cryorecon.geometry.poses import pose_to_relion, relion_to_pose
from cryorecon.geometry.rotations import euler_to_matrix, random_rotations
from cryorecon.io.export import export_poses
from cryorecon.io.particles import read_particles, write_particles
from cryorecon.simulate import density_from_model, draw_parameters, simulate_particles

D, APIX, N, SNR = 32, 9.0, 300, 0.05
POSE_COLUMNS = {
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnOriginX",
    "rlnOriginY",
    "rlnMaxValueProbDistribution",
    "rlnRandomSubset",
}
CS_POSE_FIELDS = {
    "alignments3D/pose",
    "alignments3D/shift",
    "alignments3D/psize_A",
    "alignments3D/split",
}


def _matrices(angles_deg) -> np.ndarray:
    a = torch.deg2rad(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64)))
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).numpy()


def _corr(a, b) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _band_corr(a, b, lo: float = 4, hi: float = 12) -> float:
    """Correlation of two maps over the Fourier shells lo <= |k| < hi (voxels): 72-24 Å here,
    where a wrong pose convention leaves nothing (the lowest shells match any centred blob)."""
    from cryorecon.fourier.transforms import fft3c

    A, B = fft3c(torch.as_tensor(a).double()), fft3c(torch.as_tensor(b).double())
    k = torch.arange(A.shape[-1]) - A.shape[-1] // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    r = (z * z + y * y + x * x).double().sqrt()
    m = (r >= lo) & (r < hi)
    A, B = A[m], B[m]
    return float((A.conj() * B).sum().real / (A.norm() * B.norm()))


def _random_poses(n: int, seed: int, apix=1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(n, generator=g)
    t = torch.randn(n, 2, generator=g, dtype=torch.float64) * 2
    angles, origins = pose_to_relion(R, t, apix)
    rng = np.random.default_rng(seed)
    return {
        "eulers_deg": angles,
        "shifts_A": origins,
        "max_prob": rng.uniform(0.01, 1, n),
        "subset": rng.integers(1, 3, n),
    }


# --------------------------------------------------------------------------- re-projection
@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A 'project' folder holding particles.star (no poses) + .mrcs, the truth and its poses."""
    root = tmp_path_factory.mktemp("project")
    truth = density_from_model(None, D=D, apix=APIX)
    b = next(simulate_particles(truth, N, APIX, SNR, seed=3, batch_size=N))
    star = write_particles(root / "particles.star", b.images, APIX, b.ctf)
    return root, star, truth, b.angles, b.shifts_A


def test_exported_poses_back_project_to_the_truth(simulated):
    root, star, truth, angles, origins = simulated
    ps = read_particles(star)
    assert ps.angles is None  # the export is the only source of poses

    def exported_map(eulers, shifts, name):
        poses = {
            "eulers_deg": eulers,
            "shifts_A": shifts,
            "max_prob": np.ones(N),
            "subset": 1 + np.arange(N) % 2,
        }
        (out,) = export_poses(ps, poses, root / name)
        back = read_particles(out)  # the stack is found from the project folder above
        return back, wiener_backproject(back)

    back, vol = exported_map(angles, origins, "run")
    np.testing.assert_allclose(_matrices(back.angles), _matrices(angles), atol=1e-9)
    np.testing.assert_allclose(back.shifts, origins, atol=1e-9)
    good = _band_corr(vol, truth)
    assert good > 0.7, good
    # the same as the oracle from the simulator's own metadata (write_particles' RELION columns)
    oracle = write_particles(
        root / "oracle" / "p.star",
        ps.images(np.arange(N)),
        APIX,
        ps.ctf,
        angles=angles,
        shifts=origins,
    )
    torch.testing.assert_close(
        vol, wiener_backproject(read_particles(oracle)), atol=1e-4 * float(vol.abs().max()), rtol=0
    )
    transposed = pose_to_relion(
        torch.as_tensor(_matrices(angles)).transpose(1, 2),
        torch.zeros(N, 2, dtype=torch.float64),
        APIX,
    )[0]
    flipped = _band_corr(exported_map(angles, -origins, "flipped")[1], truth)
    wrong_rot = _band_corr(exported_map(transposed, origins, "transposed")[1], truth)
    assert flipped < 0.4 and wrong_rot < 0.4, (good, flipped, wrong_rot)


@pytest.mark.parametrize("name", ["centered", "shifted"])
def test_golden_relion_projections_pin_the_convention(shared_data, tmp_path, name):
    """The golden images' own poses, exported (at 2 Å/pixel) and read back, re-project onto
    the images within the 2% that the projector reaches with the original file
    (tests/test_slicing.py); a flipped origin sign is off by more than 25%."""
    d = shared_data / "relion_projections"
    if not d.is_dir():
        pytest.skip(f"{d} absent")
    apix = 2.0
    blocks = starfile.read(d / f"rln_proj_64_{name}.star", always_dict=True)
    table = blocks["particles"]
    angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64)
    if "rlnOriginX" in table:
        origins_px = table[["rlnOriginX", "rlnOriginY"]].to_numpy(np.float64)
    else:
        origins_px = np.zeros((len(table), 2))
    blocks["optics"]["rlnImagePixelSize"] = apix
    blocks["particles"] = table.drop(columns=[c for c in table if c in POSE_COLUMNS])
    starfile.write(blocks, tmp_path / "in.star")
    ps = read_particles(tmp_path / "in.star", require_ctf=False, datadir=d)
    (out,) = export_poses(ps, {"eulers_deg": angles, "shifts_A": origins_px * apix}, tmp_path / "x")
    written = starfile.read(out, always_dict=True)["particles"]
    np.testing.assert_allclose(written[["rlnOriginXAngst", "rlnOriginYAngst"]], origins_px * apix)
    back = read_particles(out, require_ctf=False, datadir=d)
    V = torch.from_numpy(mrcfile.read(d / "clean70SRibosome_vol_64.mrc").astype(np.float32))
    imgs = torch.from_numpy(mrcfile.read(d / f"rln_proj_64_{name}.mrcs").astype(np.float32))
    R, t = relion_to_pose(back.angles, back.shifts, back.apix)

    def rel_err(proj):
        a = (proj - proj.mean((-1, -2), keepdim=True)) / proj.std((-1, -2), keepdim=True)
        b = (imgs - imgs.mean((-1, -2), keepdim=True)) / imgs.std((-1, -2), keepdim=True)
        return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)

    assert rel_err(project(V, R, t)).max() < 0.02
    if name == "shifted":
        assert rel_err(project(V, R, -t)).min() > 0.25


@pytest.mark.skipif(
    shutil.which("relion_reconstruct") is None, reason="relion_reconstruct not installed"
)
def test_relion_reconstruct_reads_the_export(simulated):
    """RELION itself reconstructs the exported particles (run from the project folder, where
    the image names are relative to) into a map like the truth and like cryorecon's own
    back-projection of the same export."""
    root, star, truth, angles, origins = simulated
    ps = read_particles(star)
    poses = {
        "eulers_deg": angles,
        "shifts_A": origins,
        "max_prob": np.ones(N),
        "subset": 1 + np.arange(N) % 2,
    }
    (out,) = export_poses(ps, poses, root / "relion_run")
    subprocess.run(
        [
            "relion_reconstruct",
            "--i",
            str(out.relative_to(root)),
            "--o",
            "relion_run/map.mrc",
            "--ctf",
        ],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=300,
    )
    relion_map = mrcfile.read(root / "relion_run" / "map.mrc").astype(np.float32)
    ours = wiener_backproject(read_particles(out))
    assert _band_corr(relion_map, ours) > 0.7 and _band_corr(relion_map, truth) > 0.6


# --------------------------------------------------------------------------- every column kept
@pytest.mark.parametrize(
    "fname",
    [
        "relion31.star",
        "relion31.6opticsgroups.star",
        "relion5.star",
        "sample_particles_relion30.star",
        "sample_particles_relion31.star",
    ],
)
def test_every_input_column_kept(formats_dir, tmp_path, fname):
    src = formats_dir / fname
    ps = read_particles(src, check_images=False)
    n = len(ps)
    poses = _random_poses(n, seed=1)
    poses["eulers_deg"][1] = np.nan  # never visited: left out
    poses["class_number"] = np.arange(n) % 3 + 1
    (out,) = export_poses(ps, poses, tmp_path)
    before = starfile.read(src, always_dict=True)
    after = starfile.read(out, always_dict=True)
    kept = np.delete(np.arange(n), 1)
    b_part = before["particles"] if "particles" in before else next(iter(before.values()))
    b_part = b_part.iloc[kept].reset_index(drop=True)
    a_part = after["particles"]
    assert len(a_part) == n - 1 and list(a_part["rlnImageName"]) == list(b_part["rlnImageName"])
    for col in b_part.columns:
        assert col in a_part.columns, col
        if col in POSE_COLUMNS or col == "rlnClassNumber":
            continue
        if pd.api.types.is_numeric_dtype(b_part[col]):
            np.testing.assert_allclose(
                a_part[col].to_numpy(float), b_part[col].to_numpy(float), rtol=1e-11, err_msg=col
            )
        else:
            assert list(a_part[col].astype(str)) == list(b_part[col].astype(str)), col
    assert "optics" in after
    if "optics" in before:
        for col in before["optics"].columns:
            assert list(after["optics"][col]) == list(before["optics"][col]), col
    # the run's poses, and the input's pixel sizes and CTFs, through the package's own reader
    back = read_particles(out, check_images=False)
    np.testing.assert_allclose(
        _matrices(back.angles), _matrices(poses["eulers_deg"][kept]), atol=1e-9
    )
    np.testing.assert_allclose(back.shifts, poses["shifts_A"][kept], atol=1e-9)
    np.testing.assert_allclose(back.apix, ps.apix[kept], rtol=1e-10)
    for k, v in ps.ctf.items():
        np.testing.assert_allclose(back.ctf[k], v[kept], rtol=1e-10, err_msg=k)
    np.testing.assert_array_equal(a_part["rlnRandomSubset"], poses["subset"][kept])
    np.testing.assert_array_equal(a_part["rlnClassNumber"], poses["class_number"][kept])
    np.testing.assert_allclose(a_part["rlnMaxValueProbDistribution"], poses["max_prob"][kept])
    if "rlnOriginX" in b_part.columns:  # RELION 3.0 pixels kept, with the new origin
        np.testing.assert_allclose(a_part["rlnOriginX"], poses["shifts_A"][kept, 0] / ps.apix[kept])


def test_half_subsets_written_only_when_complete(formats_dir, tmp_path):
    ps = read_particles(formats_dir / "sample_particles_relion31.star", check_images=False)
    poses = _random_poses(len(ps), seed=2)
    poses["subset"][3] = 0
    (out,) = export_poses(ps, poses, tmp_path)
    before = starfile.read(formats_dir / "sample_particles_relion31.star")["particles"]
    after = starfile.read(out)["particles"]
    np.testing.assert_array_equal(after["rlnRandomSubset"], before["rlnRandomSubset"])  # input's


# --------------------------------------------------------------------------- cryoSPARC
def _cryodrgn_expmap(v):
    theta = np.linalg.norm(v)
    K = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]]) / theta
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


@pytest.mark.parametrize("fname", ["empiar_10076_7.cs", "cryosparc_P12_J24_001_particles.cs"])
def test_cs_round_trip(formats_dir, tmp_path, fname):
    src = formats_dir / fname
    ps = read_particles(src, check_images=False)
    n = len(ps)
    poses = _random_poses(n, seed=4, apix=ps.apix[:, None])
    poses["eulers_deg"][0] = np.nan
    kept = np.arange(1, n)
    star, cs_out = export_poses(ps, poses, tmp_path)
    assert star.name == "particles.star" and cs_out.name == "particles.cs"
    raw_in, raw_out = np.load(src), np.load(cs_out)
    assert len(raw_out) == n - 1
    for field in raw_in.dtype.names:  # every input field, unchanged
        if field not in CS_POSE_FIELDS:
            np.testing.assert_array_equal(raw_out[field], raw_in[field][kept], err_msg=field)
    # read back through io/cryosparc.py: the writer is its exact inverse (float32 fields)
    back = read_particles(cs_out, check_images=False)
    A = _matrices(poses["eulers_deg"][kept])
    np.testing.assert_allclose(_matrices(back.angles), A, atol=2e-6)
    np.testing.assert_allclose(back.shifts, poses["shifts_A"][kept], rtol=1e-5, atol=1e-5)
    # and as cryoDRGN reads a .cs: rotation = expmap(pose)^T, shift in pixels, same sign
    pose = raw_out["alignments3D/pose"].astype(np.float64)
    for i in range(0, n - 1, max(1, (n - 1) // 20)):
        np.testing.assert_allclose(_cryodrgn_expmap(pose[i]).T, A[i], atol=2e-6)
    px = poses["shifts_A"][kept] / raw_in["blob/psize_A"][kept, None]
    np.testing.assert_allclose(raw_out["alignments3D/shift"], px, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(raw_out["alignments3D/split"], poses["subset"][kept] - 1)
    # the STAR made from the .cs: same CTF, pixel size and poses; the same image files
    st = read_particles(star, check_images=False)
    for k, v in ps.ctf.items():
        np.testing.assert_allclose(st.ctf[k], v[kept], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(st.apix, ps.apix[kept], rtol=1e-7)
    np.testing.assert_allclose(_matrices(st.angles), A, atol=1e-9)
    np.testing.assert_array_equal(st.slice_index, ps.slice_index[kept])


def test_cs_images_follow_the_star(formats_dir, tmp_path):
    """The STAR written for a .cs input names the stacks by their found absolute paths."""
    ps = read_particles(formats_dir / "empiar_10076_7.cs")
    star, _ = export_poses(ps, _random_poses(len(ps), 5, apix=ps.apix[:, None]), tmp_path)
    st = read_particles(star)
    np.testing.assert_array_equal(st.images(np.arange(len(ps))), ps.images(np.arange(len(ps))))


def test_nothing_visited_is_an_error(formats_dir, tmp_path):
    ps = read_particles(formats_dir / "relion31.star", check_images=False)
    poses = _random_poses(len(ps), 0)
    poses["eulers_deg"][:] = np.nan
    with pytest.raises(InputError, match="no particle"):
        export_poses(ps, poses, tmp_path)
    with pytest.raises(InputError, match="shape"):
        export_poses(ps, _random_poses(len(ps) + 1, 0), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the command
@pytest.fixture
def run_dir(tmp_path):
    """A stopped run folder: run.json naming a .cs input, and poses.npz."""
    imgs = np.random.default_rng(0).normal(size=(6, 8, 8)).astype(np.float32)
    params = draw_parameters(6, 2.0, seed=0)
    star = write_particles(tmp_path / "data" / "p.star", imgs, 2.0, params.ctf)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"particles": str(star), "finished": False}))
    np.savez(run / "poses.npz", **_random_poses(6, 7, apix=2.0))
    return run


def _export(argv, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ["export"])
    rc = cli.main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_export_command_and_refusal(run_dir, tmp_path, monkeypatch, capsys):
    rc, out, err = _export([run_dir], monkeypatch, capsys)
    assert rc == 0 and out.strip() == str(run_dir / "particles.star")
    written = (run_dir / "particles.star").read_bytes()
    poses = dict(np.load(run_dir / "poses.npz"))
    back = read_particles(run_dir / "particles.star", check_images=False)
    np.testing.assert_allclose(back.shifts, poses["shifts_A"], atol=1e-9)
    # again: refused, exit 3, one line, the file untouched
    rc, out, err = _export([run_dir], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert rc == 3 and out == "" and len(lines) == 1
    assert lines[0].startswith("cryorecon export: error: ") and "refusing to overwrite" in lines[0]
    assert (run_dir / "particles.star").read_bytes() == written
    with pytest.raises(OutputExistsError):
        export_poses(back, poses, run_dir)
    # --force replaces it; -o writes elsewhere
    poses["shifts_A"] = poses["shifts_A"] + 1.0
    np.savez(run_dir / "poses.npz", **poses)
    assert _export([run_dir, "--force"], monkeypatch, capsys)[0] == 0
    again = read_particles(run_dir / "particles.star", check_images=False)
    np.testing.assert_allclose(again.shifts, poses["shifts_A"], atol=1e-9)
    assert _export([run_dir, "-o", tmp_path / "elsewhere"], monkeypatch, capsys)[0] == 0
    assert (tmp_path / "elsewhere" / "particles.star").is_file()


@pytest.mark.parametrize("damage", ["no_run_json", "no_poses", "old_poses", "missing_particles"])
def test_export_command_bad_run_folder(run_dir, monkeypatch, capsys, damage):
    if damage == "no_run_json":
        (run_dir / "run.json").unlink()
    elif damage == "no_poses":
        (run_dir / "poses.npz").unlink()
    elif damage == "old_poses":
        np.savez(run_dir / "poses.npz", directions=np.zeros((6, 3)))
    else:
        (run_dir / "run.json").write_text(json.dumps({"particles": str(run_dir / "gone.star")}))
    before = sorted(p.name for p in run_dir.iterdir())
    rc, out, err = _export([run_dir], monkeypatch, capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run_dir.iterdir()) == before
