#!/usr/bin/env python
"""Benchmark `priors` (paper Sec. 4.6, Fig. 13): exponential vs uniform vs CAR prior.

The demo dataset (GroEL-GroES, 2,000 particles, box 32 at 10 Å/px, SNR 0.1; see
``_common.py``) is reconstructed with the demo's settings from the same random start
(``--seed``, default 1) under each prior:

* ``exponential`` (the paper's default): rate lambda from cryorecon's default rule
  (``reconstruct.default_exponential_lambda``, strength 3);
* ``uniform``: ``UniformPrior`` adds zero energy and zero gradient. The SAGD step still
  truncates negative voxels to zero after every update (``optim/sagd.py``), for every prior,
  so in this codebase "uniform" means uniform on ``V >= 0`` (the positivity constraint is
  kept), not an unconstrained improper prior;
* ``car``: 26-neighbour CAR prior with sigma_CAR = std of the (scaled) random start, the
  codebase default (``ReconstructConfig.car_sigma=None``).

Each map is aligned to the truth (rotation, shift, hand; ``validate.align``) and scored by
FSC. Background noise: the variance of the aligned map outside a particle mask divided by its
variance inside. The mask is the *dilated truth mask*: voxels where the true map exceeds
``--mask-level`` (5%) of its maximum, dilated by ``--mask-dilate`` (2) voxels (20 Å, about the
resolution reached); "outside" is the rest of the sphere of radius D/2 - 1 (the box corners are
left out because the aligned map is zero-padded there by the rotation). The same number for the
true map is the floor. Also recorded: the mean density outside / inside and the fraction of
voxels outside that are exactly zero.

Writes ``results/priors.json`` and ``results/priors.png`` (central slices of the truth and
each map, z- and y-planes; FSC vs truth; background variance bars); prints a table. Work files
(dataset, run folders) go to ``results/priors_work/`` (not in git); a finished run with the same
settings is reused unless ``--fresh``. Three reconstructions of ~2-4 min each on 2 CPU
cores (measured under load from another job: 212-241 s wall each, 12 min in all).

    python benchmarks/priors.py
    python benchmarks/priors.py --priors exponential uniform --seed 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import _common as C


def particle_mask(
    truth: torch.Tensor, level: float, dilate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inside, outside) boolean masks: truth > level * max dilated by ``dilate`` voxels (cube
    max-pool, iterated with 3^3 so it grows like a 26-neighbourhood), and the rest of the
    sphere of radius D/2 - 1."""
    D = truth.shape[0]
    m = (truth > level * float(truth.max())).float()[None, None]
    for _ in range(dilate):
        m = F.max_pool3d(m, 3, stride=1, padding=1)
    inside = m[0, 0] > 0
    k = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    sphere = (x * x + y * y + z * z).sqrt() <= D / 2 - 1
    return inside, sphere & ~inside


def background(vol: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> dict:
    v = vol.double()
    vin, vout = v[inside], v[outside]
    var_in, var_out = float(vin.var()), float(vout.var())
    return {
        "variance_ratio_out_in": float(var_out / var_in) if var_in > 0 else None,
        "variance_inside": var_in,
        "variance_outside": var_out,
        "mean_ratio_out_in": float(vout.mean() / vin.mean()) if float(vin.mean()) != 0 else None,
        "zero_fraction_outside": round(float((vout == 0).double().mean()), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--priors",
        nargs="+",
        default=["exponential", "uniform", "car"],
        choices=["exponential", "uniform", "car"],
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=1,
        help="reconstruction seed, the same for every prior (default 1)",
    )
    ap.add_argument(
        "--align-global",
        type=int,
        default=3000,
        help="global rotations of the alignment to the truth (default 3000, as the demo)",
    )
    ap.add_argument(
        "--mask-level", type=float, default=0.05, help="truth mask threshold, fraction of max"
    )
    ap.add_argument("--mask-dilate", type=int, default=2, help="truth mask dilation, voxels")
    ap.add_argument(
        "--fresh", action="store_true", help="rerun reconstructions even if a finished one is there"
    )
    ap.add_argument("--work", type=Path, default=C.RESULTS / "priors_work")
    ap.add_argument("--out", type=Path, default=C.RESULTS / "priors.json")
    ap.add_argument("--png", type=Path, default=C.RESULTS / "priors.png")
    args = ap.parse_args()
    C.quiet()
    t_all = time.perf_counter()

    from cryorecon.validate import fsc

    args.work.mkdir(parents=True, exist_ok=True)
    dataset, particles, truth, apix = C.open_dataset(args.work)
    inside, outside = particle_mask(truth, args.mask_level, args.mask_dilate)
    s = C.demo_settings()
    result = {
        "benchmark": "priors",
        "paper": "Sec. 4.6, Fig. 13",
        "dataset": dataset,
        "settings": {
            "seed": args.seed,
            "demo_settings": asdict(s),
            "report_rendered": False,
            "align_n_global": args.align_global,
        },
        "uniform_prior_note": "UniformPrior has zero energy and gradient, but SAGD still truncates "
        "negative voxels to zero after each step, so 'uniform' = uniform on V >= 0 (positivity "
        "kept).",
        "background_mask": {
            "kind": "dilated truth mask",
            "level_fraction_of_max": args.mask_level,
            "dilate_voxels": args.mask_dilate,
            "outside": "rest of the sphere of radius D/2 - 1",
            "voxels_inside": int(inside.sum()),
            "voxels_outside": int(outside.sum()),
        },
        "machine": C.machine_info(),
        "truth": {"background": background(truth, inside, outside)},
        "priors": {},
    }
    maps, curves = {"truth": truth}, {}
    for name in args.priors:
        run_dir = args.work / f"run_{name}_seed{args.seed}"
        print(f"[{name}] reconstructing (seed {args.seed}) -> {run_dir} ...", flush=True)
        rec = C.run_reconstruction(
            particles, run_dir, C.demo_config(args.seed, prior=name), fresh=args.fresh
        )
        print(
            f"[{name}] {'reused: ' if rec['reused'] else ''}{rec['iterations']} iterations "
            f"({rec['stop_reason']}), "
            f"{rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU; aligning to the truth ...",
            flush=True,
        )
        vol, _ = C.load_map(run_dir / "volume.mrc")
        sc = C.score_vs_truth(truth, vol, apix, seed=args.seed, n_global=args.align_global)
        maps[name] = sc["aligned"]
        curves[name] = sc["curve"]
        bg = background(sc["aligned"], inside, outside)
        result["priors"][name] = {
            "seed": args.seed,
            "prior": rec["prior"],
            "iterations": rec["iterations"],
            "stop_reason": rec["stop_reason"],
            "wall_s": rec["wall_s"],
            "cpu_s": rec["cpu_s"],
            "reused_run": rec["reused"],
            "code": rec["code"],
            "fsc_resolution_A": sc["resolution_A"],
            "hand_flipped": sc["flipped"],
            "hand_margin": sc["hand_margin"],
            "align_cc": sc["cc"],
            "align_s": sc["align_s"],
            "background": bg,
            "fsc_curve": [round(float(x), 5) for x in sc["curve"]],
            "run": str(run_dir),
        }
        r = sc["resolution_A"]
        print(
            f"[{name}] FSC vs truth {C.fmt_A(r['0.5'])} Å @0.5, {C.fmt_A(r['0.143'])} Å @0.143; "
            f"background variance out/in {bg['variance_ratio_out_in']:.4f}",
            flush=True,
        )
    freq, _ = fsc(truth, truth, apix)
    result["fsc_freq_1_per_A"] = [float(x) for x in freq]
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["seconds_total"] = round(time.perf_counter() - t_all, 1)
    C.write_json(args.out, result)
    plot(args.png, maps, freq.numpy(), curves, result)

    print(
        f"\npriors (seed {args.seed}; {s.n} particles, box {s.box} at {s.apix:g} Å/px, SNR "
        f"{s.snr:g}, Nyquist {2 * s.apix:g} Å)"
    )
    print(
        "| prior | iterations | stop | wall s | CPU s | FSC 0.5 Å | FSC 0.143 Å | bg var out/in | "
        "zero frac out |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    tb = result["truth"]["background"]
    print(
        f"| truth | - | - | - | - | - | - | {tb['variance_ratio_out_in']:.4f} | "
        f"{tb['zero_fraction_outside']:.2f} |"
    )
    for name, p in result["priors"].items():
        r, bg = p["fsc_resolution_A"], p["background"]
        print(
            f"| {name} | {p['iterations']} | {p['stop_reason']} | {p['wall_s']:.0f} | "
            f"{p['cpu_s']:.0f} | {C.fmt_A(r['0.5'])} | {C.fmt_A(r['0.143'])} | "
            f"{bg['variance_ratio_out_in']:.4f} | {bg['zero_fraction_outside']:.2f} |"
        )
    print(f"total {result['seconds_total']:.0f} s; wrote {args.out} and {args.png}")
    return 0


def plot(path: Path, maps: dict, freq: np.ndarray, curves: dict, result: dict) -> None:
    from cryorecon.report.plots import draw_fsc

    names = list(maps)
    ncol = len(names)
    fig = C.figure(2.3 * max(ncol, 4), 9.0)
    gs = fig.add_gridspec(3, 2 * ncol, height_ratios=[1, 1, 1.35])
    for j, name in enumerate(names):
        for i, (axis, plane) in enumerate(((0, "z = 0 plane"), (1, "y = 0 plane"))):
            ax = fig.add_subplot(gs[i, 2 * j : 2 * j + 2])
            if name == "truth":
                title = f"truth ({plane})"
            else:
                r = result["priors"][name]["fsc_resolution_A"]["0.5"]
                title = f"{name} ({plane})\nFSC0.5 {C.fmt_A(r)} Å"
            C.show_slice(ax, C.central_slice(maps[name], axis), title)
    half = ncol
    ax = fig.add_subplot(gs[2, :half])
    res = {n: result["priors"][n]["fsc_resolution_A"] for n in curves}
    draw_fsc(
        ax,
        freq,
        {n: (curves[n], {0.5: res[n]["0.5"], 0.143: res[n]["0.143"]}) for n in curves},
        title="FSC vs truth (aligned)",
        ylabel="FSC",
    )
    ax.legend(fontsize=7, loc="lower left")
    ax = fig.add_subplot(gs[2, half:])
    labels = ["truth"] + list(result["priors"])
    vals = [result["truth"]["background"]["variance_ratio_out_in"]] + [
        result["priors"][n]["background"]["variance_ratio_out_in"] for n in result["priors"]
    ]
    bars = ax.bar(labels, vals, color=["0.4"] + [f"C{i}" for i in range(len(labels) - 1)])
    for b, v in zip(bars, vals):
        ax.annotate(
            f"{v:.3g}",
            xy=(b.get_x() + b.get_width() / 2, v),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    m = result["background_mask"]
    ax.set_title(
        "background noise: var outside / var inside\n(dilated truth mask: "
        f">{m['level_fraction_of_max']:g} max, +{m['dilate_voxels']} vox)",
        fontsize=9,
    )
    ax.set_ylabel("variance ratio")
    fig.suptitle(
        f"Priors (paper Fig. 13): GroEL-GroES, {result['dataset']['n']} particles, box "
        f"{result['dataset']['box']} at {result['dataset']['apix']:g} Å/px, SNR "
        f"{result['dataset']['snr']:g}, "
        f"seed {result['settings']['seed']}; slices coloured 0 (blue) .. map max (red)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, format="png")


if __name__ == "__main__":
    sys.exit(main())
