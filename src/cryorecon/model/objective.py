"""One protocol for marginalising a minibatch over poses (paper Eq. 3-4 and 13).

A :class:`Marginaliser` takes a minibatch (an :class:`~cryorecon.model.likelihood.ImageBatch`
and the particles' indices), the current map ``V`` and the quadrature level of the current
cut-off, and returns an :class:`Evaluation`: the minibatch's negative log marginal
likelihood ``-sum_i log p(I_i | V)``, its gradient with respect to ``V``, each image's most
probable pose, the share of the full quadrature it evaluated, and a closure that re-evaluates
the value at another map on the same poses (for SAGD's line search, Algorithm 1).

Implementations:

* :class:`ExactQuadrature`: the full sum of Eq. 4 over the level's grid (shared GEMM);
* :class:`ImportanceSampled`: Eq. 13 with the per-particle importance distributions of
  Sec. 3.4 (:mod:`cryorecon.model.importance`), routed per image between sampled and exact;
* :class:`cryorecon.model.search.CoarseToFine`: a hierarchical search whose cost follows the
  posterior mass (the default).

``record=False`` evaluates without touching any per-particle state (a peek: held-out scoring
and accuracy checks use it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .likelihood import (
    CombinedResult,
    ImageBatch,
    marginal_loglik,
    sampled_loglik_groups,
    volume_objective,
)

# Above this fraction of the full quadrature (after padding each image's pose set to the
# batch's largest), importance sampling is no cheaper than the exact, shared-GEMM path.
MAX_SAMPLED_FRACTION = 0.25


@dataclass
class Evaluation:
    """What a marginaliser returns for one minibatch of B images.

    value: ``-sum_i log p(I_i | V)`` (nats, likelihood part only; the prior is the driver's).
    grad: ``d value / dV`` (D, D, D) float32, or None.
    loglik: (B,) float64 per-image log marginal likelihood.
    best_R: (B, 3, 3) most probable rotation (RELION convention); best_t: (B, 2) most probable
    shift in pixels (x, y), the ``t`` of Eq. 2; max_prob: (B,) its posterior probability.
    fraction: mean over images of the poses evaluated / poses of the full quadrature of the
    level; computed: the same counting padding. kl_directions: Fig. 3's KL between visits
    (importance sampling only). refit: ``V -> value`` on the same poses. particles: the
    particles the per-image fields belong to, when not the whole minibatch (data-parallel
    runs: this rank's share, :mod:`cryorecon.parallel`).
    """

    value: float
    grad: torch.Tensor | None
    loglik: torch.Tensor
    best_R: torch.Tensor
    best_t: torch.Tensor
    max_prob: torch.Tensor
    fraction: float
    computed: float
    refit: Callable[[torch.Tensor], float]
    kl_directions: float | None = None
    particles: np.ndarray | None = None  # the particles of the per-image fields (None: idx)


class Marginaliser(Protocol):
    """Marginalisation of a minibatch over pose and shift (see the module docstring)."""

    name: str

    def evaluate(
        self,
        V: torch.Tensor,
        batch: ImageBatch,
        idx: np.ndarray,
        level,
        tau: int,
        want_grad: bool = True,
        record: bool = True,
    ) -> Evaluation: ...


class ExactQuadrature:
    """Eq. 4 over every pose of the level's grid (``level``: a :class:`cryorecon.start.Level`)."""

    name = "exact"

    def __init__(self, oversample: int = 2):
        self.oversample = oversample

    def evaluate(self, V, batch, idx, level, tau, want_grad=True, record=True) -> Evaluation:
        ev, _ = self.evaluate_with_posteriors(V, batch, level, want_grad, want_posteriors=False)
        return ev

    def evaluate_with_posteriors(self, V, batch, level, want_grad, want_posteriors):
        def nll(V, g=False, p=False):
            part = (
                level.slice_op,
                lambda S: marginal_loglik(
                    S, batch, level.shifts, level.log_w_rot, level.log_w_shift, g, p
                ),
            )
            return volume_objective(V, [part], self.oversample, g)

        val, grad, res = nll(V, want_grad, want_posteriors)
        r = res[0]
        ev = Evaluation(
            val,
            grad,
            r.loglik,
            level.rotations[r.best_rot],
            level.shifts[r.best_shift],
            r.max_prob,
            1.0,
            1.0,
            lambda V: nll(V)[0],
        )
        return ev, r


class ImportanceSampled:
    """Eq. 13 with importance distributions from each particle's previous visit (Sec. 3.4).

    Images without a history, or whose own pose set exceeds ``MAX_SAMPLED_FRACTION`` of the
    full quadrature, take the exact path; the others are sampled in groups of similar set
    size sharing one union of rotations. With ``record`` the particles' histories are
    updated from this evaluation's posteriors (Eq. 14-19).
    """

    name = "importance"

    def __init__(self, sampler, oversample: int = 2):
        self.sampler = sampler
        self.oversample = oversample
        self.exact = ExactQuadrature(oversample)

    def evaluate(self, V, batch, idx, level, tau, want_grad=True, record=True) -> Evaluation:
        """``record`` may also be a (B,) boolean mask: only those rows' histories change."""
        idx = np.asarray(idx)
        if not isinstance(record, bool):
            keep = idx[~np.asarray(record, dtype=bool)]
            saved = self.sampler.hist.rows(keep) if len(keep) else None
            ev = self.evaluate(
                V, batch, idx, level, tau, want_grad, record=bool(np.any(record)) or saved is None
            )
            if saved is not None:
                self.sampler.hist.set_rows(keep, saved)
            return ev
        plan = self.sampler.split_plan(idx, level.grid, MAX_SAMPLED_FRACTION)
        if plan is None:
            ev, res = self.exact.evaluate_with_posteriors(
                V, batch, level, want_grad, want_posteriors=record
            )
            if record:
                ev.kl_directions = _nanmean(
                    [
                        (
                            self.sampler.update_exact(
                                idx, tau, res.post_rot.cpu(), res.post_shift.cpu(), level.grid
                            ),
                            len(idx),
                        )
                    ]
                )
            return ev
        return self._sampled(V, batch, idx, level, tau, plan, want_grad, record)

    def _sampled(self, V, batch, idx, level, tau, plan, want_grad, record) -> Evaluation:
        ov, dev, g = self.oversample, V.device, level.grid
        rot_ids = plan.rot_ids.to(dev)
        exact_batch = batch.rows(plan.exact_rows) if len(plan.exact_rows) else None
        if exact_batch is None:
            union_op = level.slice_op.subset(rot_ids)

            def nll(V, want_grad=False):
                part = (
                    union_op,
                    lambda S: sampled_loglik_groups(S, batch, plan.groups, want_grad, level.shifts),
                )
                val, grad, res = volume_objective(V, [part], ov, want_grad)
                return val, grad, [res[0]]
        else:
            # Diffuse images need every slice: slice the whole grid once and hand the sampled
            # groups their rows of it (no second slicing or back-projection).
            def both(S, want_grad):
                ex = marginal_loglik(
                    S,
                    exact_batch,
                    level.shifts,
                    level.log_w_rot,
                    level.log_w_shift,
                    want_grad,
                    True,
                )
                sm = sampled_loglik_groups(S[rot_ids], batch, plan.groups, want_grad, level.shifts)
                if want_grad:
                    ex.grad_slices.index_add_(0, rot_ids, sm.grad_slices)
                    sm.grad_slices = None
                return CombinedResult(torch.cat([sm.loglik, ex.loglik]), ex.grad_slices, [sm, ex])

            def nll(V, want_grad=False):
                val, grad, res = volume_objective(
                    V, [(level.slice_op, lambda S: both(S, want_grad))], ov, want_grad
                )
                return val, grad, res[0].parts

        val, grad, results = nll(V, want_grad)
        B = batch.B
        loglik = torch.empty(B, dtype=torch.float64, device=dev)
        best_R = torch.empty(B, 3, 3, device=dev)
        best_t = torch.empty(B, 2, device=dev)
        max_prob = torch.empty(B, device=dev)
        kls = []
        rot_all = level.rotations
        for grp, res in zip(plan.groups, results[0].groups):
            rows = grp.rows.to(dev)
            best = torch.gather(
                grp.rot_idx.to(dev), 1, res.post_rot.argmax(-1, keepdim=True)
            ).squeeze(1)
            best_R[rows] = rot_all[rot_ids[best]]
            best_t[rows] = grp.shifts.to(dev, torch.float32)[
                torch.arange(len(rows), device=dev), res.post_shift.argmax(-1)
            ]
            loglik[rows], max_prob[rows] = res.loglik, res.max_prob
            if record:
                kls.append(
                    (
                        self.sampler.update_sampled(
                            idx[grp.rows.numpy()],
                            tau,
                            grp,
                            res.post_rot.cpu(),
                            res.post_shift.cpu(),
                            g,
                        ),
                        len(rows),
                    )
                )
        if len(plan.exact_rows):
            ex = results[1]
            rows = plan.exact_rows.to(dev)
            best_R[rows], best_t[rows] = rot_all[ex.best_rot], level.shifts[ex.best_shift]
            loglik[rows], max_prob[rows] = ex.loglik, ex.max_prob
            if record:
                kls.append(
                    (
                        self.sampler.update_exact(
                            idx[plan.exact_rows.numpy()],
                            tau,
                            ex.post_rot.cpu(),
                            ex.post_shift.cpu(),
                            g,
                        ),
                        len(rows),
                    )
                )
        return Evaluation(
            val,
            grad,
            loglik,
            best_R,
            best_t,
            max_prob,
            plan.fraction,
            plan.fraction_computed,
            lambda V: nll(V)[0],
            _nanmean(kls) if record else None,
        )


def _nanmean(pairs) -> float | None:
    """Weighted mean of ``(value, weight)`` pairs over the finite values, None if none."""
    pairs = [(k, w) for k, w in pairs if k is not None and math.isfinite(k)]
    if not pairs:
        return None
    return sum(k * w for k, w in pairs) / sum(w for _, w in pairs)
