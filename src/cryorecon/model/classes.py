"""Several classes at once: each particle's posterior over K maps (paper Eq. 3 with a class
index) and the class priors.

The marginal likelihood of an image under K classes is
``p(I_i) = sum_k pi_k p(I_i | V_k)`` with ``p(I_i | V_k)`` Eq. 4 (marginalised over pose
and shift); its negative log is minimised over all maps together. The gradient with respect
to ``V_k`` is that of ``-sum_i r_ik log p(I_i | V_k)``, with ``r_ik`` the class posterior
(responsibility) of particle i, so each class's SAGD step (Algorithm 1) sees its
minibatch with per-image weights ``r_ik``
(:attr:`cryorecon.model.likelihood.ImageBatch.image_weight`).

As the paper's importance sampling does for poses, the weights of a visit are the particle's
class posteriors from its previous visit (uniform on the first): one pass over the K maps
per minibatch, not two. Early on they are tempered towards uniform, as cryoSPARC's class
similarity annealing does, so that no class takes every particle before the maps have
differentiated: ``u_ik = (1 - s) r_ik + s / K`` with ``s = similarity`` until
``anneal_start`` iterations, then falling linearly to 0 at ``anneal_end``. The class priors
``pi_k`` are the mean posterior over the particles seen so far (floored at
``min_prior / K`` so that an empty class can still take particles back).
"""

from __future__ import annotations

import numpy as np
import torch


class ClassPosteriors:
    """Per-particle class posteriors ``r`` (N, K) and the class priors derived from them."""

    def __init__(
        self,
        n: int,
        K: int,
        similarity: float = 0.5,
        anneal_start: int = 100,
        anneal_end: int = 300,
        min_prior: float = 0.01,
    ):
        if K < 1:
            raise ValueError("K >= 1")
        self.K = K
        self.post = np.full((n, K), 1.0 / K)
        self.seen = np.zeros(n, dtype=bool)
        self.similarity0, self.anneal_start, self.anneal_end = similarity, anneal_start, anneal_end
        self.min_prior = min_prior

    def priors(self) -> np.ndarray:
        """(K,) class priors pi_k: the mean posterior of the seen particles, floored,
        summing to 1."""
        pi = self.post[self.seen].mean(0) if self.seen.any() else np.full(self.K, 1.0 / self.K)
        pi = np.maximum(pi, self.min_prior / self.K)
        return pi / pi.sum()

    def similarity(self, tau: int) -> float:
        """The tempering towards uniform ``s`` at iteration ``tau`` (see the module docstring)."""
        if tau <= self.anneal_start:
            return self.similarity0
        if tau >= self.anneal_end:
            return 0.0
        return self.similarity0 * (self.anneal_end - tau) / (self.anneal_end - self.anneal_start)

    def weights(self, idx, tau: int) -> np.ndarray:
        """(B, K) per-image weights ``u`` of each class's gradient for the particles ``idx``."""
        s = self.similarity(tau)
        return (1.0 - s) * self.post[np.asarray(idx)] + s / self.K

    def log_marginal(self, loglik: np.ndarray) -> np.ndarray:
        """(B,) ``log sum_k pi_k p(I | V_k)`` from the (B, K) per-class log-likelihoods."""
        a = loglik + np.log(self.priors())[None, :]
        m = a.max(1, keepdims=True)
        return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]

    def observe(self, idx, loglik: np.ndarray) -> np.ndarray:
        """Store the posteriors ``r_ik ∝ pi_k p(I_i | V_k)`` of this visit; returns them (B, K)."""
        idx = np.asarray(idx)
        a = loglik + np.log(self.priors())[None, :]
        r = np.exp(a - a.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        self.post[idx], self.seen[idx] = r, True
        return r

    def assignment(self) -> np.ndarray:
        """(N,) 1-based class of largest posterior (RELION's rlnClassNumber)."""
        return self.post.argmax(1).astype(np.int64) + 1

    def state_dict(self) -> dict:
        return {"post": self.post, "seen": self.seen}

    def load_state_dict(self, s: dict) -> None:
        self.post, self.seen = np.asarray(s["post"]), np.asarray(s["seen"])


def default_anneal(n_batches: int) -> tuple[int, int]:
    """Iterations ``(anneal_start, anneal_end)`` of the class-similarity annealing: flat for
    two epochs, to zero by the fourth (an epoch is one visit of every minibatch)."""
    return 2 * n_batches, 4 * n_batches


def to_tensor(w: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(w), dtype=torch.float32, device=device)


__all__ = ["ClassPosteriors", "default_anneal"]
