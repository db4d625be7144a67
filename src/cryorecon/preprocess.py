"""From particle images to the Fourier-domain tensors of the likelihood (Appendix A, Sec. 4.1).

The mean of the pixels outside the particle (a disc of diameter ``diameter_A`` centred at
``D//2``) is subtracted from each image ("floating"), and the noise standard deviation sigma
is the standard deviation of those same background pixels. With the unitary FFT, the noise
on every Fourier coefficient then has variance sigma^2 (E|nu_hat|^2 = sigma^2; real and
imaginary parts sigma^2/2 each off the self-conjugate points).

:func:`image_batch` turns images (a tensor) and their CTF parameters into an
:class:`~cryorecon.model.likelihood.ImageBatch`: floated, transformed with the centred
unitary FFT and cropped to the half-plane coefficients inside the current cut-off, so the
cost grows with (D omega*)^2, not D^2. :func:`load_batch` reads the images of a
:class:`~cryorecon.io.particles.ParticleSet` (memory-mapped, :mod:`cryorecon.io`) and hands
them to it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .fourier.ctf import ctf_from_dict
from .fourier.transforms import HalfPlane, fft2c
from .model.likelihood import ImageBatch


def default_diameter_A(D: int, apix: float) -> float:
    """Default particle diameter: 80% of the box width, in Å."""
    return 0.8 * D * apix


def background_mask(D: int, diameter_px: float, device=None) -> torch.Tensor:
    """Boolean (D, D) mask of the pixels outside the particle disc (centre at D//2)."""
    g = torch.arange(D, device=device, dtype=torch.float32) - D // 2
    y, x = torch.meshgrid(g, g, indexing="ij")
    return (x * x + y * y) > (diameter_px / 2) ** 2


def float_and_sigma(images: torch.Tensor, diameter_px: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the background mean and return ``(floated images, sigma (N,))``.

    Raises ValueError if fewer than 32 background pixels remain (particle disc too large).
    """
    D = images.shape[-1]
    bg = background_mask(D, diameter_px, device=images.device)
    n_bg = int(bg.sum())
    if n_bg < 32:
        raise ValueError(f"particle diameter {diameter_px:.1f} px leaves only {n_bg} background "
                         f"pixels in a {D} px box")
    pix = images[:, bg]
    mean = pix.mean(-1)
    sigma = pix.std(-1).clamp_min(1e-12)
    return images - mean[:, None, None], sigma


def image_batch(images: torch.Tensor, ctf: Mapping, apix, halfplane: HalfPlane,
                diameter_px: float) -> ImageBatch:
    """The :class:`~cryorecon.model.likelihood.ImageBatch` of ``images`` on ``halfplane``.

    Args:
        images: (B, D, D) float32 real-space images, on the device of the result.
        ctf: CTF parameters of the B particles (keys as
            :attr:`~cryorecon.io.particles.ParticleSet.ctf`, (B,) arrays or scalars).
        apix: (B,) pixel sizes in Å (or a scalar).
        halfplane: the coefficients in use (inside omega*).
        diameter_px: particle diameter in pixels (the background lies outside it).
    """
    device, D = images.device, images.shape[-1]
    imgs, sigma = float_and_sigma(images, diameter_px)
    y = halfplane.gather(fft2c(imgs))
    freqs = halfplane.freqs().to(device)  # cycles/pixel
    apix = torch.as_tensor(apix, dtype=torch.float64, device=device).reshape(-1)
    freqs_A = (freqs * D).to(torch.float64)[None] / (D * apix[:, None, None])
    return ImageBatch(y=y, ctf=ctf_from_dict(ctf, None, freqs_A),
                      sigma2=(sigma.double() ** 2).float(), weight=halfplane.weight.to(device),
                      freqs=freqs)


def load_batch(particles, idx, halfplane: HalfPlane, diameter_px: float,
               device="cpu") -> ImageBatch:
    """:func:`image_batch` of particles ``idx`` of a ParticleSet, read from its stacks."""
    idx = np.asarray(idx)
    images = torch.as_tensor(particles.images(idx), device=device)
    ctf = {k: np.asarray(v)[idx] for k, v in particles.ctf.items()}
    return image_batch(images, ctf, particles.apix[idx], halfplane, diameter_px)
