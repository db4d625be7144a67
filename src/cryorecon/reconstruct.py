"""The reconstruction driver: random start, SAGD loop, held-out error, checkpoints (Sec. 3-4).

It owns state and time; the math lives in :mod:`cryorecon.model` and :mod:`cryorecon.optim`.

Per iteration tau: omega* from the schedule (Sec. 4.2) sets the Fourier coefficients in use
and the quadrature (Sec. 3.2); one minibatch's marginal likelihood gradient (Eq. 2-4) and
the prior's gradient feed one SAGD step (Algorithm 1); every ``line_search_every`` iterations
the Lipschitz line search runs; every ``heldout_every`` iterations the mean negative
log-likelihood of the held-out particles (200 by default, never trained on) is measured.
The run stops at ``max_iters``, at ``max_time``, or once omega* has reached its final value
and the held-out error has not improved for ``patience`` evaluations.

Outputs in the run folder: ``volume.mrc`` (current map, voxel size in the header),
``snapshots/volume_XXXXXX.mrc``, ``metrics.jsonl`` (one JSON object per iteration),
``checkpoint.pt`` (everything needed by ``resume``), ``run.json`` (parameters, versions,
timings, and ``finished``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__, runstate
from .errors import InputError, OutputExistsError
from .fourier.slicing import SliceOperator, spectrum_from_volume
from .fourier.transforms import HalfPlane, cutoff_radius
from .geometry.grids import PoseGrid
from .io.checks import single_pixel_size
from .geometry.poses import pose_to_relion
from .io.mrc import write_map
from .model.importance import ImportanceSampler, ISConfig
from .model.likelihood import CombinedResult, marginal_loglik, sampled_loglik_groups, volume_objective
from .model.priors import make_prior
from .optim.sagd import SAGD
from .optim.schedules import Schedule
from .preprocess import default_diameter_A, load_batch
from .progress import bar, log


# What a run writes in its folder (besides snapshots/); --force removes these first.
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "run.json", "volume.mrc", "initial.mrc", "poses.npz", "report.html",
             "particles.star", "particles.cs")

# Above this fraction of the full quadrature (after padding each image's pose set to the
# batch's largest), importance sampling is no cheaper than the exact, shared-GEMM path.
MAX_SAMPLED_FRACTION = 0.25


@dataclass
class ReconstructConfig:
    """Parameters of a run. Lengths in Å, frequencies in 1/Å, times in seconds."""

    minibatch: int = 200
    prior: str = "exponential"
    prior_lambda: float | None = None
    prior_strength: float = 3.0
    car_sigma: float | None = None
    seed: int = 0
    max_iters: int = 5000
    max_time: float | None = None
    omega_start: float = 0.02
    omega_step: float = 0.005
    omega_every: int = 150
    omega_max: float = 0.11
    device: str = "cpu"
    oversample: int = 2
    diameter_A: float | None = None
    shift_sigma_A: float | None = None
    grid_scale: float = 1.0
    heldout: int = 200
    heldout_every: int = 10
    patience: int = 5
    line_search_every: int = 20
    checkpoint_every: int = 25
    snapshot_every: int = 100
    n_spheres: int = 8
    importance: bool = True
    s0: float = 10.0
    is_every: int | None = None
    is_check: int = 16
    is_tolerance: float = 1e-3
    report_every: float | None = 60.0
    cache_gib: float = 2.0

    @property
    def annealing_step(self) -> int:
        """Iterations per step of the importance annealing (Sec. 3.4.1): ``is_every``, or by
        default a third of ``omega_every``, the paper's ratio (50 to 150 iterations), so that
        sampling anneals at the same pace relative to the cut-off schedule."""
        return self.is_every if self.is_every else max(1, self.omega_every // 3)

    def schedule(self, apix: float) -> Schedule:
        return Schedule(omega_start=self.omega_start, omega_step=self.omega_step, omega_every=self.omega_every,
                        omega_max=self.omega_max, apix=apix, is_every=self.annealing_step)


@dataclass
class Level:
    """Everything that depends only on omega*: coefficients in use and the quadrature."""

    omega: float
    halfplane: HalfPlane
    grid: PoseGrid
    rotations: torch.Tensor
    log_w_rot: torch.Tensor
    shifts: torch.Tensor
    log_w_shift: torch.Tensor
    slice_op: SliceOperator

    @property
    def n_poses(self) -> int:
        return int(self.rotations.shape[0] * self.shifts.shape[0])


def make_level(omega: float, D: int, apix: float, shift_sigma_px: float, grid_scale: float, device,
               oversample: int = 2, cache_bytes: int = 2 ** 31) -> Level:
    grid = PoseGrid(D=D, apix=apix, omega_star=omega, shift_sigma_px=shift_sigma_px, scale=grid_scale)
    hp = HalfPlane(D, cutoff_radius(D, apix, omega), device=device)
    R = grid.rotations(device=device)
    op = SliceOperator(R, hp.freqs().to(device) * D, D, oversample, cache_bytes=cache_bytes)
    return Level(omega, hp, grid, R, grid.log_w_R().to(device), grid.shifts.to(device, torch.float32),
                 grid.log_w_t.to(device), op)


def split_particles(n: int, heldout: int, minibatch: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Held-out indices and fixed training minibatches, from a seeded permutation."""
    if n < 2:
        raise InputError(f"need at least 2 particles, got {n}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    h = min(heldout, max(1, n // 10))
    held, train = np.sort(perm[:h]), perm[h:]
    K = max(1, math.ceil(len(train) / minibatch))
    return held, [np.sort(b) for b in np.array_split(train, K)]


def random_spheres(D: int, radius_px: float, n_spheres: int, generator: torch.Generator) -> torch.Tensor:
    """Random initial density (Sec. 4): a union of ``n_spheres`` solid spheres of random
    radius and position inside a ball of ``radius_px`` about the centre, softened by one voxel."""
    g = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    V = torch.zeros(D, D, D)
    for _ in range(n_spheres):
        r = float(torch.empty(()).uniform_(0.15, 0.4, generator=generator)) * radius_px
        c = torch.randn(3, generator=generator)
        c = c / c.norm() * float(torch.rand((), generator=generator)) * (radius_px - r)
        d = torch.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        V = torch.maximum(V, torch.sigmoid((r - d) * 2.0))
    return V


def scale_to_data(V: torch.Tensor, particles, idx, level: Level, diameter_px: float, oversample: int,
                  generator: torch.Generator, device) -> tuple[torch.Tensor, float]:
    """Scale the start so its CTF-modulated slices carry the images' signal power, and
    measure the data's curvature per voxel.

    Scale: a^2 = sum w (|y|^2 - sigma^2) / sum w c^2 |S(R)|^2 over a pilot batch at random
    poses. Curvature: a unit change of one voxel changes every slice coefficient by 1/D in
    modulus, so the diagonal of the negative log-likelihood's Hessian is, per particle,
    h = sum_m w_m c_m^2 / (sigma^2 D^2) (averaged over the pilot batch, current band).
    """
    from .geometry.rotations import random_rotations

    D = V.shape[-1]
    batch = load_batch(particles, idx, level.halfplane, diameter_px, device)
    R = random_rotations(len(idx), generator=generator).to(device, torch.float32)
    op = SliceOperator(R, level.halfplane.freqs().to(device) * D, D, oversample)
    S = op.slice(spectrum_from_volume(V.to(device), oversample))
    w = batch.weight
    signal = float((w * (batch.y.abs() ** 2 - batch.sigma2[:, None])).sum())
    model = float((w * batch.ctf ** 2 * S.abs() ** 2).sum())
    h = float(((w * batch.ctf ** 2).sum(-1) / batch.sigma2).mean()) / D ** 2
    if signal <= 0 or model <= 0:
        log.warning("could not measure the images' signal power; keeping the start's scale")
        return V, h
    return V * math.sqrt(signal / model), h


def default_exponential_lambda(V0: torch.Tensor, n_train: int, h: float, strength: float) -> float:
    """Default rate of the exponential prior (Sec. 3.3; the paper gives no value).

    The exponential's own estimate, lambda = 1 / mean(V0), does not see how much data there
    is: with few or noisy particles it empties the map (measured: 400-500 particles at SNR
    0.05 collapse to zero within ~10 iterations). The MAP soft-thresholds a voxel by about
    lambda / H_vv, with H_vv = n_train * h the data's curvature per voxel measured on the
    start's band (:func:`scale_to_data`), so we cap lambda in those units:
    lambda = min(1 / mean(V0), strength * max(V0) * n_train * h).

    ``strength`` is an empirical knob (h is measured on the first, lowest band, so it
    understates the final curvature). Measured on the demo set (2,000 particles, SNR 0.1),
    FSC 0.5 vs truth: strength 0.01 -> 54 Å, 1 -> 31 Å, 3 -> 28 Å, >= 10 (= 1/mean) -> 27 Å;
    on 400 particles at SNR 0.05, strength 10 leaves 0.3% of voxels non-zero, 3 keeps 7%.
    The default is 3.
    """
    mle = 1.0 / max(float(V0.mean()), 1e-30)
    return min(mle, strength * float(V0.max()) * n_train * h)


class Run:
    """A reconstruction run bound to an output folder (fresh, resumed, or refused)."""

    def __init__(self, particles, out_dir, config: ReconstructConfig, resume: bool = False, force: bool = False):
        self.p = particles
        self.out = Path(out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        state = None
        if resume and self.ckpt_path.exists() and not force:
            state = runstate.load_checkpoint(self.ckpt_path, particles, config, RESUME_OVERRIDES)
            config = _resumed_config(state["config"], config)
        self.cfg = config
        self.device = torch.device(config.device)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda requested but CUDA is not available")
        self.metrics_path = self.out / "metrics.jsonl"
        self.D = particles.D
        self.apix = single_pixel_size(particles)
        self.fingerprint = runstate.particle_fingerprint(particles)
        self.diameter_px = (config.diameter_A or default_diameter_A(self.D, self.apix)) / self.apix
        shift_sigma_A = config.shift_sigma_A if config.shift_sigma_A is not None else 0.05 * self.D * self.apix
        self.shift_sigma_px = shift_sigma_A / self.apix
        self.schedule = config.schedule(self.apix)
        self._check_out_dir(resume, force)
        self.heldout, self.batches = split_particles(len(particles), config.heldout, config.minibatch, config.seed)
        runstate.warn_if_heldout_cut(len(self.heldout), config.heldout, len(particles))
        self.K = len(self.batches)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.levels: dict[float, Level] = {}
        self.prior = None
        self.tau = 0
        self.elapsed = 0.0
        self.order: list[int] = []
        self.best_heldout = math.inf
        self.best_omega = None
        self.since_improve = 0
        self.last_heldout = None
        self.sampler = ImportanceSampler(len(particles), ISConfig(s0=config.s0), self.schedule, config.seed) \
            if config.importance else None
        self.best_dir = np.full((len(particles), 3), np.nan, dtype=np.float32)
        self.best_R = np.full((len(particles), 3, 3), np.nan, dtype=np.float32)
        self.best_t = np.full((len(particles), 2), np.nan, dtype=np.float32)
        self.max_prob = np.full(len(particles), np.nan, dtype=np.float32)
        if state is not None:
            self._load(state)
        else:
            self._start()

    # ---- set-up -------------------------------------------------------------------
    def _check_out_dir(self, resume: bool, force: bool) -> None:
        info = self.out / "run.json"
        if resume and not force and not self.ckpt_path.exists():
            raise InputError(f"{self.out}: no checkpoint.pt to resume from")
        self.lock = runstate.RunLock(self.out, owner=self)
        if force or not self.out.exists():
            if force and self.out.exists():
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
                for snap in (self.out / "snapshots").glob("volume_*.mrc"):
                    snap.unlink()
            self.out.mkdir(parents=True, exist_ok=True)
            return
        finished = info.exists() and json.loads(info.read_text()).get("finished", False)
        if resume:
            if finished:
                raise OutputExistsError(f"{self.out}: this run converged; nothing to resume (use --force to start over)")
            return
        if self.ckpt_path.exists() or finished or (self.out / "volume.mrc").exists():
            what = "a finished run" if finished else "an unfinished run (use --resume to continue it)"
            raise OutputExistsError(f"{self.out} holds {what}; refusing to overwrite (use --force to start over)")
        self.out.mkdir(parents=True, exist_ok=True)

    def level(self, omega: float) -> Level:
        if omega not in self.levels:
            self.levels = {omega: make_level(omega, self.D, self.apix, self.shift_sigma_px, self.cfg.grid_scale,
                                             self.device, self.cfg.oversample, int(self.cfg.cache_gib * 2 ** 30))}
        return self.levels[omega]

    def _make_prior(self, n_train: int, h: float):
        c = self.cfg
        if c.prior == "exponential":
            lam = c.prior_lambda or default_exponential_lambda(self.V, n_train, h, c.prior_strength)
            log.info(f"exponential prior: lambda = {lam:.4g}")
            return make_prior("exponential", lam=lam)
        if c.prior == "car":
            sigma = c.car_sigma or float(self.V.std())
            return make_prior("car", sigma_car=sigma)
        return make_prior(c.prior)

    def _start(self) -> None:
        c = self.cfg
        V = random_spheres(self.D, 0.5 * self.diameter_px, c.n_spheres, self.gen)
        pilot = self.batches[0][: min(200, len(self.batches[0]))]
        lvl = self.level(self.schedule.omega_star(0))
        V, h = scale_to_data(V, self.p, pilot, lvl, self.diameter_px, c.oversample, self.gen, self.device)
        self.V = V.to(self.device)
        self.prior = self._make_prior(n_train=sum(len(b) for b in self.batches), h=h)
        self.sagd = SAGD(self.K, self.V.shape, self.device, line_search_every=c.line_search_every)
        self.metrics_path.write_text("")
        write_map(self.out / "initial.mrc", self.V.cpu().numpy(), self.apix, overwrite=True)
        self._write_info(finished=False)

    # ---- objective ------------------------------------------------------------------
    def batch_objective(self, idx, lvl: Level, want_grad=True, exact=False):
        """Objective of one minibatch at the current map, with importance sampling when on
        (``exact``: the full quadrature regardless).

        Returns ``(value, grad, f, info)``: the minibatch negative log-likelihood and its
        gradient at ``self.V``, a closure ``f(V)`` = likelihood part + prior / K on the same
        pose samples (for the line search), and diagnostics. The pose history of the
        particles is updated from this evaluation's posteriors.
        """
        batch = load_batch(self.p, idx, lvl.halfplane, self.diameter_px, self.device)
        plan = self.sampler.split_plan(idx, lvl.grid, MAX_SAMPLED_FRACTION) \
            if self.sampler is not None and not exact else None
        K, ov, dev = self.K, self.cfg.oversample, self.device

        def exact_part(b, want_grad, want_posteriors):
            return lvl.slice_op, lambda S: marginal_loglik(S, b, lvl.shifts, lvl.log_w_rot, lvl.log_w_shift,
                                                           want_grad, want_posteriors)

        if plan is None:
            fraction = computed = 1.0

            def nll(V, want_grad=False, want_posteriors=False):
                return volume_objective(V, [exact_part(batch, want_grad, want_posteriors)], ov, want_grad)
        else:
            fraction, computed = plan.fraction, plan.fraction_computed
            rot_ids = plan.rot_ids.to(dev)
            exact_batch = batch.rows(plan.exact_rows) if len(plan.exact_rows) else None
            if exact_batch is None:
                union_op = lvl.slice_op.subset(rot_ids)

                def nll(V, want_grad=False, want_posteriors=False):
                    part = (union_op, lambda S: sampled_loglik_groups(S, batch, plan.groups, want_grad, lvl.shifts))
                    return volume_objective(V, [part], ov, want_grad)
            else:
                # Diffuse images need every slice: slice the whole grid once and hand the
                # sampled groups their rows of it (no second slicing or back-projection).
                def both(S, want_grad):
                    ex = marginal_loglik(S, exact_batch, lvl.shifts, lvl.log_w_rot, lvl.log_w_shift, want_grad, True)
                    sm = sampled_loglik_groups(S[rot_ids], batch, plan.groups, want_grad, lvl.shifts)
                    if want_grad:
                        ex.grad_slices.index_add_(0, rot_ids, sm.grad_slices)
                        sm.grad_slices = None
                    return CombinedResult(torch.cat([sm.loglik, ex.loglik]), ex.grad_slices, [sm, ex])

                def nll(V, want_grad=False, want_posteriors=False):
                    val, grad, res = volume_objective(V, [(lvl.slice_op, lambda S: both(S, want_grad))], ov, want_grad)
                    return val, grad, res[0].parts

        def f(V):
            return nll(V)[0] + float(self.prior.neg_log_prior(V)) / K

        val, grad, res = nll(self.V, want_grad=want_grad, want_posteriors=True)
        kl = self._update_poses(idx, lvl, plan, res)
        return val, grad, f, {"fraction": fraction, "computed": computed, "kl_directions": kl}

    def _update_poses(self, idx, lvl: Level, plan, results) -> float | None:
        """Record each particle's most probable view and, with importance sampling, its phi~.

        ``results`` come from :meth:`batch_objective`'s parts: the exact result alone, or the
        grouped sampled result followed by the exact one for ``plan.exact_rows``."""
        g, idx = lvl.grid, np.asarray(idx)
        kls, weights = [], []

        def record(rows, rot_ids, shifts_px, max_prob):
            i = idx[rows]
            self.best_R[i] = lvl.rotations[rot_ids.to(lvl.rotations.device)].cpu().numpy()
            self.best_dir[i] = self.best_R[i][:, 2, :]
            self.best_t[i] = shifts_px.cpu().numpy()
            self.max_prob[i] = max_prob.cpu().numpy()

        def exact(rows, res):
            record(rows, res.best_rot.cpu(), lvl.shifts[res.best_shift], res.max_prob)
            if self.sampler is not None:
                kls.append(self.sampler.update_exact(idx[rows], self.tau, res.post_rot.cpu(), res.post_shift.cpu(), g))
                weights.append(len(rows))

        if plan is None:
            exact(np.arange(len(idx)), results[0])
        else:
            for grp, res in zip(plan.groups, results[0].groups):
                rows = grp.rows.numpy()
                best = torch.gather(grp.rot_idx, 1, res.post_rot.cpu().argmax(-1, keepdim=True)).squeeze(1)
                t_best = grp.shifts[torch.arange(len(rows)), res.post_shift.cpu().argmax(-1)]
                record(rows, plan.rot_ids[best], t_best, res.max_prob)
                kls.append(self.sampler.update_sampled(idx[rows], self.tau, grp, res.post_rot.cpu(),
                                                       res.post_shift.cpu(), g))
                weights.append(len(rows))
            if len(plan.exact_rows):
                exact(plan.exact_rows.numpy(), results[1])
        pairs = [(k, w) for k, w in zip(kls, weights) if math.isfinite(k)]
        if not pairs:
            return None
        return sum(k * w for k, w in pairs) / sum(w for _, w in pairs)

    def check_groups(self) -> int:
        """Number of groups of ``is_check`` held-out particles the importance check rotates through:
        about K / heldout_every, so that a checked particle was last visited about K iterations
        earlier, like a training particle (at most len(heldout) // is_check groups)."""
        c = self.cfg
        n = min(c.is_check, len(self.heldout))
        return max(1, min(round(self.K / c.heldout_every), len(self.heldout) // max(n, 1)))

    def check_particles(self, pool: bool = False) -> np.ndarray:
        """The held-out particles the importance check scores at this iteration (``pool``: all
        groups, whose histories only the check updates)."""
        c = self.cfg
        n = min(c.is_check, len(self.heldout))
        if n <= 0:
            return self.heldout[:0]
        G = self.check_groups()
        if pool:
            return self.heldout[:n * G]
        g = (self.tau // c.heldout_every) % G
        return self.heldout[g * n:(g + 1) * n]

    def importance_check(self, lvl: Level) -> float | None:
        """Relative error of the importance-sampled log-likelihood on ``is_check`` held-out
        particles, against the exact quadrature at the current map; re-anneals on failure.

        Importance sampling only looks near each particle's previous posterior (plus the
        uniform share alpha, 5% once annealed). While the map still changes a lot between
        visits, particles can lock onto poses that the current map no longer favours; the
        sampled estimate then falls short of the exact marginal (``benchmarks/importance_locking.py``
        at the end of a 200-iteration run on the `small` set: 7.1 nats a particle, 1.3%). When
        ``|sum log p_IS - sum log p| / |sum log p| > is_tolerance`` (default 1e-3, the paper's
        0.1%), the annealing clock is halved (``anneal_from`` moves to the middle of the
        elapsed clock), so alpha and T grow again and draws spread out.

        The checked particles stand in for training particles: they are held out (never
        trained on), rotate through :meth:`check_groups` groups so that each was last visited
        about K iterations ago (the held-out evaluation does not refresh their histories), and
        keep the history of their own sampled visit, as a training particle does; the exact
        evaluation is only a peek. A particle's first visit (no history) stores one and is not
        scored. Returns the relative error, or None when nothing was sampled.
        """
        c = self.cfg
        if self.sampler is None or c.is_check <= 0:
            return None
        idx = self.check_particles()
        hist = self.sampler.hist
        first = bool((hist.tau_prev[idx] < 0).all())
        v_is, _, _, info = self.batch_objective(idx, lvl, want_grad=False)
        if first or info["fraction"] >= 1.0:
            return None
        visited = hist.rows(idx)
        v_ex, _, _, _ = self.batch_objective(idx, lvl, want_grad=False, exact=True)
        hist.set_rows(idx, visited)
        rel = abs(v_is - v_ex) / max(abs(v_ex), 1e-30)
        if rel > c.is_tolerance:
            clock = self.sampler.annealing_clock(self.tau)
            self.sampler.anneal_from += clock - clock // 2
            log.info(f"iteration {self.tau}: sampled log-likelihood off by {rel:.2g} (> {c.is_tolerance:g}); "
                     f"annealing clock {clock} -> {self.sampler.annealing_clock(self.tau)}")
        return rel

    def heldout_error(self, lvl: Level) -> float:
        """Mean negative log-likelihood per held-out particle at the current omega*.

        Evaluated like a training minibatch (without a gradient), so with importance sampling
        it is the Eq. 13 estimate (log of an unbiased estimate of p: slightly pessimistic)
        and the held-out particles keep their own pose histories; they never enter SAGD. The
        importance check's particles (:meth:`check_particles`) are scored too, but their
        histories are left as their last check visit stored them.
        """
        pool = self.check_particles(pool=True) if self.sampler is not None else self.heldout[:0]
        saved = self.sampler.hist.rows(pool) if len(pool) else None
        total = 0.0
        for s in range(0, len(self.heldout), self.cfg.minibatch):
            idx = self.heldout[s:s + self.cfg.minibatch]
            val, _, _, _ = self.batch_objective(idx, lvl, want_grad=False)
            total += val
        if saved is not None:
            self.sampler.hist.set_rows(pool, saved)
        return total / len(self.heldout)

    # ---- loop ---------------------------------------------------------------------------
    def next_batch(self) -> int:
        if not self.order:
            self.order = torch.randperm(self.K, generator=self.gen).tolist()
        return self.order.pop()

    def should_stop(self) -> str | None:
        c = self.cfg
        if self.tau >= c.max_iters:
            return "max_iters"
        if c.max_time is not None and self.elapsed >= c.max_time:
            return "max_time"
        at_top = self.schedule.omega_star(self.tau) >= self.schedule.omega_star(10 ** 12)
        if at_top and self.since_improve >= c.patience:
            return "converged"
        return None

    def run(self) -> dict:
        c = self.cfg
        pb = bar(total=c.max_iters, initial=self.tau, desc="reconstructing", unit="it")
        reason = self.should_stop()
        runstate.warn_if_nothing_to_do(reason, self.tau, self.elapsed)
        stop = runstate.SignalStop()
        t_last = time.perf_counter()
        while reason is None:
            self.tau += 1
            tau = self.tau
            omega = self.schedule.omega_star(tau)
            lvl = self.level(omega)
            k = self.next_batch()
            idx = self.batches[k]
            val, grad, f, info = self.batch_objective(idx, lvl)
            prior_grad = self.prior.grad(self.V)
            f_V = val + float(self.prior.neg_log_prior(self.V)) / self.K
            g_k = grad + prior_grad / self.K
            doublings = 0
            if self.sagd.L is None:
                L0 = float((g_k.double() ** 2).sum().sqrt() / max(1e-12, float(self.V.double().norm()))) or 1.0
                self.sagd.initial_L(f, self.V, f_V, g_k, L0)
            elif tau % c.line_search_every == 0:
                doublings = self.sagd.line_search(f, self.V, f_V, g_k)
            else:
                self.sagd.decay_L()
            eps = self.schedule.epsilon(tau)
            self.V = self.sagd.step(self.V, k, grad, prior_grad, eps)
            heldout = is_check = None
            if tau % c.heldout_every == 0:
                is_check = self.importance_check(lvl)
                heldout = self.heldout_error(lvl)
                # Held-out errors are comparable only at one cut-off (more coefficients, larger NLL).
                if omega != self.best_omega:
                    self.best_heldout, self.since_improve, self.best_omega = heldout, 0, omega
                elif heldout < self.best_heldout - 1e-6 * abs(self.best_heldout):
                    self.best_heldout, self.since_improve = heldout, 0
                else:
                    self.since_improve += 1
                self.last_heldout = heldout
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            self._log({
                "iteration": tau, "seconds": round(self.elapsed, 3), "omega_star": omega,
                "resolution_A": 1.0 / omega, "epsilon": eps, "L": self.sagd.L, "line_search_doublings": doublings,
                "train_nll": val / len(idx), "heldout_nll": heldout, "minibatch": int(len(idx)),
                "poses_evaluated": round(info["fraction"] * len(idx) * lvl.n_poses),
                "poses_full": int(len(idx)) * lvl.n_poses, "fraction_evaluated": info["fraction"],
                "fraction_computed": info["computed"],
                "kl_directions": info["kl_directions"], "is_check_rel_error": is_check,
                "annealing_clock": None if self.sampler is None else self.sampler.annealing_clock(tau),
                "coefficients": lvl.halfplane.M, "epoch": round(tau / self.K, 3),
            })
            pb.update(1)
            pb.total = runstate.bar_total(tau, self.elapsed, c.max_iters, c.max_time)
            pb.set_postfix(res=f"{1 / omega:.1f}A", heldout="-" if self.last_heldout is None else f"{self.last_heldout:.4g}")
            if tau % c.snapshot_every == 0:
                write_map(self.out / "snapshots" / f"volume_{tau:06d}.mrc", self.V.cpu().numpy(), self.apix, overwrite=True)
            if tau % c.checkpoint_every == 0:
                self._save()
                self._write_info(finished=False)
            self._refresh_report()
            reason = self.should_stop() or stop.reason
        stop.restore()
        pb.close()
        self._save()
        self._export()
        self._write_info(finished=reason == "converged", reason=reason)
        self.lock.release()
        self._refresh_report(force=True)
        log.info(f"stopped after {self.tau} iterations ({reason}); map: {self.out / 'volume.mrc'}")
        return {"iterations": self.tau, "seconds": self.elapsed, "reason": reason, "volume": str(self.out / "volume.mrc")}

    def _refresh_report(self, force: bool = False) -> None:
        """Rebuild OUT/report.html at most every ``report_every`` seconds (and at the end)."""
        if self.cfg.report_every is None:
            return
        now = time.monotonic()
        if force or now - getattr(self, "_last_report", -math.inf) >= self.cfg.report_every:
            from .report import refresh_report

            refresh_report(self.out)
            self._last_report = time.monotonic()

    # ---- persistence ---------------------------------------------------------------------
    def _log(self, rec: dict) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def _save(self) -> None:
        state = {
            "V": self.V.cpu(), "sagd": self.sagd.state_dict(), "tau": self.tau, "elapsed": self.elapsed,
            "gen": self.gen.get_state(), "order": list(self.order), "best_heldout": self.best_heldout,
            "best_omega": self.best_omega,
            "since_improve": self.since_improve, "last_heldout": self.last_heldout,
            "config": asdict(self.cfg), "prior_state": _prior_state(self.prior),
            "best_dir": self.best_dir, "best_R": self.best_R, "best_t": self.best_t, "max_prob": self.max_prob,
            "importance": None if self.sampler is None else self.sampler.hist.state_dict(),
            "importance_gen": None if self.sampler is None else self.sampler.gen.get_state(),
            "importance_anneal_from": None if self.sampler is None else self.sampler.anneal_from,
            "fingerprint": self.fingerprint,
        }
        tmp = self.ckpt_path.with_name(".checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)
        write_map(self.out / "volume.mrc", self.V.cpu().numpy(), self.apix, overwrite=True)
        tmp = self.out / ".poses.tmp.npz"
        np.savez(tmp, **self.poses())
        os.replace(tmp, self.out / "poses.npz")

    def _export(self) -> None:
        """RUN/particles.star (and .cs for a cryoSPARC input) with the run's poses; a set
        that cannot be exported (e.g. no particle visited yet) is a warning, not a failure."""
        from .io.export import export_poses

        try:
            export_poses(self.p, self.poses(), self.out, overwrite=True)
        except (InputError, OSError, ValueError) as exc:
            log.warning(f"poses not exported to {self.out / 'particles.star'}: {exc}")

    def poses(self) -> dict[str, np.ndarray]:
        """Each particle's most probable pose so far, as written to ``poses.npz`` and read by
        :func:`cryorecon.io.export.export_poses`: RELION Euler angles (``eulers_deg`` (N, 3):
        rot, tilt, psi), origins (``shifts_A`` (N, 2): rlnOriginXAngst/YAngst), ``max_prob``
        (rlnMaxValueProbDistribution), view ``directions`` (N, 3), ``subset`` (0: no half-set
        yet), ``class_number`` (1-based); NaN for particles never visited."""
        n = len(self.max_prob)
        seen = np.isfinite(self.max_prob)
        eulers = np.full((n, 3), np.nan)
        shifts = np.full((n, 2), np.nan)
        if seen.any():
            apix = np.asarray(self.p.apix, dtype=np.float64)[seen]
            eulers[seen], shifts[seen] = pose_to_relion(torch.as_tensor(self.best_R[seen]),
                                                        torch.as_tensor(self.best_t[seen]), apix)
        return {"eulers_deg": eulers, "shifts_A": shifts, "max_prob": self.max_prob.astype(np.float64),
                "directions": self.best_dir, "subset": np.zeros(n, dtype=np.int64),
                "class_number": np.ones(n, dtype=np.int64)}

    def _load(self, s: dict) -> None:
        self.V = s["V"].to(self.device)
        self.sagd = SAGD(self.K, self.V.shape, self.device)
        self.sagd.load_state_dict(s["sagd"])
        self.tau, self.elapsed = s["tau"], s["elapsed"]
        self.gen.set_state(s["gen"])
        self.order = list(s["order"])
        self.best_heldout, self.since_improve = s["best_heldout"], s["since_improve"]
        self.best_omega = s.get("best_omega")
        self.last_heldout = s["last_heldout"]
        self.prior = _prior_from_state(s["prior_state"])
        self.best_dir = s["best_dir"]
        n = len(self.best_dir)
        self.best_R = s.get("best_R", np.full((n, 3, 3), np.nan, dtype=np.float32))
        self.best_t = s.get("best_t", np.full((n, 2), np.nan, dtype=np.float32))
        self.max_prob = s.get("max_prob", np.full(n, np.nan, dtype=np.float32))
        if self.sampler is not None and s.get("importance") is not None:
            self.sampler.hist.load_state_dict(s["importance"])
            self.sampler.gen.set_state(s["importance_gen"])
            self.sampler.anneal_from = s.get("importance_anneal_from") or 0
        # Drop metric lines written after the checkpoint: they will be recomputed.
        runstate.trim_metrics(self.metrics_path, self.tau)
        log.info(f"resuming {self.out} at iteration {self.tau}")

    def _write_info(self, finished: bool, reason: str | None = None) -> None:
        info = {
            "finished": finished, "stop_reason": reason, "iterations": self.tau, "seconds": self.elapsed,
            "config": asdict(self.cfg), "particles": str(self.p.source), "n_particles": len(self.p),
            "n_heldout": int(len(self.heldout)), "n_minibatches": self.K, "box": self.D, "apix": self.apix,
            "diameter_A": self.diameter_px * self.apix, "shift_sigma_A": self.shift_sigma_px * self.apix,
            "versions": {"cryorecon": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        }
        info.update(self.p.meta.get("contrast", {}))  # set by cryorecon.contrast.apply_contrast
        tmp = self.out / ".run.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, self.out / "run.json")


RESUME_OVERRIDES = ("max_iters", "max_time", "device", "report_every", "cache_gib")


def _resumed_config(saved: dict, requested: ReconstructConfig) -> ReconstructConfig:
    """The checkpoint's configuration, with the limits and device the user asked for now.

    Everything that shapes the optimisation (seed, minibatches, schedule, prior, grids) comes
    from the checkpoint, so a resumed run continues the same computation.
    """
    known = {k: v for k, v in saved.items() if k in ReconstructConfig.__dataclass_fields__}
    for k in RESUME_OVERRIDES:
        known[k] = getattr(requested, k)
    return ReconstructConfig(**known)


def _prior_state(prior) -> dict:
    return {"name": prior.name, "attrs": {k: v for k, v in vars(prior).items() if isinstance(v, (int, float))}}


def _prior_from_state(state: dict):
    name = state["name"]
    attrs = state["attrs"]
    if name == "exponential":
        return make_prior("exponential", lam=attrs["lam"])
    if name == "car":
        return make_prior("car", sigma_car=attrs["sigma_car"])
    return make_prior(name)


def reconstruct(particles, out_dir, config: ReconstructConfig, resume=False, force=False) -> dict:
    """Run (or resume) a reconstruction; returns a summary dict."""
    return Run(particles, out_dir, config, resume=resume, force=force).run()
