"""``cryorecon simulate``: a synthetic particle set (paper Sec. 4.1, Eq. 1) with its truth map."""

from __future__ import annotations

import argparse

from ._args import at_least, positive
from ._output import check_device, check_output_dir

HELP = "simulate noisy CTF-modulated particle images of a map or an atomic model"

DESCRIPTION = """\
Simulate particles by the paper's generative model (Eq. 1): uniform random poses, random
shifts, a CTF per particle (defocus uniform in the range, small astigmatism), white Gaussian
noise at the requested SNR (signal variance of the clean CTF-modulated images over the box,
divided by the noise variance). Writes DIR/particles.star + particles.mrcs (RELION 3.1),
DIR/truth.mrc (the map that was projected, same box and pixel size) and DIR/simulation.json.
Without --volume or --model the built-in GroEL-GroES structure (PDB 1AON) is used. The
defaults are the DESIGN.md `small` set except n (use -n 10000 for it)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--volume", metavar="MAP", help="MRC map to project (resampled to --box/--apix)"
    )
    src.add_argument("--model", metavar="PDB_OR_CIF", help="atomic model (default: built-in 1AON)")
    p.add_argument(
        "-n",
        "--num-particles",
        dest="n",
        type=at_least(1),
        default=1000,
        help="particles (default 1000)",
    )
    p.add_argument(
        "--box", type=at_least(8), default=64, help="box size in pixels, even (default 64)"
    )
    p.add_argument("--apix", type=positive(), default=5.6, help="pixel size in Å (default 5.6)")
    p.add_argument(
        "--snr",
        type=positive(),
        default=0.05,
        help="signal-to-noise ratio (variances over the box; default 0.05; inf = no noise)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "-o", "--out", "--output", dest="out", required=True, metavar="DIR", help="output folder"
    )
    p.add_argument("--defocus-min", type=positive(), default=1.0, help="µm (default 1)")
    p.add_argument("--defocus-max", type=positive(), default=3.0, help="µm (default 3)")
    p.add_argument(
        "--astigmatism",
        type=at_least(0, float),
        default=200.0,
        help="largest defocus U - V in Å (default 200)",
    )
    p.add_argument("--voltage", type=positive(), default=300.0, help="kV (default 300)")
    p.add_argument(
        "--cs", type=at_least(0, float), default=2.7, help="spherical aberration, mm (default 2.7)"
    )
    p.add_argument(
        "--amp-contrast",
        type=at_least(0, float),
        default=0.1,
        help="amplitude contrast (default 0.1)",
    )
    p.add_argument(
        "--max-shift",
        type=at_least(0, float),
        default=3.0,
        help="shifts uniform in ±this many pixels per axis (default 3)",
    )
    p.add_argument(
        "--bfactor", type=at_least(0, float), default=0.0, help="CTF B-factor in Å^2 (default 0)"
    )
    p.add_argument(
        "--batch-size", type=at_least(1), default=256, help="particles per batch (default 256)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InputError
    from ..simulate import run_simulation

    if args.n <= 0:
        raise InputError(f"-n must be positive, got {args.n}")
    if args.box <= 0 or args.box % 2:
        raise InputError(f"--box must be a positive even number, got {args.box}")
    if args.apix <= 0:
        raise InputError(f"--apix must be positive, got {args.apix}")
    if not args.snr > 0:
        raise InputError(f"--snr must be positive, got {args.snr}")
    if args.batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {args.batch_size}")
    if args.max_shift < 0 or args.astigmatism < 0:
        raise InputError("--max-shift and --astigmatism must be non-negative")
    check_device(args.device)
    check_output_dir(args.out)
    run_simulation(
        args.out,
        volume=args.volume,
        model=args.model,
        n=args.n,
        D=args.box,
        apix=args.apix,
        snr=args.snr,
        seed=args.seed,
        defocus_range_um=(args.defocus_min, args.defocus_max),
        voltage=args.voltage,
        cs=args.cs,
        amp_contrast=args.amp_contrast,
        shift_range_px=args.max_shift,
        bfactor=args.bfactor,
        astigmatism_A=args.astigmatism,
        batch_size=args.batch_size,
        device=args.device,
        force=args.force,
    )
    return 0
