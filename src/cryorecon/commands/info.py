"""``cryorecon info particles.star|.cs``: summarise a particle set without reading pixels.

Reports the number of particles, box size, pixel size(s), optics groups, CTF parameter
ranges, whether poses are present, and the stacks' total size on disk. Only the metadata
and each distinct stack's MRC header are read (each stack once), so it is fast for
100,000s of particles. ``--json`` prints the same facts as JSON on stdout.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from ..io.particles import ParticleSet
from ._input import add_datadir_argument, read_particles_from_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="summarise a particle file (.star or .cs)",
        description="Summarise a RELION .star or cryoSPARC .cs particle file: particles, box, "
        "pixel size, optics groups, CTF ranges, poses, stack sizes. Reads no pixel data.",
    )
    p.add_argument("particles", help="RELION .star (3.0, 3.1, 4, 5) or cryoSPARC .cs file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--no-stacks",
        action="store_true",
        help="do not open the image stacks (metadata only; for files whose stacks are elsewhere)",
    )
    add_datadir_argument(p)
    p.set_defaults(func=run)


def _unique(a: np.ndarray, ndigits: int = 6) -> list[float]:
    return [float(v) for v in np.unique(np.round(np.asarray(a, dtype=np.float64), ndigits))]


def _range(a: np.ndarray, scale: float = 1.0, ndigits: int = 6) -> list[float]:
    return [round(float(np.min(a)) * scale, ndigits), round(float(np.max(a)) * scale, ndigits)]


def summarize(ps: ParticleSet, stacks_checked: bool = True) -> dict:
    """The facts ``info`` prints, as a JSON-ready dict (vectorised over particles)."""
    n = len(ps)
    groups, inverse, counts = np.unique(ps.optics_group, return_inverse=True, return_counts=True)
    first = np.zeros(len(groups), dtype=np.int64)
    first[inverse[::-1]] = np.arange(n)[::-1]
    names = ps.meta.get("optics_names", {}) or {}
    optics = []
    for g, c, i in zip(groups, counts, first):
        entry = {
            "group": int(g),
            "name": names.get(int(g), ""),
            "particles": int(c),
            "pixel_size_A": float(ps.apix[i]),
        }
        if ps.ctf:
            entry.update(
                voltage_kV=float(ps.ctf["voltage"][i]),
                cs_mm=float(ps.ctf["cs"][i]),
                amp_contrast=float(ps.ctf["amp_contrast"][i]),
            )
        optics.append(entry)
    ctf = None
    if ps.ctf:
        dfs = np.concatenate([ps.ctf["defocus_u"], ps.ctf["defocus_v"]])
        ctf = {
            "defocus_um": _range(dfs, 1e-4, 4),
            "defocus_angle_deg": _range(ps.ctf["defocus_angle"], 1.0, 3),
            "voltage_kV": _unique(ps.ctf["voltage"], 3),
            "cs_mm": _unique(ps.ctf["cs"], 4),
            "amp_contrast": _unique(ps.ctf["amp_contrast"], 4),
            "phase_shift_deg": _range(ps.ctf["phase_shift"], 1.0, 3),
            "bfactor_A2": _range(ps.ctf["bfactor"], 1.0, 3),
        }
    found = [p.is_file() for p in ps.stacks]
    sizes = [p.stat().st_size for p, f in zip(ps.stacks, found) if f]
    return {
        "source": str(ps.source),
        "format": ps.meta.get("format", ""),
        "particles": n,
        "box": int(ps.D),
        "pixel_size_A": _unique(ps.apix, 6),
        "optics_groups": optics,
        "ctf": ctf,
        "poses": ps.angles is not None,
        "shifts": ps.shifts is not None,
        "shift_range_A": None if ps.shifts is None else _range(ps.shifts, 1.0, 3),
        "stacks": len(ps.stacks),
        "stacks_found": int(sum(found)),
        "stacks_checked": bool(stacks_checked),
        "stack_bytes": int(sum(sizes)),
    }


def _human(nbytes: int) -> str:
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"  # pragma: no cover


def _fmt(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def format_text(info: dict, max_groups: int = 20) -> str:
    lines = [
        f"{info['source']} ({info['format']})",
        f"particles      {info['particles']}",
        f"box            {info['box']} px"
        if info["box"]
        else "box            unknown (stacks not read)",
        f"pixel size     {_fmt(info['pixel_size_A'])} Å",
    ]
    groups = info["optics_groups"]
    lines.append(f"optics groups  {len(groups)}")
    for g in groups[:max_groups]:
        desc = (
            f"  {g['group']}{' (' + g['name'] + ')' if g['name'] else ''}: {g['particles']} "
            f"particles, {g['pixel_size_A']:g} Å/px"
        )
        if "voltage_kV" in g:
            desc += (
                f", {g['voltage_kV']:g} kV, Cs {g['cs_mm']:g} mm, amp. contrast "
                f"{g['amp_contrast']:g}"
            )
        lines.append(desc)
    if len(groups) > max_groups:
        lines.append(f"  ... {len(groups) - max_groups} more")
    c = info["ctf"]
    if c is None:
        lines.append("CTF            absent or incomplete")
    else:
        lines += [
            f"defocus        {c['defocus_um'][0]:g} - {c['defocus_um'][1]:g} µm "
            f"(angle {c['defocus_angle_deg'][0]:g} - {c['defocus_angle_deg'][1]:g}°)",
            f"voltage        {_fmt(c['voltage_kV'])} kV",
            f"Cs             {_fmt(c['cs_mm'])} mm",
            f"amp. contrast  {_fmt(c['amp_contrast'])}",
        ]
        if c["phase_shift_deg"] != [0.0, 0.0]:
            lines.append(
                f"phase shift    {c['phase_shift_deg'][0]:g} - {c['phase_shift_deg'][1]:g}°"
            )
    poses = "yes" if info["poses"] else "no"
    if info["shifts"]:
        poses += f" (shifts {info['shift_range_A'][0]:g} to {info['shift_range_A'][1]:g} Å)"
    lines.append(f"poses          {poses}")
    stacks = f"stacks         {info['stacks']} file(s), {_human(info['stack_bytes'])}"
    if info["stacks_found"] < info["stacks"]:
        stacks += f" ({info['stacks'] - info['stacks_found']} not found)"
    lines.append(stacks)
    return "\n".join(lines)


def run(args) -> int:
    check = not args.no_stacks
    ps = read_particles_from_args(args, require_ctf=False, check_images=check)
    info = summarize(ps, stacks_checked=check)
    if args.json:
        json.dump(info, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_text(info))
    return 0
