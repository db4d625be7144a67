"""The reconstruction driver: the loop of Algorithm 1, held-out error, checkpoints (Sec. 3-4).

It owns state and time; the math lives in :mod:`cryorecon.model` and :mod:`cryorecon.optim`,
the set-up (random start, scale, particle splits) in :mod:`cryorecon.start`.

Per iteration tau: the cut-off omega* (:mod:`cryorecon.optim.adaptive`) sets the Fourier
coefficients in use and the quadrature (Sec. 3.2); a :class:`~cryorecon.model.objective.
Marginaliser` evaluates one minibatch's negative log marginal likelihood and its gradient
(Eq. 2-5); with the prior's gradient they feed one SAGD step (Algorithm 1,
:meth:`~cryorecon.optim.sagd.SAGD.update`). Every ``heldout_every`` iterations the mean
negative log-likelihood of the held-out particles (never trained on) is measured; it raises
omega* (adaptive schedule) and stops the run at the final cut-off once it no longer improves
for ``patience`` evaluations. The run also stops at ``max_iters`` or ``max_time``.

Past ``join_resolution_A`` the particles are split into two half-sets refined independently
(:meth:`Run.maybe_split`); with ``classes`` > 1 every minibatch steps K maps with the class
posteriors as image weights (:meth:`Run._step_classes`, :mod:`cryorecon.model.classes`);
with a point group the poses cover its asymmetric unit and the gradients are symmetrised;
under ``torchrun`` each minibatch is split across the ranks (:mod:`cryorecon.parallel`).

Outputs in the run folder: ``volume.mrc`` (current map, voxel size in the header; after the
split the FSC-weighted combination of ``volume_half1.mrc`` and ``volume_half2.mrc``, and at
the end of a split run that of the half-sets' reconstructions from their refined poses,
``backprojection_half1/2.mrc``, the refined halves' then in ``volume_refined.mrc``; with
classes the most populated of ``volume_class001.mrc`` ...), ``snapshots/volume_XXXXXX.mrc``,
``metrics.jsonl`` (one JSON object per iteration), ``checkpoint.pt`` (everything needed by
``resume``), ``poses.npz`` and ``particles.star`` (each particle's most probable pose),
``run.json`` (parameters, versions, timings, ``finished``, ``gold_standard_resolution_A``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from . import __version__, parallel, runstate
from .config import ReconstructConfig
from .errors import InputError, OutputExistsError
from .geometry.poses import pose_to_relion
from .geometry.symmetry import parse_symmetry
from .io.atomic import write_json
from .io.checks import single_pixel_size
from .io.mrc import write_map
from .model.classes import ClassPosteriors, default_anneal, tie_to_mean, to_tensor
from .model.importance import ImportanceSampler, ISConfig
from .model.objective import MAX_SAMPLED_FRACTION, Evaluation, ExactQuadrature, ImportanceSampled
from .model.priors import make_prior
from .model.search import CoarseToFine, search_config
from .optim.adaptive import AdaptiveResolution, HeldoutPatience, PaperResolution
from .optim.sagd import SAGD
from .preprocess import default_diameter_A, load_batch
from .progress import bar, log
from .start import (
    Level,
    default_exponential_lambda,
    half_sets,
    make_level,
    random_spheres,
    scale_to_data,
    split_particles,
)
from .validate import fsc, resolution_at

__all__ = ["ReconstructConfig", "Run", "reconstruct", "MAX_SAMPLED_FRACTION", "Level", "make_level"]

# What a run writes in its folder (besides snapshots/); --force removes these first.
RUN_FILES = (
    "checkpoint.pt",
    "metrics.jsonl",
    "run.json",
    "volume.mrc",
    "initial.mrc",
    "poses.npz",
    "report.html",
    "particles.star",
    "particles.cs",
    "volume_half1.mrc",
    "volume_half2.mrc",
    "backprojection_half1.mrc",
    "backprojection_half2.mrc",
    "volume_refined.mrc",
)

# The accuracy check of the coarse-to-fine search scores at most as many particles as the
# exact sum can afford within this many (pose x coefficient) products (at least
# MIN_CHECK_PARTICLES, else it is skipped), every SEARCH_CHECK_EVERY iterations.
CHECK_BUDGET = 3e9
# The adaptive schedule's default cap on the iterations at one cut-off (Run.omega_max_iters).
OMEGA_MAX_ITERS = 400
MIN_CHECK_PARTICLES = 4
SEARCH_CHECK_EVERY = 50


class Run:
    """A reconstruction run bound to an output folder (fresh, resumed, or refused)."""

    def __init__(
        self,
        particles,
        out_dir,
        config: ReconstructConfig,
        resume: bool = False,
        force: bool = False,
    ):
        self.p = particles
        self.out = Path(out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        state = None
        if resume and self.ckpt_path.exists() and not force:
            state = runstate.load_checkpoint(self.ckpt_path, particles, config, RESUME_OVERRIDES)
            config = _resumed_config(state["config"], config)
        self.cfg = c = config
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("--device cuda requested but CUDA is not available")
        self.ranks, device = parallel.setup(c.device)
        self.device = torch.device(device)
        if self.ranks.active and c.classes > 1:
            raise InputError("--classes with several ranks (torchrun) is not supported yet")
        self.metrics_path = self.out / "metrics.jsonl"
        self.D = particles.D
        self.apix = single_pixel_size(particles)
        self.fingerprint = runstate.particle_fingerprint(particles)
        self.diameter_px = (c.diameter_A or default_diameter_A(self.D, self.apix)) / self.apix
        shift_sigma_A = (
            c.shift_sigma_A if c.shift_sigma_A is not None else 0.05 * self.D * self.apix
        )
        self.shift_sigma_px = shift_sigma_A / self.apix
        self.schedule = c.schedule(self.apix)
        self.group = parse_symmetry(c.symmetry)
        self.group.require_proper("reconstruct")
        # The group is imposed (poses on its asymmetric unit, symmetrised gradients) from the
        # start, or after a C1 phase (maybe_impose_symmetry).
        self.symmetry_imposed = self.group.order == 1 or not c.symmetry_c1_start
        problem = None
        if self.ranks.is_main:
            try:
                self._check_out_dir(resume, force)
            except (InputError, OutputExistsError, runstate.BusyError) as exc:
                problem = exc
                if getattr(self, "lock", None) is not None:  # refused after taking the lock
                    self.lock.release()
        problem = self.ranks.broadcast_object(problem)
        if problem is not None:
            raise problem
        self.heldout, self.batches = split_particles(len(particles), c.heldout, c.minibatch, c.seed)
        runstate.warn_if_heldout_cut(len(self.heldout), c.heldout, len(particles))
        self.K = len(self.batches)
        self.resolution = self._resolution_schedule()
        self.gen = torch.Generator().manual_seed(c.seed)
        self.levels: dict[tuple[float, float], Level] = {}
        self.prior = None
        self.tau = 0
        self.elapsed = 0.0
        self.order: list[int] = []
        self.heldout_state = HeldoutPatience()
        self.sampler = (
            ImportanceSampler(len(particles), ISConfig(s0=c.s0), self.schedule, c.seed)
            if c.pose_search == "importance"
            else None
        )
        self.exact = ExactQuadrature(c.oversample)
        self.objective = self._marginaliser()
        n = len(particles)
        self.best_R = np.full((n, 3, 3), np.nan, dtype=np.float32)
        self.best_t = np.full((n, 2), np.nan, dtype=np.float32)
        self.max_prob = np.full(n, np.nan, dtype=np.float32)
        # Iteration of each particle's last update on this rank (-1: none), for gathering
        # the newest per-particle state of a data-parallel run (parallel.newest_rows).
        self.updated_at = np.full(n, -1, dtype=np.int64)
        # Gold-standard half-sets (0 until the split, then 1 or 2 per particle), their maps
        # and SAGD states; batch_half[k] is minibatch k's half (0 before the split).
        self.subset = np.zeros(n, dtype=np.int64)
        self.halves: list[torch.Tensor] | None = None
        self.half_sagd: list[SAGD] | None = None
        self.batch_half = [0] * self.K
        self.gold_standard: dict | None = None
        self.class_gold_standard: list[dict] | None = None
        self.split_at: int | None = None
        # The finest cut-off (1/Å) the halves have been refined at: the gold-standard
        # resolution is stated no finer (their FSC beyond it is not signal).
        self.half_omega: float | None = None
        # Several classes (Eq. 3 with a class index): class 0 is self.V / self.sagd /
        # self.objective; the lists hold all K (see _start_classes).
        self.classes: ClassPosteriors | None = None
        self.class_maps: list[torch.Tensor] | None = None
        self.class_sagd: list[SAGD] | None = None
        self.class_split_at: int | None = None
        if c.classes > 1:
            if c.classes * 10 > len(particles) - len(self.heldout):
                raise InputError(
                    f"--classes {c.classes}: need at least 10 training particles per class "
                    f"({len(particles) - len(self.heldout)} training particles)"
                )
            self.classes = ClassPosteriors(
                n, c.classes, c.class_similarity, *default_anneal(self.K)
            )
            samplers = (
                [self.sampler]
                + [
                    ImportanceSampler(n, ISConfig(s0=c.s0), self.schedule, c.seed + 1000 * k)
                    for k in range(1, c.classes)
                ]
                if self.sampler is not None
                else None
            )
            self.class_samplers = samplers
            self.class_objectives = [self.objective] + [
                ImportanceSampled(samplers[k], c.oversample) if samplers else self.objective
                for k in range(1, c.classes)
            ]
        if state is not None:
            self._load(state)
        else:
            self._start()

    # ---- set-up -------------------------------------------------------------------
    def omega_max_iters(self) -> int:
        """The most iterations the adaptive schedule spends at one cut-off: ``omega_max_iters``,
        or by default one epoch (every training particle visited once at that cut-off, its
        SAGD gradient refreshed), within ``[omega_min_iters, OMEGA_MAX_ITERS]``."""
        c = self.cfg
        if c.omega_max_iters is not None:
            return c.omega_max_iters
        return int(min(OMEGA_MAX_ITERS, max(c.omega_min_iters, self.K)))

    def _resolution_schedule(self):
        c = self.cfg
        if c.resolution_schedule == "paper":
            return PaperResolution(self.schedule)
        return AdaptiveResolution(
            start=c.first_omega,
            max_=c.omega_max,
            factor=c.omega_factor,
            min_iters=c.omega_min_iters,
            max_iters=self.omega_max_iters(),
            patience=c.omega_patience,
            plateau=c.omega_plateau,
            nyquist=1.0 / (2.0 * self.apix),
        )

    def _marginaliser(self):
        c = self.cfg
        if c.pose_search == "exact":
            return self.exact
        if c.pose_search == "importance":
            return ImportanceSampled(self.sampler, c.oversample)
        return CoarseToFine(
            self.D,
            self.apix,
            self.shift_sigma_px,
            c.grid_scale,
            c.oversample,
            search_config(
                c.search_mode, c.search_epsilon, c.search_max_rotations, c.search_coarse_radius
            ),
            cache_bytes=int(c.cache_gib * 2**30),
        )

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
                for pattern in (
                    "volume_class[0-9][0-9][0-9].mrc",
                    "volume_class[0-9][0-9][0-9]_refined.mrc",
                    "backprojection_class[0-9][0-9][0-9]_half[12].mrc",
                ):
                    for old in self.out.glob(pattern):
                        old.unlink()
            self.out.mkdir(parents=True, exist_ok=True)
            return
        finished = info.exists() and json.loads(info.read_text()).get("finished", False)
        if resume:
            if finished:
                raise OutputExistsError(
                    f"{self.out}: this run converged; nothing to resume (use --force to start over)"
                )
            return
        if self.ckpt_path.exists() or finished or (self.out / "volume.mrc").exists():
            what = (
                "a finished run" if finished else "an unfinished run (use --resume to continue it)"
            )
            raise OutputExistsError(
                f"{self.out} holds {what}; refusing to overwrite (use --force to start over)"
            )
        self.out.mkdir(parents=True, exist_ok=True)

    def level(self, omega: float) -> Level:
        """The quadrature level of cut-off ``omega`` at the configured grid scale (one kept at a
        time)."""
        key = (omega, self.cfg.grid_scale, self.symmetry_imposed)
        if key not in self.levels:
            self.levels = {
                key: make_level(
                    omega,
                    self.D,
                    self.apix,
                    self.shift_sigma_px,
                    self.cfg.grid_scale,
                    self.device,
                    self.cfg.oversample,
                    int(self.cfg.cache_gib * 2**30),
                    self.cfg.symmetry if self.symmetry_imposed else "C1",
                    self.cfg.shift_step,
                )
            }
        return self.levels[key]

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
        lvl = self.level(self.resolution.omega_star(0))
        V, h = scale_to_data(
            V, self.p, pilot, lvl, self.diameter_px, c.oversample, self.gen, self.device
        )
        self.V = self._symmetric(V.to(self.device))
        self.prior = self._make_prior(n_train=sum(len(b) for b in self.batches), h=h)
        self.sagd = SAGD(self.K, self.V.shape, self.device, line_search_every=c.line_search_every)
        if self.ranks.is_main:
            self.metrics_path.write_text("")
            write_map(self.out / "initial.mrc", self.V.cpu().numpy(), self.apix, overwrite=True)
        self._write_info(finished=False)

    # ---- objective ------------------------------------------------------------------
    def batch_objective(
        self,
        idx,
        lvl: Level,
        want_grad: bool = True,
        record: bool | np.ndarray = True,
        objective=None,
        V: torch.Tensor | None = None,
    ) -> Evaluation:
        """One minibatch's :class:`~cryorecon.model.objective.Evaluation` by the run's
        marginaliser (or ``objective``) at map ``V`` (default: the map of the particles'
        half-set, :meth:`map_of`); ``record`` as in the protocol."""
        idx = np.asarray(idx)
        if V is None and self.halves is not None and len(np.unique(self.subset[idx])) > 1:
            return self._by_half(idx, lvl, want_grad, record, objective)
        obj = objective or self.objective
        V = self.map_of(idx) if V is None else V
        if not self.ranks.active:
            batch = load_batch(self.p, idx, lvl.halfplane, self.diameter_px, self.device)
            ev = obj.evaluate(V, batch, idx, lvl, self.tau, want_grad=want_grad, record=record)
        else:
            ev = self._evaluate_share(obj, V, idx, lvl, want_grad, record)
        rec = np.broadcast_to(np.asarray(record, dtype=bool), idx.shape)
        self.updated_at[self.ranks.mine(idx)[self.ranks.mine(rec)]] = self.tau
        return ev

    def _evaluate_share(self, obj, V, idx, lvl, want_grad, record) -> Evaluation:
        """This rank's rows of ``idx`` evaluated, then values and gradient summed over the
        ranks (:mod:`cryorecon.parallel`); per-image fields stay this rank's."""
        r = self.ranks
        mine = r.mine(idx)
        rec = record if isinstance(record, bool) else np.asarray(record)[r.rank :: r.world].copy()
        if len(mine):
            batch = load_batch(self.p, mine, lvl.halfplane, self.diameter_px, self.device)
            ev = obj.evaluate(V, batch, mine, lvl, self.tau, want_grad=want_grad, record=rec)
            refit = ev.refit
        else:
            e = torch.empty(0, device=self.device)
            ev = Evaluation(
                0.0,
                torch.zeros_like(V) if want_grad else None,
                e.double(),
                e.reshape(0, 3, 3),
                e.reshape(0, 2),
                e,
                0.0,
                0.0,
                lambda V: 0.0,
            )
            refit = ev.refit
        n = float(len(mine))
        total = r.sum(n)
        ev.value = r.sum(ev.value)
        if ev.grad is not None:
            r.sum_(ev.grad)
        ev.fraction = r.sum(ev.fraction * n) / total
        ev.computed = r.sum(ev.computed * n) / total
        ev.refit = lambda V, refit=refit: r.sum(refit(V))
        ev.particles = mine
        return ev

    def _by_half(self, idx, lvl, want_grad, record, objective) -> Evaluation:
        """Particles of both half-sets, each scored against its own half's map: the two
        evaluations joined (values add; per-image results in the order of ``idx``)."""
        if want_grad:
            raise ValueError("a gradient needs the particles of one half-set")
        rec = np.broadcast_to(np.asarray(record, dtype=bool), idx.shape)
        parts, order = [], []
        for h in (1, 2):
            rows = np.flatnonzero(self.subset[idx] == h)
            parts.append(self.batch_objective(idx[rows], lvl, False, rec[rows].copy(), objective))
            order.append(rows)
        inv = torch.as_tensor(np.argsort(np.concatenate(order)))
        cat = lambda name: torch.cat([getattr(e, name).cpu() for e in parts])[inv]  # noqa: E731
        n = [len(r) for r in order]
        mean = lambda name: sum(getattr(e, name) * k for e, k in zip(parts, n)) / sum(n)  # noqa: E731
        return Evaluation(
            sum(e.value for e in parts),
            None,
            cat("loglik"),
            cat("best_R"),
            cat("best_t"),
            cat("max_prob"),
            mean("fraction"),
            mean("computed"),
            _no_refit,
            None if parts[0].kl_directions is None else mean("kl_directions"),
        )

    def _symmetric(self, V: torch.Tensor) -> torch.Tensor:
        """``V`` averaged over the point group (identity for C1). The start and every
        likelihood gradient are symmetrised, so SAGD's steps keep the map symmetric without
        re-interpolating the map itself at every step (:func:`cryorecon.symmetrize.symmetrize`)."""
        if self.group.order == 1 or not self.symmetry_imposed:
            return V
        from .symmetrize import symmetrize

        return symmetrize(V, self.group)

    def maybe_impose_symmetry(self, omega: float) -> bool:
        """Impose the point group the first time the cut-off passes ``join_resolution_A``
        (before the half-set split, so both halves start from one symmetric map).

        Until then the run is C1: imposing the group on a random start confines SAGD to
        symmetric maps from the first step, and from there it settles in a wrong basin (on
        the simulated GroEL-GroES set, C7 from a symmetrised random start stalls at a
        ring-shaped map, FSC 0.5 near 60 Å, while the same run started from the C1 map of
        the first cut-off reaches about 30 Å). RELION's initial model does the same ("run in
        C1 and apply symmetry later", then relion_align_symmetry). Here the C1 map (each
        class map) is put into the group's standard orientation with
        :func:`cryorecon.symmetry_align.symmetry_align` and symmetrised; the SAGD memories
        and the importance histories (poses in the old frame, on the full grid) start afresh,
        keeping the step size L. Returns True when it imposed the group now.
        """
        c = self.cfg
        if self.symmetry_imposed or omega <= 1.0 / c.join_resolution_A * (1 + 1e-9):
            return False
        from .model.importance import PoseHistory
        from .symmetry_align import symmetry_align

        maps = self.class_maps if self.class_maps is not None else [self.V]
        sagds = self.class_sagd if self.class_maps is not None else [self.sagd]
        out, scores = [], []
        for V in maps:
            al = symmetry_align(
                V.detach().cpu(), self.group, apix=self.apix, seed=c.seed, progress=False
            )
            out.append(al.aligned.clamp_min(0).to(self.device, V.dtype))
            scores.append(f"{al.score_input:.3f} -> {al.score:.3f}")
        new_sagd = [
            SAGD(sg.K, sg.shape, self.device, L=sg.L, line_search_every=c.line_search_every)
            for sg in sagds
        ]
        if self.class_maps is not None:
            self.class_maps, self.class_sagd = out, new_sagd
        self.V, self.sagd = out[0], new_sagd[0]
        samplers = (self.class_samplers or []) if self.class_maps is not None else [self.sampler]
        for sm in samplers:
            if sm is not None:
                sm.hist = PoseHistory(len(self.p), sm.cfg)
        self.levels = {}
        self.symmetry_imposed = True
        log.info(
            f"iteration {self.tau}: {self.group.name} imposed on the C1 map "
            f"(symmetry score {', '.join(scores)})"
        )
        return True

    def map_of(self, idx) -> torch.Tensor:
        """The map particles ``idx`` are scored against: the joint map before the half-set
        split, their half's map after it (all of ``idx`` must be in one half)."""
        if self.halves is None:
            return self.V
        h = np.unique(self.subset[np.asarray(idx)])
        if len(h) != 1:
            raise ValueError("particles from both half-sets in one evaluation")
        return self.halves[int(h[0]) - 1]

    # ---- gold-standard half-sets -----------------------------------------------------------
    def maybe_split(self, omega: float) -> bool:
        """Split into two half-sets refined independently from now on, the first time the
        cut-off passes ``join_resolution_A`` (RELION's ``--low_resol_join_halves``: below it
        the data cannot overfit noise, and one joint map keeps both halves in one frame and
        hand, so their FSC means something). Each half starts from the joint map with its
        own SAGD state: its minibatches' stored gradients and L carried over from the joint one
        (:func:`cryorecon.start.half_sets`; with the input's own half-sets the minibatches are
        new and Algorithm 1 restarts on them, with L carried over). Both halves start from the
        joint map as it is: what they share from it does not enter the gold-standard FSC,
        which is measured on each half-set's back-projection (:meth:`_gold_standard`); a start
        low-passed to ``join_resolution_A`` was tried and gave worse maps (it drops the
        molecule's sharp boundary that positivity had given the joint map)."""
        c = self.cfg
        if (
            not c.halves
            or self.halves is not None
            or omega <= 1.0 / c.join_resolution_A * (1 + 1e-9)
        ):
            return False
        if self.classes is not None:  # several classes: one map per class, no half-sets
            return False
        self.subset, self.batches, self.batch_half, parent = half_sets(
            self.batches, self.heldout, len(self.p), c.seed, self.p.random_subset
        )
        self.K = len(self.batches)
        self.halves = [self.V.clone(), self.V.clone()]
        self.half_sagd = []
        for h in (1, 2):
            sg = SAGD(
                self.batch_half.count(h),
                self.V.shape,
                self.device,
                L=self.sagd.L,
                line_search_every=c.line_search_every,
            )
            sg.tau = self.sagd.tau
            first = self.batch_half.index(h)
            for k in range(first, first + sg.K):
                if parent[k] in self.sagd.stored:
                    sg.accumulate(k - first, self.sagd.stored[parent[k]])
            self.half_sagd.append(sg)
        self.sagd.stored.clear()
        self.order = []
        self._gather_particles()  # the minibatches were dealt anew: so were the ranks' rows
        self.split_at = self.tau
        where = (
            "the input's rlnRandomSubset" if self.p.random_subset is not None else "a random split"
        )
        log.info(
            f"iteration {self.tau}: cut-off {1 / omega:.1f} Å passed {c.join_resolution_A:g} Å; "
            f"half-sets ({where}: {int((self.subset == 1).sum())} + "
            f"{int((self.subset == 2).sum())} particles) refined independently from here"
        )
        return True

    def _gold_standard(self) -> None:
        """At the end of a run: the gold-standard FSC (unmasked, masked with a soft mask from
        the map, phase-randomisation corrected) and its 0.143 resolution for run.json and the
        report, computed on each half-set's own reconstruction from its particles and poses
        (``backprojection_half1/2.mrc``, :func:`cryorecon.backproject.half_set_reconstructions`)
        and stated no finer than the cut-off the halves were refined to
        (:func:`~.gold_standard.gold_standard_fsc`).

        ``volume.mrc`` is rewritten as those two reconstructions weighted by that FSC
        (:func:`~.gold_standard.combine_halves`, clamped at 0): the linear reconstruction from
        every particle at its refined pose, as RELION's refinement writes its final map. It is
        finer than the refined halves' combination (the MAP estimate of Sec. 3.3, which
        averages each particle over its posterior and carries the prior; kept as
        ``volume_refined.mrc``): docs/results.md, "Shifts on a lattice, and the final map".
        Without posed particles in a half, ``volume.mrc`` is the refined halves' combination.

        The refined half maps themselves are not used for the FSC: they are non-negative and
        sparse (most voxels at 0 under the positivity constraint and the prior), so the
        support they share from the joint start gives them a high FSC at every frequency,
        beyond the cut-off too; the back-projections are linear in each half's images."""
        if self.classes is not None:
            self._class_final_maps()
            return
        if self.halves is None:
            return
        from .backproject import half_set_reconstructions
        from .gold_standard import combine_halves, gold_standard_fsc

        log.info("gold standard: reconstructing each half-set from its particles and poses")
        poses = self.poses()
        bp = half_set_reconstructions(
            self.p,
            poses["eulers_deg"],
            poses["shifts_A"],
            self.subset,
            device=str(self.device),
            diameter_A=self.diameter_px * self.apix,
        )
        maps = "backprojection"
        if bp is None:  # a half without posed particles: only the refined halves are left
            bp, maps = [self.halves[0], self.halves[1]], "refined"
        bp = [self._symmetric(v.to(self.device)).cpu() for v in bp]
        result = gold_standard_fsc(
            bp[0],
            bp[1],
            self.apix,
            seed=self.cfg.seed,
            refined_to_A=None if not self.half_omega else 1.0 / self.half_omega,
        )
        self.gold_standard = dict(
            result.to_json(),
            maps=[f"{maps}_half1.mrc", f"{maps}_half2.mrc"]
            if maps == "backprojection"
            else ["volume_half1.mrc", "volume_half2.mrc"],
        )
        if maps == "backprojection":
            for h, v in zip((1, 2), bp):
                write_map(
                    self.out / f"backprojection_half{h}.mrc", v.numpy(), self.apix, overwrite=True
                )
        refined = combine_halves(self.halves[0].cpu(), self.halves[1].cpu(), result.fsc_corrected)
        final = (
            combine_halves(bp[0], bp[1], result.fsc_corrected)
            if maps == "backprojection"
            else refined
        )
        self.gold_standard["final_map"] = maps
        # Clamped at 0, as the density is non-negative (Sec. 3.3); the shell weights only add a
        # little ringing below zero.
        for name, v in (("volume_refined.mrc", refined), ("volume.mrc", final)):
            write_map(
                self.out / name,
                self._symmetric(v.to(self.device)).clamp_min(0).cpu().numpy(),
                self.apix,
                overwrite=True,
            )
        res = self.gold_standard.get("resolution_A")
        if res is not None:
            log.info(
                f"gold-standard resolution (half-set reconstructions, masked and corrected, "
                f"FSC 0.143): {res:.1f} Å"
            )

    def _class_final_maps(self) -> None:
        """At the end of a run with classes: each class's final map is the reconstruction of
        the particles assigned to it at their refined poses, as for one class
        (:meth:`_gold_standard`): the two half-sets of its particles (the input's
        ``rlnRandomSubset``, else a seeded random split) back-projected
        (``backprojection_classNNN_half1/2.mrc``), their gold-standard FSC (masked,
        corrected, stated no finer than the final cut-off), and ``volume_classNNN.mrc`` their
        FSC-weighted combination clamped at 0; the refined class map is kept as
        ``volume_classNNN_refined.mrc``. A class with fewer than 2 posed particles in a half
        keeps its refined map. Results per class (its posed particles, the FSC curves) in
        ``run.json`` ``class_gold_standard``."""
        from .backproject import half_set_reconstructions
        from .gold_standard import combine_halves, gold_standard_fsc

        log.info("classes: reconstructing each class from its particles and poses")
        poses = self.poses()
        assign = self.classes.assignment()
        given = self.p.random_subset
        if given is not None:
            halves = np.asarray(given, dtype=np.int64)
        else:
            halves = np.full(len(assign), 2, dtype=np.int64)
            perm = np.random.default_rng([self.cfg.seed, 3]).permutation(len(assign))
            halves[perm[: len(assign) // 2]] = 1
        refined_to = 1.0 / self.resolution.omega_star(self.tau)
        posed = np.isfinite(poses["eulers_deg"]).all(axis=1)
        self.class_gold_standard, finals = [], []
        maps = self.class_maps if self.class_maps is not None else [self.V]
        for j, V in enumerate(maps, 1):
            name = f"volume_class{j:03d}"
            mine = (assign == j) & posed
            entry = {"class": j, "particles": int(mine.sum()), "final_map": "refined"}
            bp = half_set_reconstructions(
                self.p,
                poses["eulers_deg"],
                poses["shifts_A"],
                np.where(mine, halves, 0),
                device=str(self.device),
                diameter_A=self.diameter_px * self.apix,
            )
            final = self._symmetric(V).clamp_min(0).cpu()
            if bp is not None:
                bp = [self._symmetric(v.to(self.device)).cpu() for v in bp]
                result = gold_standard_fsc(
                    bp[0], bp[1], self.apix, seed=self.cfg.seed, refined_to_A=refined_to
                )
                for h, v in zip((1, 2), bp):
                    write_map(
                        self.out / f"backprojection_class{j:03d}_half{h}.mrc",
                        v.numpy(),
                        self.apix,
                        overwrite=True,
                    )
                write_map(
                    self.out / f"{name}_refined.mrc", final.numpy(), self.apix, overwrite=True
                )
                final = (
                    self._symmetric(
                        combine_halves(bp[0], bp[1], result.fsc_corrected).to(self.device)
                    )
                    .clamp_min(0)
                    .cpu()
                )
                entry.update(result.to_json(), final_map="backprojection")
            write_map(self.out / f"{name}.mrc", final.numpy(), self.apix, overwrite=True)
            self.class_gold_standard.append(entry)
            finals.append(final)
        write_map(
            self.out / "volume.mrc",
            finals[self.class_order()[0]].numpy(),
            self.apix,
            overwrite=True,
        )
        log.info(
            "classes (particles, gold-standard FSC 0.143 of each class's half-sets): "
            + "; ".join(
                f"{e['class']}: {e['particles']}"
                + (f", {e['resolution_A']:.1f} Å" if e.get("resolution_A") else "")
                for e in self.class_gold_standard
            )
        )

    def _local_batch(self, k: int) -> tuple[int, int]:
        """(half, index among that half's minibatches) of minibatch ``k`` (half 0: joint)."""
        h = self.batch_half[k]
        return h, (k if h == 0 else k - self.batch_half.index(h))

    def class_order(self) -> list[int]:
        """Class indices from the most to the least populated."""
        return list(np.argsort(-self.classes.priors(), kind="stable"))

    def combined(self) -> torch.Tensor:
        """The map written as ``volume.mrc``: the joint map, or after the split the halves'
        average weighted per shell by their (unmasked) FSC and clamped at zero
        (:func:`cryorecon.gold_standard.combine_halves`; at the end of the run the masked,
        corrected FSC weighs them, :meth:`_gold_standard`);
        symmetrised once more with a point group (the map SAGD keeps is symmetric up to the
        clamp at zero and the interpolation of the gradients' symmetrisation)."""
        if self.class_maps is not None:
            return self._symmetric(self.class_maps[self.class_order()[0]])
        if self.halves is None:
            return self._symmetric(self.V)
        from .gold_standard import combine_halves

        _, curve = fsc(self.halves[0], self.halves[1], self.apix)
        return self._symmetric(combine_halves(self.halves[0], self.halves[1], curve)).clamp_min(0)

    def _record_poses(self, idx, ev: Evaluation) -> None:
        idx = np.asarray(idx) if ev.particles is None else ev.particles
        self.best_R[idx] = ev.best_R.cpu().numpy()
        self.best_t[idx] = ev.best_t.cpu().numpy()
        self.max_prob[idx] = ev.max_prob.cpu().numpy()

    def check_groups(self) -> int:
        """Number of groups of ``is_check`` held-out particles the accuracy check rotates through:
        about K / heldout_every, so that a checked particle was last visited about K iterations
        earlier, like a training particle (at most len(heldout) // is_check groups)."""
        c = self.cfg
        n = min(c.is_check, len(self.heldout))
        return max(1, min(round(self.K / c.heldout_every), len(self.heldout) // max(n, 1)))

    def check_particles(self, pool: bool = False) -> np.ndarray:
        """The held-out particles the accuracy check scores at this iteration (``pool``: all
        groups, whose importance histories only the check updates)."""
        c = self.cfg
        n = min(c.is_check, len(self.heldout))
        if n <= 0:
            return self.heldout[:0]
        G = self.check_groups()
        if pool:
            return self.heldout[: n * G]
        g = (self.tau // c.heldout_every) % G
        return self.heldout[g * n : (g + 1) * n]

    def search_check(self, lvl: Level) -> float | None:
        """Relative error ``|sum log p_search - sum log p| / |sum log p|`` of the run's
        marginaliser against the exact quadrature (Eq. 4) on ``is_check`` held-out particles at
        the current map; None for the exact path, on a first importance visit, or when the
        exact sum would cost more than ``CHECK_BUDGET``.

        With importance sampling a failed check (error above ``is_tolerance``, the paper's
        0.1%) re-anneals: the annealing clock is halved, so alpha and T grow again and draws
        spread out. Importance sampling only looks near each particle's previous posterior;
        while the map changes a lot between visits particles can lock onto poses the current
        map no longer favours. The checked particles stand in for training particles: they
        rotate through :meth:`check_groups` groups, so each was last visited about K
        iterations ago, and keep the history of their own sampled visit; the exact score is a
        peek (no state changes).
        """
        c = self.cfg
        if c.pose_search == "exact" or c.is_check <= 0 or self.class_maps is not None:
            return None
        idx = self.check_particles()
        if c.pose_search == "search":
            if self.tau % SEARCH_CHECK_EVERY:
                return None
            idx = idx[: int(CHECK_BUDGET // (lvl.n_poses * lvl.halfplane.M))]
            if len(idx) < MIN_CHECK_PARTICLES:
                return None
        first = self.sampler is not None and bool(
            (self.sampler.hist.tau_prev[self.ranks.mine(idx)] < 0).all()
        )
        first = self.ranks.sum(float(first)) == self.ranks.world  # one decision on every rank
        ev = self.batch_objective(idx, lvl, want_grad=False)
        if first or ev.fraction >= 1.0:
            return None
        v_ex = self.batch_objective(idx, lvl, want_grad=False, objective=self.exact).value
        rel = abs(ev.value - v_ex) / max(abs(v_ex), 1e-30)
        if self.sampler is not None and rel > c.is_tolerance:
            clock = self.sampler.annealing_clock(self.tau)
            self.sampler.anneal_from += clock - clock // 2
            log.info(
                f"iteration {self.tau}: sampled log-likelihood off by {rel:.2g} (> "
                f"{c.is_tolerance:g}); "
                f"annealing clock {clock} -> {self.sampler.annealing_clock(self.tau)}"
            )
        return rel

    # Kept under its old name for scripts that call it.
    importance_check = search_check

    def heldout_error(self, lvl: Level) -> float:
        """Mean negative log-likelihood per held-out particle at the current omega*.

        Evaluated like a training minibatch (without a gradient), so with importance sampling
        it is the Eq. 13 estimate (log of an unbiased estimate of p: slightly pessimistic) and
        the held-out particles keep their own pose histories; they never enter SAGD. The
        accuracy check's particles (:meth:`check_particles`) are scored too, but not recorded.
        After the half-set split each held-out particle is scored against its own half's map.
        """
        pool = self.check_particles(pool=True) if self.sampler is not None else self.heldout[:0]
        total = 0.0
        for s in range(0, len(self.heldout), self.cfg.minibatch):
            idx = self.heldout[s : s + self.cfg.minibatch]
            if self.class_maps is None:
                total += self.batch_objective(
                    idx, lvl, want_grad=False, record=~np.isin(idx, pool)
                ).value
                continue
            L = np.stack(
                [
                    self.batch_objective(idx, lvl, False, ~np.isin(idx, pool), obj, V)
                    .loglik.double()
                    .cpu()
                    .numpy()
                    for obj, V in zip(self.class_objectives, self.class_maps)
                ],
                1,
            )
            total -= float(self.classes.log_marginal(L).sum())
            self.classes.observe(idx, L, self.tau, train=False)
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
        if self.resolution.at_final(self.tau) and self.heldout_state.since_improve >= c.patience:
            return "converged"
        return None

    def step(self) -> dict:
        """One iteration of Algorithm 1; returns its metrics record."""
        c = self.cfg
        self.tau += 1
        tau = self.tau
        omega = self.resolution.omega_star(tau)
        self.maybe_impose_symmetry(omega)
        lvl = self.level(omega)
        self.maybe_split(omega)
        if self.halves is not None:
            self.half_omega = max(self.half_omega or 0.0, omega)
        self.maybe_split_classes(omega)
        if self.class_maps is not None:
            return self._step_classes(tau, omega, lvl)
        k = self.next_batch()
        idx = self.batches[k]
        h, k_local = self._local_batch(k)
        V = self.map_of(idx)
        sagd = self.sagd if h == 0 else self.half_sagd[h - 1]
        ev = self.batch_objective(idx, lvl, V=V)
        search_stats = self.objective.metrics() if hasattr(self.objective, "metrics") else {}
        ev.grad = self._symmetric(ev.grad)
        prior, K = self.prior, sagd.K
        f_V = ev.value + float(prior.neg_log_prior(V)) / K
        eps = self.resolution.epsilon(tau)
        V, doublings = sagd.update(
            V,
            k_local,
            lambda V: ev.refit(V) + float(prior.neg_log_prior(V)) / K,
            f_V,
            ev.grad,
            prior.grad(V),
            eps,
        )
        if h == 0:
            self.V = V
        else:
            self.halves[h - 1] = V
            self.V = 0.5 * (self.halves[0] + self.halves[1])
        self._record_poses(idx, ev)
        heldout = check = None
        if tau % c.heldout_every == 0:
            check = self.search_check(lvl)
            heldout = self._heldout_step(tau, omega, lvl)
        rec = self._metrics(tau, omega, eps, doublings, ev, lvl, idx, heldout, check)
        rec["L"], rec["half"] = sagd.L, h
        rec.update(search_stats)
        if heldout is not None and self.halves is not None:
            rec.update(self.halfmap_resolution())
        return rec

    def _heldout_step(self, tau: int, omega: float, lvl: Level) -> float:
        """The held-out error at this iteration, fed to the stopping rule and the schedule."""
        heldout = self.heldout_error(lvl)
        self.heldout_state.observe(omega, heldout)
        if not self.classes_holding(tau) and self.resolution.observe(tau, heldout):
            log.info(
                f"iteration {tau}: held-out error levelled off at {1 / omega:.1f} Å; "
                f"cut-off -> {1 / self.resolution.omega_star(tau + 1):.1f} Å"
            )
        return heldout

    def maybe_split_classes(self, omega: float) -> bool:
        """With ``classes`` K > 1: once the cut-off passes ``class_resolution_A``, the one map
        becomes K identical class maps (each with a copy of its SAGD memory), and every
        particle is put in a class at random for its next visit, as RELION's 3D
        classification starts from random subsets; their posteriors (tempered and balanced,
        :mod:`cryorecon.model.classes`) take over from the visit after. The class-similarity
        annealing runs over the following epochs (:func:`default_anneal`). Before the split
        the run is a one-class run.

        K maps from K independent random starts were tried first: each became the consensus
        of the whole mixture in a frame of its own, and the particles split between those
        copies at random, not by structure (docs/results.md, "Several classes on a
        mixture")."""
        c = self.cfg
        if (
            self.classes is None
            or self.class_maps is not None
            or omega < 1.0 / c.class_resolution_A * (1 - 1e-9)
        ):
            return False
        self.class_maps, self.class_sagd = [self.V], [self.sagd]
        for _ in range(1, c.classes):
            self.class_maps.append(self.V.clone())
            sg = SAGD(self.K, self.V.shape, self.device, line_search_every=c.line_search_every)
            sg.load_state_dict(self.sagd.state_dict())
            self.class_sagd.append(sg)
        rng = np.random.default_rng([c.seed, 4])
        self.classes.post[:] = np.eye(c.classes)[rng.integers(c.classes, size=len(self.p))]
        self.classes.seen[:] = False
        start, end = default_anneal(self.K)
        self.classes.anneal_start, self.classes.anneal_end = self.tau + start, self.tau + end
        self.class_split_at = self.tau
        log.info(
            f"iteration {self.tau}: the map split into {c.classes} classes at "
            f"{1 / omega:.1f} Å (particles dealt at random; class similarity annealed over "
            f"iterations {self.classes.anneal_start}-{self.classes.anneal_end})"
        )
        return True

    def classes_holding(self, tau: int) -> bool:
        """True while the adaptive cut-off is held where the classes split: until one epoch
        after the class-similarity annealing ends. The class log-likelihoods are compared at
        a low cut-off, where a particle's own share of its class map (which makes every
        particle fit the class it trained best, whatever its structure) is small beside the
        structural difference; at the refinement's finer cut-offs that self-fit grows with
        the coefficients of the map and locks the particles into the classes they were
        dealt to (docs/results.md, "Several classes on a mixture"). The paper's schedule
        raises omega* by the iteration and is not held."""
        return self.class_split_at is not None and tau < self.classes.anneal_end + self.K

    def _step_classes(self, tau: int, omega: float, lvl: Level) -> dict:
        """One iteration with K classes: every class's map takes a SAGD step on the minibatch
        with per-image weights (:mod:`cryorecon.model.classes`), then the particles' class
        posteriors are updated from this visit's K log-likelihoods. The maps differ only
        below ``class_difference_A`` (:func:`~cryorecon.model.classes.tie_to_mean`): finer
        coefficients are shared, estimated from all the particles; each class's own map at
        full resolution is the back-projection at the end (:meth:`_class_final_maps`)."""
        import dataclasses

        c = self.cfg
        k = self.next_batch()
        idx = self.batches[k]
        batch = load_batch(self.p, idx, lvl.halfplane, self.diameter_px, self.device)
        U = to_tensor(self.classes.weights(idx), self.device)
        eps = self.resolution.epsilon(tau)
        prior, K = self.prior, self.K
        evs, doublings = [], 0
        share = self.classes.priors()
        for j, obj in enumerate(self.class_objectives):
            V = self.class_maps[j]
            ev = obj.evaluate(
                V, dataclasses.replace(batch, image_weight=U[:, j]), np.asarray(idx), lvl, tau
            )
            ev.grad = self._symmetric(ev.grad)
            # The prior weighs on each class in proportion to the data it explains, so its
            # strength relative to the likelihood stays what it is for one map on all the data.
            Kj = K / share[j]
            f_V = ev.value + float(prior.neg_log_prior(V)) / Kj
            self.class_maps[j], d = self.class_sagd[j].update(
                V,
                k,
                lambda V, ev=ev, Kj=Kj: ev.refit(V) + float(prior.neg_log_prior(V)) / Kj,
                f_V,
                ev.grad,
                prior.grad(V) * share[j],
                eps,
            )
            doublings += d
            evs.append(ev)
        if c.class_difference_A:
            self.class_maps = [
                V.clamp_min(0.0)
                for V in tie_to_mean(self.class_maps, share, self.apix, c.class_difference_A)
            ]
        self.V, self.sagd = self.class_maps[0], self.class_sagd[0]
        L = np.stack([ev.loglik.double().cpu().numpy() for ev in evs], 1)
        r = self.classes.observe(idx, L, tau)
        self._record_poses(idx, _pick(evs, r.argmax(1)))
        heldout = None
        if tau % c.heldout_every == 0:
            heldout = self._heldout_step(tau, omega, lvl)
        ev = dataclasses.replace(
            evs[0],
            value=-float(self.classes.log_marginal(L).sum()),
            fraction=float(np.mean([e.fraction for e in evs])),
            computed=float(np.mean([e.computed for e in evs])),
        )
        rec = self._metrics(tau, omega, eps, doublings, ev, lvl, idx, heldout, None)
        rec["half"] = 0
        rec["class_fractions"] = [round(float(x), 5) for x in self.classes.priors()]
        rec["class_similarity"] = self.classes.similarity(tau)
        rec["class_beta"] = self.classes.beta
        return rec

    def halfmap_resolution(self) -> dict:
        """FSC 0.5 / 0.143 resolution (Å) between the two half maps, unmasked (cheap; the
        masked, corrected curve is computed at the end, :meth:`_gold_standard`)."""
        freq, curve = fsc(self.halves[0], self.halves[1], self.apix)
        return {
            "halfmap_fsc05_A": resolution_at(freq, curve, 0.5),
            "halfmap_fsc0143_A": resolution_at(freq, curve, 0.143),
        }

    def _metrics(
        self, tau, omega, eps, doublings, ev: Evaluation, lvl: Level, idx, heldout, check
    ) -> dict:
        n = int(len(idx))
        return {
            "iteration": tau,
            "seconds": round(self.elapsed, 3),
            "omega_star": omega,
            "resolution_A": 1.0 / omega,
            "epsilon": eps,
            "L": self.sagd.L,
            "line_search_doublings": doublings,
            "train_nll": ev.value / n,
            "heldout_nll": heldout,
            "minibatch": n,
            "poses_evaluated": round(ev.fraction * n * lvl.n_poses),
            "poses_full": n * lvl.n_poses,
            "fraction_evaluated": ev.fraction,
            "fraction_computed": ev.computed,
            "kl_directions": ev.kl_directions,
            "search_check_rel_error": check,
            "is_check_rel_error": check,
            "annealing_clock": None if self.sampler is None else self.sampler.annealing_clock(tau),
            "coefficients": lvl.halfplane.M,
            "epoch": round(tau / self.K, 3),
            "symmetry_imposed": self.symmetry_imposed,
        }

    def run(self) -> dict:
        c = self.cfg
        pb = bar(total=c.max_iters, initial=self.tau, desc="reconstructing", unit="it")
        reason = self.should_stop()
        runstate.warn_if_nothing_to_do(reason, self.tau, self.elapsed)
        stop = runstate.SignalStop()
        t_last = time.perf_counter()
        while reason is None:
            b0, c0 = self.ranks.bytes_reduced, self.ranks.comm_seconds
            rec = self.step()
            if self.ranks.active:
                rec["allreduce_bytes"] = self.ranks.bytes_reduced - b0
                rec["allreduce_seconds"] = round(self.ranks.comm_seconds - c0, 4)
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            rec["seconds"] = round(self.elapsed, 3)
            if self.ranks.is_main:
                self._log(rec)
            tau = self.tau
            pb.update(1)
            pb.total = runstate.bar_total(tau, self.elapsed, c.max_iters, c.max_time)
            last = self.heldout_state.last
            eta = self.time_to_final_cutoff()
            pb.set_postfix(
                res=f"{rec['resolution_A']:.1f}A",
                heldout="-" if last is None else f"{last:.4g}",
                **({} if eta is None else {"final_cutoff_in": format_eta(eta)}),
            )
            if tau % c.snapshot_every == 0 and self.ranks.is_main:
                write_map(
                    self.out / "snapshots" / f"volume_{tau:06d}.mrc",
                    self.combined().cpu().numpy(),
                    self.apix,
                    overwrite=True,
                )
            if tau % c.checkpoint_every == 0:
                self._save()
                self._write_info(finished=False)
            self._refresh_report()
            reason = self.ranks.broadcast_object(
                self.should_stop() or stop.reason
            )  # rank 0's clock decides
        stop.restore()
        pb.close()
        self._save()
        if self.ranks.is_main:
            self._gold_standard()
            self._export()
        self._write_info(finished=reason == "converged", reason=reason)
        if self.ranks.is_main:
            self.lock.release()
        self._refresh_report(force=True)
        self.ranks.barrier()
        log.info(f"stopped after {self.tau} iterations ({reason}); map: {self.out / 'volume.mrc'}")
        return {
            "iterations": self.tau,
            "seconds": self.elapsed,
            "reason": reason,
            "volume": str(self.out / "volume.mrc"),
        }

    def time_to_final_cutoff(self) -> float | None:
        """Seconds until the final cut-off at the pace so far (0 once there; None when the
        schedule does not know it in advance, as the adaptive one)."""
        final = self.resolution.final_iteration()
        if final is None or self.tau <= 0:
            return None
        return max(0, final - self.tau) * self.elapsed / self.tau

    def _refresh_report(self, force: bool = False) -> None:
        """Rebuild OUT/report.html at most every ``report_every`` seconds (and at the end)."""
        if self.cfg.report_every is None or not self.ranks.is_main:
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

    def _export(self) -> None:
        """RUN/particles.star (and .cs for a cryoSPARC input) with the run's poses; a set
        that cannot be exported (e.g. no particle visited yet) is a warning, not a failure."""
        from .io.export import export_poses

        try:
            export_poses(self.p, self.poses(), self.out, overwrite=True)
        except (InputError, OSError, ValueError) as exc:
            log.warning(f"poses not exported to {self.out / 'particles.star'}: {exc}")

    def poses(self) -> dict[str, np.ndarray]:
        """Each particle's most probable pose so far, as written to ``poses.npz``: RELION
        Euler angles (``eulers_deg`` (N, 3): rot, tilt, psi), origins (``shifts_A`` (N, 2):
        rlnOriginXAngst/YAngst), ``max_prob``, view ``directions`` (N, 3), ``subset`` (0: no
        half-set), ``class_number`` (1-based); NaN for particles never visited."""
        n = len(self.max_prob)
        seen = np.isfinite(self.max_prob)
        eulers = np.full((n, 3), np.nan)
        shifts = np.full((n, 2), np.nan)
        if seen.any():
            apix = np.asarray(self.p.apix, dtype=np.float64)[seen]
            eulers[seen], shifts[seen] = pose_to_relion(
                torch.as_tensor(self.best_R[seen]), torch.as_tensor(self.best_t[seen]), apix
            )
        return {
            "eulers_deg": eulers,
            "shifts_A": shifts,
            "max_prob": self.max_prob.astype(np.float64),
            "directions": self.best_R[:, 2, :],
            "subset": self.subset.copy(),
            "class_number": np.ones(n, dtype=np.int64)
            if self.classes is None
            else self.classes.assignment(),
        }

    def _gather_particles(self) -> None:
        """Every particle's newest state (best pose, importance history) from the rank that
        last updated it, on every rank (a no-op for one process)."""
        r = self.ranks
        if not r.active:
            return
        mine = np.flatnonzero(parallel.newest_rows(r, self.updated_at) == r.rank)
        rows = {
            "idx": mine,
            "best_R": self.best_R[mine],
            "best_t": self.best_t[mine],
            "max_prob": self.max_prob[mine],
            "hist": None if self.sampler is None else self.sampler.hist.rows(mine),
        }
        for got in r.gather_objects(rows):
            i = got["idx"]
            self.best_R[i], self.best_t[i], self.max_prob[i] = (
                got["best_R"],
                got["best_t"],
                got["max_prob"],
            )
            if self.sampler is not None and len(i):
                self.sampler.hist.set_rows(i, got["hist"])
        self.updated_at[:] = self.tau

    def _save(self) -> None:
        self._gather_particles()
        if not self.ranks.is_main:
            return
        state = {
            "V": self.V.cpu(),
            "sagd": self.sagd.state_dict(),
            "tau": self.tau,
            "elapsed": self.elapsed,
            "gen": self.gen.get_state(),
            "order": list(self.order),
            "heldout_state": self.heldout_state.state_dict(),
            "resolution": self.resolution.state_dict(),
            "config": asdict(self.cfg),
            "prior_state": _prior_state(self.prior),
            "best_R": self.best_R,
            "best_t": self.best_t,
            "max_prob": self.max_prob,
            "importance": None if self.sampler is None else self.sampler.hist.state_dict(),
            "importance_gen": None if self.sampler is None else self.sampler.gen.get_state(),
            "importance_anneal_from": None if self.sampler is None else self.sampler.anneal_from,
            "fingerprint": self.fingerprint,
            "subset": self.subset if self.halves is not None else None,
            "split_at": self.split_at,
            "half_omega": self.half_omega,
            "symmetry_imposed": self.symmetry_imposed,
            "halves": None if self.halves is None else [v.cpu() for v in self.halves],
            "half_sagd": None
            if self.halves is None
            else [sg.state_dict() for sg in self.half_sagd],
            "classes": None
            if self.classes is None
            else {
                "posteriors": self.classes.state_dict(),
                "split_at": self.class_split_at,
                "maps": None if self.class_maps is None else [v.cpu() for v in self.class_maps[1:]],
                "sagd": None
                if self.class_maps is None
                else [sg.state_dict() for sg in self.class_sagd[1:]],
                "importance": None
                if not self.class_samplers
                else [
                    (sm.hist.state_dict(), sm.gen.get_state(), sm.anneal_from)
                    for sm in self.class_samplers[1:]
                ],
            },
        }
        tmp = self.ckpt_path.with_name(".checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)
        write_map(self.out / "volume.mrc", self.combined().cpu().numpy(), self.apix, overwrite=True)
        if self.class_maps is not None:
            for j, V in enumerate(self.class_maps, 1):
                write_map(
                    self.out / f"volume_class{j:03d}.mrc",
                    self._symmetric(V).cpu().numpy(),
                    self.apix,
                    overwrite=True,
                )
        if self.halves is not None:
            for h, V in enumerate(self.halves, 1):
                write_map(
                    self.out / f"volume_half{h}.mrc",
                    self._symmetric(V).cpu().numpy(),
                    self.apix,
                    overwrite=True,
                )
        tmp = self.out / ".poses.tmp.npz"
        np.savez(tmp, **self.poses())
        os.replace(tmp, self.out / "poses.npz")

    def _load(self, s: dict) -> None:
        self.V = s["V"].to(self.device)
        self.sagd = SAGD(self.K, self.V.shape, self.device)
        self.sagd.load_state_dict(s["sagd"])
        self.tau, self.elapsed = s["tau"], s["elapsed"]
        self.gen.set_state(s["gen"])
        self.order = list(s["order"])
        self.heldout_state.load_state_dict(s["heldout_state"])
        self.resolution.load_state_dict(s["resolution"])
        self.prior = _prior_from_state(s["prior_state"])
        self.best_R, self.best_t, self.max_prob = s["best_R"], s["best_t"], s["max_prob"]
        # Checkpoints from before the C1 phase imposed the group from the start.
        self.symmetry_imposed = bool(s.get("symmetry_imposed", True)) or self.group.order == 1
        if s.get("halves") is not None:
            self.subset = np.asarray(s["subset"], dtype=np.int64)
            self.split_at = s.get("split_at")
            self.half_omega = s.get("half_omega")
            _, self.batches, self.batch_half, _ = half_sets(
                self.batches, self.heldout, len(self.p), self.cfg.seed, self.p.random_subset
            )
            self.K = len(self.batches)
            self.halves = [v.to(self.device) for v in s["halves"]]
            self.half_sagd = []
            for h, st in zip((1, 2), s["half_sagd"]):
                sg = SAGD(
                    self.batch_half.count(h),
                    self.V.shape,
                    self.device,
                    line_search_every=self.cfg.line_search_every,
                )
                sg.load_state_dict(st)
                self.half_sagd.append(sg)
        if self.sampler is not None and s.get("importance") is not None:
            self.sampler.hist.load_state_dict(s["importance"])
            self.sampler.gen.set_state(s["importance_gen"])
            self.sampler.anneal_from = s.get("importance_anneal_from") or 0
        if s.get("classes") is not None:
            cl = s["classes"]
            self.classes.load_state_dict(cl["posteriors"])
            self.class_split_at = cl.get("split_at", 0)
            if cl["maps"] is not None:
                self.class_maps = [self.V] + [v.to(self.device) for v in cl["maps"]]
                self.class_sagd = [self.sagd]
            for st in cl["sagd"] or []:
                sg = SAGD(
                    self.K, self.V.shape, self.device, line_search_every=self.cfg.line_search_every
                )
                sg.load_state_dict(st)
                self.class_sagd.append(sg)
            for sm, (hist, gen, anneal) in zip(
                (self.class_samplers or [None])[1:], cl["importance"] or []
            ):
                sm.hist.load_state_dict(hist)
                sm.gen.set_state(gen)
                sm.anneal_from = anneal or 0
        # Drop metric lines written after the checkpoint: they will be recomputed.
        if self.ranks.is_main:
            runstate.trim_metrics(self.metrics_path, self.tau)
        log.info(f"resuming {self.out} at iteration {self.tau}")

    def _write_info(self, finished: bool, reason: str | None = None) -> None:
        if not self.ranks.is_main:
            return
        info = {
            "finished": finished,
            "stop_reason": reason,
            "iterations": self.tau,
            "seconds": self.elapsed,
            "config": asdict(self.cfg),
            "particles": str(self.p.source),
            "n_particles": len(self.p),
            "n_heldout": int(len(self.heldout)),
            "n_minibatches": self.K,
            "box": self.D,
            "apix": self.apix,
            "symmetry": self.group.name,
            "classes": self.cfg.classes,
            "class_fractions": None
            if self.classes is None
            else [float(x) for x in self.classes.priors()],
            "diameter_A": self.diameter_px * self.apix,
            "shift_sigma_A": self.shift_sigma_px * self.apix,
            "resolution_steps": getattr(self.resolution, "history", []),
            "versions": {
                "cryorecon": __version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
            },
            "ranks": self.ranks.world,
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
        }
        info.update(self.p.meta.get("contrast", {}))  # set by cryorecon.contrast.apply_contrast
        if self.halves is not None:
            info["half_sets"] = {
                "split_at_iteration": self.split_at,
                "join_resolution_A": self.cfg.join_resolution_A,
                "source": "rlnRandomSubset" if self.p.random_subset is not None else "random",
                "n": [int((self.subset == h).sum()) for h in (1, 2)],
            }
        if self.classes is not None:
            info["class_split_at_iteration"] = self.class_split_at
        if self.class_gold_standard is not None:
            info["class_gold_standard"] = self.class_gold_standard
        if self.gold_standard is not None:
            info["gold_standard"] = self.gold_standard
            info["gold_standard_resolution_A"] = self.gold_standard.get("resolution_A")
        write_json(self.out / "run.json", info)


def _pick(evs: list[Evaluation], best: np.ndarray) -> Evaluation:
    """Per image, the pose fields of the evaluation of class ``best[i]``."""
    rows = torch.as_tensor(best)

    def pick(name):
        return torch.stack([getattr(e, name).cpu() for e in evs])[rows, torch.arange(len(rows))]

    return Evaluation(
        0.0,
        None,
        pick("loglik"),
        pick("best_R"),
        pick("best_t"),
        pick("max_prob"),
        0.0,
        0.0,
        _no_refit,
    )


def format_eta(seconds: float) -> str:
    """``12s``, ``7.5m`` or ``3.2h``."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.1f}m" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def _no_refit(V):
    raise ValueError("an evaluation over both half-sets has no single map to refit")


RESUME_OVERRIDES = ("max_iters", "max_time", "device", "report_every", "cache_gib")


def _resumed_config(saved: dict, requested: ReconstructConfig) -> ReconstructConfig:
    """The checkpoint's configuration, with the limits and device the user asked for now.

    Everything that shapes the optimisation (seed, minibatches, schedule, prior, grids, pose
    search) comes from the checkpoint, so a resumed run continues the same computation.
    """
    known = {k: v for k, v in saved.items() if k in ReconstructConfig.__dataclass_fields__}
    for k in RESUME_OVERRIDES:
        known[k] = getattr(requested, k)
    return ReconstructConfig(**known)


def _prior_state(prior) -> dict:
    return {
        "name": prior.name,
        "attrs": {k: v for k, v in vars(prior).items() if isinstance(v, (int, float))},
    }


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
