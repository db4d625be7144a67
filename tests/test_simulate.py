"""Simulator: density from the shipped structure, Eq. 1 images, SNR, seeds, files, CLI."""

import argparse
import json

import mrcfile
import numpy as np
import pytest
import torch

from cryorecon.errors import InputError, OutputExistsError
from cryorecon.fourier.ctf import ctf_from_dict
from cryorecon.fourier.slicing import project
from cryorecon.fourier.transforms import fft2c, freq_grid_2d, ifft2c
from cryorecon.io.particles import read_particles
from cryorecon.simulate import (
    ParticleSimulator,
    density_from_model,
    draw_parameters,
    load_volume,
    model_centre,
    overlay_origin,
    run_simulation,
)

D, APIX = 32, 11.0


@pytest.fixture(scope="module")
def groel():
    """The shipped 1AON at a small box (32 x 11 Å = 352 Å)."""
    return density_from_model(None, D, APIX)


def _com(v):
    g = torch.arange(v.shape[-1], dtype=torch.float64)
    w = v.double()
    tot = w.sum()
    return [
        float((w.sum(dim=(1, 2)) * g).sum() / tot),
        float((w.sum(dim=(0, 2)) * g).sum() / tot),
        float((w.sum(dim=(0, 1)) * g).sum() / tot),
    ]


def _disc(img, D):
    """Keep only |k| < D/2 (the set the simulator computes)."""
    k = torch.arange(D) - D // 2
    inside = (k[:, None] ** 2 + k[None, :] ** 2) < (D / 2) ** 2
    return ifft2c(fft2c(torch.as_tensor(img)) * inside).real


def test_density_positive_and_centred(groel):
    v = groel
    assert v.shape == (D, D, D) and v.dtype == torch.float32
    assert v.sum() > 0 and v.max() > 0
    # band-limiting leaves small ringing; the map is overwhelmingly positive
    assert -v.clamp(max=0).sum() < 0.1 * v.clamp(min=0).sum()
    com = _com(v)
    assert all(abs(c - D // 2) < 1.0 for c in com), com
    # GroEL-GroES is ~180 Å long along the model's z axis and ~140 Å wide: the map's first
    # axis (z) must carry the long extent
    prof = [
        (v.sum(dim=other) > 0.05 * v.sum(dim=other).max()).sum().item()
        for other in [(1, 2), (0, 2), (0, 1)]
    ]
    assert prof[0] > prof[1] and prof[0] > prof[2], prof


def test_density_axes_follow_the_model(tmp_path):
    # one atom off the centre along x lands on the last axis, +x -> larger index
    pdb = "ATOM      1  CA  ALA A   1      10.000  20.000  30.000  1.00 80.00           C\nEND\n"
    p = tmp_path / "one.pdb"
    p.write_text(pdb)
    v = density_from_model(p, 32, 2.0, centre_A=(6.0, 20.0, 34.0))  # atom at +2 px x, -2 px z
    assert np.unravel_index(int(v.argmax()), v.shape) == (14, 16, 18)
    assert overlay_origin((6.0, 20.0, 34.0), 32, 2.0) == pytest.approx([-26.0, -12.0, 2.0])


def test_model_that_does_not_fit_is_refused():
    with pytest.raises(InputError, match="--box"):
        density_from_model(None, 16, 5.0)


def test_load_volume_resamples(tmp_path):
    g = torch.arange(48, dtype=torch.float32) - 24
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    blob = torch.exp(-((x - 4) ** 2 + y**2 + z**2) / (2 * 4.0**2))  # sigma 4 px at 2 Å
    path = tmp_path / "blob.mrc"
    with mrcfile.new(path) as m:
        m.set_data(blob.numpy())
        m.voxel_size = 2.0
    v = load_volume(path, 32, 4.0)  # 48 x 2 Å -> 24 x 4 Å, padded to 32
    assert v.shape == (32, 32, 32)
    assert np.unravel_index(int(v.argmax()), v.shape) == (16, 16, 18)  # +8 Å in x = +2 px
    assert v.max().item() == pytest.approx(1.0, rel=0.03)  # point values kept
    same = load_volume(path, 48, 2.0)
    assert torch.allclose(same, blob)


def test_noise_free_equals_ctf_times_projection(groel):
    params = draw_parameters(12, APIX, seed=5)
    sim = ParticleSimulator(groel, params, snr=None, seed=5)
    clean = np.concatenate([b.images for b in sim.batches(5)])
    p = project(groel, params.rotations.float(), params.shifts_px.float())
    freqs = freq_grid_2d(D).reshape(-1, 2) / APIX
    ctf = ctf_from_dict(params.ctf, None, freqs).reshape(-1, D, D)
    ref = ifft2c(fft2c(p) * ctf).real
    ref_disc = _disc(ref, D)
    assert np.linalg.norm(clean - ref_disc.numpy()) < 1e-4 * np.linalg.norm(ref_disc.numpy())
    assert np.linalg.norm(clean - ref.numpy()) < 1e-2 * np.linalg.norm(ref.numpy())


def test_given_angles_are_used(groel):
    angles = np.array([[10.0, 20.0, 30.0], [-100.0, 135.0, 60.0]])
    params = draw_parameters(2, APIX, seed=1, angles=angles, shift_range_px=0)
    b = next(ParticleSimulator(groel, params, snr=None, seed=1).batches())
    assert b.angles == pytest.approx(angles, abs=1e-6)
    assert b.shifts_A == pytest.approx(np.zeros((2, 2)))


def test_measured_snr(groel):
    sim = ParticleSimulator(groel, draw_parameters(600, APIX, seed=2), snr=0.05, seed=2)
    clean = sim.clean(0, 600).numpy()
    noisy = np.concatenate([b.images for b in sim.batches(256)])
    snr = clean.var(axis=(1, 2)).mean() / (noisy - clean).var()
    assert snr == pytest.approx(0.05, rel=0.1)
    assert sim.noise_sigma**2 == pytest.approx(sim.signal_var / 0.05)


def test_deterministic_and_batch_independent(groel):
    def run(seed, bs):
        sim = ParticleSimulator(groel, draw_parameters(300, APIX, seed), snr=0.1, seed=seed)
        return np.concatenate([b.images for b in sim.batches(bs)])

    a, b, c = run(3, 64), run(3, 300), run(4, 64)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    m1 = draw_parameters(300, APIX, 3)
    m2 = draw_parameters(1000, APIX, 3)
    assert torch.equal(m1.rotations, m2.rotations[:300])  # prefix-stable metadata


def test_run_simulation_files_and_roundtrip(groel, tmp_path):
    out = tmp_path / "sim"
    summary = run_simulation(
        out, volume=groel, n=40, D=D, apix=APIX, snr=1.0, seed=7, batch_size=16
    )
    with mrcfile.open(out / "truth.mrc") as m:
        assert m.data.shape == (D, D, D)
        assert float(m.voxel_size.x) == pytest.approx(APIX)
        assert np.allclose(m.data, groel.numpy())
    meta = json.loads((out / "simulation.json").read_text())
    assert meta["noise_sigma"] == pytest.approx(summary["noise_sigma"])

    # Re-simulate the clean images from the files alone (RELION conventions): the residual
    # must be the noise. A flipped origin sign or a transposed rotation leaves signal behind.
    from cryorecon.geometry.poses import relion_to_pose

    ps = read_particles(out / "particles.star")
    assert len(ps) == 40 and ps.D == D and ps.apix[0] == pytest.approx(APIX)
    imgs = ps.images(np.arange(40))
    R, t = relion_to_pose(ps.angles, ps.shifts, ps.apix)
    freqs = freq_grid_2d(D).reshape(-1, 2) / APIX
    clean = _disc(
        ifft2c(
            fft2c(project(groel, R, t)) * ctf_from_dict(ps.ctf, None, freqs).reshape(-1, D, D)
        ).real,
        D,
    ).numpy()
    resid = imgs - clean
    assert resid.var() == pytest.approx(meta["noise_sigma"] ** 2, rel=0.1)
    assert abs(np.corrcoef(resid.ravel(), clean.ravel())[0, 1]) < 0.05

    with pytest.raises(OutputExistsError):
        run_simulation(out, volume=groel, n=5, D=D, apix=APIX, snr=1.0, seed=7)
    run_simulation(out, volume=groel, n=5, D=D, apix=APIX, snr=1.0, seed=7, force=True)
    assert len(read_particles(out / "particles.star")) == 5


def test_cli(tmp_path, monkeypatch):
    from cryorecon.commands import simulate as cmd

    parser = argparse.ArgumentParser()
    cmd.register(parser.add_subparsers(dest="command"))
    vol = tmp_path / "v.mrc"
    g = torch.arange(16, dtype=torch.float32) - 8
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    with mrcfile.new(vol) as m:
        m.set_data(torch.exp(-(x**2 + 2 * y**2 + 3 * z**2) / 8).numpy())
        m.voxel_size = 4.0
    argv = [
        "simulate",
        "--volume",
        str(vol),
        "-n",
        "10",
        "--box",
        "16",
        "--apix",
        "4",
        "--snr",
        "0.1",
        "--seed",
        "1",
        "-o",
        str(tmp_path / "o"),
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (tmp_path / "o" / "particles.mrcs").is_file()
    with pytest.raises(OutputExistsError) as exc:
        args.func(parser.parse_args(argv))
    assert exc.value.exit_code == 3
    with pytest.raises(InputError):
        args.func(parser.parse_args(argv[:-2] + ["--box", "15", "-o", str(tmp_path / "p")]))
    defaults = parser.parse_args(["simulate", "-o", "x"])
    assert (defaults.n, defaults.box, defaults.apix, defaults.snr) == (1000, 64, 5.6, 0.05)
    assert defaults.volume is None and defaults.model is None


def test_builtin_model_fits_small_set():
    # DESIGN.md `small`: 64 x 5.6 Å = 358 Å box; GroEL-GroES (~200 Å long) fits with room to
    # spare, even inside the inscribed sphere that rotated views sweep
    from cryorecon.simulate import _atom_positions, _read_structure

    st, _ = _read_structure(None)
    xyz = _atom_positions(st[0]) - model_centre()
    assert np.linalg.norm(xyz, axis=1).max() < 32 * 5.6 - 2 * 5.6
    assert np.ptp(xyz[:, 2]) > np.ptp(xyz[:, 0])  # the long axis is the model's z
