"""Data-parallel scaling (issue 17): per-iteration seconds, all-reduce payload and time for 1
and 2 (or more) torchrun ranks on one simulated set, and a model of the scaling to 64 GPUs.

Measured: ``cryorecon reconstruct`` with the same flags and seed on 1..N local ranks (gloo,
CPU), from each run's ``metrics.jsonl``: median wall seconds per iteration, all-reduced
bytes per iteration (the gradient, D^3 float32, plus the scalars of the line search) and
seconds inside all-reduce. Modelled (no such machine here): an iteration on W GPUs costs
``t(W) = t_compute / W + t_ring(W)`` with ``t_ring = 2 (W-1)/W * bytes / bandwidth +
2 (W-1) latency`` (ring all-reduce), ``t_compute`` scaled from the measured seconds per
(image x pose x coefficient) of the 1-rank run to the target's last level, at an assumed GPU
throughput. The assumptions are in the JSON and the table header.

    .venv/bin/python benchmarks/parallel_scaling.py --ranks 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, write_json  # noqa: E402

# Targets of the model: (name, box, particles, minibatch, poses at the last level,
# coefficients at the last level). Pose and coefficient counts of the paper's quadrature at
# the final cut-off (Sec. 3.2) with importance sampling evaluating ~1% of the poses.
TARGETS = [
    ("paper set: 50k particles, box 128, 9 Å", 128, 50_000, 200, 2.0e6, 4.0e3),
    ("1M particles, box 256, 4 Å", 256, 1_000_000, 2_000, 2.0e7, 3.2e4),
]
LINKS = {"NVLink (intra-node)": (150e9, 5e-6), "InfiniBand HDR (inter-node)": (25e9, 10e-6)}
GPU_FLOPS = 2.0e13  # sustained float32 GEMM on one data-centre GPU (assumed)
SAMPLED_FRACTION = 0.01


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, star: Path, out: Path, flags: list[str]) -> list[dict]:
    head = (
        [sys.executable, "-m", "cryorecon"]
        if n == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port()),
            "-m",
            "cryorecon",
        ]
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // n)))
    subprocess.run(
        [*head, "-q", "reconstruct", str(star), "-o", str(out), "--force", *flags],
        check=True,
        env=env,
    )
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def ring_seconds(W: int, nbytes: float, bw: float, lat: float) -> float:
    return 0.0 if W == 1 else 2 * (W - 1) / W * nbytes / bw + 2 * (W - 1) * lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--apix", type=float, default=10.0)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--work", type=Path, default=RESULTS / "parallel_work")
    ap.add_argument("--out", type=Path, default=RESULTS / "parallel_scaling.json")
    args = ap.parse_args(argv)
    from cryorecon.simulate import run_simulation

    data = args.work / "data"
    if not (data / "particles.star").exists():
        run_simulation(data, n=args.n, D=args.box, apix=args.apix, snr=0.1, seed=0)
    flags = [
        "--pose-search",
        "exact",
        "--grid-scale",
        "3",
        "--minibatch",
        "100",
        "--heldout",
        "100",
        "--max-iters",
        str(args.iters),
        "--report-every",
        "0",
        "--no-halves",
        "--seed",
        "0",
    ]
    rows = []
    for n in args.ranks:
        recs = run(n, data / "particles.star", args.work / f"ranks{n}", flags)[
            5:
        ]  # skip the warm-up
        dt = np.diff([r["seconds"] for r in recs])
        rows.append(
            {
                "ranks": n,
                "median_iteration_s": float(np.median(dt)),
                "allreduce_bytes_per_iteration": float(
                    np.median([r.get("allreduce_bytes", 0) for r in recs])
                ),
                "allreduce_s_per_iteration": float(
                    np.median([r.get("allreduce_seconds", 0) for r in recs])
                ),
                "poses_x_coefficients": float(
                    np.median([r["poses_evaluated"] * r["coefficients"] for r in recs])
                ),
            }
        )
    base = rows[0]
    print(
        f"measured on {os.cpu_count()} shared CPU cores, box {args.box}, {args.n} particles, exact "
        "quadrature"
    )
    print(f"{'ranks':>5} {'s/iter':>8} {'speed-up':>9} {'allreduce MB':>13} {'allreduce s':>12}")
    for r in rows:
        r["speedup"] = base["median_iteration_s"] / r["median_iteration_s"]
        print(
            f"{r['ranks']:>5} {r['median_iteration_s']:>8.3f} {r['speedup']:>9.2f} "
            f"{r['allreduce_bytes_per_iteration'] / 1e6:>13.3f} "
            f"{r['allreduce_s_per_iteration']:>12.4f}"
        )
    model = []
    flops_per = 4.0  # real flops per (image, pose, coefficient) of the cross-term GEMM
    for name, D, _N, B, poses, coeffs in TARGETS:
        t_comp = (
            B * poses * SAMPLED_FRACTION * coeffs * flops_per * 2 / GPU_FLOPS
        )  # x2: value + gradient
        nbytes = 4.0 * D**3
        for link, (bw, lat) in LINKS.items():
            for W in (1, 2, 4, 8, 16, 32, 64):
                t = t_comp / W + ring_seconds(W, nbytes, bw, lat)
                model.append(
                    {
                        "target": name,
                        "link": link,
                        "gpus": W,
                        "compute_s": t_comp / W,
                        "allreduce_s": ring_seconds(W, nbytes, bw, lat),
                        "speedup": t_comp / t,
                    }
                )
    print(
        f"\nmodel (assumed: {GPU_FLOPS / 1e12:.0f} TFLOP/s per GPU, "
        f"{100 * SAMPLED_FRACTION:.0f}% of poses evaluated):"
    )
    print(
        f"{'target':<40} {'link':<28} {'GPUs':>4} {'compute s':>10} {'allreduce s':>12} "
        f"{'speed-up':>9}"
    )
    for m in model:
        if m["gpus"] in (1, 8, 64):
            print(
                f"{m['target']:<40} {m['link']:<28} {m['gpus']:>4} {m['compute_s']:>10.4f} "
                f"{m['allreduce_s']:>12.4f} {m['speedup']:>9.1f}"
            )
    write_json(
        args.out,
        {
            "benchmark": "parallel_scaling",
            "command": " ".join(sys.argv),
            "measured": rows,
            "model": model,
            "assumptions": {
                "gpu_flops": GPU_FLOPS,
                "links": LINKS,
                "sampled_fraction": SAMPLED_FRACTION,
            },
            "machine": machine_info(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
