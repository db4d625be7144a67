"""Oracle reconstruction: CTF-corrected Wiener back-projection from known poses.

Given particle images with poses (RELION angles and origins), the least-squares estimate of
the 3D spectrum under the forward model of Eq. 1 is, per 3D frequency,

    V_hat = sum_i c_i conj(s_i) I_hat_i / sigma_i^2  /  (sum_i c_i^2 / sigma_i^2 + 1 / P(|k|))

where ``c_i`` is the CTF, ``s_i`` the phase shift of the particle's translation, the sums
run over all slices through that frequency (spread by the same trilinear kernel as the
forward model, :meth:`~cryorecon.fourier.slicing.SliceOperator.backproject`), and ``P(|k|)`` is
the signal power per shell, estimated from the data by the method of moments
(E|I_hat|^2 = c^2 P + sigma^2 for the unitary FFT). This is the best map the data allow
(the "oracle" of DESIGN.md) and checks every convention end to end.

Because the forward model samples the spectrum of the premultiplied volume (V / sinc^2),
the inverse step multiplies back by sinc^2 — the adjoint-consistent choice, so that images
made by :func:`~cryorecon.fourier.slicing.project` reconstruct to the volume that made them.
"""

from __future__ import annotations

import numpy as np
import torch

from .fourier.ctf import ctf_from_dict
from .fourier.slicing import (
    SliceOperator,
    full_freqs_px,
    spectrum_frequency_radius,
    volume_from_spectrum,
)
from .fourier.transforms import fft2c, phase_shift
from .geometry.poses import relion_to_pose
from .preprocess import default_diameter_A, float_and_sigma
from .progress import bar


def wiener_backproject(
    particles,
    device: str = "cpu",
    batch_size: int = 500,
    oversample: int = 2,
    diameter_A: float | None = None,
    idx=None,
) -> torch.Tensor:
    """Reconstruct (D, D, D) float32 from ``particles`` (a ParticleSet with poses).

    ``idx``: the particles to use (default all); ``diameter_A``: particle diameter (Å) whose
    outside is the background that measures the noise (default 80% of the box).

    Example (``cryorecon.backproject``)::

        >>> import tempfile, mrcfile, torch, cryorecon
        >>> out = tempfile.mkdtemp()
        >>> _ = cryorecon.simulate(out, n=200, D=32, apix=11.0, snr=1.0, seed=0)
        >>> V = cryorecon.backproject(cryorecon.read_particles(f"{out}/particles.star"))
        >>> truth = torch.from_numpy(mrcfile.read(f"{out}/truth.mrc"))
        >>> cc = torch.corrcoef(torch.stack([V.flatten(), truth.flatten()]))[0, 1]
        >>> V.shape, bool(cc > 0.8)
        (torch.Size([32, 32, 32]), True)
    """
    if particles.angles is None:
        from .errors import InputError

        raise InputError(
            f"{particles.source}: no poses (rlnAngleRot/Tilt/Psi) to back-project with"
        )
    D = particles.D
    P = oversample * D
    idx = np.arange(len(particles)) if idx is None else np.asarray(idx)
    apix0 = float(np.median(particles.apix))
    diameter_px = (diameter_A or default_diameter_A(D, apix0)) / apix0
    freqs = full_freqs_px(D, device=device)
    radius = freqs.norm(dim=-1)
    keep = radius < D / 2
    freqs, radius = freqs[keep], radius[keep]
    n_shells = D // 2
    shell = radius.long().clamp(max=n_shells - 1)
    num = torch.zeros((P, P, P), dtype=torch.complex64, device=device)
    den = torch.zeros((P, P, P), dtype=torch.float32, device=device)
    pow_num = torch.zeros(n_shells, dtype=torch.float64, device=device)
    pow_den = torch.zeros(n_shells, dtype=torch.float64, device=device)
    for b in bar(range(0, len(idx), batch_size), desc="back-projecting", unit="batch"):
        sel = idx[b : b + batch_size]
        imgs = torch.as_tensor(particles.images(sel), device=device)
        imgs, sigma = float_and_sigma(imgs, diameter_px)
        y = fft2c(imgs).reshape(len(sel), -1)[:, keep]
        shifts = None if particles.shifts is None else particles.shifts[sel]
        R, t = relion_to_pose(particles.angles[sel], shifts, particles.apix[sel])
        R, t = R.to(device), t.to(device)
        apix = torch.as_tensor(particles.apix[sel], dtype=torch.float64, device=device)
        c = ctf_from_dict(particles.ctf, sel, freqs.double()[None] / (D * apix[:, None, None]))
        inv_var = (1.0 / sigma.double() ** 2).float()[:, None]
        unshifted = y * phase_shift(freqs[None] / D, t).conj()
        op = SliceOperator(R, freqs, D, oversample)  # one interpolation set-up, two scatters
        op.backproject(c * unshifted * inv_var, out=num)
        op.backproject(c * c * inv_var, out=den)
        excess = (y.abs() ** 2 - sigma[:, None] ** 2).double()
        pow_num.index_add_(0, shell.expand_as(excess).reshape(-1), (excess * inv_var).reshape(-1))
        pow_den.index_add_(
            0, shell.expand_as(excess).reshape(-1), (c.double() ** 2 * inv_var).reshape(-1)
        )
    power = (pow_num / pow_den.clamp_min(1e-30)).clamp_min(1e-12).float()
    r3 = spectrum_frequency_radius(P, oversample, device=device)
    inside = r3 < D / 2
    reg = 1.0 / power[r3.long().clamp(max=n_shells - 1)]
    spec = torch.where(inside, num / (den + reg), torch.zeros((), dtype=num.dtype, device=device))
    return volume_from_spectrum(spec, D)


def half_set_reconstructions(
    particles,
    eulers_deg: np.ndarray,
    shifts_A: np.ndarray,
    subset: np.ndarray,
    device: str = "cpu",
    diameter_A: float | None = None,
) -> list[torch.Tensor] | None:
    """Wiener back-projections (:func:`wiener_backproject`) of each gold-standard half-set
    from its own particles and the poses the run found for them: the half reconstructions
    whose FSC is the gold-standard one (RELION's ``run_half1/2`` maps are made this way).

    ``eulers_deg`` (N, 3) RELION rot/tilt/psi and ``shifts_A`` (N, 2) rlnOriginX/YAngst, NaN
    for particles without a pose (left out); ``subset`` (N,) 1 or 2 (0: in neither half).
    Unlike the refined half maps, these are linear in each half's images: the positivity
    clamp and the shared start do not enter them. Returns ``[half1, half2]`` (D, D, D)
    float32, or ``None`` when a half has fewer than 2 posed particles.
    """
    posed = np.isfinite(eulers_deg).all(axis=1) & np.isfinite(shifts_A).all(axis=1)
    out = []
    for h in (1, 2):
        sel = np.nonzero(posed & (np.asarray(subset) == h))[0]
        if len(sel) < 2:
            return None
        ps = particles.subset(sel)
        ps.angles = np.asarray(eulers_deg, dtype=np.float64)[sel]
        ps.shifts = np.asarray(shifts_A, dtype=np.float64)[sel]
        out.append(wiener_backproject(ps, device=device, diameter_A=diameter_A))
    return out
