#!/usr/bin/env python
"""Build ``docs/results.md`` from the benchmarks' JSON (issue 6: one results page).

Every number on the page is read from ``benchmarks/results/*.json`` as the benchmark wrote
it; nothing is typed in. Figures are the PNGs the benchmarks wrote beside their JSON
(linked, not copied). A benchmark that has not been run yet is listed with its command.

    python benchmarks/results_page.py            # -> docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def fig(name: str, alt: str, out: Path) -> str:
    p = RESULTS / f"{name}.png"
    if not p.exists():
        return ""
    return f"![{alt}]({os.path.relpath(p, out.parent)})\n"


def fmt(x, nd=2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** (-nd) or x == 0 else f"{x:.2e}"
    return str(x)


def machine_line(m: dict | None) -> str:
    if not m:
        return ""
    cpus = m.get("cpus", m.get("cpu_count"))
    load = m.get("loadavg_start")
    load = f", load average at start {load[0]:.1f}" if load else ""
    return (
        f"\nMachine: {m.get('platform', '?')}, {cpus} CPU cores, torch "
        f"{m.get('torch', '?')}{load}.\n"
    )


def not_run(cmd: str) -> str:
    return f"*Not run yet.* Command: `{cmd}`\n"


# ---- sections ------------------------------------------------------------------------------------


def section_foundations(out: Path) -> str:
    s = (
        "## Foundations: projector and oracle (issue 2)\n\nCommand: `python "
        "benchmarks/foundations.py`\n\n"
    )
    md = RESULTS / "foundations.md"
    if not md.exists():
        return s + not_run("python benchmarks/foundations.py")
    body = md.read_text().split("\n", 1)[1].strip()  # drop its own title
    return s + body + "\n"


SMALL_CMD = (
    "python benchmarks/small.py --n 4000 --minibatch 100 --grid-scale 3 --omega-every 25 "
    "--max-minutes 14"
)
PAPER50K_CMD = (
    "python benchmarks/small.py --n 50000 --box 128 --apix 2.8 --resolution 9 --grid-scale 3 "
    "--omega-every 25 --minibatch 200 --max-minutes 40 --seeds 1 --snapshots 3 "
    "--work benchmarks/results/paper50k_work --out benchmarks/results/paper50k.json"
)
PAPER_CMD = (
    "python benchmarks/small.py --n 50000 --box 128 --apix 2.8 --resolution 9 --seeds 1 "
    "--is-every 15 --work benchmarks/results/paper_work --out benchmarks/results/paper.json"
)


def section_small(
    out: Path,
    name: str = "small",
    cmd: str = SMALL_CMD,
    title: str = "Ab initio on the `small` set from random starts (issue 3)",
) -> str:
    d = load(name)
    if d is not None and d.get("command"):
        cmd = (
            "python "
            + os.path.relpath(d["command"].split()[0], ROOT)
            + " "
            + " ".join(d["command"].split()[1:])
            if d["command"].startswith("/")
            else "python " + d["command"]
        )
    s = f"## {title}\n\nCommand: `{cmd}`\n\n"
    if d is None:
        return s + not_run(cmd)
    ds, st = d["dataset"], d["settings"]
    s += (
        f"{ds['n']} particles, box {ds['box']}, {ds['apix']} Å/px, SNR {ds['snr']}; cut-off capped "
        f"at {st['resolution']} Å, pose grid ×{st['grid_scale']} coarser, minibatch "
        f"{st['minibatch']}.\nOracle (true poses) band-limited at the cap: FSC 0.5 = "
        f"{d['oracle_capped']['fsc05_A']} Å; unlimited: {d['oracle']['fsc05_A']} / "
        f"{d['oracle']['fsc0143_A']} Å"
        + (
            " (the map the run was given with `--reuse-oracle`; the oracle of this very set is "
            "below)"
            if "--reuse-oracle" in (d.get("command") or "") and load(f"{name}_oracle")
            else ""
        )
        + ".\n\n"
    )
    s += (
        "| seed | iterations | stop | wall s | CPU s | peak RSS MiB | FSC 0.5 Å | FSC 0.143 Å | ÷ "
        "oracle@cap |\n"
    )
    s += "|---|---:|---|---:|---:|---:|---:|---:|---:|\n"
    for r in d["runs"]:
        s += (
            f"| {r['seed']} | {r['iterations']} | {r['stop_reason']} | {r['wall_s']:.0f} | "
            f"{r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['final']['fsc05_A']} | "
            f"{r['final']['fsc0143_A']} | {r['ratio_to_oracle_capped']} |\n"
        )
    s += "\nResolution (FSC 0.5 vs truth, aligned snapshots) over time:\n\n"
    for r in d["runs"]:
        pts = ", ".join(
            f"{p['fsc05_A']} Å at {p['seconds']:.0f} s"
            for p in r["resolution_vs_time"]
            if p.get("seconds") is not None
        )
        s += f"- seed {r['seed']}: {pts}\n"
    o = load(f"{name}_oracle")
    if o is not None:
        bp = o["backproject"]
        s += (
            f"\nOracle of this very set (`{o['command']}`): {bp['wall_s']:.0f} s wall, "
            f"{bp['cpu_s']:.0f} s CPU, {bp['peak_rss_mib'] / 1024:.1f} GiB peak; FSC 0.5 / 0.143 = "
            f"{o['oracle']['fsc05_A']} / {o['oracle']['fsc0143_A']} Å, band-limited at "
            f"{o['resolution_cap_A']} Å: {o['oracle_capped']['fsc05_A']} Å.\n"
        )
    return s + machine_line(d.get("machine"))


def section_importance_accuracy(out: Path) -> str:
    s = "## Importance sampling: accuracy against the exact sum (issue 4, Fig. 8)\n\n"
    found = False
    for name in sorted(p.stem for p in RESULTS.glob("importance_accuracy*.json")):
        d = load(name)
        found = True
        g = d["grid"]
        s += (
            f"### {name}\n\nCommand: `{d.get('command', '')}`\n\nBox {d['box']}, {d['apix']} Å/px, "
            f"cut-off {d['resolution_A']:.1f} Å, grid ×{d['grid_scale']}: {g['M_d']} directions × "
            f"{g['M_psi']} in-plane × {g['M_t']} shifts = {g['poses']:,} poses, "
            f"{d['coefficients']} coefficients; {d['n_particles']} particles × {d['repeats']} "
            f"draws; history '{d['history']}', alpha {d['alpha']}, T {d['temperature']}; exact "
            f"pass {d['exact_seconds']} s; median |log p| {abs(d['exact_loglik']['median']):.0f} "
            "nats.\n\n"
        )
        s += (
            "| s0 | median rel. error | p90 rel. error | median abs. error (nats) | fraction "
            "evaluated | padded fraction computed |\n"
        )
        s += "|---:|---:|---:|---:|---:|---:|\n"
        for r in d["rows"]:
            s += (
                f"| {r['s0']:g} | {r['rel_median']:.2e} | {r['rel_p90']:.2e} | "
                f"{r['abs_nats_median']:.3g} | "
                f"{r['fraction_mean']:.3g} | {r['fraction_computed_mean']:.3g} |\n"
            )
        s += "\n" + fig(name, "relative error and fraction vs s0", out) + "\n"
    if not found:
        s += not_run("python benchmarks/importance_accuracy.py RUN --history exact --tau-prev 2000")
    return s


def step_name(c: dict, st: dict) -> str:
    """The annealing step of a comparison: 0 (or absent) is the CLI's default, a third of
    omega_every."""
    ie = c.get("is_every", st.get("is_every"))
    return str(ie) if ie else f"{max(1, st['omega_every'] // 3)} (default)"


def section_importance_speedup(
    out: Path,
    name: str = "importance_speedup",
    cmd: str = "python benchmarks/importance_speedup.py --seeds 1 --iters 400",
    title: str = "Importance sampling vs exact marginalisation, end to end (issue 4, Fig. 9)",
    checked: bool = True,
) -> str:
    d = load(name)
    s = f"## {title}\n\nCommand: `{d.get('command', cmd) if d else cmd}`\n\n"
    if d is None:
        return s + not_run(cmd)
    st = d["settings"]
    s += (
        f"Same data as `small`, {st['iters']} iterations each, cut-off capped at "
        f"{st['resolution']} Å, grid ×{st['grid_scale']}, minibatch {st['minibatch']}, s0 = "
        f"{st['s0']}; alpha and T of Eq. 20 step every 'annealing step' iterations (the paper: 50 "
        "for a cut-off step of 150; the default keeps that ratio). "
    )
    s += (
        "The importance-sampling run checks its likelihood against the exact one on 16 held-out "
        "particles at every held-out evaluation and steps the annealing back when the error "
        "exceeds 0.1% (`Run.importance_check`).\n\n"
        if checked
        else "These runs predate the held-out check: the annealing followed the paper's clock "
        "alone.\n\n"
    )
    s += (
        "| seed | path | wall s | CPU s | peak RSS MiB | s/iteration at the cap | last fraction "
        "evaluated | FSC 0.5 Å | FSC 0.143 Å |\n"
    )
    s += "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    cap = f"{st['resolution']:.2f}"

    def line(seed, label, r):
        return (
            f"| {seed} | {label} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {fmt(r['seconds_per_iteration_by_resolution_A'].get(cap), 3)} | "
            f"{r['fraction_evaluated'][-1]:.3g} | {r['final']['fsc05_A']} | "
            f"{r['final']['fsc0143_A']} |\n"
        )

    seeds = []
    for c in d["comparisons"]:
        s += line(
            c["seed"], f"importance sampling, annealing step {step_name(c, st)}", c["importance"]
        )
        if c["seed"] not in seeds:
            seeds.append(c["seed"])
    for seed in seeds:
        s += line(seed, "exact", next(c["exact"] for c in d["comparisons"] if c["seed"] == seed))
    s += "\n"
    for c in d["comparisons"]:
        s += (
            f"- seed {c['seed']}, annealing step {step_name(c, st)}: speed-up (exact ÷ IS) "
            f"×{c['speedup_wall']} wall, ×{c['speedup_cpu']} CPU; resolution IS ÷ exact "
            f"×{c['resolution_ratio_fsc05']} (FSC 0.5), ×{c['resolution_ratio_fsc0143']} (0.143)\n"
        )
    s += "\n"
    return (
        s
        + fig(name, "time, fraction evaluated, speed-up per iteration", out)
        + machine_line(d.get("machine"))
    )


def section_importance_locking(out: Path) -> str:
    cmd = "python benchmarks/importance_locking.py RUN"
    s = "## Importance sampling: particles locked onto stale poses (issue 4)\n\n"
    rows = [(n, load(n)) for n in ("importance_locking", "importance_locking_checked")]
    rows = [(n, d) for n, d in rows if d is not None]
    if not rows:
        return s + not_run(cmd)
    s += (
        "At a run's final map, its held-out particles' importance-sampled `-log p` (with their "
        "stored histories) against the exact quadrature, and the angle between the view where "
        "sampling looks (largest stored phi~) and the exact posterior's mode.\n\n"
    )
    s += (
        "| run | iteration | annealing clock (alpha, T) | fraction evaluated | -log p per "
        "particle, IS / exact | deficit (nats, relative) | median angle to exact mode | within 2 "
        "grid steps | exact mass where q looks |\n"
    )
    s += "|---|---:|---|---:|---|---|---:|---:|---:|\n"
    for _n, d in rows:
        nl = d["neg_loglik_per_particle"]
        s += (
            f"| `{d['run']}` | {d['iteration']} | {d['annealing_clock']} ({d['alpha']:.2g}, "
            f"{d['temperature']:.3g}) | {d['fraction_evaluated']:.3g} | {nl['importance']:.1f} / "
            f"{nl['exact']:.1f} | {d['deficit_nats_per_particle']:.2f}, {d['rel_error']:.2e} | "
            f"{d['angle_to_exact_mode_deg']['q50']}° | {d['within_two_grid_steps']:.0%} | "
            f"{d['exact_mass_where_sampling_looks']['median']:.3f} |\n"
        )
    return s + "\nCommands: " + ", ".join(f"`{d['command']}`" for _, d in rows) + "\n"


def section_importance_cost(
    out: Path,
    name: str = "importance_cost",
    title: str = "Importance sampling on the paper's pose grid: cost of one minibatch "
    "(issue 4, Sec. 3.4)",
) -> str:
    d = load(name)
    cmd = (
        "python benchmarks/importance_cost.py benchmarks/results/small_work/run_seed2 "
        "--omegas 0.02 0.025 0.0333 0.04 --batch 50"
    )
    if d is not None and d.get("command"):
        cmd = "python " + d["command"]
    s = f"## {title}\n\nCommand: `{cmd}`\n\n"
    if d is None:
        return s + not_run(cmd)
    s += (
        f"One minibatch of {d['batch']} particles of the `small` set through the engine's own "
        f"`Run.batch_objective` (likelihood, gradient, history update) at the map of `{d['run']}`, "
        f"pose grid ×{d['grid_scale']:g} (the paper's), alpha {d['alpha']:.3g}, T "
        f"{d['temperature']:.3g}, s0 {d['s0']:g}; exact visit first (it stores the history), then "
        "the importance-sampled visit.\n\n"
    )
    s += (
        "| cut-off Å | poses | coefficients | exact s | IS s | speed-up | fraction evaluated | "
        "fraction computed | rel. error of sum log p | gradient cosine "
        "|\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    for r in d["rows"]:
        s += (
            f"| {r['resolution_A']} | {r['poses']:,} | {r['coefficients']} | {r['exact_s']} | "
            f"{r['importance_s']} | "
            f"×{r['speedup']} | {r['fraction_evaluated']:.3g} | {r['fraction_computed']:.3g} | "
            f"{r['rel_error_sum_loglik']:.1e} | {r['gradient_cosine']} |\n"
        )
    for r in d.get("sampled_only", []):
        err = (
            f"{r['rel_error_sum_loglik']:.1e} ({r['reference_particles']} particles, exact by "
            f"rotation chunks in {r['reference_s']} s)"
            if "rel_error_sum_loglik" in r
            else "–"
        )
        s += (
            f"| {r['resolution_A']} | {r['poses']:,} | {r['coefficients']} | (not run) | "
            f"{r['importance_s']} | – | "
            f"{r['fraction_evaluated']:.3g} | {r['fraction_computed']:.3g} | {err} | – |\n"
        )
    if d.get("sampled_only"):
        s += (
            "\nRows without an exact time: the engine's one-shot exact path is out of reach on "
            "this machine; the history is the one from the last exact level, carried by the "
            "kernels as when a run raises omega*.\n"
        )
        if name == "importance_cost" and load("importance_cost_reference") is not None:
            s += (
                "These sampled-only rows predate a fix to the benchmark (after the first "
                "sampled-only level, the history of the previous sampled level was used instead "
                "of the last exact one); the next section's rows supersede them.\n"
            )
    return (
        s
        + "\n"
        + fig(name, "seconds per minibatch and fraction evaluated vs cut-off", out)
        + machine_line(d.get("machine"))
    )


def section_generic(name: str, title: str, cmd: str, out: Path, summarise) -> str:
    d = load(name)
    s = f"## {title}\n\nCommand: `{cmd}`\n\n"
    if d is None:
        return s + not_run(cmd)
    s += summarise(d) + "\n" + fig(name, title, out) + machine_line(d.get("machine"))
    return s


def summarise_projection_matching(d: dict) -> str:
    ds = d["dataset"]
    s = (
        f"{ds['n']} particles, box {ds['box']}, {ds['apix']} Å/px, SNR {ds['snr']} (the demo set). "
        "Both methods start from the same random density (bit-identical) and use the same pose "
        "grids and cut-off schedule; projection matching gets the CPU seconds cryorecon used.\n\n"
    )
    s += (
        "| seed | method | iterations | stop | wall s | CPU s | FSC 0.5 Å | FSC 0.143 Å "
        "|\n|---|---|---:|---|---:|---:|---:|---:|\n"
    )
    for r in d["runs"]:
        for key, label in (
            ("cryorecon", "cryorecon (marginalised, SAGD)"),
            ("projection_matching", "projection matching (hard assignment)"),
        ):
            x = r[key]
            s += (
                f"| {r['seed']} | {label} | {x['iterations']} | {x['stop_reason']} | "
                f"{x['wall_s']:.0f} | {x['cpu_s']:.0f} | {x['fsc0.5_A']} | {x['fsc0.143_A']} |\n"
            )
        s += (
            f"| {r['seed']} | random start | – | – | – | – | {r['start']['fsc0.5_A']} | "
            f"{r['start']['fsc0.143_A']} |\n"
        )
    s += (
        f"| | oracle (true poses) | | | | | {d['oracle']['fsc0.5_A']} | "
        f"{d['oracle']['fsc0.143_A']} |\n| | oracle band-limited at the final cut-off | | | | | "
        f"{d['oracle_capped']['fsc0.5_A']} | {d['oracle_capped']['fsc0.143_A']} |\n"
    )
    return s


def summarise_priors(d: dict) -> str:
    ds, m = d["dataset"], d["background_mask"]
    s = (
        f"{ds['n']} particles, box {ds['box']}, {ds['apix']} Å/px, SNR {ds['snr']}; one seed "
        f"({d['settings']['seed']}) per prior. Background = variance of the density outside a "
        f"{m['kind']} (level {m['level_fraction_of_max']} of the maximum, dilated "
        f"{m['dilate_voxels']} voxels, {m['outside']}) over the variance inside "
        "it. " + d.get("uniform_prior_note", "") + "\n\n"
    )
    s += (
        "| prior | iterations | CPU s | FSC 0.5 Å | FSC 0.143 Å | background variance ratio | "
        "zero voxels outside |\n|---|---:|---:|---:|---:|---:|---:|\n"
    )
    for name, r in d["priors"].items():
        b = r["background"]
        s += (
            f"| {name} | {r['iterations']} | {r['cpu_s']:.0f} | {r['fsc_resolution_A']['0.5']} | "
            f"{r['fsc_resolution_A']['0.143']} | {b['variance_ratio_out_in']:.2e} | "
            f"{b['zero_fraction_outside']:.0%} |\n"
        )
    t = d["truth"]["background"]
    s += (
        f"| (truth) | | | | | {t['variance_ratio_out_in']:.2e} | {t['zero_fraction_outside']:.0%} "
        "|\n"
    )
    return s


def summarise_robustness(d: dict) -> str:
    ds, pw, vt = d["dataset"], d["pairwise"], d["vs_truth"]
    n = len(d["runs"])
    s = (
        f"{ds['n']} particles, box {ds['box']}, {ds['apix']} Å/px, SNR {ds['snr']}; {n} random "
        f"starts (seeds {d['runs'][0]['seed']}..{d['runs'][-1]['seed']}), {pw['n_pairs']} pairs, "
        "each pair aligned (rotation, shift, hand) before its FSC.\n\n"
    )
    s += (
        "| seed | iterations | stop | wall s | CPU s | FSC 0.5 Å vs truth | FSC 0.143 Å vs truth "
        "|\n|---|---:|---|---:|---:|---:|---:|\n"
    )
    for r in d["runs"]:
        s += (
            f"| {r['seed']} | {r['iterations']} | {r['stop_reason']} | {r['wall_s']:.0f} | "
            f"{r['cpu_s']:.0f} | {r['fsc_vs_truth_A']['0.5']} | {r['fsc_vs_truth_A']['0.143']} |\n"
        )
    p5 = pw["pair_resolution_0.5_A"]
    s += (
        f"\nAgainst the truth: FSC 0.5 mean {vt['fsc_0.5_A']['mean']} Å (range "
        f"{vt['fsc_0.5_A']['min']}–{vt['fsc_0.5_A']['max']}), FSC 0.143 mean "
        f"{vt['fsc_0.143_A']['mean']} Å. Between starts: the mean pairwise FSC crosses 0.5 at "
        f"{pw['mean_curve_resolution_A']['0.5']} Å; per pair, FSC 0.5 at {p5['mean']} Å on average "
        f"(range {p5['min']}–{p5['max']}); "
        f"{'no' if not pw['mean_curve_crosses']['0.143'] else 'the'} crossing of 0.143 before "
        "Nyquist (the runs share the same particles, hence the same noise: pairwise FSC measures "
        "agreement, not accuracy). At this resolution the hand is not determined by the data "
        f"(median correlation margin between hands {vt['hand_margin_median']}).\n"
    )
    return s


SECTIONS_EXTRA: list = [
    (
        "robustness",
        "Robustness to random starts (issue 6, Sec. 4.5, Fig. 12)",
        "python benchmarks/robustness.py --starts 10",
        summarise_robustness,
    ),
    (
        "projection_matching",
        "Projection matching from a random start at equal CPU time (issue 6, Sec. 4.5, Fig. 11)",
        "python benchmarks/projection_matching.py",
        summarise_projection_matching,
    ),
    (
        "priors",
        "Priors: exponential, uniform, CAR (issue 6, Sec. 4.6, Fig. 13)",
        "python benchmarks/priors.py",
        summarise_priors,
    ),
]


def build(out: Path) -> str:
    parts = [
        "# cryorecon: measured results\n\nGenerated by `python benchmarks/results_page.py` from "
        "`benchmarks/results/*.json`; every number below was measured by the command shown with "
        "it, on the machine named with it. Rerun a benchmark, then this script, to refresh the "
        "page.\n",
        section_foundations(out),
        section_small(out),
        section_importance_accuracy(out),
        section_importance_cost(out),
        section_importance_cost(
            out,
            "importance_cost_reference",
            "Importance sampling on the paper's pose grid: an exact reference at 20 Å (issue 4)",
        ),
        section_importance_speedup(out),
        section_importance_speedup(
            out,
            "importance_speedup_3seeds_shared",
            "python benchmarks/importance_speedup.py --seeds 1 2 3 --iters 200 --tag _v3 "
            "--out benchmarks/results/importance_speedup_3seeds_shared.json",
            "Importance sampling vs exact, three seeds, 200 iterations: rotating check and "
            "shared-GEMM evaluation of dense sample sets (issue 4)",
        ),
        section_importance_speedup(
            out,
            "importance_speedup_3seeds",
            "python benchmarks/importance_speedup.py --seeds 1 2 3 --iters 200 --tag _v2 "
            "--out benchmarks/results/importance_speedup_3seeds.json",
            "Importance sampling vs exact, three seeds, 200 iterations, check on rotating "
            "particles, before the shared-GEMM route (issue 4)",
        ),
        section_importance_speedup(
            out,
            "importance_speedup_grid2",
            "python benchmarks/importance_speedup.py --seeds 1 --iters 200 --grid-scale 2 "
            "--resolution 25 --tag _g2 --out benchmarks/results/importance_speedup_grid2.json",
            "Importance sampling vs exact on a finer pose grid (×2, cap 25 Å; issue 4)",
        ),
        section_importance_locking(out),
        section_importance_speedup(
            out,
            "importance_speedup_before_check",
            "python benchmarks/importance_speedup.py --iters 200 --is-every 5 15",
            "Importance sampling vs exact, before the held-out check (200 iterations)",
            checked=False,
        ),
        section_small(
            out,
            "paper",
            PAPER_CMD,
            "GroEL-GroES at the paper's box and pixel size (issue 6, Sec. 4.1-4.3, Fig. 5-7)",
        ),
        section_small(
            out,
            "paper50k",
            PAPER50K_CMD,
            "The paper set: 50,000 particles at box 128, 2.8 Å/px, time-capped (issue 4)",
        ),
    ]
    for name, title, cmd, summarise in SECTIONS_EXTRA:
        parts.append(section_generic(name, title, cmd, out, summarise))
    return "\n".join(parts)


# Sections below this line in docs/results.md are written by hand (tables printed by the
# newer benchmarks) and kept as they are when the page is regenerated.
KEEP_MARKER = "<!-- hand-written sections below: kept by results_page.py -->"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = ""
    if args.out.exists() and KEEP_MARKER in args.out.read_text():
        kept = "\n" + KEEP_MARKER + args.out.read_text().split(KEEP_MARKER, 1)[1]
    args.out.write_text(build(args.out) + kept)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
