"""Marginal likelihood (Eq. 2-4): value against a direct sum, gradient against autograd."""

import math

import torch

from cryorecon.fourier.slicing import SliceOperator, spectrum_from_volume
from cryorecon.fourier.transforms import HalfPlane, phase_shift
from cryorecon.geometry.rotations import random_rotations
from cryorecon.model.likelihood import ImageBatch, neg_log_likelihood


def _problem(seed=0, D=10, B=5, J=7, L=3, device="cpu"):
    """A random problem (drawn on the CPU, so each device gets the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.rand(D, D, D, generator=g)
    hp = HalfPlane(D, radius=4.2)
    y = torch.complex(torch.randn(B, hp.M, generator=g), torch.randn(B, hp.M, generator=g)) * 3
    ctf = torch.rand(B, hp.M, generator=g) * 2 - 1
    sigma2 = torch.rand(B, generator=g) * 20 + 30
    R = random_rotations(J, generator=g).float()
    t = torch.randn(L, 2, generator=g) * 1.5
    lw_r = torch.log_softmax(torch.randn(J, generator=g, dtype=torch.float64), 0)
    lw_t = torch.log_softmax(torch.randn(L, generator=g, dtype=torch.float64), 0)
    batch = ImageBatch(*(x.to(device) for x in (y, ctf, sigma2, hp.weight, hp.freqs())))
    V, R, t, lw_r, lw_t = (x.to(device) for x in (V, R, t, lw_r, lw_t))
    return V, batch, R, t, lw_r, lw_t, hp


def _slices(V, R, hp):
    """(J, M) slices of V at rotations R on the half-plane hp."""
    freqs = hp.freqs().to(V.device) * hp.D
    return SliceOperator(R, freqs, hp.D).slice(spectrum_from_volume(V))


def _direct(V, batch, R, t, lw_r, lw_t, hp):
    """Eq. 4 written out term by term, differentiable by autograd."""
    S = _slices(V, R, hp)  # (J, M)
    s = phase_shift(batch.freqs[None], t)  # (L, M)
    mu = batch.ctf[:, None, None, :] * s[None, None, :, :] * S[None, :, None, :]  # (B, J, L, M)
    r2 = (batch.weight * (batch.y[:, None, None, :] - mu).abs() ** 2).sum(-1)
    ll = -r2 / (2 * batch.sigma2[:, None, None]) + lw_r[None, :, None] + lw_t[None, None, :]
    return -torch.logsumexp(ll.double().reshape(ll.shape[0], -1), -1).sum()


def test_value_matches_direct_sum(device):
    V, batch, R, t, lw_r, lw_t, hp = _problem(device=device)
    f, _, res = neg_log_likelihood(V, batch, R, t, lw_r, lw_t, want_grad=False)
    ref = _direct(V, batch, R, t, lw_r, lw_t, hp)
    assert math.isclose(f, float(ref), rel_tol=1e-5)


def test_gradient_matches_autograd(device):
    V, batch, R, t, lw_r, lw_t, hp = _problem(seed=1, device=device)
    _, grad, _ = neg_log_likelihood(V, batch, R, t, lw_r, lw_t, want_grad=True)
    Va = V.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(_direct(Va, batch, R, t, lw_r, lw_t, hp), Va)
    rel = (grad - ga).norm() / ga.norm()
    assert rel < 1e-4, float(rel)


def test_chunking_does_not_change_result(device):
    from cryorecon.model.likelihood import marginal_loglik

    V, batch, R, t, lw_r, lw_t, hp = _problem(seed=2, device=device)
    S = _slices(V, R, hp)
    a = marginal_loglik(S, batch, t, lw_r, lw_t, max_chunk_elems=10**9)
    b = marginal_loglik(S, batch, t, lw_r, lw_t, max_chunk_elems=1)
    assert torch.allclose(a.loglik, b.loglik)
    assert torch.allclose(a.grad_slices, b.grad_slices, rtol=1e-5, atol=1e-6)


def test_sampled_estimator_with_all_poses_equals_full_quadrature(device):
    """Eq. 13 with every pose given to every image (weights = quadrature weights) is Eq. 4."""
    from cryorecon.model.likelihood import marginal_loglik, sampled_loglik

    V, batch, R, t, lw_r, lw_t, hp = _problem(seed=3, device=device)
    S = _slices(V, R, hp)
    full = marginal_loglik(S, batch, t, lw_r, lw_t)
    B, J, L = batch.B, R.shape[0], t.shape[0]
    # Each image gets the rotations in a different order, padded with one unused slot.
    perm = torch.stack(
        [torch.randperm(J, generator=torch.Generator().manual_seed(i)) for i in range(B)]
    ).to(device)
    rot_idx = torch.cat([perm, torch.zeros(B, 1, dtype=torch.long, device=device)], 1)
    pad = torch.full((B, 1), -math.inf, dtype=torch.float64, device=device)
    rot_logw = torch.cat([lw_r[perm], pad], 1)
    sampled = sampled_loglik(
        S, batch, rot_idx, rot_logw, t.expand(B, L, 2), lw_t.expand(B, L), max_chunk_bytes=1
    )
    assert torch.allclose(sampled.loglik, full.loglik, rtol=1e-6)
    assert torch.allclose(sampled.grad_slices, full.grad_slices, rtol=1e-4, atol=1e-5)


def _direct_weighted(V, batch, R, t, lw_r, lw_t, hp, u):
    """-sum_i u_i log p(I_i | V), Eq. 4 term by term (autograd)."""
    S = _slices(V, R, hp)
    s = phase_shift(batch.freqs[None], t)
    mu = batch.ctf[:, None, None, :] * s[None, None, :, :] * S[None, :, None, :]
    r2 = (batch.weight * (batch.y[:, None, None, :] - mu).abs() ** 2).sum(-1)
    ll = -r2 / (2 * batch.sigma2[:, None, None]) + lw_r[None, :, None] + lw_t[None, None, :]
    return -(u.double() * torch.logsumexp(ll.double().reshape(ll.shape[0], -1), -1)).sum()


def test_image_weights_scale_value_and_gradient(device):
    """With per-image weights u (a class's responsibilities) both marginal_loglik and
    sampled_loglik give -sum u log p and its gradient (autograd on the direct sum)."""
    import dataclasses

    from cryorecon.model.likelihood import marginal_loglik, sampled_loglik, volume_objective

    V, batch, R, t, lw_r, lw_t, hp = _problem(seed=4, device=device)
    u = torch.tensor([0.0, 0.25, 1.0, 0.6, 0.05], device=device)
    wb = dataclasses.replace(batch, image_weight=u)
    Va = V.clone().requires_grad_(True)
    ref = _direct_weighted(Va, batch, R, t, lw_r, lw_t, hp, u)
    (g_ref,) = torch.autograd.grad(ref, Va)
    op = SliceOperator(R, hp.freqs().to(device) * hp.D, hp.D)
    B, L = batch.B, t.shape[0]
    rot_idx = torch.arange(R.shape[0], device=device).expand(B, -1)
    for evaluate in (
        lambda S: marginal_loglik(S, wb, t, lw_r, lw_t),
        lambda S: sampled_loglik(
            S, wb, rot_idx, lw_r.expand(B, -1), t.expand(B, L, 2), lw_t.expand(B, L)
        ),
    ):
        val, grad, _ = volume_objective(V, [(op, evaluate)], 2, True)
        assert math.isclose(val, float(ref.detach()), rel_tol=1e-5)
        assert float((grad - g_ref).norm() / g_ref.norm()) < 1e-4
    # and the rows of a weighted batch keep their weights
    assert torch.equal(wb.rows(torch.tensor([3, 1])).image_weight, u[[3, 1]])
