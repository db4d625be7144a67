"""Gold-standard half-map FSC (cryorecon.gold_standard): the mask, the phase randomisation,
the corrected FSC and the combined map, checked by brute force and against
``relion_postprocess`` (skipped when RELION is not installed)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cryorecon.errors import InputError
from cryorecon.gold_standard import (
    combine_halves,
    corrected_fsc,
    fsc_weights,
    gold_standard_fsc,
    randomize_phases_beyond,
    soft_mask_from_map,
)
from cryorecon.io.mrc import write_map
from cryorecon.validate import fsc, shell_counts, spherical_mask


def ball(D: int, radius: float) -> torch.Tensor:
    k = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    return (torch.sqrt(x * x + y * y + z * z) <= radius).float()


def blobs(D: int, seed: int = 0, n: int = 8) -> torch.Tensor:
    """Smooth positive density near the centre (a few Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    v = torch.zeros(D, D, D, dtype=torch.float64)
    for _ in range(n):
        c = torch.randn(3, generator=g, dtype=torch.float64) * D / 10
        s = 1.0 + 1.5 * float(torch.rand(1, generator=g))
        v += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return v.float()


def noisy_halves(vol: torch.Tensor, sigma: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        vol + sigma * torch.randn(vol.shape, generator=g),
        vol + sigma * torch.randn(vol.shape, generator=g),
    )


def fsc_noise_bound(D: int) -> torch.Tensor:
    """5 standard deviations of the FSC of independent noise per shell (1/sqrt(n/2): the
    full spectrum counts each independent coefficient twice)."""
    n = shell_counts(D).double().clamp_min(1)
    return 5.0 / torch.sqrt(n / 2)


# --------------------------------------------------------------------------------------------
# mask
# --------------------------------------------------------------------------------------------


def test_mask_is_one_inside_zero_far_away_and_follows_the_distance_to_the_seed():
    D, apix, R = 16, 2.0, 3.0
    vol = ball(D, R)  # binary ball: the seed at threshold 0.5 without low-pass is the ball
    extend_A, soft_A = 1 * apix, 3 * apix
    mask, facts = soft_mask_from_map(
        vol, apix, threshold=0.5, extend_A=extend_A, soft_edge_A=soft_A, lowpass_A=None
    )
    seed = vol.bool()
    assert int(seed.sum()) == round(facts.seed_fraction * D**3)
    # brute-force distance (Å) of every voxel to the nearest seed voxel
    k = torch.arange(D, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(k, k, k, indexing="ij"), -1).reshape(-1, 3)
    dist = torch.cdist(grid, grid[seed.reshape(-1)]).min(dim=1).values.reshape(D, D, D) * apix
    x = ((dist - extend_A) / soft_A).clamp(0, 1)
    expected = 0.5 * (1 + torch.cos(math.pi * x))
    assert torch.allclose(mask.double(), expected, atol=1e-6)
    assert bool((mask[seed] == 1).all())
    assert bool((mask[dist <= extend_A] == 1).all())
    assert bool((mask[dist >= extend_A + soft_A] == 0).all())
    assert 0 < float(mask.min()) + 1 and float(mask.max()) == 1.0
    # smooth: neighbours along an axis are at most 1 voxel apart in distance, so the cosine
    # edge changes by at most pi / 2 per edge width in voxels
    step = math.pi / 2 / (soft_A / apix) + 1e-6
    for dim in range(3):
        assert float(torch.diff(mask, dim=dim).abs().max()) <= step
    assert facts.how == "auto" and facts.threshold_from == "value" and not facts.touches_edge
    assert math.isclose(facts.volume_fraction, float(mask.double().mean()), rel_tol=1e-9)


def test_mask_threshold_from_mass_and_from_the_maximum():
    D, apix = 24, 3.0
    vol = blobs(D, seed=2)
    mass_kDa = 300.0
    mask, facts = soft_mask_from_map(vol, apix, molecular_mass_kDa=mass_kDa)
    n = round(mass_kDa * 1000 / 0.81 / apix**3)
    assert facts.threshold_from == "molecular_mass"
    assert abs(round(facts.seed_fraction * D**3) - n) <= 2  # ties at the threshold
    mask2, facts2 = soft_mask_from_map(vol, apix)
    assert facts2.threshold_from == "fraction_of_max" and facts2.lowpass_A == 15.0
    from cryorecon.gold_standard import lowpass

    assert math.isclose(facts2.threshold, 0.1 * float(lowpass(vol, apix, 15.0).max()), rel_tol=1e-6)
    assert float(mask2[D // 2, D // 2, D // 2]) == 1.0 and float(mask2[0, 0, 0]) == 0.0
    assert "automatic" in facts2.describe()


def test_mask_drops_small_islands_and_respects_the_noise_level():
    D, apix = 24, 2.0
    vol = ball(D, 4.0)
    vol[2, 2, 2] = 1.0  # a lone voxel above the threshold, far from the molecule
    opts = {"threshold": 0.5, "lowpass_A": None, "extend_A": apix, "soft_edge_A": 2 * apix}
    mask, facts = soft_mask_from_map(vol, apix, **opts)
    assert float(mask[2, 2, 2]) == 0.0 and float(mask[D // 2, D // 2, D // 2]) == 1.0
    assert facts.dropped_fraction == pytest.approx(1 / int(vol.sum()))
    kept, facts0 = soft_mask_from_map(vol, apix, min_island_fraction=0.0, **opts)
    assert float(kept[2, 2, 2]) == 1.0 and facts0.dropped_fraction == 0.0
    # a noise level raises the automatic threshold to 3 sigma, never a given one
    _, f = soft_mask_from_map(vol, apix, lowpass_A=None, noise_sigma=0.2)
    assert f.threshold == pytest.approx(0.6) and f.threshold_from == "noise"
    _, f = soft_mask_from_map(vol, apix, lowpass_A=None, noise_sigma=0.01)
    assert f.threshold == pytest.approx(0.1) and f.threshold_from == "fraction_of_max"
    _, f = soft_mask_from_map(vol, apix, threshold=0.3, lowpass_A=None, noise_sigma=0.2)
    assert f.threshold == pytest.approx(0.3)
    # gold_standard_fsc measures the noise on the half-difference
    h1, h2 = noisy_halves(blobs(D, seed=6, n=12), 1.5)
    res = gold_standard_fsc(h1, h2, apix)
    from cryorecon.gold_standard import lowpass

    sigma = float(lowpass(0.5 * (h1 - h2), apix, 15.0).std())
    assert res.mask.threshold >= 3 * sigma - 1e-7
    assert res.mask.threshold_from == "noise"


def test_mask_bad_input():
    vol = blobs(16)
    with pytest.raises(InputError):
        soft_mask_from_map(vol, 2.0, threshold=10.0)  # above the maximum: empty mask
    with pytest.raises(InputError):
        soft_mask_from_map(vol, 2.0, extend_A=-1.0)
    with pytest.raises(InputError, match="no positive density"):
        soft_mask_from_map(-vol, 2.0, lowpass_A=None)
    with pytest.raises(InputError):
        soft_mask_from_map(vol, 0.0)
    with pytest.raises(InputError):
        soft_mask_from_map(vol[:15, :15, :15], 2.0)


# --------------------------------------------------------------------------------------------
# phase randomisation
# --------------------------------------------------------------------------------------------


def test_phase_randomisation_keeps_amplitudes_and_low_shells_and_is_seeded(device):
    D, shell = 16, 4
    noise = torch.randn(D, D, D, generator=torch.Generator().manual_seed(0))
    vol = (blobs(D, seed=3) + 0.1 * noise).to(device)
    r = randomize_phases_beyond(vol, shell, torch.Generator().manual_seed(7))
    assert r.device == vol.device and r.dtype == torch.float32
    F0 = np.fft.fftn(vol.cpu().double().numpy())
    F1 = np.fft.fftn(r.cpu().double().numpy())
    f = np.fft.fftfreq(D, 1.0 / D)
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    r2 = kx**2 + ky**2 + kz**2
    inside = r2 < shell**2
    assert np.allclose(F1[inside], F0[inside], atol=1e-4 * np.abs(F0).max())
    # away from the self-conjugate planes (kx = 0, Nyquist) the amplitudes are kept exactly
    free = (~inside) & (kx != 0) & (np.abs(kx) != D // 2)
    assert np.allclose(np.abs(F1[free]), np.abs(F0[free]), atol=1e-4 * np.abs(F0).max())
    # ... and the phases replaced from the shell itself on (|k| >= shell, as RELION)
    for where in (free & (r2 == shell**2), free):
        moved = np.abs(F1[where] - F0[where]) > 1e-3 * np.abs(F0[where])
        assert moved.mean() > 0.9
    # phases are new: the FSC with the original is noise-like beyond the shell
    _, c = fsc(vol.cpu(), r.cpu(), 1.0)
    assert bool((c[:shell] > 0.999).all())
    assert bool((c[shell + 1 :].abs() < fsc_noise_bound(D)[shell + 1 :]).all())
    # deterministic given the seed, the same on every device
    again = randomize_phases_beyond(vol.cpu(), shell, torch.Generator().manual_seed(7))
    assert torch.allclose(again, r.cpu(), atol=1e-5)
    other = randomize_phases_beyond(vol.cpu(), shell, torch.Generator().manual_seed(8))
    assert not torch.allclose(other, again, atol=1e-3)


# --------------------------------------------------------------------------------------------
# gold-standard FSC
# --------------------------------------------------------------------------------------------


def test_identical_halves_give_fsc_one_and_nyquist_resolution():
    D, apix = 16, 2.0
    vol = blobs(D, seed=4) + 0.05 * torch.randn(D, D, D, generator=torch.Generator().manual_seed(1))
    res = gold_standard_fsc(vol, vol.clone(), apix, spherical_mask(D, 6, 2))
    for c in (res.fsc_unmasked, res.fsc_masked, res.fsc_corrected):
        assert torch.allclose(c, torch.ones_like(c), atol=1e-9)
    assert res.randomize_shell is None and res.fsc_randomized is None
    assert res.resolution_A == pytest.approx(2 * apix)
    assert any("never drops" in w for w in res.warnings)


def test_independent_noise_gives_fsc_zero_and_corrected_zero_beyond_randomisation(device):
    D, apix = 24, 1.5
    g = torch.Generator().manual_seed(5)
    h1 = torch.randn(D, D, D, generator=g).to(device)
    h2 = torch.randn(D, D, D, generator=g).to(device)
    mask = spherical_mask(D, 6, 3, device=device)
    res = gold_standard_fsc(h1, h2, apix, mask, seed=3)
    bound = fsc_noise_bound(D)
    assert bool((res.fsc_unmasked[1:].abs() < bound[1:]).all())
    assert res.randomize_shell == 1
    beyond = slice(res.randomize_shell + 2, None)
    # masking correlates neighbouring shells but noise stays noise
    assert float(res.fsc_masked[beyond].abs().mean()) < 0.1
    assert float(res.fsc_corrected[beyond].abs().mean()) < 0.1
    assert res.resolution_A > 10 * apix
    # seeded: the same numbers again; on CPU and CUDA alike
    again = gold_standard_fsc(h1.cpu(), h2.cpu(), apix, mask.cpu(), seed=3)
    assert torch.allclose(again.fsc_randomized, res.fsc_randomized, atol=1e-6)


def test_signal_plus_noise_corrected_curve_formula_and_json():
    D, apix = 24, 2.0
    vol = blobs(D, seed=6, n=12)
    h1, h2 = noisy_halves(vol, 0.02)
    res = gold_standard_fsc(h1, h2, apix, mask_options={"extend_A": 2.0, "soft_edge_A": 6.0})
    s = res.randomize_shell
    assert s is not None and float(res.fsc_unmasked[s]) < 0.8 <= float(res.fsc_unmasked[1:s].min())
    expect = res.fsc_masked.clone()
    m, r = res.fsc_masked[s + 2 :], res.fsc_randomized[s + 2 :]
    expect[s + 2 :] = (m - r) / (1 - r)
    assert torch.allclose(res.fsc_corrected, expect, atol=1e-12)
    assert torch.allclose(corrected_fsc(res.fsc_masked, res.fsc_randomized, s), expect)
    # the randomised FSC follows the masked one up to the randomisation shell, then falls
    assert torch.allclose(res.fsc_randomized[:s], res.fsc_masked[:s], atol=0.02)
    assert float(res.fsc_randomized[s + 2 :].abs().max()) < 0.3
    assert res.resolution_A == res.resolutions["corrected"][0.143]
    assert 2 * apix <= res.resolution_A < D * apix
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["resolution_A"] == pytest.approx(res.resolution_A)
    assert len(doc["fsc_corrected"]) == len(doc["freq_1_per_A"]) == D // 2 + 1
    assert doc["randomize_at_A"] == pytest.approx(D * apix / s)
    assert doc["mask"]["how"] == "auto" and "description" in doc["mask"]
    assert set(doc["resolutions_A"]) == {"unmasked", "masked", "randomized", "corrected"}


def test_gold_standard_bad_input():
    a = blobs(16)
    with pytest.raises(InputError):
        gold_standard_fsc(a, blobs(18), 1.0)
    with pytest.raises(InputError):
        gold_standard_fsc(a, a, 1.0, mask=2 * spherical_mask(16, 5))
    with pytest.raises(InputError):
        gold_standard_fsc(a, a, 1.0, mask=spherical_mask(18, 5))
    with pytest.raises(InputError):
        gold_standard_fsc(a, a, -1.0)
    bad = a.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError):
        gold_standard_fsc(a, bad, 1.0)


# --------------------------------------------------------------------------------------------
# combined map
# --------------------------------------------------------------------------------------------


def test_fsc_weights():
    w = fsc_weights([1.0, 0.5, 0.143, -0.2, 0.3, 0.00001, 0.4])
    # zero from the first shell below 1e-4 on, even where the curve rises again
    expect = [1.0, math.sqrt(2 / 3), math.sqrt(0.286 / 1.143), 0.0, 0.0, 0.0, 0.0]
    assert np.allclose(w.numpy(), expect)
    w = fsc_weights([1.0, 0.3, 0.2])
    assert np.allclose(w.numpy(), [1.0, math.sqrt(0.6 / 1.3), math.sqrt(0.4 / 1.2)])


def test_combine_halves_weights_each_shell(device):
    D = 16
    g = torch.Generator().manual_seed(9)
    h1 = torch.randn(D, D, D, generator=g).to(device)
    h2 = torch.randn(D, D, D, generator=g).to(device)
    curve = torch.linspace(1.0, 0.05, D // 2 + 1)
    out = combine_halves(h1, h2, curve.to(device))
    assert out.device == h1.device and out.dtype == torch.float32
    # brute force with numpy's FFT: uncentred grid, shells from fftfreq
    F = 0.5 * (
        np.fft.fftn(np.fft.ifftshift(h1.cpu().double().numpy()))
        + np.fft.fftn(np.fft.ifftshift(h2.cpu().double().numpy()))
    )
    f = np.fft.fftfreq(D, 1.0 / D)
    kz, ky, kx = np.meshgrid(f, f, f, indexing="ij")
    n = np.rint(np.sqrt(kx**2 + ky**2 + kz**2)).astype(int)
    c = curve.double().numpy()
    w = np.sqrt(2 * c / (1 + c))
    wmap = np.where(n <= D // 2, w[np.minimum(n, D // 2)], 0.0)
    expect = np.fft.fftshift(np.fft.ifftn(F * wmap).real)
    assert np.allclose(out.cpu().numpy(), expect, atol=1e-5)
    # FSC 1 everywhere: the plain average, band-limited to the Nyquist sphere
    avg = combine_halves(h1, h2, torch.ones(D // 2 + 1))
    _, c_avg = fsc(avg.cpu(), (0.5 * (h1 + h2)).cpu(), 1.0)
    assert torch.allclose(c_avg, torch.ones_like(c_avg), atol=1e-6)
    with pytest.raises(InputError):
        combine_halves(h1, h2, torch.ones(D // 2))


# --------------------------------------------------------------------------------------------
# against relion_postprocess
# --------------------------------------------------------------------------------------------

RELION_COLUMNS = {
    "unmasked": "rlnFourierShellCorrelationUnmaskedMaps",
    "masked": "rlnFourierShellCorrelationMaskedMaps",
    "randomized": "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
    "corrected": "rlnFourierShellCorrelationCorrected",
}


@pytest.mark.skipif(
    shutil.which("relion_postprocess") is None, reason="relion_postprocess not installed"
)
def test_curves_match_relion_postprocess(tmp_path):
    """Simulated GroEL-GroES at 9 Å/voxel (box 32), two halves with independent white noise,
    our automatic mask: RELION's FSC curves from the same files.

    Tolerances: unmasked and masked 0.02 (RELION sums over the half spectrum, counting the
    kx = 0 plane twice as often as the rest), and so are the randomised curve below the
    randomisation shell and the corrected one below it + 2; beyond, 0.15 (different random
    phases: the residual is noise of the phase-randomised FSC, about 1 / sqrt(shell size));
    the randomisation shell exactly.
    """
    import starfile

    from cryorecon.simulate import density_from_model

    D, apix = 32, 9.0
    vol = density_from_model(D=D, apix=apix, bfactor=500.0)
    h1, h2 = noisy_halves(vol, 0.4 * float(vol.std()), seed=11)
    res = gold_standard_fsc(h1, h2, apix, mask_options={"extend_A": apix, "soft_edge_A": 3 * apix})
    mask = res.mask_map  # the automatic mask, made from the average of the halves
    write_map(tmp_path / "run_half1.mrc", h1.numpy(), apix)
    write_map(tmp_path / "run_half2.mrc", h2.numpy(), apix)
    write_map(tmp_path / "mask.mrc", mask.numpy(), apix)
    cmd = [
        "relion_postprocess",
        "--i",
        tmp_path / "run_half1.mrc",
        "--i2",
        tmp_path / "run_half2.mrc",
        "--mask",
        tmp_path / "mask.mrc",
        "--angpix",
        apix,
        "--o",
        tmp_path / "postprocess",
    ]
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert (tmp_path / "postprocess.star").is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    star = starfile.read(tmp_path / "postprocess.star")
    table, general = star["fsc"], star["general"]
    assert np.allclose(table["rlnResolution"].to_numpy()[1:], res.freq.numpy()[1:], atol=1e-6)
    rel_shell = int(round(D * apix / float(general["rlnRandomiseFrom"])))
    assert rel_shell == res.randomize_shell
    s = res.randomize_shell
    ours = {
        "unmasked": res.fsc_unmasked,
        "masked": res.fsc_masked,
        "randomized": res.fsc_randomized,
        "corrected": res.fsc_corrected,
    }
    for name, col in RELION_COLUMNS.items():
        theirs = table[col].to_numpy()[1:]
        mine = ours[name].numpy()[1:]
        tol = 0.02 if name in ("unmasked", "masked") else 0.15
        assert np.abs(theirs - mine).max() < tol, (name, np.round(theirs, 3), np.round(mine, 3))
        # shells 1 .. n - 1 (index j - 1 here) where the curves do not depend on the random
        # phases: below the randomisation shell s for the randomised FSC; below s + 2 for the
        # corrected one, which is the masked FSC there
        n = s if name == "randomized" else s + 2
        assert np.abs(theirs[: n - 1] - mine[: n - 1]).max() < 0.02, name
    # RELION reports the last shell at or above 0.143; ours interpolates into the next shell
    rel_res = float(general["rlnFinalResolution"])
    i = int(round(D * apix / rel_res))
    assert D * apix / (i + 1) - 1e-6 <= res.resolution_A <= rel_res + 1e-6


# --------------------------------------------------------------------------------------------
# cryorecon postprocess
# --------------------------------------------------------------------------------------------


def test_postprocess_command(tmp_path, capsys, monkeypatch):
    from cryorecon import cli
    from cryorecon.io.mrc import read_map

    monkeypatch.setattr(cli, "COMMANDS", ["postprocess"])
    D, apix = 24, 2.0
    vol = blobs(D, seed=6, n=12)
    h1, h2 = noisy_halves(vol, 0.02)
    run = tmp_path / "run"
    write_map(run / "volume_half1.mrc", h1.numpy(), apix)
    write_map(run / "volume_half2.mrc", h2.numpy(), apix)
    opts = ["--extend", "2", "--soft-edge", "6"]
    assert cli.main(["postprocess", str(run), *opts]) == 0
    out = capsys.readouterr().out
    expect = gold_standard_fsc(h1, h2, apix, mask_options={"extend_A": 2.0, "soft_edge_A": 6.0})
    assert f"{expect.resolution_A:.2f} Å" in out
    doc = json.loads((run / "postprocess.json").read_text())
    assert doc["gold_standard_resolution_A"] == pytest.approx(expect.resolution_A)
    assert doc["gold_standard"]["mask"]["how"] == "auto"
    assert np.allclose(doc["gold_standard"]["fsc_corrected"], expect.fsc_corrected, atol=1e-6)
    combined, apix_out = read_map(run / "postprocess.mrc")
    assert apix_out == pytest.approx(apix)
    assert np.allclose(combined, combine_halves(h1, h2, expect.fsc_corrected).numpy(), atol=1e-5)
    mask, _ = read_map(run / "postprocess_mask.mrc")
    assert np.allclose(mask, expect.mask_map.numpy())
    assert (run / "postprocess.png").read_bytes()[:4] == b"\x89PNG"

    # two maps and a given mask; existing outputs are kept unless --force
    prefix = tmp_path / "out" / "pp"
    write_map(tmp_path / "mask.mrc", mask, apix)
    args = [
        "postprocess",
        str(run / "volume_half1.mrc"),
        str(run / "volume_half2.mrc"),
        "--mask",
        str(tmp_path / "mask.mrc"),
        "-o",
        str(prefix),
    ]
    assert cli.main(args) == 0
    doc2 = json.loads(prefix.with_suffix(".json").read_text())
    assert doc2["gold_standard"]["mask"]["how"] == "given"
    assert doc2["gold_standard_resolution_A"] == pytest.approx(expect.resolution_A)
    assert not (tmp_path / "out" / "pp_mask.mrc").exists()
    capsys.readouterr()
    assert cli.main(args) == 3
    assert cli.main(args + ["--force"]) == 0

    # bad input: one line, exit 2
    write_map(tmp_path / "small.mrc", np.zeros((16, 16, 16), np.float32), apix)
    capsys.readouterr()
    assert (
        cli.main(
            [
                "postprocess",
                str(run / "volume_half1.mrc"),
                str(tmp_path / "small.mrc"),
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "box sizes differ" in capsys.readouterr().err
    assert cli.main(["postprocess", str(tmp_path)]) == 2  # a folder without half maps
    assert "volume_half1.mrc" in capsys.readouterr().err
    assert (
        cli.main(["postprocess", str(run), "-o", str(tmp_path / "y"), "--threshold", "1e6"]) == 2
    )  # empty mask
    assert "empty" in capsys.readouterr().err


def test_postprocess_of_a_run_reads_its_back_projections_and_cut_off(tmp_path, capsys, monkeypatch):
    """A run folder with back-projected halves: postprocess uses them (not the refined
    halves) and caps the resolution at run.json's refined_to_A; --refined-to overrides."""
    from cryorecon import cli

    monkeypatch.setattr(cli, "COMMANDS", ["postprocess"])
    D, apix = 24, 2.0
    vol = blobs(D, seed=6, n=12)
    h1, h2 = noisy_halves(vol, 0.02)
    run = tmp_path / "run"
    write_map(run / "backprojection_half1.mrc", h1.numpy(), apix)
    write_map(run / "backprojection_half2.mrc", h2.numpy(), apix)
    write_map(run / "volume_half1.mrc", vol.numpy(), apix)  # identical: FSC 1 everywhere
    write_map(run / "volume_half2.mrc", vol.numpy(), apix)
    free = gold_standard_fsc(h1, h2, apix)
    cut = round(free.resolution_A * 1.5, 3)
    (run / "run.json").write_text(json.dumps({"gold_standard": {"refined_to_A": cut}}))
    assert cli.main(["postprocess", str(run)]) == 0
    doc = json.loads((run / "postprocess.json").read_text())
    assert doc["inputs"]["half1"].endswith("backprojection_half1.mrc")
    assert doc["gold_standard_resolution_A"] == pytest.approx(cut)
    assert doc["gold_standard"]["resolution_measured_A"] == pytest.approx(free.resolution_A)
    assert "refined to" in capsys.readouterr().out
    assert cli.main(["postprocess", str(run), "--force", "--refined-to", str(2 * apix)]) == 0
    doc = json.loads((run / "postprocess.json").read_text())
    assert doc["gold_standard_resolution_A"] == pytest.approx(free.resolution_A)


def test_half_map_outputs_for_the_driver():
    from cryorecon.gold_standard import half_map_outputs

    D, apix = 24, 2.0
    h1, h2 = noisy_halves(blobs(D, seed=6, n=12), 0.02)
    out = half_map_outputs(h1, h2, apix, seed=4, mask_options={"extend_A": 2.0})
    ref = gold_standard_fsc(h1, h2, apix, seed=4, mask_options={"extend_A": 2.0})
    assert torch.allclose(out.result.fsc_corrected, ref.fsc_corrected)
    assert torch.allclose(out.combined, combine_halves(h1, h2, ref.fsc_corrected))
    doc = json.loads(json.dumps(out.run_json))
    assert set(doc) == {"gold_standard", "gold_standard_resolution_A"}
    assert doc["gold_standard_resolution_A"] == pytest.approx(ref.resolution_A)
    assert doc["gold_standard"]["mask"]["extend_A"] == 2.0


def test_resolution_no_finer_than_the_cutoff_the_halves_were_refined_to():
    """Halves that share everything (the same map: FSC 1 to Nyquist) but were refined only to
    12 Å: the stated resolution is 12 Å (the measured one stays recorded) and a warning says
    why. A cut-off finer than what the FSC supports changes nothing."""
    from cryorecon.gold_standard import half_map_outputs

    D, apix = 24, 2.0
    vol = blobs(D, seed=6, n=12)
    h1, h2 = vol, vol + 1e-4 * torch.randn(vol.shape, generator=torch.Generator().manual_seed(2))
    free = gold_standard_fsc(h1, h2, apix, seed=4)
    assert free.resolution_A < 5.0 and free.refined_to_A is None
    out = half_map_outputs(h1, h2, apix, seed=4, refined_to_A=12.0)
    res = out.result
    assert res.resolution_A == 12.0
    assert res.resolution_measured_A == pytest.approx(free.resolution_A)
    assert any("refined to" in w for w in res.warnings)
    assert torch.equal(res.fsc_corrected, free.fsc_corrected)  # the curve is not altered
    # the combination is weighted by the measured curve, as without a cut-off
    assert torch.allclose(out.combined, combine_halves(h1, h2, free.fsc_corrected))
    doc = json.loads(json.dumps(out.run_json))
    assert doc["gold_standard_resolution_A"] == 12.0
    assert doc["gold_standard"]["refined_to_A"] == 12.0
    assert doc["gold_standard"]["resolution_measured_A"] == pytest.approx(free.resolution_A)

    noisy1, noisy2 = noisy_halves(vol, 0.05)
    coarse = gold_standard_fsc(noisy1, noisy2, apix, seed=4)
    capped = gold_standard_fsc(noisy1, noisy2, apix, seed=4, refined_to_A=2 * apix)
    assert capped.resolution_A == coarse.resolution_A > 2 * apix
    with pytest.raises(InputError):
        gold_standard_fsc(h1, h2, apix, refined_to_A=-1.0)
