"""RELION particle STAR files: 3.0 (one table) and 3.1 / 4 / 5 (``data_optics`` +
``data_particles``).

Reading returns a plain dict of per-particle NumPy arrays (see :func:`read_star_particles`);
:mod:`cryorecon.io.particles` turns it into a :class:`~cryorecon.io.particles.ParticleSet`.
Everything is vectorised with pandas/NumPy: a 100,000-row file takes well under a second
beyond what ``starfile`` needs to parse it.

Conventions (RELION's own, see its metadata label documentation):

- ``rlnImageName`` is ``N@path``: ``N`` is 1-based; ``path`` is relative to the RELION project
  folder, which is looked for from ``--datadir``, the STAR file's folder and each folder above
  it, then the current folder (:mod:`cryorecon.io.paths`). A name without ``@`` is a file
  holding one image.
- Pixel size (Å): ``rlnImagePixelSize`` (3.1+), else ``rlnPixelSize``, else
  ``rlnDetectorPixelSize`` (µm) * 1e4 / ``rlnMagnification`` (3.0).
- Shifts: ``rlnOriginXAngst/YAngst`` (Å, 3.1+), else ``rlnOriginX/Y`` (pixels, 3.0), which
  are multiplied by the pixel size, so shifts come back in Å with RELION 3.1's meaning.
- In a 3.1+ file every column of ``data_optics`` is joined onto the particles through
  ``rlnOpticsGroup``; a column present in both tables takes the particle's value.
- CTF: ``rlnDefocusU/V`` (Å), ``rlnDefocusAngle`` (deg), ``rlnVoltage`` (kV),
  ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``; ``rlnPhaseShift`` (deg) and
  ``rlnCtfBfactor`` (Å^2) default to 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, one_line
from ..progress import log
from .checks import check_text_file
from .paths import check_datadir, find_stack

# ParticleSet.ctf key -> RELION label(s), first found wins.
CTF_LABELS: dict[str, tuple[str, ...]] = {
    "defocus_u": ("rlnDefocusU",),
    "defocus_v": ("rlnDefocusV",),
    "defocus_angle": ("rlnDefocusAngle",),
    "voltage": ("rlnVoltage",),
    "cs": ("rlnSphericalAberration",),
    "amp_contrast": ("rlnAmplitudeContrast",),
    "phase_shift": ("rlnPhaseShift",),
    "bfactor": ("rlnCtfBfactor", "rlnCtfBFactor"),
}
#: Keys of a CTF parameter dict (:attr:`ParticleSet.ctf`; units Å, deg, kV, mm, Å^2).
CTF_KEYS = tuple(CTF_LABELS)
#: Values of the optional keys when a file lacks them (no phase plate, no envelope).
CTF_DEFAULTS = {"phase_shift": 0.0, "bfactor": 0.0}


def read_star_blocks(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """All data blocks of a STAR file as DataFrames (simple key-value blocks become one row)."""
    import starfile

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such STAR file")
    check_text_file(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on malformed text
        raise InputError(f"{path}: not a readable STAR file ({one_line(exc)})") from exc
    out = {}
    for name, block in (blocks or {}).items():
        if isinstance(block, dict):
            block = pd.DataFrame([block]) if block else pd.DataFrame()
        out[str(name)] = block
    return out


def _particle_block(path: Path, blocks: dict[str, pd.DataFrame]) -> tuple[str, pd.DataFrame]:
    if "particles" in blocks:
        return "particles", blocks["particles"]
    for name, df in blocks.items():
        if "rlnImageName" in df.columns:
            return name, df
    if not blocks or all(len(df) == 0 for df in blocks.values()):
        raise InputError(f"{path}: no particles (the STAR file has no data rows)")
    raise InputError(
        f"{path}: no data block with an rlnImageName column (blocks: "
        f"{', '.join('data_' + n for n in blocks)})"
    )


def _numeric(path: Path, label: str, values, names: pd.Series) -> np.ndarray:
    arr = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path}: particle {i} ({names.iloc[i]}): {label} is not a finite number "
            f"({values.iloc[i] if hasattr(values, 'iloc') else values[i]!r})"
        )
    return arr


def split_image_names(path: Path, names: pd.Series) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``N@file`` -> (0-based slice index, distinct file names, index into them), vectorised."""
    s = names.astype(str).str.strip()
    has_at = s.str.contains("@", regex=False).to_numpy()
    parts = s.str.split("@", n=1, expand=True)
    if parts.shape[1] == 1:  # no '@' anywhere
        parts[1] = None
    number = parts[0].where(has_at, "1")
    fname = parts[1].where(has_at, s)
    num = pd.to_numeric(number, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(num) | (num < 1) | (num != np.round(num))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path}: particle {i}: rlnImageName {s.iloc[i]!r} is not 'N@file' with N >= 1"
        )
    codes, uniques = pd.factorize(fname, sort=False)
    return num.astype(np.int64) - 1, [str(u) for u in uniques], codes.astype(np.int64)


def read_star_particles(
    path: str | os.PathLike, require_ctf: bool = True, datadir: str | os.PathLike | None = None
) -> dict:
    """Parse a RELION particle STAR file into per-particle arrays (no image data touched).

    ``datadir``: a folder the image names may be relative to, tried first
    (:mod:`cryorecon.io.paths`). Returns a dict with keys ``format``, ``n``, ``image_names``
    (pd.Series, for messages), ``stack_names`` (distinct names as written), ``stack_paths``
    (resolved Paths), ``stack_found`` (bool list), ``stack_tried`` (per stack, the paths
    looked at), ``stack_index``, ``slice_index`` (0-based), ``apix``,
    ``ctf`` (dict, ``{}`` if incomplete and not required), ``ctf_missing``, ``angles``,
    ``shifts`` (Å), ``optics_group``, ``optics_names`` (group -> name) and ``box``
    ((N,) int image size from ``rlnImageSize`` or None).
    """
    path = Path(path)
    blocks = read_star_blocks(path)
    _, df = _particle_block(path, blocks)
    n = len(df)
    if n == 0:
        raise InputError(f"{path}: no particles (the particle table is empty)")
    if "rlnImageName" not in df.columns:
        raise InputError(f"{path}: the particle table has no rlnImageName column")
    names = df["rlnImageName"].astype(str).reset_index(drop=True)
    df = df.reset_index(drop=True)

    optics = blocks.get("optics")
    if optics is not None and len(optics) == 0:
        optics = None
    fmt = "RELION 3.1+" if optics is not None else "RELION 3.0"
    gidx = None
    optics_names: dict[int, str] = {}
    if optics is not None:
        optics = optics.reset_index(drop=True)
        if "rlnOpticsGroup" in optics.columns:
            ogroups = pd.to_numeric(optics["rlnOpticsGroup"], errors="coerce").to_numpy()
        else:
            ogroups = np.arange(1, len(optics) + 1, dtype=np.float64)
        if "rlnOpticsGroup" in df.columns:
            pg = _numeric(path, "rlnOpticsGroup", df["rlnOpticsGroup"], names)
        elif len(optics) == 1:
            pg = np.full(n, ogroups[0], dtype=np.float64)
        else:
            raise InputError(
                f"{path}: {len(optics)} optics groups but the particle table has no "
                "rlnOpticsGroup column"
            )
        gidx = pd.Index(ogroups).get_indexer(pg)
        if (gidx < 0).any():
            i = int(np.flatnonzero(gidx < 0)[0])
            raise InputError(
                f"{path}: particle {i} ({names.iloc[i]}): rlnOpticsGroup {pg[i]:g} "
                "is not in data_optics"
            )
        optics_group = pg.astype(np.int64)
        if "rlnOpticsGroupName" in optics.columns:
            optics_names = {int(g): str(nm) for g, nm in zip(ogroups, optics["rlnOpticsGroupName"])}

    def column(label: str) -> np.ndarray | None:
        if label in df.columns:
            return _numeric(path, label, df[label], names)
        if optics is not None and label in optics.columns:
            vals = pd.to_numeric(optics[label], errors="coerce").to_numpy(dtype=np.float64)
            bad = ~np.isfinite(vals)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise InputError(
                    f"{path}: data_optics row {j}: {label} is not a finite number "
                    f"({optics[label].iloc[j]!r})"
                )
            return vals[gidx]
        return None

    # pixel size
    apix = column("rlnImagePixelSize")
    if apix is None:
        apix = column("rlnPixelSize")
    if apix is None:
        det, mag = column("rlnDetectorPixelSize"), column("rlnMagnification")
        if det is not None and mag is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                apix = det * 1e4 / mag
    if apix is None:
        raise InputError(
            f"{path}: no pixel size (need rlnImagePixelSize, rlnPixelSize, or "
            "rlnDetectorPixelSize and rlnMagnification)"
        )
    bad = ~(np.isfinite(apix) & (apix > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{path}: particle {i} ({names.iloc[i]}): pixel size {apix[i]} is not positive"
        )

    # CTF
    ctf: dict[str, np.ndarray] = {}
    missing = []
    for key, labels in CTF_LABELS.items():
        val = None
        for lab in labels:
            val = column(lab)
            if val is not None:
                break
        if val is None:
            if key in CTF_DEFAULTS:
                val = np.full(n, CTF_DEFAULTS[key], dtype=np.float64)
            else:
                missing.append(labels[0])
                continue
        ctf[key] = val
    if missing:
        if require_ctf:
            raise InputError(
                f"{path}: missing CTF column(s) {', '.join(missing)} "
                f"(in the particle table{' or data_optics' if optics is not None else ''})"
            )
        ctf = {}

    # poses
    rot, tilt, psi = column("rlnAngleRot"), column("rlnAngleTilt"), column("rlnAnglePsi")
    angles = (
        np.stack([rot, tilt, psi], axis=1) if all(a is not None for a in (rot, tilt, psi)) else None
    )
    ox, oy = column("rlnOriginXAngst"), column("rlnOriginYAngst")
    if ox is not None and oy is not None:
        shifts = np.stack([ox, oy], axis=1)
    else:
        ox, oy = column("rlnOriginX"), column("rlnOriginY")
        shifts = (
            np.stack([ox * apix, oy * apix], axis=1) if ox is not None and oy is not None else None
        )

    if gidx is None:
        # RELION 3.0: no optics table; one group per distinct (voltage, cs, amp contrast, apix).
        keys = [apix] + [ctf[k] for k in ("voltage", "cs", "amp_contrast") if k in ctf]
        _, inv = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
        optics_group = inv.reshape(-1).astype(np.int64) + 1

    box = column("rlnImageSize")
    if box is not None:
        box = box.astype(np.int64)
    subset = column("rlnRandomSubset")
    if subset is not None:
        subset = _half_sets(path, subset.astype(np.int64), "rlnRandomSubset")

    slice_index, stack_names, stack_index = split_image_names(path, names)
    datadir = check_datadir(datadir)
    resolved = [find_stack(s, path.parent, datadir) for s in stack_names]
    return {
        "format": fmt,
        "n": n,
        "image_names": names,
        "stack_names": stack_names,
        "stack_paths": [r[0] for r in resolved],
        "stack_found": [r[1] for r in resolved],
        "stack_tried": [r[2] for r in resolved],
        "stack_index": stack_index,
        "slice_index": slice_index,
        "apix": apix.astype(np.float64),
        "ctf": ctf,
        "ctf_missing": missing,
        "angles": angles,
        "shifts": shifts,
        "optics_group": optics_group,
        "optics_names": optics_names,
        "box": box,
        "random_subset": subset,
    }


def _half_sets(path: Path, subset: np.ndarray, label: str) -> np.ndarray | None:
    """``rlnRandomSubset`` as given when every particle is in half 1 or 2, else None (with a
    warning: cryorecon then draws its own halves)."""
    if np.isin(subset, (1, 2)).all() and len(np.unique(subset)) == 2:
        return subset
    log.warning(
        f"{path}: {label} is not 1 or 2 for every particle (both present); "
        "cryorecon draws its own half-sets"
    )
    return None


def relion31_tables(image_names, apix, ctf: dict, angles=None, shifts=None, D: int = 0):
    """Build RELION 3.1 ``(optics, particles)`` DataFrames.

    One optics group per distinct (voltage, cs, amp_contrast, apix). All inputs (N,) arrays
    (already broadcast); angles (N, 3) deg, shifts (N, 2) Å.
    """
    n = len(image_names)
    key = np.stack([ctf["voltage"], ctf["cs"], ctf["amp_contrast"], apix], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, len(uniq) + 1, dtype=np.int64),
            "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, len(uniq) + 1)],
            "rlnImagePixelSize": uniq[:, 3],
            "rlnImageSize": np.full(len(uniq), int(D), dtype=np.int64),
            "rlnImageDimensionality": np.full(len(uniq), 2, dtype=np.int64),
            "rlnVoltage": uniq[:, 0],
            "rlnSphericalAberration": uniq[:, 1],
            "rlnAmplitudeContrast": uniq[:, 2],
        }
    )
    cols = {
        "rlnImageName": np.asarray(image_names, dtype=object),
        "rlnDefocusU": ctf["defocus_u"],
        "rlnDefocusV": ctf["defocus_v"],
        "rlnDefocusAngle": ctf["defocus_angle"],
        "rlnPhaseShift": ctf.get("phase_shift", np.zeros(n)),
        "rlnCtfBfactor": ctf.get("bfactor", np.zeros(n)),
        "rlnOpticsGroup": inv.astype(np.int64) + 1,
    }
    if angles is not None:
        cols["rlnAngleRot"], cols["rlnAngleTilt"], cols["rlnAnglePsi"] = (
            angles[:, 0],
            angles[:, 1],
            angles[:, 2],
        )
    if shifts is not None:
        cols["rlnOriginXAngst"], cols["rlnOriginYAngst"] = shifts[:, 0], shifts[:, 1]
    return optics, pd.DataFrame(cols)
