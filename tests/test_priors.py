"""Tests for cryorecon.model.priors (paper Sec. 3.3, 4.6)."""

import math

import pytest
import torch

from cryorecon.model.priors import CARPrior, ExponentialPrior, UniformPrior, make_prior


@pytest.fixture
def V():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 8, 8, generator=g, dtype=torch.float32) * 2.0 - 0.3


PRIORS = [ExponentialPrior(lam=0.7), UniformPrior(), CARPrior(sigma_car=0.5)]


@pytest.mark.parametrize("prior", PRIORS, ids=lambda p: p.name)
def test_grad_matches_autograd(prior, V):
    V64 = V.double().requires_grad_(True)
    e = prior.neg_log_prior(V64)
    assert e.shape == ()
    if e.requires_grad:
        (g_auto,) = torch.autograd.grad(e, V64)
    else:  # constant energy (uniform prior): gradient zero
        g_auto = torch.zeros_like(V64)
    g = prior.grad(V64.detach())
    assert g.shape == V.shape and g.dtype == torch.float64
    torch.testing.assert_close(g, g_auto, atol=1e-12, rtol=1e-10)
    # float32 path keeps dtype
    assert prior.grad(V).dtype == torch.float32
    assert prior.neg_log_prior(V).dtype == torch.float32


def test_exponential_values(V):
    p = ExponentialPrior(lam=2.0)
    assert p.neg_log_prior(V).item() == pytest.approx(2.0 * V.sum().item(), rel=1e-6)
    assert torch.all(p.grad(V) == 2.0)
    assert ExponentialPrior(mean_density=4.0).lam == 0.25
    assert ExponentialPrior().lam == 1.0
    W = torch.full((4, 4, 4), 0.5)
    W[0] = -1.0  # negatives ignored by from_volume
    assert ExponentialPrior.from_volume(W).lam == pytest.approx(1.0 / (0.5 * 3 / 4))
    with pytest.raises(ValueError):
        ExponentialPrior(lam=1.0, mean_density=1.0)
    with pytest.raises(ValueError):
        ExponentialPrior(lam=-1.0)


def test_uniform(V):
    p = UniformPrior()
    assert p.neg_log_prior(V).item() == 0.0
    assert torch.all(p.grad(V) == 0)


def _dense_W(D):
    idx = torch.arange(D)
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    c = torch.stack([z.flatten(), y.flatten(), x.flatten()], 1)
    diff = (c[:, None, :] - c[None, :, :]).abs()
    return (diff.max(-1).values == 1).double()  # Chebyshev distance 1: 26-neighbourhood


def test_car_energy_matches_dense_formula():
    D, s = 5, 0.8
    g = torch.Generator().manual_seed(1)
    V = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    W = _dense_W(D)
    assert W.sum(1).max() == 26  # interior voxels have 26 neighbours
    v = V.flatten()
    Q = (torch.eye(D**3, dtype=torch.float64) - W / 26) / s**2
    p = CARPrior(s)
    assert p.neg_log_prior(V).item() == pytest.approx(0.5 * (v @ Q @ v).item(), rel=1e-12)
    torch.testing.assert_close(p.grad(V).flatten(), Q @ v)
    # proper prior: Q positive definite (zero-padding boundary)
    assert torch.linalg.eigvalsh(Q).min() > 0


def test_car_conditionals_are_paper_conditionals():
    # Gaussian with precision Q: V_i | rest ~ N(-sum_{j!=i} Q_ij V_j / Q_ii, 1/Q_ii).
    # The paper (Sec. 4.6): N(mean of the 26 neighbours, sigma_CAR^2).
    D, s = 5, 0.3
    p = CARPrior(s)
    n = D**3
    # Q from the (linear) gradient applied to unit vectors
    E = torch.eye(n, dtype=torch.float64).reshape(n, D, D, D)
    Q = torch.stack([p.grad(E[i]).flatten() for i in range(n)])
    torch.testing.assert_close(Q, Q.T)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(D, D, D, generator=g, dtype=torch.float64)
    v = V.flatten()
    i = (2 * D + 2) * D + 2  # centre voxel
    cond_mean = -(Q[i] @ v - Q[i, i] * v[i]) / Q[i, i]
    assert cond_mean.item() == pytest.approx(
        V[1:4, 1:4, 1:4].sum().item() / 26 - V[2, 2, 2].item() / 26, rel=1e-12
    )
    assert (1 / Q[i, i]).item() == pytest.approx(s**2)
    # boundary voxel: still the sum of (existing) neighbours / 26 (zero padding)
    cond_mean0 = -(Q[0] @ v - Q[0, 0] * v[0]) / Q[0, 0]
    assert cond_mean0.item() == pytest.approx(
        (V[:2, :2, :2].sum() - V[0, 0, 0]).item() / 26, rel=1e-12
    )


def test_car_smooth_volume_low_energy():
    p = CARPrior(1.0)
    const = torch.ones(8, 8, 8)
    # constant volume: interior gradient is 0 (only the zero-padded boundary pulls)
    assert p.grad(const)[1:-1, 1:-1, 1:-1].abs().max().item() < 1e-6
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(8, 8, 8, generator=g)
    assert p.neg_log_prior(noise) > p.neg_log_prior(const * noise.std())


def test_make_prior():
    assert isinstance(make_prior("exponential", lam=3.0), ExponentialPrior)
    assert make_prior("Exponential", mean_density=2.0).lam == 0.5
    assert make_prior("exponential", volume=torch.full((2, 2, 2), 0.25)).lam == pytest.approx(4.0)
    assert isinstance(make_prior("uniform"), UniformPrior)
    car = make_prior("car", sigma_car=0.1)
    assert isinstance(car, CARPrior) and car.sigma_car == 0.1
    assert {make_prior(n).name for n in ("exponential", "uniform", "car")} == {
        "exponential",
        "uniform",
        "car",
    }
    with pytest.raises(ValueError):
        make_prior("gaussian")
    with pytest.raises(ValueError):
        CARPrior(0.0)
    assert math.isfinite(make_prior("car").neg_log_prior(torch.ones(4, 4, 4)).item())
