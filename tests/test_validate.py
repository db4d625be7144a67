"""Tests for cryorecon.validate (FSC, transforms, alignment) and the fsc/align commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryorecon import cli
from cryorecon.geometry.rotations import euler_to_matrix, random_rotations
from cryorecon.io.mrc import read_map, write_map
from cryorecon.validate import (
    HAND_FLIP,
    align,
    flip_hand,
    fsc,
    resolution_at,
    rotate_volume,
    rotation_angle,
    shell_counts,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # The machine is shared (2 cores, other jobs running): with several intra-op threads the
    # many small serial evaluations of the alignment slow down 5-20x under load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blob_phantom(D: int = 32, n: int = 6, seed: int = 1) -> torch.Tensor:
    """A few Gaussians of different sizes and weights at random positions: no symmetry, chiral."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    vol = torch.zeros(D, D, D, dtype=torch.float64)
    for _ in range(n):
        c = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * D / 4
        s = (1.0 + 1.5 * torch.rand(1, generator=g).item()) * D / 32
        a = 0.5 + torch.rand(1, generator=g).item()
        vol += a * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.float()


def fsc_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Independent FSC: uncentred numpy FFTs, radius from fftfreq, shells round(|k|) <= D/2."""
    D = a.shape[0]
    A, B = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(D) * D
    kz, ky, kx = np.meshgrid(k, k, k, indexing="ij")
    shell = np.rint(np.sqrt(kx**2 + ky**2 + kz**2)).astype(int)
    out = []
    for n in range(D // 2 + 1):
        s = shell == n
        num = np.sum((A[s] * np.conj(B[s])).real)
        out.append(num / np.sqrt(np.sum(np.abs(A[s]) ** 2) * np.sum(np.abs(B[s]) ** 2)))
    return np.array(out)


# ------------------------------------------------------------------------------------- FSC


def test_fsc_self_is_one_and_frequencies():
    v = blob_phantom(32) + 0.1 * torch.randn(32, 32, 32, generator=torch.Generator().manual_seed(0))
    freq, c = fsc(v, v, apix=2.0)
    assert c.shape == (17,) and freq.shape == (17,)
    assert torch.allclose(c, torch.ones_like(c), atol=1e-10)
    assert freq[0] == 0 and math.isclose(float(freq[-1]), 1 / (2 * 2.0))  # Nyquist 1/(2 apix)
    assert math.isclose(float(freq[1]), 1 / (32 * 2.0))


def test_fsc_matches_independent_numpy_and_is_scale_invariant():
    g = torch.Generator().manual_seed(3)
    a = blob_phantom(32, seed=2) + 0.3 * torch.randn(32, 32, 32, generator=g)
    b = blob_phantom(32, seed=2) + 0.3 * torch.randn(32, 32, 32, generator=g)
    _, c = fsc(a, b, apix=1.5)
    ref = fsc_numpy(a.double().numpy(), b.double().numpy())
    np.testing.assert_allclose(c.numpy(), ref, atol=1e-9)
    # signal at low frequency, noise at high: the curve must actually fall
    assert c[1] > 0.9 and c[-1] < 0.3
    _, c_scaled = fsc(a, 7.5 * b, apix=1.5)
    assert torch.allclose(c, c_scaled, atol=1e-9)
    _, c_neg = fsc(a, -b, apix=1.5)
    assert torch.allclose(c_neg, -c, atol=1e-9)


def test_fsc_of_independent_noise_is_near_zero():
    # For independent white noise an FSC shell value is a correlation of ~N real degrees of
    # freedom (N voxels in the shell; Hermitian pairs give Re and Im of one coefficient), so its
    # standard deviation is ~1/sqrt(N). We use the van Heel-Schatz 3-sigma curve 3/sqrt(N/2),
    # which is more conservative by sqrt(2), making a false failure ~1e-5 per shell.
    g = torch.Generator().manual_seed(11)
    a = torch.randn(32, 32, 32, generator=g)
    b = torch.randn(32, 32, 32, generator=g)
    _, c = fsc(a, b, apix=1.0)
    n = shell_counts(32).double()
    assert n[0] == 1 and n[1] == 18  # DC; 6 face + 12 edge neighbours (|k| = 1, sqrt 2)
    bound = 3.0 / torch.sqrt(n / 2)
    assert torch.all(c[1:].abs() < bound[1:]), (c, bound)
    # and it is really noise-like, not identically zero
    assert c[2:].abs().max() > 0.01
    assert abs(float(c[4:].mean())) < 3.0 / math.sqrt(float(n[4:].sum()) / 2)


def test_fsc_rejects_mismatched_boxes():
    from cryorecon.errors import InputError

    with pytest.raises(InputError, match="box sizes differ"):
        fsc(torch.zeros(16, 16, 16), torch.zeros(20, 20, 20), apix=1.0)


def test_resolution_at_hand_made_curve():
    apix = 2.0
    freq = torch.arange(9, dtype=torch.float64) / (16 * apix)  # D = 16
    curve = torch.tensor([1.0, 0.95, 0.9, 0.6, 0.4, 0.2, 0.1, 0.05, 0.0], dtype=torch.float64)
    # 0.5 is crossed between shells 3 (0.6) and 4 (0.4): halfway, at shell 3.5
    assert math.isclose(resolution_at(freq, curve, 0.5), 16 * apix / 3.5)
    # 0.143 between shells 5 (0.2) and 6 (0.1): fraction 0.57
    assert math.isclose(resolution_at(freq, curve, 0.143), 16 * apix / (5 + 0.057 / 0.1))
    # never crosses: Nyquist 2 * apix
    assert math.isclose(resolution_at(freq, torch.ones(9), 0.143), 2 * apix)
    # first crossing counts, not a later dip
    bumpy = torch.tensor([1.0, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], dtype=torch.float64)
    assert math.isclose(resolution_at(freq, bumpy, 0.5), 16 * apix / (0.5 / 0.6))


# ----------------------------------------------------------------------------- transforms


def test_rotate_volume_pinned_to_rot90_about_z():
    # +90 deg about z, x -> y: R = [[0,-1,0],[1,0,0],[0,0,1]] acting on (x, y, z).
    # out(x, y, z) = vol(y, -x, z), i.e. out[k, j, i] = vol[k, D - i, j] (centre D//2), which is
    # torch.rot90 over dims (x -> y) = (2, 1) followed by a roll of +1 along x for even D.
    v = blob_phantom(32, seed=4)
    R = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    got = rotate_volume(v, R)
    expect = torch.roll(torch.rot90(v, 1, dims=(2, 1)), 1, dims=2)
    # the x = 0 plane is where the roll wraps (its source x = D lies outside the box)
    assert torch.allclose(got[:, :, 1:], expect[:, :, 1:], atol=1e-5)
    assert torch.all(got[:, :, 0] == 0)
    # the other sense is not the same map (the test can fail)
    assert not torch.allclose(got, torch.roll(torch.rot90(v, 1, dims=(1, 2)), 1, dims=1), atol=1e-2)
    # a feature at q moves to R q: a point at x=+5 (index c+5) lands at y=+5
    D, c = 32, 16
    point = torch.zeros(D, D, D)
    point[c, c, c + 5] = 1.0
    moved = rotate_volume(point, R)
    assert moved[c, c + 5, c] == pytest.approx(1.0, abs=1e-5)


def test_rotate_volume_shift_and_inverse_and_flip():
    v = blob_phantom(32, seed=5)
    # shift: a positive tx moves content to larger x index
    shifted = rotate_volume(v, torch.eye(3), torch.tensor([2.0, 0.0, -1.0]))
    rolled = torch.roll(v, (2, -1), dims=(2, 0))
    assert torch.allclose(shifted[:-1, :, 2:], rolled[:-1, :, 2:], atol=1e-5)  # away from the wrap
    R = random_rotations(1, torch.Generator().manual_seed(0))[0]
    t = torch.tensor([1.3, -0.7, 2.1], dtype=torch.float64)
    fwd = rotate_volume(v, R, t)
    back = rotate_volume(fwd, R.T, -(R.T @ t))
    rel = (back - v).norm() / v.norm()
    # trilinear interpolation twice blurs the sigma ~ 1-2.5 voxel blobs: ~10 % at D = 32
    # (measured 0.099; it falls as 1/D^2: 0.027 at D = 64)
    assert rel < 0.15
    wrong = rotate_volume(fwd, R, -(R @ t))  # R instead of R^T: not the inverse
    assert (wrong - v).norm() / v.norm() > 0.5
    assert (fwd - v).norm() / v.norm() > 0.3  # it really moved
    # batched = one at a time
    Rs = random_rotations(3, torch.Generator().manual_seed(1))
    batched = rotate_volume(v, Rs)
    assert torch.allclose(batched[2], rotate_volume(v, Rs[2]), atol=1e-6)
    # hand flip is z -> -z about the centre, and equals the improper matrix diag(1, 1, -1)
    f = flip_hand(v)
    assert torch.allclose(f[1:], torch.flip(v, dims=(0,))[:-1])
    assert torch.allclose(f, rotate_volume(v, HAND_FLIP), atol=1e-6)


# ------------------------------------------------------------------------------- alignment


@pytest.fixture(scope="module")
def aligned_problem():
    v = blob_phantom(32, n=6, seed=7)
    g = torch.Generator().manual_seed(42)
    R_true = random_rotations(1, g)[0]
    t_true = torch.tensor([1.5, -2.0, 1.0], dtype=torch.float64)
    mov = rotate_volume(v, R_true, t_true)  # mov(p) = v(R^T (p - t))
    return v, mov, R_true, t_true


def _check_recovered(res, v, R_true, t_true):
    # aligned = rotate(mov, R, s) == v  =>  R = R_true^T, s = -R_true^T t_true
    err = math.degrees(rotation_angle(res.rotation, R_true.T))
    assert err < 3.0, err
    assert torch.allclose(res.shift_px, -(R_true.T @ t_true), atol=0.5), res.shift_px
    a = v.double().flatten() - v.double().mean()
    b = res.aligned.double().flatten() - res.aligned.double().mean()
    assert float(a @ b / (a.norm() * b.norm())) > 0.95
    assert res.cc > 0.95


def test_align_recovers_rotation_and_shift(aligned_problem):
    v, mov, R_true, t_true = aligned_problem
    res = align(v, mov, apix=2.5, seed=0, n_global=1500, progress=False)
    assert not res.flipped
    _check_recovered(res, v, R_true, t_true)
    assert torch.allclose(res.shift_A, res.shift_px * 2.5)
    assert res.cc > res.cc_other_hand + 0.02
    # before alignment the maps do not match
    a, b = v.flatten() - v.mean(), mov.flatten() - mov.mean()
    assert float(a @ b / (a.norm() * b.norm())) < 0.5


def test_align_detects_mirror(aligned_problem):
    v, mov, R_true, t_true = aligned_problem
    mirrored = flip_hand(mov)
    res = align(v, mirrored, apix=1.0, seed=1, n_global=1500, progress=False)
    assert res.flipped
    # flip_hand is an involution, so the rotation to find is the same as without the mirror
    _check_recovered(res, v, R_true, t_true)
    assert torch.allclose(rotate_volume(mirrored, res.matrix, res.shift_px), res.aligned, atol=1e-5)


def test_align_rejects_mismatched_boxes():
    from cryorecon.errors import InputError

    with pytest.raises(InputError):
        align(torch.zeros(16, 16, 16), torch.zeros(18, 18, 18), progress=False)


# -------------------------------------------------------------------------------------- CLI


@pytest.fixture
def only_our_commands(monkeypatch):
    # Other commands are developed in parallel; the smoke tests exercise fsc/align only.
    monkeypatch.setattr(cli, "COMMANDS", ["fsc", "align"])


def test_cli_fsc_writes_json_and_png_and_refuses_overwrite(tmp_path, only_our_commands, capsys):
    g = torch.Generator().manual_seed(0)
    v = blob_phantom(32, seed=3)
    a = (v + 0.2 * torch.randn(32, 32, 32, generator=g)).numpy()
    b = (v + 0.2 * torch.randn(32, 32, 32, generator=g)).numpy()
    write_map(tmp_path / "a.mrc", a, 3.0)
    write_map(tmp_path / "b.mrc", b, 3.0)
    rc = cli.main(["-q", "fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FSC 0.5:" in out and "FSC 0.143:" in out
    rec = json.loads((tmp_path / "fsc.json").read_text())
    png = (tmp_path / "fsc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rec["fsc"]) == len(rec["freq_1_per_A"]) == 17
    r05, r0143 = rec["resolution_A"]["0.5"], rec["resolution_A"]["0.143"]
    assert 2 * 3.0 <= r0143 <= r05 < 1e3  # 0.143 is crossed at a higher frequency than 0.5
    assert math.isclose(r05, resolution_at(rec["freq_1_per_A"], rec["fsc"], 0.5))
    # refuses to overwrite: exit code 3; --force works
    assert cli.main(["-q", "fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")]) == 3
    assert (
        cli.main(
            [
                "-q",
                "fsc",
                str(tmp_path / "a.mrc"),
                str(tmp_path / "b.mrc"),
                "--force",
                "--mask-radius",
                "40",
                "-o",
                str(tmp_path / "sub" / "m"),
            ]
        )
        == 0
    )
    assert (tmp_path / "sub" / "m.json").is_file() and (tmp_path / "sub" / "m.png").is_file()
    # mismatched boxes / voxel sizes: InputError, exit code 2
    write_map(tmp_path / "c.mrc", np.zeros((16, 16, 16), np.float32), 3.0)
    write_map(tmp_path / "d.mrc", b, 2.0)
    assert (
        cli.main(
            [
                "-q",
                "fsc",
                str(tmp_path / "a.mrc"),
                str(tmp_path / "c.mrc"),
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        cli.main(
            [
                "-q",
                "fsc",
                str(tmp_path / "a.mrc"),
                str(tmp_path / "d.mrc"),
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "voxel sizes differ" in capsys.readouterr().err


def test_cli_align_smoke(tmp_path, only_our_commands, capsys):
    v = blob_phantom(32, seed=9)
    R = euler_to_matrix(torch.tensor(0.3), torch.tensor(1.1), torch.tensor(-0.8)).double()
    mov = rotate_volume(v, R, torch.tensor([1.0, 0.0, -1.0]))
    write_map(tmp_path / "ref.mrc", v.numpy(), 2.0)
    write_map(tmp_path / "map.mrc", mov.numpy(), 2.0)
    args = [
        "-q",
        "align",
        str(tmp_path / "ref.mrc"),
        str(tmp_path / "map.mrc"),
        "-o",
        str(tmp_path / "map_aligned.mrc"),
        "--seed",
        "3",
        "--n-global",
        "1500",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "cc:" in out and "hand flipped: no" in out and "RELION Euler" in out
    aligned, apix = read_map(tmp_path / "map_aligned.mrc")
    assert apix == pytest.approx(2.0)
    rec = json.loads((tmp_path / "map_aligned.json").read_text())
    assert rec["flipped"] is False and rec["cc"] > 0.95
    Rf = torch.tensor(rec["rotation_matrix"], dtype=torch.float64)
    assert math.degrees(rotation_angle(Rf, R.T)) < 3.0
    e = rec["euler_relion_deg"]
    R_e = euler_to_matrix(
        *(torch.tensor(math.radians(e[k]), dtype=torch.float64) for k in ("rot", "tilt", "psi"))
    )
    assert torch.allclose(R_e, Rf, atol=1e-6)
    assert rec["shift_A"] == pytest.approx([s * 2.0 for s in rec["shift_px"]])
    a = v.numpy().ravel() - v.numpy().mean()
    b = aligned.ravel() - aligned.mean()
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.95
    assert cli.main(args) == 3  # refuses to overwrite


def test_align_is_deterministic_for_a_seed():
    v = blob_phantom(16, n=4, seed=2)
    mov = rotate_volume(v, euler_to_matrix(torch.tensor(0.4), torch.tensor(0.9), torch.tensor(0.1)))
    r1 = align(v, mov, seed=5, n_global=300, try_flip=False, progress=False)
    r2 = align(v, mov, seed=5, n_global=300, try_flip=False, progress=False)
    assert torch.equal(r1.rotation, r2.rotation) and torch.equal(r1.shift_px, r2.shift_px)
    assert torch.equal(r1.aligned, r2.aligned)
    assert not r1.flipped and math.isnan(r1.cc_other_hand)
