"""Importance sampling over view directions, in-plane angles and shifts (paper Sec. 3.4).

For each particle and each of the three quadrature dimensions the importance distribution
is the mixture of Eq. 20,

    q_j = (1 - alpha) Z^-1 sum_{i in J_prev} phi~_i^(1/T) K(i, j) + alpha / M,

built from the samples evaluated at the particle's previous visit and their approximate
marginals phi~ (Eq. 17-19), with the kernels of Eq. 21-23 (bandwidths from the current grid
spacings r_d, r_psi, r_t) and alpha, T from the schedules (Sec. 3.4.1). Because the
previous samples are stored by their coordinates (unit vectors, angles, shifts in pixels),
the kernels carry the distributions across quadrature refinements (a new omega*).

Per dimension, N = s0 * ESS(q) indices are drawn with replacement (ESS = 1 / sum q^2); the
properly weighted estimator of Eq. 13 then weighs a drawn point j by ``count_j / (N q_j)``.
Choices made here where the paper is silent (documented in the issue note):
- duplicates of a draw are evaluated once, with their count in the weight;
- when N >= M (e.g. at a particle's first visit, where q is uniform) the dimension uses its
  whole grid with the plain quadrature weights: exact, and never costlier than sampling;
- per particle and dimension at most ``keep`` samples, those with the largest phi~, are
  stored (the rest of the mass is covered by the uniform component), so memory is
  O(particles x keep), not O(particles x grid).
- an image whose own pose set (n_d n_psi n_t) exceeds a fraction of the full quadrature
  (``cryorecon.reconstruct.MAX_SAMPLED_FRACTION``, 0.25) is evaluated by the exact
  shared-GEMM quadrature instead (:meth:`ImportanceSampler.split_plan`); the rest are grouped
  by set size so that padding per-image sets to a common size wastes little;
- the annealing clock behind alpha and T can be stepped back (``anneal_from``) by the driver's
  held-out check of the sampled likelihood against the exact one
  (:meth:`cryorecon.reconstruct.Run.importance_check`): the paper's clock assumes the map
  changes slowly between a particle's visits, which short runs violate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Particles per minibatch on which the KL divergence between visits (Fig. 3) is measured.
KL_PARTICLES = 16


@dataclass
class ISConfig:
    """Importance-sampling settings: s0 scales the number of draws (Sec. 3.4, N = s0 ESS)."""

    s0: float = 10.0
    keep_d: int = 128
    keep_psi: int = 64
    keep_t: int = 64


class PoseHistory:
    """Per-particle samples from the previous visit: coordinates and log phi~ (padded)."""

    def __init__(self, n: int, cfg: ISConfig):
        self.cfg = cfg
        self.tau_prev = np.full(n, -1, dtype=np.int64)
        self.d = torch.zeros(n, cfg.keep_d, 3)
        self.d_logphi = torch.full((n, cfg.keep_d), -math.inf)
        self.psi = torch.zeros(n, cfg.keep_psi)
        self.psi_logphi = torch.full((n, cfg.keep_psi), -math.inf)
        self.t = torch.zeros(n, cfg.keep_t, 2)
        self.t_logphi = torch.full((n, cfg.keep_t), -math.inf)

    def state_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("tau_prev", "d", "d_logphi", "psi", "psi_logphi", "t", "t_logphi")
        }

    def load_state_dict(self, s: dict) -> None:
        for k, v in s.items():
            setattr(self, k, v)

    def rows(self, idx) -> dict:
        """Copies of particles ``idx``'s entries (for :meth:`set_rows`)."""
        i = np.asarray(idx)
        return {
            k: (v[i].copy() if isinstance(v, np.ndarray) else v[torch.as_tensor(i)].clone())
            for k, v in self.state_dict().items()
        }

    def set_rows(self, idx, saved: dict) -> None:
        """Put back entries saved by :meth:`rows` for the same particles ``idx``."""
        i = np.asarray(idx)
        for k, v in saved.items():
            getattr(self, k)[i if isinstance(v, np.ndarray) else torch.as_tensor(i)] = v


def kernel_log_mixture(
    prev_pts: torch.Tensor,
    prev_logphi: torch.Tensor,
    grid: torch.Tensor,
    kind: str,
    kappa: float,
    T: float,
) -> torch.Tensor:
    """log sum_i phi~_i^(1/T) K(i, j) for each grid point j: (B, n), (B, n) -> (B, M).

    kind 'd': K = exp(kappa (d_i . d_j - 1)); 'psi': exp(kappa (cos(psi_i - psi_j) - 1));
    't': exp(-kappa |t_i - t_j|^2) (Eq. 21-23; the constant factors exp(-kappa) cancel in Z).
    """
    if kind == "d":
        logk = kappa * (prev_pts @ grid.T - 1.0)  # (B, n, M)
    elif kind == "psi":
        logk = kappa * (torch.cos(prev_pts[:, :, None] - grid[None, None, :]) - 1.0)
    else:
        logk = -kappa * ((prev_pts[:, :, None, :] - grid[None, None, :, :]) ** 2).sum(-1)
    tempered = (
        prev_logphi / T
        if math.isfinite(T)
        else torch.where(torch.isfinite(prev_logphi), torch.zeros_like(prev_logphi), prev_logphi)
    )
    return torch.logsumexp(tempered[:, :, None] + logk, dim=1)


def mixture(log_smooth: torch.Tensor, alpha: float, has_history: torch.Tensor) -> torch.Tensor:
    """Eq. 20: (1 - alpha) normalised smooth part + alpha uniform; uniform without history."""
    M = log_smooth.shape[-1]
    smooth = torch.softmax(log_smooth.double(), dim=-1)
    q = (1 - alpha) * smooth + alpha / M
    uniform = torch.full_like(q, 1.0 / M)
    return torch.where(has_history[:, None], q, uniform)


def draw(q: torch.Tensor, s0: float, generator: torch.Generator):
    """Draw N_i = ceil(s0 ESS(q_i)) indices per row of q (B, M), with replacement.

    Returns ``(idx (B, n_max) long, log_corr (B, n_max) float64, n_unique (B,), exact (B,))``:
    each row's distinct drawn indices first, with ``log_corr = log(count / (N q))`` (the
    weight of Eq. 13 beyond the quadrature weight), padded with ``-inf``. Rows with
    ``N >= M`` (``exact``) list the whole grid with ``log_corr = 0``: the plain quadrature.
    """
    B, M = q.shape
    ess = 1.0 / (q**2).sum(-1)
    N = torch.ceil(s0 * ess).long().clamp(min=1)
    exact = N >= M
    counts = torch.zeros(B, M, dtype=torch.float64)
    sampled_rows = (~exact).nonzero().squeeze(-1)
    if len(sampled_rows):
        n_max = int(N[sampled_rows].max())
        draws = torch.multinomial(
            q[sampled_rows].float(), n_max, replacement=True, generator=generator
        )
        keep = torch.arange(n_max)[None, :] < N[sampled_rows][:, None]
        counts[sampled_rows] = counts[sampled_rows].scatter_add(1, draws, keep.double())
    log_corr = torch.where(
        counts > 0, torch.log(counts) - torch.log(N[:, None].double() * q), -math.inf
    )
    log_corr[exact] = 0.0  # the whole grid with the plain quadrature weights
    present = torch.isfinite(log_corr)
    n_unique = present.sum(-1)
    n_max = int(n_unique.max())
    # Move present entries to the front of each row (stable), then cut to n_max.
    order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True)[:, :n_max]
    idx = order
    lc = torch.gather(log_corr, 1, order)
    return idx, lc, n_unique, exact


def effective_sample_size(q: torch.Tensor) -> torch.Tensor:
    return 1.0 / (q**2).sum(-1)


def store_marginals(
    hist: PoseHistory,
    particles: np.ndarray,
    tau: int,
    d_pts,
    d_logphi,
    psi_pts,
    psi_logphi,
    t_pts,
    t_logphi,
) -> None:
    """Keep the ``keep`` largest log phi~ per particle and dimension (padded with -inf)."""
    c = hist.cfg

    def top(pts, logphi, keep):
        k = min(keep, logphi.shape[1])
        val, i = torch.topk(logphi, k, dim=1)
        p = (
            torch.gather(pts, 1, i[..., None].expand(*i.shape, pts.shape[-1]))
            if pts.dim() == 3
            else torch.gather(pts, 1, i)
        )
        if k < keep:
            pad = keep - k
            val = torch.cat([val, torch.full((val.shape[0], pad), -math.inf)], 1)
            p = torch.cat([p, torch.zeros(p.shape[0], pad, *p.shape[2:])], 1)
        return p, val

    idx = torch.as_tensor(particles)
    hist.d[idx], hist.d_logphi[idx] = top(d_pts.float(), d_logphi.float(), c.keep_d)
    hist.psi[idx], hist.psi_logphi[idx] = top(psi_pts.float(), psi_logphi.float(), c.keep_psi)
    hist.t[idx], hist.t_logphi[idx] = top(t_pts.float(), t_logphi.float(), c.keep_t)
    hist.tau_prev[particles] = tau


def kl_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row for log-probabilities (B, M) (normalised inside)."""
    p_log = torch.log_softmax(p_log.double(), -1)
    q_log = torch.log_softmax(q_log.double(), -1)
    p = p_log.exp()
    return (p * (p_log - q_log)).nan_to_num(0.0).sum(-1)


@dataclass
class Plan:
    """The poses to evaluate for one minibatch under importance sampling (Eq. 13)."""

    rot_ids: torch.Tensor  # (U,) global rotation ids (j * M_psi + k) in the union
    rot_idx: torch.Tensor  # (B, R) index into rot_ids; R = n_d * n_psi (product layout)
    rot_logw: torch.Tensor  # (B, R) log(w_d w_psi p(R) * corrections), -inf padding
    shifts: torch.Tensor  # (B, n_t, 2) pixels
    shift_logw: torch.Tensor  # (B, n_t)
    idx_d: torch.Tensor
    lc_d: torch.Tensor
    idx_psi: torch.Tensor
    lc_psi: torch.Tensor
    idx_t: torch.Tensor
    lc_t: torch.Tensor
    fraction: float  # poses sampled (distinct) / poses of the full quadrature
    fraction_computed: float  # poses computed incl. padding to the plan's largest set
    rows: torch.Tensor  # (B,) rows of the minibatch this plan covers


@dataclass
class SplitPlan:
    """A minibatch split between the exact path (``exact_rows``) and sampled ``groups``
    whose ``rot_idx`` index the shared union ``rot_ids``. Fractions are per-image means
    over the whole minibatch, exact images counting 1."""

    exact_rows: torch.Tensor
    groups: list[Plan]
    rot_ids: torch.Tensor
    fraction: float
    fraction_computed: float


def _chunked_log_mixture(pts, logphi, grid_pts, kind, kappa, T, chunk_elems=2**24):
    B, n = logphi.shape
    M = grid_pts.shape[0]
    step = max(1, chunk_elems // max(1, n * M))
    return torch.cat(
        [
            kernel_log_mixture(pts[b : b + step], logphi[b : b + step], grid_pts, kind, kappa, T)
            for b in range(0, B, step)
        ],
        0,
    )


def kappas(grid) -> tuple[float, float, float]:
    """Kernel bandwidths of Eq. 21-23 from the grid spacings r_d, r_psi, r_t."""
    k_d = math.log(4.0) / max(1e-12, 1.0 - math.cos(grid.r_d))
    k_psi = math.log(2.0) / max(1e-12, 1.0 - math.cos(grid.r_psi))
    k_t = 1.0 / (2.0 * grid.r_t**2)
    return k_d, k_psi, k_t


class ImportanceSampler:
    """Builds per-particle importance distributions and sample plans; keeps the history.

    ``anneal_from``: the iteration from which the annealing clock of alpha and T counts
    (0 in the paper). The driver moves it forward when a check of the sampled likelihood
    against the exact one fails (:meth:`cryorecon.reconstruct.Run.importance_check`), which
    widens the distributions again.
    """

    def __init__(self, n_particles: int, cfg: ISConfig, schedule, seed: int):
        self.cfg = cfg
        self.schedule = schedule
        self.hist = PoseHistory(n_particles, cfg)
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.anneal_from = 0

    def annealing_clock(self, tau_prev: int) -> int:
        """The iteration count that alpha and T see for a previous visit at ``tau_prev``."""
        return max(int(tau_prev) - self.anneal_from, 0)

    def distributions(self, idx: np.ndarray, grid):
        """q^d (B, M_d), q^psi (B, M_psi), q^t (B, M_t) for particles ``idx`` (Eq. 20).

        alpha and T come from the batch's latest previous visit: the driver's minibatches are
        fixed, so all particles of a batch share it.
        """
        h = self.hist
        t_prev = self.annealing_clock(h.tau_prev[idx].max())
        has = torch.as_tensor(h.tau_prev[idx] >= 0)
        alpha = self.schedule.alpha(t_prev)
        T = self.schedule.temperature(t_prev)
        k_d, k_psi, k_t = kappas(grid)
        i = torch.as_tensor(idx)
        q_d = mixture(
            _chunked_log_mixture(
                h.d[i].double(), h.d_logphi[i].double(), grid.directions, "d", k_d, T
            ),
            alpha,
            has,
        )
        q_psi = mixture(
            _chunked_log_mixture(
                h.psi[i].double(), h.psi_logphi[i].double(), grid.psi, "psi", k_psi, T
            ),
            alpha,
            has,
        )
        q_t = mixture(
            _chunked_log_mixture(h.t[i].double(), h.t_logphi[i].double(), grid.shifts, "t", k_t, T),
            alpha,
            has,
        )
        return q_d, q_psi, q_t

    def _draws(self, idx: np.ndarray, grid):
        """Per-dimension draws (Eq. 13) for particles ``idx``, or None without any history."""
        if (self.hist.tau_prev[idx] < 0).all():
            return None
        q_d, q_psi, q_t = self.distributions(idx, grid)
        s0 = self.cfg.s0
        return draw(q_d, s0, self.gen), draw(q_psi, s0, self.gen), draw(q_t, s0, self.gen)

    @staticmethod
    def _build(grid, rows: torch.Tensor, draws) -> Plan:
        """The product-layout plan for batch rows ``rows``, trimmed to their largest sets."""
        (idx_d, lc_d, n_d, _), (idx_psi, lc_psi, n_psi, _), (idx_t, lc_t, n_t, _) = draws
        wd, wp, wt = (int(n[rows].max()) for n in (n_d, n_psi, n_t))
        idx_d, lc_d = idx_d[rows, :wd], lc_d[rows, :wd]
        idx_psi, lc_psi = idx_psi[rows, :wp], lc_psi[rows, :wp]
        idx_t, lc_t = idx_t[rows, :wt], lc_t[rows, :wt]
        B = len(rows)
        log_wd = grid.log_w_d[idx_d] + lc_d
        log_wpsi = grid.log_w_psi[idx_psi] + lc_psi
        rot_logw = (log_wd[:, :, None] + log_wpsi[:, None, :] + grid.log_p_R).reshape(B, -1)
        gid = (idx_d[:, :, None] * grid.M_psi + idx_psi[:, None, :]).reshape(B, -1)
        valid = torch.isfinite(rot_logw)
        rot_ids, inverse = torch.unique(gid[valid], return_inverse=True)
        rot_idx = torch.zeros_like(gid)
        rot_idx[valid] = inverse
        shift_logw = grid.log_w_t[idx_t] + lc_t
        n_eval = (valid.sum(-1) * torch.isfinite(shift_logw).sum(-1)).sum()
        full = grid.n_rotations * grid.M_t
        return Plan(
            rot_ids,
            rot_idx,
            rot_logw,
            grid.shifts[idx_t],
            shift_logw,
            idx_d,
            lc_d,
            idx_psi,
            lc_psi,
            idx_t,
            lc_t,
            float(n_eval) / (B * full),
            rot_idx.shape[1] * shift_logw.shape[1] / full,
            rows,
        )

    def plan(self, idx: np.ndarray, grid) -> Plan | None:
        """Sample poses for particles ``idx``, all images padded to the largest set; None when
        every draw covers its whole grid (then the exact quadrature is both equal and cheaper)."""
        draws = self._draws(idx, grid)
        if draws is None or all(bool(d[3].all()) for d in draws):
            return None
        return self._build(grid, torch.arange(len(idx)), draws)

    def split_plan(
        self, idx: np.ndarray, grid, max_fraction: float = 0.25, bucket: float = 2.0
    ) -> SplitPlan | None:
        """Sample poses for particles ``idx`` and route each image to the cheaper path.

        An image whose own pose set (n_d n_psi n_t distinct points) exceeds ``max_fraction`` of
        the full quadrature (a first visit, or a still diffuse posterior) goes to the exact,
        shared-GEMM path; the others are grouped by set size (within a factor ``bucket``), so
        padding each group to its largest set wastes little. The groups share one union of
        rotations. None when every image is exact.
        """
        draws = self._draws(idx, grid)
        if draws is None:
            return None
        B = len(idx)
        full = grid.n_rotations * grid.M_t
        own = (draws[0][2] * draws[1][2] * draws[2][2]).double()
        heavy = own > max_fraction * full
        if bool(heavy.all()):
            return None
        light = (~heavy).nonzero().squeeze(-1)
        key = torch.floor(torch.log(own[light]) / math.log(bucket)).long()
        groups = [self._build(grid, light[key == k], draws) for k in torch.unique(key).tolist()]
        rot_ids = torch.unique(torch.cat([g.rot_ids for g in groups]))
        for g in groups:
            g.rot_idx = torch.searchsorted(rot_ids, g.rot_ids)[g.rot_idx]
            g.rot_ids = rot_ids
        n_heavy = int(heavy.sum())
        fraction = (sum(g.fraction * len(g.rows) for g in groups) + n_heavy) / B
        computed = (sum(g.fraction_computed * len(g.rows) for g in groups) + n_heavy) / B
        return SplitPlan(heavy.nonzero().squeeze(-1), groups, rot_ids, fraction, computed)

    def rotations(self, plan, grid) -> torch.Tensor:
        """(U, 3, 3) rotation matrices of the plan's union of rotations (``Plan`` or
        ``SplitPlan``)."""
        from ..geometry.rotations import direction_inplane_to_matrix

        j, k = plan.rot_ids // grid.M_psi, plan.rot_ids % grid.M_psi
        return direction_inplane_to_matrix(grid.directions[j], grid.psi[k]).float()

    def update_sampled(
        self, idx, tau, plan: Plan, post_rot: torch.Tensor, post_shift: torch.Tensor, grid
    ) -> float:
        """Store phi~ (Eq. 17-19) from the posteriors over the sampled poses; returns mean KL."""
        B = len(idx)
        n_d, n_psi = plan.idx_d.shape[1], plan.idx_psi.shape[1]
        g = post_rot.double().reshape(B, n_d, n_psi)
        with np.errstate(divide="ignore"):
            d_logphi = torch.log(g.sum(2)) - plan.lc_d
            psi_logphi = torch.log(g.sum(1)) - plan.lc_psi
            t_logphi = torch.log(post_shift.double()) - plan.lc_t
        d_logphi = torch.where(torch.isfinite(plan.lc_d), d_logphi, -math.inf)
        psi_logphi = torch.where(torch.isfinite(plan.lc_psi), psi_logphi, -math.inf)
        t_logphi = torch.where(torch.isfinite(plan.lc_t), t_logphi, -math.inf)
        return self._store(
            idx,
            tau,
            grid,
            grid.directions[plan.idx_d],
            d_logphi.nan_to_num(-math.inf),
            grid.psi[plan.idx_psi],
            psi_logphi.nan_to_num(-math.inf),
            grid.shifts[plan.idx_t],
            t_logphi.nan_to_num(-math.inf),
        )

    def update_exact(
        self, idx, tau, post_rot: torch.Tensor, post_shift: torch.Tensor, grid
    ) -> float:
        """Store phi (Eq. 14-16) from the exact posteriors over the whole grid."""
        B = len(idx)
        g = post_rot.double().reshape(B, grid.M_d, grid.M_psi)
        B_ = lambda x: x[None].expand(B, *x.shape)  # noqa: E731
        return self._store(
            idx,
            tau,
            grid,
            B_(grid.directions),
            torch.log(g.sum(2)),
            B_(grid.psi),
            torch.log(g.sum(1)),
            B_(grid.shifts),
            torch.log(post_shift.double()),
        )

    def _store(
        self, idx, tau, grid, d_pts, d_logphi, psi_pts, psi_logphi, t_pts, t_logphi
    ) -> float:
        h = self.hist
        idx = np.asarray(idx)
        # The KL diagnostic (Fig. 3) on at most KL_PARTICLES of the batch: it needs full-grid
        # kernel sums, which would otherwise cost as much as building the distributions.
        seen = torch.as_tensor(idx[h.tau_prev[idx] >= 0][:KL_PARTICLES])
        old_d, old_phi = h.d[seen].double().clone(), h.d_logphi[seen].double().clone()
        store_marginals(h, idx, tau, d_pts, d_logphi, psi_pts, psi_logphi, t_pts, t_logphi)
        if not len(seen):
            return float("nan")
        k_d = kappas(grid)[0]
        new = _chunked_log_mixture(
            h.d[seen].double(), h.d_logphi[seen].double(), grid.directions, "d", k_d, 1.0
        )
        old = _chunked_log_mixture(old_d, old_phi, grid.directions, "d", k_d, 1.0)
        return float(kl_divergence(new, old).mean())
