"""cryoSPARC particle files (``.cs``: a NumPy structured array saved with ``np.save``).

Fields used: ``blob/path`` (bytes; a leading ``>`` means "relative to the project"),
``blob/idx`` (0-based), ``blob/shape`` (ny, nx), ``blob/psize_A``, ``ctf/df1_A``,
``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast``,
``ctf/phase_shift_rad``, ``ctf/bfactor``, ``ctf/exp_group_id``; and, when present,
``alignments3D/pose`` (or ``alignments_class_0/pose`` from ab-initio) and
``alignments3D/shift``.

Pose conversion to RELION's convention (followed: pyem ``csparc2star`` / ``pyem.metadata.
cryosparc2.parse_cryosparc_2_cs``, cross-checked with cryoDRGN ``parse_pose_csparc``):

- pyem: ``rlnAngleRot/Tilt/Psi = rot2euler(expmap(pose))`` where pyem's ``expmap`` builds
  Rodrigues' formula with the *negated* skew matrix, i.e. ``expmap(v) = R(v)^T`` with
  ``R(v) = scipy.spatial.transform.Rotation.from_rotvec(v).as_matrix()``, and ``rot2euler``
  is RELION's ``Euler_matrix2angles``.
- cryoDRGN: ``rot = lie_tools.expmap(pose).T`` (standard Rodrigues, so ``R(v)^T``), and for a
  STAR file ``rot = utils.R_from_relion(euler)``, which equals RELION's
  ``Euler_angles2matrix``. Both therefore give **A_relion = R(pose)^T**.
- Shifts: pyem copies ``alignments3D/shift`` (pixels) to ``rlnOriginX/Y`` unchanged;
  cryoDRGN divides both ``alignments3D/shift`` and ``rlnOriginX/Y`` by D with the same sign.
  So ``rlnOriginX/YAngst = shift * blob/psize_A`` (no sign flip).

The test suite checks the conversion against both formulas.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError, one_line
from .checks import check_npy_file
from .paths import check_datadir, find_stack
from .star import CTF_DEFAULTS

CS_CTF = {
    "defocus_u": ("ctf/df1_A", 1.0),
    "defocus_v": ("ctf/df2_A", 1.0),
    "defocus_angle": ("ctf/df_angle_rad", 180.0 / np.pi),
    "voltage": ("ctf/accel_kv", 1.0),
    "cs": ("ctf/cs_mm", 1.0),
    "amp_contrast": ("ctf/amp_contrast", 1.0),
    "phase_shift": ("ctf/phase_shift_rad", 180.0 / np.pi),
    "bfactor": ("ctf/bfactor", 1.0),
}


def load_cs(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such cryoSPARC file")
    check_npy_file(path)
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: not a readable cryoSPARC .cs file ({one_line(exc)})") from exc
    if not isinstance(cs, np.ndarray) or cs.dtype.names is None or cs.ndim != 1:
        raise InputError(f"{path}: not a cryoSPARC .cs file (expected a 1-D structured array)")
    return cs


def cs_pose_to_relion(pose: np.ndarray) -> np.ndarray:
    """cryoSPARC axis-angle poses (N, 3) -> RELION matrices A (N, 3, 3) = R(pose)^T."""
    from scipy.spatial.transform import Rotation

    return (
        Rotation.from_rotvec(np.asarray(pose, dtype=np.float64).reshape(-1, 3))
        .as_matrix()
        .transpose(0, 2, 1)
    )


def read_cs_particles(
    path: str | os.PathLike, require_ctf: bool = True, datadir: str | os.PathLike | None = None
) -> dict:
    """Parse a cryoSPARC ``.cs`` particle file; same dict layout as
    :func:`cryorecon.io.star.read_star_particles` (stacks found as :mod:`cryorecon.io.paths`
    says; a leading ``>`` is dropped)."""
    path = Path(path)
    cs = load_cs(path)
    fields = set(cs.dtype.names)
    n = len(cs)
    if n == 0:
        raise InputError(f"{path}: no particles (the .cs file has no rows)")
    for f in ("blob/path", "blob/idx"):
        if f not in fields:
            raise InputError(f"{path}: missing field {f} (not a particle .cs file?)")

    raw_paths = pd.Series(cs["blob/path"])
    codes, uniques = pd.factorize(raw_paths, sort=False)
    stack_names = [
        u.decode("utf-8", "replace") if isinstance(u, bytes) else str(u) for u in uniques
    ]
    slice_index = cs["blob/idx"].astype(np.int64)
    image_names = None  # built on demand by ParticleSet for messages

    if "blob/psize_A" not in fields:
        raise InputError(f"{path}: missing field blob/psize_A (pixel size)")
    apix = cs["blob/psize_A"].astype(np.float64)
    bad = ~(np.isfinite(apix) & (apix > 0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: particle {i}: blob/psize_A {apix[i]} is not positive")

    ctf: dict[str, np.ndarray] = {}
    missing = []
    for key, (field, scale) in CS_CTF.items():
        if field in fields:
            val = cs[field].astype(np.float64) * scale
            bad = ~np.isfinite(val)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"{path}: particle {i}: {field} is not finite")
            ctf[key] = val
        elif key in CTF_DEFAULTS:
            ctf[key] = np.full(n, CTF_DEFAULTS[key], dtype=np.float64)
        else:
            missing.append(field)
    if missing:
        if require_ctf:
            raise InputError(f"{path}: missing CTF field(s) {', '.join(missing)}")
        ctf = {}

    angles = shifts = None
    pose_key = next(
        (k for k in ("alignments3D/pose", "alignments_class_0/pose") if k in fields), None
    )
    if pose_key is not None:
        import torch

        from ..geometry.rotations import matrix_to_euler

        A = torch.from_numpy(cs_pose_to_relion(cs[pose_key]))
        rot, tilt, psi = matrix_to_euler(A)
        angles = np.rad2deg(torch.stack([rot, tilt, psi], dim=1).numpy())
        shift_key = pose_key.replace("/pose", "/shift")
        if shift_key in fields:
            shifts = cs[shift_key].astype(np.float64).reshape(n, 2) * apix[:, None]

    if "ctf/exp_group_id" in fields:
        optics_group = cs["ctf/exp_group_id"].astype(np.int64) + 1
    else:
        keys = [apix] + [ctf[k] for k in ("voltage", "cs", "amp_contrast") if k in ctf]
        _, inv = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
        optics_group = inv.reshape(-1).astype(np.int64) + 1

    box = None
    if "blob/shape" in fields:
        shape = cs["blob/shape"].astype(np.int64).reshape(n, -1)
        if shape.shape[1] >= 2:
            ns = shape[:, 0] != shape[:, 1]
            if ns.any():
                i = int(np.flatnonzero(ns)[0])
                raise InputError(
                    f"{path}: particle {i}: non-square image, blob/shape {tuple(shape[i])}"
                )
        box = shape[:, -1]

    subset = None
    if "alignments3D/split" in fields:
        from .star import _half_sets

        subset = _half_sets(
            path, cs["alignments3D/split"].astype(np.int64) + 1, "alignments3D/split"
        )

    datadir = check_datadir(datadir)
    resolved = [find_stack(s, path.parent, datadir) for s in stack_names]
    return {
        "format": "cryoSPARC",
        "n": n,
        "image_names": image_names,
        "stack_names": stack_names,
        "stack_paths": [r[0] for r in resolved],
        "stack_found": [r[1] for r in resolved],
        "stack_tried": [r[2] for r in resolved],
        "stack_index": codes.astype(np.int64),
        "slice_index": slice_index,
        "apix": apix,
        "ctf": ctf,
        "ctf_missing": missing,
        "angles": angles,
        "shifts": shifts,
        "optics_group": optics_group,
        "random_subset": subset,
        "optics_names": {},
        "box": box,
    }
