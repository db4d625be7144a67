"""``cryorecon report RUN``: (re)build ``RUN/report.html``, the run report.

One self-contained HTML file (figures inline, no network) with the convergence plots, slices
and isosurfaces of the current map, snapshots over time, the view-direction distribution,
the run's parameters, versions, timings and machine, and, with ``--reference``, the FSC
against a reference map. Prints the path and size of the file written.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import InputError
from ._args import positive

HELP = "write the HTML run report (plots, slices, isosurfaces, FSC) of a run folder"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help=HELP,
        description=HELP
        + (
            ". The report is rebuilt during a run as well; this command rebuilds it on demand, "
            "e.g. to add an FSC against a reference."
        ),
    )
    p.add_argument("run", metavar="RUN", help="run folder written by 'cryorecon reconstruct'")
    p.add_argument(
        "--reference",
        metavar="REF.mrc",
        default=None,
        help="reference map (same box and voxel size) for an FSC section",
    )
    p.add_argument(
        "--align",
        action="store_true",
        help="align the map to the reference (rotation, shift, hand) before the FSC; takes tens of "
        "seconds (default: FSC as is, assuming the maps are aligned)",
    )
    p.add_argument(
        "--level",
        type=float,
        default=None,
        help="isosurface level (default: automatic, encloses the volume of --mass, or "
        "else 20%% of the particle's sphere)",
    )
    p.add_argument(
        "--mass",
        type=positive(),
        default=None,
        metavar="KDA",
        help="the molecule's mass in kDa: the automatic isosurface level encloses its "
        "volume (1.21 Å^3 per dalton)",
    )
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        metavar="HTML",
        default=None,
        help="output file (default RUN/report.html)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io.mrc import read_map
    from ..report import write_report
    from .fsc import check_same_grid

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run folder")
    if not any((run_dir / f).exists() for f in ("run.json", "metrics.jsonl", "volume.mrc")):
        raise InputError(f"{run_dir}: not a run folder (no run.json, metrics.jsonl or volume.mrc)")
    if args.align and not args.reference:
        raise InputError("--align needs --reference")
    if args.level is not None and not math.isfinite(args.level):
        raise InputError(f"--level must be a finite number, got {args.level}")
    if args.reference:
        ref, ref_apix = read_map(args.reference)  # fails with a clear message on a bad file
        vol_path = run_dir / "volume.mrc"
        if vol_path.is_file():
            vol, apix = read_map(vol_path)
            check_same_grid(args.reference, ref.shape, ref_apix, vol_path, vol.shape, apix)
    mass_da = None if args.mass is None else 1e3 * args.mass
    out = write_report(
        run_dir,
        reference=args.reference,
        out=args.output,
        align=args.align,
        level=args.level,
        mass_da=mass_da,
    )
    size = out.stat().st_size
    print(
        f"wrote {out} ({size / 1024 / 1024:.1f} MiB)"
        if size >= 1024 * 1024
        else f"wrote {out} ({size / 1024:.0f} KiB)"
    )
    return 0
