"""``cryorecon reconstruct particles.star -o OUT``: ab-initio reconstruction from a random start
(marginalised MAP with SAGD; see :mod:`cryorecon.reconstruct`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..config import POSE_SEARCHES, RESOLUTION_SCHEDULES, SEARCH_MODES
from ..contrast import apply_contrast
from ..geometry.symmetry import parse_symmetry
from ..io.checks import exclude_blank
from ..preprocess import default_diameter_A
from ..reconstruct import ReconstructConfig, reconstruct
from ..runstate import exit_code_for
from ._args import at_least, positive
from ._input import add_datadir_argument, add_image_arguments, read_particles_from_args
from ._output import check_device, check_output_dir


def add_reconstruct_arguments(p) -> None:
    """Options shared by ``reconstruct`` and ``demo``."""
    d = ReconstructConfig()
    p.add_argument("--device", default=d.device, help="cpu or cuda (default cpu)")
    p.add_argument(
        "--prior",
        choices=["exponential", "uniform", "car"],
        default=d.prior,
        help="density prior (default exponential, Sec. 3.3)",
    )
    p.add_argument(
        "--prior-lambda",
        type=positive(),
        default=None,
        help="exponential prior rate (default: from --prior-strength)",
    )
    p.add_argument(
        "--prior-strength",
        type=positive(),
        default=d.prior_strength,
        help="scale of the default exponential rate relative to the data's curvature "
        "(default 3; larger = sparser maps, too large empties maps of small data sets)",
    )
    p.add_argument(
        "--car-sigma",
        type=positive(),
        default=None,
        help="CAR prior sigma (default: std of the start)",
    )
    p.add_argument(
        "--minibatch",
        type=at_least(1),
        default=d.minibatch,
        help=f"particles per minibatch (default {d.minibatch})",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    p.add_argument(
        "--max-iters", type=at_least(1), default=d.max_iters, help="iteration limit (default 5000)"
    )
    p.add_argument("--max-time", type=positive(), default=None, help="wall-time limit in minutes")
    p.add_argument(
        "--resolution",
        type=positive(),
        default=None,
        help="final resolution cut-off in Å (default 1/0.11 = 9.1 Å, capped at Nyquist)",
    )
    p.add_argument(
        "--start-resolution",
        type=positive(),
        default=None,
        help="initial cut-off in Å (default 40; 50 with --schedule paper)",
    )
    p.add_argument(
        "--schedule",
        choices=RESOLUTION_SCHEDULES,
        default=d.resolution_schedule,
        help="how the cut-off rises: 'adaptive' (default) multiplies it by --omega-factor once "
        "the held-out error levels off; 'paper' adds --omega-step every --omega-every "
        "iterations (Sec. 4.2)",
    )
    p.add_argument(
        "--omega-factor",
        type=at_least(1.01, float),
        default=d.omega_factor,
        help="adaptive schedule: factor of each cut-off increase (default 1.15)",
    )
    p.add_argument(
        "--omega-max-iters",
        type=at_least(1),
        default=None,
        help="adaptive schedule: the most iterations at one cut-off (default one epoch, the "
        "training minibatches, within 20-400)",
    )
    p.add_argument(
        "--omega-step",
        type=at_least(0, float),
        default=d.omega_step,
        help="paper schedule: cut-off increase in 1/Å (default 0.005)",
    )
    p.add_argument(
        "--omega-every",
        type=at_least(1),
        default=d.omega_every,
        help="paper schedule: iterations between cut-off increases (default 150)",
    )
    p.add_argument(
        "--diameter",
        type=positive(),
        default=None,
        help="particle diameter in Å (default 80%% of box)",
    )
    p.add_argument(
        "--shift-sigma",
        type=positive(),
        default=None,
        help="std of the Gaussian shift prior in Å (default 5%% of the box)",
    )
    p.add_argument(
        "--grid-scale",
        type=positive(),
        default=d.grid_scale,
        help=f"coarsen the pose quadrature by this factor (default {d.grid_scale:g}; 1 = the "
        "paper's, Sec. 3.2)",
    )
    p.add_argument(
        "--shift-step",
        type=at_least(0, float),
        default=d.shift_step,
        help=f"spacing of the shift quadrature as a fraction of the resolution at the cut-off "
        f"(default {d.shift_step:g}: a lattice of spacing {d.shift_step:g}/omega* inside 2.5 "
        "prior sigmas; 0 = the paper's Gauss-Hermite rule with the nodes divided by --grid-scale)",
    )
    p.add_argument(
        "--heldout", type=at_least(1), default=d.heldout, help="held-out particles (default 200)"
    )
    p.add_argument(
        "--heldout-every",
        type=at_least(1),
        default=d.heldout_every,
        help="iterations between held-out evaluations (default 10)",
    )
    p.add_argument(
        "--patience",
        type=at_least(0),
        default=d.patience,
        help="held-out evaluations without improvement at the final cut-off before stopping",
    )
    p.add_argument(
        "--pose-search",
        choices=POSE_SEARCHES,
        default=d.pose_search,
        help="marginalisation over poses: 'search' (default) coarse-to-fine, its cost following "
        "the posterior mass (see --search-mode); 'importance' the paper's importance sampling "
        "(Sec. 3.4); 'exact' every pose of the quadrature (Sec. 3.2)",
    )
    p.add_argument("--exact", action="store_true", help="same as --pose-search exact")
    p.add_argument(
        "--search-epsilon",
        type=positive(),
        default=d.search_epsilon,
        help="coarse-to-fine search: posterior mass each level may drop (default 1e-3)",
    )
    p.add_argument(
        "--search-max-rotations",
        type=at_least(1),
        default=d.search_max_rotations,
        help="coarse-to-fine search: most rotations kept per image and level (default 8192, "
        "16 with --search-mode fast)",
    )
    p.add_argument(
        "--search-mode",
        choices=SEARCH_MODES,
        default=d.search_mode,
        help="coarse-to-fine search: 'fast' (default) one coarse pass at the full band on a 2x "
        "coarser grid, then a few poses per image refined (RELION's two passes); 'accurate' "
        "keeps every pose a low-SNR image may need on its coarse levels (slower)",
    )
    p.add_argument(
        "--s0",
        type=positive(),
        default=d.s0,
        help="importance-sampling draws per effective sample (default 10)",
    )
    p.add_argument(
        "--is-every",
        type=positive(int),
        default=d.is_every,
        help="iterations per step of the importance annealing: alpha = max(0.05, "
        "2^(-0.25 floor(tau/N))), T = max(1.25, 2^(10/floor(tau/N))) (default: a third of "
        "--omega-every, the paper's 50 for 150; Sec. 3.4.1)",
    )
    p.add_argument(
        "--is-check",
        type=at_least(0),
        default=d.is_check,
        help="held-out particles on which each held-out evaluation compares the sampled likelihood "
        "with the exact one (default 16; 0 turns the check off)",
    )
    p.add_argument(
        "--is-tolerance",
        type=positive(),
        default=d.is_tolerance,
        help="relative error of that check above which the importance annealing steps back "
        "(default 1e-3)",
    )
    p.add_argument(
        "--cache-gib",
        type=at_least(0, float),
        default=d.cache_gib,
        help="memory for the cached interpolation set-up of the pose grid, in GiB (default 2); "
        "a grid that needs more is recomputed per chunk: less memory, slower",
    )
    p.add_argument(
        "--checkpoint-every",
        type=at_least(1),
        default=d.checkpoint_every,
        help="iterations between checkpoints (default 25)",
    )
    p.add_argument(
        "--snapshot-every",
        type=at_least(1),
        default=d.snapshot_every,
        help="iterations between map snapshots (default 100)",
    )
    p.add_argument(
        "--report-every",
        type=at_least(0, float),
        default=d.report_every,
        help="seconds between refreshes of RUN/report.html (default 60)",
    )
    p.add_argument(
        "--symmetry",
        "--sym",
        default=d.symmetry,
        metavar="GROUP",
        help="point group with RELION's names and axes (C1, Cn, Dn, T, O, I1-I4; default C1): "
        "the map is kept symmetric and the poses cover the asymmetric unit only. As RELION's "
        "initial model, the run is C1 until the cut-off passes --join-resolution, then the "
        "map's axes are aligned (as `cryorecon symmetry-align`) and the group imposed",
    )
    p.add_argument(
        "--symmetric-start",
        action="store_true",
        help="with --symmetry: impose the group on the random start, without the C1 phase "
        "(on a simulated GroEL-GroES set this stalls in a wrong, ring-shaped map)",
    )
    p.add_argument(
        "--classes",
        type=at_least(1),
        default=d.classes,
        metavar="K",
        help="number of classes (maps) reconstructed together, split from one map at "
        "--class-resolution, each particle's posterior marginalised over class and pose "
        "(default 1). Writes "
        "volume_class001.mrc ...; volume.mrc is the most populated class. With K > 1 there "
        "are no half-sets",
    )
    p.add_argument(
        "--class-similarity",
        type=at_least(0, float),
        default=d.class_similarity,
        help="with --classes: how alike the classes are held at first, 0-1 (cryoSPARC's class "
        "similarity; default 0.5): the class posteriors are tempered to this fraction of the "
        "uniform entropy and each minibatch balanced so that no class falls below this "
        "fraction of an equal share, annealed to the plain posteriors over epochs 2-4 after "
        "the split (--class-resolution)",
    )
    p.add_argument(
        "--class-resolution",
        type=at_least(1, float),
        default=d.class_resolution_A,
        metavar="A",
        help="with --classes: one map is refined until the cut-off passes this (Å), then it "
        "splits into K class maps and the particles are dealt to them at random, as RELION's "
        f"3D classification starts (default {d.class_resolution_A:g})",
    )
    p.add_argument(
        "--class-difference-resolution",
        type=at_least(0, float),
        default=d.class_difference_A,
        metavar="A",
        help="with --classes: the refined class maps differ from their mean only below this "
        "resolution (Å), finer detail is shared; the final class maps are each class's own "
        f"back-projection at full resolution (default {d.class_difference_A:g}; 0: not tied)",
    )
    p.add_argument(
        "--no-halves",
        dest="halves",
        action="store_false",
        help="one map throughout: no gold-standard half-sets (no volume_half1/2.mrc, no "
        "resolution without a reference)",
    )
    p.add_argument(
        "--join-resolution",
        type=positive(),
        default=d.join_resolution_A,
        metavar="A",
        help="cut-off (Å) past which the particles are split into two half-sets refined "
        "independently (rlnRandomSubset when the input has it; default 40, as RELION's "
        "--low_resol_join_halves)",
    )


def config_from_args(args) -> ReconstructConfig:
    d = ReconstructConfig()
    return ReconstructConfig(
        minibatch=args.minibatch,
        prior=args.prior,
        prior_lambda=args.prior_lambda,
        prior_strength=args.prior_strength,
        car_sigma=args.car_sigma,
        seed=args.seed,
        max_iters=args.max_iters,
        max_time=None if args.max_time is None else 60.0 * args.max_time,
        omega_start=None if args.start_resolution is None else 1.0 / args.start_resolution,
        omega_step=args.omega_step,
        omega_every=args.omega_every,
        omega_factor=args.omega_factor,
        omega_max_iters=args.omega_max_iters,
        resolution_schedule=args.schedule,
        pose_search="exact" if args.exact else args.pose_search,
        search_epsilon=args.search_epsilon,
        search_max_rotations=args.search_max_rotations,
        search_mode=args.search_mode,
        omega_max=d.omega_max if args.resolution is None else 1.0 / args.resolution,
        device=args.device,
        diameter_A=args.diameter,
        shift_sigma_A=args.shift_sigma,
        grid_scale=args.grid_scale,
        shift_step=args.shift_step or None,
        heldout=args.heldout,
        heldout_every=args.heldout_every,
        patience=args.patience,
        checkpoint_every=args.checkpoint_every,
        snapshot_every=args.snapshot_every,
        s0=args.s0,
        is_every=args.is_every,
        report_every=args.report_every,
        cache_gib=args.cache_gib,
        is_check=args.is_check,
        is_tolerance=args.is_tolerance,
        halves=args.halves,
        join_resolution_A=args.join_resolution,
        symmetry=args.symmetry,
        symmetry_c1_start=not getattr(args, "symmetric_start", False),
        classes=args.classes,
        class_similarity=min(1.0, args.class_similarity),
        class_resolution_A=args.class_resolution,
        class_difference_A=args.class_difference_resolution,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        help="ab-initio 3D reconstruction from a random start",
        description="Estimate a 3D density from particle images without any initial model: "
        "marginalised "
        "MAP estimation with stochastic average gradient descent (Punjani, Brubaker & Fleet 2017).",
    )
    p.add_argument("particles", help="RELION .star or cryoSPARC .cs with CTF parameters")
    p.add_argument(
        "-o", "--out", "--output", dest="out", required=True, metavar="DIR", help="run folder"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue a stopped run from its checkpoint"
    )
    p.add_argument(
        "--force", action="store_true", help="discard an existing run in DIR and start over"
    )
    add_datadir_argument(p)
    add_image_arguments(p)
    add_reconstruct_arguments(p)
    p.set_defaults(func=run)


def _previous_contrast(args) -> bool | None:
    """On --resume, the contrast choice the run started with (so both parts use one sign)."""
    info = Path(args.out) / "run.json"
    if not (args.resume and not args.force and info.is_file()):
        return None
    try:
        return json.loads(info.read_text()).get("contrast_inverted")
    except (OSError, ValueError):
        return None


def run(args) -> int:
    check_device(args.device)
    group = parse_symmetry(args.symmetry)
    group.require_proper("reconstruct")
    args.symmetry = group.name
    check_output_dir(args.out)
    particles = exclude_blank(read_particles_from_args(args))
    apix = float(np.median(particles.apix))
    diameter_A = args.diameter or default_diameter_A(particles.D, apix)
    force = args.invert_contrast
    if force is None:
        force = _previous_contrast(args)
    apply_contrast(particles, diameter_A / apix, force=force)
    from .. import parallel

    try:
        summary = reconstruct(
            particles, args.out, config_from_args(args), resume=args.resume, force=args.force
        )
    finally:
        ranks = parallel.current()
        parallel.teardown()
    if not ranks.is_main:
        return exit_code_for(summary["reason"])
    print(
        f"map: {summary['volume']}  ({summary['iterations']} iterations, {summary['seconds']:.0f} "
        f"s, stopped: {summary['reason']})"
    )
    code = exit_code_for(summary["reason"])
    if code:
        print(
            f"cryorecon reconstruct: stopped by {summary['reason']} at iteration "
            f"{summary['iterations']}; checkpoint saved. Continue with: cryorecon reconstruct "
            f"{args.particles} -o {args.out} --resume",
            file=sys.stderr,
        )
    return code
