#!/usr/bin/env python
"""Cost of one SAGD minibatch with and without importance sampling, on the paper's pose grid.

Issue 4 / paper Sec. 3.4: the exact marginalisation grows like (D omega*)^7; importance
sampling should make a minibatch far cheaper at high resolution. End-to-end runs at the
paper's grid are out of reach on a CPU, so this benchmark measures single minibatches of the
engine itself (``Run.batch_objective``: likelihood, gradient, pose-history update) at several
cut-offs, from a finished run's map:

1. resume the run (``RUN``, e.g. ``benchmarks/results/small_work/run_seed2``) in a scratch
   copy, switch the quadrature to ``--grid-scale`` (1 = the paper's) and set the iteration
   to ``--tau`` (late in a run: alpha = 0.05, T = 1.25 with the paper's annealing);
2. for each omega*: evaluate one minibatch of ``--batch`` training particles exactly (their
   history is cleared first, so the engine takes the exact path; this visit stores their
   posteriors as the history), then evaluate the same minibatch again with importance
   sampling (Eq. 13, s0 = the run's);
3. report wall seconds of each evaluation, their ratio, the fraction of the full quadrature
   evaluated (and computed, with padding), the relative error of the minibatch's summed
   log-likelihood, and the cosine between the two density gradients;
4. at finer cut-offs (``--sampled-only``) time the importance-sampled minibatch alone and, at
   those in ``--reference-at``, compare its estimate on ``--reference-particles`` particles with
   the exact sum computed anyway (rotation chunks, no gradient: minutes where the engine's
   one-shot exact path would need tens of GB).

The pose grid, map, particles and code path are those of a real run; only the number of
minibatches is one. Writes ``results/importance_cost.json`` and a PNG.

    python benchmarks/importance_cost.py benchmarks/results/small_work/run_seed2 \\
        --omegas 0.02 0.025 0.033 0.04
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import resume_copy  # noqa: E402


def timed(fn, *args):
    """``(fn(*args), wall seconds)``."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def exact_neg_loglik(run, idx, lvl, chunk: int = 20000) -> float:
    """``-sum log p`` of particles ``idx`` by the exact quadrature, in chunks of rotations
    (log-sum-exp across chunks), so that grids too large for the engine's one-shot exact path
    still get a reference value. No gradient."""
    from cryorecon.fourier.slicing import spectrum_from_volume
    from cryorecon.model.likelihood import marginal_loglik
    from cryorecon.preprocess import load_batch

    batch = load_batch(run.p, idx, lvl.halfplane, run.diameter_px, run.device)
    spec = spectrum_from_volume(run.V, run.cfg.oversample)
    J = lvl.rotations.shape[0]
    total = torch.full((len(idx),), -float("inf"), dtype=torch.float64)
    for r0 in range(0, J, chunk):
        rows = torch.arange(r0, min(J, r0 + chunk))
        res = marginal_loglik(
            lvl.slice_op.subset(rows).slice(spec),
            batch,
            lvl.shifts,
            lvl.log_w_rot[rows],
            lvl.log_w_shift,
            want_grad=False,
        )
        total = torch.logaddexp(total, res.loglik.cpu())
    return -float(total.sum())


def level_row(omega: float, lvl, t_level: float, t_is: float, info: dict) -> dict:
    """The grid sizes of a level and its importance-sampled minibatch: time and fractions."""
    g = lvl.grid
    return {
        "omega_star": omega,
        "resolution_A": round(1 / omega, 2),
        "M_d": g.M_d,
        "M_psi": g.M_psi,
        "M_t": g.M_t,
        "poses": g.n_rotations * g.M_t,
        "coefficients": lvl.halfplane.M,
        "level_build_s": round(t_level, 2),
        "importance_s": round(t_is, 3),
        "fraction_evaluated": info["fraction"],
        "fraction_computed": info["computed"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run", type=Path, help="a run folder with checkpoint.pt and run.json")
    ap.add_argument("--omegas", type=float, nargs="+", default=[0.02, 0.025, 0.0333, 0.04])
    ap.add_argument(
        "--sampled-only",
        type=float,
        nargs="*",
        default=[0.05, 0.0667, 0.0893],
        help="further cut-offs (1/Å) where only the importance-sampled minibatch is evaluated (the "
        "exact one is out of reach), with the history of the last exact visit carried by the "
        "kernels as when a run raises omega*",
    )
    ap.add_argument(
        "--reference-at",
        type=float,
        nargs="*",
        default=[],
        help="sampled-only cut-offs where an exact reference is computed anyway, chunked over "
        "rotations and without the gradient, on --reference-particles particles",
    )
    ap.add_argument("--reference-particles", type=int, default=20)
    ap.add_argument("--grid-scale", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument(
        "--tau", type=int, default=2000, help="iteration of the previous visit (fixes alpha, T)"
    )
    ap.add_argument("--work", type=Path, default=HERE / "results" / "importance_cost_work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "importance_cost.json")
    args = ap.parse_args()

    run = resume_copy(args.run, args.work)
    run.cfg = dataclasses.replace(run.cfg, grid_scale=args.grid_scale)
    run.tau = args.tau
    idx = np.asarray(run.batches[0][: args.batch])
    sampler = run.sampler
    print(
        f"run {args.run}: box {run.D}, {run.apix} Å/px; {len(idx)} particles; grid "
        f"x{args.grid_scale}; alpha {run.schedule.alpha(args.tau):.3g}, T "
        f"{run.schedule.temperature(args.tau):.3g}, s0 {run.cfg.s0}",
        flush=True,
    )
    rows = []
    for omega in args.omegas:
        lvl, t_level = timed(run.level, omega)
        sampler.hist.tau_prev[idx] = -1  # no history: the engine's exact path, which stores one
        ev_ex, t_ex = timed(run.batch_objective, idx, lvl)
        ev_is, t_is = timed(run.batch_objective, idx, lvl)
        v_ex, g_ex, v_is, g_is = ev_ex.value, ev_ex.grad, ev_is.value, ev_is.grad
        i_ex, i_is = (
            {"fraction": ev_ex.fraction},
            {"fraction": ev_is.fraction, "computed": ev_is.computed},
        )
        cos = float(
            (g_ex.double() * g_is.double()).sum() / (g_ex.double().norm() * g_is.double().norm())
        )
        row = {
            **level_row(omega, lvl, t_level, t_is, i_is),
            "exact_s": round(t_ex, 3),
            "speedup": round(t_ex / t_is, 2),
            "exact_fraction": i_ex["fraction"],
            "rel_error_sum_loglik": abs(v_is - v_ex) / abs(v_ex),
            "gradient_cosine": round(cos, 5),
        }
        rows.append(row)
        print(
            f"  1/{1 / omega:.1f} Å: {row['poses']:,} poses x {row['coefficients']} coefficients; "
            f"exact {t_ex:.2f} s, IS {t_is:.2f} s (x{row['speedup']}); fraction "
            f"{row['fraction_evaluated']:.3g} (computed {row['fraction_computed']:.3g}); rel. "
            f"error {row['rel_error_sum_loglik']:.2e}; gradient cosine {cos:.4f}",
            flush=True,
        )
    sampled_only, saved = [], None
    for omega in args.sampled_only:
        lvl, t_level = timed(run.level, omega)
        if saved is None:  # the history of the last exact visit, kept for every finer level
            saved = copy.deepcopy(sampler.hist.state_dict())
        ev_is, t_is = timed(run.batch_objective, idx, lvl)
        i_is = {"fraction": ev_is.fraction, "computed": ev_is.computed}
        sampler.hist.load_state_dict(copy.deepcopy(saved))
        row = level_row(omega, lvl, t_level, t_is, i_is)
        if omega in args.reference_at:
            sub = idx[: args.reference_particles]
            v_sub = run.batch_objective(sub, lvl, want_grad=False).value
            sampler.hist.load_state_dict(copy.deepcopy(saved))
            v_ref, t_ref = timed(exact_neg_loglik, run, sub, lvl)
            row.update(
                {
                    "reference_particles": len(sub),
                    "reference_s": round(t_ref, 1),
                    "rel_error_sum_loglik": abs(v_sub - v_ref) / abs(v_ref),
                }
            )
        sampled_only.append(row)
        err = (
            f"; rel. error {row['rel_error_sum_loglik']:.2e} on {len(sub)} particles"
            if "reference_s" in row
            else ""
        )
        print(
            f"  1/{1 / omega:.1f} Å (sampled only): {row['poses']:,} poses x {row['coefficients']} "
            f"coefficients; IS {t_is:.2f} s; fraction {row['fraction_evaluated']:.3g} (computed "
            f"{row['fraction_computed']:.3g}){err}",
            flush=True,
        )
    result = {
        "benchmark": "importance_cost",
        "run": str(args.run),
        "batch": len(idx),
        "grid_scale": args.grid_scale,
        "tau_prev": args.tau,
        "alpha": run.schedule.alpha(args.tau),
        "temperature": run.schedule.temperature(args.tau),
        "s0": run.cfg.s0,
        "rows": rows,
        "sampled_only": sampled_only,
        "command": " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "loadavg_start": os.getloadavg(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    shutil.rmtree(args.work)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    res = [r["resolution_A"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(res, [r["exact_s"] for r in rows], "o-", label="exact quadrature")
    a.plot(res, [r["importance_s"] for r in rows], "s-", label="importance sampling")
    a.set(
        xlabel="cut-off 1/omega* (Å)",
        ylabel="seconds per minibatch",
        yscale="log",
        title=f"one minibatch of {result['batch']} (likelihood + gradient), grid "
        f"x{result['grid_scale']:g}",
    )
    so = result.get("sampled_only", [])
    if so:
        a.plot(
            [r["resolution_A"] for r in so],
            [r["importance_s"] for r in so],
            "s:",
            color="C1",
            label="importance sampling (no exact reference)",
        )
        b.plot(
            [r["resolution_A"] for r in so], [r["fraction_evaluated"] for r in so], "o:", color="C0"
        )
    b.plot(res, [r["fraction_evaluated"] for r in rows], "o-", label="fraction evaluated")
    b.plot(res, [r["fraction_computed"] for r in rows], "s--", label="fraction computed (padding)")
    b.set(
        xlabel="cut-off 1/omega* (Å)",
        ylabel="fraction of the full quadrature",
        yscale="log",
        title="poses evaluated",
    )
    for ax in (a, b):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
