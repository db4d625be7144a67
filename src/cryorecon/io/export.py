"""Poses out: a run's pose per particle, for RELION (STAR 3.1+) and cryoSPARC (``.cs``).

:func:`export_poses` writes ``particles.star`` (RELION 3.1+: ``data_optics`` +
``data_particles``) holding every column of the input, in the input's order, with the run's
pose per particle, so that ``relion_reconstruct --ctf`` or ``relion_refine`` start from it;
and, when the input was a cryoSPARC ``.cs``, also ``particles.cs`` holding every field of the
input with the run's ``alignments3D/pose`` and ``alignments3D/shift``.

The poses (the dict the driver saves as ``RUN/poses.npz``):

- ``eulers_deg`` (N, 3): ``rlnAngleRot, rlnAngleTilt, rlnAnglePsi``, RELION ZYZ
  (:mod:`cryorecon.geometry.rotations`);
- ``shifts_A`` (N, 2): ``rlnOriginXAngst, rlnOriginYAngst`` (Å; the particle centre sits at
  ``D//2 - origin``, :mod:`cryorecon.geometry.poses`);
- ``max_prob`` (N,): ``rlnMaxValueProbDistribution``; ``subset`` (N,) 0 (none), 1 or 2:
  ``rlnRandomSubset``; ``class_number`` (N,) 1-based, optional: ``rlnClassNumber``.

STAR columns. Pose columns are set (added when absent); an input ``rlnOriginX/Y`` (pixels,
RELION 3.0) is kept with the new origin in pixels. ``rlnRandomSubset`` is written only when
every exported particle is in half 1 or 2 (otherwise the input's column, if any, is left as
it was). A RELION 3.0 input gains a ``data_optics`` table (one group per
``ParticleSet.optics_group``: pixel size, box, voltage, Cs, amplitude contrast) and an
``rlnOpticsGroup`` column; its own columns stay. Image names are copied unchanged: they are
relative to the RELION project folder, so run RELION from there (cryorecon finds the
project from any folder inside it, or with ``--datadir``). A ``.cs`` input has no STAR
columns: the STAR gets image names ``N@path`` with the stack's absolute path as found, the
CTF, the optics groups and the poses.

cryoSPARC fields (the exact inverse of :mod:`cryorecon.io.cryosparc`'s reading):
``alignments3D/pose`` is the axis-angle vector (radians) of ``R = A^T``, where ``A`` is
RELION's matrix of the Euler angles; ``alignments3D/shift = origin_A / blob/psize_A``
(pixels, same sign); ``alignments3D/psize_A = blob/psize_A``; ``alignments3D/split`` =
subset - 1 (when every particle is in a half); ``alignments3D/class`` = class - 1.

Particles the run never visited (NaN angles) are left out of both files, and the count is
logged: their only other pose would be the input's, which lives in another frame than the
run's map, so mixing the two would corrupt a reconstruction. Files are written to temporary
names and renamed into place; an existing file is refused (OutputExistsError) unless
``overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..progress import log
from .mrc import check_writable

ANGLE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_LABELS = ("rlnOriginXAngst", "rlnOriginYAngst")
FLOAT_FORMAT = "%.12g"  # every digit of RELION's %12.6f and of float32 survives


def check_poses(poses: dict, n: int, where: str = "poses") -> dict:
    """The pose arrays of ``poses`` as float64/int64 NumPy, checked against ``n`` particles."""
    shapes = {
        "eulers_deg": (n, 3),
        "shifts_A": (n, 2),
        "max_prob": (n,),
        "subset": (n,),
        "class_number": (n,),
    }
    out = {}
    for key, shape in shapes.items():
        if key not in poses or poses[key] is None:
            if key in ("eulers_deg", "shifts_A"):
                raise InputError(f"{where}: no {key} (per-particle poses)")
            continue
        a = np.asarray(poses[key])
        if a.shape != shape:
            raise InputError(
                f"{where}: {key} has shape {a.shape}, expected {shape} for {n} particles"
            )
        out[key] = a.astype(np.int64 if key in ("subset", "class_number") else np.float64)
    return out


def export_poses(particles, poses: dict, out_dir, overwrite: bool = False) -> list[Path]:
    """Write ``out_dir/particles.star`` (and ``particles.cs`` for a ``.cs`` input) with the
    run's ``poses`` for ``particles`` (the ParticleSet read from its file, in its order).
    Returns the paths written. See the module notes for columns, units and conventions."""
    if particles.stack_D:  # read downsampled: the files' pixel sizes and box (shifts are in Å)
        particles = particles.at_box(particles.stack_box)
    source = Path(particles.source)
    n = len(particles)
    p = check_poses(poses, n)
    is_cs = source.suffix.lower() == ".cs"
    out_dir = Path(out_dir)
    targets = [out_dir / "particles.star"] + ([out_dir / "particles.cs"] if is_cs else [])
    for t in targets:
        check_writable(t, overwrite)
    keep = np.isfinite(p["eulers_deg"]).all(1) & np.isfinite(p["shifts_A"]).all(1)
    if not keep.any():
        raise InputError(f"no particle of {source} has a pose from this run yet; nothing to export")
    if not keep.all():
        log.warning(
            f"export: {int((~keep).sum())} of {n} particles have no pose from this run "
            "(never visited); they are left out"
        )
    if is_cs:
        from .cryosparc import load_cs

        cs = load_cs(source)
        if len(cs) != n:
            raise InputError(f"{source}: {len(cs)} rows, but the particle set has {n}")
        blocks = _star_from_particles(particles)
    else:
        blocks = _star_from_file(particles)
    blocks["particles"] = _set_star_poses(blocks["particles"], particles, p)[keep]
    blocks["particles"] = blocks["particles"].reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_write_atomic(targets[0], lambda f: _write_star(blocks, f))]
    if is_cs:
        arr = cs_with_poses(cs, p)[keep]
        written.append(_write_atomic(targets[1], lambda f: _save_npy(arr, f)))
    return written


# --------------------------------------------------------------------------- STAR
def _star_from_file(particles) -> dict[str, pd.DataFrame]:
    """The input STAR's blocks (optics first), with an optics table made for RELION 3.0."""
    from .star import _particle_block, read_star_blocks

    source = Path(particles.source)
    blocks = read_star_blocks(source)
    name, df = _particle_block(source, blocks)
    if len(df) != len(particles):
        raise InputError(
            f"{source}: {len(df)} particle rows, but the particle set has "
            f"{len(particles)}; export needs the set as read from the file"
        )
    df = df.reset_index(drop=True).copy()
    optics = blocks.get("optics")
    if optics is None or len(optics) == 0:
        optics = _optics_table(particles)
    else:
        optics = _complete_optics(optics.reset_index(drop=True), particles)
    if "rlnOpticsGroup" not in df.columns:  # RELION 3.1 needs it on every particle
        df["rlnOpticsGroup"] = particles.optics_group.astype(np.int64)
    out = {"optics": optics, "particles": df}
    for other, block in blocks.items():
        if other not in ("optics", name):
            out[other] = block
    return out


def _group_firsts(particles) -> tuple[np.ndarray, np.ndarray]:
    groups, first = np.unique(particles.optics_group, return_index=True)
    return groups, first


def _optics_table(particles) -> pd.DataFrame:
    """RELION 3.1 ``data_optics`` rows for the particles' optics groups."""
    groups, first = _group_firsts(particles)
    if particles.D <= 0:
        raise InputError(
            f"{particles.source}: box size unknown (no stack found; give --datadir) "
            "but RELION's data_optics needs rlnImageSize"
        )
    names = particles.meta.get("optics_names", {}) or {}
    cols = {
        "rlnOpticsGroup": groups.astype(np.int64),
        "rlnOpticsGroupName": [names.get(int(g), f"opticsGroup{int(g)}") for g in groups],
        "rlnImagePixelSize": particles.apix[first],
        "rlnImageSize": np.full(len(groups), int(particles.D), dtype=np.int64),
        "rlnImageDimensionality": np.full(len(groups), 2, dtype=np.int64),
    }
    ctf = particles.ctf
    for label, key in (
        ("rlnVoltage", "voltage"),
        ("rlnSphericalAberration", "cs"),
        ("rlnAmplitudeContrast", "amp_contrast"),
    ):
        if key in ctf:
            cols[label] = np.asarray(ctf[key])[first]
    return pd.DataFrame(cols)


def _complete_optics(optics: pd.DataFrame, particles) -> pd.DataFrame:
    """Add the labels RELION 3.1 needs (pixel size, box, dimensionality) if the input lacks them."""
    if "rlnOpticsGroup" not in optics.columns:
        return optics
    made = _optics_table(particles).set_index("rlnOpticsGroup")
    g = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce")
    for label in ("rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"):
        if label not in optics.columns:
            optics[label] = made[label].reindex(g).to_numpy()
    return optics


def _star_from_particles(particles) -> dict[str, pd.DataFrame]:
    """A RELION 3.1 table of a set that came from a ``.cs`` file (no STAR columns to keep)."""
    from .star import relion31_tables

    if not particles.ctf:
        raise InputError(f"{particles.source}: no CTF fields; cannot write a RELION STAR file")
    paths = []
    for _s, (stack, name) in enumerate(zip(particles.stacks, particles.stack_names)):
        found = Path(stack).is_file()
        paths.append(os.path.abspath(stack) if found else name.lstrip(">"))
    names = [
        f"{int(i) + 1:06d}@{paths[int(s)]}"
        for i, s in zip(particles.slice_index, particles.stack_index)
    ]
    ctf = {k: np.asarray(v, dtype=np.float64) for k, v in particles.ctf.items()}
    optics, df = relion31_tables(
        names, np.asarray(particles.apix, dtype=np.float64), ctf, D=particles.D
    )
    return {"optics": optics, "particles": df}


def _set_star_poses(df: pd.DataFrame, particles, p: dict) -> pd.DataFrame:
    df = df.copy()
    e, t = p["eulers_deg"], p["shifts_A"]
    for j, label in enumerate(ANGLE_LABELS):
        df[label] = e[:, j]
    for j, label in enumerate(ORIGIN_LABELS):
        df[label] = t[:, j]
    apix = np.asarray(particles.apix, dtype=np.float64)
    for j, label in enumerate(("rlnOriginX", "rlnOriginY")):
        if label in df.columns:
            df[label] = t[:, j] / apix
    if "max_prob" in p:
        df["rlnMaxValueProbDistribution"] = p["max_prob"]
    if "subset" in p:
        sub = p["subset"]
        if np.isin(sub[np.isfinite(p["eulers_deg"]).all(1)], (1, 2)).all():
            df["rlnRandomSubset"] = sub
    if "class_number" in p:
        df["rlnClassNumber"] = p["class_number"]
    return df


def _write_star(blocks: dict[str, pd.DataFrame], path: Path) -> None:
    import starfile

    starfile.write(blocks, path, float_format=FLOAT_FORMAT)


# --------------------------------------------------------------------------- cryoSPARC
def relion_to_cs_pose(eulers_deg: np.ndarray) -> np.ndarray:
    """RELION Euler angles (N, 3) deg -> cryoSPARC axis-angle poses (N, 3) rad, the inverse of
    :func:`cryorecon.io.cryosparc.cs_pose_to_relion`: ``pose = rotvec(A^T)``."""
    import torch
    from scipy.spatial.transform import Rotation

    from ..geometry.rotations import euler_to_matrix

    a = torch.deg2rad(torch.as_tensor(np.asarray(eulers_deg, dtype=np.float64)))
    A = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).numpy()
    return Rotation.from_matrix(A.transpose(0, 2, 1)).as_rotvec()


def cs_with_poses(cs: np.ndarray, p: dict) -> np.ndarray:
    """A copy of the structured array ``cs`` with the run's ``alignments3D/*`` fields (added
    when absent); every other field unchanged."""
    n = len(cs)
    keep = np.isfinite(p["eulers_deg"]).all(1)
    new = {
        "alignments3D/pose": ("<f4", (3,)),
        "alignments3D/shift": ("<f4", (2,)),
        "alignments3D/psize_A": ("<f4", ()),
    }
    split = "subset" in p and np.isin(p["subset"][keep], (1, 2)).all()
    if split:
        new["alignments3D/split"] = ("<u4", ())
    if "class_number" in p:
        new["alignments3D/class"] = ("<u4", ())
    descr = [d for d in cs.dtype.descr if d[0]]
    names = set(cs.dtype.names)
    descr += [(k, t, s) if s else (k, t) for k, (t, s) in new.items() if k not in names]
    out = np.zeros(n, dtype=np.dtype(descr))
    for name in cs.dtype.names:
        out[name] = cs[name]
    psize = cs["blob/psize_A"].astype(np.float64)
    eul = np.where(np.isfinite(p["eulers_deg"]), p["eulers_deg"], 0.0)
    out["alignments3D/pose"] = relion_to_cs_pose(eul).reshape(out["alignments3D/pose"].shape)
    shift = np.where(np.isfinite(p["shifts_A"]), p["shifts_A"], 0.0) / psize[:, None]
    out["alignments3D/shift"] = shift.reshape(out["alignments3D/shift"].shape)
    out["alignments3D/psize_A"] = psize
    if split:
        out["alignments3D/split"] = np.clip(p["subset"] - 1, 0, 1)
    if "class_number" in p:
        out["alignments3D/class"] = np.clip(p["class_number"] - 1, 0, None)
    return out


def _save_npy(arr: np.ndarray, path: Path) -> None:
    with open(path, "wb") as fh:  # np.save(path) would append .npy
        np.save(fh, arr)


# --------------------------------------------------------------------------- files
def _write_atomic(path: Path, write) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
