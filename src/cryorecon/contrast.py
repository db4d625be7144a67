"""Inverted contrast (dark protein): detect it from the images before a run.

The package's forward model (Eq. 1) uses RELION's CTF, which is positive at low frequency
for an underfocused image (:mod:`cryorecon.fourier.ctf`), and density positive = protein:
so the low frequencies of a particle image correlate *positively* with the CTF-modulated
projection of any compact positive blob at the image centre. Images with inverted contrast
(extracted without RELION's "invert contrast", or written by ASPIRE) correlate negatively,
and reconstructing them gives a map of negative density that the positivity constraint
clips to nothing.

The test: for ``n`` particles spread evenly through the set, each image is floated (its
background mean removed, noise sigma measured outside the particle disc,
:mod:`cryorecon.preprocess`) and Fourier transformed (centred, unitary); its real part is
correlated with ``w(k) = CTF_i(k) B(k)`` over the band where ``B > 0``, where
``B(s) = 3 (sin x - x cos x) / x^3``, ``x = 2 pi s a``, is the (central slice of the) 3D
transform of a solid ball of radius ``a`` = half the particle diameter, normalised to
``B(0) = 1``; the band ends at its first zero, ``x = 4.4934``, i.e. ``s = 1.43 / diameter``.
Per image ``r_i = sum_k w_k Re y_k / (sigma_i ||w||)`` (unit variance for white noise of
variance sigma^2), and the statistic is the one-sample t of the ``r_i``:
``t = mean(r) sqrt(n) / std(r)``. ``t <= -threshold`` says inverted; ``|t| < threshold`` is
inconclusive (no change is made in automatic mode).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import InputError
from .fourier.transforms import fft2c
from .preprocess import float_and_sigma

BALL_FIRST_ZERO = 4.493409457909064  # first positive root of tan(x) = x
DEFAULT_PARTICLES = 300
DEFAULT_THRESHOLD = 4.0


@dataclass
class ContrastCheck:
    """Outcome of :func:`detect_contrast` on the images as stored in their files.

    ``statistic``: the t statistic (positive = protein bright, as the package expects);
    ``mean_correlation``: mean of the per-image noise-normalised correlations ``r_i``;
    ``inverted``: the statistic is at or below ``-threshold``; ``conclusive``:
    ``|statistic| >= threshold``; ``band_A``: the finest resolution used (Å);
    ``n_particles``: particles read.
    """

    inverted: bool
    conclusive: bool
    statistic: float
    mean_correlation: float
    threshold: float
    n_particles: int
    band_A: float

    def as_dict(self) -> dict:
        return asdict(self)


def ball_transform(s: torch.Tensor, radius: float) -> torch.Tensor:
    """3D Fourier transform of a solid ball of ``radius`` at spatial frequency ``s`` (same
    length units inverted), normalised to 1 at ``s = 0``: ``3 (sin x - x cos x) / x^3``."""
    x = 2 * math.pi * s * radius
    small = x < 1e-3
    xs = torch.where(small, torch.ones_like(x), x)
    b = 3 * (torch.sin(xs) - xs * torch.cos(xs)) / xs**3
    return torch.where(small, 1 - x * x / 10, b)


def sample_indices(n_total: int, n: int) -> np.ndarray:
    """``min(n, n_total)`` particle indices spread evenly over the set (deterministic)."""
    m = max(1, min(int(n), int(n_total)))
    return np.unique(np.linspace(0, n_total - 1, m).round().astype(np.int64))


def image_correlations(
    particles, idx, diameter_px: float, device="cpu"
) -> tuple[torch.Tensor, float]:
    """Per-image correlations ``r_i`` (see the module notes) of particles ``idx`` with the
    CTF-modulated ball, computed on the images as stored (:attr:`contrast_sign` undone).
    Returns ``(r (len(idx),) float64, band limit in Å)``."""
    from .fourier.ctf import ctf_from_dict

    D = particles.D
    imgs = torch.as_tensor(particles.images(idx), device=device) * float(particles.contrast_sign)
    imgs, sigma = float_and_sigma(imgs, diameter_px)
    k = torch.arange(D, device=device, dtype=torch.float32) - D // 2
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    freqs = torch.stack([kx.reshape(-1), ky.reshape(-1)], -1)
    s = freqs.norm(dim=-1) / D  # cycles per pixel
    radius = 0.5 * float(diameter_px)
    s_max = BALL_FIRST_ZERO / (2 * math.pi * radius)
    band = s < s_max
    B = ball_transform(s[band].double(), radius)
    apix_i = torch.as_tensor(np.asarray(particles.apix, dtype=np.float64)[idx], device=device)
    freqs_A = freqs[band].double()[None] / (D * apix_i[:, None, None])
    w = ctf_from_dict(particles.ctf, idx, freqs_A).double() * B[None]
    y = fft2c(imgs.double()).reshape(len(idx), -1)[:, band].real
    r = (w * y).sum(-1) / (sigma.double() * w.norm(dim=-1).clamp_min(1e-30))
    apix = float(np.median(particles.apix[idx]))
    return r, apix / s_max


def detect_contrast(
    particles,
    diameter_px: float,
    n: int = DEFAULT_PARTICLES,
    threshold: float = DEFAULT_THRESHOLD,
    device="cpu",
) -> ContrastCheck:
    """Is the contrast of ``particles`` (a ParticleSet with CTF) inverted? See the module notes.

    ``diameter_px``: particle diameter in pixels (the ball, and the disc outside which the
    noise is measured); ``n``: particles read, evenly spread through the set.
    """
    if not particles.ctf:
        raise InputError(f"{particles.source}: the contrast check needs the CTF parameters")
    idx = sample_indices(len(particles), n)
    r, band_A = image_correlations(particles, idx, diameter_px, device)
    m = len(r)
    mean = float(r.mean())
    sd = float(r.std()) if m > 1 else 0.0
    t = mean * math.sqrt(m) / sd if sd > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return ContrastCheck(
        inverted=bool(t <= -threshold),
        conclusive=bool(abs(t) >= threshold),
        statistic=float(t),
        mean_correlation=mean,
        threshold=float(threshold),
        n_particles=int(m),
        band_A=float(band_A),
    )


def apply_contrast(
    particles,
    diameter_px: float,
    force: bool | None = None,
    n: int = DEFAULT_PARTICLES,
    device="cpu",
) -> dict:
    """Check the contrast of ``particles`` and set their :attr:`contrast_sign`.

    ``force``: None (automatic: negate when :func:`detect_contrast` says inverted), True
    (negate: ``--invert-contrast``) or False (keep: ``--no-invert-contrast``). Says what it
    found and did on stderr. Returns, and stores in ``particles.meta["contrast"]`` for the
    run's ``run.json``, ``{"contrast_inverted": bool (images negated), "contrast_statistic":
    t, "contrast_check": ContrastCheck fields + "mode"}``.
    """
    from .progress import log

    particles.contrast_sign = 1.0
    check = detect_contrast(particles, diameter_px, n=n, device=device)
    invert = check.inverted if force is None else bool(force)
    particles.contrast_sign = -1.0 if invert else 1.0
    said = f"t = {check.statistic:.1f} over {check.n_particles} particles"
    if force is None:
        if check.inverted:
            log.warning(
                f"contrast: protein is dark in these images ({said}); negating them "
                "(--no-invert-contrast keeps them as they are)"
            )
        elif check.conclusive:
            log.info(f"contrast: protein is bright, as expected ({said})")
        else:
            log.warning(
                f"contrast: check inconclusive ({said}, |t| < {check.threshold:g}); images "
                "used as they are (--invert-contrast negates them)"
            )
    elif invert:
        bright = check.conclusive and not check.inverted
        doubt = " although they look protein-bright" if bright else ""
        log.warning(f"contrast: negating the images (--invert-contrast){doubt} ({said})")
    elif check.inverted:
        log.warning(
            f"contrast: the images look protein-dark ({said}) but --no-invert-contrast "
            "keeps them as they are"
        )
    info = {
        "contrast_inverted": invert,
        "contrast_statistic": check.statistic,
        "contrast_check": {**check.as_dict(), "mode": "auto" if force is None else "forced"},
    }
    particles.meta["contrast"] = info
    return info
