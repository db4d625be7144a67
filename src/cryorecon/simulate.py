"""Synthetic data: volumes from atomic models, and particle images by the paper's Eq. 1.

Volumes
-------
:func:`density_from_model` turns an atomic model into a D^3 map at ``apix`` Å/voxel with gemmi's
electron scattering factors (``gemmi.DensityCalculatorE``; Peng's 5-Gaussian form factors
plus each atom's B-factor). Hydrogens, waters and alternative conformations are removed;
ligands are kept. The density is first computed on a grid ``k`` times finer (spacing about
1.5 Å) with a small extra atomic blur that stops that grid from aliasing, then
Fourier-cropped to D^3, low-passed by ``exp(-B s^2 / 4)`` with ``B = 8 apix^2`` by default
(0.61 at Nyquist; the anti-aliasing blur counts towards it) and by a raised-cosine taper
from 0.9 to 1.0 of Nyquist (zero beyond the Nyquist sphere): the map is band-limited to
``d_min = 2 apix``. Band-limiting a sharp-edged molecule rings: expect small negative
lobes (a few % of the positive mass) next to the molecule.

Placement: the model's centre of mass sits at voxel index ``D//2`` on every axis; the map is
indexed ``[z, y, x]`` with x, y, z the model's Cartesian axes. Voxel ``(i, j, k)`` (``[z, y,
x]``) therefore holds the density at ``com + ((k, j, i) - D//2) * apix`` in the model's frame:
to overlay the map on the PDB in ChimeraX set its origin to ``com - (D//2) * apix``
(:func:`overlay_origin`; ``run_simulation`` records it in ``simulation.json``). ``truth.mrc``
is written with origin 0, like every map this package writes, so that reconstructions
overlay the truth directly.

Units: voxel values are point samples of gemmi's electron-scattering density (sum of the
atoms' electron form factors, Å per Å^3 = Å^-2); nothing is normalised. Projections are
sums of voxels along the beam (:func:`cryorecon.fourier.slicing.project`); the noise level is
set relative to the signal (SNR), so the absolute scale never matters downstream.

Particles (Eq. 1)
-----------------
``image = Re ifft2c( CTF(w) * exp(-2 pi i w.t) * slice_R(V)(w) ) + noise``: uniform random
rotation ``R`` (RELION convention), translation ``t`` uniform in ``[-max_shift, max_shift]``
pixels per axis (moving the particle by ``+t``), CTF from :mod:`cryorecon.fourier.ctf`.
Metadata are written in RELION's convention: ``rlnOriginXAngst/YAngst = -t * apix`` (the
particle centre sits at ``D//2 - origin``, pinned by the ``relion_project`` golden images;
see :mod:`cryorecon.geometry.poses`).

SNR: ``snr = var(signal) / sigma^2``, where ``var(signal)`` is the variance of the clean,
CTF-modulated images over the whole D x D box, averaged over a pilot set (the dataset's
first ``min(n, 512)`` particles), and the noise is white Gaussian with standard deviation
``sigma`` (the same for every particle).

Determinism: all randomness is drawn on the CPU from generators seeded by ``(seed, block)``
for fixed blocks of 256 particles, so a dataset depends only on ``seed`` (not on the batch
size or device), and the first ``m`` particles of a larger set equal a set of ``m``.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, OutputExistsError
from .fourier.ctf import ctf_from_dict
from .fourier.slicing import SliceOperator, spectrum_from_volume
from .fourier.transforms import fft3c, ifft3c, phase_shift
from .geometry.poses import pose_to_relion
from .geometry.rotations import euler_to_matrix, random_rotations
from .io.atomic import write_json
from .io.mrc import read_map, write_map
from .progress import bar, log

BLOCK = 256  # particles per random-number block (fixed: part of the dataset's definition)
PILOT = 512  # particles in the pilot set that fixes the noise level
FINE_SPACING_A = 1.5  # target spacing (Å) of the fine grid gemmi computes on
MAP_BLUR = 8.0  # default map B-factor in units of apix^2: exp(-1/2) = 0.61 at Nyquist
MAX_FINE = 512  # largest fine grid edge


# --------------------------------------------------------------------------- volumes


def builtin_model_path() -> Path:
    """Path of the shipped GroEL-GroES structure (PDB 1AON)."""
    ref = importlib.resources.files("cryorecon") / "data" / "1aon.pdb.gz"
    return Path(str(ref))


def _read_structure(path):
    import gemmi

    path = builtin_model_path() if path is None else Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:  # gemmi raises RuntimeError/ValueError on bad files
        raise InputError(f"{path}: not a readable PDB/mmCIF model ({exc})") from exc
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"{path}: model holds no atoms")
    st.setup_entities()
    st.remove_hydrogens()
    st.remove_waters()  # ligands (ADP, Mg in 1AON) are kept: they are part of the complex
    st.remove_alternative_conformations()
    return st, path


def _atom_positions(model) -> np.ndarray:
    return np.array([a.pos.tolist() for ch in model for res in ch for a in res], dtype=np.float64)


def model_centre(path=None) -> np.ndarray:
    """Centre of mass (x, y, z) Å of a model, cleaned up as in :func:`density_from_model`."""
    st, _ = _read_structure(path)
    return np.array(st[0].calculate_center_of_mass().tolist())


def model_mass_da(path=None) -> float:
    """Mass (daltons) of a model, cleaned up as in :func:`density_from_model`, with the
    hydrogens a crystal structure leaves out restored: each residue's tabulated hydrogen
    count (gemmi's residue table, free residue), less the two a peptide or phosphodiester
    bond removes for each residue after the first of its chain."""
    import gemmi

    st, _ = _read_structure(path)
    model = st[0]
    mass = float(model.calculate_mass())
    h_mass = gemmi.Element("H").weight
    for chain in model:
        first = True
        for res in chain:
            if res.is_water():
                continue
            info = gemmi.find_tabulated_residue(res.name)
            if info is None:
                continue
            n_h = info.hydrogen_count
            if not first and (info.is_amino_acid() or info.is_nucleic_acid()):
                n_h -= 2
            first = first and not (info.is_amino_acid() or info.is_nucleic_acid())
            mass += max(n_h, 0) * h_mass
    return mass


def overlay_origin(centre_A, D: int, apix: float) -> np.ndarray:
    """MRC origin (x, y, z) Å that overlays a map from :func:`density_from_model` on its model."""
    return np.asarray(centre_A, dtype=np.float64) - (D // 2) * apix


def _raised_cosine(r: torch.Tensor, lo: float = 0.9) -> torch.Tensor:
    """1 for r <= lo, 0 for r >= 1, raised cosine in between (r in units of Nyquist)."""
    t = 0.5 * (1 + torch.cos(math.pi * (r - lo) / (1 - lo)))
    return torch.where(r <= lo, torch.ones_like(r), torch.where(r >= 1.0, torch.zeros_like(r), t))


def _nyquist_taper_rfft(
    D: int, lo: float = 0.9, apix: float = 1.0, bfactor: float = 0.0
) -> torch.Tensor:
    """Filter on the (D, D, D//2+1) layout of ``torch.fft.rfftn`` (uncentred): raised-cosine
    taper (1 below ``lo`` Nyquist, 0 beyond the Nyquist sphere) times ``exp(-B s^2 / 4)``."""
    k = torch.fft.fftfreq(D, dtype=torch.float64) * 2  # units of Nyquist
    kr = torch.fft.rfftfreq(D, dtype=torch.float64) * 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2)
    s2 = (r / (2 * apix)) ** 2
    return _raised_cosine(r, lo) * torch.exp(-bfactor * s2 / 4)


def fourier_resize(volume: torch.Tensor, D_out: int) -> torch.Tensor:
    """Fourier crop or zero-pad a cubic volume to ``D_out`` about the centre index, keeping
    point values (a constant map stays the same constant). Real (D_out,)*3 float32."""
    D_in = volume.shape[-1]
    if D_in == D_out:
        return volume.to(torch.float32)
    F = fft3c(volume.to(torch.float64))
    out = torch.zeros((D_out,) * 3, dtype=F.dtype)
    m = min(D_in, D_out)
    si, so = D_in // 2 - m // 2, D_out // 2 - m // 2
    out[so : so + m, so : so + m, so : so + m] = F[si : si + m, si : si + m, si : si + m]
    return (ifft3c(out).real * (D_out / D_in) ** 1.5).to(torch.float32)


def _centre_crop_pad(volume: torch.Tensor, D: int) -> torch.Tensor:
    """Crop or zero-pad in real space so that index ``n//2`` lands on ``D//2``."""
    n = volume.shape[-1]
    out = torch.zeros((D,) * 3, dtype=volume.dtype)
    m = min(n, D)
    si, so = n // 2 - m // 2, D // 2 - m // 2
    out[so : so + m, so : so + m, so : so + m] = volume[si : si + m, si : si + m, si : si + m]
    return out


def density_from_model(
    path=None, D: int = 64, apix: float = 5.6, *, bfactor: float | None = None, centre_A=None
) -> torch.Tensor:
    """Electron-scattering density of an atomic model on a D^3 grid at ``apix`` Å/voxel.

    Args:
        path: PDB or mmCIF file (gzipped allowed); None = the shipped 1AON.
        D: box edge in voxels (even).
        apix: voxel size in Å.
        bfactor: B-factor (Å^2) of a Gaussian low-pass ``exp(-B s^2 / 4)`` applied to the map
            on top of the atoms' own B-factors; default ``8 apix^2`` (0.61 at Nyquist, a
            Gaussian of sigma ``apix / pi``), which tames the ringing of the band limit.
        centre_A: model coordinate (x, y, z) placed at index D//2; default centre of mass.
    Returns:
        float32 tensor (D, D, D) indexed [z, y, x] (see the module notes for placement/units).
    Raises:
        InputError: unreadable model, or the model does not fit in the box.
    """
    import gemmi

    if D <= 0 or D % 2:
        raise InputError(f"box size must be a positive even number, got {D}")
    st, path = _read_structure(path)
    model = st[0]
    centre = (
        np.array(model.calculate_center_of_mass().tolist())
        if centre_A is None
        else np.asarray(centre_A, dtype=np.float64)
    )
    xyz = _atom_positions(model) - centre
    half = (D // 2) * apix
    margin = 2 * apix
    need = max(-xyz.min(), xyz.max()) + margin
    if need > half - apix:
        box_needed = 2 * math.ceil(need / apix + 1)
        raise InputError(
            f"{path.name}: the model spans {xyz.min():.0f} to {xyz.max():.0f} Å about its centre "
            f"but a box of {D} x {apix} Å reaches only ±{half:.0f} Å; use --box {box_needed} or a "
            f"larger --apix (>= {2 * (need + apix) / D:.2f})"
        )
    rmax = float(np.linalg.norm(xyz, axis=1).max())
    if rmax > half:
        log.warning(
            "%s: atoms reach %.0f Å from the centre, beyond the box's inscribed sphere "
            "(%.0f Å); rotated views will be cut at the box edge",
            path.name,
            rmax,
            half,
        )

    k = max(1, min(math.ceil(apix / FINE_SPACING_A), MAX_FINE // D))
    N = k * D
    h = apix / k
    L = N * h
    s_alias = (2 * k - 1) / (2 * apix)  # lowest frequency that aliases onto the D box
    dc = gemmi.DensityCalculatorE()
    dc.grid.unit_cell = gemmi.UnitCell(L, L, L, 90, 90, 90)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(N, N, N)
    dc.blur = 12.0 / s_alias**2  # anti-aliasing on the fine grid (exp(-3) at s_alias)
    shift = (N // 2) * h - centre
    for ch in model:
        for res in ch:
            for a in res:
                a.pos = gemmi.Position(a.pos.x + shift[0], a.pos.y + shift[1], a.pos.z + shift[2])
    dc.add_model_density_to_grid(model)
    fine = torch.from_numpy(np.array(dc.grid, copy=False)).permute(2, 1, 0)  # [z, y, x]
    # Fourier crop N^3 -> D^3 about index N//2 (real FFT of the ifftshifted grid: the origin
    # N//2 moves to 0 and comes back at D//2).
    F = torch.fft.rfftn(torch.fft.ifftshift(fine), norm="backward")
    dc_blur = dc.blur
    del dc, fine
    keep = torch.cat([torch.arange(0, D // 2), torch.arange(N - D // 2, N)])
    F = F[keep][:, keep][:, :, : D // 2 + 1]
    B = MAP_BLUR * apix**2 if bfactor is None else float(bfactor)
    B = max(0.0, B - dc_blur)  # the anti-aliasing blur already counts towards it
    F = F * _nyquist_taper_rfft(D, apix=apix, bfactor=B).to(F.real.dtype)
    vol = torch.fft.fftshift(torch.fft.irfftn(F, s=(D, D, D), norm="backward")) * (D / N) ** 3
    return vol.to(torch.float32).contiguous()


def load_volume(path, D: int, apix: float) -> torch.Tensor:
    """Read an MRC map and bring it to a D^3 box at ``apix`` Å/voxel.

    A different voxel size is handled by Fourier cropping/padding (keeping the physical box,
    so the new voxel size is exactly ``apix`` only when ``D_in * apix_in / apix`` is an
    integer; otherwise the nearest integer is used and a warning names the residual); a
    different box by centred cropping/zero-padding in real space. The map's centre index
    ``D_in//2`` lands on ``D//2``. Values are kept as point samples.
    """
    data, apix_in = read_map(path)
    if len(set(data.shape)) != 1:
        raise InputError(f"{path}: expected a cubic map, found shape {data.shape}")
    vol = torch.from_numpy(data)
    D_in = data.shape[0]
    if abs(apix_in - apix) > 1e-4 * apix:
        D_mid = max(2, int(round(D_in * apix_in / apix)))
        real_apix = D_in * apix_in / D_mid
        if abs(real_apix - apix) > 1e-3 * apix:
            log.warning(
                "%s: resampled from %.4f to %.4f Å/voxel (requested %.4f)",
                path,
                apix_in,
                real_apix,
                apix,
            )
        vol = fourier_resize(vol, D_mid)
    if vol.shape[-1] != D:
        vol = _centre_crop_pad(vol, D)
    return vol.to(torch.float32).contiguous()


# --------------------------------------------------------------------------- particles


def _block_generator(seed: int, block: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(block), int(stream)])
    g = torch.Generator()
    g.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1)))
    return g


@dataclass
class ParticleParams:
    """Per-particle ground truth: rotations (n,3,3) float64, translations ``t`` (n,2) px
    (content moved by +t) and the CTF dict of (n,) float64 arrays (Å, deg, kV, mm)."""

    rotations: torch.Tensor
    shifts_px: torch.Tensor
    ctf: dict
    apix: float

    @property
    def n(self) -> int:
        return int(self.rotations.shape[0])

    def relion(self, idx=slice(None)):
        """(angles (m,3) deg rot/tilt/psi, origins (m,2) Å as rlnOriginXAngst/YAngst)."""
        return pose_to_relion(self.rotations[idx], self.shifts_px[idx], self.apix)


def draw_parameters(
    n: int,
    apix: float,
    seed: int,
    defocus_range_um=(1.0, 3.0),
    astigmatism_A: float = 200.0,
    voltage: float = 300.0,
    cs: float = 2.7,
    amp_contrast: float = 0.1,
    shift_range_px: float = 3.0,
    bfactor: float = 0.0,
    angles=None,
) -> ParticleParams:
    """Draw poses, translations and CTFs for ``n`` particles (see the module's determinism note).

    ``defocus_u`` is uniform in ``defocus_range_um`` (µm, converted to Å), ``defocus_v =
    defocus_u - a`` with ``a`` uniform in ``[0, astigmatism_A]`` (CTFFIND's ``U >= V``), the
    azimuth uniform in [0, 180) degrees. ``angles`` (n, 3) RELION degrees replace the random
    rotations.
    """
    if n <= 0:
        raise InputError(f"number of particles must be positive, got {n}")
    lo, hi = (float(x) * 1e4 for x in defocus_range_um)
    if not 0 < lo <= hi:
        raise InputError(f"bad defocus range {defocus_range_um} µm")
    if not 0 <= amp_contrast < 1:
        raise InputError(f"amplitude contrast must lie in [0, 1), got {amp_contrast}")
    R, T, DU, AS, ANG = [], [], [], [], []
    for b in range(math.ceil(n / BLOCK)):
        g = _block_generator(seed, b, 0)
        R.append(random_rotations(BLOCK, generator=g))
        T.append((torch.rand(BLOCK, 2, generator=g, dtype=torch.float64) * 2 - 1) * shift_range_px)
        DU.append(torch.rand(BLOCK, generator=g, dtype=torch.float64))
        AS.append(torch.rand(BLOCK, generator=g, dtype=torch.float64))
        ANG.append(torch.rand(BLOCK, generator=g, dtype=torch.float64))
    rot = torch.cat(R)[:n]
    if angles is not None:
        a = np.asarray(angles, dtype=np.float64)
        if a.shape != (n, 3):
            raise InputError(f"angles must have shape ({n}, 3), got {a.shape}")
        rot = euler_to_matrix(*torch.deg2rad(torch.as_tensor(a)).T)
    du = lo + (hi - lo) * torch.cat(DU)[:n]
    ctf = dict(
        defocus_u=du.numpy(),
        defocus_v=(du - astigmatism_A * torch.cat(AS)[:n]).numpy(),
        defocus_angle=(180.0 * torch.cat(ANG)[:n]).numpy(),
        voltage=np.full(n, float(voltage)),
        cs=np.full(n, float(cs)),
        amp_contrast=np.full(n, float(amp_contrast)),
        phase_shift=np.zeros(n),
        bfactor=np.full(n, float(bfactor)),
    )
    return ParticleParams(rot, torch.cat(T)[:n], ctf, float(apix))


@dataclass
class ParticleBatch:
    """Particles ``start .. start+len``: images (b, D, D) float32 numpy, and their metadata."""

    start: int
    images: np.ndarray
    angles: np.ndarray  # (b, 3) deg
    shifts_A: np.ndarray  # (b, 2) Å, rlnOriginXAngst/YAngst
    ctf: dict = field(default_factory=dict)


class ParticleSimulator:
    """Streams particle images for a volume and a :class:`ParticleParams`.

    ``noise_sigma`` and ``signal_var`` are fixed at construction from the pilot set.
    ``snr=None`` or ``inf`` gives clean (CTF-modulated, noise-free) images.
    """

    def __init__(
        self,
        volume: torch.Tensor,
        params: ParticleParams,
        snr: float | None,
        seed: int,
        device="cpu",
        oversample: int = 2,
    ):
        self.device = torch.device(device)
        vol = torch.as_tensor(volume, dtype=torch.float32)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise InputError(f"volume must be a cube, got shape {tuple(vol.shape)}")
        self.D = int(vol.shape[-1])
        self.params = params
        self.seed = int(seed)
        self.oversample = oversample
        self.spectrum = spectrum_from_volume(vol.to(self.device), oversample)
        # Half-spectrum layout of torch.fft.rfft2 (uncentred, (D, D//2+1)): only the
        # coefficients inside the Nyquist disc |k| < D/2 are computed (Eq. 2's set; the truth
        # from a model is band-limited to the Nyquist sphere anyway); the rest stay zero.
        D = self.D
        ky = torch.fft.fftfreq(D, 1.0 / D, device=self.device)
        kx = torch.arange(D // 2 + 1, device=self.device, dtype=ky.dtype)
        KY, KX = torch.meshgrid(ky, kx, indexing="ij")
        inside = (KX * KX + KY * KY < (D / 2) ** 2).reshape(-1)
        self._flat = torch.nonzero(inside).squeeze(-1)
        self.freqs_px = torch.stack([KX.reshape(-1), KY.reshape(-1)], -1)[self._flat].float()
        self.freqs_A = self.freqs_px / (D * params.apix)
        self.chunk = max(1, 2**19 // self._flat.numel())  # ~0.5 GB of slicing temporaries
        if snr is not None and not snr > 0:
            raise InputError(f"SNR must be positive, got {snr}")
        self.snr = None if snr is None or math.isinf(snr) else float(snr)
        self.signal_var = self._pilot_variance()
        self.noise_sigma = 0.0 if self.snr is None else math.sqrt(self.signal_var / self.snr)
        self._noise_cache: tuple[int, torch.Tensor] | None = None

    def clean(self, start: int, stop: int) -> torch.Tensor:
        """Noise-free CTF-modulated images of particles ``start:stop``, (b, D, D) on device."""
        out = []
        for s in range(start, stop, self.chunk):
            e = min(stop, s + self.chunk)
            R = self.params.rotations[s:e].to(self.device, torch.float32)
            t = self.params.shifts_px[s:e].to(self.device, torch.float32)
            op = SliceOperator(R, self.freqs_px, self.D, self.oversample, cache_bytes=0)
            coeffs = op.slice(self.spectrum)
            ctf = ctf_from_dict(self.params.ctf, slice(s, e), self.freqs_A)
            coeffs = coeffs * (ctf * phase_shift(self.freqs_px / self.D, t))
            half = torch.zeros(
                e - s, self.D * (self.D // 2 + 1), dtype=coeffs.dtype, device=self.device
            )
            half[:, self._flat] = coeffs
            half = half.reshape(e - s, self.D, self.D // 2 + 1)
            img = torch.fft.irfft2(half, s=(self.D, self.D), norm="ortho")
            out.append(torch.fft.fftshift(img, dim=(-2, -1)))
        return torch.cat(out, 0)

    def _pilot_variance(self) -> float:
        m = min(self.params.n, PILOT)
        total = 0.0
        for s in range(0, m, self.chunk):
            img = self.clean(s, min(m, s + self.chunk)).to(torch.float64)
            total += float(img.var(dim=(-2, -1), unbiased=False).sum())
        return total / m

    def noise(self, start: int, stop: int) -> torch.Tensor:
        """Unit-variance noise of particles ``start:stop`` (CPU float32), from their blocks."""
        parts = []
        i = start
        while i < stop:
            b = i // BLOCK
            if self._noise_cache is None or self._noise_cache[0] != b:
                g = _block_generator(self.seed, b, 1)
                self._noise_cache = (b, torch.randn(BLOCK, self.D, self.D, generator=g))
            j = min(stop, (b + 1) * BLOCK)
            parts.append(self._noise_cache[1][i - b * BLOCK : j - b * BLOCK])
            i = j
        return torch.cat(parts, 0)

    def batches(self, batch_size: int = 256) -> Iterator[ParticleBatch]:
        n = self.params.n
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            img = self.clean(s, e).cpu()
            if self.noise_sigma > 0:
                img = img + self.noise_sigma * self.noise(s, e)
            angles, origins = self.params.relion(slice(s, e))
            ctf = {k: v[s:e] for k, v in self.params.ctf.items()}
            yield ParticleBatch(s, img.numpy().astype(np.float32, copy=False), angles, origins, ctf)


def simulate_particles(
    volume: torch.Tensor,
    n: int,
    apix: float,
    snr: float | None,
    seed: int,
    defocus_range_um=(1.0, 3.0),
    voltage: float = 300.0,
    cs: float = 2.7,
    amp_contrast: float = 0.1,
    shift_range_px: float = 3.0,
    bfactor: float = 0.0,
    angles=None,
    batch_size: int = 256,
    device="cpu",
    astigmatism_A: float = 200.0,
) -> Iterator[ParticleBatch]:
    """Generator of :class:`ParticleBatch` for ``n`` particles of ``volume`` (Eq. 1): the
    parameters of :func:`draw_parameters`, imaged by :class:`ParticleSimulator`."""
    params = draw_parameters(
        n,
        apix,
        seed,
        defocus_range_um,
        astigmatism_A,
        voltage,
        cs,
        amp_contrast,
        shift_range_px,
        bfactor,
        angles,
    )
    yield from ParticleSimulator(volume, params, snr, seed, device).batches(batch_size)


# --------------------------------------------------------------------------- driver

OUTPUTS = ("particles.star", "particles.mrcs", "truth.mrc", "simulation.json")


def run_simulation(
    out_dir,
    volume=None,
    model=None,
    n: int = 1000,
    D: int = 64,
    apix: float = 5.6,
    snr: float | None = 0.05,
    seed: int = 0,
    defocus_range_um=(1.0, 3.0),
    voltage: float = 300.0,
    cs: float = 2.7,
    amp_contrast: float = 0.1,
    shift_range_px: float = 3.0,
    bfactor: float = 0.0,
    astigmatism_A: float = 200.0,
    batch_size: int = 256,
    device="cpu",
    force: bool = False,
) -> dict:
    """Write ``DIR/particles.star`` + ``particles.mrcs`` (streamed), ``DIR/truth.mrc`` and
    ``DIR/simulation.json`` (parameters, noise sigma, PDB overlay origin).

    ``volume`` is an MRC path or a (D, D, D) tensor; otherwise ``model`` (PDB/mmCIF path) or
    the shipped 1AON is used. Refuses (:class:`OutputExistsError`) if any output exists
    unless ``force``. Returns the summary written to ``simulation.json``.

    Example (``cryorecon.simulate``)::

        >>> import os, tempfile, cryorecon
        >>> out = tempfile.mkdtemp()
        >>> summary = cryorecon.simulate(out, n=10, D=32, apix=11.0, snr=0.1, seed=0)
        >>> summary["n"], summary["box"], sorted(os.listdir(out))
        (10, 32, ['particles.mrcs', 'particles.star', 'simulation.json', 'truth.mrc'])
    """
    from .io.particles import write_particles

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    existing = [str(out / f) for f in OUTPUTS if (out / f).exists()]
    if existing and not force:
        raise OutputExistsError(f"{', '.join(existing)} exist; refusing to overwrite (use --force)")
    if volume is not None and model is not None:
        raise InputError("give a volume or a model, not both")

    summary: dict = {}
    if volume is None:
        log.info("computing density of %s at %d^3 x %.3g Å", model or "built-in 1AON", D, apix)
        vol = density_from_model(model, D, apix)
        centre = model_centre(model)
        summary["model"] = str(model) if model is not None else "builtin:1aon.pdb.gz"
        summary["model_centre_A"] = centre.tolist()
        summary["mass_da"] = model_mass_da(model)
        summary["pdb_overlay_origin_A"] = overlay_origin(centre, D, apix).tolist()
    elif isinstance(volume, (str, os.PathLike)):
        vol = load_volume(volume, D, apix)
        summary["volume"] = str(volume)
    else:
        vol = torch.as_tensor(volume, dtype=torch.float32)
        if tuple(vol.shape) != (D, D, D):
            raise InputError(f"volume has shape {tuple(vol.shape)}, expected {(D, D, D)}")

    out.mkdir(parents=True, exist_ok=True)
    write_map(out / "truth.mrc", vol.numpy(), apix, overwrite=force)
    params = draw_parameters(
        n,
        apix,
        seed,
        defocus_range_um,
        astigmatism_A,
        voltage,
        cs,
        amp_contrast,
        shift_range_px,
        bfactor,
    )
    sim = ParticleSimulator(vol, params, snr, seed, device)
    angles, origins = params.relion()
    progress = bar(total=n, desc="simulate", unit="particle")

    def images():
        for b in sim.batches(batch_size):
            progress.update(len(b.images))
            yield b.images

    try:
        write_particles(
            out / "particles.star",
            images(),
            apix,
            params.ctf,
            angles=angles,
            shifts=origins,
            overwrite=force,
            batch_size=batch_size,
        )
    finally:
        progress.close()
    summary.update(
        n=n,
        box=D,
        apix=apix,
        snr=sim.snr,
        seed=seed,
        defocus_range_um=list(defocus_range_um),
        astigmatism_A=astigmatism_A,
        voltage_kv=voltage,
        cs_mm=cs,
        amp_contrast=amp_contrast,
        max_shift_px=shift_range_px,
        bfactor=bfactor,
        signal_variance=sim.signal_var,
        noise_sigma=sim.noise_sigma,
        conventions=(
            "CTF = RELION (positive at low frequency for underfocus); "
            "SNR = mean per-image variance of clean CTF-modulated images over the box / "
            "noise variance (pilot: first min(n, 512) particles); "
            "rlnOriginXAngst = -t*apix (particle centre at D//2 - origin)"
        ),
    )
    write_json(out / "simulation.json", summary)
    log.info("wrote %d particles (noise sigma %.4g) to %s", n, sim.noise_sigma, out)
    return summary
