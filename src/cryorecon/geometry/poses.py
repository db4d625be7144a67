"""Conversion between RELION pose metadata and the paper's (R, t).

RELION stores ``rlnAngleRot/Tilt/Psi`` (degrees, ZYZ) and origin offsets ``rlnOriginXAngst/
YAngst`` (Å). The matrix is :func:`~cryorecon.geometry.rotations.euler_to_matrix`; the
paper's image translation ``t`` (pixels, Eq. 1: content moved by ``+t``) is ``-origin / apix``
— the particle centre sits at ``D//2 - origin`` — as pinned by the ``relion_project`` golden
images in tests/test_slicing.py.
"""

from __future__ import annotations

import numpy as np
import torch

from .rotations import euler_to_matrix, matrix_to_euler


def relion_to_pose(angles_deg, origins_A, apix) -> tuple[torch.Tensor, torch.Tensor]:
    """RELION angles (N, 3) deg and origins (N, 2) Å (or None) -> (R (N,3,3), t (N,2) px)."""
    a = torch.as_tensor(np.asarray(angles_deg, dtype=np.float64))
    R = euler_to_matrix(*torch.deg2rad(a).T).to(torch.float32)
    if origins_A is None:
        t = torch.zeros(a.shape[0], 2)
    else:
        apix = np.asarray(apix, dtype=np.float64).reshape(-1, 1)
        t = torch.as_tensor(-np.asarray(origins_A, dtype=np.float64) / apix, dtype=torch.float32)
    return R, t


def pose_to_relion(R: torch.Tensor, t_px: torch.Tensor, apix) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`relion_to_pose`: -> (angles (N,3) deg, origins (N,2) Å)."""
    rot, tilt, psi = matrix_to_euler(R.to(torch.float64))
    angles = torch.rad2deg(torch.stack([rot, tilt, psi], -1)).numpy()
    apix = np.asarray(apix, dtype=np.float64).reshape(-1, 1)
    origins = -t_px.to(torch.float64).numpy() * apix
    return angles, origins
