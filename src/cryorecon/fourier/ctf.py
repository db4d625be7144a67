"""The CTFFIND/RELION contrast transfer function, batched over particles (paper Eq. 1, 28).

This follows RELION's ``CTF::initialise`` / ``CTF::getCTF`` (src/ctf.h, src/ctf.cpp) term by
term:

- relativistic electron wavelength ``lambda = 12.2643247 / sqrt(V (1 + 0.978466e-6 V))`` Å
  with ``V`` the accelerating voltage in volts;
- astigmatic defocus along the direction ``theta`` of the frequency,
  ``df(theta) = 0.5 (dU + dV) + 0.5 (dU - dV) cos(2 (theta - azimuth))`` (Å, positive =
  underfocus, ``azimuth = rlnDefocusAngle``);
- ``theta = atan2(fy, fx)`` where ``fx`` runs along the image's fast axis (x, the last array
  index, the MRC column) and ``fy`` along the slow axis (y, the row) -- RELION's
  ``getFftwImage`` passes (column frequency, row frequency) as ``(X, Y)`` in the same way;
- RELION's phase ``gamma = K1 (-df) s^2 + K2 s^4 - phase_shift - K3`` with ``K1 = pi lambda``,
  ``K2 = pi/2 Cs lambda^3`` (Cs in Å), ``K3 = atan(Q0 / sqrt(1 - Q0^2))`` (so
  ``sin(K3) = Q0``); RELION negates the defocus inside ``initialise``
  (``defocus_average = -(dU + dV)/2``);
- ``CTF = -sin(gamma) * exp(-B s^2 / 4) * scale``.

Sign convention, stated once: written with the positive underfocus ``df`` the CTF is
``sin(chi)`` with ``chi = pi lambda df s^2 - pi/2 Cs lambda^3 s^4 + phase_shift + K3``.
At zero frequency it equals ``sin(K3 + phase_shift) = Q0`` (for no phase plate), and for an
underfocused image it rises towards +1 before its first zero: the CTF is *positive* at low
frequency. With density positive = protein this gives particle images in which protein is
bright, which is what RELION expects after extraction with inverted contrast.

Frequencies are in 1/Å; ``s^2 = fx^2 + fy^2``. Angles are degrees at this module's edges
(the ``rln*`` columns) because the inputs come straight from STAR files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["electron_wavelength", "ctf_2d", "ctf_from_dict"]


def electron_wavelength(voltage_kv):
    """Relativistic electron wavelength in Å for an accelerating voltage in kV (RELION's formula).

    Works on Python floats, numpy arrays and torch tensors. 300 kV -> 0.019687 Å,
    200 kV -> 0.025079 Å.
    """
    if isinstance(voltage_kv, torch.Tensor):
        v = voltage_kv.to(torch.float64) * 1e3
        return 12.2643247 / torch.sqrt(v * (1.0 + 0.978466e-6 * v))
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    lam = 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))
    return float(lam) if lam.ndim == 0 else lam


def _param(x, device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64, device=device)
    return t.reshape(-1) if t.ndim > 0 else t.reshape(1)


def ctf_2d(
    freqs: torch.Tensor,
    defocus_u,
    defocus_v,
    defocus_angle_deg,
    voltage_kv,
    cs_mm,
    amp_contrast,
    phase_shift_deg=0.0,
    bfactor=0.0,
    scale=1.0,
) -> torch.Tensor:
    """RELION's CTF at frequencies ``freqs`` for ``N`` parameter sets.

    Args:
        freqs: (M, 2) frequencies in 1/Å as ``(fx, fy)`` (fx along the image's fast axis x),
            shared by all particles, or (N, M, 2) per particle (more leading dimensions
            broadcast against the (N,) parameters as usual).
        defocus_u, defocus_v: (N,) defocus in Å, positive = underfocus (``rlnDefocusU/V``).
        defocus_angle_deg: (N,) astigmatism azimuth in degrees from the x axis
            (``rlnDefocusAngle``).
        voltage_kv: (N,) accelerating voltage in kV.
        cs_mm: (N,) spherical aberration in mm.
        amp_contrast: (N,) amplitude contrast Q0 in [0, 1).
        phase_shift_deg: (N,) phase-plate shift in degrees (``rlnPhaseShift``).
        bfactor: (N,) CTF B-factor in Å^2 (``rlnCtfBfactor``); envelope ``exp(-B s^2 / 4)``.
        scale: (N,) overall scale (``rlnCtfScalefactor``).
    Every parameter may also be a scalar (broadcast to N). Computed in float64.

    Returns:
        float32 tensor (N, M) (or the broadcast shape) on ``freqs``'s device.
    """
    device = freqs.device
    f = freqs.to(torch.float64)
    if f.ndim < 2 or f.shape[-1] != 2:
        raise ValueError(f"freqs must be (M, 2) or (..., N, M, 2), got {tuple(freqs.shape)}")
    params = [
        _param(p, device)
        for p in (
            defocus_u,
            defocus_v,
            defocus_angle_deg,
            voltage_kv,
            cs_mm,
            amp_contrast,
            phase_shift_deg,
            bfactor,
            scale,
        )
    ]
    params = torch.broadcast_tensors(*params)
    du, dv, ang, kv, cs, q0, ps, bf, sc = (p.unsqueeze(-1) for p in params)  # (N, 1)
    if torch.any(q0 < 0) or torch.any(q0 >= 1):
        raise ValueError("amplitude contrast must lie in [0, 1)")

    lam = electron_wavelength(kv)
    k1 = math.pi * lam
    k2 = 0.5 * math.pi * (cs * 1e7) * lam**3
    k3 = torch.atan(q0 / torch.sqrt(1.0 - q0 * q0))
    k5 = torch.deg2rad(ps)

    fx, fy = f[..., 0], f[..., 1]  # (M,) or (..., N, M)
    s2 = fx * fx + fy * fy
    theta = torch.atan2(fy, fx)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2.0 * (theta - torch.deg2rad(ang)))
    # RELION: gamma = K1 * (-df) * s^2 + K2 * s^4 - K5 - K3; ctf = -sin(gamma)
    gamma = -k1 * df * s2 + k2 * s2 * s2 - k5 - k3
    ctf = -torch.sin(gamma) * torch.exp(-bf * s2 / 4.0) * sc
    return ctf.to(torch.float32)


def _get(ctf: Mapping, key: str, idx, default):
    if key not in ctf or ctf[key] is None:
        return default
    v = ctf[key]
    v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    v = v.astype(np.float64)
    if v.ndim == 0:
        return v
    return v if idx is None else v[idx]


def ctf_from_dict(ctf: Mapping, idx, freqs: torch.Tensor) -> torch.Tensor:
    """:func:`ctf_2d` for particles ``idx`` (an index, slice, array, or None for all) of a CTF
    parameter dict: the keys of :attr:`~cryorecon.io.particles.ParticleSet.ctf`
    (``defocus_u``, ``defocus_v``, ``defocus_angle``, ``voltage``, ``cs``, ``amp_contrast``;
    optional ``phase_shift``, ``bfactor``, ``scale``), scalars or per-particle arrays.

    ``freqs`` in 1/Å: (M, 2) shared by the particles or (N, M, 2) per particle (for
    particles of different pixel sizes). Returns float32 (N, M) on ``freqs``'s device.
    """
    required = ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amp_contrast")
    args = [_get(ctf, k, idx, None) for k in required]
    missing = [k for k, a in zip(required, args) if a is None]
    if missing:
        raise KeyError(f"CTF dict lacks {missing}")
    return ctf_2d(
        freqs,
        *args,
        phase_shift_deg=_get(ctf, "phase_shift", idx, 0.0),
        bfactor=_get(ctf, "bfactor", idx, 0.0),
        scale=_get(ctf, "scale", idx, 1.0),
    )
