"""--downsample: Fourier cropping of images (exact on band-limited images, Parseval on the kept
band, RELION's own rescaling), particle sets read at a smaller box (pixel size, CTF and shifts
follow), the commands' flag, and the hint for large boxes."""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from cryorecon import cli
from cryorecon.commands._input import downsample_hint, read_particles_from_args
from cryorecon.errors import InputError
from cryorecon.fourier.transforms import fft2c
from cryorecon.io.particles import read_particles
from cryorecon.preprocess import fourier_crop, suggest_box


def _band_limited(n: int, kmax: int, count: int, seed: int) -> tuple[np.ndarray, object]:
    """``count`` random images (n, n) made of cosines of integer frequencies |k| <= kmax
    (cycles per box), and the function ``f(u, v)`` (u, v in box units about the centre)."""
    rng = np.random.default_rng(seed)
    terms = [
        (rng.integers(-kmax, kmax + 1, size=2), rng.normal(), rng.uniform(0, 2 * np.pi))
        for _ in range(12)
    ]

    def f(u, v):
        return sum(a * np.cos(2 * np.pi * (k[0] * u + k[1] * v) + p) for k, a, p in terms)

    g = (np.arange(n) - n // 2) / n
    v, u = np.meshgrid(g, g, indexing="ij")  # [y, x]
    img = f(u, v)
    return np.repeat(img[None], count, 0).astype(np.float64), f


def test_crop_of_a_band_limited_image_is_its_coarser_sampling():
    n, D = 32, 12
    imgs, f = _band_limited(n, kmax=5, count=2, seed=0)  # below the new Nyquist (6)
    out = fourier_crop(torch.from_numpy(imgs), D).numpy()
    g = (np.arange(D) - D // 2) / D
    v, u = np.meshgrid(g, g, indexing="ij")
    assert out.shape == (2, D, D)
    np.testing.assert_allclose(out[0], f(u, v), atol=1e-9)
    # float32 in, float32 out
    out32 = fourier_crop(torch.from_numpy(imgs.astype(np.float32)), D)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32[1].numpy(), f(u, v), atol=1e-4)


def test_parseval_on_the_kept_band():
    n, D = 24, 16
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((5, n, n)))
    spec = fft2c(x)
    k = torch.arange(n) - n // 2
    inside = (k.abs()[:, None] < D // 2) & (k.abs()[None, :] < D // 2)
    band = torch.fft.ifftshift(
        torch.fft.ifft2(torch.fft.fftshift(spec * inside, dim=(-2, -1)), norm="ortho"), dim=(-2, -1)
    ).real
    y = fourier_crop(band, D)
    # unitary transforms times D/n: energy of the kept coefficients times (D/n)^2
    kept = (spec.abs() ** 2 * inside).sum(dim=(-2, -1))
    np.testing.assert_allclose(
        (y**2).sum(dim=(-2, -1)).numpy(), (kept * (D / n) ** 2).numpy(), rtol=1e-10
    )
    # white noise stays white with sigma times D/n
    noise = torch.from_numpy(np.random.default_rng(2).standard_normal((400, 32, 32)))
    assert float(fourier_crop(noise, 16).std()) == pytest.approx(0.5, rel=0.02)
    assert fourier_crop(x, n) is x
    for bad in (15, 0, 26):
        with pytest.raises(ValueError):
            fourier_crop(x, bad)


@pytest.mark.skipif(shutil.which("relion_image_handler") is None, reason="RELION not installed")
def test_crop_equals_relions_rescale(tmp_path):
    x = np.random.default_rng(3).standard_normal((3, 32, 32)).astype(np.float32)
    with mrcfile.new(tmp_path / "in.mrcs") as m:
        m.set_data(x)
        m.set_image_stack()
        m.voxel_size = 5.0
    subprocess.run(
        [
            "relion_image_handler",
            "--i",
            str(tmp_path / "in.mrcs"),
            "--o",
            str(tmp_path / "out.mrcs"),
            "--angpix",
            "5",
            "--rescale_angpix",
            "10",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ref = mrcfile.read(tmp_path / "out.mrcs")
    ours = fourier_crop(torch.from_numpy(x), 16).numpy()
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)  # noise: the Nyquist lines included


def test_suggest_box_is_the_smallest_that_reaches_the_resolution():
    for D, apix, res in ((256, 1.1, 9.09), (200, 2.0, 9.09), (160, 2.0, 12.0), (300, 0.8, 6.0)):
        box = suggest_box(D, apix, res)
        width = D * apix  # Å; a box b over it has Nyquist b / (2 width) 1/Å
        assert box % 8 == 0 and box < D and box / (2 * width) >= 1 / res
        assert box == 32 or (box - 8) / (2 * width) < 1 / res
    assert suggest_box(64, 5.6, 9.09) == 64  # nothing smaller reaches 9.1 Å
    assert suggest_box(256, 1.1, 9.09) == 64


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from cryorecon.simulate import run_simulation

    out = tmp_path_factory.mktemp("ds")
    run_simulation(out, n=300, D=32, apix=10.0, snr=1.0, seed=0)
    return out / "particles.star"


def test_particle_set_read_at_a_smaller_box(sim):
    full = read_particles(sim)
    half = read_particles(sim, downsample=16)
    assert (half.D, half.stack_box, full.stack_box) == (16, 32, 32)
    np.testing.assert_allclose(half.apix, 2 * full.apix)
    np.testing.assert_array_equal(half.shifts, full.shifts)  # Å: the same
    for k in full.ctf:
        np.testing.assert_array_equal(half.ctf[k], full.ctf[k])
    idx = [3, 0, 7]
    want = fourier_crop(torch.from_numpy(full.images(idx)), 16).numpy()
    np.testing.assert_array_equal(half.images(idx), want)
    assert half.stack_images(idx).shape == (3, 32, 32)
    sub = half.subset([5, 6])
    assert (sub.D, sub.stack_box) == (16, 32) and sub.images([0]).shape == (1, 16, 16)
    back = half.at_box(32)
    assert (back.D, back.stack_D) == (32, 0)
    np.testing.assert_allclose(back.apix, full.apix)
    np.testing.assert_array_equal(back.images(idx), full.images(idx))
    for bad in (15, 34, 4):
        with pytest.raises(InputError, match="cannot downsample 32 px images"):
            full.at_box(bad)


def test_backprojection_at_the_smaller_box_matches_the_cropped_truth(sim):
    """CTF and shifts follow the new pixel size: the oracle map of the downsampled images
    equals the truth cropped to the same box as well as the full-box map does."""
    from cryorecon.backproject import wiener_backproject
    from cryorecon.simulate import fourier_resize

    truth = torch.from_numpy(mrcfile.read(sim.parent / "truth.mrc"))
    t16 = fourier_resize(truth, 16)
    full = read_particles(sim)
    v32 = wiener_backproject(full)
    v16 = wiener_backproject(full.at_box(16))
    assert v16.shape == (16, 16, 16)

    def cc(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    c16, c32 = cc(v16, t16), cc(fourier_resize(v32, 16), t16)
    assert c16 > 0.9 and c16 > c32 - 0.03, (c16, c32)
    # shifts wrongly kept in the old pixels would ruin it: the test can fail
    wrong = full.at_box(16)
    wrong.shifts = wrong.shifts * 2
    assert cc(wiener_backproject(wrong), t16) < c16 - 0.1


def test_backproject_command_downsample(sim, tmp_path, capsys):
    out = tmp_path / "m.mrc"
    assert cli.main(["-q", "backproject", str(sim), "-o", str(out), "--downsample", "16"]) == 0
    with mrcfile.open(out) as m:
        assert m.data.shape == (16, 16, 16) and m.voxel_size.x == pytest.approx(20.0)
    capsys.readouterr()
    for bad, text in (("15", "must be even"), ("6", "must be >= 8")):  # at the parser
        with pytest.raises(SystemExit) as exc:
            cli.main(
                ["-q", "backproject", str(sim), "-o", str(tmp_path / "x.mrc"), "--downsample", bad]
            )
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--downsample: {text}" in err, err
    rc = cli.main(
        ["-q", "backproject", str(sim), "-o", str(tmp_path / "x.mrc"), "--downsample", "64"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot downsample 32 px images to 64" in err[0], err
    assert not (tmp_path / "x.mrc").exists()


def test_reconstruct_parser_has_downsample():
    p = cli.build_parser()
    a = p.parse_args(["reconstruct", "p.star", "-o", "run", "--downsample", "64"])
    assert a.downsample == 64
    assert p.parse_args(["reconstruct", "p.star", "-o", "run"]).downsample is None


@pytest.fixture
def log_to_stderr():
    """The CLI's logging set up on this test's stderr (an earlier cli.main bound it to a
    stream pytest has closed since)."""
    from cryorecon.progress import configure

    configure()


class _Set:
    def __init__(self, D, apix, n=10):
        self.D, self.apix, self.n = D, np.full(n, apix), n

    def __len__(self):
        return self.n


def test_hint_for_a_large_box(caplog, log_to_stderr):
    with caplog.at_level(logging.INFO, logger="cryorecon"):
        text = downsample_hint(_Set(256, 1.1))
    assert text and "--downsample 64" in text and "box 256" in text and "9.1 Å" in text
    assert caplog.messages == [text] and "\n" not in text
    assert downsample_hint(_Set(128, 1.1)) is None  # not above 128
    assert downsample_hint(_Set(160, 4.0)) is None  # box 144 reaches 9.1 Å: too small a gain
    assert downsample_hint(_Set(256, 4.0)) is None  # nothing smaller reaches 9.1 Å
    assert "--downsample 56" in downsample_hint(_Set(200, 1.5), resolution_A=12.0)  # 50 -> 56


def test_hint_when_reading_a_large_box_without_downsample(tmp_path, caplog, log_to_stderr):
    from cryorecon.io.particles import write_particles

    imgs = np.random.default_rng(0).normal(size=(2, 136, 136)).astype(np.float32)
    ctf = dict(
        defocus_u=1.5e4, defocus_v=1.4e4, defocus_angle=0.0, voltage=300.0, cs=2.7, amp_contrast=0.1
    )
    star = write_particles(tmp_path / "p.star", imgs, 1.5, ctf, angles=np.zeros((2, 3)))
    args = argparse.Namespace(particles=star, datadir=None, downsample=None, resolution=None)
    with caplog.at_level(logging.INFO, logger="cryorecon"):
        ps = read_particles_from_args(args)
    assert ps.D == 136 and any("--downsample 48" in m for m in caplog.messages)
    caplog.clear()
    args.downsample = 48
    with caplog.at_level(logging.INFO, logger="cryorecon"):
        ps = read_particles_from_args(args)
    assert ps.D == 48 and math.isclose(ps.apix[0], 1.5 * 136 / 48)
    assert not any("hint" in m for m in caplog.messages)
    # a command without the option (info) never hints
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cryorecon"):
        read_particles_from_args(argparse.Namespace(particles=star, datadir=None))
    assert not any("hint" in m for m in caplog.messages)


def test_export_of_a_downsampled_set_keeps_the_files_scale(sim, tmp_path):
    """Poses exported from a run on downsampled images refer to the stacks as they are: the
    files' pixel size and box in data_optics, and RELION 3.0 origins in the files' pixels."""
    import starfile

    from cryorecon.io.export import export_poses

    blocks = starfile.read(sim)
    parts = blocks["particles"].merge(blocks["optics"], on="rlnOpticsGroup")
    parts = parts.drop(
        columns=["rlnOpticsGroup", "rlnOpticsGroupName", "rlnImageSize", "rlnImageDimensionality"],
        errors="ignore",
    )
    parts["rlnOriginX"] = parts.pop("rlnOriginXAngst") / parts["rlnImagePixelSize"]
    parts["rlnOriginY"] = parts.pop("rlnOriginYAngst") / parts["rlnImagePixelSize"]
    old = tmp_path / "relion30.star"
    starfile.write({"particles": parts}, old)
    (tmp_path / sim.with_suffix(".mrcs").name).symlink_to(sim.with_suffix(".mrcs"))
    half = read_particles(old, downsample=16)
    n = len(half)
    poses = {"eulers_deg": np.zeros((n, 3)), "shifts_A": np.full((n, 2), 10.0)}
    export_poses(half, poses, tmp_path / "out")
    out = starfile.read(tmp_path / "out" / "particles.star")
    assert float(out["optics"]["rlnImagePixelSize"].iloc[0]) == pytest.approx(10.0)
    assert int(out["optics"]["rlnImageSize"].iloc[0]) == 32
    np.testing.assert_allclose(out["particles"]["rlnOriginX"], 1.0)  # 10 Å at 10 Å/pixel
    np.testing.assert_allclose(out["particles"]["rlnOriginXAngst"], 10.0)


def test_resume_fingerprint_names_a_changed_downsample(sim):
    from cryorecon.runstate import fingerprint_differences, particle_fingerprint

    full = read_particles(sim)
    saved = particle_fingerprint(full.at_box(16))
    same = particle_fingerprint(read_particles(sim, downsample=16))
    assert fingerprint_differences(saved, same) == []
    diff = fingerprint_differences(saved, particle_fingerprint(full))
    assert diff == ["images read at box 32, the checkpoint's run read them at 16 (--downsample)"]
    old = {k: v for k, v in saved.items() if k != "box"}  # a checkpoint from before the box
    assert fingerprint_differences(old, particle_fingerprint(full)) == [
        "other images or CTF parameters"
    ]
