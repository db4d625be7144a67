"""Centred, unitary discrete Fourier transforms and frequency index sets.

Conventions (DESIGN.md):
- Real-space arrays are indexed ``[..., y, x]`` (images) or ``[..., z, y, x]`` (volumes);
  the real-space origin (rotation centre) is at index ``D // 2`` on every axis, as in RELION.
- Spectra are centred: zero frequency at index ``D // 2``. Index ``k`` on an axis holds the
  frequency ``(k - D//2) / D`` cycles/pixel, i.e. ``(k - D//2) / (D * apix)`` 1/Å.
- Transforms are unitary (``norm="ortho"``) so Parseval holds and white real-space noise of
  variance sigma^2 stays white in Fourier space (paper Eq. 29, footnote 4).
"""

from __future__ import annotations

import math

import torch


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred unitary 2D DFT over the last two axes (real or complex input)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def ifft2c(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c` (complex output; take ``.real`` for real images)."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(x, norm="ortho"), dim=(-2, -1))


def fft3c(x: torch.Tensor) -> torch.Tensor:
    """Centred unitary 3D DFT over the last three axes."""
    x = torch.fft.ifftshift(x, dim=(-3, -2, -1))
    return torch.fft.fftshift(torch.fft.fftn(x, dim=(-3, -2, -1), norm="ortho"), dim=(-3, -2, -1))


def ifft3c(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3c`."""
    x = torch.fft.ifftshift(x, dim=(-3, -2, -1))
    return torch.fft.fftshift(torch.fft.ifftn(x, dim=(-3, -2, -1), norm="ortho"), dim=(-3, -2, -1))


def freq_grid_2d(D: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Frequencies of a centred D x D spectrum in cycles/pixel, shape (D, D, 2) as (fx, fy)."""
    k = (torch.arange(D, device=device, dtype=dtype) - D // 2) / D
    fy, fx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([fx, fy], dim=-1)


def cutoff_radius(D: int, apix: float, omega_star: float | None) -> float:
    """Radius in Fourier pixels of the frequency cut-off ``omega_star`` (1/Å), capped at Nyquist.

    ``None`` means Nyquist (D/2).
    """
    if omega_star is None:
        return D / 2
    return min(D * apix * omega_star, D / 2)


class HalfPlane:
    """The independent Fourier coefficients of a real D x D image inside a radius.

    A real image's spectrum is Hermitian: F(-k) = conj(F(k)). The independent set is the
    half-plane ``ky > 0`` or (``ky == 0`` and ``kx >= 0``) with ``|k| < radius`` (strict, as in
    Eq. 2), excluding the unpaired Nyquist row/column. ``weight`` is 2 for coefficients that
    stand for a conjugate pair and 1 for the self-conjugate DC term, so that
    ``sum(weight * |F|^2) == sum over the full disc of |F|^2``.

    Attributes:
        D: box size.
        radius: cut-off radius in Fourier pixels.
        kx, ky: integer frequency indices relative to the centre, shape (M,).
        flat: indices into a flattened centred (D, D) spectrum, shape (M,).
        weight: float tensor (M,), 2 or 1.
    """

    def __init__(self, D: int, radius: float, device=None):
        self.D = D
        self.radius = float(radius)
        k = torch.arange(D, device=device) - D // 2
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        r2 = (kx * kx + ky * ky).double()
        inside = r2 < self.radius**2
        inside &= (kx > -D // 2) & (ky > -D // 2)
        half = (ky > 0) | ((ky == 0) & (kx >= 0))
        mask = inside & half
        self.flat = torch.nonzero(mask.reshape(-1)).squeeze(-1)
        self.kx = kx.reshape(-1)[self.flat]
        self.ky = ky.reshape(-1)[self.flat]
        dc = (self.kx == 0) & (self.ky == 0)
        self.weight = torch.where(dc, 1.0, 2.0).to(torch.float32)

    @property
    def M(self) -> int:
        return int(self.flat.numel())

    def freqs(self, dtype=torch.float32) -> torch.Tensor:
        """Frequencies in cycles/pixel, shape (M, 2) as (fx, fy)."""
        return torch.stack([self.kx, self.ky], dim=-1).to(dtype) / self.D

    def gather(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Pick the coefficients from centred spectra of shape (..., D, D) -> (..., M)."""
        return spectrum.reshape(*spectrum.shape[:-2], self.D * self.D)[..., self.flat]

    def scatter(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gather` that restores Hermitian symmetry: (..., M) -> (..., D, D)."""
        D = self.D
        out = torch.zeros(*coeffs.shape[:-1], D * D, dtype=coeffs.dtype, device=coeffs.device)
        out[..., self.flat] = coeffs
        mirror = (-self.ky + D // 2) * D + (-self.kx + D // 2)
        out[..., mirror] = coeffs.conj()
        return out.reshape(*coeffs.shape[:-1], D, D)


def phase_shift(freqs: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Fourier factor ``exp(-2 pi i omega . t)`` that translates an image by ``t`` (paper Eq. 1).

    Args:
        freqs: (..., M, 2) frequencies in cycles/pixel as (fx, fy).
        shifts: (..., 2) translations in pixels as (tx, ty); a positive ``tx`` moves content
            towards larger x index.
    Returns:
        complex tensor broadcast to (..., M).
    """
    ph = -2 * math.pi * (freqs * shifts.unsqueeze(-2)).sum(-1)
    return torch.polar(torch.ones_like(ph), ph)
