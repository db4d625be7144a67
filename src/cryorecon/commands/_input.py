"""Options shared by the commands that read particles: ``--datadir`` (where the image names
are relative to) and ``--invert-contrast`` / ``--no-invert-contrast``."""

from __future__ import annotations

from ..io.particles import read_particles


def add_datadir_argument(p) -> None:
    p.add_argument("--datadir", metavar="DIR", default=None,
                   help="folder the image names in the particle file are relative to (default: "
                        "the file's folder, each folder above it, then the current folder)")


def add_contrast_arguments(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--invert-contrast", dest="invert_contrast", action="store_const", const=True,
                   default=None, help="negate every image (protein dark in the files)")
    g.add_argument("--no-invert-contrast", dest="invert_contrast", action="store_const",
                   const=False, help="use the images as they are, whatever the contrast check says")
    p.set_defaults(invert_contrast=None)


def read_particles_from_args(args, **kw):
    """:func:`~cryorecon.io.particles.read_particles` of ``args.particles`` with ``--datadir``."""
    return read_particles(args.particles, datadir=getattr(args, "datadir", None), **kw)

