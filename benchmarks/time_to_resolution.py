#!/usr/bin/env python
"""Benchmark `time_to_resolution` (issue 13): resolution against the truth over wall time for
several sets of `cryorecon reconstruct` flags on one simulated set, beside the oracle.

Simulates GroEL-GroES (built-in 1AON; ``--n`` particles, ``--box`` at ``--apix``, SNR ``--snr``,
defocus 1-3 µm, shifts ±3 px; seed ``--data-seed``) into ``WORK/data`` (reused when present),
computes the oracle (Wiener back-projection with the true poses,
:func:`cryorecon.backproject.wiener_backproject`), then runs `cryorecon reconstruct` once per
``--config`` (``NAME`` or ``NAME:flag flag ...``; default: the defaults, the paper's
importance sampling and the exact sum) with ``--max-time`` minutes each, as a
subprocess under /usr/bin/time -v (wall, CPU, peak RSS). Snapshots are written every
``--snapshot-every`` iterations; ``--snapshots`` of them, spread evenly over the run's wall time,
and the final map are aligned to the truth (rotation, shift, hand) and scored by FSC 0.5 and
0.143. Each snapshot row also carries the cut-off and the fraction of the quadrature
evaluated at that iteration (``metrics.jsonl``).

Prints a table and writes JSON (``--out``). The machine may be shared with other jobs: the
load average at the start and the end is recorded.

    python benchmarks/time_to_resolution.py
    python benchmarks/time_to_resolution.py --n 5000 --max-time 8 \
        --config default "search:--pose-search search"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_CONFIGS = ["default", "importance:--pose-search importance", "exact:--exact"]


def parse_config(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition(":")
    return name, flags.split()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--box", type=int, default=48)
    ap.add_argument("--apix", type=float, default=5.6)
    ap.add_argument("--snr", type=float, default=0.05)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1, help="reconstruction seed")
    ap.add_argument("--config", nargs="+", default=DEFAULT_CONFIGS, help="NAME[:flags] per run")
    ap.add_argument("--max-time", type=float, default=6.0, help="minutes per run")
    ap.add_argument("--snapshot-every", type=int, default=10)
    ap.add_argument("--snapshots", type=int, default=5)
    ap.add_argument("--work", type=Path, default=HERE / "results" / "time_to_resolution_work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "time_to_resolution.json")
    args = ap.parse_args(argv)

    from _common import machine_info, write_json
    from small import score, timed

    py = [sys.executable, "-m", "cryorecon", "-q"]
    work = args.work
    data = work / "data"
    t_start = time.perf_counter()
    want = {
        "n": args.n,
        "box": args.box,
        "apix": args.apix,
        "snr": args.snr,
        "seed": args.data_seed,
    }
    meta = data / "simulation.json"
    have = json.loads(meta.read_text()) if meta.exists() else {}
    if not all(have.get(k) == v for k, v in want.items()) or not (data / "particles.star").exists():
        print(
            f"simulating {args.n} particles, box {args.box} "
            f"at {args.apix:g} Å/px, SNR {args.snr:g}",
            flush=True,
        )
        from cryorecon.simulate import run_simulation

        run_simulation(
            data,
            n=args.n,
            D=args.box,
            apix=args.apix,
            snr=args.snr,
            seed=args.data_seed,
            force=True,
        )
    truth = data / "truth.mrc"
    oracle = work / "oracle.mrc"
    from cryorecon.backproject import wiener_backproject
    from cryorecon.io.mrc import write_map
    from cryorecon.io.particles import read_particles

    t0 = time.perf_counter()
    write_map(
        oracle,
        wiener_backproject(read_particles(data / "particles.star")).numpy(),
        args.apix,
        overwrite=True,
    )
    result = {
        "benchmark": "time_to_resolution",
        "dataset": {"structure": "GroEL-GroES (1AON)", **want},
        "max_time_min": args.max_time,
        "seed": args.seed,
        "machine": machine_info(),
        "oracle": {
            **score(truth, oracle, align=False),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "runs": [],
        "command": "benchmarks/time_to_resolution.py " + " ".join(argv or sys.argv[1:]),
    }
    print(
        f"oracle: FSC0.5 {result['oracle']['fsc05_A']} "
        f"Å, FSC0.143 {result['oracle']['fsc0143_A']} Å",
        flush=True,
    )

    for spec in args.config:
        name, flags = parse_config(spec)
        run = work / f"run_{name.replace('+', '_')}"
        cmd = py + [
            "reconstruct",
            str(data / "particles.star"),
            "-o",
            str(run),
            "--force",
            "--seed",
            str(args.seed),
            "--max-time",
            str(args.max_time),
            "--snapshot-every",
            str(args.snapshot_every),
            "--report-every",
            "100000",
            *flags,
        ]
        print(f"run {name}: {' '.join(flags) or '(default flags)'} ...", flush=True)
        t = timed(cmd)
        info = json.loads((run / "run.json").read_text())
        metrics = [
            json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()
        ]
        by_it = {m["iteration"]: m for m in metrics}
        snaps = sorted(
            (run / "snapshots").glob("volume_*.mrc"), key=lambda p: int(p.stem.split("_")[1])
        )
        snap_s = (
            np.array([by_it[int(s.stem.split("_")[1])]["seconds"] for s in snaps])
            if snaps
            else np.zeros(0)
        )
        pick = (
            sorted(
                {
                    int(np.argmin(np.abs(snap_s - q)))
                    for q in np.linspace(0, info["seconds"], args.snapshots + 1)[1:]
                }
            )
            if snaps
            else []
        )
        curve = []
        for i, path in [(int(snaps[j].stem.split("_")[1]), snaps[j]) for j in pick] + [
            (info["iterations"], run / "volume.mrc")
        ]:
            m = by_it.get(i, metrics[-1])
            s = score(truth, path, seed=args.seed)
            curve.append(
                {
                    "iteration": i,
                    "seconds": m["seconds"],
                    "cutoff_A": round(m["resolution_A"], 2),
                    "fraction_evaluated": m.get("fraction_evaluated"),
                    **s,
                }
            )
            print(
                f"  it {i:5d} {m['seconds']:7.1f} s cut-off "
                f"{m['resolution_A']:5.1f} Å: FSC0.5 {s['fsc05_A']} Å, "
                f"0.143 {s['fsc0143_A']} Å",
                flush=True,
            )
        fr = [
            m.get("fraction_evaluated")
            for m in metrics[-20:]
            if m.get("fraction_evaluated") is not None
        ]
        result["runs"].append(
            {
                "name": name,
                "flags": flags,
                **{k: v for k, v in t.items() if k != "stdout"},
                "iterations": info["iterations"],
                "stop_reason": info["stop_reason"],
                "final_cutoff_A": round(metrics[-1]["resolution_A"], 2) if metrics else None,
                "fraction_evaluated_last20": round(float(np.mean(fr)), 5) if fr else None,
                "resolution_vs_time": curve,
            }
        )
        write_json(args.out, result)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(args.out, result)
    o = result["oracle"]
    print(
        "\n| run | iteration | wall s | cut-off Å | fraction "
        "| FSC 0.5 Å | FSC 0.143 Å | FSC0.5 / oracle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        for c in r["resolution_vs_time"]:
            f = "-" if c["fraction_evaluated"] is None else f"{c['fraction_evaluated']:.3g}"
            print(
                f"| {r['name']} | {c['iteration']} | {c['seconds']:.0f} "
                f"| {c['cutoff_A']} | {f} | {c['fsc05_A']} | "
                f"{c['fsc0143_A']} | {c['fsc05_A'] / o['fsc05_A']:.2f} |"
            )
    print(
        f"| oracle (true poses) | - | {o['seconds']} | - "
        f"| - | {o['fsc05_A']} | {o['fsc0143_A']} | 1.00 |"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
