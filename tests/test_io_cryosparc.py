"""cryoSPARC .cs reading: CTF, pixel size, stack paths, and the pose convention.

The pose convention is checked against the two published converters, re-implemented here
from their source:
- pyem (csparc2star): ``rot2euler(expmap(pose))`` with pyem's ``expmap`` (Rodrigues with the
  skew matrix ``[[0, w2, -w1], [-w2, 0, w0], [w1, -w0, 0]]``), shift copied to rlnOriginX/Y.
- cryoDRGN (parse_pose_csparc): ``lie_tools.expmap(pose).T`` with the standard skew matrix,
  which equals the RELION matrix (cryoDRGN's ``R_from_relion`` is RELION's Euler_angles2matrix).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryorecon.errors import InputError
from cryorecon.geometry.rotations import euler_to_matrix
from cryorecon.io.particles import read_particles, write_particles


def _relion_matrices(angles_deg: np.ndarray) -> np.ndarray:
    a = torch.from_numpy(np.deg2rad(angles_deg))
    return euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).numpy()


def _pyem_expmap(e):
    theta = np.linalg.norm(e)
    if theta < 1e-16:
        return np.eye(3)
    w = e / theta
    k = np.array([[0, w[2], -w[1]], [-w[2], 0, w[0]], [w[1], -w[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def _cryodrgn_expmap(v):
    theta = np.linalg.norm(v)
    K = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]]) / theta
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def _save_cs(path, arr):
    with open(path, "wb") as f:  # np.save(path) would append .npy
        np.save(f, arr)


def test_cs_and_star_agree_empiar(formats_dir):
    d = formats_dir
    cs = read_particles(d / "empiar_10076_7.cs")
    st = read_particles(d / "empiar_10076_7.star")
    assert len(cs) == len(st) == 7 and cs.D == st.D == 320
    np.testing.assert_allclose(cs.apix, st.apix, rtol=1e-6)  # psize_A is float32
    for k in (
        "defocus_u",
        "defocus_v",
        "defocus_angle",
        "voltage",
        "cs",
        "amp_contrast",
        "phase_shift",
    ):
        np.testing.assert_allclose(cs.ctf[k], st.ctf[k], rtol=1e-6, atol=1e-5, err_msg=k)
    # Neither file has poses: the STAR has no rlnAngle*/rlnOrigin* columns, the .cs no alignments3D.
    assert st.angles is None and st.shifts is None
    assert cs.angles is None and cs.shifts is None
    # the .cs uses 0-based blob/idx, the STAR 1-based N@: the same images come back
    np.testing.assert_array_equal(cs.slice_index, st.slice_index)
    np.testing.assert_array_equal(cs.images(np.arange(7)), st.images(np.arange(7)))


def test_cs_poses_follow_pyem_and_cryodrgn(formats_dir):
    d = formats_dir
    f = d / "cryosparc_P12_J24_001_particles.cs"
    raw = np.load(f)
    ps = read_particles(f, check_images=False)  # stacks not shipped
    assert len(ps) == len(raw) and ps.D == int(raw["blob/shape"][0, 0])
    np.testing.assert_allclose(ps.apix, raw["blob/psize_A"])
    np.testing.assert_allclose(
        ps.ctf["defocus_angle"], np.rad2deg(raw["ctf/df_angle_rad"].astype(np.float64))
    )
    np.testing.assert_allclose(ps.ctf["voltage"], raw["ctf/accel_kv"])
    A = _relion_matrices(ps.angles)
    pose = raw["alignments3D/pose"].astype(np.float64)
    for i in range(0, len(raw), 97):
        np.testing.assert_allclose(A[i], _pyem_expmap(pose[i]), atol=1e-9)
        np.testing.assert_allclose(A[i], _cryodrgn_expmap(pose[i]).T, atol=1e-9)
    # shifts: pyem's rlnOriginX/Y = alignments3D/shift (pixels), no sign change; here in Å
    np.testing.assert_allclose(
        ps.shifts, raw["alignments3D/shift"] * raw["blob/psize_A"][:, None].astype(np.float64)
    )
    assert ps.stacks[0].name == raw["blob/path"][0].decode().split("/")[-1]


def _minimal_cs(n, path_bytes, D=8, pose=None, shift=None, ctf=True):
    fields = [
        ("uid", "<u8"),
        ("blob/path", f"S{max(len(p) for p in path_bytes)}"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
    ]
    if ctf:
        fields += [
            (k, "<f4")
            for k in (
                "ctf/accel_kv",
                "ctf/cs_mm",
                "ctf/amp_contrast",
                "ctf/df1_A",
                "ctf/df2_A",
                "ctf/df_angle_rad",
            )
        ]
    if pose is not None:
        fields += [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))]
    a = np.zeros(n, dtype=fields)
    a["blob/path"] = path_bytes
    a["blob/idx"] = np.arange(n)
    a["blob/shape"] = D
    a["blob/psize_A"] = 2.0
    if ctf:
        a["ctf/accel_kv"], a["ctf/cs_mm"], a["ctf/amp_contrast"] = 300, 2.7, 0.1
        a["ctf/df1_A"], a["ctf/df2_A"], a["ctf/df_angle_rad"] = 2e4, 1.9e4, np.pi / 6
    if pose is not None:
        a["alignments3D/pose"] = pose
        a["alignments3D/shift"] = shift
    return a


def test_known_poses_and_project_relative_paths(tmp_path):
    # stack at <project>/J1/extract/x.mrcs; the .cs at <project>/J2/ names it '>J1/extract/x.mrcs'
    (tmp_path / "J1" / "extract").mkdir(parents=True)
    (tmp_path / "J2").mkdir()
    imgs = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    write_particles(
        tmp_path / "J1" / "extract" / "x.star",
        imgs,
        2.0,
        dict(defocus_u=1, defocus_v=1, defocus_angle=0, voltage=300, cs=2.7, amp_contrast=0.1),
        stack_name="x.mrcs",
    )
    pose = np.array([[0, 0, np.pi / 2], [0, np.pi / 4, 0], [0, 0, 0]])
    shift = np.array([[1.5, -2.0], [0, 0], [0, 0]])
    _save_cs(
        tmp_path / "J2" / "p.cs",
        _minimal_cs(3, [b">J1/extract/x.mrcs"] * 3, pose=pose, shift=shift),
    )
    ps = read_particles(tmp_path / "J2" / "p.cs")
    np.testing.assert_array_equal(ps.images([0, 1, 2]), imgs)
    np.testing.assert_allclose(ps.ctf["defocus_angle"], 30.0, atol=1e-5)
    # R(pose) = Rz(90 deg) (active) -> RELION A = Rz(90)^T, i.e. rot + psi = 90, tilt 0
    assert ps.angles[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert ps.angles[0, 0] + ps.angles[0, 2] == pytest.approx(90.0, abs=1e-4)
    # R(pose) = Ry(45 deg) -> RELION tilt = 45 with rot = psi = 0
    np.testing.assert_allclose(ps.angles[1], [0.0, 45.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(ps.shifts[0], [3.0, -4.0], atol=1e-6)  # pixels * 2 Å/px, same sign


def test_cs_basename_fallback_and_missing_ctf(tmp_path):
    imgs = np.zeros((2, 8, 8), np.float32)
    write_particles(
        tmp_path / "y.star",
        imgs,
        2.0,
        dict(defocus_u=1, defocus_v=1, defocus_angle=0, voltage=300, cs=2.7, amp_contrast=0.1),
    )
    _save_cs(tmp_path / "q.cs", _minimal_cs(2, [b"/nowhere/J9/extract/y.mrcs"] * 2, ctf=False))
    with pytest.raises(InputError, match=r"q\.cs.*ctf/accel_kv"):
        read_particles(tmp_path / "q.cs")
    ps = read_particles(tmp_path / "q.cs", require_ctf=False)
    assert ps.ctf == {} and ps.stacks == [tmp_path / "y.mrcs"] and ps.D == 8
