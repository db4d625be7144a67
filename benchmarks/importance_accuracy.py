#!/usr/bin/env python
"""Benchmark `importance_accuracy` (paper Sec. 4.4, Fig. 8): error of log p(I) by importance
sampling against the exact quadrature sum, and the fraction of quadrature points evaluated,
as functions of the ESS scaling factor s0.

For ``--n-particles`` particles (seeded choice) of a run folder it

1. loads the run's map ``V`` and configuration (``checkpoint.pt``, ``run.json``) and builds
   the quadrature of ``--omega`` (default: the last omega* in ``metrics.jsonl``) with the
   run's grid scale (:func:`cryorecon.reconstruct.make_level`);
2. computes the exact log p(I) (Eq. 4) and the exact pose posteriors with
   :func:`~cryorecon.model.likelihood.marginal_loglik` at the current map;
3. builds each particle's "previous visit" for the importance distributions (Eq. 20):
   ``--history run`` takes the run's stored PoseHistory (checkpoint ``importance``) for those
   particles; ``--history exact`` stores the exact posterior of step 2 with
   ``ImportanceSampler.update_exact`` (the paper's situation after a converged previous
   epoch); ``auto`` (default) uses ``run`` when the checkpoint holds history for at least
   ``--n-particles`` particles (they are then drawn among those), else ``exact``;
4. for each s0 and each of ``--repeats`` independent draws, plans poses
   (``ImportanceSampler.split_plan``, per group of ``--chunk`` particles like the engine's
   minibatches: images whose own pose set exceeds ``MAX_SAMPLED_FRACTION`` of the grid take
   the exact sum, the rest are sampled in size groups) and evaluates Eq. 13 with
   :func:`~cryorecon.model.likelihood.sampled_loglik_groups`.

Recorded per particle and draw: relative error ``|log p_IS - log p| / |log p|``, absolute and
signed error in nats, and the fraction of the full quadrature (rotations x shifts) evaluated
for that particle. A ``None`` plan (every draw of the group covers whole grids) means the
exact sum is used: fraction 1, error 0; it is counted (``plans_none``). Rows routed to the
exact sum (``rows_exact``) count fraction 1 and error 0 (``numerical_floor_nats`` checks the
sampled code path against the exact one on the whole grid for ``--floor-check`` particles).
``fraction`` counts each particle's own poses (as ``Plan.fraction`` and the run's
``fraction_evaluated`` do);
``fraction_computed`` counts what the engine really evaluates: exact images whole, sampled
images padded to their group's largest n_d x n_psi and n_t. Per-s0 ``seconds`` cover
``--repeats`` passes; ``exact_seconds`` one exact pass.

Note on the scale of the relative error: the likelihood drops constants (see
``likelihood.py``), so |log p| is about the number of real degrees of freedom inside omega*
over two (hundreds of nats for small boxes, far more for 128^2 images); the absolute error in
nats does not depend on that convention.

``--tau-prev`` sets the previous visit's iteration, which fixes alpha and T of Eq. 20
(Sec. 3.4.1). Default: with ``exact`` history the run's iteration tau; with ``run`` history
the stored per-particle values (the engine takes the largest in each group).

Prints a table, writes JSON (``--out``) and a PNG plot beside it (same stem): median and 90th
percentile relative error and mean fraction evaluated against s0, log axes.

    python benchmarks/importance_accuracy.py RUN
    python benchmarks/importance_accuracy.py RUN --history exact --tau-prev 2000 --s0 1 3 10 30 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def last_omega(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    omega = None
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                omega = json.loads(line)["omega_star"]
            except (ValueError, KeyError):
                pass  # a line being written
    return omega


def resolve_particles(arg: str | None, info: dict, run: Path) -> Path:
    if arg:
        return Path(arg)
    p = Path(info["particles"])
    for cand in (p, run / p, run.parent / p):
        if cand.exists():
            return cand
    raise SystemExit(f"particle file {p} of {run / 'run.json'} not found; pass --particles")


def pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run", type=Path, help="run folder (checkpoint.pt, run.json, metrics.jsonl)")
    ap.add_argument("--particles", help="particle file (default: the one in run.json)")
    ap.add_argument("--n-particles", type=int, default=100)
    ap.add_argument("--s0", type=float, nargs="+", default=[1, 3, 10, 30, 100])
    ap.add_argument(
        "--omega", type=float, default=None, help="band limit 1/Å (default: the run's last omega*)"
    )
    ap.add_argument(
        "--grid-scale", type=float, default=None, help="quadrature coarsening (default: the run's)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="independent draws per s0")
    ap.add_argument(
        "--tau-prev",
        type=int,
        default=None,
        help="iteration of the previous visit (alpha, T of Eq. 20); see the module notes",
    )
    ap.add_argument("--history", choices=["auto", "run", "exact"], default="auto")
    ap.add_argument(
        "--chunk", type=int, default=None, help="particles per plan (default: the run's minibatch)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--floor-check",
        type=int,
        default=4,
        help="particles for the whole-grid check of sampled_loglik against marginal_loglik (0: "
        "off)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "importance_accuracy.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from cryorecon.config import ReconstructConfig
    from cryorecon.fourier.slicing import SliceOperator, spectrum_from_volume
    from cryorecon.io.particles import read_particles
    from cryorecon.model.importance import ImportanceSampler, ISConfig, PoseHistory
    from cryorecon.model.likelihood import marginal_loglik, sampled_loglik, sampled_loglik_groups
    from cryorecon.model.objective import MAX_SAMPLED_FRACTION
    from cryorecon.preprocess import load_batch
    from cryorecon.start import make_level

    t_start = time.perf_counter()
    run = args.run
    info = json.loads((run / "run.json").read_text())
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg_d = {
        k: v for k, v in state["config"].items() if k in ReconstructConfig.__dataclass_fields__
    }
    cfg = ReconstructConfig(**cfg_d)
    ps = read_particles(resolve_particles(args.particles, info, run))
    D = ps.D
    apix = float(info.get("apix") or np.median(ps.apix))
    diameter_px = float(info["diameter_A"]) / apix
    shift_sigma_px = float(info["shift_sigma_A"]) / apix
    tau_run = int(state["tau"])
    schedule = cfg.schedule(apix)
    omega = args.omega or last_omega(run) or schedule.omega_star(max(tau_run, 1))
    grid_scale = args.grid_scale if args.grid_scale is not None else cfg.grid_scale
    chunk = args.chunk or cfg.minibatch
    ov = cfg.oversample

    lvl = make_level(omega, D, apix, shift_sigma_px, grid_scale, "cpu", ov)
    grid = lvl.grid
    V = state["V"].float()
    spec = spectrum_from_volume(V, ov)
    freqs_px = lvl.halfplane.freqs() * D

    # ---- particles and history mode ------------------------------------------------------
    hist_state = state.get("importance")
    n_total = len(ps)
    has_hist = (
        (np.asarray(hist_state["tau_prev"]) >= 0)
        if hist_state is not None
        else np.zeros(n_total, bool)
    )
    mode = args.history
    if mode == "auto":
        mode = "run" if has_hist.sum() >= args.n_particles else "exact"
    if mode == "run" and hist_state is None:
        raise SystemExit(
            "the checkpoint holds no importance-sampling history (run with --exact?); use "
            "--history exact"
        )
    pool = np.flatnonzero(has_hist) if mode == "run" else np.arange(n_total)
    if len(pool) < args.n_particles:
        raise SystemExit(
            f"only {len(pool)} particles available for --history {mode}; lower --n-particles"
        )
    rng = np.random.default_rng(args.seed)
    pidx = np.sort(rng.choice(pool, args.n_particles, replace=False))
    n = len(pidx)
    groups = [np.arange(s, min(n, s + chunk)) for s in range(0, n, chunk)]  # local indices

    print(
        f"run {run} (tau {tau_run}); omega* {omega:.4g} 1/Å ({1 / omega:.1f} Å), grid scale "
        f"{grid_scale}: M_d {grid.M_d}, M_psi {grid.M_psi}, M_t {grid.M_t} "
        f"({grid.n_rotations * grid.M_t} poses), {lvl.halfplane.M} coefficients; {n} particles, "
        f"history '{mode}'",
        flush=True,
    )

    # ---- exact log p and posteriors ----------------------------------------------------------
    t0 = time.perf_counter()
    slices_full = lvl.slice_op.slice(spec)
    batches, exact_ll, post_rot, post_shift = [], [], [], []
    for g in groups:
        b = load_batch(ps, pidx[g], lvl.halfplane, diameter_px, "cpu")
        r = marginal_loglik(
            slices_full,
            b,
            lvl.shifts,
            lvl.log_w_rot,
            lvl.log_w_shift,
            want_grad=False,
            want_posteriors=True,
        )
        batches.append(b)
        exact_ll.append(r.loglik)
        post_rot.append(r.post_rot)
        post_shift.append(r.post_shift)
    exact = torch.cat(exact_ll).numpy()
    t_exact = time.perf_counter() - t0
    print(f"exact log p: median {np.median(exact):.2f} nats ({t_exact:.1f} s)", flush=True)

    # ---- numerical floor: Eq. 13 with the whole grid as the "sample" must equal Eq. 4 ----------
    nf = min(args.floor_check, len(groups[0]))
    floor_nats = None
    if nf > 0:
        sub = lambda x: x[:nf]  # noqa: E731
        b0 = batches[0]
        bf = type(b0)(sub(b0.y), sub(b0.ctf), sub(b0.sigma2), b0.weight, b0.freqs)
        J = grid.n_rotations
        rf = sampled_loglik(
            slices_full,
            bf,
            torch.arange(J).expand(nf, J),
            lvl.log_w_rot.expand(nf, J),
            lvl.shifts.expand(nf, -1, -1),
            lvl.log_w_shift.expand(nf, -1),
            want_grad=False,
        )
        floor_nats = float((rf.loglik - exact_ll[0][:nf]).abs().max())
        print(
            f"numerical floor (whole grid through sampled_loglik vs marginal_loglik, {nf} "
            f"particles): {floor_nats:.2e} nats",
            flush=True,
        )

    del slices_full

    # ---- history ("previous visit") -------------------------------------------------------------
    sampler = ImportanceSampler(n, ISConfig(s0=1.0), schedule, args.seed)
    if mode == "run":
        keep = dict(
            keep_d=hist_state["d"].shape[1],
            keep_psi=hist_state["psi"].shape[1],
            keep_t=hist_state["t"].shape[1],
        )
        sampler.cfg = ISConfig(s0=1.0, **keep)
        sampler.hist = PoseHistory(n, sampler.cfg)
        sampler.hist.load_state_dict(
            {
                k: (
                    v[pidx].copy()
                    if isinstance(v, np.ndarray)
                    else v[torch.as_tensor(pidx)].clone()
                )
                for k, v in hist_state.items()
            }
        )
        if args.tau_prev is not None:
            sampler.hist.tau_prev[:] = args.tau_prev
    else:
        tp = args.tau_prev if args.tau_prev is not None else tau_run
        for g, pr, psh in zip(groups, post_rot, post_shift):
            sampler.update_exact(g, tp, pr, psh, grid)
    tau_prev = sampler.hist.tau_prev.copy()
    tp_groups = [int(tau_prev[g].max()) for g in groups]
    alphas = sorted({schedule.alpha(max(t, 0)) for t in tp_groups})
    temps = sorted({schedule.temperature(max(t, 0)) for t in tp_groups})
    print(
        f"tau_prev: {np.min(tau_prev)}..{np.max(tau_prev)} (groups use {sorted(set(tp_groups))}); "
        f"alpha {', '.join(f'{a:.3g}' for a in alphas)}; T {', '.join(f'{t:.3g}' for t in temps)}",
        flush=True,
    )

    # ---- importance sampling at each s0 ----------------------------------------------------------
    full = grid.n_rotations * grid.M_t
    rows = []
    for si, s0 in enumerate(args.s0):
        t0 = time.perf_counter()
        sampler.cfg.s0 = float(s0)
        rel, absn, signed, frac, exact_rows = [], [], [], [], []
        plan_fracs, comp_fracs, plans_none, plans_total = [], [], 0, 0
        uniq = {"d": [], "psi": [], "t": []}
        for rep in range(args.repeats):
            sampler.gen.manual_seed(args.seed * 1_000_003 + 7919 * si + rep)
            for g, b, ll in zip(groups, batches, exact_ll):
                plans_total += 1
                plan = sampler.split_plan(g, grid, MAX_SAMPLED_FRACTION)
                if plan is None:
                    plans_none += 1
                    est = ll.clone()
                    f_row = np.ones(len(g))
                    ex_row = np.ones(len(g), bool)
                    plan_fracs.append(1.0)
                    comp_fracs.append(1.0)
                    for k, M in (("d", grid.M_d), ("psi", grid.M_psi), ("t", grid.M_t)):
                        uniq[k].append(np.full(len(g), M))
                else:
                    # As the engine: diffuse images exact, the rest sampled in size groups.
                    op = SliceOperator(sampler.rotations(plan, grid), freqs_px, D, ov)
                    r = sampled_loglik_groups(op.slice(spec), b, plan.groups, want_grad=False)
                    est = ll.clone()
                    f_row = np.ones(len(g))
                    ex_row = np.zeros(len(g), bool)
                    ex_row[plan.exact_rows.numpy()] = True
                    for k, M in (("d", grid.M_d), ("psi", grid.M_psi), ("t", grid.M_t)):
                        uniq[k].append(np.full(len(plan.exact_rows), M))
                    for grp, res in zip(plan.groups, r.groups):
                        gr = grp.rows.numpy()
                        est[gr] = res.loglik
                        n_rot = torch.isfinite(grp.rot_logw).sum(-1)
                        n_sh = torch.isfinite(grp.shift_logw).sum(-1)
                        f_row[gr] = (n_rot * n_sh).double().numpy() / full
                        for k, lc in (("d", grp.lc_d), ("psi", grp.lc_psi), ("t", grp.lc_t)):
                            uniq[k].append(torch.isfinite(lc).sum(-1).numpy())
                    plan_fracs.append(plan.fraction)
                    # What the engine computes: exact images count 1, sampled groups are padded
                    # to their largest n_d x n_psi and n_t.
                    comp_fracs.append(plan.fraction_computed)
                    del op
                d = (est - ll).numpy()
                rel.append(np.abs(d) / np.abs(ll.numpy()))
                absn.append(np.abs(d))
                signed.append(d)
                frac.append(f_row)
                exact_rows.append(ex_row)
        rel, absn, signed, frac = (np.concatenate(x) for x in (rel, absn, signed, frac))
        exact_rows = np.concatenate(exact_rows)
        sampled = ~exact_rows
        row = {
            "s0": float(s0),
            "n": int(len(rel)),
            "rel_median": float(np.median(rel)),
            "rel_p90": pct(rel, 90),
            "rel_mean": float(rel.mean()),
            "rel_max": float(rel.max()),
            "abs_nats_median": float(np.median(absn)),
            "abs_nats_p90": pct(absn, 90),
            "abs_nats_max": float(absn.max()),
            "signed_nats_mean": float(signed.mean()),
            "fraction_mean": float(frac.mean()),
            "fraction_median": float(np.median(frac)),
            "fraction_plan_mean": float(np.mean(plan_fracs)),
            "fraction_computed_mean": float(np.mean(comp_fracs)),
            "plans_none": plans_none,
            "plans_total": plans_total,
            "rows_exact": int(exact_rows.sum()),
            "rel_median_sampled_rows": float(np.median(rel[sampled])) if sampled.any() else None,
            "rel_p90_sampled_rows": pct(rel[sampled], 90) if sampled.any() else None,
            "floor_abs_nats": float(absn[exact_rows].max()) if exact_rows.any() else None,
            "unique_draws_mean": {k: float(np.concatenate(v).mean()) for k, v in uniq.items()},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        rows.append(row)
        print(
            f"  s0 {s0:g}: rel median {row['rel_median']:.2e}, p90 {row['rel_p90']:.2e}, "
            f"fraction {row['fraction_mean']:.3g} ({row['seconds']} s)",
            flush=True,
        )

    # ---- report ----------------------------------------------------------------------------------
    hdr = (
        f"{'s0':>6} {'rel med':>9} {'rel p90':>9} {'rel max':>9} {'|d| med':>9} {'|d| p90':>9} "
        f"{'mean d':>9} {'fraction':>9} {'speedup':>8} {'computed':>9} {'exact rows':>10} "
        f"{'None':>6}  uniq d/psi/t"
    )
    print()
    print(hdr)
    for r in rows:
        u = r["unique_draws_mean"]
        print(
            f"{r['s0']:>6g} {r['rel_median']:>9.2e} {r['rel_p90']:>9.2e} {r['rel_max']:>9.2e} "
            f"{r['abs_nats_median']:>9.3g} {r['abs_nats_p90']:>9.3g} "
            f"{r['signed_nats_mean']:>+9.3g} {r['fraction_mean']:>9.3g} "
            f"{1 / r['fraction_mean']:>8.3g} {r['fraction_computed_mean']:>9.3g} "
            f"{r['rows_exact']:>5}/{r['n']:<4} {r['plans_none']:>3}/{r['plans_total']:<2}  "
            f"{u['d']:.1f}/{u['psi']:.1f}/{u['t']:.1f}"
        )
    print(
        "(rel = |log p_IS - log p| / |log p|; |d| in nats; fraction = poses evaluated / full "
        "quadrature; computed: what the engine evaluates (exact images whole, groups padded to "
        "max n_d x n_psi x n_t); exact rows: images routed to the exact sum; None: plans entirely "
        "exact)"
    )

    result = {
        "benchmark": "importance_accuracy",
        "run": str(run),
        "particles": str(ps.source),
        "tau_run": tau_run,
        "omega_star": omega,
        "resolution_A": 1.0 / omega,
        "grid_scale": grid_scale,
        "box": D,
        "apix": apix,
        "grid": {"M_d": grid.M_d, "M_psi": grid.M_psi, "M_t": grid.M_t, "poses": full},
        "coefficients": int(lvl.halfplane.M),
        "n_particles": n,
        "particle_indices": pidx.tolist(),
        "repeats": args.repeats,
        "chunk": chunk,
        "seed": args.seed,
        "history": mode,
        "tau_prev": {"min": int(tau_prev.min()), "max": int(tau_prev.max()), "groups": tp_groups},
        "alpha": alphas,
        "temperature": temps,
        "exact_loglik": {
            "median": float(np.median(exact)),
            "min": float(exact.min()),
            "max": float(exact.max()),
        },
        "exact_seconds": round(t_exact, 2),
        "numerical_floor_nats": floor_nats,
        "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 2),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    png = args.out.with_suffix(".png")
    plot(
        rows,
        png,
        f"{n} particles, {1 / omega:.0f} Å, history '{mode}', tau_prev {int(np.median(tau_prev))}",
    )
    print(f"wrote {args.out} and {png}")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s0 = np.array([r["s0"] for r in rows])
    med = np.array([r["rel_median"] for r in rows])
    p90 = np.array([r["rel_p90"] for r in rows])
    frac = np.array([r["fraction_mean"] for r in rows])
    pos = np.concatenate([med[med > 0], p90[p90 > 0]])
    # Zero errors (the exact sum was used) cannot sit on a log axis: hollow markers at a floor.
    floor = float(pos.min()) / 10 if len(pos) else 1e-6
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(
        s0, np.where(med > 0, med, np.nan), "o-", color="tab:blue", label="relative error, median"
    )
    ax.loglog(
        s0,
        np.where(p90 > 0, p90, np.nan),
        "s--",
        color="tab:blue",
        alpha=0.6,
        label="relative error, 90th pct",
    )
    zero = p90 <= 0
    if zero.any():
        ax.loglog(
            s0[zero],
            np.full(zero.sum(), floor),
            "o",
            mfc="none",
            color="tab:blue",
            label="error 0 (exact sum used), drawn at floor",
        )
    ax.set_xlabel("ESS scaling factor $s_0$")
    ax.set_ylabel("relative error of log p(I)", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    ax2 = ax.twinx()
    ax2.loglog(s0, frac, "^-", color="tab:red", label="fraction evaluated")
    ax2.set_ylabel("fraction of quadrature points", color="tab:red")
    ax2.set_ylim(top=max(1.5, float(frac.max()) * 1.5))
    ax2.tick_params(axis="y", colors="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
