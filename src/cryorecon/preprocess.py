"""Per-particle preprocessing (paper Appendix A, Sec. 4.1): "floating" and noise level.

The mean of the pixels outside the particle (a disc of diameter ``diameter_A`` centred at
``D//2``) is subtracted from each image ("floating"), and the noise standard deviation sigma
is the standard deviation of those same background pixels. With the unitary FFT, the noise
on every Fourier coefficient then has variance sigma^2 (E|nu_hat|^2 = sigma^2; real and
imaginary parts sigma^2/2 each off the self-conjugate points).
"""

from __future__ import annotations

import torch


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
        raise ValueError(f"particle diameter {diameter_px:.1f} px leaves only {n_bg} background pixels in a {D} px box")
    pix = images[:, bg]
    mean = pix.mean(-1)
    sigma = pix.std(-1).clamp_min(1e-12)
    return images - mean[:, None, None], sigma
