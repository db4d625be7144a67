"""``cryorecon fsc A.mrc B.mrc``: Fourier shell correlation of two aligned maps.

Prints the resolution at FSC 0.5 and 0.143 (Å) and writes ``PREFIX.json`` (curve,
resolutions, inputs) and ``PREFIX.png`` (the plot). The maps must already be aligned
(``cryorecon align``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import InputError
from ..io.atomic import write_json
from ..io.mrc import read_map
from ._args import positive
from ._output import check_output_file

HELP = "Fourier shell correlation of two aligned maps; resolution at 0.5 and 0.143"


def register(subparsers) -> None:
    p = subparsers.add_parser("fsc", help=HELP, description=HELP)
    p.add_argument("map_a", metavar="A.mrc", help="first map")
    p.add_argument("map_b", metavar="B.mrc", help="second map (same box and voxel size)")
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        metavar="PREFIX",
        default=None,
        help="write PREFIX.json and PREFIX.png (default: 'fsc' next to B.mrc)",
    )
    p.add_argument(
        "--mask-radius",
        type=positive(),
        default=None,
        metavar="Å",
        help="apply a soft spherical mask of this radius (Å, about the box centre, "
        "cosine edge of 3 voxels) to both maps first",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=run)


def check_same_grid(path_a, shape_a, apix_a, path_b, shape_b, apix_b) -> None:
    """Raise :class:`InputError` unless two maps have the same cubic box and voxel size."""
    if shape_a != shape_b:
        raise InputError(
            f"box sizes differ: {path_a} is {tuple(shape_a)}, {path_b} is {tuple(shape_b)}"
        )
    if len(set(shape_a)) != 1:
        raise InputError(f"{path_a}: expected a cubic map, found shape {tuple(shape_a)}")
    if not math.isclose(apix_a, apix_b, rel_tol=1e-3):
        raise InputError(
            f"voxel sizes differ: {path_a} has {apix_a:.4f} Å, {path_b} has {apix_b:.4f} Å"
        )


def _json_float(x: float):
    return None if not math.isfinite(x) else float(x)


def plot_fsc(path, freq, curve, resolutions: dict, title: str = "") -> None:
    """Write the FSC curve with the 0.5 / 0.143 thresholds and crossings to ``path`` (PNG)."""
    from ..report.plots import save_fsc_png

    save_fsc_png(path, freq, {"FSC": (curve, resolutions)}, title=title)


def run(args) -> int:
    from ..validate import FSC_THRESHOLDS, fsc, resolution_at, spherical_mask

    path_a, path_b = Path(args.map_a), Path(args.map_b)
    prefix = Path(args.output) if args.output else path_b.parent / "fsc"
    out_json = prefix.with_name(prefix.name + ".json")
    out_png = prefix.with_name(prefix.name + ".png")
    check_output_file(out_json, args.force)
    check_output_file(out_png, args.force)

    a, apix_a = read_map(path_a)
    b, apix_b = read_map(path_b)
    check_same_grid(path_a, a.shape, apix_a, path_b, b.shape, apix_b)
    apix = apix_a
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    if args.mask_radius is not None:
        if args.mask_radius <= 0:
            raise InputError(f"--mask-radius must be positive, got {args.mask_radius}")
        m = spherical_mask(a.shape[0], args.mask_radius / apix, edge=3.0)
        ta, tb = ta * m, tb * m
    freq, curve = fsc(ta, tb, apix)
    res = {thr: resolution_at(freq, curve, thr) for thr in FSC_THRESHOLDS}

    prefix.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "inputs": {"a": str(path_a), "b": str(path_b)},
        "apix": apix,
        "box": int(a.shape[0]),
        "mask_radius_A": args.mask_radius,
        "freq_1_per_A": [float(x) for x in freq],
        "fsc": [float(x) for x in curve],
        "resolution_A": {f"{thr:g}": _json_float(res[thr]) for thr in FSC_THRESHOLDS},
    }
    write_json(out_json, record)
    plot_fsc(out_png, freq.numpy(), curve.numpy(), res, title=f"{path_a.name} vs {path_b.name}")
    # Files first, then stdout: a reader that stops early (``| head -1``) cannot cost them.
    for thr in FSC_THRESHOLDS:
        print(f"FSC {thr:g}: {res[thr]:.2f} Å")
    print(f"wrote {out_json} and {out_png}")
    return 0
