"""Stochastic average gradient descent with a Lipschitz line search (paper Sec. 3.3.1-3.3.2,
Algorithm 1; Schmidt, Le Roux & Bach [27]).

The objective is ``f(V) = sum_k f_k(V)`` over K fixed minibatches, with
``f_k(V) = -sum_{i in k} log p(I_i | V) - (1/K) log p(V)`` (Eq. 7). The optimiser keeps the
most recent likelihood gradient of every minibatch, ``dV_k``, and their running sum ``g_bar``
(Eq. 9 and the update below it).

Ambiguity resolved here (noted in the issue): Eq. 8 writes the step as ``(eps/L) sum_k``. With
``L`` the Lipschitz constant of a *single* minibatch objective (which is what the line search
measures), SAG's update uses the *average* of the stored gradients; taking the raw sum would
be K times too long a step. We follow [27]: the step is
``V <- V - (eps/L) (g_bar / m + grad(-log p(V)) / K)`` with ``m`` the number of minibatches
visited so far (SAG's recommended start, m -> K after the first epoch). The prior gradient is
evaluated at the current V every step, as in Algorithm 1. Positivity: negative voxels are
truncated to zero after each step.

Line search (every ``line_search_every`` iterations, on the current minibatch): while
``f_k(V) - f_k(V - dV_k/L) < |dV_k|^2 / (2L)`` double L; if the condition held at once,
``L <- 2^(-1/150) L``. Between line searches L is also decreased by ``2^(-1/150)`` per
iteration ([27]: "L is gradually decreased to take larger steps"). The initial L comes from a
bisection search between the largest L found to fail and the smallest found to satisfy.

Memory: the stored gradients are one float32 volume per minibatch (at 50,000 particles,
minibatch 200, box 128: 250 x 8 MiB = 2 GiB), allocated lazily as minibatches are visited.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class SAGD:
    """State of Algorithm 1: stored minibatch gradients, their sum, L and counters."""

    def __init__(
        self,
        n_batches: int,
        shape,
        device="cpu",
        L: float | None = None,
        line_search_every: int = 20,
        decay: float = 2.0 ** (-1.0 / 150.0),
    ):
        self.K = int(n_batches)
        self.shape = tuple(shape)
        self.device = device
        self.stored: dict[int, torch.Tensor] = {}
        self.g_bar = torch.zeros(self.shape, device=device)
        self.L = L
        self.line_search_every = line_search_every
        self.decay = decay
        self.tau = 0

    @property
    def m(self) -> int:
        return max(1, len(self.stored))

    def accumulate(self, k: int, grad_k: torch.Tensor) -> None:
        """``g_bar <- g_bar - dV_k + g_k;  dV_k <- g_k`` (Algorithm 1)."""
        old = self.stored.get(k)
        if old is not None:
            self.g_bar -= old
        self.g_bar += grad_k
        self.stored[k] = grad_k.detach().clone()

    def direction(self, prior_grad: torch.Tensor | None) -> torch.Tensor:
        """Average-gradient direction ``g_bar / m + grad(-log p(V)) / K``."""
        d = self.g_bar / self.m
        if prior_grad is not None:
            d = d + prior_grad / self.K
        return d

    def step(
        self,
        V: torch.Tensor,
        k: int,
        grad_k: torch.Tensor,
        prior_grad: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """One SAGD update; returns the new (non-negative) volume."""
        self.tau += 1
        self.accumulate(k, grad_k)
        V = V - (eps / self.L) * self.direction(prior_grad)
        return V.clamp_min_(0.0)

    def update(
        self,
        V: torch.Tensor,
        k: int,
        f: Callable[[torch.Tensor], float],
        f_V: float,
        grad_k: torch.Tensor,
        prior_grad: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, int]:
        """One iteration of Algorithm 1 on minibatch ``k``: L from the bisection search on the
        first call, the line search every ``line_search_every`` steps, the decay of L
        otherwise; then the step. ``f`` is the minibatch objective ``f_k`` (likelihood on the
        same poses plus prior / K), ``f_V`` its value at V, ``grad_k`` the likelihood gradient.
        Returns the new volume and the number of doublings of L."""
        g_k = grad_k if prior_grad is None else grad_k + prior_grad / self.K
        doublings = 0
        if self.L is None:
            L0 = (
                float((g_k.double() ** 2).sum().sqrt() / max(1e-12, float(V.double().norm())))
                or 1.0
            )
            self.initial_L(f, V, f_V, g_k, L0)
        elif (self.tau + 1) % self.line_search_every == 0:
            doublings = self.line_search(f, V, f_V, g_k)
        else:
            self.decay_L()
        return self.step(V, k, grad_k, prior_grad, eps), doublings

    def lipschitz_condition_fails(
        self,
        f: Callable[[torch.Tensor], float],
        V: torch.Tensor,
        f_V: float,
        g: torch.Tensor,
        L: float,
    ) -> bool:
        """True when ``f(V) - f(V - g/L) < |g|^2 / (2L)`` (L too small)."""
        g2 = float((g.double() ** 2).sum())
        return f_V - f(V - g / L) < g2 / (2 * L)

    def initial_L(self, f, V, f_V, g, L0: float, max_steps: int = 30, bisections: int = 6) -> float:
        """Bisection search (in log L) for the smallest L satisfying the Lipschitz condition."""
        lo, hi = None, None
        L = L0
        for _ in range(max_steps):
            if self.lipschitz_condition_fails(f, V, f_V, g, L):
                lo = L
                if hi is not None:
                    break
                L *= 4.0
            else:
                hi = L
                if lo is not None:
                    break
                L /= 4.0
        if lo is None or hi is None:
            self.L = hi if hi is not None else L
            return self.L
        for _ in range(bisections):
            mid = math.sqrt(lo * hi)
            if self.lipschitz_condition_fails(f, V, f_V, g, mid):
                lo = mid
            else:
                hi = mid
        self.L = hi
        return self.L

    def line_search(self, f, V, f_V, g, max_doublings: int = 40) -> int:
        """Algorithm 1's line search; returns the number of doublings of L."""
        n = 0
        while n < max_doublings and self.lipschitz_condition_fails(f, V, f_V, g, self.L):
            self.L *= 2.0
            n += 1
        if n == 0:
            self.L *= self.decay
        return n

    def decay_L(self) -> None:
        self.L *= self.decay

    def state_dict(self) -> dict:
        return {
            "K": self.K,
            "shape": self.shape,
            "stored": self.stored,
            "g_bar": self.g_bar,
            "L": self.L,
            "tau": self.tau,
            "line_search_every": self.line_search_every,
            "decay": self.decay,
        }

    def load_state_dict(self, s: dict) -> None:
        self.K, self.shape = s["K"], tuple(s["shape"])
        self.stored = {int(k): v.to(self.device).clone() for k, v in s["stored"].items()}
        self.g_bar = s["g_bar"].to(self.device).clone()
        self.L, self.tau = s["L"], s["tau"]
        self.line_search_every, self.decay = s["line_search_every"], s["decay"]
