"""Class posteriors and priors (:mod:`cryorecon.model.classes`) against brute-force sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryorecon.model.classes import ClassPosteriors, default_anneal


def _brute_log_marginal(loglik, pi):
    return np.array(
        [
            np.log(sum(pi[k] * np.exp(loglik[i, k]) for k in range(len(pi))))
            for i in range(len(loglik))
        ]
    )


def test_log_marginal_and_posteriors_are_bayes():
    rng = np.random.default_rng(0)
    cp = ClassPosteriors(6, 3)
    cp.post[:] = rng.dirichlet(np.ones(3), size=6)
    cp.seen[:4] = True
    pi = cp.post[:4].mean(0)
    assert np.allclose(cp.priors(), pi / pi.sum())
    L = rng.normal(size=(5, 3)) * 3 - 50  # small enough for exp in float64
    assert np.allclose(cp.log_marginal(L), _brute_log_marginal(L, cp.priors()))
    idx = np.array([0, 2, 3, 4, 5])
    r = cp.observe(idx, L)
    brute = pi[None, :] / pi.sum() * np.exp(L)
    assert np.allclose(r, brute / brute.sum(1, keepdims=True))
    assert np.allclose(cp.post[idx], r) and cp.seen.all()
    assert np.array_equal(cp.assignment()[idx], r.argmax(1) + 1)
    # large log-likelihoods (thousands of nats) stay finite
    assert (
        np.isfinite(cp.log_marginal(L * 100)).all() and np.isfinite(cp.observe(idx, L * 100)).all()
    )


def test_tempered_posteriors_are_balanced_and_as_soft_as_the_similarity():
    """While s > 0: r = softmax(beta L + a) (rank-one structure: log r - beta L is a column
    term minus a row term), the minibatch's mean posterior is (1 - s) rbar + s / K (rbar: its
    mean Bayes posterior), and the mean entropy is s log K; at s = 0 the Bayes posteriors."""
    rng = np.random.default_rng(1)
    K, B = 3, 40
    cp = ClassPosteriors(B, K, similarity=0.5, anneal_start=10, anneal_end=30)
    cp.post[:] = rng.dirichlet(np.ones(K) * 2, size=B)
    cp.seen[:] = True
    pi = cp.priors()
    # class 0 fits every image 80 nats better, plus per-image differences of ~30 nats
    L = rng.normal(size=(B, K)) * 30 - 1000
    L[:, 0] += 80
    bayes = pi[None, :] * np.exp(L - L.max(1, keepdims=True))
    rbar = (bayes / bayes.sum(1, keepdims=True)).mean(0)
    for tau, s in ((5, 0.5), (20, 0.25)):
        assert cp.similarity(tau) == pytest.approx(s)
        r, beta = cp.posteriors(L, tau)
        assert 0 < beta < 1
        assert np.allclose(r.sum(1), 1)
        assert np.allclose(r.mean(0), (1 - s) * rbar + s / K, atol=1e-8)
        H = -(r * np.log(r)).sum(1).mean()
        assert H == pytest.approx(s * np.log(K), rel=1e-6)
        g = np.log(r) - beta * L
        a = g - g[:, :1]  # a_k - a_0, the same on every row
        assert np.allclose(a, a[:1], atol=1e-8)
    r, beta = cp.posteriors(L, 30)
    brute = pi[None, :] * np.exp(L - L.max(1, keepdims=True))
    assert beta == 1.0 and np.allclose(r, brute / brute.sum(1, keepdims=True))
    # the plain posteriors hand class 0 almost every image; the balanced ones leave every
    # class at least s / K of them
    assert (r.argmax(1) == 0).mean() > 0.9
    r5, _ = cp.posteriors(L, 5)
    assert r5[:, 0].mean() == pytest.approx(0.5 * rbar[0] + 0.5 / K)
    assert r5[:, 1:].mean(0).min() >= 0.5 / K - 1e-9


def test_weights_are_the_previous_visit_and_held_out_particles_leave_the_priors():
    cp = ClassPosteriors(4, 2, anneal_start=0, anneal_end=0)
    assert np.allclose(cp.weights([0, 1]), 0.5)
    r = cp.observe([0, 1], np.array([[0.0, -5.0], [-5.0, 0.0]]), tau=1)
    assert np.allclose(cp.weights([0, 1]), r) and cp.beta == 1.0
    pi = cp.priors()
    cp.observe([2, 3], np.array([[0.0, -9.0], [0.0, -9.0]]), tau=1, train=False)
    assert np.array_equal(cp.priors(), pi) and not cp.seen[2:].any()
    assert list(cp.assignment()) == [1, 2, 1, 1]
    assert default_anneal(50) == (100, 200)


def test_empty_class_keeps_a_floor_and_state_round_trips():
    cp = ClassPosteriors(4, 2, min_prior=0.01)
    cp.post[:] = [[1.0, 0.0]] * 4
    cp.seen[:] = True
    assert cp.priors()[1] == pytest.approx(0.005 / 1.005)
    other = ClassPosteriors(4, 2)
    other.load_state_dict(cp.state_dict())
    assert np.array_equal(other.post, cp.post) and np.array_equal(other.seen, cp.seen)
    with pytest.raises(ValueError):
        ClassPosteriors(3, 0)


def test_tied_class_maps_keep_their_mean_and_differ_only_inside_the_band():
    """tie_to_mean: the weighted mean is unchanged; the differences between the tied maps are
    those of the inputs inside the band (k <= kc - 1 Fourier pixels) and vanish beyond it
    (k >= kc + 1), checked on the centred 3D FFT."""
    from cryorecon.fourier.transforms import fft3c
    from cryorecon.model.classes import tie_to_mean

    g = torch.Generator().manual_seed(0)
    D, apix, res = 24, 5.0, 30.0
    maps = [torch.rand(D, D, D, generator=g, dtype=torch.float64) for _ in range(3)]
    w = np.array([0.5, 0.3, 0.2])
    tied = tie_to_mean(maps, w, apix, res)
    mean_in = sum(float(a) * V for a, V in zip(w, maps))
    mean_out = sum(float(a) * V for a, V in zip(w, tied))
    assert torch.allclose(mean_in, mean_out, atol=1e-12)
    k = torch.arange(D, dtype=torch.float64) - D // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    r = torch.sqrt(kx**2 + ky**2 + kz**2)
    kc = D * apix / res
    d_in, d_out = fft3c(maps[0] - maps[1]), fft3c(tied[0] - tied[1])
    inside, outside = r <= kc - 1, r >= kc + 1
    assert torch.allclose(d_out[inside], d_in[inside], atol=1e-9)
    assert d_out[outside].abs().max() < 1e-9 * d_in[outside].abs().max()
    assert d_in[outside].abs().max() > 1  # the inputs did differ there
    # beyond the band each tied map is the mean
    assert torch.allclose(fft3c(tied[2])[outside], fft3c(mean_in)[outside], atol=1e-9)
