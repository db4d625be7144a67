"""``cryorecon demo [-o DIR]``: the whole method end to end on synthetic GroEL-GroES data.

Steps (each shows a progress bar or a log line):

1. simulate particles of the built-in GroEL-GroES complex (PDB 1AON) by Eq. 1 of the paper
   (random poses, shifts, CTF, white noise) into ``DIR/data/``;
2. reconstruct ab initio from a random start (random spheres, SAGD, importance sampling when
   the engine has it) into ``DIR/run/`` (a normal ``cryorecon reconstruct`` run folder);
3. align the result to the true map (rotation, shift and hand: an ab-initio map is only
   defined up to those) -> ``DIR/reconstruction_aligned.mrc``;
4. the oracle: Wiener back-projection of the same particles with their *true* poses
   -> ``DIR/oracle.mrc``, the best map these data allow;
5. FSC of both maps against the truth -> ``DIR/fsc.png`` and ``DIR/demo.json`` (resolutions at
   FSC 0.5 and 0.143, stage timings, settings, file paths); a short summary on stdout; the
   run's report ``DIR/run/report.html`` rebuilt with the truth as its reference (aligned) and
   the complex's mass (from the atomic model) for the isosurface level.

Settings (:data:`DEFAULT`, :data:`QUICK`), chosen to finish in about 3 minutes on 2 CPU cores
(``--quick`` in about one):

* default: 5,000 particles, box 64 at 5 Å/pixel (320 Å, enough for the 200 Å-long complex
  with margin; Nyquist 10 Å), SNR 0.1, defocus 1-3 µm, reconstructed with ``cryorecon
  reconstruct``'s default settings (the fast pose search, the adaptive cut-off from 40 Å),
  stopped after 140 s of iterations.
* ``--quick``: 1,000 particles, box 24 at 13 Å/pixel (312 Å; 24 x 12.7 Å is the smallest box
  24 that holds the model), SNR 0.1; omega* 1/50 -> 1/33 Å by 0.005 every 25 iterations, at
  most 100 iterations; a smoke test.

A run's own timings and resolutions are in ``DIR/demo.json``.

The reconstruction starts from random spheres seeded by ``--seed`` (also the simulation
seed), so a run is reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ReconstructConfig

HELP = (
    "simulate GroEL-GroES particles, reconstruct ab initio and compare with the truth and the "
    "oracle"
)

OUTPUTS = ("demo.json", "fsc.png", "reconstruction_aligned.mrc", "oracle.mrc", "data", "run")


@dataclass(frozen=True)
class DemoSettings:
    """Dataset and schedule of a demo run (lengths in Å, frequencies in 1/Å)."""

    n: int
    box: int
    apix: float
    snr: float
    grid_scale: float
    omega_start: float
    omega_step: float
    omega_every: int
    omega_max: float
    minibatch: int
    heldout: int
    heldout_every: int
    patience: int
    max_iters: int
    max_time: float  # seconds
    align_n_global: int
    schedule: str = "paper"


_RECONSTRUCT = ReconstructConfig()
_APIX = 5.0
DEFAULT = DemoSettings(
    n=5000,
    box=64,
    apix=_APIX,
    snr=0.1,
    grid_scale=_RECONSTRUCT.grid_scale,
    omega_start=1 / 40,
    omega_step=_RECONSTRUCT.omega_step,
    omega_every=_RECONSTRUCT.omega_every,
    omega_max=min(_RECONSTRUCT.omega_max, 1 / (2 * _APIX)),
    minibatch=_RECONSTRUCT.minibatch,
    heldout=_RECONSTRUCT.heldout,
    heldout_every=_RECONSTRUCT.heldout_every,
    patience=_RECONSTRUCT.patience,
    max_iters=_RECONSTRUCT.max_iters,
    max_time=140.0,
    align_n_global=3000,
    schedule="adaptive",
)
QUICK = DemoSettings(
    n=1000,
    box=24,
    apix=13.0,
    snr=0.1,
    grid_scale=3.0,
    omega_start=0.02,
    omega_step=0.005,
    omega_every=25,
    omega_max=0.03,
    minibatch=50,
    heldout=50,
    heldout_every=10,
    patience=3,
    max_iters=100,
    max_time=120.0,
    align_n_global=1000,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help=HELP,
        description=HELP
        + ". Writes DIR/data (particles, truth.mrc), DIR/run (the reconstruction run), "
        "DIR/reconstruction_aligned.mrc, DIR/oracle.mrc, DIR/fsc.png and DIR/demo.json. Takes "
        "about 3 minutes on 2 CPU cores (--quick: about a minute, a smoke test).",
    )
    p.add_argument(
        "-o",
        "--out",
        default="cryorecon_demo",
        metavar="DIR",
        help="output folder (default: cryorecon_demo)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the simulation and the reconstruction (default 0)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--force", action="store_true", help="overwrite the results of an earlier demo in DIR"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a much smaller dataset and schedule (about a minute; a smoke test)",
    )
    p.set_defaults(func=run)


def settings_for(args) -> DemoSettings:
    return QUICK if args.quick else DEFAULT


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse (exit 3) if DIR holds any demo output, unless ``force``."""
    from ..errors import InputError, OutputExistsError

    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not force:
        raise OutputExistsError(
            f"{out} already holds demo results ({', '.join(existing)}); "
            "refusing to overwrite (use --force)"
        )


def run(args) -> int:
    import torch

    from ..backproject import wiener_backproject
    from ..io.atomic import write_json
    from ..io.mrc import read_map, write_map
    from ..io.particles import read_particles
    from ..progress import log
    from ..reconstruct import reconstruct
    from ..report import write_report
    from ..simulate import run_simulation
    from ..validate import FSC_THRESHOLDS, align, fsc, resolution_at
    from ._output import check_device

    s = settings_for(args)
    out = Path(args.out)
    check_device(args.device)  # before anything is written: one line and exit 2
    check_out_dir(out, args.force)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    data_dir, run_dir = out / "data", out / "run"
    mode = "quick" if args.quick else "default"

    log.info(
        f"[1/5] simulating {s.n} particles of GroEL-GroES (1AON), box {s.box} at {s.apix:g} "
        f"Å/pixel, SNR {s.snr:g} -> {data_dir}"
    )
    t = time.perf_counter()
    sim = run_simulation(
        data_dir,
        n=s.n,
        D=s.box,
        apix=s.apix,
        snr=s.snr,
        seed=args.seed,
        device=args.device,
        force=args.force,
    )
    timings["simulate"] = time.perf_counter() - t

    particles = read_particles(data_dir / "particles.star")
    truth_np, apix = read_map(data_dir / "truth.mrc")
    truth = torch.from_numpy(truth_np)

    log.info(
        f"[2/5] reconstructing ab initio from a random start (omega* {1 / s.omega_start:.0f} -> "
        f"{1 / s.omega_max:.0f} Å, pose grid x{s.grid_scale:g} coarser) -> {run_dir}"
    )
    cfg = ReconstructConfig(
        minibatch=s.minibatch,
        seed=args.seed,
        max_iters=s.max_iters,
        max_time=s.max_time,
        omega_start=s.omega_start,
        omega_step=s.omega_step,
        omega_every=s.omega_every,
        omega_max=s.omega_max,
        device=args.device,
        grid_scale=s.grid_scale,
        heldout=s.heldout,
        heldout_every=s.heldout_every,
        patience=s.patience,
        checkpoint_every=25,
        snapshot_every=50,
        resolution_schedule=s.schedule,
    )
    t = time.perf_counter()
    summary = reconstruct(particles, run_dir, cfg, force=args.force)
    timings["reconstruct"] = time.perf_counter() - t

    log.info("[3/5] aligning the reconstruction to the truth (rotation, shift, hand)")
    t = time.perf_counter()
    rec_np, _ = read_map(run_dir / "volume.mrc")
    al = align(
        truth,
        torch.from_numpy(rec_np),
        apix=apix,
        device=args.device,
        seed=args.seed,
        n_global=s.align_n_global,
    )
    aligned_path = out / "reconstruction_aligned.mrc"
    write_map(aligned_path, al.aligned.numpy(), apix, overwrite=True)
    timings["align"] = time.perf_counter() - t

    log.info("[4/5] oracle: Wiener back-projection with the true poses")
    t = time.perf_counter()
    oracle = wiener_backproject(particles, device=args.device).cpu()
    oracle_path = out / "oracle.mrc"
    write_map(oracle_path, oracle.numpy(), apix, overwrite=True)
    timings["oracle"] = time.perf_counter() - t

    log.info("[5/5] FSC against the truth; the run's report with it")
    freq, curve_rec = fsc(truth, al.aligned, apix)
    _, curve_oracle = fsc(truth, oracle, apix)
    res_rec = {thr: resolution_at(freq, curve_rec, thr) for thr in FSC_THRESHOLDS}
    res_oracle = {thr: resolution_at(freq, curve_oracle, thr) for thr in FSC_THRESHOLDS}
    png = out / "fsc.png"
    plot_fsc_curves(
        png,
        freq.numpy(),
        {
            "ab initio (aligned)": (curve_rec.numpy(), res_rec),
            "oracle (true poses)": (curve_oracle.numpy(), res_oracle),
        },
        title=f"GroEL-GroES, {s.n} particles, box {s.box} at {s.apix:g} Å/px, SNR {s.snr:g}: FSC "
        "vs truth",
    )
    t = time.perf_counter()
    # The report's isosurface encloses the complex's volume (1.21 Å^3/Da), and its FSC section
    # compares the run's map with the truth (aligned again: the report aligns its own map).
    write_report(run_dir, reference=data_dir / "truth.mrc", align=True, mass_da=sim.get("mass_da"))
    timings["report"] = time.perf_counter() - t
    wall = time.perf_counter() - t_all

    record = {
        "mode": mode,
        "seed": args.seed,
        "device": args.device,
        "settings": asdict(s),
        "dataset": {
            "structure": "GroEL-GroES (PDB 1AON, built in)",
            "n": s.n,
            "box": s.box,
            "apix": s.apix,
            "snr": s.snr,
            "nyquist_A": 2 * s.apix,
        },
        "reconstruction": {
            "iterations": summary["iterations"],
            "stop_reason": summary["reason"],
            "seconds": summary["seconds"],
            "fsc_resolution_A": {f"{thr:g}": _finite(res_rec[thr]) for thr in FSC_THRESHOLDS},
            "align_cc": al.cc,
            "hand_flipped": al.flipped,
        },
        "oracle": {
            "fsc_resolution_A": {f"{thr:g}": _finite(res_oracle[thr]) for thr in FSC_THRESHOLDS}
        },
        "fsc": {
            "freq_1_per_A": [float(x) for x in freq],
            "ab_initio": [float(x) for x in curve_rec],
            "oracle": [float(x) for x in curve_oracle],
        },
        "seconds": {**{k: round(v, 2) for k, v in timings.items()}, "total": round(wall, 2)},
        "files": {
            "particles": str(data_dir / "particles.star"),
            "truth": str(data_dir / "truth.mrc"),
            "run": str(run_dir),
            "reconstruction": str(run_dir / "volume.mrc"),
            "reconstruction_aligned": str(aligned_path),
            "oracle": str(oracle_path),
            "fsc_plot": str(png),
        },
    }
    write_json(out / "demo.json", record)

    def fmt(x):
        return f"{x:6.1f} Å" if math.isfinite(x) else "     n/a"

    print(
        f"cryorecon demo ({mode}): GroEL-GroES, {s.n} particles, box {s.box} at {s.apix:g} "
        f"Å/pixel, SNR {s.snr:g} (Nyquist {2 * s.apix:g} Å)"
    )
    print(
        f"  reconstruction: {summary['iterations']} iterations in {summary['seconds']:.0f} s "
        f"(stopped: {summary['reason']})"
    )
    print("  resolution vs truth        FSC 0.5    FSC 0.143")
    print(f"  ab initio (aligned)       {fmt(res_rec[0.5])}   {fmt(res_rec[0.143])}")
    print(f"  oracle (true poses)       {fmt(res_oracle[0.5])}   {fmt(res_oracle[0.143])}")
    print(
        f"  wall time: {wall:.0f} s  ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + ")"
    )
    print(
        f"  files: {aligned_path}, {oracle_path}, {png}, {out / 'demo.json'}; run folder {run_dir}"
        f" (report: {run_dir / 'report.html'})"
    )
    print(f"  look: chimerax {data_dir / 'truth.mrc'} {aligned_path}")
    return 0


def _finite(x: float):
    return float(x) if math.isfinite(x) else None


def plot_fsc_curves(path, freq, curves: dict, title: str = "") -> None:
    """Several FSC curves against the truth on one plot (PNG); see
    :func:`cryorecon.report.plots.draw_fsc`."""
    from ..report.plots import save_fsc_png

    save_fsc_png(path, freq, curves, title=title, ylabel="FSC against the true map")
