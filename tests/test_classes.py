"""Class posteriors and priors (:mod:`cryorecon.model.classes`) against brute-force sums."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_weights_anneal_from_tempered_to_posterior():
    cp = ClassPosteriors(2, 2, similarity=0.5, anneal_start=10, anneal_end=30)
    cp.post[:] = [[1.0, 0.0], [0.2, 0.8]]
    assert np.allclose(cp.weights([0, 1], 5), [[0.75, 0.25], [0.35, 0.65]])
    assert np.allclose(cp.weights([0], 20), [[0.875, 0.125]])
    assert np.allclose(cp.weights([0, 1], 30), cp.post)
    assert np.allclose(cp.weights([0, 1], 5).sum(1), 1)
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
