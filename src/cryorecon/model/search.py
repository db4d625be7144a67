"""Coarse-to-fine marginalisation over poses: a cost that follows the posterior mass.

The quadrature of Sec. 3.2 ties the pose grid to the band limit: at ``r = D apix omega*``
Fourier pixels it has about ``(3.6 r)^2 * 2 pi r`` rotations and ``r^2`` shifts, so the
exact sum of Eq. 4 costs ~r^7 per image. Its mass, once the map has structure, sits on a
tiny fraction of those poses. :class:`CoarseToFine` finds that fraction under the current
map at every visit (no pose history is carried between visits):

1. level 0: the full quadrature of a coarse band ``r_0 = min(r, coarse_radius)``, evaluated
   on the image coefficients inside ``r_0`` with the Sec. 3.2 grid for ``r_0``, where the
   likelihood is smooth on that grid;
2. level l = 1..n: the band doubles (``r_l = 2 r_{l-1}``; the last one is ``r``, at most a
   doubling) and so does the grid density. Per image, the rotations and the shifts of level
   l-1 to refine are those whose log posterior marginal lies within a margin of the image's
   best, ``max(margin_floor, margin_fraction * contrast)`` nats (``shift_margin_fraction``
   for shifts), together with the fewest carrying a mass of ``1 - epsilon / 2``, within
   ``[min, max]_rotations`` / ``_shifts``. ``contrast`` is the image's best minus median log
   marginal on level 0's whole grid, grown with the band like the number of coefficients: a
   grid samples a sharp peak up to half a spacing from its top, which costs a share of that
   contrast, so a margin that follows it keeps the true mode on a coarse level at any SNR.
   The kept points are replaced by their children on level l's grid: every grid point of
   level l belongs to its nearest point of level l-1 (directions on the sphere, in-plane
   angles, shifts in the plane), which partitions each grid into cells. The image is
   evaluated on the product of its children rotations and shifts, with level l's own
   quadrature weights (Eq. 4), by Eq. 13 (per-image products, or one GEMM over the union);
   an image whose candidates exceed ``max_fraction`` of a level's grid (a posterior too
   broad for a search to pay) takes the exact sum of Eq. 4 over the final grid instead;
3. the final level is evaluated at the full band: its sum is the marginal likelihood (Eq. 4)
   restricted to the cells the search kept, and its posterior gives the gradient (Eq. 5,
   Appendix A) and the image's pose.

Mass outside the kept cells is not added back: coarser levels are evaluated on fewer
coefficients, so their likelihoods are not on the final band's scale. The search therefore
underestimates log p(I) by the mass it dropped; ``benchmarks/search_accuracy.py`` measures
the error against the exact sum (docs/results.md).

Anchors: RELION's adaptive oversampling (a coarse pass, then the oversampled pass over the
significant poses), cryoDRGN's hierarchical pose search (a base grid, subdivisions of the best
poses with a rising band), cryoSPARC's branch and bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from ..fourier.slicing import SliceOperator, spectrum_from_volume
from ..geometry.grids import PoseGrid
from ..geometry.rotations import direction_inplane_to_matrix
from ..geometry.symmetry import asymmetric_unit_grid, parse_symmetry
from .likelihood import (
    PER_IMAGE_COST,
    ImageBatch,
    marginal_loglik,
    sampled_loglik,
    sampled_loglik_shared,
    volume_objective,
)
from .objective import Evaluation

# Interpolation set-up cached per level-0 grid (small); finer levels recompute it per batch.
LEVEL0_CACHE_BYTES = 2**28
UNION_CACHE_BYTES = 2**27


@dataclass
class SearchConfig:
    """Settings of the coarse-to-fine search (radii in Fourier pixels of the box).

    coarse_radius: largest band of the exhaustive level 0 (``coarse_fraction`` of the final
    band when that is larger; :func:`level_radii`); with ``full_band`` every level is
    evaluated on all the final band's coefficients, only its grid follows its band.
    A cell of level l-1 (a rotation, or a shift) is refined when it is among the fewest
    carrying a posterior mass of ``1 - epsilon / 2`` (rotations and shifts each), or when its
    log posterior marginal lies
    within ``margin`` nats of the image's best one, with
    ``margin = max(margin_floor, margin_fraction * spread)`` and ``spread`` the best minus the
    median log marginal of that image on that level: a coarse grid samples a peak of the
    likelihood at up to half a spacing from its top, which costs a share of the image's
    log-likelihood contrast, so the margin follows that contrast. min/max_rotations,
    min/max_shifts: per image and level, bounds on the kept rotations and shifts.
    shift_margin_fraction: the ``margin_fraction`` of shifts, larger: the Gauss-Hermite nodes
    of a coarse level are spaced widely away from the centre, so a sharp likelihood can rank
    an image's true shift far down there.
    max_fraction: an image whose candidate poses on a level exceed this share of that level's
    grid takes the exact sum of Eq. 4 over the final grid instead (its posterior is too
    broad for a search to pay).
    exact_below: while the exact sum costs at most this many (pose x coefficient) products per
    image, every image takes it (no search; 0: never).
    """

    coarse_radius: float = 5.5
    coarse_fraction: float = 0.0
    full_band: bool = False
    epsilon: float = 1e-3
    margin_fraction: float = 0.4
    margin_floor: float = 8.0
    shift_margin_fraction: float = 0.8
    min_rotations: int = 4
    max_rotations: int = 8192
    min_shifts: int = 1
    max_shifts: int = 1024
    max_fraction: float = 0.5
    exact_below: float = 0.0


SEARCH_MODES = ("accurate", "fast")


def search_config(
    mode: str = "accurate",
    epsilon: float = 1e-3,
    max_rotations: int | None = None,
    coarse_radius: float = 5.5,
) -> SearchConfig:
    """The search's settings for ``mode``.

    ``accurate``: :class:`SearchConfig`'s defaults, level 0 on a band of at most
    ``coarse_radius`` and margins that follow each image's contrast, so that the true mode
    survives the coarse levels at low SNR (its log-likelihood error is measured against the
    exact sum in ``benchmarks/search_accuracy.py``).
    ``fast``: RELION's two passes (a coarse pass, then the significant poses oversampled).
    Level 0 is the grid of half the final band (half the angular and shift spacing of Sec.
    3.2's final grid: 1/8 of its rotations, about 1/4 of its shifts), evaluated on all the
    final band's coefficients; level 1 is the final grid in the cells of at most
    ``max_rotations`` (default 16) rotations and 3 shifts per image, those within 4 nats of
    the image's best or among the fewest carrying ``1 - epsilon / 2`` of the mass. Work per
    image is about 1/32 of the exact sum's; the mass outside the kept cells is dropped. While
    the exact sum costs at most 2e7 (pose x coefficient) products per image (at box 64 and
    5.6 Å/px down to about 30 Å) it is taken instead: it is cheap there, and the first
    iterations from a random start then marginalise over every pose as the paper's do (a few
    poses per image from a random map trap the run in a wrong one, measured).
    """
    if mode == "accurate":
        kw = {} if max_rotations is None else {"max_rotations": max_rotations}
        return SearchConfig(coarse_radius=coarse_radius, epsilon=epsilon, **kw)
    if mode == "fast":
        return SearchConfig(
            coarse_fraction=0.5,
            full_band=True,
            epsilon=epsilon,
            margin_fraction=0.0,
            shift_margin_fraction=0.0,
            margin_floor=4.0,
            max_rotations=16 if max_rotations is None else max_rotations,
            max_shifts=3,
            exact_below=2e7,
        )
    raise ValueError(f"search mode must be one of {SEARCH_MODES}, got {mode!r}")


@dataclass
class SearchLevel:
    """One level of the hierarchy: its band, grid, and the children of the previous level.

    cols: (M_l,) columns of the final band's coefficients inside ``radius``.
    log_w_R: (n_rotations,) log quadrature weight times p(R) of the grid's rotations (Eq. 4;
    uniform in C1, lower on the boundary of a point group's asymmetric unit).
    child_d: (M_d of level l-1, C_d) directions of this level in each coarser direction's
    cell (-1 padding); child_psi (M_psi of l-1, C_psi); child_t (M_t of l-1, C_t).
    """

    radius: float
    grid: PoseGrid
    cols: torch.Tensor
    log_w_R: torch.Tensor
    shifts: torch.Tensor
    log_w_t: torch.Tensor
    directions: torch.Tensor
    psi: torch.Tensor
    child_d: torch.Tensor | None = None
    child_psi: torch.Tensor | None = None
    child_t: torch.Tensor | None = None
    slice_op: SliceOperator | None = None
    freqs_px: torch.Tensor | None = None

    @property
    def n_poses(self) -> int:
        return self.grid.n_rotations * self.grid.M_t

    def rotations(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, 3, 3) float32 rotations of grid ids ``j * M_psi + k`` (built on demand)."""
        M = self.grid.M_psi
        return direction_inplane_to_matrix(self.directions[ids // M], self.psi[ids % M]).to(
            torch.float32
        )


def _children(parent: np.ndarray, n_parents: int) -> torch.Tensor:
    """Invert a child -> parent map: (n_parents, C) child indices, -1 padding."""
    order = np.argsort(parent, kind="stable")
    counts = np.bincount(parent, minlength=n_parents)
    C = max(1, int(counts.max()))
    out = np.full((n_parents, C), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(parent)) - np.repeat(starts, counts)
    out[parent[order], rank] = order
    return torch.as_tensor(out)


def level_radii(r: float, coarse_radius: float, coarse_fraction: float = 0.0) -> list[float]:
    """Bands of the hierarchy: ``r_0, 2 r_0, 4 r_0, ..., r`` (the last step at most a
    doubling) with ``r_0 = max(coarse_radius, coarse_fraction r)``; ``[r]`` when
    ``r <= r_0``."""
    radii = [min(r, max(coarse_radius, coarse_fraction * r))]
    while radii[-1] < r:
        radii.append(min(r, 2 * radii[-1]))
    return radii


def build_hierarchy(
    D: int,
    apix: float,
    radius: float,
    kx: torch.Tensor,
    ky: torch.Tensor,
    shift_sigma_px: float,
    grid_scale: float,
    oversample: int,
    device,
    cfg: SearchConfig,
    cache_bytes: int = 2**30,
    symmetry: str = "C1",
    shift_step: float | None = None,
) -> list[SearchLevel]:
    """The levels for a final band of ``radius`` Fourier pixels; ``kx, ky`` are the integer
    frequencies of the final band's coefficients
    (:class:`~cryorecon.fourier.transforms.HalfPlane`). With a point group (RELION's name)
    every level's grid covers its asymmetric unit only
    (:func:`~cryorecon.geometry.symmetry.asymmetric_unit_grid`)."""
    levels: list[SearchLevel] = []
    r2 = (kx.double() ** 2 + ky.double() ** 2).cpu()
    freqs = torch.stack([kx, ky], -1).to(device, torch.float32)
    radii = level_radii(radius, cfg.coarse_radius, cfg.coarse_fraction)
    for k, r in enumerate(radii):
        grid = PoseGrid(
            D=D,
            apix=apix,
            omega_star=r / (D * apix),
            shift_sigma_px=shift_sigma_px,
            scale=grid_scale,
            shift_step=shift_step,
        )
        if symmetry != "C1":
            grid = asymmetric_unit_grid(grid, parse_symmetry(symmetry))
        if r < radius and not cfg.full_band:
            inside = r2 < r * r
        else:
            inside = torch.ones_like(r2, dtype=torch.bool)
        cols = torch.nonzero(inside).squeeze(-1).to(device)
        lw_R = grid.log_w_R().to(device, torch.float32)
        lvl = SearchLevel(
            r,
            grid,
            cols,
            lw_R,
            grid.shifts.to(device, torch.float32),
            grid.log_w_t.to(device, torch.float32),
            grid.directions.to(device),
            grid.psi.to(device),
        )
        lvl.freqs_px = freqs[cols]
        last = k == len(radii) - 1
        if k == 0 or (not last and grid.n_rotations * len(cols) * 64 <= cache_bytes):
            # The whole grid's interpolation set-up, when it fits: a batch's union of
            # rotations then indexes it instead of recomputing it. The final level's grid is
            # the run's own level's, whose set-up the search shares (CoarseToFine._final).
            R = grid.rotations(device=device)
            lvl.slice_op = SliceOperator(
                R, freqs[cols], D, oversample, cache_bytes=max(cache_bytes, LEVEL0_CACHE_BYTES)
            )
        if k > 0:
            prev = levels[-1].grid
            pd = cKDTree(prev.directions.numpy()).query(grid.directions.numpy())[1]
            ppsi = (
                np.rint(grid.psi.numpy() / (2 * math.pi / prev.M_psi)).astype(np.int64) % prev.M_psi
            )
            pt = cKDTree(prev.shifts.numpy()).query(grid.shifts.numpy())[1]
            lvl.child_d = _children(pd, prev.M_d).to(device)
            lvl.child_psi = _children(ppsi, prev.M_psi).to(device)
            lvl.child_t = _children(pt, prev.M_t).to(device)
        levels.append(lvl)
    return levels


def keep_mass(post: torch.Tensor, ids: torch.Tensor | None, mass: float, k_min: int, k_max: int):
    """Per row, the fewest entries of ``post`` (B, n) whose mass reaches ``mass``, clamped to
    ``[k_min, k_max]``; entries of zero probability are never kept (the top one always is).
    Returns ``(ids (B, W), valid (B, W))``: the kept entries' ``ids`` (column indices when
    ``ids`` is None) and which of the W columns are real."""
    p, order = post.sort(-1, descending=True)
    before = p.cumsum(-1) - p
    n = (before < mass).sum(-1).clamp(min=k_min, max=k_max)
    W = int(n.max())
    p, order = p[:, :W], order[:, :W]
    valid = (torch.arange(W, device=post.device)[None, :] < n[:, None]) & (p > 0)
    valid[:, 0] = True
    kept = order if ids is None else torch.gather(ids, 1, order)
    return kept, valid


def log_spread(post: torch.Tensor) -> torch.Tensor:
    """Per row of ``post`` (B, n), the largest minus the median log probability over the
    row's non-zero entries (nats, float64): the image's log-likelihood contrast on that grid."""
    p = post.sort(-1, descending=True).values.double()
    nz = (p > 0).sum(-1).clamp(min=1)
    return torch.log(p[:, 0]) - torch.log(torch.gather(p, 1, ((nz - 1) // 2)[:, None]).squeeze(1))


def keep_margin(
    post: torch.Tensor,
    ids: torch.Tensor | None,
    mass: float,
    fraction: float,
    floor: float,
    k_min: int,
    k_max: int,
    spread: torch.Tensor | None = None,
):
    """Per row of ``post`` (B, n; zero for padding), the union of the entries :func:`keep_mass`
    keeps and those whose log probability lies within ``max(floor, fraction * spread)`` nats
    of the row's largest (``spread``: (B,), default :func:`log_spread` of ``post``); at least
    ``k_min``, at most ``k_max`` entries (the most probable first). Returns
    ``(ids (B, W), valid (B, W))`` as :func:`keep_mass` does."""
    p, order = post.sort(-1, descending=True)
    before = p.cumsum(-1) - p
    n_mass = (before < mass).sum(-1)
    lp = torch.log(p.double())
    spread = log_spread(post) if spread is None else spread.to(lp)
    margin = torch.where(spread > 0, fraction * spread, torch.zeros_like(spread)).clamp(min=floor)
    n_margin = ((lp >= lp[:, :1] - margin[:, None]) & (p > 0)).sum(-1)
    n = torch.maximum(n_mass, n_margin).clamp(min=k_min, max=k_max)
    W = int(n.max())
    p, order = p[:, :W], order[:, :W]
    valid = (torch.arange(W, device=post.device)[None, :] < n[:, None]) & (p > 0)
    valid[:, 0] = True
    kept = order if ids is None else torch.gather(ids, 1, order)
    return kept, valid


def _compact(ids: torch.Tensor, ok: torch.Tensor):
    """Move each row's valid entries first and drop columns that are padding in every row."""
    order = torch.argsort((~ok).to(torch.int8), dim=-1, stable=True)
    ids, ok = torch.gather(ids, 1, order), torch.gather(ok, 1, order)
    W = max(1, int(ok.sum(-1).max()))
    return ids[:, :W], ok[:, :W]


def rotation_children(prev: SearchLevel, lvl: SearchLevel, ids: torch.Tensor, valid: torch.Tensor):
    """Level ``lvl``'s rotations in the cells of ``prev``'s rotations ``ids`` (B, W): ids and
    validity (B, R), compacted. Rotation ids are direction-major (``j * M_psi + k``)."""
    Mc, Mf = prev.grid.M_psi, lvl.grid.M_psi
    cd, cp = lvl.child_d[ids // Mc], lvl.child_psi[ids % Mc]  # (B, W, Cd), (B, W, Cp)
    fine = cd[..., :, None] * Mf + cp[..., None, :]
    ok = valid[..., None, None] & (cd >= 0)[..., :, None] & (cp >= 0)[..., None, :]
    B = ids.shape[0]
    return _compact(fine.reshape(B, -1).clamp_min(0), ok.reshape(B, -1))


def shift_children(lvl: SearchLevel, ids: torch.Tensor, valid: torch.Tensor):
    """Level ``lvl``'s shifts in the cells of the previous level's shifts ``ids`` (B, W)."""
    ct = lvl.child_t[ids]  # (B, W, Ct)
    ok = valid[..., None] & (ct >= 0)
    B = ids.shape[0]
    return _compact(ct.reshape(B, -1).clamp_min(0), ok.reshape(B, -1))


def _columns(batch: ImageBatch, cols: torch.Tensor) -> ImageBatch:
    if cols.numel() == batch.y.shape[1]:
        return batch
    return ImageBatch(
        batch.y[:, cols],
        batch.ctf[:, cols],
        batch.sigma2,
        batch.weight[cols],
        batch.freqs[cols],
        batch.image_weight,
    )


@dataclass
class _Candidates:
    """The poses one level evaluates per image (product layout of Eq. 13)."""

    rot_ids: torch.Tensor  # (U,) union of rotation ids on the level's grid
    rot_idx: torch.Tensor  # (B, R) index into rot_ids
    rot_full: torch.Tensor  # (B, R) rotation ids on the level's grid
    rot_logw: torch.Tensor  # (B, R) log quadrature weight, -inf padding
    t_full: torch.Tensor  # (B, Lt) shift ids on the level's grid
    t_logw: torch.Tensor  # (B, Lt)
    n_eval: torch.Tensor  # (B,) poses evaluated (without padding)


def _candidates(lvl: SearchLevel, rot, rot_ok, t, t_ok) -> _Candidates:
    rot_ids, inverse = torch.unique(rot[rot_ok], return_inverse=True)
    rot_idx = torch.zeros_like(rot)
    rot_idx[rot_ok] = inverse
    rot_logw = torch.where(rot_ok, lvl.log_w_R[rot], -math.inf)
    t_logw = torch.where(t_ok, lvl.log_w_t[t], -math.inf)
    return _Candidates(rot_ids, rot_idx, rot, rot_logw, t, t_logw, rot_ok.sum(-1) * t_ok.sum(-1))


class CoarseToFine:
    """The coarse-to-fine marginaliser (see the module docstring); keeps no particle state.

    ``last_stats`` holds a summary of the last evaluation: ``work`` (the (pose x coefficient)
    products computed, over the exact sum's), ``routed_exact`` (share of images sent to the
    exact sum) and per level the kept rotations and shifts per image (median, max).
    """

    name = "search"

    def __init__(
        self,
        D: int,
        apix: float,
        shift_sigma_px: float,
        grid_scale: float = 1.0,
        oversample: int = 2,
        cfg: SearchConfig | None = None,
        cache_bytes: int = 2**30,
    ):
        self.D, self.apix, self.shift_sigma_px = D, apix, shift_sigma_px
        self.cache_bytes = cache_bytes
        self.grid_scale, self.oversample = grid_scale, oversample
        self.cfg = cfg or SearchConfig()
        self._levels: tuple[float, list[SearchLevel]] | None = None
        self.last_stats: dict = {}

    def hierarchy(self, level) -> list[SearchLevel]:
        """The levels for ``level`` (a :class:`cryorecon.start.Level`), built once per omega*."""
        key = (level.omega, getattr(level, "symmetry", "C1"), getattr(level, "shift_step", None))
        if self._levels is None or self._levels[0] != key:
            hp = level.halfplane
            self._levels = (
                key,
                build_hierarchy(
                    self.D,
                    self.apix,
                    hp.radius,
                    hp.kx,
                    hp.ky,
                    self.shift_sigma_px,
                    self.grid_scale,
                    self.oversample,
                    level.device,
                    self.cfg,
                    self.cache_bytes,
                    key[1],
                    key[2],
                ),
            )
        return self._levels[1]

    def metrics(self) -> dict:
        """The last evaluation's summary for a run's ``metrics.jsonl``: ``search_work`` (share of
        the exact sum's (pose x coefficient) products computed), ``search_routed_exact`` (share
        of images sent to the exact sum), ``search_kept_rotations`` and ``search_kept_shifts``
        (per level after the first: [median, max] kept per image); empty before any."""
        st = self.last_stats
        if not st:
            return {}
        return {
            "search_work": round(st["work"], 6),
            "search_routed_exact": round(st["routed_exact"], 4),
            "search_kept_rotations": [lv["rotations_kept"] for lv in st["levels"]],
            "search_kept_shifts": [lv["shifts_kept"] for lv in st["levels"]],
        }

    def _keep(self, post_rot, post_t, rot_ids, t_ids, spread_rot, spread_t):
        c = self.cfg
        m = 1 - c.epsilon / 2
        kr, vr = keep_margin(
            post_rot,
            rot_ids,
            m,
            c.margin_fraction,
            c.margin_floor,
            c.min_rotations,
            c.max_rotations,
            spread_rot,
        )
        kt, vt = keep_margin(
            post_t,
            t_ids,
            m,
            c.shift_margin_fraction,
            c.margin_floor,
            c.min_shifts,
            c.max_shifts,
            spread_t,
        )
        return kr, vr, kt, vt

    def evaluate(self, V, batch, idx, level, tau, want_grad=True, record=True) -> Evaluation:
        H = self.hierarchy(level)
        ov, c = self.oversample, self.cfg
        spec = spectrum_from_volume(V, ov)
        top = H[0]
        dev = spec.device
        B = batch.B
        full = H[-1].n_poses
        full_work = float(full) * len(H[-1].cols) * B
        lw0 = top.log_w_R
        if c.exact_below and full * len(H[-1].cols) <= c.exact_below:
            self.last_stats = {"work": 1.0, "routed_exact": 1.0, "levels": []}
            routed = torch.ones(B, dtype=torch.bool, device=dev)
            return self._final(
                V, H[-1], level, batch, spec, None, None, routed, want_grad, 1.0, 1.0
            )
        if len(H) == 1:

            def nll(V, g=False, spectrum=None):
                part = (
                    top.slice_op,
                    lambda S: marginal_loglik(
                        S, _columns(batch, top.cols), top.shifts, lw0, top.log_w_t, g
                    ),
                )
                return volume_objective(V, [part], ov, g, spectrum)

            val, grad, res = nll(V, want_grad, spec)
            r = res[0]
            self.last_stats = {"work": 1.0, "routed_exact": 0.0, "levels": []}
            return Evaluation(
                val,
                grad,
                r.loglik,
                top.rotations(r.best_rot),
                top.shifts[r.best_shift],
                r.max_prob,
                1.0,
                1.0,
                lambda V: nll(V)[0],
            )
        b0 = _columns(batch, top.cols)
        r0 = marginal_loglik(
            top.slice_op.slice(spec),
            b0,
            top.shifts,
            lw0,
            top.log_w_t,
            want_grad=False,
            want_posteriors=True,
        )
        n_eval = torch.full((B,), float(top.n_poses), dtype=torch.float64, device=dev)
        n_comp = float(top.n_poses) * B
        work = float(top.n_poses) * len(top.cols) * B
        active = torch.arange(B, device=dev)  # rows still searched
        routed = torch.zeros(B, dtype=torch.bool, device=dev)
        post_rot, post_t, rot_prev, t_prev = r0.post_rot, r0.post_shift, None, None
        # Each image's contrast is measured on level 0's whole grid (a kept set's median is no
        # reference) and grows with the band like the number of coefficients.
        spread0 = torch.stack([log_spread(post_rot), log_spread(post_t)])
        stats = []
        cand = None
        for k in range(1, len(H)):
            prev, lvl = H[k - 1], H[k]
            grow = len(prev.cols) / len(top.cols)
            sp = spread0[:, active] * grow
            kr, vr, kt, vt = self._keep(post_rot, post_t, rot_prev, t_prev, sp[0], sp[1])
            rot, rot_ok = rotation_children(prev, lvl, kr, vr)
            t, t_ok = shift_children(lvl, kt, vt)
            n_cand = rot_ok.sum(-1) * t_ok.sum(-1)
            stats.append(
                {
                    "radius": lvl.radius,
                    "rotations_kept": _med_max(vr.sum(-1)),
                    "shifts_kept": _med_max(vt.sum(-1)),
                }
            )
            dense = n_cand > c.max_fraction * lvl.n_poses
            if bool(dense.any()):
                routed[active[dense]] = True
                keep = ~dense
                active, rot, rot_ok, t, t_ok = (
                    active[keep],
                    rot[keep],
                    rot_ok[keep],
                    t[keep],
                    t_ok[keep],
                )
                if len(active) == 0:
                    break
                rot, rot_ok = _compact(rot, rot_ok)
                t, t_ok = _compact(t, t_ok)
            cand = _candidates(lvl, rot, rot_ok, t, t_ok)
            n_eval[active] += cand.n_eval.double()
            n_comp += float(rot.numel() * t.shape[1])
            work += float(rot.numel() * t.shape[1]) * len(lvl.cols)
            if k < len(H) - 1:
                res = _level_loglik(self, lvl, spec, batch.rows(active), cand, False)[1]
                post_rot, post_t, rot_prev, t_prev = (
                    res.post_rot,
                    res.post_shift,
                    cand.rot_full,
                    cand.t_full,
                )
        n_routed = int(routed.sum())
        if n_routed:
            n_eval[routed] = float(full)
            n_comp += float(full) * n_routed
            work += full_work / B * n_routed
        self.last_stats = {"work": work / full_work, "routed_exact": n_routed / B, "levels": stats}
        return self._final(
            V,
            H[-1],
            level,
            batch,
            spec,
            active if len(active) and cand is not None else None,
            cand,
            routed,
            want_grad,
            float((n_eval / full).mean()),
            n_comp / (B * full),
        )

    def _final(
        self, V, lvl, level, batch, spec, active, cand, routed, want_grad, fraction, computed
    ):
        """The last level: the search's rows on their candidates, the routed rows by the exact sum
        over ``level``'s grid (the same grid as ``lvl``'s), sharing one spectrum and gradient."""
        ov, dev, B = self.oversample, spec.device, batch.B
        ex_rows = torch.nonzero(routed).squeeze(-1)
        parts = []
        if active is not None:
            op = _level_op(self, lvl, cand, level)
            ev_level = _level_eval(lvl, batch.rows(active), cand)
            parts.append(("search", op, ev_level))
        if len(ex_rows):
            bx = batch.rows(ex_rows)
            parts.append(
                (
                    "exact",
                    level.slice_op,
                    lambda S, g: marginal_loglik(
                        S, bx, level.shifts, level.log_w_rot, level.log_w_shift, g
                    ),
                )
            )

        def nll(V, g=False, spectrum=None):
            return volume_objective(
                V, [(op, lambda S, ev=ev: ev(S, g)) for _, op, ev in parts], ov, g, spectrum
            )

        val, grad, results = nll(V, want_grad, spec)
        loglik = torch.empty(B, dtype=torch.float64, device=dev)
        best_R = torch.empty(B, 3, 3, device=dev)
        best_t = torch.empty(B, 2, device=dev)
        max_prob = torch.empty(B, device=dev)
        for (kind, _, _), r in zip(parts, results):
            if kind == "search":
                ar = torch.arange(len(active), device=dev)
                best_rot = cand.rot_full[ar, r.post_rot.argmax(-1)]
                bt = cand.t_full[ar, r.post_shift.argmax(-1)]
                rows, R, t = active, lvl.rotations(best_rot), lvl.shifts[bt]
            else:
                rows, R, t = ex_rows, level.rotations[r.best_rot], level.shifts[r.best_shift]
            loglik[rows], best_R[rows], best_t[rows], max_prob[rows] = r.loglik, R, t, r.max_prob
        return Evaluation(
            val, grad, loglik, best_R, best_t, max_prob, fraction, computed, lambda V: nll(V)[0]
        )


def _med_max(n: torch.Tensor) -> list[int]:
    return [int(n.median()), int(n.max())] if n.numel() else [0, 0]


def _level_op(
    search: CoarseToFine, lvl: SearchLevel, cand: _Candidates, level=None
) -> SliceOperator:
    """The slice operator of ``cand``'s union of rotations on ``lvl``'s grid: a subset of a
    cached set-up (``lvl``'s, or for the final level that of the run's ``level``, the same
    grid), else computed for the union."""
    if lvl.slice_op is not None:
        return lvl.slice_op.subset(cand.rot_ids)
    if level is not None and (level.grid.M_d, level.grid.M_psi) == (lvl.grid.M_d, lvl.grid.M_psi):
        return level.slice_op.subset(cand.rot_ids)
    return SliceOperator(
        lvl.rotations(cand.rot_ids),
        lvl.freqs_px,
        search.D,
        search.oversample,
        cache_bytes=UNION_CACHE_BYTES,
    )


def _level_eval(lvl: SearchLevel, batch: ImageBatch, cand: _Candidates):
    """Eq. 13 on each image's candidates: per-image products (:func:`sampled_loglik`), or the
    shared GEMM over the union of rotations and the level's shifts
    (:func:`sampled_loglik_shared`) when that is cheaper (``PER_IMAGE_COST``)."""
    bl = _columns(batch, lvl.cols)
    U, R, Lt = len(cand.rot_ids), cand.rot_idx.shape[1], cand.t_full.shape[1]
    if lvl.grid.M_t * U < PER_IMAGE_COST * R * Lt:

        def ev(S, g):
            return sampled_loglik_shared(
                S,
                bl,
                cand.rot_idx,
                cand.rot_logw,
                cand.t_full,
                cand.t_logw,
                lvl.shifts,
                want_grad=g,
            )

        return ev
    shifts = lvl.shifts[cand.t_full]

    def ev(S, g):
        return sampled_loglik(S, bl, cand.rot_idx, cand.rot_logw, shifts, cand.t_logw, want_grad=g)

    return ev


def _level_loglik(
    search: CoarseToFine, lvl: SearchLevel, spec, batch: ImageBatch, cand: _Candidates, g: bool
):
    op = _level_op(search, lvl, cand)
    return op, _level_eval(lvl, batch, cand)(op.slice(spec), g)
