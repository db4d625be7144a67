"""Iterative projection matching: the hard-assignment baseline of the paper (Sec. 4.5, Fig. 11).

"Images are matched to an initial density through a global cross-correlation search. The
density is then reconstructed based on these fixed orientations and this process is
iterated" (Sec. 4.5). Per iteration ``k`` (1-based):

1. match (:func:`assign_poses`): each particle takes the pose ``(R, t)`` of the full pose grid
   that maximises the posterior of the Gaussian model (Eq. 2) against the current map, i.e.
   the argmax of :func:`~cryorecon.model.likelihood.marginal_loglik`;
2. reconstruct (:func:`backproject_poses`): Wiener back-projection of all particles at those
   poses (:func:`~cryorecon.backproject.wiener_backproject`);
3. raise omega* as ``cryorecon reconstruct`` would at the start of its ``k``-th epoch
   (:func:`omega_for_iteration`) and repeat.

Start, pose grids, image model and cut-off schedule are those of ``cryorecon reconstruct``
with the same :class:`~cryorecon.reconstruct.ReconstructConfig`, so a comparison isolates
what differs: one pose per particle instead of marginalising (Eq. 3-4), a closed-form
least-squares map instead of SAGD steps, no density prior, all particles every iteration.
Deterministic given the seed. Outputs: see :func:`projection_matching`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .backproject import wiener_backproject
from .config import ReconstructConfig
from .errors import InputError, OutputExistsError
from .fourier.slicing import spectrum_from_volume
from .fourier.transforms import phase_shift
from .geometry.poses import pose_to_relion
from .io.atomic import write_json
from .io.mrc import write_map
from .model.likelihood import marginal_loglik
from .preprocess import default_diameter_A, load_batch
from .progress import bar, log
from .start import Level, make_level, random_spheres, scale_to_data, split_particles

# What a run writes in its folder (besides snapshots/); ``force`` removes these first.
PM_FILES = ("metrics.jsonl", "run.json", "volume.mrc", "initial.mrc", "poses.npz")


@dataclass
class Geometry:
    """Quantities that ``cryorecon reconstruct`` derives from the particles and the config
    (same formulas as :class:`~cryorecon.reconstruct.Run`): box ``D``, pixel size ``apix``
    (Å, median over particles), particle diameter and shift-prior sigma in pixels, the
    ``omega*`` schedule, and the number ``K`` of training minibatches (one epoch)."""

    D: int
    apix: float
    diameter_px: float
    shift_sigma_px: float
    schedule: object
    K: int
    pilot: np.ndarray


def run_geometry(particles, config: ReconstructConfig) -> Geometry:
    """The :class:`Geometry` of a cryorecon run on ``particles`` with ``config``."""
    D = particles.D
    apix = float(np.median(particles.apix))
    diameter_px = (config.diameter_A or default_diameter_A(D, apix)) / apix
    shift_sigma_A = config.shift_sigma_A if config.shift_sigma_A is not None else 0.05 * D * apix
    _, batches = split_particles(len(particles), config.heldout, config.minibatch, config.seed)
    pilot = batches[0][: min(200, len(batches[0]))]
    return Geometry(
        D, apix, diameter_px, shift_sigma_A / apix, config.schedule(apix), len(batches), pilot
    )


def initial_volume(
    particles, config: ReconstructConfig, geo: Geometry | None = None
) -> torch.Tensor:
    """The random start of ``cryorecon reconstruct`` for ``config.seed`` (``Run._start``):
    random spheres inside the particle's ball, scaled so their CTF-modulated slices carry the
    images' signal power on the pilot batch at omega*(0). (D, D, D) float32 on ``config.device``."""
    geo = geo or run_geometry(particles, config)
    gen = torch.Generator().manual_seed(config.seed)
    V = random_spheres(geo.D, 0.5 * geo.diameter_px, config.n_spheres, gen)
    lvl = make_level(
        geo.schedule.omega_star(0),
        geo.D,
        geo.apix,
        geo.shift_sigma_px,
        config.grid_scale,
        torch.device(config.device),
        config.oversample,
        shift_step=config.shift_step,
    )
    V, _ = scale_to_data(
        V,
        particles,
        geo.pilot,
        lvl,
        geo.diameter_px,
        config.oversample,
        gen,
        torch.device(config.device),
    )
    return V.to(config.device)


def omega_for_iteration(schedule, iteration: int, K: int) -> float:
    """Cut-off (1/Å) of projection-matching iteration ``iteration`` (1-based): cryorecon's
    omega* at the first minibatch of its ``iteration``-th epoch of ``K`` minibatches."""
    return schedule.omega_star((iteration - 1) * K + 1)


# ---------------------------------------------------------------------------------- matching


@dataclass
class Assignment:
    """One pose per particle and the match scores.

    rotations: (N, 3, 3) float32 RELION matrices; shifts_px: (N, 2) float32 translations ``t``
    (pixels, (x, y); content moved by +t, Eq. 1); rot_index, shift_index: (N,) indices into the
    level's grids; loglik: (N,) float64 marginal log-likelihood (Eq. 4, nats); best_loglik:
    (N,) float64 log-likelihood at the assigned pose (Eq. 2, constants dropped);
    correlation: (N,) float64 CTF-weighted normalised cross-correlation at the assigned pose.
    """

    rotations: torch.Tensor
    shifts_px: torch.Tensor
    rot_index: torch.Tensor
    shift_index: torch.Tensor
    loglik: torch.Tensor
    best_loglik: torch.Tensor
    correlation: torch.Tensor


def _scores_at(slices, batch, rot, shift_px) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood (Eq. 2, constants dropped) and normalised correlation of each image of
    ``batch`` with the model ``c s_t S_R`` at its own pose. Returns two (B,) float64."""
    S = slices[rot]
    model = batch.ctf * phase_shift(batch.freqs[None], shift_px.to(torch.float32)) * S  # (B, M)
    w = batch.weight
    cross = (w * (batch.y.conj() * model).real).sum(-1).double()
    yy = (w * batch.y.abs() ** 2).sum(-1).double()
    mm = (w * model.abs() ** 2).sum(-1).double()
    loglik = -(yy - 2 * cross + mm) / (2 * batch.sigma2.double())
    return loglik, cross / torch.sqrt((yy * mm).clamp_min(1e-300))


def assign_poses(
    particles,
    volume: torch.Tensor,
    level: Level,
    diameter_px: float,
    idx=None,
    batch_size: int = 500,
    oversample: int = 2,
    progress: bool = False,
) -> Assignment:
    """Global pose search of every particle ``idx`` (default: all) against ``volume``.

    Slices ``volume`` once at all of ``level``'s rotations, then for each batch of images
    evaluates the pose posterior over the full grid (rotations x shifts) with
    :func:`~cryorecon.model.likelihood.marginal_loglik` and keeps its argmax (Sec. 4.5's
    "global cross-correlation search", here CTF- and noise-weighted under the Gaussian model).
    """
    dev = volume.device
    idx = np.arange(len(particles)) if idx is None else np.asarray(idx)
    slices = level.slice_op.slice(spectrum_from_volume(volume, oversample))
    out = {k: [] for k in ("rot", "shift", "loglik", "best", "corr")}
    starts = range(0, len(idx), batch_size)
    for b in bar(starts, desc="matching", unit="batch", leave=False) if progress else starts:
        batch = load_batch(particles, idx[b : b + batch_size], level.halfplane, diameter_px, dev)
        res = marginal_loglik(
            slices, batch, level.shifts, level.log_w_rot, level.log_w_shift, want_grad=False
        )
        best, corr = _scores_at(slices, batch, res.best_rot, level.shifts[res.best_shift])
        for k, v in zip(out, (res.best_rot, res.best_shift, res.loglik, best, corr)):
            out[k].append(v)
    cat = {k: torch.cat(v) for k, v in out.items()}
    return Assignment(
        rotations=level.rotations[cat["rot"]].float(),
        shifts_px=level.shifts[cat["shift"]].float(),
        rot_index=cat["rot"],
        shift_index=cat["shift"],
        loglik=cat["loglik"],
        best_loglik=cat["best"],
        correlation=cat["corr"],
    )


def backproject_poses(
    particles,
    rotations: torch.Tensor,
    shifts_px: torch.Tensor,
    device="cpu",
    oversample: int = 2,
    diameter_A: float | None = None,
    idx=None,
    batch_size: int = 500,
) -> torch.Tensor:
    """Wiener back-projection (:func:`~cryorecon.backproject.wiener_backproject`) of particles
    ``idx`` at the given poses (rotations (N, 3, 3), translations ``t`` (N, 2) pixels for those
    particles) instead of the poses in their metadata. (D, D, D) float32 on ``device``."""
    idx = np.arange(len(particles)) if idx is None else np.asarray(idx)
    angles, origins = pose_to_relion(rotations.cpu(), shifts_px.cpu(), particles.apix[idx])
    view = copy.copy(particles)  # shares the memory-mapped stacks; only the poses differ
    view.angles = np.zeros((len(particles), 3))
    view.shifts = np.zeros((len(particles), 2))
    view.angles[idx], view.shifts[idx] = angles, origins
    return wiener_backproject(
        view,
        device=device,
        batch_size=batch_size,
        oversample=oversample,
        diameter_A=diameter_A,
        idx=idx,
    )


def pose_change(R_old: torch.Tensor, R_new: torch.Tensor, t_old: torch.Tensor, t_new: torch.Tensor):
    """Per-particle rotation angle between ``R_old`` and ``R_new`` (radians, geodesic on SO(3))
    and shift distance (pixels). Returns two (N,) float64 tensors.

    The angle is ``2 asin(||R_old - R_new||_F / sqrt(8))`` (``||R_old - R_new||_F^2 = 8
    sin^2(angle / 2)``), which unlike ``arccos((tr - 1) / 2)`` stays exact for small angles.
    """
    diff = (R_old.double() - R_new.double()).flatten(1).norm(dim=-1)
    angle = 2 * torch.arcsin((diff / 8**0.5).clamp(max=1.0))
    return angle, (t_old.double() - t_new.double()).norm(dim=-1)


# ---------------------------------------------------------------------------------- driver


def _prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    existing = [name for name in PM_FILES if (out / name).exists()]
    if existing and not force:
        raise OutputExistsError(
            f"{out} holds a projection-matching run ({', '.join(existing)}); "
            "refusing to overwrite (use force)"
        )
    for name in PM_FILES:
        (out / name).unlink(missing_ok=True)
    for snap in (out / "snapshots").glob("volume_*.mrc"):
        snap.unlink()
    out.mkdir(parents=True, exist_ok=True)


def projection_matching(
    particles,
    out_dir,
    config: ReconstructConfig,
    max_iterations: int | None = None,
    max_cpu_seconds: float | None = None,
    batch_size: int = 500,
    snapshot_every: int = 1,
    force: bool = False,
) -> dict:
    """Iterative projection matching (Sec. 4.5) from cryorecon's random start; see the module notes.

    Args:
        particles: a :class:`~cryorecon.io.particles.ParticleSet` (poses in it are ignored).
        out_dir: run folder (refused if it holds a run, unless ``force``).
        config: the settings of the cryorecon run to compare with: ``seed``, ``n_spheres``,
            ``minibatch`` and ``heldout`` (the start and the epoch length ``K``), the omega*
            schedule, ``grid_scale``, ``shift_sigma_A``, ``diameter_A``, ``oversample``,
            ``device``. Its SAGD, prior, importance-sampling and stopping fields are unused.
        max_iterations: stop after this many iterations.
        max_cpu_seconds: CPU-time budget (``time.process_time()``, all threads, counted from
            the call, start included). An iteration is not begun if the previous one's cost
            (scaled by the ratio of grid sizes when omega* rises) would take the total past
            the budget, so a run stays within it (the first iteration always runs).
        batch_size: images per matching / back-projection batch (memory only).
        snapshot_every: write ``snapshots/volume_XXXXXX.mrc`` every this many iterations.

    Writes in ``out_dir``: ``initial.mrc``, ``volume.mrc`` (the latest map),
    ``snapshots/volume_XXXXXX.mrc``, ``metrics.jsonl`` (one record per iteration, see
    :func:`_metrics`), ``poses.npz`` (assigned rotations, shifts, RELION angles and origins)
    and ``run.json`` (settings, stop reason, timings).

    Returns a summary dict: ``iterations``, ``seconds`` (wall), ``cpu_seconds``, ``reason``
    (``max_iterations`` or ``cpu_budget``), ``omega_star`` (last), ``volume`` (path).
    """
    if max_iterations is None and max_cpu_seconds is None:
        raise InputError("give max_iterations or max_cpu_seconds (or both)")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda requested but CUDA is not available")
    dev = torch.device(config.device)
    out = Path(out_dir)
    _prepare_out_dir(out, force)
    geo = run_geometry(particles, config)
    V = initial_volume(particles, config, geo)
    write_map(out / "initial.mrc", V.cpu().numpy(), geo.apix, overwrite=True)
    write_map(out / "volume.mrc", V.cpu().numpy(), geo.apix, overwrite=True)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    log.info(
        f"projection matching: {len(particles)} particles, epoch = {geo.K} minibatches of cryorecon"
    )

    level: Level | None = None
    prev: Assignment | None = None
    it, reason, last_cost, last_poses = 0, None, None, None
    pb = bar(total=max_iterations, desc="projection matching", unit="it")
    while True:
        omega = omega_for_iteration(geo.schedule, it + 1, geo.K)
        if max_iterations is not None and it >= max_iterations:
            reason = "max_iterations"
            break
        if level is None or level.omega != omega:
            level = make_level(
                omega,
                geo.D,
                geo.apix,
                geo.shift_sigma_px,
                config.grid_scale,
                dev,
                config.oversample,
                shift_step=config.shift_step,
            )
        if max_cpu_seconds is not None and last_cost is not None:
            predicted = last_cost * level.n_poses / last_poses
            if time.process_time() - cpu0 + predicted > max_cpu_seconds:
                reason = "cpu_budget"
                break
        it += 1
        c0 = time.process_time()
        asg = assign_poses(
            particles,
            V,
            level,
            geo.diameter_px,
            batch_size=batch_size,
            oversample=config.oversample,
            progress=True,
        )
        V = backproject_poses(
            particles,
            asg.rotations,
            asg.shifts_px,
            device=dev,
            oversample=config.oversample,
            diameter_A=geo.diameter_px * geo.apix,
            batch_size=batch_size,
        )
        last_cost, last_poses = time.process_time() - c0, level.n_poses
        rec = _metrics(
            it, omega, level, asg, prev, time.perf_counter() - wall0, time.process_time() - cpu0
        )
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        write_map(out / "volume.mrc", V.cpu().numpy(), geo.apix, overwrite=True)
        if it % snapshot_every == 0:
            write_map(
                out / "snapshots" / f"volume_{it:06d}.mrc",
                V.cpu().numpy(),
                geo.apix,
                overwrite=True,
            )
        prev = asg
        pb.update(1)
        changed = rec["fraction_changed"]
        pb.set_postfix(
            res=f"{1 / omega:.1f}A",
            cc=f"{rec['mean_correlation']:.3f}",
            changed="-" if changed is None else f"{changed:.2f}",
        )
    pb.close()
    summary = {
        "iterations": it,
        "seconds": time.perf_counter() - wall0,
        "cpu_seconds": time.process_time() - cpu0,
        "reason": reason,
        "omega_star": None if level is None else level.omega,
        "volume": str(out / "volume.mrc"),
    }
    if prev is not None:
        _save_poses(out / "poses.npz", particles, prev)
    _write_info(out, particles, config, geo, summary, max_iterations, max_cpu_seconds, batch_size)
    log.info(
        f"projection matching stopped after {it} iterations ({reason}); map: {out / 'volume.mrc'}"
    )
    return summary


def _metrics(
    it: int,
    omega: float,
    level: Level,
    asg: Assignment,
    prev: Assignment | None,
    seconds: float,
    cpu_seconds: float,
) -> dict:
    """One line of ``metrics.jsonl``.

    ``iteration``, ``seconds`` (wall), ``cpu_seconds`` (``time.process_time()``, all threads),
    ``omega_star`` (1/Å), ``resolution_A``, ``n_poses``, ``mean_loglik`` (marginal
    log-likelihood per particle, nats, as cryorecon's ``-train_nll``), ``mean_best_loglik``
    (at the assigned pose, constants dropped), ``mean_correlation`` (CTF-weighted normalised
    cross-correlation at the assigned pose), ``fraction_changed`` (particles whose rotation
    moved by more than half the grid's angular step or whose shift by more than half the
    shift-node spacing since the last iteration; ``None`` at iteration 1) and
    ``median_angle_change_deg``. Changes are absolute: a jump to a symmetry-related pose, or
    a turn of the whole map's frame (which the data do not fix), counts.
    """
    changed = median_deg = None
    if prev is not None:
        angle, dist = pose_change(prev.rotations, asg.rotations, prev.shifts_px, asg.shifts_px)
        moved = (angle > 0.5 * level.grid.sizes["alpha_used"]) | (dist > 0.5 * level.grid.r_t)
        changed = float(moved.double().mean())
        median_deg = float(torch.rad2deg(angle.median()))
    return {
        "iteration": it,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "omega_star": omega,
        "resolution_A": 1.0 / omega,
        "n_poses": level.n_poses,
        "mean_loglik": float(asg.loglik.mean()),
        "mean_best_loglik": float(asg.best_loglik.mean()),
        "mean_correlation": float(asg.correlation.mean()),
        "fraction_changed": changed,
        "median_angle_change_deg": median_deg,
    }


def _save_poses(path: Path, particles, asg: Assignment) -> None:
    angles, origins = pose_to_relion(asg.rotations.cpu(), asg.shifts_px.cpu(), particles.apix)
    tmp = path.with_name(".poses.tmp.npz")
    np.savez(
        tmp,
        rotations=asg.rotations.cpu().numpy(),
        shifts_px=asg.shifts_px.cpu().numpy(),
        angles_deg=angles,
        origins_A=origins,
    )
    os.replace(tmp, path)


def _write_info(
    out: Path,
    particles,
    config,
    geo: Geometry,
    summary: dict,
    max_iterations,
    max_cpu_seconds,
    batch_size,
) -> None:
    info = {
        "method": "projection matching (hard assignment + Wiener back-projection), paper Sec. 4.5",
        **summary,
        "max_iterations": max_iterations,
        "max_cpu_seconds": max_cpu_seconds,
        "batch_size": batch_size,
        "epoch_minibatches": geo.K,
        "config": asdict(config),
        "particles": str(particles.source),
        "n_particles": len(particles),
        "box": geo.D,
        "apix": geo.apix,
        "diameter_A": geo.diameter_px * geo.apix,
        "shift_sigma_A": geo.shift_sigma_px * geo.apix,
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "run.json", info)
