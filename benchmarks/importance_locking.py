#!/usr/bin/env python
"""Have a run's particles locked onto stale poses under importance sampling? (issue 4, Sec. 3.4)

Importance sampling (Eq. 20) looks near each particle's previous posterior, plus a uniform
share alpha (5% once annealed). If the map changed a lot since that visit, the particle's
best pose under the current map may lie where nothing is drawn, and the sampled estimate of
log p falls short of the exact one. This script measures that on the held-out particles of a
finished run (they never train; every held-out evaluation refreshes their history):

1. the importance-sampled ``-sum log p`` with the run's own stored histories, and the exact
   one by the full quadrature, at the run's final map and cut-off: the deficit in nats per
   particle and relative;
2. per particle, the angle between the view direction with the largest stored phi~ (where
   sampling looks) and the mode of the exact posterior over directions;
3. how much of the exact posterior over directions lies where the sampling distribution
   q^d exceeds twice the uniform level.

    python benchmarks/importance_locking.py benchmarks/results/small_work/speedup_is5_seed1

Writes ``results/importance_locking.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import resume_copy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "run", type=Path, help="a run folder with checkpoint.pt (importance sampling on)"
    )
    ap.add_argument("--particles", type=int, default=100, help="held-out particles examined")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "importance_locking.json")
    args = ap.parse_args()

    from cryorecon.fourier.slicing import spectrum_from_volume
    from cryorecon.model.likelihood import marginal_loglik
    from cryorecon.preprocess import load_batch

    with tempfile.TemporaryDirectory() as tmp:
        run = resume_copy(args.run, Path(tmp) / "run")
        if run.sampler is None:
            print("this run did not use importance sampling", file=sys.stderr)
            return 2
        lvl = run.level(run.schedule.omega_star(run.tau))
        g = lvl.grid
        idx = run.heldout[: args.particles]
        hist = run.sampler.hist
        stored = copy.deepcopy(hist.state_dict())
        clock = run.sampler.annealing_clock(int(hist.tau_prev[idx].max()))
        q_d = run.sampler.distributions(idx, g)[0]
        ev = run.batch_objective(idx, lvl, want_grad=False)
        v_is, is_info = ev.value, {"fraction": ev.fraction}
        hist.load_state_dict(stored)

        batch = load_batch(run.p, idx, lvl.halfplane, run.diameter_px, run.device)
        S = lvl.slice_op.slice(spectrum_from_volume(run.V, run.cfg.oversample))
        res = marginal_loglik(
            S,
            batch,
            lvl.shifts,
            lvl.log_w_rot,
            lvl.log_w_shift,
            want_grad=False,
            want_posteriors=True,
        )
        v_ex = -float(res.loglik.sum())
        p_d = res.post_rot.double().reshape(len(idx), g.M_d, g.M_psi).sum(2)
        i = torch.as_tensor(idx)
        look = hist.d[i][torch.arange(len(idx)), hist.d_logphi[i].argmax(1)].double()
        mode = g.directions[p_d.argmax(1)].double()
        angle = torch.rad2deg(torch.arccos((look * mode).sum(1).clamp(-1, 1))).numpy()
        covered = (p_d * (q_d > 2.0 / g.M_d)).sum(1).numpy()

    result = {
        "benchmark": "importance_locking",
        "run": str(args.run),
        "command": " ".join(sys.argv),
        "iteration": run.tau,
        "resolution_A": round(1 / lvl.omega, 2),
        "particles": len(idx),
        "annealing_clock": clock,
        "alpha": run.schedule.alpha(clock),
        "temperature": run.schedule.temperature(clock),
        "fraction_evaluated": is_info["fraction"],
        "grid_spacing_deg": round(math.degrees(g.r_d), 2),
        "neg_loglik_per_particle": {"importance": v_is / len(idx), "exact": v_ex / len(idx)},
        "deficit_nats_per_particle": (v_is - v_ex) / len(idx),
        "rel_error": (v_is - v_ex) / abs(v_ex),
        "angle_to_exact_mode_deg": {
            f"q{int(q * 100)}": round(float(np.quantile(angle, q)), 1)
            for q in (0.1, 0.25, 0.5, 0.75, 0.9)
        },
        "within_two_grid_steps": float(np.mean(angle <= 2 * math.degrees(g.r_d))),
        "exact_mass_where_sampling_looks": {
            "median": float(np.median(covered)),
            "mean": float(covered.mean()),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
