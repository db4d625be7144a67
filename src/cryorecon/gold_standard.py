"""Gold-standard resolution from two independently refined half maps, without a reference.

The two halves of the data are refined independently (after a joint low-resolution phase),
so their Fourier shell correlation measures the signal-to-noise ratio of the half maps:
the resolution is where the FSC drops below 0.143 (Rosenthal & Henderson 2003, JMB 333:721),
the criterion for half maps, equivalent to 0.5 between the full map and a perfect reference.

A solvent mask raises the FSC by removing noise, but its shape also correlates the two
masked maps. The correction of Chen et al. 2013 (Ultramicroscopy 135:24), as RELION's
``relion_postprocess`` does it, measures that artefact: the phases of both unmasked halves are
replaced by random ones beyond the shell where their unmasked FSC first drops below 0.8, the
randomised maps are masked, and their FSC ``FSC_rand`` (ideally 0 beyond that shell) gives::

    FSC_true = (FSC_masked - FSC_rand) / (1 - FSC_rand)

from two shells beyond the randomisation shell on (RELION's offset, which skips the edge of
the randomised band); below it ``FSC_true = FSC_masked``.

Conventions (DESIGN.md): maps ``[z, y, x]`` float32 of an even cubic box ``D``, voxel size
``apix`` Å; FSC shells as in :func:`cryorecon.validate.fsc` (1 Fourier pixel wide, ``D//2 + 1``
shells, frequency ``n / (D apix)`` 1/Å); resolutions in Å from
:func:`cryorecon.validate.resolution_at` (linear interpolation of the crossing).
Deterministic given ``seed``: the random phases come from a CPU ``torch.Generator``, so CPU
and CUDA runs draw the same phases.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import InputError
from .fourier.transforms import fft3c, ifft3c
from .validate import fsc, resolution_at, shell_index

#: Randomise phases from the first shell where the unmasked FSC drops below this (RELION).
RANDOMIZE_AT_FSC = 0.8
#: ``FSC_true`` is corrected from this many shells beyond the randomisation shell (RELION).
CORRECTION_OFFSET_SHELLS = 2
#: The half-map resolution criterion (Rosenthal & Henderson 2003).
GOLD_STANDARD_THRESHOLD = 0.143
#: Mask defaults: low-pass (Å) before thresholding, and the level as a fraction of the
#: low-passed map's maximum when neither a threshold nor a molecular mass is given.
MASK_LOWPASS_A = 15.0
MASK_FRACTION_OF_MAX = 0.1
#: With a noise estimate, the automatic level is at least this many noise sigmas.
MASK_NOISE_SIGMAS = 3.0
#: Seed pieces smaller than this fraction of the largest connected piece are dropped.
MASK_MIN_ISLAND_FRACTION = 0.05
#: Extension and soft edge of the mask in voxels when not given in Å (RELION's
#: ``--extend_inimask 3 --width_mask_edge 6`` defaults).
MASK_EXTEND_PX = 3.0
MASK_SOFT_EDGE_PX = 6.0
#: Protein density (Da/Å^3) used to turn a molecular mass into a volume (0.81 Da/Å^3,
#: i.e. 1.23 Å^3/Da, the usual value for proteins).
PROTEIN_DA_PER_A3 = 0.81


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _as_map(x, name: str, device=None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if device is not None:
        t = t.to(device)
    if t.ndim != 3 or len(set(t.shape)) != 1:
        raise InputError(f"{name}: expected a cubic 3D map, got shape {tuple(t.shape)}")
    if t.shape[0] < 4 or t.shape[0] % 2:
        raise InputError(f"{name}: the box must be even and at least 4 voxels, got {t.shape[0]}")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: the map holds NaN or Inf values")
    return t.to(torch.float32)


def _check_apix(apix) -> float:
    try:
        a = float(apix)
    except (TypeError, ValueError):
        raise InputError(f"voxel size must be a number, got {apix!r}") from None
    if not math.isfinite(a) or a <= 0:
        raise InputError(f"voxel size must be positive, got {apix}")
    return a


# --------------------------------------------------------------------------------------------
# mask
# --------------------------------------------------------------------------------------------


@dataclass
class MaskFacts:
    """How a solvent mask was made and what it covers.

    Attributes:
        how: ``"auto"`` (:func:`soft_mask_from_map`) or ``"given"`` (a mask passed in).
        threshold: density level of the binary seed (in the low-passed map's units);
            ``None`` for a given mask.
        threshold_from: ``"value"`` (passed in), ``"molecular_mass"``, ``"fraction_of_max"``
            or ``"noise"`` (3 noise sigmas, above the fraction of the maximum).
        lowpass_A: low-pass applied before thresholding (Å); ``None`` = none.
        extend_A, soft_edge_A: binary extension and cosine edge width (Å).
        volume_fraction: sum of the mask over the box volume (soft voxels count fractionally).
        seed_fraction: fraction of voxels in the binary seed.
        touches_edge: the mask is non-zero on a face of the box (too big for the box).
        dropped_fraction: fraction of the thresholded voxels dropped as small islands.
        molecular_mass_kDa: the mass used for the threshold, if any.
        fraction_of_max, noise_sigma: the fraction of the maximum and the noise level the
            automatic threshold was taken from, if any.
    """

    how: str
    volume_fraction: float
    threshold: float | None = None
    threshold_from: str | None = None
    lowpass_A: float | None = None
    extend_A: float | None = None
    soft_edge_A: float | None = None
    seed_fraction: float | None = None
    touches_edge: bool = False
    dropped_fraction: float = 0.0
    molecular_mass_kDa: float | None = None
    fraction_of_max: float | None = None
    noise_sigma: float | None = None

    def to_json(self) -> dict:
        return {k: _json_value(v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line for a report: how the mask was made."""
        if self.how == "given":
            return f"given mask, {100 * self.volume_fraction:.1f}% of the box"
        if self.threshold_from == "molecular_mass":
            src = f"threshold enclosing {self.molecular_mass_kDa:g} kDa of protein"
        elif self.threshold_from == "fraction_of_max":
            src = f"threshold {self.fraction_of_max:g} x the maximum"
        elif self.threshold_from == "noise":
            src = f"threshold {MASK_NOISE_SIGMAS:g} x the noise sigma"
        else:
            src = "given threshold"
        lp = f", low-passed to {self.lowpass_A:g} Å" if self.lowpass_A else ""
        return (
            f"automatic: {src} ({self.threshold:.4g}){lp}, extended {self.extend_A:.3g} Å, "
            f"cosine edge {self.soft_edge_A:.3g} Å; "
            f"{100 * self.volume_fraction:.1f}% of the box"
        )


def lowpass(
    volume: torch.Tensor, apix: float, resolution_A: float, edge_shells: float = 2.0
) -> torch.Tensor:
    """Low-pass a map ``[z, y, x]`` to ``resolution_A`` Å with a raised-cosine edge.

    Coefficients at ``|k| <= D apix / resolution_A - edge_shells / 2`` (Fourier pixels) are
    kept, those beyond ``+ edge_shells / 2`` removed, a cosine in between (as RELION's
    low-pass filter). A resolution finer than Nyquist (``2 apix``) returns the map unchanged.
    """
    D = volume.shape[-1]
    if resolution_A <= 2 * apix:
        return volume.clone()
    kc = D * apix / resolution_A
    k = torch.arange(D, device=volume.device, dtype=torch.float64) - D // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    r = torch.sqrt(kx * kx + ky * ky + kz * kz)
    x = ((r - (kc - edge_shells / 2)) / edge_shells).clamp(0.0, 1.0)
    w = 0.5 * (1 + torch.cos(math.pi * x))
    return ifft3c(fft3c(volume.double()) * w).real.to(volume.dtype)


def soft_mask_from_map(
    volume,
    apix: float,
    threshold: float | None = None,
    extend_A: float | None = None,
    soft_edge_A: float | None = None,
    *,
    lowpass_A: float | None = MASK_LOWPASS_A,
    molecular_mass_kDa: float | None = None,
    fraction_of_max: float = MASK_FRACTION_OF_MAX,
    min_island_fraction: float = MASK_MIN_ISLAND_FRACTION,
    noise_sigma: float | None = None,
) -> tuple[torch.Tensor, MaskFacts]:
    """A soft solvent mask made from a map, as ``relion_mask_create`` makes one.

    1. The map is low-passed to ``lowpass_A`` Å (default 15 Å; ``None`` = no filter), so the
       seed follows the molecule's envelope, not the noise.
    2. Binary seed: voxels at or above a threshold. The threshold is, in this order of
       preference: ``threshold`` if given; the level that encloses the molecule's expected
       volume ``molecular_mass_kDa * 1000 / 0.81`` Å^3 if a mass is given; otherwise
       ``fraction_of_max`` (0.1) times the low-passed map's maximum, which for a map on a zero
       background keeps the molecule and a margin around it, raised to ``3 noise_sigma`` when
       a noise level is given (the standard deviation of the noise in the low-passed map;
       :func:`gold_standard_fsc` measures it on the half maps' half-difference).
       Pieces of the seed smaller than ``min_island_fraction`` (0.05) of its largest
       connected piece (26-connected) are dropped: noise peaks above the threshold, which
       the extension would otherwise blow up into blobs scattered over the box.
    3. The seed is extended by ``extend_A`` Å (voxels within that distance of the seed become
       1; default 3 voxels) and given a raised-cosine edge of ``soft_edge_A`` Å (default 6
       voxels): ``0.5 (1 + cos(pi (d - extend) / soft_edge))`` at distance ``d`` from the seed,
       0 beyond. Distances are Euclidean between voxel centres (exact distance transform).

    Returns ``(mask, facts)``: the mask ``(D, D, D)`` float32 in [0, 1] on ``volume``'s device
    and a :class:`MaskFacts`. Raises :class:`InputError` for a bad map, voxel size or options,
    or a threshold that leaves the seed empty.
    """
    from scipy.ndimage import distance_transform_edt

    vol = _as_map(volume, "mask source map")
    apix = _check_apix(apix)
    D = vol.shape[0]
    extend_A = MASK_EXTEND_PX * apix if extend_A is None else float(extend_A)
    soft_edge_A = MASK_SOFT_EDGE_PX * apix if soft_edge_A is None else float(soft_edge_A)
    if extend_A < 0 or soft_edge_A < 0 or not math.isfinite(extend_A + soft_edge_A):
        raise InputError(
            f"mask extension and soft edge must be >= 0 Å, got {extend_A}, {soft_edge_A}"
        )
    if lowpass_A is not None and (not math.isfinite(lowpass_A) or lowpass_A <= 0):
        raise InputError(f"mask low-pass must be a positive resolution in Å, got {lowpass_A}")
    lp = lowpass(vol, apix, lowpass_A) if lowpass_A else vol
    if threshold is not None:
        thr, how = float(threshold), "value"
    elif molecular_mass_kDa is not None:
        if not molecular_mass_kDa > 0:
            raise InputError(f"molecular mass must be positive (kDa), got {molecular_mass_kDa}")
        n = int(round(molecular_mass_kDa * 1000.0 / PROTEIN_DA_PER_A3 / apix**3))
        if not 1 <= n < D**3:
            raise InputError(
                f"a molecule of {molecular_mass_kDa:g} kDa fills {n} voxels of "
                f"{apix:g} Å, but the box has {D**3}"
            )
        thr, how = float(torch.topk(lp.reshape(-1), n).values[-1]), "molecular_mass"
    else:
        if not 0 < fraction_of_max < 1:
            raise InputError(
                f"mask fraction of the maximum must be in (0, 1), got {fraction_of_max}"
            )
        if not float(lp.max()) > 0:
            raise InputError(
                "the map has no positive density to make a mask from (is the "
                "contrast inverted?); give a threshold or a mask"
            )
        thr, how = float(fraction_of_max * lp.max()), "fraction_of_max"
        if noise_sigma is not None and MASK_NOISE_SIGMAS * float(noise_sigma) > thr:
            thr, how = MASK_NOISE_SIGMAS * float(noise_sigma), "noise"
    seed = (lp >= thr).cpu().numpy()
    if not seed.any():
        raise InputError(
            f"mask threshold {thr:.4g} is above the map's maximum "
            f"{float(lp.max()):.4g}: the mask would be empty"
        )
    n_seed = int(seed.sum())
    seed = _drop_islands(seed, min_island_fraction)
    dist_px = distance_transform_edt(~seed)  # 0 inside the seed
    d = torch.from_numpy(dist_px * apix).to(vol.device)  # Å
    if soft_edge_A > 0:
        x = ((d - extend_A) / soft_edge_A).clamp(0.0, 1.0)
        mask = 0.5 * (1 + torch.cos(math.pi * x))
    else:
        mask = (d <= extend_A).double()
    mask = mask.to(torch.float32)
    facts = MaskFacts(
        how="auto",
        volume_fraction=float(mask.double().mean()),
        threshold=thr,
        threshold_from=how,
        lowpass_A=float(lowpass_A) if lowpass_A else None,
        extend_A=extend_A,
        soft_edge_A=soft_edge_A,
        seed_fraction=float(seed.mean()),
        touches_edge=_touches_edge(mask),
        dropped_fraction=1.0 - float(seed.sum()) / n_seed,
        molecular_mass_kDa=None if molecular_mass_kDa is None else float(molecular_mass_kDa),
        fraction_of_max=float(fraction_of_max) if how in ("fraction_of_max", "noise") else None,
        noise_sigma=None if noise_sigma is None else float(noise_sigma),
    )
    return mask, facts


def _drop_islands(seed: np.ndarray, min_fraction: float) -> np.ndarray:
    """The binary ``seed`` without its small pieces: connected components (26-connected)
    with fewer than ``min_fraction`` times the voxels of the largest are removed."""
    from scipy.ndimage import label

    if min_fraction <= 0:
        return seed
    labels, n = label(seed, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return seed
    sizes = np.bincount(labels.reshape(-1))[1:]
    keep = np.concatenate([[False], sizes >= min_fraction * sizes.max()])
    return keep[labels]


def _touches_edge(mask: torch.Tensor) -> bool:
    """Whether the mask is non-zero anywhere on the six faces of the box."""
    faces = (mask[[0, -1]], mask[:, [0, -1]], mask[:, :, [0, -1]])
    return any(bool((f > 0).any()) for f in faces)


def _given_mask_facts(mask: torch.Tensor) -> MaskFacts:
    return MaskFacts(
        how="given", volume_fraction=float(mask.double().mean()), touches_edge=_touches_edge(mask)
    )


# --------------------------------------------------------------------------------------------
# phase randomisation
# --------------------------------------------------------------------------------------------


def randomize_phases_beyond(volume, shell: int, generator: torch.Generator) -> torch.Tensor:
    """The map with the phase of every Fourier coefficient at ``|k| >= shell`` (Fourier pixels)
    replaced by one drawn uniformly from ``[0, 2 pi)``; amplitudes and the coefficients inside
    ``shell`` unchanged (Chen et al. 2013; RELION's ``randomizePhasesBeyond``).

    Works on the real-to-complex half spectrum (``kx >= 0``) and transforms back, so the
    result is real. The phases are drawn on the CPU from ``generator`` (one per half-spectrum
    coefficient, in C order), so a seed gives the same map on every device.
    Returns ``(D, D, D)`` float32 on ``volume``'s device.
    """
    v = torch.as_tensor(volume)
    D = v.shape[-1]
    F = torch.fft.rfftn(v.double(), dim=(-3, -2, -1))
    kz = torch.fft.fftfreq(D, d=1.0 / D, dtype=torch.float64, device=v.device)
    kx = torch.fft.rfftfreq(D, d=1.0 / D, dtype=torch.float64, device=v.device)
    r2 = kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2
    phase = torch.rand(F.shape, generator=generator, dtype=torch.float64) * (2 * math.pi)
    phase = phase.to(v.device)
    rnd = torch.polar(F.abs(), phase)
    F = torch.where(r2 >= shell * shell, rnd, F)
    return torch.fft.irfftn(F, s=(D, D, D), dim=(-3, -2, -1)).to(torch.float32)


# --------------------------------------------------------------------------------------------
# gold-standard FSC
# --------------------------------------------------------------------------------------------


def _json_value(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return v


def _curve_json(c) -> list | None:
    if c is None:
        return None
    return [round(float(x), 6) for x in c]


@dataclass
class GoldStandardFSC:
    """Result of :func:`gold_standard_fsc`. Curves are float64 CPU tensors of ``D//2 + 1``
    shells at ``freq`` (1/Å); resolutions in Å (``inf`` if the curve starts below the
    threshold, ``2 apix`` if it never drops below it).

    Attributes:
        fsc_unmasked, fsc_masked: FSC of the halves without and with the mask.
        fsc_randomized: FSC of the masked halves after phase randomisation beyond
            ``randomize_shell`` (``None`` when the unmasked FSC never drops below
            ``randomize_at_fsc``: nothing to randomise, the maps are identical to Nyquist).
        fsc_corrected: ``FSC_true`` (module notes); equals ``fsc_masked`` below
            ``randomize_shell + 2``.
        randomize_shell: first shell (> 0) with unmasked FSC < ``randomize_at_fsc``.
        randomize_freq: its frequency (1/Å); ``randomize_at_A`` = its inverse (Å).
        resolution_A: the gold-standard resolution: the corrected masked FSC at 0.143, no
            finer than ``refined_to_A``.
        resolution_measured_A: where the corrected masked FSC itself drops below 0.143.
        refined_to_A: the finest cut-off (Å) the halves were refined to (``None``: not known,
            e.g. half maps from elsewhere). Beyond it the halves saw no data, so their FSC
            there measures what they share (the joint start, the positivity clamp's
            harmonics), not the signal: the stated resolution is capped at it.
        resolutions: ``{curve: {threshold: Å}}`` for 0.5 and 0.143 of every curve.
        mask: how the mask was made (:class:`MaskFacts`); ``mask_map``: the mask itself
            ``(D, D, D)`` float32 (not in :meth:`to_json`).
        warnings: RELION's checks: unmasked FSC beyond the corrected one (the mask cuts
            density), phase-randomised FSC above 0.1 at the resolution (mask too sharp),
            mask touching the box edge.
    """

    apix: float
    box: int
    freq: torch.Tensor
    fsc_unmasked: torch.Tensor
    fsc_masked: torch.Tensor
    fsc_randomized: torch.Tensor | None
    fsc_corrected: torch.Tensor
    randomize_shell: int | None
    randomize_at_fsc: float
    resolution_A: float
    resolutions: dict
    mask: MaskFacts
    seed: int = 0
    warnings: list = field(default_factory=list)
    mask_map: torch.Tensor | None = field(default=None, repr=False)
    resolution_measured_A: float | None = None
    refined_to_A: float | None = None

    @property
    def randomize_freq(self) -> float | None:
        if self.randomize_shell is None:
            return None
        return self.randomize_shell / (self.box * self.apix)

    @property
    def randomize_at_A(self) -> float | None:
        f = self.randomize_freq
        return None if f is None else 1.0 / f

    @property
    def resolution_unmasked_A(self) -> float:
        return self.resolutions["unmasked"][GOLD_STANDARD_THRESHOLD]

    def to_json(self) -> dict:
        """Plain JSON types for ``run.json["gold_standard"]`` (non-finite numbers -> null).

        Keys: ``apix``, ``box``, ``freq_1_per_A``, ``fsc_unmasked``, ``fsc_masked``,
        ``fsc_randomized``, ``fsc_corrected`` (lists), ``randomize_shell``,
        ``randomize_at_fsc``, ``randomize_at_A``, ``resolution_A`` (corrected, 0.143, capped at
        ``refined_to_A``), ``resolution_measured_A`` (uncapped), ``refined_to_A``,
        ``resolution_unmasked_A`` (0.143), ``resolutions_A`` (``{curve: {"0.5": Å,
        "0.143": Å}}``), ``threshold`` (0.143), ``mask`` (:meth:`MaskFacts.to_json` plus
        ``"description"``), ``seed``, ``warnings``.
        """
        mask = self.mask.to_json()
        mask["description"] = self.mask.describe()
        return {
            "apix": self.apix,
            "box": self.box,
            "freq_1_per_A": [float(x) for x in self.freq],
            "fsc_unmasked": _curve_json(self.fsc_unmasked),
            "fsc_masked": _curve_json(self.fsc_masked),
            "fsc_randomized": _curve_json(self.fsc_randomized),
            "fsc_corrected": _curve_json(self.fsc_corrected),
            "randomize_shell": self.randomize_shell,
            "randomize_at_fsc": self.randomize_at_fsc,
            "randomize_at_A": _json_value(self.randomize_at_A),
            "threshold": GOLD_STANDARD_THRESHOLD,
            "resolution_A": _json_value(self.resolution_A),
            "resolution_measured_A": _json_value(self.resolution_measured_A),
            "refined_to_A": _json_value(self.refined_to_A),
            "resolution_unmasked_A": _json_value(self.resolution_unmasked_A),
            "resolutions_A": {
                name: {f"{t:g}": _json_value(r) for t, r in res.items()}
                for name, res in self.resolutions.items()
            },
            "mask": mask,
            "seed": self.seed,
            "warnings": list(self.warnings),
        }


def corrected_fsc(
    fsc_masked, fsc_randomized, randomize_shell: int, offset: int = CORRECTION_OFFSET_SHELLS
) -> torch.Tensor:
    """``FSC_true`` of Chen et al. 2013: ``(FSC_m - FSC_r) / (1 - FSC_r)`` at shells
    ``>= randomize_shell + offset``, ``FSC_m`` below (RELION's ``calculateFSCtrue``)."""
    m = torch.as_tensor(fsc_masked, dtype=torch.float64)
    r = torch.as_tensor(fsc_randomized, dtype=torch.float64)
    true = (m - r) / (1.0 - r).clamp_min(1e-12)
    n = torch.arange(m.shape[0])
    return torch.where(n >= randomize_shell + offset, true, m)


def gold_standard_fsc(
    half1,
    half2,
    apix: float,
    mask=None,
    *,
    seed: int = 0,
    randomize_at_fsc: float = RANDOMIZE_AT_FSC,
    mask_options: dict | None = None,
    device=None,
    refined_to_A: float | None = None,
) -> GoldStandardFSC:
    """Gold-standard FSC of two half maps, with the mask correction of Chen et al. 2013.

    Args:
        half1, half2: the independently refined half maps ``[z, y, x]``, same even cubic box.
        apix: voxel size (Å).
        mask: solvent mask ``(D, D, D)`` with values in [0, 1]; ``None`` = made by
            :func:`soft_mask_from_map` from the average of the halves (``mask_options`` are
            its keyword arguments; ``noise_sigma`` defaults to the standard deviation of the
            low-passed half-difference ``(half1 - half2) / 2``, the noise of the average).
        seed: seed of the random phases (one CPU generator; half1's phases drawn first).
        randomize_at_fsc: phases are randomised from the first shell (> 0) where the unmasked
            FSC drops below this value (RELION's ``--randomize_at_fsc``, 0.8).
        device: where to compute (default: ``half1``'s device).
        refined_to_A: the finest cut-off (Å) the halves were refined to; the stated
            resolution is no finer (:class:`GoldStandardFSC`).

    The unmasked FSC, the FSC of the masked halves, the FSC of the masked phase-randomised
    halves and ``FSC_true`` (module notes) are computed with :func:`cryorecon.validate.fsc`;
    the gold-standard resolution is where ``FSC_true`` drops below 0.143. Raises
    :class:`InputError` for maps of different or odd boxes, non-finite values, a bad voxel
    size, or a mask of the wrong shape or outside [0, 1].
    """
    dev = torch.device(device) if device is not None else torch.as_tensor(half1).device
    h1 = _as_map(half1, "half map 1", dev)
    h2 = _as_map(half2, "half map 2", dev)
    if h1.shape != h2.shape:
        raise InputError(f"half maps differ in box: {tuple(h1.shape)} vs {tuple(h2.shape)}")
    apix = _check_apix(apix)
    if not 0 < randomize_at_fsc < 1:
        raise InputError(f"randomize_at_fsc must be in (0, 1), got {randomize_at_fsc}")
    D = h1.shape[0]
    if mask is None:
        opts = dict(mask_options or {})
        if opts.get("noise_sigma") is None:
            lp_A = opts.get("lowpass_A", MASK_LOWPASS_A)
            diff = 0.5 * (h1 - h2)  # the noise of the average, without the signal
            opts["noise_sigma"] = float((lowpass(diff, apix, lp_A) if lp_A else diff).std())
        m, facts = soft_mask_from_map(0.5 * (h1 + h2), apix, **opts)
    else:
        m = torch.as_tensor(mask).to(dev, torch.float32)
        if m.shape != h1.shape:
            raise InputError(
                f"mask box {tuple(m.shape)} differs from the half maps' {tuple(h1.shape)}"
            )
        finite = bool(torch.isfinite(m).all())
        if not finite or float(m.min()) < -1e-6 or float(m.max()) > 1 + 1e-6:
            raise InputError("mask values must lie in [0, 1] (1 = protein, 0 = solvent)")
        m = m.clamp(0.0, 1.0)
        facts = _given_mask_facts(m)

    freq, unmasked = fsc(h1, h2, apix)
    _, masked = fsc(h1 * m, h2 * m, apix)
    below = torch.nonzero(unmasked[1:] < randomize_at_fsc)
    warnings = []
    if below.numel() == 0:
        shell, randomized, corrected = None, None, masked.clone()
        warnings.append(
            f"the unmasked FSC never drops below {randomize_at_fsc:g}: "
            "no phase randomisation, the corrected FSC is the masked one"
        )
    else:
        shell = int(below[0]) + 1
        gen = torch.Generator().manual_seed(int(seed))
        r1 = randomize_phases_beyond(h1, shell, gen)
        r2 = randomize_phases_beyond(h2, shell, gen)
        _, randomized = fsc(r1 * m, r2 * m, apix)
        corrected = corrected_fsc(masked, randomized, shell)

    curves = {"unmasked": unmasked, "masked": masked, "corrected": corrected}
    if randomized is not None:
        curves["randomized"] = randomized
    resolutions = {
        name: {t: resolution_at(freq, c, t) for t in (0.5, GOLD_STANDARD_THRESHOLD)}
        for name, c in curves.items()
    }
    res = resolutions["corrected"][GOLD_STANDARD_THRESHOLD]
    res_unmasked = resolutions["unmasked"][GOLD_STANDARD_THRESHOLD]
    if res_unmasked < res:
        warnings.append(
            f"the unmasked FSC reaches {res_unmasked:.2f} Å, beyond the corrected "
            f"masked {res:.2f} Å: the mask may cut off density"
        )
    if randomized is not None and math.isfinite(res):
        i = min(int(round(1.0 / res * D * apix)), len(randomized) - 1)
        if float(randomized[i]) > 0.1:
            warnings.append(
                f"the phase-randomised FSC is {float(randomized[i]):.2f} (> 0.1) at "
                f"the resolution: use a softer mask"
            )
    if facts.touches_edge:
        warnings.append("the mask reaches the edge of the box")
    measured = res
    if refined_to_A is not None:
        refined_to_A = float(refined_to_A)
        if not refined_to_A > 0:
            raise InputError(f"refined_to_A must be > 0 Å, got {refined_to_A}")
        if res < refined_to_A:
            warnings.append(
                f"the half maps' FSC reaches {res:.2f} Å, beyond the {refined_to_A:.2f} Å "
                "cut-off they were refined to (what they share there is not signal): "
                f"stated as {refined_to_A:.2f} Å"
            )
            res = refined_to_A
    return GoldStandardFSC(
        apix=apix,
        box=D,
        freq=freq,
        fsc_unmasked=unmasked,
        fsc_masked=masked,
        fsc_randomized=randomized,
        fsc_corrected=corrected,
        randomize_shell=shell,
        randomize_at_fsc=float(randomize_at_fsc),
        resolution_A=res,
        resolutions=resolutions,
        mask=facts,
        seed=int(seed),
        warnings=warnings,
        mask_map=m,
        resolution_measured_A=measured,
        refined_to_A=refined_to_A,
    )


# --------------------------------------------------------------------------------------------
# combined map
# --------------------------------------------------------------------------------------------


def fsc_weights(fsc_curve) -> torch.Tensor:
    """Per-shell weights ``C_ref = sqrt(2 FSC / (1 + FSC))`` (Rosenthal & Henderson 2003,
    the expected correlation of the full map with the true structure given the half-map FSC),
    0 where FSC <= 0 and at every shell from the first with FSC < 1e-4 on (RELION's
    ``applyFscWeighting``: nothing past the point where the signal is gone)."""
    if isinstance(fsc_curve, torch.Tensor):
        f = fsc_curve.detach().cpu().double()
    else:
        f = torch.as_tensor(np.asarray(fsc_curve, dtype=np.float64))
    w = torch.sqrt((2 * f / (1 + f)).clamp_min(0.0))
    w = torch.where(f > 0, w, torch.zeros_like(w))
    gone = torch.nonzero(f < 1e-4)
    if gone.numel():
        w[int(gone[0]) :] = 0.0
    return w


def combine_halves(half1, half2, fsc_curve) -> torch.Tensor:
    """The combined map of two half maps, FSC-weighted.

    The halves' spectra are averaged and each shell (``round(|k|)`` Fourier pixels, as in
    :func:`cryorecon.validate.fsc`) multiplied by :func:`fsc_weights` of ``fsc_curve``
    (``D//2 + 1`` values, normally the corrected half-map FSC); the corners beyond Nyquist
    are set to 0. With FSC 1 everywhere this is the plain average ``(half1 + half2) / 2``
    (without the corners). Returns ``(D, D, D)`` float32 on ``half1``'s device.
    """
    h1 = _as_map(half1, "half map 1")
    h2 = _as_map(half2, "half map 2", h1.device)
    if h1.shape != h2.shape:
        raise InputError(f"half maps differ in box: {tuple(h1.shape)} vs {tuple(h2.shape)}")
    D = h1.shape[0]
    w = fsc_weights(fsc_curve)
    if w.shape[0] != D // 2 + 1:
        raise InputError(f"the FSC curve has {w.shape[0]} shells, a box of {D} needs {D // 2 + 1}")
    idx = shell_index(D, device=h1.device)
    wfull = torch.cat([w, torch.zeros(1, dtype=w.dtype)]).to(h1.device)
    wmap = wfull[idx.clamp_max(D // 2 + 1)]
    F = 0.5 * (fft3c(h1.double()) + fft3c(h2.double()))
    return ifft3c(F * wmap).real.to(torch.float32)


# --------------------------------------------------------------------------------------------
# what a run stores
# --------------------------------------------------------------------------------------------


@dataclass
class HalfMapOutputs:
    """What a run writes from its two half maps (see :func:`half_map_outputs`).

    Attributes:
        combined: the FSC-weighted combined map ``(D, D, D)`` float32 (``volume.mrc``).
        result: the :class:`GoldStandardFSC` (its ``mask_map`` is the mask used).
        run_json: the entries for ``run.json``: ``{"gold_standard": result.to_json(),
            "gold_standard_resolution_A": Å or None}``.
    """

    combined: torch.Tensor
    result: GoldStandardFSC
    run_json: dict


def half_map_outputs(
    half1,
    half2,
    apix: float,
    *,
    seed: int = 0,
    mask=None,
    mask_options: dict | None = None,
    refined_to_A: float | None = None,
) -> HalfMapOutputs:
    """Gold-standard FSC and combined map of a run's two half maps, in one call (no I/O).

    :func:`gold_standard_fsc` (automatic mask unless ``mask`` is given; ``mask_options`` go to
    :func:`soft_mask_from_map`), then :func:`combine_halves` weighted by the corrected FSC.
    """
    res = gold_standard_fsc(
        half1, half2, apix, mask, seed=seed, mask_options=mask_options, refined_to_A=refined_to_A
    )
    combined = combine_halves(half1, half2, res.fsc_corrected)
    doc = res.to_json()
    return HalfMapOutputs(
        combined=combined,
        result=res,
        run_json={"gold_standard": doc, "gold_standard_resolution_A": doc["resolution_A"]},
    )
