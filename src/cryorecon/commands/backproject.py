"""``cryorecon backproject particles.star -o map.mrc``: oracle Wiener reconstruction from the
poses in the particle file (see :mod:`cryorecon.backproject`)."""

from __future__ import annotations

import time

from ..backproject import wiener_backproject
from ..contrast import apply_contrast
from ..io.checks import exclude_blank, single_pixel_size
from ..io.mrc import write_map
from ..preprocess import default_diameter_A
from ..progress import log
from ._args import at_least, positive
from ._input import add_datadir_argument, add_image_arguments, read_particles_from_args
from ._output import check_device, check_output_file


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "backproject",
        help="CTF-corrected Wiener reconstruction from known poses (the oracle)",
        description="Reconstruct a map from particles whose poses are in the file "
        "(rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst): CTF-corrected least-squares (Wiener) "
        "back-projection. With simulated data and the true poses it is the best map the data "
        "allow.",
    )
    p.add_argument("particles", help="RELION .star or cryoSPARC .cs with poses")
    p.add_argument(
        "-o", "--out", "--output", dest="out", required=True, metavar="MAP", help="output MRC map"
    )
    p.add_argument(
        "--diameter",
        type=positive(),
        default=None,
        help="particle diameter in Å (default: 80%% of the box)",
    )
    p.add_argument(
        "--batch-size", type=at_least(1), default=500, help="particles per batch (default 500)"
    )
    p.add_argument(
        "--oversample", type=at_least(1), default=2, help="Fourier padding factor (default 2)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output map")
    add_datadir_argument(p)
    add_image_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_device(args.device)
    check_output_file(args.out, args.force)
    particles = exclude_blank(read_particles_from_args(args))
    apix = single_pixel_size(particles)
    diameter_A = args.diameter or default_diameter_A(particles.D, apix)
    apply_contrast(particles, diameter_A / apix, force=args.invert_contrast)
    t0 = time.perf_counter()
    vol = wiener_backproject(
        particles,
        device=args.device,
        batch_size=args.batch_size,
        oversample=args.oversample,
        diameter_A=args.diameter,
    )
    write_map(args.out, vol.cpu().numpy(), apix, overwrite=args.force)
    log.info(
        f"wrote {args.out} ({particles.D}^3, {apix:g} Å/voxel) from {len(particles)} particles "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0
