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

:func:`fourier_crop` downsamples images by keeping the central D x D Fourier coefficients
(``--downsample``; :meth:`~cryorecon.io.particles.ParticleSet.at_box` applies it as images are
read), and :func:`suggest_box` proposes such a box for ab initio.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from .fourier.ctf import ctf_from_dict
from .fourier.transforms import HalfPlane, fft2c
from .model.likelihood import ImageBatch


def default_diameter_A(D: int, apix: float) -> float:
    """Default particle diameter: 80% of the box width, in Å."""
    return 0.8 * D * apix


def fourier_crop(images: torch.Tensor, D: int) -> torch.Tensor:
    """Images ``(..., n, n)`` downsampled to ``(..., D, D)`` by Fourier cropping: the
    coefficients of frequencies ``-D/2 .. D/2 - 1`` (cycles per new box) on each axis are
    kept, the rest dropped; the origin (index ``n//2``) stays at the centre (index ``D//2``).
    The pixel size grows by ``n / D``.

    As RELION's ``windowFourierTransform`` (``relion_image_handler --rescale_angpix``): the
    half-plane (``kx >= 0``) of the real transform is cropped, rows ``ky = 0 .. D/2`` and
    ``-D/2 + 1 .. -1``, so the new Nyquist row holds the input's ``ky = +D/2`` coefficients
    for ``kx >= 0`` (and their conjugates for ``kx < 0``). Scaling: the result holds
    samples of the same band-limited function on the coarser grid (unitary transforms times
    ``D / n``), so an image band-limited below the new Nyquist is sampled exactly; white noise
    stays white, its sigma times ``D / n``. ``n`` and ``D`` even, ``D <= n`` (``D == n``
    returns ``images``)."""
    n = images.shape[-1]
    if images.shape[-2] != n:
        raise ValueError(f"fourier_crop: images must be square, got {tuple(images.shape[-2:])}")
    if D == n:
        return images
    if not (0 < D < n) or D % 2 or n % 2:
        raise ValueError(
            f"fourier_crop: target box {D} must be even and below the box {n} (also even)"
        )
    h = D // 2
    spec = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)), norm="ortho")
    spec = torch.cat([spec[..., : h + 1, : h + 1], spec[..., n - h + 1 :, : h + 1]], dim=-2)
    out = torch.fft.irfft2(spec, s=(D, D), norm="ortho") * (D / n)
    return torch.fft.fftshift(out, dim=(-2, -1)).to(images.dtype)


def suggest_box(
    D: int, apix: float, resolution_A: float, multiple: int = 8, smallest: int = 32
) -> int:
    """The smallest box (a multiple of ``multiple``, at least ``smallest``) whose Nyquist
    frequency, ``box / (2 D apix)`` 1/Å, reaches ``1 / resolution_A``: the box to Fourier-crop
    ``D``-pixel images of ``apix`` Å to for a reconstruction to ``resolution_A`` Å. ``D`` itself
    when no smaller box does."""
    need = 2.0 * D * apix / float(resolution_A)
    box = max(smallest, multiple * math.ceil(need / multiple - 1e-9))
    return box if box < D else D


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
        raise ValueError(
            f"particle diameter {diameter_px:.1f} px leaves only {n_bg} background "
            f"pixels in a {D} px box"
        )
    pix = images[:, bg]
    mean = pix.mean(-1)
    sigma = pix.std(-1).clamp_min(1e-12)
    return images - mean[:, None, None], sigma


def image_batch(
    images: torch.Tensor, ctf: Mapping, apix, halfplane: HalfPlane, diameter_px: float
) -> ImageBatch:
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
    return ImageBatch(
        y=y,
        ctf=ctf_from_dict(ctf, None, freqs_A),
        sigma2=(sigma.double() ** 2).float(),
        weight=halfplane.weight.to(device),
        freqs=freqs,
    )


def load_batch(
    particles, idx, halfplane: HalfPlane, diameter_px: float, device="cpu"
) -> ImageBatch:
    """:func:`image_batch` of particles ``idx`` of a ParticleSet, read from its stacks."""
    idx = np.asarray(idx)
    images = torch.as_tensor(particles.images(idx), device=device)
    ctf = {k: np.asarray(v)[idx] for k, v in particles.ctf.items()}
    return image_batch(images, ctf, particles.apix[idx], halfplane, diameter_px)
