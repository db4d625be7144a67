"""``cryorecon export RUN [-o DIR]``: a run's poses for RELION and cryoSPARC.

Reads ``RUN/run.json`` (the particle file, under ``"particles"``) and ``RUN/poses.npz`` (the
pose per particle the run found) and writes ``DIR/particles.star`` (RELION 3.1+, every input
column kept) and, for a cryoSPARC input, ``DIR/particles.cs`` (see
:mod:`cryorecon.io.export`). Works on a finished or a stopped run; DIR defaults to RUN.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.export import export_poses
from ..io.particles import read_particles
from ._input import add_datadir_argument

POSE_KEYS = ("eulers_deg", "shifts_A", "max_prob", "subset", "class_number")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a run's poses as RELION particles.star (and cryoSPARC .cs)",
        description="Write the poses a reconstruction run found as RUN/particles.star (RELION "
        "3.1+, every input column kept, for relion_reconstruct or relion_refine) and, when the "
        "input was a cryoSPARC .cs, RUN/particles.cs. Particles the run never visited are left "
        "out.",
    )
    p.add_argument("run", metavar="RUN", help="run folder (holds run.json and poses.npz)")
    p.add_argument("-o", "--out", metavar="DIR", default=None, help="output folder (default RUN)")
    p.add_argument("--force", action="store_true", help="overwrite existing exported files")
    add_datadir_argument(p)
    p.set_defaults(func=run)


def load_run_poses(run_dir: Path) -> tuple[Path, dict]:
    """``(particle file, poses dict)`` of a run folder; InputError naming what is missing."""
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise InputError(f"{run_dir}: not a run folder (no run.json)")
    try:
        info = json.loads(info_path.read_text())
        source = Path(info["particles"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{info_path}: unreadable, or names no particle file ({exc})") from exc
    poses_path = run_dir / "poses.npz"
    if not poses_path.is_file():
        raise InputError(f"{run_dir}: no poses.npz yet (it is written at the first checkpoint)")
    try:
        with np.load(poses_path, allow_pickle=False) as z:
            poses = {k: z[k] for k in POSE_KEYS if k in z.files}
    except Exception as exc:
        raise InputError(f"{poses_path}: unreadable ({' '.join(str(exc).split())})") from exc
    if "eulers_deg" not in poses or "shifts_A" not in poses:
        raise InputError(
            f"{poses_path}: holds no per-particle poses (eulers_deg, shifts_A); "
            "written by a cryorecon without pose export"
        )
    return source, poses


def run(args) -> int:
    run_dir = Path(args.run)
    source, poses = load_run_poses(run_dir)
    if not source.is_file():
        raise InputError(
            f"{run_dir / 'run.json'}: the particle file {source} is not found from "
            "here (run export from the folder the run was started in)"
        )
    particles = read_particles(source, require_ctf=False, check_images=False, datadir=args.datadir)
    for path in export_poses(particles, poses, args.out or run_dir, overwrite=args.force):
        print(path)
    return 0
