#!/usr/bin/env python
"""Benchmark `projection_matching` (paper Sec. 4.5, Fig. 11): cryorecon vs iterative projection
matching from the same random start, for the same CPU time.

Sec. 4.5 runs "a standard iterative projection matching scheme" (global pose search against
the current map, reconstruction from the fixed poses, repeat) from the same random density as
cryorecon, for about the same CPU time, and finds it trapped in a wrong structure. Here:

1. the ``cryorecon demo`` dataset (built-in GroEL-GroES 1AON, 2,000 particles, box 32 at
   10 Å/pixel, SNR 0.1, defocus 1-3 µm, shifts ±3 px; simulated by the demo's own settings
   into ``--work``/data, reused when present);
2. per seed ``s`` (``--seeds``): ``cryorecon.reconstruct.reconstruct`` with the demo's
   :class:`~cryorecon.reconstruct.ReconstructConfig` (seed ``s``; the HTML report is switched
   off, as it is not part of the method), timed with ``time.process_time()`` (CPU seconds of
   this process, all threads);
3. :func:`cryorecon.projection_matching.projection_matching` with the same config (same start,
   pose grids, CTF model, omega* schedule per epoch) and that CPU time as its budget;
4. both maps aligned to the truth (rotation, shift, hand: :func:`cryorecon.validate.align`)
   and scored by FSC (0.5 and 0.143, Å), beside the start and the oracle (Wiener
   back-projection with the true poses), also band-limited at the runs' final cut-off;
5. ``--out`` JSON and a PNG next to it (central slices of the truth, the random start,
   cryorecon, projection matching and the oracle, all aligned to the truth; FSC curves), and a
   table on stdout.

    python benchmarks/projection_matching.py                # ~6-10 min on 2 busy CPU cores (1 seed)
    python benchmarks/projection_matching.py --seeds 0 1

Peak RSS is that of the whole benchmark process (both methods run in it).

Measured (seed 0, 2 CPU cores shared with other benchmarks, load average 4-8): cryorecon 240
iterations (converged), 181 CPU s, FSC vs truth 28.5 / 22.4 Å (0.5 / 0.143); projection
matching 30 iterations in 176 CPU s (final cut-off 28 Å from iteration 10 on; 1.5% of poses
still changing), 30.6 / 24.4 Å; random start 133 / 115 Å; oracle 21.3 / 20.4 Å, band-limited
at 28 Å 27.9 / 26.9 Å; 574 s wall in all. An earlier run under different load gave cryorecon
the same map in 159 CPU s and projection matching 19 iterations, 31.8 / 24.5 Å: CPU seconds
per iteration grow with contention, so the budget (and the matching's iteration count) varies
from run to run. On this easy, D7-symmetric, low-resolution set, projection matching is *not*
trapped as in the paper's Fig. 11 (real *Thermus* data): it recovers GroEL-GroES, somewhat
blurred, about 2 Å (FSC 0.143) behind cryorecon at the same CPU time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
THRESHOLDS = (0.5, 0.143)


def demo_config(s, seed: int):
    """The ``ReconstructConfig`` that ``cryorecon demo`` runs with (see commands/demo.py), minus
    the periodic HTML report."""
    from cryorecon.reconstruct import ReconstructConfig

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
        report_every=None,
        resolution_schedule="paper",
    )


def dataset(work: Path, s, seed: int) -> tuple[Path, float]:
    """Simulate the demo dataset into ``work/data`` unless the same one is there; returns
    (folder, seconds spent simulating)."""
    from cryorecon.simulate import run_simulation

    data = work / "data"
    info = data / "simulation.json"
    want = {"n": s.n, "box": s.box, "apix": s.apix, "snr": s.snr, "seed": seed}
    if (data / "particles.star").exists() and info.exists():
        have = json.loads(info.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return data, 0.0
    t = time.perf_counter()
    run_simulation(data, n=s.n, D=s.box, apix=s.apix, snr=s.snr, seed=seed, force=True)
    return data, time.perf_counter() - t


def lowpass(vol: torch.Tensor, apix: float, resolution_A: float) -> torch.Tensor:
    """Hard band limit at ``1 / resolution_A`` (what a run capped at that omega* can at best
    hold)."""
    from cryorecon.fourier.transforms import fft3c, ifft3c

    D = vol.shape[-1]
    k = (torch.arange(D) - D // 2) / (D * apix)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    keep = torch.sqrt(kx**2 + ky**2 + kz**2) < 1.0 / resolution_A
    return ifft3c(fft3c(vol.double()) * keep).real.float()


def score(
    truth: torch.Tensor,
    vol: torch.Tensor,
    apix: float,
    seed: int,
    n_global: int,
    align: bool = True,
):
    """Align ``vol`` to ``truth`` (optional) and return (record, aligned map, FSC curve)."""
    from cryorecon.validate import align as align_maps
    from cryorecon.validate import fsc, resolution_at

    rec = {}
    if align:
        res = align_maps(truth, vol, apix=apix, seed=seed, n_global=n_global, progress=False)
        vol = res.aligned
        rec = {"align_cc": round(float(res.cc), 4), "hand_flipped": bool(res.flipped)}
    freq, curve = fsc(truth, vol, apix)
    for thr in THRESHOLDS:
        r = resolution_at(freq, curve, thr)
        rec[f"fsc{thr:g}_A"] = round(r, 2) if math.isfinite(r) else None
    return rec, vol, curve


def run_seed(particles, truth, apix, s, seed: int, work: Path, max_iterations: int) -> dict:
    """cryorecon then projection matching for seed ``seed``; returns the record and the maps."""
    from cryorecon.io.mrc import read_map
    from cryorecon.projection_matching import projection_matching
    from cryorecon.reconstruct import reconstruct

    cfg = demo_config(s, seed)
    print(f"seed {seed}: cryorecon ...", flush=True)
    c0, w0 = time.process_time(), time.perf_counter()
    summary = reconstruct(particles, work / f"cryorecon_seed{seed}", cfg, force=True)
    cpu = time.process_time() - c0
    cryo = {
        "iterations": summary["iterations"],
        "stop_reason": summary["reason"],
        "wall_s": round(time.perf_counter() - w0, 2),
        "cpu_s": round(cpu, 2),
    }
    print(f"seed {seed}: projection matching for {cpu:.0f} CPU s ...", flush=True)
    pm_dir = work / f"projection_matching_seed{seed}"
    pm = projection_matching(
        particles, pm_dir, cfg, max_cpu_seconds=cpu, max_iterations=max_iterations, force=True
    )
    metrics = [
        json.loads(ln) for ln in (pm_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()
    ]
    last = metrics[-1]
    pmr = {
        "iterations": pm["iterations"],
        "stop_reason": pm["reason"],
        "wall_s": round(pm["seconds"], 2),
        "cpu_s": round(pm["cpu_seconds"], 2),
        "final_omega_star": pm["omega_star"],
        "last_fraction_changed": last["fraction_changed"],
        "last_mean_correlation": last["mean_correlation"],
        "per_iteration": [
            {
                k: m[k]
                for k in (
                    "iteration",
                    "cpu_seconds",
                    "omega_star",
                    "mean_loglik",
                    "mean_correlation",
                    "fraction_changed",
                )
            }
            for m in metrics
        ],
    }
    maps = {
        "cryorecon": read_map(work / f"cryorecon_seed{seed}" / "volume.mrc")[0],
        "projection matching": read_map(pm_dir / "volume.mrc")[0],
        "start": read_map(pm_dir / "initial.mrc")[0],
    }
    return {"seed": seed, "cryorecon": cryo, "projection_matching": pmr}, maps


def figure(path: Path, freq, panels: dict, curves: dict, cutoff_A: float, title: str) -> None:
    """Central slices (xy at z = D/2, xz at y = D/2) of each map in ``panels`` (each on its own
    grey scale, 1st to 99.9th percentile) above the FSC curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cryorecon.report.plots import draw_fsc

    n = len(panels)
    fig = Figure(figsize=(3.0 * n, 9.6), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(3, n, height_ratios=[1, 1, 1.5])
    for i, (name, vol) in enumerate(panels.items()):
        D = vol.shape[0]
        lo, hi = np.percentile(vol, [1, 99.9])
        for row, (img, plane) in enumerate(((vol[D // 2], "xy"), (vol[:, D // 2, :], "xz"))):
            ax = fig.add_subplot(gs[row, i])
            ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} ({plane})" if row == 0 else f"({plane})", fontsize=9)
    draw_fsc(
        fig.add_subplot(gs[2, :]),
        freq,
        curves,
        cutoff_A=cutoff_A,
        title=title,
        ylabel="FSC against the truth",
    )
    fig.tight_layout()
    fig.savefig(path, format="png")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="random starts (default: 0)")
    ap.add_argument(
        "--data-seed", type=int, default=0, help="simulation seed (default 0, as `cryorecon demo`)"
    )
    ap.add_argument(
        "--max-iterations", type=int, default=1000, help="cap on projection-matching iterations"
    )
    ap.add_argument("--work", type=Path, default=HERE / "results" / "projection_matching_work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "projection_matching.json")
    args = ap.parse_args()

    from cryorecon.backproject import wiener_backproject
    from cryorecon.commands.demo import DEFAULT
    from cryorecon.io.mrc import read_map
    from cryorecon.io.particles import read_particles
    from cryorecon.validate import fsc

    s = DEFAULT
    t_all, c_all = time.perf_counter(), time.process_time()
    args.work.mkdir(parents=True, exist_ok=True)
    data, sim_s = dataset(args.work, s, args.data_seed)
    particles = read_particles(data / "particles.star")
    truth_np, apix = read_map(data / "truth.mrc")
    truth = torch.from_numpy(truth_np)
    cutoff_A = 1.0 / s.omega_max
    result = {
        "benchmark": "projection_matching",
        "dataset": {
            "structure": "GroEL-GroES (PDB 1AON, built in)",
            "n": s.n,
            "box": s.box,
            "apix": s.apix,
            "snr": s.snr,
            "data_seed": args.data_seed,
            "nyquist_A": 2 * s.apix,
            "simulate_s": round(sim_s, 2),
        },
        "settings": {
            "demo": asdict(s),
            "reconstruct_config": asdict(demo_config(s, 0)),
            "max_iterations": args.max_iterations,
            "final_cutoff_A": round(cutoff_A, 2),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
        },
        "runs": [],
    }

    t = time.perf_counter()
    oracle = wiener_backproject(particles).cpu()
    result["oracle"], _, oracle_curve = score(truth, oracle, apix, 0, 0, align=False)
    result["oracle"]["wall_s"] = round(time.perf_counter() - t, 2)
    result["oracle_capped"], _, capped_curve = score(
        truth, lowpass(oracle, apix, cutoff_A), apix, 0, 0, align=False
    )

    freq = fsc(truth, truth, apix)[0]
    curves, first_maps = {}, None
    for seed in args.seeds:
        rec, maps = run_seed(particles, truth, apix, s, seed, args.work, args.max_iterations)
        for key, name in (
            ("cryorecon", "cryorecon"),
            ("projection_matching", "projection matching"),
            ("start", "start"),
        ):
            sc, aligned, curve = score(
                truth, torch.from_numpy(maps[name]), apix, seed, s.align_n_global
            )
            rec.setdefault(key, {}).update(sc)
            rec[key]["fsc_curve"] = [round(float(x), 4) for x in curve]
            maps[name] = aligned.numpy()
            if name != "start":
                curves[f"{name}, seed {seed}"] = (
                    curve.numpy(),
                    {thr: sc[f"fsc{thr:g}_A"] for thr in THRESHOLDS},
                )
        result["runs"].append(rec)
        first_maps = first_maps or maps
        c, p = rec["cryorecon"], rec["projection_matching"]
        print(
            f"  seed {seed}: cryorecon {c['iterations']} it, {c['cpu_s']:.0f} CPU s -> "
            f"{c['fsc0.5_A']} / {c['fsc0.143_A']} Å; projection matching {p['iterations']} it, "
            f"{p['cpu_s']:.0f} CPU s -> {p['fsc0.5_A']} / {p['fsc0.143_A']} Å",
            flush=True,
        )

    curves["oracle (true poses)"] = (
        oracle_curve.numpy(),
        {thr: result["oracle"][f"fsc{thr:g}_A"] for thr in THRESHOLDS},
    )
    curves[f"oracle band-limited at {cutoff_A:.0f} Å"] = (
        capped_curve.numpy(),
        {thr: result["oracle_capped"][f"fsc{thr:g}_A"] for thr in THRESHOLDS},
    )
    result["fsc_freq_1_per_A"] = [round(float(x), 6) for x in freq]
    result["oracle"]["fsc_curve"] = [round(float(x), 4) for x in oracle_curve]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    panels = {
        "truth": truth_np,
        f"random start (seed {args.seeds[0]})": first_maps["start"],
        f"cryorecon (seed {args.seeds[0]})": first_maps["cryorecon"],
        f"proj. matching (seed {args.seeds[0]})": first_maps["projection matching"],
        "oracle": oracle.numpy(),
    }
    figure(
        png,
        freq.numpy(),
        panels,
        curves,
        cutoff_A,
        f"GroEL-GroES, {s.n} particles, box {s.box} at {s.apix:g} Å/px, SNR {s.snr:g}: same start, "
        "same CPU time",
    )
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["wall_s"] = round(time.perf_counter() - t_all, 2)
    result["cpu_s"] = round(time.process_time() - c_all, 2)
    result["files"] = {"json": str(args.out), "png": str(png), "work": str(args.work)}
    tmp = args.out.with_name(f".{args.out.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)

    def fmt(x):
        return "n/a" if x is None else f"{x:.1f}"

    print("\n| seed | method | iterations | wall s | CPU s | FSC 0.5 Å | FSC 0.143 Å | align cc |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        for key, name in (
            ("cryorecon", "cryorecon"),
            ("projection_matching", "projection matching"),
        ):
            m = r[key]
            print(
                f"| {r['seed']} | {name} | {m['iterations']} | {m['wall_s']:.0f} | "
                f"{m['cpu_s']:.0f} | "
                f"{fmt(m['fsc0.5_A'])} | {fmt(m['fsc0.143_A'])} | {m['align_cc']:.3f} |"
            )
        m = r["start"]
        print(
            f"| {r['seed']} | random start | 0 | - | - | {fmt(m['fsc0.5_A'])} | "
            f"{fmt(m['fsc0.143_A'])} | {m['align_cc']:.3f} |"
        )
    for key, name in (
        ("oracle", "oracle (true poses)"),
        ("oracle_capped", f"oracle, band-limited {cutoff_A:.0f} Å"),
    ):
        m = result[key]
        print(f"| - | {name} | - | - | - | {fmt(m['fsc0.5_A'])} | {fmt(m['fsc0.143_A'])} | - |")
    print(
        f"\nwall {result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s, peak RSS "
        f"{result['peak_rss_mib']:.0f} MiB; wrote {args.out} and {png}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
