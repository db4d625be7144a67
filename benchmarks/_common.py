"""Shared helpers of the benchmarks: mostly those of `robustness.py` (paper Fig. 12) and
`priors.py` (paper Fig. 13); :func:`resume_copy` serves the importance-sampling ones.

Both benchmarks use the dataset and reconstruction settings of ``cryorecon demo`` (default
mode): GroEL-GroES (built-in 1AON), 2,000 particles, box 32 at 10 Å/pixel (Nyquist 20 Å),
SNR 0.1, defocus 1-3 µm, simulated with seed 0; omega* 1/50 -> 1/28 Å, pose grid x3 coarser,
minibatches of 100, 100 held-out particles, patience 3, at most 500 iterations / 6 minutes
(:data:`cryorecon.commands.demo.DEFAULT`). One difference: the HTML run report is not
rendered (``report_every=None``), which only saves time.

Reconstructions run in this process (``cryorecon.reconstruct.reconstruct``); wall time by
``time.perf_counter`` and CPU time (user + system, all threads) by ``getrusage`` around the
call. A finished run folder whose ``bench.json`` records the same configuration is reused
(its recorded times are reported) unless ``fresh``; so an interrupted benchmark can be
rerun cheaply. The commit of the code that ran each reconstruction is recorded with it
(``code``; ``None`` for runs made before this was recorded) -- rerun with ``--fresh`` after
engine changes. Note that a run stopped by ``max_time`` (6 min) is not reproducible: that
cap only bites on a heavily loaded machine, and the stop reason is recorded.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA_SEED = 0


def demo_settings():
    from cryorecon.commands.demo import DEFAULT

    return DEFAULT


def quiet() -> None:
    """Silence cryorecon's progress bars and INFO logs (the benchmarks print their own progress)."""
    from cryorecon.progress import configure

    configure(quiet=True)


def code_version() -> dict:
    """Commit of the checkout and whether ``src/`` differs from it (read-only git calls)."""

    def git(*a):
        try:
            return subprocess.run(
                ["git", "-C", str(HERE.parent), *a], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "src_modified": bool(git("status", "--porcelain", "--", "src")),
    }


def machine_info() -> dict:
    return {
        "code": code_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ensure_dataset(work: Path, seed: int = DATA_SEED) -> tuple[Path, dict]:
    """Simulate the demo dataset into ``work/data`` unless it is already there (same settings).

    Returns ``(data folder, info)`` with ``info`` = dataset description + simulation seconds
    (``None`` when reused).
    """
    from cryorecon.simulate import run_simulation

    s = demo_settings()
    data = work / "data"
    want = {"n": s.n, "box": s.box, "apix": s.apix, "snr": s.snr, "seed": seed}
    info = {
        "structure": "GroEL-GroES (PDB 1AON, built in)",
        **want,
        "nyquist_A": 2 * s.apix,
        "defocus_um": [1.0, 3.0],
        "folder": str(data),
    }
    meta = data / "simulation.json"
    if meta.exists() and (data / "particles.star").exists():
        have = json.loads(meta.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            print(f"dataset: reusing {data}", flush=True)
            return data, {**info, "simulate_seconds": None}
    print(
        f"dataset: simulating {s.n} particles, box {s.box} at {s.apix:g} Å/px, SNR {s.snr:g} -> "
        f"{data}",
        flush=True,
    )
    t = time.perf_counter()
    run_simulation(data, n=s.n, D=s.box, apix=s.apix, snr=s.snr, seed=seed, force=True)
    return data, {**info, "simulate_seconds": round(time.perf_counter() - t, 2)}


def open_dataset(work: Path, seed: int = DATA_SEED):
    """:func:`ensure_dataset`, then read it: ``(info, particles, truth (D, D, D) tensor, apix)``."""
    from cryorecon.io.particles import read_particles

    data, info = ensure_dataset(work, seed)
    truth, apix = load_map(data / "truth.mrc")
    return info, read_particles(data / "particles.star"), truth, apix


def demo_config(seed: int, prior: str = "exponential"):
    """The demo's ReconstructConfig for ``seed`` and ``prior`` (no HTML report)."""
    from cryorecon.reconstruct import ReconstructConfig

    s = demo_settings()
    return ReconstructConfig(
        minibatch=s.minibatch,
        seed=seed,
        max_iters=s.max_iters,
        max_time=s.max_time,
        omega_start=s.omega_start,
        omega_step=s.omega_step,
        omega_every=s.omega_every,
        omega_max=s.omega_max,
        device="cpu",
        grid_scale=s.grid_scale,
        heldout=s.heldout,
        heldout_every=s.heldout_every,
        patience=s.patience,
        checkpoint_every=25,
        snapshot_every=50,
        prior=prior,
        report_every=None,
        resolution_schedule="paper",
    )


def run_reconstruction(particles, run_dir: Path, cfg, fresh: bool = False) -> dict:
    """Reconstruct into ``run_dir`` (or reuse it); returns iterations, stop reason, times, prior."""
    from cryorecon.reconstruct import reconstruct

    bench = run_dir / "bench.json"
    want = json.loads(json.dumps(asdict(cfg)))
    if not fresh and bench.exists() and (run_dir / "volume.mrc").exists():
        rec = json.loads(bench.read_text())
        if rec.get("config") == want:
            return {"code": None, **rec["result"], "reused": True}
    t0, c0 = time.perf_counter(), cpu_seconds()
    summary = reconstruct(particles, run_dir, cfg, force=True)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    prior = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)[
        "prior_state"
    ]
    result = {
        "iterations": int(summary["iterations"]),
        "stop_reason": summary["reason"],
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "prior": prior,
        "code": code_version(),
    }
    tmp = run_dir / ".bench.json.tmp"
    tmp.write_text(json.dumps({"config": want, "result": result}, indent=2))
    os.replace(tmp, bench)
    return {**result, "reused": False}


def load_map(path: Path) -> tuple[torch.Tensor, float]:
    from cryorecon.io.mrc import read_map

    v, apix = read_map(path)
    return torch.from_numpy(v), apix


def fsc_resolutions(freq, curve) -> dict:
    from cryorecon.validate import resolution_at

    return {f"{thr:g}": finite(resolution_at(freq, curve, thr)) for thr in (0.5, 0.143)}


def finite(x, nd: int = 2):
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def score_vs_truth(
    truth: torch.Tensor, vol: torch.Tensor, apix: float, seed: int, n_global: int
) -> dict:
    """Align ``vol`` to the truth (rotation, shift, hand) and FSC them; keeps the aligned map."""
    from cryorecon.validate import align, fsc

    al = align(truth, vol, apix=apix, seed=seed, n_global=n_global, progress=False)
    freq, curve = fsc(truth, al.aligned, apix)
    return {
        "aligned": al.aligned,
        "freq": freq.numpy(),
        "curve": curve.numpy(),
        "flipped": bool(al.flipped),
        "cc": round(float(al.cc), 4),
        "cc_other_hand": finite(al.cc_other_hand, 4),
        "hand_margin": hand_margin(al),
        "align_s": round(al.seconds, 2),
        "resolution_A": fsc_resolutions(freq, curve),
    }


def hand_margin(al):
    """How much better the chosen hand scored than the other one in ``align``'s search (the
    masked correlation on the downsampled maps, where both hands are refined alike): small
    values mean the hand is not determined by the maps."""
    x = al.details.get("ncc_search", float("nan")) - al.cc_other_hand
    return finite(x, 4)


def fmt_A(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def central_slice(vol: torch.Tensor, axis: int = 0) -> np.ndarray:
    """The central plane (index D//2) perpendicular to ``axis`` (0 = z, i.e. an x-y plane)."""
    D = vol.shape[0]
    return np.asarray(vol.select(axis, D // 2))


def show_slice(ax, img: np.ndarray, title: str = "") -> None:
    """One slice, coloured like the paper's Fig. 13 (blue = zero or below, red = high), own
    scale 0..max."""
    hi = float(np.max(img)) if np.max(img) > 0 else 1.0
    ax.imshow(img, cmap="jet", vmin=0.0, vmax=hi, origin="lower", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def resume_copy(run: Path, work: Path):
    """A finished run's state, resumed in ``work`` (a fresh scratch folder, replaced if present)
    so that benchmarks can evaluate minibatches at its map without touching ``run``.

    Copies ``checkpoint.pt`` and ``run.json`` (marked unfinished, so that it may resume) and
    returns the :class:`cryorecon.reconstruct.Run`, with the HTML report off."""
    import shutil

    from cryorecon.io.particles import read_particles
    from cryorecon.reconstruct import ReconstructConfig, Run

    info = json.loads((run / "run.json").read_text())
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copy(run / "checkpoint.pt", work / "checkpoint.pt")
    (work / "run.json").write_text(json.dumps({**info, "finished": False}))
    return Run(
        read_particles(info["particles"]), work, ReconstructConfig(report_every=None), resume=True
    )


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def figure(w: float, h: float, dpi: int = 110):
    """A matplotlib Figure on the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig
