"""The run report: a self-contained HTML page built from a (fake) run folder, robust to
missing files, rebuilt by ``cryorecon report``, and rendered by headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from cryorecon.cli import main
from cryorecon.io.mrc import write_map
from cryorecon.report import data as rdata
from cryorecon.report import plots, write_report

SECTION_TITLES = [
    "Summary",
    "Convergence",
    "Current map",
    "Progress over time",
    "FSC against a reference",
    "View directions",
    "Run parameters, versions, timings and machine",
    "Files",
]


def blob_volume(D: int, seed: int = 0, n: int = 24) -> np.ndarray:
    """A protein-like positive density: a few Gaussian blobs near the centre plus noise."""
    rng = np.random.default_rng(seed)
    g = np.arange(D, dtype=np.float32) - D // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    V = np.zeros((D, D, D), np.float32)
    for _ in range(n):
        c = rng.normal(size=3) * D / 9
        s = rng.uniform(0.04, 0.07) * D
        V += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    V += 0.02 * rng.standard_normal(V.shape).astype(np.float32)
    return np.maximum(V, 0)


def make_fake_run(
    root: Path,
    D: int = 64,
    iterations: int = 3000,
    finished: bool = True,
    apix: float = 5.6,
    n_particles: int = 5000,
    snapshot_every: int = 500,
) -> Path:
    """A run folder with everything ``cryorecon reconstruct`` writes, made without running one."""
    out = root / "run"
    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    seconds = 0.0
    with open(out / "metrics.jsonl", "w") as fh:
        for it in range(1, iterations + 1):
            omega = min(0.11, 0.02 + 0.005 * (it // 150))
            seconds += 0.5 + 0.05 * rng.random()
            coeffs = int(3.1 * (omega * D * apix) ** 2 * 10)
            base = 1000 + 40 * coeffs / 100
            frac = max(1e-4, math.exp(-it / 400))
            rec = {
                "iteration": it,
                "seconds": round(seconds, 3),
                "omega_star": omega,
                "resolution_A": 1 / omega,
                "epsilon": max(1 / 16, 2.0 ** (1 - it // 150)),
                "L": 1e3 * 2 ** (-it / 150) * (1 + (it // 20) % 3),
                "line_search_doublings": int(it % 20 == 0 and it % 60 == 0),
                "train_nll": base + 300 * math.exp(-it / 300) + 20 * rng.standard_normal(),
                "heldout_nll": (base + 300 * math.exp(-it / 300) + 5) if it % 10 == 0 else None,
                "minibatch": 200,
                "poses_evaluated": int(200 * 5000 * frac),
                "poses_full": 200 * 5000,
                "coefficients": coeffs,
                "epoch": round(it / 24, 3),
                "kl_directions": 2 * (1 - frac),
                "is_check_rel_error": 10.0 ** (-2 - it / 500) if it % 10 == 0 else None,
            }
            fh.write(json.dumps(rec) + "\n")
    final = blob_volume(D, seed=0)
    write_map(out / "initial.mrc", blob_volume(D, seed=5, n=6), apix)
    for it in range(snapshot_every, iterations + 1, snapshot_every):
        w = it / iterations
        vol = w * final + (1 - w) * blob_volume(D, seed=5, n=6)
        write_map(out / "snapshots" / f"volume_{it:06d}.mrc", vol, apix)
    write_map(out / "volume.mrc", final, apix)
    # view directions: an equatorial belt (as paper Fig. 10), a quarter not visited yet
    v = rng.standard_normal((n_particles, 3))
    v[:, 2] *= 0.3
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[rng.random(n_particles) < 0.25] = np.nan
    np.savez(out / "poses.npz", directions=v)
    info = {
        "finished": finished,
        "stop_reason": "converged" if finished else None,
        "iterations": iterations,
        "seconds": seconds,
        "config": {
            "minibatch": 200,
            "prior": "exponential",
            "seed": 0,
            "max_iters": 5000,
            "checkpoint_every": 25,
            "snapshot_every": snapshot_every,
            "device": "cpu",
        },
        "particles": "/data/particles.star",
        "n_particles": n_particles,
        "n_heldout": 200,
        "n_minibatches": 24,
        "box": D,
        "apix": apix,
        "diameter_A": 0.8 * D * apix,
        "shift_sigma_A": 0.05 * D * apix,
        "versions": {"cryorecon": "0.1.0", "torch": "2.13.0", "python": "3.11"},
        "machine": {
            "platform": "Linux-test",
            "processor": "x86_64",
            "cpus": 2,
            "torch_threads": 2,
            "cuda": None,
        },
    }
    (out / "run.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(fake_run) -> tuple[Path, float]:
    t0 = time.perf_counter()
    path = write_report(fake_run)
    return path, time.perf_counter() - t0


def _check_self_contained(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I), (
        "external reference"
    )
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    for src in re.findall(r"""src\s*=\s*["']([^"']*)["']""", text):
        assert src.startswith("data:image/png;base64,"), src[:60]


def test_report_is_self_contained_with_all_sections(fake_run, report):
    path, seconds = report
    assert path == fake_run / "report.html"
    text = path.read_text(encoding="utf-8")
    _check_self_contained(text)
    for title in SECTION_TITLES:
        assert f">{title}</h2>" in text, title
    # figures: convergence, slices, isosurface, snapshots, view directions
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 5
    assert 'class="error"' not in text and 'class="missing"' not in text
    assert "finished (converged)" in text
    assert 'http-equiv="refresh"' not in text  # a finished run does not reload
    visited = int(np.isfinite(np.load(fake_run / "poses.npz")["directions"]).all(axis=1).sum())
    assert 0 < visited < 5000
    assert f"{visited} of 5000 particles" in text
    assert not list(fake_run.glob(".report.html.tmp*"))
    assert seconds < 30, f"report took {seconds:.1f} s"


def test_report_survives_an_empty_and_a_young_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report(empty).read_text()
    _check_self_contained(text)
    assert text.count('class="missing"') >= 4
    assert 'class="error"' not in text

    # early in a run: run.json and a few metric lines (the last one half written), no maps yet
    young = tmp_path / "young"
    young.mkdir()
    (young / "run.json").write_text(
        json.dumps({"finished": False, "iterations": 0, "config": {}, "box": 32, "apix": 2.0})
    )
    lines = [
        json.dumps(
            {
                "iteration": i,
                "seconds": i * 0.1,
                "omega_star": 0.02,
                "resolution_A": 50.0,
                "epsilon": 2.0,
                "L": 10.0,
                "train_nll": 5.0 - 0.1 * i,
                "heldout_nll": None,
                "poses_evaluated": 10,
                "poses_full": 10,
            }
        )
        for i in range(1, 4)
    ]
    (young / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 4, "sec')
    from cryorecon.runstate import RunLock

    lock = RunLock(young)  # a live run holds its folder's lock
    text = write_report(young).read_text()
    lock.release()
    assert 'class="error"' not in text
    assert 'http-equiv="refresh"' in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 1  # convergence only
    m = rdata.read_metrics(young)
    assert len(m) == 3 and m.get("heldout_nll") is None


def test_report_fsc_against_reference(tmp_path):
    run = make_fake_run(tmp_path, D=32, iterations=200, snapshot_every=100, n_particles=300)
    ref = tmp_path / "ref.mrc"
    vol, apix = rdata.read_map_quiet(run / "volume.mrc")
    write_map(ref, vol, apix)
    out = write_report(run, reference=ref, out=tmp_path / "r.html")
    text = out.read_text()
    assert 'class="error"' not in text
    assert "assuming the map is already aligned" in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 6
    # identical maps: FSC 1 everywhere -> Nyquist resolution (2 apix)
    assert f"{2 * apix:.2f} Å" in text


def test_report_fsc_with_alignment_finds_the_hand(tmp_path, monkeypatch):
    import cryorecon.validate as validate

    real_align = validate.align
    monkeypatch.setattr(
        validate, "align", lambda ref, mov, **kw: real_align(ref, mov, **kw, n_global=300)
    )
    run = make_fake_run(tmp_path, D=24, iterations=100, snapshot_every=50, n_particles=200)
    vol, apix = rdata.read_map_quiet(run / "volume.mrc")
    ref = tmp_path / "mirror.mrc"
    write_map(ref, np.roll(vol[::-1], 1, axis=0), apix)  # mirrored z -> -z about the centre D//2
    text = write_report(run, reference=ref, align=True).read_text()
    assert 'class="error"' not in text
    assert "aligned to the reference first" in text and "hand <b>flipped</b>" in text
    assert f"<td>FSC 0.5</td><td>{2 * apix:.2f} Å" in text


def test_report_command(tmp_path, capsys):
    run = make_fake_run(
        tmp_path, D=32, iterations=100, snapshot_every=50, n_particles=200, finished=False
    )
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run / 'report.html'}" in out and "KiB" in out
    ref = tmp_path / "small.mrc"
    write_map(ref, np.zeros((16, 16, 16), np.float32), 5.6)
    assert (
        main(["report", str(run), "--reference", str(ref)]) == 2
    )  # box differs: clear input error
    assert "box sizes differ" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(run), "--align"]) == 2  # --align needs --reference
    alt = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run), "-o", str(alt), "--level", "0.5"]) == 0
    assert alt.is_file() and "(set by the user)" in alt.read_text()


def test_direction_histogram_is_equal_area():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((400_000, 3))
    az, el, rel, n = plots.direction_histogram(v)
    assert n == len(v) and rel.shape == (len(el) - 1, len(az) - 1)
    assert abs(rel.mean() - 1) < 1e-9
    # uniform directions fill every equal-area cell about equally, poles included
    assert 0.55 < rel.min() and rel.max() < 1.45  # Poisson: ~154 per cell
    assert abs(rel[0].mean() - 1) < 0.05 and abs(rel[len(rel) // 2].mean() - 1) < 0.05


def test_surface_level_encloses_the_requested_volume():
    vol = blob_volume(48)
    d = 0.8 * 48
    level = plots.surface_level(vol, d, fraction=0.2)
    enclosed = (vol > level).sum()
    assert abs(enclosed - 0.2 * math.pi * d**3 / 6) / enclosed < 0.05
    assert plots.surface_level(np.ones((8, 8, 8), np.float32)) is None
    tris = plots.surface(vol, level)
    assert tris is not None and tris.shape[1:] == (3, 3)
    assert np.abs(tris).max() <= 24  # positions about the box centre, inside the box


# ------------------------------------------------------------------------------------------------
# headless Chromium: the page renders, and its figures are visible
# ------------------------------------------------------------------------------------------------


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.access(path, os.X_OK):
            return path
    return None


def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "chromium not installed (Debian: apt-get install chromium; CI runs "
            ".ci/install-chromium.sh)"
        )
    path, _ = report
    shot = tmp_path / "shot.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1400,4000",
        path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot; chromium said:\n{proc.stdout}\n{proc.stderr}"
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))[..., :3]
    assert img.shape[0] >= 3000 and img.shape[1] >= 1000, img.shape
    rgb = np.round(img * 255).astype(np.uint8)
    non_white = (rgb < 235).any(axis=-1).mean()
    assert non_white > 0.15, f"page mostly blank ({non_white:.1%} non-white)"
    # the figures bring many distinct, saturated colours (colour maps, coloured curves, shaded
    # surfaces)
    sat = rgb.max(axis=-1).astype(int) - rgb.min(axis=-1).astype(int)
    colourful = rgb[sat > 60]
    assert len(colourful) > 0.03 * rgb.shape[0] * rgb.shape[1], (
        "hardly any coloured pixels: plots missing?"
    )
    distinct = len(np.unique(colourful // 16, axis=0))
    assert distinct > 150, f"only {distinct} distinct colours"
    # every figure region: the images fill rows across the page, not just the top banner
    rows_with_colour = (sat > 60).any(axis=1)
    assert rows_with_colour[1000:].mean() > 0.25  # an empty report: ~0.02


def test_refresh_report_never_raises(tmp_path, monkeypatch):
    from cryorecon.report import html, refresh_report

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(html, "build_html", boom)
    assert refresh_report(tmp_path) is None


# ------------------------------------------------------------------------------------------------
# half-map (gold-standard) FSC panel
# ------------------------------------------------------------------------------------------------


def _add_gold_standard(run: Path) -> dict:
    """Half maps of the fake run's volume with independent noise, their gold-standard FSC in
    run.json as the driver stores it."""
    import torch

    from cryorecon.gold_standard import gold_standard_fsc

    vol, apix = rdata.read_map_quiet(run / "volume.mrc")
    rng = np.random.default_rng(3)
    halves = [vol + 0.05 * rng.standard_normal(vol.shape).astype(np.float32) for _ in range(2)]
    for i, h in enumerate(halves, 1):
        write_map(run / f"volume_half{i}.mrc", h, apix)
    res = gold_standard_fsc(
        torch.from_numpy(halves[0]),
        torch.from_numpy(halves[1]),
        apix,
        mask_options={"lowpass_A": 4 * apix, "extend_A": apix, "soft_edge_A": 3 * apix},
        refined_to_A=2.5 * apix,
    )
    info = json.loads((run / "run.json").read_text())
    info["gold_standard"] = res.to_json()
    info["gold_standard_resolution_A"] = res.resolution_A
    (run / "run.json").write_text(json.dumps(info))
    return info


def test_report_half_map_panel(tmp_path):
    run = make_fake_run(tmp_path, D=32, iterations=100, snapshot_every=50, n_particles=200)
    before = write_report(run, out=tmp_path / "before.html").read_text()
    assert "Half-map FSC" not in before and "gold-standard" not in before
    n_before = len(re.findall(r'src="data:image/png;base64,', before))

    info = _add_gold_standard(run)
    text = write_report(run).read_text()
    _check_self_contained(text)
    assert 'class="error"' not in text
    assert '<section id="halfmaps"><h2>Half-map FSC</h2>' in text and 'href="#halfmaps"' in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == n_before + 1
    res = info["gold_standard_resolution_A"]
    assert f"{res:.2f} Å" in text  # in the summary card and the panel's table
    assert "gold-standard resolution (half maps, FSC 0.143)" in text
    assert info["gold_standard"]["mask"]["description"] in text.replace("&#x27;", "'")
    assert f"{info['gold_standard']['randomize_at_A']:.1f} Å" in text
    assert "halves refined to" in text and f"{info['gold_standard']['refined_to_A']:.2f} Å" in text
    measured = info["gold_standard"]["resolution_measured_A"]
    assert f"as measured</td><td>{measured:.2f} Å" in text.replace("\n", "")
    # the panel comes before the reference FSC section, after the map
    assert text.index('id="map"') < text.index('id="halfmaps"') < text.index('id="fsc"')

    gs = rdata.read_gold_standard(info)
    assert gs is not None and gs.resolution_A == pytest.approx(res)
    assert np.allclose(gs.corrected, info["gold_standard"]["fsc_corrected"])

    # a damaged entry: a note in its section, the rest of the report unharmed
    info["gold_standard"]["fsc_masked"] = info["gold_standard"]["fsc_masked"][:-1]
    (run / "run.json").write_text(json.dumps(info))
    assert rdata.read_gold_standard(info) is None
    text = write_report(run).read_text()
    assert "its FSC curves cannot be read" in text and 'class="error"' not in text


def test_halfmap_fsc_plot_is_a_png():
    freq = np.linspace(0, 0.25, 17)
    c = np.clip(1.2 - 6 * freq, -0.05, 1)
    png = plots.plot_halfmap_fsc(
        freq,
        {
            "unmasked": c * 0.9,
            "masked": c,
            "corrected": c * 0.98,
            "randomized": np.where(freq < 0.05, c, 0.01),
        },
        resolution_A=6.5,
        randomize_at_A=20.0,
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# ------------------------------------------------------------------------------------------------
# several classes (--classes K): a panel per class
# ------------------------------------------------------------------------------------------------


def _add_classes(run: Path, final: list[float], counts: list[int] | None = None) -> None:
    """Make the fake run a K-class run: ``volume_class00N.mrc`` (distinct blob maps), each
    metrics line's ``class_fractions`` going from 1/K to ``final``, ``classes`` in run.json
    and, with ``counts``, a ``particles.star`` whose ``rlnClassNumber`` gives class N
    ``counts[N - 1]`` particles."""
    import pandas as pd
    import starfile

    K = len(final)
    _, apix = rdata.read_map_quiet(run / "volume.mrc")
    D = rdata.read_map_quiet(run / "volume.mrc")[0].shape[0]
    for j in range(1, K + 1):
        write_map(run / f"volume_class{j:03d}.mrc", blob_volume(D, seed=10 + j, n=8), apix)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        w = (i + 1) / len(lines)
        rec = json.loads(line)
        rec["class_fractions"] = [(1 - w) / K + w * f for f in final]
        rec["class_similarity"] = 1 - w
        out.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(out) + "\n")
    info = json.loads((run / "run.json").read_text())
    info["classes"] = K
    (run / "run.json").write_text(json.dumps(info))
    if counts is not None:
        numbers = np.repeat(np.arange(1, K + 1), counts)
        names = [f"{i + 1}@stack.mrcs" for i in range(len(numbers))]
        df = pd.DataFrame({"rlnImageName": names, "rlnClassNumber": numbers})
        starfile.write({"particles": df}, run / "particles.star")


def _class_panels(text: str) -> list[str]:
    section = text[text.index('<section id="classes">') :]
    section = section[: section.index("</section>")]
    return section.split('<div class="class-panel">')[1:]


def _n_images(text: str) -> int:
    return len(re.findall(r'src="data:image/png;base64,', text))


def test_report_has_a_panel_per_class(tmp_path):
    run = make_fake_run(tmp_path, D=24, iterations=60, snapshot_every=30, n_particles=100)
    n_single = _n_images(write_report(run, out=tmp_path / "single.html").read_text())
    final, counts = [0.25, 0.6, 0.15], [26, 59, 15]
    _add_classes(run, final, counts)
    text = write_report(run).read_text()
    _check_self_contained(text)
    assert 'class="error"' not in text and 'class="missing"' not in text
    assert '<section id="classes"><h2>Classes</h2>' in text and 'href="#classes"' in text
    assert text.index('id="map"') < text.index('id="classes"') < text.index('id="snapshots"')
    assert 'alt="class fractions"' in text
    assert _n_images(text) == n_single + 1 + 2 * len(final)
    panels = _class_panels(text)
    assert len(panels) == len(final)
    for j, (panel, f, n) in enumerate(zip(panels, final, counts), 1):
        assert f"Class {j}: <code>volume_class{j:03d}.mrc</code>" in panel
        assert f"{f:.1%} of the particles" in panel
        assert f"{n} particles assigned" in panel
        assert f'alt="central slices of class {j}"' in panel
        assert f'alt="isosurface of class {j}"' in panel
        assert ("most populated" in panel) == (j == 2)
    assert "25.0%" in panels[0] and "60.0%" in panels[1] and "15.0%" in panels[2]

    m = rdata.read_metrics(run)
    assert m.class_fractions.shape == (60, 3)
    np.testing.assert_allclose(m.class_fractions[0], np.array(final) / 60 + 59 / 60 / 3)
    np.testing.assert_allclose(m.class_fractions[-1], final)
    assert m.last("class_similarity") == pytest.approx(0.0)


def test_report_class_maps_missing_or_unreadable(tmp_path):
    run = make_fake_run(tmp_path, D=24, iterations=40, snapshot_every=20, n_particles=100)
    _add_classes(run, [0.5, 0.3, 0.2])  # no particles.star: no particle counts
    (run / "volume_class002.mrc").unlink()
    (run / "volume_class003.mrc").write_bytes(b"not an MRC file")
    text = write_report(run).read_text()
    assert 'class="error"' not in text
    panels = _class_panels(text)
    assert len(panels) == 3
    assert 'class="missing"' not in panels[0] and "50.0%" in panels[0]
    assert "volume_class002.mrc not written yet" in panels[1] and "30.0%" in panels[1]
    assert "volume_class003.mrc could not be read" in panels[2] and "20.0%" in panels[2]
    assert "particles assigned" not in text
    assert "<img" not in panels[1] and "<img" not in panels[2]
    assert "<img" in panels[0]

    classes = rdata.read_classes(run, rdata.read_run_info(run), rdata.read_metrics(run))
    assert [(c.number, c.exists, c.volume is None) for c in classes] == [
        (1, True, False),
        (2, False, True),
        (3, True, True),
    ]


def test_report_of_one_class_has_no_classes_section(tmp_path):
    run = make_fake_run(tmp_path, D=24, iterations=40, snapshot_every=20, n_particles=100)
    info = json.loads((run / "run.json").read_text())
    info.update(classes=1, class_fractions=None)  # as reconstruct writes it for K = 1
    (run / "run.json").write_text(json.dumps(info))
    text = write_report(run).read_text()
    assert 'id="classes"' not in text and ">Classes</h2>" not in text
    assert '<div class="class-panel">' not in text and 'alt="class fractions"' not in text
    assert rdata.read_classes(run, info, rdata.read_metrics(run)) is None
    assert rdata.read_metrics(run).class_fractions is None


def test_class_fraction_plot():
    m = rdata.Metrics(
        records=3,
        columns={"iteration": np.array([1.0, 2.0, 3.0]), "seconds": np.array([1.0, 2.0, 3.5])},
        class_fractions=np.array([[0.5, 0.5], [0.6, 0.4], [np.nan, np.nan]]),
    )
    png = plots.plot_class_fractions(m)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    m.class_fractions = None
    assert plots.plot_class_fractions(m) is None
