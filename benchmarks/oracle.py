#!/usr/bin/env python
"""The oracle of a simulated data set: Wiener back-projection with the true poses, timed and scored.

``cryorecon backproject`` of ``DATA/particles.star`` (true poses and CTFs) under
``/usr/bin/time -v``: wall and CPU seconds and peak memory, then the FSC of the map against
``DATA/truth.mrc`` (same frame, no alignment) unlimited and hard band-limited at
``--resolution`` (the best a run capped there can hold). This is the "beside the oracle"
reference of DESIGN.md for sets too large to back-project inside ``benchmarks/small.py``'s
budget (issue 4: the 50,000-particle paper set).

    python benchmarks/oracle.py benchmarks/results/paper50k_work/data --resolution 9 \\
        --out benchmarks/results/paper50k_oracle.json

Writes the map next to the JSON's work folder (``--map``, default DATA/../oracle_full.mrc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import write_json  # noqa: E402
from small import lowpass, score, timed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data", type=Path, help="folder with particles.star and truth.mrc")
    ap.add_argument(
        "--resolution", type=float, required=True, help="band limit of the capped score, Å"
    )
    ap.add_argument(
        "--map", type=Path, default=None, help="output map (default DATA/../oracle_full.mrc)"
    )
    ap.add_argument("--out", type=Path, required=True, help="JSON output")
    args = ap.parse_args()

    star = args.data / "particles.star"
    out_map = args.map or args.data.parent / "oracle_full.mrc"
    cmd = [
        sys.executable,
        "-m",
        "cryorecon",
        "backproject",
        str(star),
        "-o",
        str(out_map),
        "--force",
    ]
    print("back-projecting ...", flush=True)
    t = timed(cmd)
    capped = out_map.with_name(out_map.stem + "_capped.mrc")
    lowpass(out_map, capped, args.resolution)
    sim = args.data / "simulation.json"
    result = {
        "benchmark": "oracle",
        "command": " ".join(sys.argv),
        "data": str(args.data),
        "simulation": json.loads(sim.read_text()) if sim.exists() else None,
        "backproject": {k: v for k, v in t.items() if k != "stdout"},
        "oracle": score(args.data / "truth.mrc", out_map, align=False),
        "oracle_capped": score(args.data / "truth.mrc", capped, align=False),
        "resolution_cap_A": args.resolution,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("backproject", "oracle", "oracle_capped")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
