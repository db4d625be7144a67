"""MRC maps through ``mrcfile``: volumes indexed ``[z, y, x]``, voxel size in Å.

Maps are written with the voxel size in the header and origin 0, with the box centre at
index D//2, as RELION writes them, so ChimeraX overlays a map on another written the same
way. Writing never overwrites an existing file unless ``overwrite=True`` and goes through a
temporary file renamed into place, so a crash cannot leave a half-written map.
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputError, OutputExistsError

#: The header label of every map written here (mrcfile's default holds the time of writing).
FIXED_LABEL = b"Created by cryorecon".ljust(80)


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a 3D map. Returns ``(volume float32 [z, y, x], apix in Å)``.

    Raises :class:`InputError` naming the file if it is missing, unreadable, not 3D, or
    holds non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such map file")
    try:
        with mrcfile.open(path, permissive=False, mode="r") as m:
            data = np.asarray(m.data, dtype=np.float32).copy()
            apix = float(m.voxel_size.x)
    except Exception as exc:  # mrcfile raises ValueError/OSError on corrupt headers
        raise InputError(f"{path}: not a readable MRC file ({exc})") from exc
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D map, found shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: map holds NaN or Inf values")
    if apix <= 0:
        apix = 1.0
    return data, apix


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; refusing to overwrite (use --force)")
    return path


def write_map(path: str | os.PathLike, volume, apix: float, overwrite: bool = False) -> Path:
    """Write a 3D float32 map ``[z, y, x]`` with voxel size ``apix`` (Å), atomically."""
    path = check_writable(path, overwrite)
    data = np.ascontiguousarray(np.asarray(volume, dtype=np.float32))
    if data.ndim != 3:
        raise ValueError(f"write_map expects a 3D array, got shape {data.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = apix
        m.update_header_stats()
        m.header.label[0] = FIXED_LABEL  # not mrcfile's timestamp: equal maps, equal files
    os.replace(tmp, path)
    return path
