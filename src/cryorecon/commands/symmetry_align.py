"""``cryorecon symmetry-align MAP.mrc --symmetry D2 -o OUT.mrc``: put a C1 map in the standard
orientation of a point group (as ``relion_align_symmetry``) and symmetrise it.

Finds the rotation Q and shift t that make ``rotate_volume(MAP, Q, t)`` most symmetric
(:func:`cryorecon.symmetry_align.symmetry_align`), writes that map averaged over the group
(voxel size of MAP) and ``OUT.json`` with the transform, and prints the rotation as RELION
Euler angles (degrees; the same angles ``relion_align_symmetry`` prints), the shift and the
symmetry score before and after.
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

HELP = "rotate a C1 map into RELION's standard orientation for a point group and symmetrise it"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "symmetry-align",
        help=HELP,
        description=HELP
        + (
            ". The output is the average over the group of moved(p) = MAP(Q^T (p - t)), p the "
            "voxel position (x, y, z) about the box centre D//2. Groups and axes as RELION's "
            "--sym: Cn, Dn (n-fold along z, Dn's 2-fold along x), T, O, I1-I4 (I = I2)."
        ),
    )
    p.add_argument("map", metavar="MAP.mrc", help="map to align (e.g. an ab-initio C1 result)")
    p.add_argument(
        "--symmetry",
        "--sym",
        dest="symmetry",
        required=True,
        metavar="NAME",
        help="point group, RELION names: C2..Cn, D2..Dn, T, O, I, I1..I4",
    )
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        metavar="OUT.mrc",
        default=None,
        help="aligned, symmetrised map (default: MAP_<SYM>.mrc next to MAP); "
        "OUT.json gets the transform",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the global search (default 0)")
    p.add_argument(
        "--n-global",
        type=at_least(1),
        default=2000,
        help="rotations tried in the global search (default 2000)",
    )
    p.add_argument(
        "--keep-centre",
        "--keep-center",
        dest="keep_centre",
        action="store_true",
        help="do not re-centre: the symmetry axes pass through the box centre",
    )
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..geometry.rotations import matrix_to_euler
    from ..geometry.symmetry import parse_symmetry
    from ..symmetry_align import symmetry_align

    G = parse_symmetry(args.symmetry)
    G.require_proper("symmetry-align")
    if G.order == 1:
        raise InputError("symmetry-align needs a symmetry other than C1 (e.g. --symmetry D2)")
    map_path = Path(args.map)
    out = Path(args.output) if args.output else map_path.with_name(f"{map_path.stem}_{G.name}.mrc")
    out_json = out.with_suffix(".json")
    check_output_file(out, args.force)
    check_output_file(out_json, args.force)
    check_device(args.device)

    vol, apix = read_map(map_path)
    if len(set(vol.shape)) != 1:
        raise InputError(f"{map_path}: expected a cubic map, found shape {vol.shape}")
    if vol.shape[0] % 2 or vol.shape[0] < 8:
        raise InputError(
            f"{map_path}: symmetry-align needs an even box of at least 8 voxels, got {vol.shape[0]}"
        )
    res = symmetry_align(
        torch.from_numpy(vol),
        G,
        apix=apix,
        device=args.device,
        seed=args.seed,
        n_global=args.n_global,
        center=not args.keep_centre,
    )

    rot, tilt, psi = (math.degrees(float(x)) for x in matrix_to_euler(res.rotation))
    shift_px = [float(x) for x in res.shift_px]
    shift_A = [float(x) for x in res.shift_A]
    write_map(out, res.aligned.numpy(), apix, overwrite=args.force)
    record = {
        "input": str(map_path),
        "output": str(out),
        "symmetry": G.name,
        "apix": apix,
        "box": int(vol.shape[0]),
        "seed": args.seed,
        "symmetry_score": res.score,
        "symmetry_score_input": res.score_input,
        "rotation_matrix": res.rotation.tolist(),
        "euler_relion_deg": {"rot": rot, "tilt": tilt, "psi": psi},
        "shift_A": shift_A,
        "shift_px": shift_px,
        "seconds": res.seconds,
        "convention": (
            "output = symmetrise(moved), moved(p) = MAP(R^T (p - t)); p = (x, y, z) "
            "voxel position about the box centre D//2, R = rotation_matrix (acting on "
            "(x, y, z) column vectors; the Euler angles are RELION ZYZ of R, as "
            "relion_align_symmetry prints), t = shift_px (shift_A = shift_px * apix)"
        ),
    }
    write_json(out_json, record)

    print(
        f"symmetry {G.name}: score {res.score:.4f} after alignment ({res.score_input:.4f} as input)"
    )
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
