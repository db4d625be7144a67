"""``cryorecon postprocess HALF1.mrc HALF2.mrc`` (or ``cryorecon postprocess RUN``):
gold-standard resolution of two half maps, without a reference.

Computes the unmasked, masked, phase-randomised and corrected half-map FSC
(:func:`cryorecon.gold_standard.gold_standard_fsc`, as ``relion_postprocess`` does), prints the
resolution at FSC 0.143 of the corrected curve, and writes ``PREFIX.mrc`` (the FSC-weighted
combined map, :func:`cryorecon.gold_standard.combine_halves`), ``PREFIX_mask.mrc`` (the
automatic mask, when no ``--mask`` is given), ``PREFIX.json`` (curves, resolutions, mask
facts: the same record a run stores in ``run.json["gold_standard"]``) and ``PREFIX.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import InputError
from ..io.atomic import write_bytes, write_json
from ._args import positive
from ._output import check_device, check_output_file

HELP = "gold-standard FSC of two half maps (masked, phase-randomised, corrected) and combined map"


def register(subparsers) -> None:
    p = subparsers.add_parser("postprocess", help=HELP, description=HELP)
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="MAP",
        help="HALF1.mrc HALF2.mrc, or a run folder (its backprojection_half1/2.mrc, else "
        "volume_half1/2.mrc)",
    )
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        metavar="PREFIX",
        default=None,
        help="write PREFIX.mrc, PREFIX.json, PREFIX.png (and PREFIX_mask.mrc); "
        "default 'postprocess' next to the first half map",
    )
    p.add_argument(
        "--refined-to",
        type=positive(),
        default=None,
        metavar="A",
        help="the finest cut-off (Å) the halves were refined to: the stated resolution is no "
        "finer (default for a run folder: run.json's)",
    )
    p.add_argument(
        "--mask",
        metavar="MASK.mrc",
        default=None,
        help="solvent mask (values in [0, 1]); default: made from the average of "
        "the halves (low-pass, threshold, extension, cosine edge)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="density level of the automatic mask's seed (default: from "
        "--molecular-mass, else 0.1 x the low-passed map's maximum or 3 "
        "noise sigmas of the half-difference, whichever is higher)",
    )
    p.add_argument(
        "--molecular-mass",
        type=positive(),
        default=None,
        metavar="kDa",
        help="choose the mask threshold so the seed holds this much protein",
    )
    p.add_argument(
        "--mask-lowpass",
        type=positive(),
        default=15.0,
        metavar="Å",
        help="low-pass the map to this resolution before thresholding (default 15)",
    )
    p.add_argument(
        "--extend",
        type=float,
        default=None,
        metavar="Å",
        help="extend the mask's seed by this much (default 3 voxels)",
    )
    p.add_argument(
        "--soft-edge",
        type=float,
        default=None,
        metavar="Å",
        help="width of the mask's raised-cosine edge (default 6 voxels)",
    )
    p.add_argument(
        "--randomize-at-fsc",
        type=float,
        default=0.8,
        metavar="FSC",
        help="randomise phases beyond the shell where the unmasked FSC drops below "
        "this (default 0.8)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random phases (default 0)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=run)


def _half_map_paths(inputs: list[str]) -> tuple[Path, Path]:
    if len(inputs) == 1:
        folder = Path(inputs[0])
        if not folder.is_dir():
            raise InputError(
                f"{folder}: give two half maps, or a run folder with "
                "volume_half1.mrc and volume_half2.mrc"
            )
        paths = folder / "backprojection_half1.mrc", folder / "backprojection_half2.mrc"
        if not all(p.is_file() for p in paths):  # a stopped run: only the refined halves
            paths = folder / "volume_half1.mrc", folder / "volume_half2.mrc"
        for p in paths:
            if not p.is_file():
                raise InputError(f"{folder}: no {p.name} (the run wrote no half maps)")
        return paths
    if len(inputs) == 2:
        return Path(inputs[0]), Path(inputs[1])
    raise InputError(f"expected two half maps or one run folder, got {len(inputs)} arguments")


def _run_refined_to(inputs: list[str]) -> float | None:
    """``run.json``'s ``gold_standard.refined_to_A`` for a run folder (else None)."""
    import json

    if len(inputs) != 1:
        return None
    try:
        info = json.loads((Path(inputs[0]) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    v = (info.get("gold_standard") or {}).get("refined_to_A")
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def _angstrom(r: float) -> str:
    return f"{r:.2f} Å" if math.isfinite(r) else "not reached (below 0.143 from the start)"


def run(args) -> int:
    import torch

    from ..gold_standard import combine_halves, gold_standard_fsc
    from ..io.mrc import read_map, write_map
    from ..report.plots import plot_halfmap_fsc
    from .fsc import check_same_grid

    path1, path2 = _half_map_paths(args.inputs)
    if len(args.inputs) == 1 and args.output is None:
        prefix = Path(args.inputs[0]) / "postprocess"
    else:
        prefix = Path(args.output) if args.output else path1.parent / "postprocess"
    outs = {
        k: prefix.with_name(prefix.name + suffix)
        for k, suffix in (
            ("map", ".mrc"),
            ("json", ".json"),
            ("png", ".png"),
            ("mask", "_mask.mrc"),
        )
    }
    if args.mask is not None:
        del outs["mask"]
    for p in outs.values():
        check_output_file(p, args.force)
    check_device(args.device)
    if not 0 < args.randomize_at_fsc < 1:
        raise InputError(f"--randomize-at-fsc must be between 0 and 1, got {args.randomize_at_fsc}")

    h1, apix = read_map(path1)
    h2, apix2 = read_map(path2)
    check_same_grid(path1, h1.shape, apix, path2, h2.shape, apix2)
    mask = None
    if args.mask is not None:
        m, apix_m = read_map(args.mask)
        check_same_grid(path1, h1.shape, apix, Path(args.mask), m.shape, apix_m)
        mask = torch.from_numpy(m)
    options = {
        "threshold": args.threshold,
        "molecular_mass_kDa": args.molecular_mass,
        "lowpass_A": args.mask_lowpass,
        "extend_A": args.extend,
        "soft_edge_A": args.soft_edge,
    }
    t1 = torch.from_numpy(h1).to(args.device)
    t2 = torch.from_numpy(h2).to(args.device)
    res = gold_standard_fsc(
        t1,
        t2,
        apix,
        None if mask is None else mask.to(args.device),
        seed=args.seed,
        randomize_at_fsc=args.randomize_at_fsc,
        mask_options=options,
        refined_to_A=args.refined_to if args.refined_to else _run_refined_to(args.inputs),
    )
    combined = combine_halves(t1, t2, res.fsc_corrected)

    print(f"gold-standard resolution (corrected masked FSC 0.143): {_angstrom(res.resolution_A)}")
    print(
        f"unmasked FSC 0.143: {_angstrom(res.resolution_unmasked_A)}; masked: "
        f"{_angstrom(res.resolutions['masked'][0.143])}"
    )
    if res.randomize_at_A is not None:
        print(f"phases randomised beyond {res.randomize_at_A:.1f} Å")
    print(f"mask: {res.mask.describe()}")
    for w in res.warnings:
        print(f"warning: {w}")

    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_map(outs["map"], combined.cpu().numpy(), apix, overwrite=True)
    if "mask" in outs:
        write_map(outs["mask"], res.mask_map.cpu().numpy(), apix, overwrite=True)
    doc = res.to_json()
    record = {
        "inputs": {"half1": str(path1), "half2": str(path2), "mask": args.mask},
        "gold_standard": doc,
        "gold_standard_resolution_A": doc["resolution_A"],
    }
    write_json(outs["json"], record)
    curves = {
        "unmasked": res.fsc_unmasked.numpy(),
        "masked": res.fsc_masked.numpy(),
        "corrected": res.fsc_corrected.numpy(),
    }
    if res.fsc_randomized is not None:
        curves["randomized"] = res.fsc_randomized.numpy()
    png = plot_halfmap_fsc(
        res.freq.numpy(),
        curves,
        res.resolution_A,
        res.randomize_at_A,
        title=f"{path1.name} vs {path2.name}",
    )
    write_bytes(outs["png"], png)
    print("wrote " + ", ".join(str(p) for p in outs.values()))
    return 0
