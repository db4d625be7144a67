"""Central-slice extraction (Fourier slice theorem, paper Eq. 1, 27) and its exact adjoint.

The 3D spectrum is sampled on a plane by trilinear interpolation with premultiplication
(Sec. 3.2, Appendix A): before the 3D FFT the volume is divided by the real-space transform
of the trilinear kernel, ``sinc^2(x / P)`` per axis (``P`` = padded box, ``x`` = voxel offset
from the centre), and zero-padded to ``P = oversample * D`` so that the interpolation error
is small. The slice of a rotation ``A`` (RELION convention: rows ``n1, n2, d``) at the 2D
frequency index ``(kx, ky)`` is read at the 3D index ``oversample * (kx n1 + ky n2)``.

Scaling: slices are scaled by ``P^(3/2) / D`` so that slicing returns exactly the centred
unitary 2D DFT (:func:`~cryorecon.fourier.transforms.fft2c`) of the real-space line-integral
projection (sum of voxels along ``d``) of the D-box volume. Frequencies outside the padded
grid (beyond ``P/2 - 1`` along any axis) read as zero.

One operator: :class:`SliceOperator` slices a padded spectrum at fixed rotations and
frequencies and back-projects (its exact adjoint, scatter-add with the same trilinear
weights); :func:`spectrum_from_volume` is the premultiply-pad-FFT step and
:func:`spectrum_adjoint_to_volume` its adjoint, so ``<slice(V), u> == <V, adjoint(u)>``
(tested). :func:`project` builds real-space projections from it.
"""

from __future__ import annotations

import torch

from .transforms import ifft2c, phase_shift


def premultiplier(D: int, P: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Real-space trilinear-kernel transform ``sinc^2(x/P)`` on a D^3 grid, shape (D, D, D)."""
    x = (torch.arange(D, device=device, dtype=torch.float64) - D // 2) / P
    s = torch.special.sinc(x) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).to(dtype)


def _embed_index(D: int, P: int, device=None) -> torch.Tensor:
    """Positions in an uncentred P-grid of the D-box voxels (box centre D//2 -> index 0)."""
    return (torch.arange(D, device=device) - D // 2) % P


def spectrum_from_volume(volume: torch.Tensor, oversample: int = 2) -> torch.Tensor:
    """Premultiply, zero-pad to ``P = oversample * D`` and take the scaled 3D DFT.

    The spectrum is kept in the *uncentred* FFT layout (frequency index ``k`` in
    ``[-P/2, P/2)`` at array index ``k mod P``), which saves two shifts per transform; the
    slicing functions below index it accordingly.

    Args:
        volume: real (D, D, D) tensor ``[z, y, x]``, centre at ``D//2``.
    Returns:
        complex (P, P, P) spectrum ready for :meth:`SliceOperator.slice`.
    """
    D = volume.shape[-1]
    P = oversample * D
    v = volume / premultiplier(D, P, device=volume.device, dtype=volume.dtype)
    i = _embed_index(D, P, volume.device)
    padded = torch.zeros((P, P, P), dtype=volume.dtype, device=volume.device)
    padded[i[:, None, None], i[None, :, None], i[None, None, :]] = v
    return torch.fft.fftn(padded, norm="ortho") * (P**1.5 / D)


def spectrum_adjoint_to_volume(spec: torch.Tensor, D: int) -> torch.Tensor:
    """Adjoint of :func:`spectrum_from_volume` (restricted to real volumes): (P,P,P) -> (D,D,D).

    For a real volume ``V`` and complex spectrum ``S = T V``, ``Re <T V, S> = <V, T^H S>``.
    """
    P = spec.shape[-1]
    i = _embed_index(D, P, spec.device)
    back = torch.fft.ifftn(spec, norm="ortho").real * (P**1.5 / D)
    v = back[i[:, None, None], i[None, :, None], i[None, None, :]]
    return v / premultiplier(D, P, device=spec.device, dtype=v.dtype)


def volume_from_spectrum(spec: torch.Tensor, D: int) -> torch.Tensor:
    """Inverse of :func:`spectrum_from_volume` on its range: (P,P,P) -> real (D,D,D)."""
    P = spec.shape[-1]
    i = _embed_index(D, P, spec.device)
    back = torch.fft.ifftn(spec, norm="ortho").real * (D / P**1.5)
    v = back[i[:, None, None], i[None, :, None], i[None, None, :]]
    return v * premultiplier(D, P, device=spec.device, dtype=v.dtype)


def spectrum_frequency_radius(P: int, oversample: int, device=None) -> torch.Tensor:
    """|k| in Fourier pixels of the D box for every point of the uncentred (P, P, P) grid."""
    k = torch.fft.fftfreq(P, device=device) * P / oversample
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.sqrt(kx * kx + ky * ky + kz * kz)


def _trilinear_setup(rotations: torch.Tensor, freqs_px: torch.Tensor, P: int, oversample: int):
    """Flat corner indices (N, M, 8) int64 into the uncentred (P,P,P) grid, weights (N, M, 8).

    Corners are ordered z-major (index ``4 dz + 2 dy + dx``); a corner outside the padded
    grid gets weight 0. Built per axis and combined by outer products.
    """
    R = rotations.to(torch.float32)
    f = freqs_px.to(device=R.device, dtype=torch.float32)
    # 3D frequency coordinates (x, y, z) on the padded grid of each 2D frequency per rotation.
    xyz = oversample * (f[None, :, 0:1] * R[:, None, 0, :] + f[None, :, 1:2] * R[:, None, 1, :])
    base = torch.floor(xyz)
    frac = xyz - base
    lo = base.to(torch.long)
    i01 = torch.stack([lo, lo + 1], -1)  # (N, M, 3, 2)
    w01 = torch.stack([1 - frac, frac], -1)
    w01 = w01 * ((i01 >= -(P // 2)) & (i01 < P // 2))
    i01 = torch.remainder(i01, P)
    ix, iy, iz = i01[:, :, 0], i01[:, :, 1], i01[:, :, 2]  # (N, M, 2) each
    wx, wy, wz = w01[:, :, 0], w01[:, :, 1], w01[:, :, 2]
    flat = (iz[..., :, None, None] * P + iy[..., None, :, None]) * P + ix[..., None, None, :]
    w = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
    N, M = xyz.shape[:2]
    return flat.reshape(N, M, 8), w.reshape(N, M, 8)


class SliceOperator:
    """Central slices at fixed rotations and frequencies (Eq. 1, 27), and their exact adjoint.

    :meth:`slice` maps a padded spectrum (:func:`spectrum_from_volume`) to the (J, M)
    coefficients of rotations ``J`` at 2D frequency indices ``freqs_px`` (M, 2) ``(kx, ky)``
    (Fourier pixels of the D box, may be fractional), trilinear interpolation on the padded
    grid; :meth:`backproject` is its adjoint (scatter-add with the same weights), so
    ``<slice(S), u> == <S, backproject(u)>``. Any volume is sliced at any rotations by
    ``SliceOperator(R, freqs_px, D, oversample).slice(spectrum_from_volume(V, oversample))``.

    The corner indices and weights depend only on the poses and frequencies, so they are
    computed once and kept when they fit in ``cache_bytes`` (8 indices, int32 when the padded
    grid has fewer than 2^31 voxels else int64, and 8 float32 weights per (rotation,
    frequency) pair: 64 bytes a pair); otherwise they are recomputed per chunk of rotations.
    Work is chunked over rotations (``chunk`` at a time) to bound the temporaries.
    """

    def __init__(
        self,
        rotations: torch.Tensor,
        freqs_px: torch.Tensor,
        D: int,
        oversample: int = 2,
        cache_bytes: int = 2**31,
        _cache=None,
    ):
        self.rotations = rotations
        self.freqs_px = freqs_px
        self.cache_bytes = cache_bytes
        self.D, self.oversample, self.P = D, oversample, oversample * D
        J, M = rotations.shape[0], freqs_px.shape[0]
        self.chunk = max(1, 2**22 // max(1, 8 * M))
        self._cache = _cache  # (flat (J, M, 8) int32 or int64, w (J, M, 8) float32) or None
        index_dtype = torch.int32 if self.P**3 < 2**31 else torch.int64
        if self._cache is None and J * M * 8 * (index_dtype.itemsize + 4) <= cache_bytes:
            parts = [self._compute(r) for r in range(0, J, self.chunk)]
            if len(parts) == 1:
                self._cache = (parts[0][0].to(index_dtype), parts[0][1])
            else:
                self._cache = (
                    torch.cat([f.to(index_dtype) for f, _ in parts], 0),
                    torch.cat([w for _, w in parts], 0),
                )

    def subset(self, rows: torch.Tensor) -> SliceOperator:
        """The operator for ``rotations[rows]``, indexing the cached set-up."""
        rows = rows.to(self.rotations.device)
        cache = None if self._cache is None else (self._cache[0][rows], self._cache[1][rows])
        return SliceOperator(
            self.rotations[rows], self.freqs_px, self.D, self.oversample, self.cache_bytes, cache
        )

    def _compute(self, r: int):
        rot = self.rotations[r : r + self.chunk]
        return _trilinear_setup(rot, self.freqs_px, self.P, self.oversample)

    def _setup(self, r: int):
        if self._cache is not None:
            return self._cache[0][r : r + self.chunk], self._cache[1][r : r + self.chunk]
        return self._compute(r)

    def slice(self, spec: torch.Tensor) -> torch.Tensor:
        """(J, M) coefficients of the padded spectrum ``spec`` (P, P, P): the centred unitary
        2D DFT of the projections of the volume behind it (module notes)."""
        flat_spec = spec.reshape(-1)
        out = []
        for r in range(0, self.rotations.shape[0], self.chunk):
            flat, w = self._setup(r)
            vals = flat_spec.index_select(0, flat.reshape(-1)).view(flat.shape)
            out.append((vals * w).sum(-1))
        return torch.cat(out, 0)

    def backproject(self, coeffs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Adjoint of :meth:`slice`: (J, M) real or complex coefficients -> (P, P, P).

        Accumulates into ``out`` (contiguous (P, P, P) of ``coeffs``'s dtype) when given, and
        returns it.
        """
        if out is None:
            out = torch.zeros(self.P**3, dtype=coeffs.dtype, device=coeffs.device)
        flat_out = out.view(-1)
        for r in range(0, self.rotations.shape[0], self.chunk):
            flat, w = self._setup(r)
            c = coeffs[r : r + self.chunk]
            vals = (c[..., None] * w.to(c.real.dtype)).reshape(-1)
            flat_out.index_add_(0, flat.reshape(-1), vals)
        return flat_out.view(self.P, self.P, self.P)


def full_freqs_px(D: int, device=None) -> torch.Tensor:
    """All D x D integer frequency indices (kx, ky), row-major over a centred (D, D) spectrum."""
    k = torch.arange(D, device=device, dtype=torch.float32) - D // 2
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([kx.reshape(-1), ky.reshape(-1)], -1)


def project(
    volume: torch.Tensor,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor | None = None,
    oversample: int = 2,
    spectrum: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Real-space projections (line integrals) of ``volume`` at ``rotations``, shifted.

    ``shifts_px`` (N, 2) as (x, y) pixels is the paper's translation ``t`` (Eq. 1): it moves
    the projected particle by ``+t``, so the particle centre sits at ``D//2 + t``. RELION's
    origin offsets have the opposite sign: ``t = -rlnOriginX/Y`` (pinned against
    ``relion_project`` output in tests/test_slicing.py). Frequencies beyond the padded grid
    are dropped (as RELION's projector, which stops at D/2). ``spectrum``: the volume's
    padded spectrum, if already computed. Returns (N, D, D) float32.
    """
    D = volume.shape[-1]
    if spectrum is None:
        spectrum = spectrum_from_volume(volume, oversample)
    freqs = full_freqs_px(D, device=volume.device)
    out = []
    for s in range(0, rotations.shape[0], batch_size):
        R = rotations[s : s + batch_size]
        coeffs = SliceOperator(R, freqs, D, oversample, cache_bytes=0).slice(spectrum)
        if shifts_px is not None:
            coeffs = coeffs * phase_shift(freqs / D, shifts_px[s : s + batch_size].to(freqs))
        out.append(ifft2c(coeffs.reshape(-1, D, D)).real)
    return torch.cat(out, 0)
