"""``cryorecon align REF.mrc MAP.mrc -o MAP_aligned.mrc``: superpose MAP on REF.

Searches rotation, translation and handedness (:func:`cryorecon.validate.align`), writes the
transformed MAP (voxel size from MAP) and a JSON file beside it with the transform, and
prints the correlation, whether the hand was flipped, the rotation as RELION Euler angles
(degrees) and the shift.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import InputError
from ..io.atomic import write_json
from ..io.mrc import read_map, write_map
from ._args import at_least
from ._output import check_device, check_output_file
from .fsc import check_same_grid

HELP = "align MAP onto REF: rotation, shift and hand (mirror) by normalised cross-correlation"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "align",
        help=HELP,
        description=HELP
        + (
            ". The aligned map is aligned(p) = M(R^T (p - t)) with p the voxel position (x, y, z) "
            "about the box centre D//2, M the map (mirrored z -> -z first when the hand is "
            "flipped)."
        ),
    )
    p.add_argument("ref", metavar="REF.mrc", help="reference map")
    p.add_argument("map", metavar="MAP.mrc", help="map to move (same box and voxel size)")
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        metavar="OUT.mrc",
        default=None,
        help="aligned map (default: MAP_aligned.mrc next to MAP); OUT.json gets the transform",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the global rotation search (default 0)"
    )
    p.add_argument(
        "--n-global",
        type=at_least(1),
        default=3000,
        help="rotations tried per hand in the global search (default 3000)",
    )
    p.add_argument(
        "--no-flip", action="store_true", help="do not try the mirror image (keep the hand)"
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..geometry.rotations import matrix_to_euler
    from ..validate import align

    ref_path, map_path = Path(args.ref), Path(args.map)
    out = Path(args.output) if args.output else map_path.with_name(map_path.stem + "_aligned.mrc")
    out_json = out.with_suffix(".json")
    check_output_file(out, args.force)
    check_output_file(out_json, args.force)
    if args.n_global < 1:
        raise InputError(f"--n-global must be positive, got {args.n_global}")
    check_device(args.device)

    ref, apix_ref = read_map(ref_path)
    mov, apix = read_map(map_path)
    check_same_grid(ref_path, ref.shape, apix_ref, map_path, mov.shape, apix)
    if ref.shape[0] % 2 or ref.shape[0] < 8:
        raise InputError(
            f"{map_path}: align needs an even box of at least 8 voxels, got {ref.shape[0]}"
        )

    res = align(
        torch.from_numpy(ref),
        torch.from_numpy(mov),
        apix=apix,
        device=args.device,
        seed=args.seed,
        n_global=args.n_global,
        try_flip=not args.no_flip,
    )

    rot, tilt, psi = (math.degrees(float(x)) for x in matrix_to_euler(res.rotation))
    shift_px = [float(x) for x in res.shift_px]
    shift_A = [float(x) for x in res.shift_A]
    write_map(out, res.aligned.numpy(), apix, overwrite=args.force)
    record = {
        "inputs": {"ref": str(ref_path), "map": str(map_path)},
        "output": str(out),
        "apix": apix,
        "box": int(ref.shape[0]),
        "seed": args.seed,
        "cc": res.cc,
        "cc_other_hand": None if math.isnan(res.cc_other_hand) else res.cc_other_hand,
        "flipped": res.flipped,
        "flip_axis": "z",
        "rotation_matrix": res.rotation.tolist(),
        "euler_relion_deg": {"rot": rot, "tilt": tilt, "psi": psi},
        "shift_A": shift_A,
        "shift_px": shift_px,
        "seconds": res.seconds,
        "convention": (
            "aligned(p) = M(R^T (p - t)); p = (x, y, z) voxel position about the box centre D//2, "
            "R = rotation_matrix (acting on (x, y, z) column vectors; Euler angles are RELION ZYZ "
            "of R), t = shift_px (shift_A = shift_px * apix), M = MAP mirrored z -> -z about the "
            "centre if flipped else MAP"
        ),
    }
    write_json(out_json, record)

    print(
        f"cc: {res.cc:.4f}"
        + (
            ""
            if math.isnan(res.cc_other_hand)
            else f"  (best with the other hand: {res.cc_other_hand:.4f})"
        )
    )
    print(f"hand flipped: {'yes (mirrored z -> -z)' if res.flipped else 'no'}")
    print(f"rotation (RELION Euler rot, tilt, psi): {rot:.2f} {tilt:.2f} {psi:.2f} deg")
    print(
        "shift (x, y, z): "
        + " ".join(f"{s:.2f}" for s in shift_A)
        + " Å  ("
        + " ".join(f"{s:.2f}" for s in shift_px)
        + " px)"
    )
    print(f"wrote {out} and {out_json}")
    return 0
