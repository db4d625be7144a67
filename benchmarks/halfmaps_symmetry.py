"""Half-map resolution against the truth (issue 14) and symmetric against C1 runs (issue 16).

One simulated GroEL-GroES set (C7). Runs ``cryorecon reconstruct`` with default flags (half
maps on) in C1 and with ``--symmetry C7`` for the same wall time, and reports for each:
the gold-standard resolution the run states (``run.json``: half-map FSC 0.143, masked and
corrected), the FSC 0.5 / 0.143 of ``volume.mrc`` against the truth after alignment, their
ratio, the seconds and poses per iteration (median), and the symmetry score of the map.
Prints a table and writes ``results/halfmaps_symmetry.json``.

    .venv/bin/python benchmarks/halfmaps_symmetry.py --n 4000 --box 32 --apix 10 --minutes 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, quiet, score_vs_truth, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--apix", type=float, default=10.0)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--groups", nargs="+", default=["C1", "C7"])
    ap.add_argument("--work", type=Path, default=RESULTS / "halfmaps_symmetry_work")
    ap.add_argument("--out", type=Path, default=RESULTS / "halfmaps_symmetry.json")
    args, extra = ap.parse_known_args(argv)
    quiet()
    from cryorecon.cli import main as cli
    from cryorecon.geometry.symmetry import parse_symmetry
    from cryorecon.io.mrc import read_map
    from cryorecon.simulate import run_simulation
    from cryorecon.symmetrize import symmetry_score

    data = args.work / "data"
    if not (data / "particles.star").exists():
        run_simulation(data, n=args.n, D=args.box, apix=args.apix, snr=args.snr, seed=0)
    truth = torch.as_tensor(read_map(data / "truth.mrc")[0])
    rows = []
    for g in args.groups:
        run = args.work / f"run_{g}"
        rc = cli(
            [
                "-q",
                "reconstruct",
                str(data / "particles.star"),
                "-o",
                str(run),
                "--force",
                "--max-time",
                str(args.minutes),
                "--symmetry",
                g,
                # No report refreshes inside the timed loop: "--report-every 0" means "every
                # iteration", about 2 s each at box 32, which made both runs' seconds per
                # iteration a fixed cost (the report is still written once at the end).
                "--report-every",
                "100000",
                *extra,
            ]
        )
        info = json.loads((run / "run.json").read_text())
        recs = [
            json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()
        ]
        vol = torch.as_tensor(read_map(run / "volume.mrc")[0])
        sc = score_vs_truth(truth, vol, args.apix, 0, 1000)
        gs = info.get("gold_standard_resolution_A")
        r05 = sc["resolution_A"]["0.5"]
        rows.append(
            {
                "symmetry": g,
                "rc": rc,
                "iterations": info["iterations"],
                "seconds": round(info["seconds"], 1),
                "stop_reason": info["stop_reason"],
                "gold_standard_resolution_A": gs,
                "fsc_vs_truth_A": sc["resolution_A"],
                "ratio_gold_to_truth_05": None if not (gs and r05) else round(gs / r05, 3),
                "median_s_per_iteration": float(np.median(np.diff([r["seconds"] for r in recs]))),
                "median_poses_per_iteration": float(np.median([r["poses_full"] for r in recs])),
                "symmetry_score_C7": round(symmetry_score(vol, parse_symmetry("C7")), 4),
            }
        )
    print(
        f"{args.n} particles, box {args.box}, {args.apix} Å/px, SNR {args.snr}; {args.minutes} min "
        "per run (2 shared CPU cores)"
    )
    print(
        f"{'group':<6}{'iters':>6}{'gold 0.143':>11}{'truth 0.5':>10}{'truth 0.143':>12}"
        f"{'ratio':>7}"
        f"{'s/it':>7}{'poses/it':>10}{'C7 score':>9}"
    )
    for r in rows:
        t = r["fsc_vs_truth_A"]
        print(
            f"{r['symmetry']:<6}{r['iterations']:>6}"
            f"{r['gold_standard_resolution_A'] or float('nan'):>11.1f}"
            f"{t['0.5'] or float('nan'):>10.1f}{t['0.143'] or float('nan'):>12.1f}"
            f"{r['ratio_gold_to_truth_05'] or float('nan'):>7.2f}"
            f"{r['median_s_per_iteration']:>7.2f}"
            f"{r['median_poses_per_iteration']:>10.0f}{r['symmetry_score_C7']:>9.3f}"
        )
    write_json(
        args.out,
        {
            "benchmark": "halfmaps_symmetry",
            "command": " ".join(sys.argv),
            "rows": rows,
            "n": args.n,
            "box": args.box,
            "apix": args.apix,
            "snr": args.snr,
            "minutes": args.minutes,
            "machine": machine_info(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
