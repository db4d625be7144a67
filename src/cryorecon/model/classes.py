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
per minibatch, not two.

Early on the posteriors are tempered, so that no class takes every particle before the maps
have differentiated (the failure cryoSPARC's class-similarity annealing avoids). With
``s = similarity`` (flat until ``anneal_start`` iterations, then falling linearly to 0 at
``anneal_end``) a minibatch's posteriors are

    r_ik = exp(beta L_ik + a_k) / sum_k' exp(beta L_ik' + a_k')

with ``L_ik = log p(I_i | V_k)`` (deterministic annealing of the mixture). ``beta`` in
(0, 1] is the largest inverse temperature at which the posteriors' mean entropy is still
``s log K`` (``s`` = 1: every class alike): a particle's class log-likelihoods differ by
tens of nats, so the Bayes posteriors are one-hot from the first visit. The offsets ``a_k``
balance the minibatch (Sinkhorn's scaling): its mean posterior is ``(1 - s) rbar + s / K``,
with ``rbar`` the minibatch's mean Bayes posterior ``softmax_k(L_ik + log pi_k)``, so every
class keeps at least ``s / K`` of the particles while ``s > 0`` (a class that fits every
particle a little better cannot empty the others) and the class fractions follow the data
(a 10% junk class can shrink to 10%; balancing to ``pi`` instead would keep every class at
exactly ``1 / K``, since ``pi`` is itself the mean of the balanced posteriors). At ``s = 0``
they are the Bayes posteriors ``r_ik ∝ pi_k p(I_i | V_k)``. The class priors ``pi_k`` are
the mean posterior over the training particles seen so far (floored at ``min_prior / K`` so
that an empty class can still take particles back).
"""

from __future__ import annotations

import numpy as np
import torch

# Sinkhorn's scaling of the class offsets and the bisection over beta (both cheap: B x K).
SINKHORN_ITERS = 200
BETA_BISECTIONS = 40
MIN_BETA = 1e-6


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def balanced_posteriors(logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``softmax_k(logits_ik + a_k)`` with the offsets ``a`` (K,) that make the mean over the
    rows equal ``target`` (K,), summing to 1 (Sinkhorn's scaling). Returns (posteriors (B, K),
    a)."""
    a = np.zeros(logits.shape[1])
    log_t = np.log(target)
    for _ in range(SINKHORN_ITERS):
        r = _softmax(logits + a)
        step = log_t - np.log(np.maximum(r.mean(0), 1e-300))
        a += step
        if np.abs(step).max() < 1e-10:
            break
    return _softmax(logits + a), a - a.mean()


def mean_entropy(r: np.ndarray) -> float:
    """Mean over the rows of the entropy of each row (nats)."""
    return float(-(r * np.log(np.maximum(r, 1e-300))).sum(1).mean())


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
        self.beta = 1.0  # the inverse temperature of the last training visit (metrics)

    def priors(self) -> np.ndarray:
        """(K,) class priors pi_k: the mean posterior of the seen particles, floored,
        summing to 1."""
        pi = self.post[self.seen].mean(0) if self.seen.any() else np.full(self.K, 1.0 / self.K)
        pi = np.maximum(pi, self.min_prior / self.K)
        return pi / pi.sum()

    def similarity(self, tau: int | None) -> float:
        """The tempering ``s`` at iteration ``tau`` (see the module docstring; None: 0)."""
        if tau is None or tau >= self.anneal_end:
            return 0.0
        if tau <= self.anneal_start:
            return self.similarity0
        return self.similarity0 * (self.anneal_end - tau) / (self.anneal_end - self.anneal_start)

    def weights(self, idx) -> np.ndarray:
        """(B, K) per-image weights of each class's gradient for the particles ``idx``: their
        posteriors from the previous visit (uniform before the first)."""
        return self.post[np.asarray(idx)]

    def log_marginal(self, loglik: np.ndarray) -> np.ndarray:
        """(B,) ``log sum_k pi_k p(I | V_k)`` from the (B, K) per-class log-likelihoods."""
        a = loglik + np.log(self.priors())[None, :]
        m = a.max(1, keepdims=True)
        return (m + np.log(np.exp(a - m).sum(1, keepdims=True)))[:, 0]

    def posteriors(self, loglik: np.ndarray, tau: int | None = None) -> tuple[np.ndarray, float]:
        """(B, K) class posteriors of a minibatch from its (B, K) log-likelihoods at iteration
        ``tau``, tempered and balanced while the similarity is above 0 (module docstring);
        returns them and ``beta``."""
        L = np.asarray(loglik, dtype=np.float64)
        L = L - L.max(1, keepdims=True)
        s = self.similarity(tau)
        pi = self.priors()
        if s <= 0 or self.K == 1:
            return _softmax(L + np.log(pi)[None, :]), 1.0
        target = (1.0 - s) * _softmax(L + np.log(pi)[None, :]).mean(0) + s / self.K
        want = s * np.log(self.K)
        r, _ = balanced_posteriors(L, target)
        if mean_entropy(r) >= want:
            return r, 1.0
        lo, hi = np.log(MIN_BETA), 0.0  # log beta; entropy falls as beta grows
        for _ in range(BETA_BISECTIONS):
            mid = 0.5 * (lo + hi)
            if mean_entropy(balanced_posteriors(np.exp(mid) * L, target)[0]) >= want:
                lo = mid
            else:
                hi = mid
        beta = float(np.exp(lo))
        return balanced_posteriors(beta * L, target)[0], beta

    def observe(
        self, idx, loglik: np.ndarray, tau: int | None = None, train: bool = True
    ) -> np.ndarray:
        """Store the posteriors (:meth:`posteriors`) of this visit of particles ``idx``;
        returns them (B, K). Held-out particles (``train`` False) are stored for their class
        assignment but do not enter the priors."""
        idx = np.asarray(idx)
        r, beta = self.posteriors(loglik, tau)
        self.post[idx] = r
        if train:
            self.seen[idx], self.beta = True, beta
        return r

    def assignment(self) -> np.ndarray:
        """(N,) 1-based class of largest posterior (RELION's rlnClassNumber)."""
        return self.post.argmax(1).astype(np.int64) + 1

    def state_dict(self) -> dict:
        return {
            "post": self.post,
            "seen": self.seen,
            "anneal": (self.anneal_start, self.anneal_end),
            "beta": self.beta,
        }

    def load_state_dict(self, s: dict) -> None:
        self.post, self.seen = np.asarray(s["post"]), np.asarray(s["seen"])
        if "anneal" in s:
            self.anneal_start, self.anneal_end = s["anneal"]
            self.beta = s["beta"]


def tie_to_mean(
    maps: list[torch.Tensor], weights, apix: float, resolution_A: float
) -> list[torch.Tensor]:
    """The class maps with their differences from their weighted mean ``Vbar = sum_k w_k V_k``
    (``weights`` (K,), summing to 1) low-passed to ``resolution_A`` Å:
    ``Vbar + lowpass(V_k - Vbar)`` (raised-cosine edge,
    :func:`cryorecon.gold_standard.lowpass`). The weighted mean is unchanged, and beyond the
    band every class carries the mean's coefficients.

    Why: a class refined from 1/K of the particles has 1/K of the data behind each
    coefficient, and its noise at the finer coefficients makes every particle fit best the
    class it has already trained, so the particles lock into the classes they were dealt at
    random. Structural differences such as a missing subunit or a junk class are large-scale
    and survive the low-pass (docs/results.md, "Several classes on a mixture").
    """
    from ..gold_standard import lowpass

    mean = sum(float(w) * V for w, V in zip(weights, maps))
    return [mean + lowpass(V - mean, apix, resolution_A) for V in maps]


def default_anneal(n_batches: int) -> tuple[int, int]:
    """Iterations ``(anneal_start, anneal_end)`` of the class-similarity annealing: flat for
    two epochs, to zero by the fourth (an epoch is one visit of every minibatch)."""
    return 2 * n_batches, 4 * n_batches


def to_tensor(w: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(w), dtype=torch.float32, device=device)


__all__ = [
    "ClassPosteriors",
    "balanced_posteriors",
    "default_anneal",
    "mean_entropy",
    "tie_to_mean",
]
