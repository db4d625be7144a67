"""Inverted contrast: detected from the data, corrected where images are read, forced by flags.

Simulated sets (:mod:`cryorecon.simulate`): GroEL-GroES (1AON) in a 32-voxel box at 9 Å/pixel,
300 particles at SNR 0.05, the RELION CTF (defocus 1-3 µm), three seeds; the "dark" copy of
each set has every image negated.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryorecon import cli
from cryorecon.backproject import wiener_backproject
from cryorecon.contrast import apply_contrast, ball_transform, detect_contrast
from cryorecon.io.mrc import read_map
from cryorecon.io.particles import read_particles, write_particles
from cryorecon.simulate import density_from_model, simulate_particles

D, APIX, N, SNR = 32, 9.0, 300, 0.05
SEEDS = (0, 1, 2)
DIAMETER_PX = 0.8 * D


@pytest.fixture(scope="module")
def truth():
    return density_from_model(None, D=D, apix=APIX)


@pytest.fixture(scope="module")
def sets(truth, tmp_path_factory):
    """seed -> (bright STAR, dark STAR): the same particles, the dark one negated."""
    out = {}
    for seed in SEEDS:
        d = tmp_path_factory.mktemp(f"contrast{seed}")
        b = list(simulate_particles(truth, N, APIX, SNR, seed, batch_size=N))
        imgs = np.concatenate([x.images for x in b])
        ctf = {k: np.concatenate([x.ctf[k] for x in b]) for k in b[0].ctf}
        ang = np.concatenate([x.angles for x in b])
        sh = np.concatenate([x.shifts_A for x in b])
        bright = write_particles(d / "bright.star", imgs, APIX, ctf, angles=ang, shifts=sh)
        dark = write_particles(d / "dark.star", -imgs, APIX, ctf, angles=ang, shifts=sh)
        out[seed] = (bright, dark)
    return out


def _corr(a, b) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_ball_transform_matches_numerical_integral():
    """B(s) = (3 / a^3) int_0^a r^2 sinc(2 s r) dr (radial Fourier integral of a unit ball)."""
    a = 7.0
    r = np.linspace(0, a, 20001)
    for s in (0.0, 0.02, 0.05, 0.0642, 0.1, 0.2):
        integrand = r**2 * np.sinc(2 * s * r)  # np.sinc(x) = sin(pi x) / (pi x)
        expected = 3 / a**3 * np.trapezoid(integrand, r)
        got = float(ball_transform(torch.tensor(s, dtype=torch.float64), a))
        assert got == pytest.approx(expected, abs=1e-6), s
    # the first zero, where the band ends: 4.4934 / (2 pi a)
    assert (
        abs(
            float(
                ball_transform(
                    torch.tensor(4.493409457909064 / (2 * math.pi * a), dtype=torch.float64), a
                )
            )
        )
        < 1e-9
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_bright_not_flagged_dark_detected(sets, seed):
    bright, dark = sets[seed]
    ok = detect_contrast(read_particles(bright), DIAMETER_PX)
    bad = detect_contrast(read_particles(dark), DIAMETER_PX)
    assert not ok.inverted and ok.conclusive and ok.statistic > 2 * ok.threshold
    assert bad.inverted and bad.conclusive
    # the statistic measures the files, whatever sign the set is read with
    assert bad.statistic == pytest.approx(-ok.statistic, rel=1e-6)
    ps = read_particles(dark)
    ps.contrast_sign = -1.0
    assert detect_contrast(ps, DIAMETER_PX).statistic == pytest.approx(bad.statistic, rel=1e-9)


def test_pure_noise_is_inconclusive(tmp_path):
    """No particle: |t| stays below the threshold for several noise seeds (t ~ N(0, 1))."""
    b = next(simulate_particles(torch.zeros(D, D, D) + 1e-3, N, APIX, None, 0, batch_size=N))
    for seed in range(3):
        noise = np.random.default_rng(seed).normal(size=(N, D, D)).astype(np.float32)
        star = write_particles(tmp_path / f"n{seed}.star", noise, APIX, b.ctf)
        c = detect_contrast(read_particles(star), DIAMETER_PX)
        assert not c.conclusive and not c.inverted, c


@pytest.mark.parametrize("seed", SEEDS)
def test_corrected_dark_set_back_projects_to_the_truth(sets, truth, seed):
    bright, dark = sets[seed]
    ps = read_particles(dark)
    raw = ps.images([0, 1])
    info = apply_contrast(ps, DIAMETER_PX)
    assert info["contrast_inverted"] is True and ps.contrast_sign == -1.0
    np.testing.assert_array_equal(ps.images([0, 1]), -raw)  # every read is negated...
    np.testing.assert_array_equal(ps.subset([1, 0]).images([1]), -raw[[0]])  # ...also of a subset
    fixed = _corr(wiener_backproject(ps), truth)
    ps.contrast_sign = 1.0
    uncorrected = _corr(wiener_backproject(ps), truth)
    assert fixed > 0.5 and uncorrected < -0.5, (fixed, uncorrected)
    normal = read_particles(bright)
    assert apply_contrast(normal, DIAMETER_PX)["contrast_inverted"] is False
    assert normal.contrast_sign == 1.0


def test_forcing_flags(sets):
    bright, dark = sets[0]
    ps = read_particles(bright)
    assert apply_contrast(ps, DIAMETER_PX, force=True)["contrast_inverted"] is True
    assert ps.contrast_sign == -1.0
    info = apply_contrast(read_particles(dark), DIAMETER_PX, force=False)
    assert info["contrast_inverted"] is False and info["contrast_statistic"] < 0
    assert info["contrast_check"]["mode"] == "forced"


def test_backproject_command(sets, truth, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ["backproject"])
    _, dark = sets[1]
    rc = cli.main(["backproject", str(dark), "-o", str(tmp_path / "auto.mrc")])
    err = capsys.readouterr().err
    assert rc == 0 and "contrast" in err and "dark" in err and "negating" in err
    assert _corr(read_map(tmp_path / "auto.mrc")[0], truth) > 0.5
    rc = cli.main(
        ["backproject", str(dark), "-o", str(tmp_path / "kept.mrc"), "--no-invert-contrast"]
    )
    assert rc == 0 and "--no-invert-contrast keeps" in capsys.readouterr().err
    assert _corr(read_map(tmp_path / "kept.mrc")[0], truth) < -0.5


def test_reconstruct_records_contrast_in_run_json(sets, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ["reconstruct"])
    _, dark = sets[2]
    run = tmp_path / "run"
    small = [
        "--max-iters",
        "1",
        "--minibatch",
        "50",
        "--heldout",
        "20",
        "--grid-scale",
        "3",
        "--report-every",
        "0",
    ]
    assert cli.main(["reconstruct", str(dark), "-o", str(run), *small]) == 0
    assert "contrast: protein is dark" in capsys.readouterr().err
    info = json.loads((run / "run.json").read_text())
    assert info["contrast_inverted"] is True and info["contrast_statistic"] < -4
    assert info["contrast_check"]["n_particles"] == N
    # a forced choice is recorded as such, and --resume keeps the first part's sign
    assert (
        cli.main(
            ["reconstruct", str(dark), "-o", str(run), *small, "--force", "--no-invert-contrast"]
        )
        == 0
    )
    info = json.loads((run / "run.json").read_text())
    assert info["contrast_inverted"] is False and info["contrast_check"]["mode"] == "forced"
