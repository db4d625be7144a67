"""SAGD (Algorithm 1, :mod:`cryorecon.optim.sagd`) on a problem with a known answer.

Non-negative least squares split into K minibatches, ``f_k(x) = 1/2 |A_k x - b_k|^2``, driven
exactly as :class:`cryorecon.reconstruct.Run` drives the optimiser: ``initial_L`` on the first
iteration, ``line_search`` every ``line_search_every`` iterations, ``decay_L`` otherwise, then
``step`` (which clamps to x >= 0). The optimum comes from :func:`scipy.optimize.nnls`.

For a quadratic with Hessian ``H_k = A_k^T A_k`` the Lipschitz test of the line search,
``f(x) - f(x - g/L) >= |g|^2 / (2L)``, holds exactly when ``L >= g^T H_k g / |g|^2`` (the
Rayleigh quotient along the gradient), which lies in ``[lambda_min, lambda_max]`` of H_k.
The A_k below are built with a known spectrum so those bounds are sharp.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from cryorecon.optim.sagd import SAGD

K, M, N = 5, 24, 12  # minibatches, rows per minibatch, unknowns
EIG_LO, EIG_HI = 0.5, 2.0  # spectrum of every A_k^T A_k


def make_problem(seed: int = 0):
    """A_k with singular values sqrt(linspace(EIG_LO, EIG_HI)), and b such that the
    unconstrained optimum has negative entries (some constraints are active at the NNLS optimum)."""
    rng = np.random.default_rng(seed)
    A = []
    for _ in range(K):
        U, _ = np.linalg.qr(rng.standard_normal((M, N)))
        V, _ = np.linalg.qr(rng.standard_normal((N, N)))
        s = np.sqrt(np.linspace(EIG_LO, EIG_HI, N))
        A.append(U @ np.diag(s) @ V.T)
    x_true = rng.standard_normal(N)  # about half negative
    b = [Ak @ x_true + 0.1 * rng.standard_normal(M) for Ak in A]
    return A, b


class Problem:
    def __init__(self, seed: int = 0):
        A, b = make_problem(seed)
        self.A = [torch.tensor(a, dtype=torch.float32) for a in A]
        self.b = [torch.tensor(v, dtype=torch.float32) for v in b]
        self.A64, self.b64 = A, b

    def f(self, k: int):
        A, b = self.A[k].double(), self.b[k].double()
        return lambda x: float(0.5 * ((A @ x.double() - b) ** 2).sum())

    def grad(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return self.A[k].T @ (self.A[k] @ x - self.b[k])

    def total(self, x) -> float:
        return sum(self.f(k)(torch.as_tensor(x)) for k in range(K))

    def optimum(self) -> np.ndarray:
        x, _ = nnls(np.vstack(self.A64), np.concatenate(self.b64))
        return x

    def rayleigh(self, k: int, g: torch.Tensor) -> float:
        g = g.double()
        H = (self.A[k].T @ self.A[k]).double()
        return float(g @ H @ g / (g @ g))

    def lambda_max(self, k: int) -> float:
        return float(np.linalg.eigvalsh(self.A64[k].T @ self.A64[k]).max())


def iterate(
    opt: SAGD,
    prob: Problem,
    x: torch.Tensor,
    tau: int,
    k: int,
    eps: float = 1.0,
    line_search_every: int = 20,
) -> torch.Tensor:
    """One iteration as Run.step takes it: :meth:`SAGD.update` (the opt's own cadence)."""
    assert opt.line_search_every == line_search_every and opt.tau == tau - 1
    f = prob.f(k)
    x_new, _ = opt.update(x, k, f, f(x), prob.grad(k, x), None, eps)
    return x_new


def test_update_follows_algorithm_1_cadence():
    """update = initial_L on the first call, line_search every line_search_every-th, decay_L
    otherwise, then step: the same iterates as calling the pieces by hand."""
    prob = Problem()
    a, b = SAGD(K, (N,), "cpu", line_search_every=4), SAGD(K, (N,), "cpu", line_search_every=4)
    xa = xb = torch.full((N,), 0.5)
    for tau in range(1, 13):
        k = tau % K
        f, g = prob.f(k), prob.grad(k, xb)
        if b.L is None:
            b.initial_L(f, xb, f(xb), g, float(g.norm() / xb.norm()))
        elif tau % 4 == 0:
            b.line_search(f, xb, f(xb), g)
        else:
            b.decay_L()
        xb = b.step(xb, k, g, None, 1.0)
        xa, _ = a.update(xa, k, prob.f(k), prob.f(k)(xa), prob.grad(k, xa), None, 1.0)
        assert a.L == pytest.approx(b.L, rel=1e-6)
        assert torch.allclose(xa, xb, atol=1e-6)


def run_sagd(prob: Problem, iters: int, seed: int = 0, x0=None):
    gen = torch.Generator().manual_seed(seed)
    opt = SAGD(K, (N,), "cpu", line_search_every=20)
    x = torch.full((N,), 0.5) if x0 is None else x0.clone()
    order: list[int] = []
    for tau in range(1, iters + 1):
        if not order:
            order = torch.randperm(K, generator=gen).tolist()
        x = iterate(opt, prob, x, tau, order.pop())
    return x, opt


def test_problem_has_active_constraints():
    prob = Problem()
    x_ls = np.linalg.lstsq(np.vstack(prob.A64), np.concatenate(prob.b64), rcond=None)[0]
    x_nn = prob.optimum()
    assert (x_ls < 0).sum() >= 2, "the unconstrained optimum must violate x >= 0"
    assert (x_nn == 0).sum() >= 2 and (x_nn > 0).sum() >= 2


def test_converges_to_nnls_optimum():
    prob = Problem()
    x_star = prob.optimum()
    x, opt = run_sagd(prob, iters=1500)
    x = x.double().numpy()
    assert (x >= 0).all(), "step() must clamp to the non-negative orthant"
    assert np.abs(x - x_star).max() < 2e-3 * max(1.0, np.abs(x_star).max())
    # the objective gap, relative to the objective at the start
    f0, f_star = prob.total(np.full(N, 0.5)), prob.total(x_star)
    assert prob.total(x) - f_star < 1e-6 * (f0 - f_star)
    # active set recovered
    np.testing.assert_array_equal(x < 1e-3, x_star < 1e-3)
    # L stays a sensible single-minibatch Lipschitz estimate throughout
    assert EIG_LO / 4 < opt.L < 2 * EIG_HI * 1.05


def test_without_clamping_would_differ():
    """Guard against a vacuous test: the projection matters on this problem."""
    prob = Problem()
    x_ls = np.linalg.lstsq(np.vstack(prob.A64), np.concatenate(prob.b64), rcond=None)[0]
    assert np.abs(x_ls - prob.optimum()).max() > 0.1


@pytest.mark.parametrize("L0", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("k", [0, 3])
def test_initial_L_bisection(L0, k):
    prob = Problem(seed=1)
    x = torch.rand(N, generator=torch.Generator().manual_seed(k))
    f, g = prob.f(k), prob.grad(k, x)
    opt = SAGD(K, (N,), "cpu")
    L = opt.initial_L(f, x, f(x), g, L0)
    assert L == opt.L
    # satisfies the Lipschitz condition ...
    assert not opt.lipschitz_condition_fails(f, x, f(x), g, L)
    # ... and is close to the smallest L that does (the Rayleigh quotient along g):
    # the bracket [lo, lo * 4] is bisected 6 times in log L -> within 4^(1/64) ~ 1.022
    rq = prob.rayleigh(k, g)
    assert rq * (1 - 1e-4) <= L <= rq * 1.05
    # so within a factor 4 (the spectrum's spread) below the largest eigenvalue, never above it
    lam = prob.lambda_max(k)
    assert lam / 4 <= L <= lam * 1.05


def test_line_search_doubles_small_L_and_decays_large_L():
    prob = Problem(seed=2)
    k = 1
    x = torch.rand(N, generator=torch.Generator().manual_seed(5))
    f, g = prob.f(k), prob.grad(k, x)
    rq = prob.rayleigh(k, g)
    opt = SAGD(K, (N,), "cpu", L=rq / 10)
    n = opt.line_search(f, x, f(x), g)
    # 2^n * rq/10 >= rq first at n = ceil(log2 10) = 4 (allow one step of slack at the boundary)
    assert n in (4, 5)
    assert opt.L == pytest.approx(rq / 10 * 2**n)
    assert not opt.lipschitz_condition_fails(f, x, f(x), g, opt.L)
    assert opt.lipschitz_condition_fails(f, x, f(x), g, opt.L / 2)  # the first L that passes
    # L large enough: no doubling, L decreases by 2^(-1/150)
    opt.L = 3 * rq
    assert opt.line_search(f, x, f(x), g) == 0
    assert opt.L == pytest.approx(3 * rq * 2 ** (-1 / 150))
    opt.decay_L()
    assert opt.L == pytest.approx(3 * rq * 2 ** (-2 / 150))


def test_lipschitz_condition_matches_rayleigh_quotient():
    prob = Problem(seed=3)
    k = 2
    x = torch.rand(N, generator=torch.Generator().manual_seed(1))
    f, g = prob.f(k), prob.grad(k, x)
    rq = prob.rayleigh(k, g)
    opt = SAGD(K, (N,), "cpu")
    assert opt.lipschitz_condition_fails(f, x, f(x), g, 0.9 * rq)
    assert not opt.lipschitz_condition_fails(f, x, f(x), g, 1.1 * rq)


def test_step_is_average_of_stored_gradients():
    """SAG direction: mean of the most recent gradient of every visited minibatch."""
    prob = Problem()
    opt = SAGD(K, (N,), "cpu", L=2.0)
    x = torch.full((N,), 5.0)  # far from the boundary: no clamping
    grads = {}
    for k in (0, 1, 0):
        grads[k] = prob.grad(k, x)
        x_new = opt.step(x, k, grads[k], None, eps=0.5)
        expected = x - (0.5 / 2.0) * (sum(grads.values()) / len(grads))
        torch.testing.assert_close(x_new, expected.clamp_min(0), rtol=1e-6, atol=1e-6)
        x = x_new
    prior = torch.ones(N)
    x_new = opt.step(x, 2, prob.grad(2, x), prior, eps=1.0)
    grads[2] = prob.grad(2, x)
    expected = x - (1.0 / 2.0) * (sum(grads.values()) / 3 + prior / K)
    torch.testing.assert_close(x_new, expected.clamp_min(0), rtol=1e-5, atol=1e-5)


def _checkpoint_copy(state: dict) -> dict:
    """What Run._save / Run._load do: torch.save then torch.load."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


def test_state_dict_round_trip_gives_identical_steps():
    prob = Problem()
    x, opt = run_sagd(prob, iters=37, seed=4)
    state = _checkpoint_copy(opt.state_dict())
    clone = SAGD(1, (1,), "cpu")  # shape, K etc. come from the state
    clone.load_state_dict(state)
    assert (clone.K, clone.shape, clone.L, clone.tau) == (opt.K, opt.shape, opt.L, opt.tau)
    xa, xb = x.clone(), x.clone()
    gen = torch.Generator().manual_seed(9)
    for tau in range(38, 38 + 45):  # crosses two line searches
        k = int(torch.randint(K, (1,), generator=gen))
        xa = iterate(opt, prob, xa, tau, k)
        xb = iterate(clone, prob, xb, tau, k)
        assert torch.equal(xa, xb), f"diverged at iteration {tau}"
        assert opt.L == clone.L
    assert torch.equal(opt.g_bar, clone.g_bar)


def test_state_dict_in_memory_round_trip_is_independent():
    """Loading a state_dict taken from a live optimiser (no serialisation in between) must
    give an independent copy: the next steps of both must agree and neither may change the
    other's running sum."""
    prob = Problem()
    x, opt = run_sagd(prob, iters=12, seed=4)
    clone = SAGD(K, (N,), "cpu")
    clone.load_state_dict(opt.state_dict())
    xa, xb = x.clone(), x.clone()
    for tau, k in zip(range(13, 20), [0, 1, 2, 3, 4, 0, 1]):
        xa = iterate(opt, prob, xa, tau, k)
        xb = iterate(clone, prob, xb, tau, k)
        assert torch.equal(xa, xb), f"diverged at iteration {tau}"
