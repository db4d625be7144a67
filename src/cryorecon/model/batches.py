"""From a ParticleSet minibatch to the Fourier-domain tensors of the likelihood.

Images are read lazily (memory-mapped), floated, their noise sigma measured from the
background (:mod:`cryorecon.preprocess`), transformed with the centred unitary FFT, and only
the half-plane coefficients inside the current cut-off are kept, so the cost grows with
(D omega*)^2, not D^2.
"""

from __future__ import annotations

import numpy as np
import torch

from ..fourier.ctf import ctf_2d
from ..fourier.transforms import HalfPlane, fft2c
from ..preprocess import float_and_sigma
from .likelihood import ImageBatch


def particle_ctf(particles, idx, freqs_px: torch.Tensor, device) -> torch.Tensor:
    """CTF (len(idx), M) of particles ``idx`` at frequency indices ``freqs_px`` (M, 2) of the D box."""
    ctf = particles.ctf
    apix = torch.as_tensor(particles.apix[idx], dtype=torch.float64, device=device)
    freqs_A = freqs_px.to(device, torch.float64)[None, :, :] / (particles.D * apix[:, None, None])

    def col(k):
        return torch.as_tensor(np.asarray(ctf[k], dtype=np.float64)[idx], device=device)

    return ctf_2d(freqs_A, col("defocus_u"), col("defocus_v"), col("defocus_angle"), col("voltage"),
                  col("cs"), col("amp_contrast"), col("phase_shift"), col("bfactor"))


def load_batch(particles, idx, halfplane: HalfPlane, diameter_px: float, device="cpu") -> ImageBatch:
    """Read, float, FFT and crop particles ``idx`` to the coefficients of ``halfplane``."""
    idx = np.asarray(idx)
    imgs = torch.as_tensor(particles.images(idx), device=device)
    imgs, sigma = float_and_sigma(imgs, diameter_px)
    y = halfplane.gather(fft2c(imgs))
    freqs = halfplane.freqs().to(device)
    ctf = particle_ctf(particles, idx, freqs * particles.D, device)
    return ImageBatch(y=y, ctf=ctf, sigma2=(sigma.double() ** 2).float(), weight=halfplane.weight.to(device),
                      freqs=freqs)
