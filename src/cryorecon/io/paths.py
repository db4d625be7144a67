"""Where the image stacks named in a particle file are.

RELION writes ``rlnImageName`` relative to the *project* folder where RELION ran, not to the
STAR file's folder: ``Select/job005/particles.star`` names ``Extract/job012/Movies/mic1.mrcs``.
cryoSPARC writes ``blob/path`` relative to its project folder, marked by a leading ``>``.
A relative name is looked for, in this order, as

1. ``DATADIR/name``, then ``DATADIR/basename`` (only with ``--datadir``; cryoDRGN's option);
2. ``FOLDER/name``, where FOLDER is the particle file's folder;
3. ``PARENT/name`` for each parent folder of FOLDER, nearest first, up to the root (so a
   RELION project's STAR files are found from anywhere, with no flags);
4. ``name`` relative to the current folder;
5. ``FOLDER/basename`` (stacks copied next to the particle file).

An absolute name is used as it is, then ``DATADIR/basename`` and ``FOLDER/basename`` (data
moved to another machine). The first existing file wins; the error for a missing stack lists
every place tried (:func:`not_found_message`).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


def check_datadir(datadir) -> Path | None:
    """``datadir`` as a Path (None stays None); InputError if it is not an existing folder."""
    if datadir is None:
        return None
    d = Path(datadir)
    if not d.is_dir():
        what = "is not a folder" if d.exists() else "does not exist"
        raise InputError(f"--datadir {d} {what}")
    return d


def stack_candidates(name: str, folder: Path, datadir: Path | None = None) -> list[Path]:
    """Every path at which the stack ``name`` is looked for, in order, without repeats."""
    if name.startswith(">"):
        name = name[1:]
    p = Path(name)
    out: list[Path] = []
    if p.is_absolute():
        out.append(p)
        if datadir is not None:
            out.append(datadir / p.name)
        out.append(folder / p.name)
    else:
        if datadir is not None:
            out += [datadir / p, datadir / p.name]
        out.append(folder / p)
        out += [parent / p for parent in Path(os.path.abspath(folder)).parents]
        out += [p, folder / p.name]
    seen, unique = set(), []
    for c in out:
        key = os.path.abspath(c)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def find_stack(
    name: str, folder: Path, datadir: Path | None = None
) -> tuple[Path, bool, list[Path]]:
    """``(path, found, tried)``: the first existing candidate (else the first candidate),
    whether it exists, and the candidates tried (all of them when none exists)."""
    cands = stack_candidates(name, Path(folder), datadir)
    for i, c in enumerate(cands):
        if c.is_file():
            return c, True, cands[: i + 1]
    return cands[0], False, cands


def not_found_message(name: str, tried) -> str:
    """One line: the stack as written and every path tried (absolute)."""
    where = ", ".join(os.path.abspath(t) for t in tried)
    return (
        f"image stack {name} not found (looked for {where}; "
        "give the folder the names are relative to with --datadir)"
    )
