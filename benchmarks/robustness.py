#!/usr/bin/env python
"""Benchmark `robustness` (paper Sec. 4.5, Fig. 12): consistency of runs from random starts.

The demo dataset (GroEL-GroES, 2,000 particles, box 32 at 10 Å/px, SNR 0.1, data seed 0; see
``_common.py``) is reconstructed with the demo's settings from ``--starts`` random starts
(seeds 1..N, default 15; the seed sets the random spheres, the held-out split, the
minibatches and the pose sampling). Then:

* every run is aligned to the truth (rotation, shift, hand) and scored by FSC (0.5 / 0.143);
  its hand is ``AlignResult.flipped``: True when the run came out as the mirror image of the
  truth (an ab-initio map is only defined up to hand);
* every pair (i < j) of final maps is aligned directly (map j onto map i, both hands tried,
  as the paper does without a ground truth) and their FSC computed: N(N-1)/2 pairs, 105 for
  15 starts. Reported: mean, std, min and max pairwise FSC per frequency shell, each pair's
  FSC 0.5 / 0.143 resolution, and where the mean curve crosses 0.5 and 0.143. As a
  cross-check, the pairwise FSC of the maps as aligned to the truth (no pairwise alignment)
  is summarised too.

Hand. ``align`` scores both hands; ``hand_margin`` is the chosen hand's masked correlation on
the search-size maps minus the other hand's. A pair's ``flipped`` should equal hand_i XOR
hand_j (``hand_consistent``) *if* the hand is determined. On this dataset it is not: at
~27 Å and 10 Å/px the GroEL-GroES barrel is nearly achiral, both hands fit the truth within
~0.005 in correlation and within ~0-2 Å in FSC 0.5 (measured by forcing each hand), so which
hand a run lands in is close to a coin toss and the consistency count is near chance. This
says nothing about convergence; the FSCs are those of the better-fitting hand.

Pairwise FSC here is between maps reconstructed from the *same* particles, so their noise
is shared and the curves stay high out to Nyquist (FSC 0.143 is usually not crossed: reported
as Nyquist, 20 Å). As in the paper, it measures consistency between starts, not accuracy;
accuracy is the FSC against the truth.

Alignment cost (measured on this machine, box 32, 2 shared cores): ``validate.align`` takes
~3.7 s with the demo's 3,000 global rotations (1.9 s global search, 1.6 s Nelder-Mead on 2 x 3
candidates at 24^3, 0.2 s final) and ~2.8 s with 1,000 (12-degree spacing, refined by the
Nelder-Mead steps), giving the same correlation and FSC on a noisy rotated copy of the truth.
The global search is the only part that scales with the rotations, so the pairwise
alignments use ``--align-global 1000`` (105 pairs: ~5 min instead of ~6.5). ``--check-pairs K``
(default 3) realigns the first K pairs with the demo's 3,000 rotations and records the
difference in correlation and FSC resolution, so the choice is checked on every run. The
alignments to the truth use 3,000 (only N of them).

Writes ``results/robustness.json`` and ``results/robustness.png`` (mean pairwise FSC with a
min-max band and a ±1 std band, each run's FSC vs truth as light lines; central slices of the
random starts and the aligned results of a few runs, and of the truth); prints a table. Work
files go to ``results/robustness_work/`` (not in git); finished runs with the same settings
are reused unless ``--fresh``, so ``--starts`` can be raised later at the cost of the new runs
only. Time on 2 CPU cores: each reconstruction ~105 s wall when the machine is otherwise idle,
150-230 s while another job shares it; alignments ~3 s each (N to the truth, N(N-1)/2 pairs).
So 15 starts take ~30 min idle (~26 min of runs + ~6 min of alignments), longer under load.

    python benchmarks/robustness.py
    python benchmarks/robustness.py --starts 5
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import _common as C


def summarise_pairs(freq: np.ndarray, curves: np.ndarray) -> dict:
    from cryorecon.validate import resolution_at

    mean = curves.mean(0)
    out = {"mean": mean, "std": curves.std(0), "min": curves.min(0), "max": curves.max(0)}
    summary = {k: [round(float(x), 5) for x in v] for k, v in out.items()}
    summary["mean_curve_resolution_A"] = C.fsc_resolutions(freq, mean)
    # resolution_at returns Nyquist when a curve never drops below the threshold: say so
    summary["mean_curve_crosses"] = {f"{t:g}": bool((mean < t).any()) for t in (0.5, 0.143)}
    res05 = np.array([resolution_at(freq, c, 0.5) for c in curves])
    res0143 = np.array([resolution_at(freq, c, 0.143) for c in curves])
    for name, r in (("pair_resolution_0.5_A", res05), ("pair_resolution_0.143_A", res0143)):
        fin = r[np.isfinite(r)]
        summary[name] = {
            "mean": C.finite(fin.mean()) if fin.size else None,
            "median": C.finite(np.median(fin)) if fin.size else None,
            "min": C.finite(fin.min()) if fin.size else None,
            "max": C.finite(fin.max()) if fin.size else None,
            "n_not_finite": int((~np.isfinite(r)).sum()),
        }
    for t in (0.5, 0.143):
        summary[f"pair_resolution_{t:g}_A"]["n_not_crossed_before_nyquist"] = int(
            (curves >= t).all(1).sum()
        )
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--starts", type=int, default=15, help="number of random starts, seeds 1..N (default 15)"
    )
    ap.add_argument(
        "--align-global",
        type=int,
        default=1000,
        help="global rotations of each pairwise alignment (default 1000; the demo uses 3000)",
    )
    ap.add_argument(
        "--truth-align-global",
        type=int,
        default=3000,
        help="global rotations of each alignment to the truth (default 3000)",
    )
    ap.add_argument(
        "--check-pairs",
        type=int,
        default=3,
        help="realign this many pairs with 3000 rotations and record the difference (default 3)",
    )
    ap.add_argument(
        "--show", type=int, default=4, help="runs shown as slices in the figure (default 4)"
    )
    ap.add_argument(
        "--fresh", action="store_true", help="rerun reconstructions even if a finished one is there"
    )
    ap.add_argument("--work", type=Path, default=C.RESULTS / "robustness_work")
    ap.add_argument("--out", type=Path, default=C.RESULTS / "robustness.json")
    ap.add_argument("--png", type=Path, default=C.RESULTS / "robustness.png")
    args = ap.parse_args()
    if args.starts < 2:
        ap.error("--starts must be at least 2")
    C.quiet()
    t_all = time.perf_counter()

    from cryorecon.validate import align, fsc

    args.work.mkdir(parents=True, exist_ok=True)
    dataset, particles, truth, apix = C.open_dataset(args.work)
    s = C.demo_settings()
    seeds = list(range(1, args.starts + 1))
    result = {
        "benchmark": "robustness",
        "paper": "Sec. 4.5, Fig. 12",
        "dataset": dataset,
        "settings": {
            "seeds": seeds,
            "demo_settings": asdict(s),
            "report_rendered": False,
            "pair_align_n_global": args.align_global,
            "truth_align_n_global": args.truth_align_global,
        },
        "machine": C.machine_info(),
        "runs": [],
    }

    # ---- 1. reconstructions
    t_rec = time.perf_counter()
    vols, aligned, truth_curves = {}, {}, {}
    for k, seed in enumerate(seeds, 1):
        run_dir = args.work / f"run_seed{seed}"
        print(f"[run {k}/{len(seeds)}] seed {seed}: reconstructing -> {run_dir} ...", flush=True)
        rec = C.run_reconstruction(particles, run_dir, C.demo_config(seed), fresh=args.fresh)
        vols[seed], _ = C.load_map(run_dir / "volume.mrc")
        sc = C.score_vs_truth(truth, vols[seed], apix, seed=seed, n_global=args.truth_align_global)
        aligned[seed], truth_curves[seed] = sc["aligned"], sc["curve"]
        r = sc["resolution_A"]
        result["runs"].append(
            {
                "seed": seed,
                "iterations": rec["iterations"],
                "stop_reason": rec["stop_reason"],
                "wall_s": rec["wall_s"],
                "cpu_s": rec["cpu_s"],
                "reused_run": rec["reused"],
                "code": rec["code"],
                "fsc_vs_truth_A": r,
                "hand_flipped_vs_truth": sc["flipped"],
                "hand_margin": sc["hand_margin"],
                "align_cc": sc["cc"],
                "align_s": sc["align_s"],
                "fsc_curve_vs_truth": [round(float(x), 5) for x in sc["curve"]],
                "run": str(run_dir),
            }
        )
        print(
            f"[run {k}/{len(seeds)}] seed {seed}: "
            f"{'reused, ' if rec['reused'] else ''}{rec['iterations']} it ({rec['stop_reason']}), "
            f"{rec['wall_s']:.0f} s wall, {rec['cpu_s']:.0f} s CPU; vs truth {C.fmt_A(r['0.5'])} / "
            f"{C.fmt_A(r['0.143'])} Å, hand {'flipped' if sc['flipped'] else 'same'}",
            flush=True,
        )
    seconds_runs = time.perf_counter() - t_rec
    freq, _ = fsc(truth, truth, apix)
    freq = freq.numpy()
    hand = {r["seed"]: r["hand_flipped_vs_truth"] for r in result["runs"]}

    # ---- 2. all pairs
    pairs = list(itertools.combinations(seeds, 2))
    print(
        f"aligning {len(pairs)} pairs ({args.align_global} global rotations each) ...", flush=True
    )
    t_pairs = time.perf_counter()
    pair_recs, curves, curves_via_truth = [], [], []
    for n, (a, b) in enumerate(pairs, 1):
        al = align(vols[a], vols[b], apix=apix, seed=0, n_global=args.align_global, progress=False)
        _, c = fsc(vols[a], al.aligned, apix)
        _, cv = fsc(aligned[a], aligned[b], apix)
        c = c.numpy()
        curves.append(c)
        curves_via_truth.append(cv.numpy())
        res = C.fsc_resolutions(freq, c)
        pair_recs.append(
            {
                "seeds": [a, b],
                "flipped": bool(al.flipped),
                "hand_consistent": bool(al.flipped) == (hand[a] != hand[b]),
                "hand_margin": C.hand_margin(al),
                "align_cc": round(float(al.cc), 4),
                "align_s": round(al.seconds, 2),
                "fsc_resolution_A": res,
                "fsc_resolution_via_truth_A": C.fsc_resolutions(freq, cv.numpy()),
                "fsc_curve": [round(float(x), 5) for x in c],
            }
        )
        if n % 10 == 0 or n == len(pairs):
            el = time.perf_counter() - t_pairs
            print(
                f"  {n}/{len(pairs)} pairs, {el:.0f} s (last: seeds {a}-{b}, FSC0.5 "
                f"{C.fmt_A(res['0.5'])} Å)",
                flush=True,
            )
    seconds_pairs = time.perf_counter() - t_pairs

    # ---- 3. check the reduced alignment setting on a few pairs
    checks = []
    for a, b in pairs[: max(0, args.check_pairs)]:
        al = align(vols[a], vols[b], apix=apix, seed=0, n_global=3000, progress=False)
        _, c = fsc(vols[a], al.aligned, apix)
        res = C.fsc_resolutions(freq, c.numpy())
        pr = next(p for p in pair_recs if p["seeds"] == [a, b])
        checks.append(
            {
                "seeds": [a, b],
                "cc_3000": round(float(al.cc), 4),
                "cc_reduced": pr["align_cc"],
                "fsc05_A_3000": res["0.5"],
                "fsc05_A_reduced": pr["fsc_resolution_A"]["0.5"],
                "flipped_3000": bool(al.flipped),
                "flipped_reduced": pr["flipped"],
                "align_s_3000": round(al.seconds, 2),
            }
        )

    curves = np.stack(curves)
    curves_via_truth = np.stack(curves_via_truth)
    result["pairwise"] = {
        "n_pairs": len(pairs),
        **summarise_pairs(freq, curves),
        "hand_consistent": int(sum(p["hand_consistent"] for p in pair_recs)),
        "hand_margin_median": C.finite(np.median([p["hand_margin"] for p in pair_recs]), 4),
        "mean_align_s": round(float(np.mean([p["align_s"] for p in pair_recs])), 2),
        "pairs": pair_recs,
    }
    via = summarise_pairs(freq, curves_via_truth)
    result["pairwise_via_truth_alignment"] = {
        "note": "FSC of the maps as aligned to the truth, no pairwise alignment (cross-check)",
        "mean_curve_resolution_A": via["mean_curve_resolution_A"],
        "mean_curve_crosses": via["mean_curve_crosses"],
        "pair_resolution_0.5_A": via["pair_resolution_0.5_A"],
        "mean": via["mean"],
    }
    result["align_check"] = checks
    tv = np.stack([truth_curves[sd] for sd in seeds])
    r05 = [
        r["fsc_vs_truth_A"]["0.5"] for r in result["runs"] if r["fsc_vs_truth_A"]["0.5"] is not None
    ]
    r0143 = [
        r["fsc_vs_truth_A"]["0.143"]
        for r in result["runs"]
        if r["fsc_vs_truth_A"]["0.143"] is not None
    ]
    result["vs_truth"] = {
        "fsc_0.5_A": {
            "mean": C.finite(np.mean(r05)),
            "min": C.finite(min(r05)),
            "max": C.finite(max(r05)),
        },
        "fsc_0.143_A": {
            "mean": C.finite(np.mean(r0143)),
            "min": C.finite(min(r0143)),
            "max": C.finite(max(r0143)),
        },
        "mean_curve_resolution_A": C.fsc_resolutions(freq, tv.mean(0)),
        "hand_flipped": int(sum(hand.values())),
        "hand_margin_median": C.finite(np.median([r["hand_margin"] for r in result["runs"]]), 4),
    }
    result["fsc_freq_1_per_A"] = [float(x) for x in freq]
    result["seconds"] = {
        "reconstructions_and_truth_alignment": round(seconds_runs, 1),
        "pairs": round(seconds_pairs, 1),
        "total": round(time.perf_counter() - t_all, 1),
        "sum_of_run_wall": round(sum(r["wall_s"] for r in result["runs"]), 1),
        "sum_of_run_cpu": round(sum(r["cpu_s"] for r in result["runs"]), 1),
        "runs_reused": int(sum(r["reused_run"] for r in result["runs"])),
        "note": "reused runs cost nothing here; their recorded times are in sum_of_run_*",
    }
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    C.write_json(args.out, result)
    starts = {}
    for sd in seeds[: args.show]:
        init = args.work / f"run_seed{sd}" / "initial.mrc"
        if init.exists():
            starts[sd] = C.load_map(init)[0]
    plot(args.png, freq, curves, tv, truth, starts, aligned, result, seeds[: args.show])

    # ---- table
    print(
        f"\nrobustness: {len(seeds)} random starts (seeds {seeds[0]}..{seeds[-1]}); {s.n} "
        f"particles, box {s.box} at {s.apix:g} Å/px, SNR {s.snr:g}, Nyquist {2 * s.apix:g} Å"
    )
    print("| seed | iterations | stop | wall s | CPU s | FSC 0.5 Å | FSC 0.143 Å | hand (margin) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        v = r["fsc_vs_truth_A"]
        print(
            f"| {r['seed']} | {r['iterations']} | {r['stop_reason']} | {r['wall_s']:.0f} | "
            f"{r['cpu_s']:.0f} | {C.fmt_A(v['0.5'])} | {C.fmt_A(v['0.143'])} | "
            f"{'flipped' if r['hand_flipped_vs_truth'] else 'same'} ({r['hand_margin']}) |"
        )
    p = result["pairwise"]
    print(
        f"pairwise ({p['n_pairs']} pairs): mean FSC crosses 0.5 at {res_txt(p, '0.5')} "
        f"and 0.143 at {res_txt(p, '0.143')}; per-pair FSC 0.5: mean "
        f"{C.fmt_A(p['pair_resolution_0.5_A']['mean'])}, range "
        f"{C.fmt_A(p['pair_resolution_0.5_A']['min'])}-"
        f"{C.fmt_A(p['pair_resolution_0.5_A']['max'])} Å; hands consistent in "
        f"{p['hand_consistent']}/{p['n_pairs']} "
        f"(median hand margin: pairs {p['hand_margin_median']}, runs vs truth "
        f"{result['vs_truth']['hand_margin_median']})"
    )
    pv = result["pairwise_via_truth_alignment"]
    print(
        f"cross-check (maps aligned via the truth): mean FSC 0.5 at {res_txt(pv, '0.5')}, 0.143 at "
        f"{res_txt(pv, '0.143')}"
    )
    for ck in checks:
        print(
            f"align check seeds {ck['seeds']}: cc {ck['cc_reduced']} ({args.align_global}) vs "
            f"{ck['cc_3000']} (3000); FSC0.5 {ck['fsc05_A_reduced']} vs {ck['fsc05_A_3000']} Å"
        )
    sec = result["seconds"]
    print(
        f"time: runs + truth alignment {sec['reconstructions_and_truth_alignment']:.0f} s "
        f"({sec['runs_reused']} runs reused; all runs: {sec['sum_of_run_wall']:.0f} s wall, "
        f"{sec['sum_of_run_cpu']:.0f} s CPU), pairs {sec['pairs']:.0f} s ({p['mean_align_s']} s "
        f"per alignment), total {sec['total']:.0f} s; wrote {args.out} and {args.png}"
    )
    return 0


def res_txt(summary: dict, thr: str) -> str:
    """Resolution (Å) where a mean curve crosses ``thr``, or "not crossed by Nyquist (... Å)"."""
    r = C.fmt_A(summary["mean_curve_resolution_A"][thr])
    return f"{r} Å" if summary["mean_curve_crosses"][thr] else f"not crossed by Nyquist ({r} Å)"


def plot(
    path: Path,
    freq,
    curves,
    truth_curves,
    truth,
    starts: dict,
    aligned: dict,
    result: dict,
    show: list,
) -> None:
    from matplotlib.ticker import FuncFormatter

    ncol = len(show) + 1
    fig = C.figure(max(2.2 * ncol, 9.0), 10.5)
    gs = fig.add_gridspec(3, ncol, height_ratios=[1, 1, 2.2])
    runs = {r["seed"]: r for r in result["runs"]}
    for j, sd in enumerate(show):
        if sd in starts:
            C.show_slice(
                fig.add_subplot(gs[0, j]), C.central_slice(starts[sd]), f"seed {sd}: random start"
            )
        r = runs[sd]["fsc_vs_truth_A"]["0.5"]
        C.show_slice(
            fig.add_subplot(gs[1, j]),
            C.central_slice(aligned[sd]),
            f"seed {sd}: result (aligned)\nFSC0.5 vs truth {C.fmt_A(r)} Å",
        )
    C.show_slice(fig.add_subplot(gs[1, ncol - 1]), C.central_slice(truth), "truth")
    C.show_slice(fig.add_subplot(gs[0, ncol - 1]), C.central_slice(truth, 1), "truth (y = 0 plane)")

    ax = fig.add_subplot(gs[2, :])
    for k, c in enumerate(truth_curves):
        ax.plot(
            freq,
            c,
            color="C1",
            lw=0.8,
            alpha=0.35,
            label="each run vs truth (aligned)" if k == 0 else None,
        )
    p = result["pairwise"]
    mean, std = np.asarray(p["mean"]), np.asarray(p["std"])
    ax.fill_between(
        freq, p["min"], p["max"], color="C0", alpha=0.15, lw=0, label="pairwise min-max"
    )
    ax.fill_between(
        freq, mean - std, mean + std, color="C0", alpha=0.3, lw=0, label="pairwise mean ± 1 std"
    )
    m = p["mean_curve_resolution_A"]
    ax.plot(
        freq,
        mean,
        color="C0",
        lw=2.0,
        label=f"mean pairwise FSC ({p['n_pairs']} pairs): {res_txt(p, '0.5')} / "
        f"{res_txt(p, '0.143')}",
    )
    for thr, col in ((0.5, "0.4"), (0.143, "0.6")):
        ax.axhline(thr, color=col, ls="--", lw=1)
        ax.annotate(
            f"{thr:g}",
            xy=(0, thr),
            xytext=(2, 2),
            textcoords="offset points",
            color=col,
            fontsize=8,
        )
    if m["0.5"]:
        ax.axvline(1.0 / m["0.5"], color="C0", ls=":", lw=1)
    ax.set_xlim(0, float(freq[-1]))
    ax.set_ylim(min(-0.1, float(np.min(p["min"])) - 0.05), 1.05)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda f, _: "∞" if f <= 0 else f"{1.0 / f:.3g}"))
    ax.set_xlabel("resolution (Å)  [axis linear in spatial frequency, 1/Å]")
    ax.set_ylabel("Fourier shell correlation")
    vt = result["vs_truth"]["mean_curve_resolution_A"]
    ax.set_title(
        f"FSC between the final maps of {len(result['runs'])} random starts (pairwise aligned); "
        f"vs truth (mean curve): {C.fmt_A(vt['0.5'])} / {C.fmt_A(vt['0.143'])} Å",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower left")
    d = result["dataset"]
    fig.suptitle(
        f"Robustness to random starts (paper Fig. 12): GroEL-GroES, {d['n']} particles, box "
        f"{d['box']} at "
        f"{d['apix']:g} Å/px, SNR {d['snr']:g}; central z-slices, 0 (blue) .. map max (red)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, format="png")


if __name__ == "__main__":
    sys.exit(main())
