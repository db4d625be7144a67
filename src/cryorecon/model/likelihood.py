"""Marginal likelihood of particle images and its gradient (paper Eq. 2-4, Appendix A).

For image ``i`` with Hermitian half-plane coefficients ``y_im`` inside the cut-off omega*
(``|k| < D apix omega*``), CTF ``c_im``, noise variance ``sigma_i^2`` (real space, which
equals the per-coefficient variance of the unitary FFT), the log-likelihood of pose
``(R_j, t_l)`` is the real-space Gaussian restricted to the band (Eq. 2, 30-31):

    l_ijl = -1/(2 sigma_i^2) sum_m w_m |y_im - c_im s_lm S_jm|^2

with ``S_jm`` the central slice of rotation ``j`` (:mod:`~cryorecon.fourier.slicing`),
``s_lm = exp(-2 pi i omega_m . t_l)`` and ``w_m`` = 2 for a coefficient standing for a
conjugate pair, 1 for DC. (The paper writes CN(mu, 2 sigma^2) over the full plane; summing
each independent coefficient once with weight ``w`` is the same real-space Gaussian, so it
uses each coefficient once as DESIGN.md asks.) Constants in ``S`` are dropped.

Expanding the square, ``l_ijl = -(|y_i|^2_w - 2 Re X_{il,j} + Q_ij) / (2 sigma_i^2)`` where
``X = A S^T`` with ``A_{il,m} = w_m c_im conj(y_im) s_lm`` ((images x shifts) x coefficients)
and ``Q = (w c^2) |S|^2^T`` (images x rotations): two GEMMs per chunk of images, written
here as one real GEMM on stacked real/imaginary parts.

The marginal (Eq. 4) is ``log p_i = logsumexp_{j,l}(l_ijl + log w_j + log w_l)`` (weights
include the uniform p(R) and the Gaussian p(t), each summing to 1). Its gradient with
respect to the slices, ``G = 2 d(-sum_i log p_i)/d conj(S)``, is

    G_jm = sum_i (w_m / sigma_i^2) [ c_im^2 gamma_ij. S_jm - c_im y_im sum_l gamma_ijl conj(s_lm) ]

with ``gamma`` the pose posterior; the gradient with respect to the real density is the
adjoint of slicing applied to ``G`` (back-projection, then the inverse FFT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..fourier.transforms import phase_shift


@dataclass
class ImageBatch:
    """A minibatch in the Fourier domain, restricted to the half-plane inside omega*.

    y: (B, M) complex64 image coefficients; ctf: (B, M) float32; sigma2: (B,) float32 noise
    variance; weight: (M,) float32 (2 or 1); freqs: (M, 2) frequencies in cycles/pixel.
    image_weight: (B,) float32 or None: each image's share of the value and the gradient,
    ``-sum_i u_i log p(I_i)`` (a class's posterior responsibility, :mod:`cryorecon.model.classes`);
    None means 1 for every image.
    """

    y: torch.Tensor
    ctf: torch.Tensor
    sigma2: torch.Tensor
    weight: torch.Tensor
    freqs: torch.Tensor
    image_weight: torch.Tensor | None = None

    @property
    def B(self) -> int:
        return self.y.shape[0]

    def rows(self, r: torch.Tensor) -> ImageBatch:
        """The images ``r`` (index tensor) of this batch."""
        r = r.to(self.y.device)
        iw = None if self.image_weight is None else self.image_weight[r]
        return ImageBatch(self.y[r], self.ctf[r], self.sigma2[r], self.weight, self.freqs, iw)


@dataclass
class LikelihoodResult:
    """Per-image log marginal likelihood (float64, (B,)), slice gradient and pose summaries.

    grad_slices: (J, M) complex, ``2 d(-sum log p)/d conj(S)`` or None.
    best_rot, best_shift: (B,) the most probable rotation and shift (argmax of each
    posterior marginal). max_prob: (B,) the largest posterior probability of one pose
    (rotation and shift), RELION's ``rlnMaxValueProbDistribution``.
    post_rot: (B, J) posterior marginal over rotations, post_shift: (B, L) over shifts
    (float32; present when ``want_posteriors``).
    """

    loglik: torch.Tensor
    grad_slices: torch.Tensor | None
    best_rot: torch.Tensor
    best_shift: torch.Tensor
    post_rot: torch.Tensor | None = None
    post_shift: torch.Tensor | None = None
    max_prob: torch.Tensor | None = None
    value_weight: torch.Tensor | None = None  # the batch's image_weight (B,), or None


def _as_real(z: torch.Tensor) -> torch.Tensor:
    """Complex (..., M) -> real (..., 2M) as [Re, Im]."""
    return torch.cat([z.real, z.imag], dim=-1)


def _real_slices(slices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, M) complex slices -> ([Re, Im] (U, 2M), |S|^2 (U, M))."""
    return _as_real(slices), slices.real**2 + slices.imag**2


def marginal_loglik(
    slices: torch.Tensor,
    batch: ImageBatch,
    shifts_px: torch.Tensor,
    log_w_rot: torch.Tensor,
    log_w_shift: torch.Tensor,
    want_grad: bool = True,
    want_posteriors: bool = False,
    max_chunk_elems: int = 2**24,
) -> LikelihoodResult:
    """Log marginal likelihood (Eq. 4) of a batch and its gradient w.r.t. the slices.

    Args:
        slices: (J, M) complex slices ``S`` at the quadrature rotations.
        batch: the images (see :class:`ImageBatch`).
        shifts_px: (L, 2) quadrature shifts ``t_l`` in pixels (x, y).
        log_w_rot: (J,) log quadrature weight times p(R) per rotation, or (B, J) per image.
        log_w_shift: (L,) log quadrature weight times p(t) per shift, or (B, L) per image.
        max_chunk_elems: bound on images x shifts x rotations held at once (memory).

    Per-image weights (``-inf`` for poses an image does not use) make this the properly
    weighted estimator of Eq. 13 evaluated with the shared GEMM (:func:`sampled_loglik_shared`).
    """
    J, M = slices.shape
    L = shifts_px.shape[0]
    B = batch.B
    dev = slices.device
    w = batch.weight.to(dev)
    s = phase_shift(batch.freqs.to(dev)[None], shifts_px.to(dev, torch.float32))  # (L, M)
    # Columns of the augmented GEMM: [Re S, Im S, log w_rot, 1] (see the loop).
    per_image = log_w_rot.dim() == 2
    shared_w_rot = torch.zeros(J, device=dev) if per_image else log_w_rot
    S_aug = torch.cat(
        [
            _as_real(slices),
            shared_w_rot.to(dev, slices.real.dtype)[:, None],
            torch.ones(J, 1, device=dev, dtype=slices.real.dtype),
        ],
        -1,
    ).T.contiguous()  # (2M+2, J)
    S_abs2 = (slices.real**2 + slices.imag**2).T.contiguous()  # (M, J)
    lw_shift = log_w_shift.to(dev, torch.float32)
    chunk = max(1, int(max_chunk_elems // max(1, L * J)))
    loglik = torch.empty(B, dtype=torch.float64, device=dev)
    best_rot = torch.empty(B, dtype=torch.long, device=dev)
    best_shift = torch.empty(B, dtype=torch.long, device=dev)
    grad = torch.zeros(J, M, dtype=slices.dtype, device=dev) if want_grad else None
    post_rot = torch.empty(B, J, device=dev) if want_posteriors else None
    post_shift = torch.empty(B, L, device=dev) if want_posteriors else None
    max_prob = torch.empty(B, device=dev)
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        y, c, sig2 = batch.y[b0:b1], batch.ctf[b0:b1], batch.sigma2[b0:b1].to(torch.float32)
        n = b1 - b0
        wc = w * c  # (n, M)
        A = (wc * y.conj())[:, None, :] * s[None]  # (n, L, M)
        # l_ijl = (2 Re X - Q - |y|^2) / (2 sigma^2) + log w_j + log w_l. One GEMM with rows
        # [A / sigma^2 (as Re, -Im), 1, log w_l - |y|^2 / (2 sigma^2)] gives all but the Q term,
        # Q_ij = sum_m w c^2 |S_jm|^2, a small (images x rotations) GEMM subtracted after.
        inv2s = (0.5 / sig2)[:, None, None]
        yy = (w * (y.real**2 + y.imag**2)).sum(-1)  # (n,)
        lws = lw_shift[b0:b1] if lw_shift.dim() == 2 else lw_shift[None, :]
        rows = torch.cat(
            [
                torch.cat([A.real, -A.imag], dim=-1) * (2 * inv2s),
                torch.ones(n, L, 1, device=dev),
                (lws - yy[:, None] * inv2s[:, :, 0])[:, :, None],
            ],
            -1,
        ).reshape(n * L, 2 * M + 2)
        ll = (rows @ S_aug).view(n, L, J)
        Q = ((wc * c) @ S_abs2) * inv2s[:, :, 0]
        if per_image:
            Q = Q - log_w_rot[b0:b1].to(dev, Q.dtype)
        ll.sub_(Q[:, None, :])
        # log-sum-exp: max in float32, exp in place, sums over shifts in float32 (<= ~10^3
        # terms of at most 1) and over rotations in float64. Terms below e^-80 (relative to
        # the largest) are clamped there first: exp is several times slower in its underflow
        # range, and such terms change the sum by less than 1e-30 relative.
        m = ll.amax(dim=(1, 2))
        e = ll.sub_(m[:, None, None]).clamp_(min=-80.0).exp_()
        per_rot = e.sum(1)  # (n, J)
        total = per_rot.double().sum(-1)
        loglik[b0:b1] = m.double() + torch.log(total)
        inv_total = (1.0 / total).float()
        # The posterior over (shift, rotation) is gamma = e * inv_total; e is left unnormalised
        # (one pass less over the (n, L, J) block): the normalisation goes on the small factors.
        # Its largest entry is e = exp(0) = 1, so the largest pose probability is inv_total.
        g_rot = per_rot.mul_(inv_total[:, None])  # (n, J)
        g_shift = e.sum(2).mul_(inv_total[:, None])  # (n, L)
        best_rot[b0:b1], best_shift[b0:b1] = g_rot.argmax(-1), g_shift.argmax(-1)
        max_prob[b0:b1] = inv_total
        if want_posteriors:
            post_rot[b0:b1] = g_rot
            post_shift[b0:b1] = g_shift
        if want_grad:
            winv = w[None, :] / sig2[:, None]  # (n, M)
            if batch.image_weight is not None:
                winv = winv * batch.image_weight[b0:b1, None].to(dev, winv.dtype)
            # sum_{i,l} gamma_ijl conj(s_lm) c y w / sigma^2  -> (J, M)
            Z = (winv * c * y * inv_total[:, None])[:, None, :] * s.conj()[None]  # (n, L, M)
            Zr = _as_real(Z).reshape(n * L, 2 * M)
            GZ = e.reshape(n * L, J).T @ Zr  # (J, 2M)
            term1 = torch.complex(GZ[:, :M], GZ[:, M:])
            term2 = (g_rot.T @ (winv * c * c)) * slices  # (J, M)
            grad += term2 - term1
    return LikelihoodResult(
        loglik, grad, best_rot, best_shift, post_rot, post_shift, max_prob, batch.image_weight
    )


def neg_log_likelihood(
    volume: torch.Tensor,
    batch: ImageBatch,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    log_w_rot: torch.Tensor,
    log_w_shift: torch.Tensor,
    oversample: int = 2,
    want_grad: bool = True,
    want_posteriors: bool = False,
    slice_op=None,
    spectrum: torch.Tensor | None = None,
):
    """``-sum_i log p(I_i | V)`` for a minibatch and its gradient w.r.t. the real density.

    Returns ``(value (float), grad (D, D, D) float32 or None, LikelihoodResult)``. The
    gradient is the posterior-weighted back-projection (adjoint of slicing) of the slice
    gradient followed by the adjoint of premultiply/pad/FFT (Appendix A: the inverse FFT of
    the gradient w.r.t. the spectrum). ``slice_op`` (a
    :class:`~cryorecon.fourier.slicing.SliceOperator` for ``rotations`` and the batch's
    frequencies) and ``spectrum`` (the volume's padded spectrum) may be passed to reuse work.
    """
    from ..fourier.slicing import SliceOperator

    D = volume.shape[-1]
    if slice_op is None:
        slice_op = SliceOperator(rotations, batch.freqs.to(volume.device) * D, D, oversample)
    return _volume_objective(
        volume,
        slice_op,
        oversample,
        want_grad,
        spectrum,
        lambda slices: marginal_loglik(
            slices, batch, shifts_px, log_w_rot, log_w_shift, want_grad, want_posteriors
        ),
    )


def _volume_objective(volume, slice_op, oversample, want_grad, spectrum, evaluate):
    """One-part :func:`volume_objective`: returns ``(-sum log p, grad or None, result)``."""
    val, grad, results = volume_objective(
        volume, [(slice_op, evaluate)], oversample, want_grad, spectrum
    )
    return val, grad, results[0]


def volume_objective(volume, parts, oversample, want_grad, spectrum=None):
    """Slice the volume once per part, ``evaluate`` the likelihood on the slices, and turn
    the summed slice gradients into the density gradient (back-projection, then the adjoint
    of premultiply/pad/FFT).

    ``parts``: ``[(slice_op, evaluate)]`` with ``evaluate(slices)`` returning a result with
    ``loglik`` (per image), ``grad_slices`` (2 d(-sum u log p)/d conj(S), or None) and
    optionally ``value_weight`` (the images' weights u, :class:`ImageBatch`). The parts share
    the spectrum and one inverse transform. Returns ``(-sum u log p over all parts, grad or
    None, [result per part])``.
    """
    from ..fourier.slicing import spectrum_adjoint_to_volume, spectrum_from_volume

    if spectrum is None:
        spectrum = spectrum_from_volume(volume, oversample)
    value, grad_spec, results = 0.0, None, []
    for slice_op, evaluate in parts:
        res = evaluate(slice_op.slice(spectrum))
        uw = getattr(res, "value_weight", None)
        value -= float(res.loglik.sum() if uw is None else (res.loglik * uw.to(res.loglik)).sum())
        if want_grad:
            g = slice_op.backproject(res.grad_slices)
            grad_spec = g if grad_spec is None else grad_spec.add_(g)
            res.grad_slices = None
        results.append(res)
    grad = spectrum_adjoint_to_volume(grad_spec, volume.shape[-1]) if want_grad else None
    return value, grad, results


@dataclass
class SampledResult:
    """Result of :func:`sampled_loglik`: per-image log p (B,), gradient on the union slices
    (U, M) or None, and per-image posteriors over the image's own rotations (B, R) and
    shifts (B, Lt) (padded entries are 0)."""

    loglik: torch.Tensor
    grad_slices: torch.Tensor | None
    post_rot: torch.Tensor
    post_shift: torch.Tensor
    max_prob: torch.Tensor | None = None
    value_weight: torch.Tensor | None = None


def sampled_loglik(
    slices: torch.Tensor,
    batch: ImageBatch,
    rot_idx: torch.Tensor,
    rot_logw: torch.Tensor,
    shifts_px: torch.Tensor,
    shift_logw: torch.Tensor,
    want_grad: bool = True,
    max_chunk_bytes: int = 2**28,
    grad_out: torch.Tensor | None = None,
    real_slices: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> SampledResult:
    """Eq. 13: the likelihood as a weighted sum over each image's own set of poses.

    Each image ``i`` is evaluated at rotations ``rot_idx[i]`` (indices into ``slices``, the
    union of all images' rotations, (U, M)) and shifts ``shifts_px[i]`` ((Lt, 2) pixels);
    the pose weight is ``exp(rot_logw[i, r] + shift_logw[i, l])``, which carries the
    quadrature weight, the prior and the importance correction ``count / (N q)`` (padding:
    ``-inf``). Same likelihood terms as :func:`marginal_loglik`; the cross terms are batched
    matrix products per image.

    ``grad_out``: an optional real (U, 2M) buffer ([Re, Im] of the slice gradient) to which
    this call adds its gradient; the result's ``grad_slices`` is then None (groups sharing one
    union accumulate into one buffer and convert it to complex once). ``real_slices``: the
    slices' ``([Re, Im] (U, 2M), |S|^2 (U, M))`` when already computed.
    """
    U, M = slices.shape
    B, R = rot_idx.shape
    Lt = shifts_px.shape[1]
    dev = slices.device
    w = batch.weight.to(dev)
    per_image = R * M * 4 * 2 * 3 + Lt * R * 4 * 2 + Lt * M * 4 * 2 * 3
    chunk = max(1, int(max_chunk_bytes // max(1, per_image)))
    loglik = torch.empty(B, dtype=torch.float64, device=dev)
    post_rot = torch.zeros(B, R, device=dev)
    post_shift = torch.zeros(B, Lt, device=dev)
    max_prob = torch.zeros(B, device=dev)
    # Everything in real arithmetic on [Re, Im] stacks: one gather of (n, R, 2M) per chunk.
    S_r, S_abs2 = real_slices if real_slices is not None else _real_slices(slices)
    grad_r = None
    if want_grad:
        grad_r = (
            grad_out if grad_out is not None else torch.zeros(U, 2 * M, dtype=S_r.dtype, device=dev)
        )
    freqs = batch.freqs.to(dev)
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        y, c = batch.y[b0:b1], batch.ctf[b0:b1]
        sig2 = batch.sigma2[b0:b1].to(torch.float32)
        ri = rot_idx[b0:b1]
        inv2s = (0.5 / sig2)[:, None, None]
        s = phase_shift(freqs[None, None], shifts_px[b0:b1].to(torch.float32))  # (n, Lt, M)
        wc = w * c
        A = (wc * y.conj())[:, None, :] * s
        S = S_r[ri]  # (n, R, 2M)
        # Q_ir = sum_m w c^2 |S_rm|^2: per union rotation when the images share most of them.
        if U <= 4 * R:
            Q = torch.gather((wc * c) @ S_abs2.T, 1, ri)  # (n, R)
        else:
            Q = torch.bmm(S_abs2[ri], (wc * c)[:, :, None]).squeeze(-1)
        yy = (w * (y.real**2 + y.imag**2)).sum(-1)
        ll = torch.bmm(
            torch.cat([A.real, -A.imag], -1) * (2 * inv2s), S.transpose(1, 2)
        )  # (n, Lt, R)
        ll.add_((rot_logw[b0:b1].to(ll.dtype) - Q * inv2s[:, :, 0])[:, None, :])
        ll.add_((shift_logw[b0:b1].to(ll.dtype) - yy[:, None] * inv2s[:, :, 0])[:, :, None])
        m = ll.amax(dim=(1, 2))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = ll.sub_(m[:, None, None]).exp_()  # padding (-inf) -> 0
        total = e.sum(1).double().sum(-1)
        loglik[b0:b1] = m.double() + torch.log(total)
        gamma = e.mul_((1.0 / total).float()[:, None, None])  # (n, Lt, R)
        g_rot = gamma.sum(1)
        post_rot[b0:b1] = g_rot
        post_shift[b0:b1] = gamma.sum(2)
        max_prob[b0:b1] = gamma.amax(dim=(1, 2))
        if want_grad:
            winv = w[None, :] / sig2[:, None]
            if batch.image_weight is not None:
                winv = winv * batch.image_weight[b0:b1, None].to(dev, winv.dtype)
            Z = (winv * c * y)[:, None, :] * s.conj()  # (n, Lt, M)
            G = torch.bmm(
                gamma.transpose(1, 2), torch.cat([Z.real, Z.imag], -1)
            ).neg_()  # (n, R, 2M)
            wcc = (winv * c * c).repeat(1, 2)  # (n, 2M)
            G.addcmul_(g_rot[:, :, None] * wcc[:, None, :], S)
            grad_r.index_add_(0, ri.reshape(-1), G.reshape(-1, 2 * M))
    grad = torch.complex(grad_r[:, :M], grad_r[:, M:]) if want_grad and grad_out is None else None
    return SampledResult(loglik, grad, post_rot, post_shift, max_prob, batch.image_weight)


@dataclass
class GroupedResult:
    """:func:`sampled_loglik` over several groups of images sharing one set of slices:
    ``loglik`` concatenated in group order, ``grad_slices`` summed, ``groups`` per group."""

    loglik: torch.Tensor
    grad_slices: torch.Tensor | None
    groups: list[SampledResult]

    @property
    def value_weight(self) -> torch.Tensor | None:
        return _joined_weights(self.groups)


@dataclass
class CombinedResult:
    """Several likelihood results evaluated on one set of slices: ``loglik`` concatenated,
    ``grad_slices`` summed on that set, ``parts`` the individual results."""

    loglik: torch.Tensor
    grad_slices: torch.Tensor | None
    parts: list

    @property
    def value_weight(self) -> torch.Tensor | None:
        return _joined_weights(self.parts)


def _joined_weights(results) -> torch.Tensor | None:
    """The results' ``value_weight`` concatenated like their ``loglik`` (None if none has one)."""
    ws = [r.value_weight for r in results]
    if all(w is None for w in ws):
        return None
    return torch.cat(
        [
            torch.ones_like(r.loglik, dtype=torch.float32) if w is None else w.to(r.loglik.device)
            for r, w in zip(results, ws)
        ]
    )


# Measured cost of one (image, pose) in sampled_loglik's per-image products relative to the
# shared GEMM of marginal_loglik (box 64, 20 Å, 100 images: 3.6-6.0x with and without the
# gradient; the gathers and scatters of per-image slice sets are memory-bound).
PER_IMAGE_COST = 5.0


def sampled_loglik_shared(
    slices: torch.Tensor,
    batch: ImageBatch,
    rot_idx: torch.Tensor,
    rot_logw: torch.Tensor,
    shift_idx: torch.Tensor,
    shift_logw: torch.Tensor,
    grid_shifts_px: torch.Tensor,
    want_grad: bool = True,
    grad_out: torch.Tensor | None = None,
) -> SampledResult:
    """Eq. 13 exactly as :func:`sampled_loglik`, evaluated by the shared GEMM of
    :func:`marginal_loglik`: every image against every rotation in ``slices`` (the union,
    (U, M)) and every grid shift (``grid_shifts_px``, (L, 2)), each image with its own log
    weights, ``-inf`` outside its sets. ``shift_idx`` (B, Lt) indexes the grid shifts.
    Cheaper than per-image products when the images' sets cover much of the union (cost
    B L U against about ``PER_IMAGE_COST`` B R Lt). Posteriors come back in the plan's layout
    (B, R) and (B, Lt), zero on padding; ``grad_out`` as in :func:`sampled_loglik`.
    """
    U, M = slices.shape
    B = rot_idx.shape[0]
    dev = slices.device
    L = grid_shifts_px.shape[0]
    lw_rot = torch.full((B, U), -math.inf, dtype=torch.float64, device=dev).scatter_reduce(
        1, rot_idx, rot_logw.double(), reduce="amax"
    )
    lw_t = torch.full((B, L), -math.inf, dtype=torch.float64, device=dev).scatter_reduce(
        1, shift_idx, shift_logw.double(), reduce="amax"
    )
    res = marginal_loglik(
        slices, batch, grid_shifts_px, lw_rot.float(), lw_t.float(), want_grad, True
    )
    post_rot = torch.gather(res.post_rot, 1, rot_idx) * torch.isfinite(rot_logw)
    post_shift = torch.gather(res.post_shift, 1, shift_idx) * torch.isfinite(shift_logw)
    grad = res.grad_slices
    if want_grad and grad_out is not None:
        grad_out.add_(_as_real(grad))
        grad = None
    return SampledResult(res.loglik, grad, post_rot, post_shift, res.max_prob, batch.image_weight)


def sampled_loglik_groups(
    slices: torch.Tensor,
    batch: ImageBatch,
    groups,
    want_grad: bool = True,
    grid_shifts_px: torch.Tensor | None = None,
) -> GroupedResult:
    """Eq. 13 for groups of images (each with ``rows``, ``rot_idx``, ``rot_logw``,
    ``shifts``, ``shift_logw``, ``idx_t``: see :class:`~cryorecon.model.importance.Plan`)
    whose ``rot_idx`` index the shared ``slices``. Groups bound the padding of per-image sets.
    With ``grid_shifts_px`` (the quadrature's shifts), each group takes the cheaper of the
    per-image products (:func:`sampled_loglik`) and the shared GEMM over the union
    (:func:`sampled_loglik_shared`); both compute the same estimate."""
    dev = slices.device
    U, M = slices.shape
    grad_r = torch.zeros(U, 2 * M, dtype=slices.real.dtype, device=dev) if want_grad else None
    real = None
    res = []
    for g in groups:
        R, Lt = g.rot_idx.shape[1], g.shift_logw.shape[1]
        if grid_shifts_px is not None and grid_shifts_px.shape[0] * U < PER_IMAGE_COST * R * Lt:
            res.append(
                sampled_loglik_shared(
                    slices,
                    batch.rows(g.rows),
                    g.rot_idx.to(dev),
                    g.rot_logw.to(dev),
                    g.idx_t.to(dev),
                    g.shift_logw.to(dev),
                    grid_shifts_px,
                    want_grad,
                    grad_out=grad_r,
                )
            )
            continue
        real = real if real is not None else _real_slices(slices)
        res.append(
            sampled_loglik(
                slices,
                batch.rows(g.rows),
                g.rot_idx.to(dev),
                g.rot_logw.to(dev),
                g.shifts.to(dev, torch.float32),
                g.shift_logw.to(dev),
                want_grad,
                grad_out=grad_r,
                real_slices=real,
            )
        )
    grad = torch.complex(grad_r[:, :M], grad_r[:, M:]) if want_grad else None
    return GroupedResult(torch.cat([r.loglik for r in res]), grad, res)
