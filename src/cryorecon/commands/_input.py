"""Options shared by the commands that read particles: ``--datadir`` (where the image names
are relative to), and for the commands that use the images (``backproject``, ``reconstruct``)
``--invert-contrast`` / ``--no-invert-contrast`` and ``--downsample D`` (Fourier-crop the
images to a D-pixel box as they are read), with a one-line hint to downsample a box above
:data:`HINT_BOX`."""

from __future__ import annotations

import numpy as np

from ..io.particles import read_particles
from ..progress import log
from ._args import even_box

#: Boxes above this, read without --downsample, get a hint to downsample.
HINT_BOX = 128


def add_datadir_argument(p) -> None:
    p.add_argument(
        "--datadir",
        metavar="DIR",
        default=None,
        help="folder the image names in the particle file are relative to (default: "
        "the file's folder, each folder above it, then the current folder)",
    )


def add_image_arguments(p) -> None:
    """``--invert-contrast`` / ``--no-invert-contrast`` and ``--downsample``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--invert-contrast",
        dest="invert_contrast",
        action="store_const",
        const=True,
        default=None,
        help="negate every image (protein dark in the files)",
    )
    g.add_argument(
        "--no-invert-contrast",
        dest="invert_contrast",
        action="store_const",
        const=False,
        help="use the images as they are, whatever the contrast check says",
    )
    p.set_defaults(invert_contrast=None)
    p.add_argument(
        "--downsample",
        type=even_box,
        default=None,
        metavar="D",
        help="Fourier-crop the images to a D-pixel box as they are read (D even, at "
        "most the box; the pixel size grows by box/D, CTF and shifts follow): "
        "less memory and time, Nyquist 2 x the new pixel size",
    )


#: The commands that call this get --downsample as well (reconstruct's parser calls it).
add_contrast_arguments = add_image_arguments


def read_particles_from_args(args, **kw):
    """:func:`~cryorecon.io.particles.read_particles` of ``args.particles`` with ``--datadir``
    and, for commands that have it, ``--downsample`` (or the hint to use it)."""
    downsample = getattr(args, "downsample", None)
    ps = read_particles(
        args.particles, datadir=getattr(args, "datadir", None), downsample=downsample, **kw
    )
    if hasattr(args, "downsample") and downsample is None:
        downsample_hint(ps, getattr(args, "resolution", None))
    return ps


def downsample_hint(ps, resolution_A: float | None = None) -> str | None:
    """Log (and return) a one-line hint to downsample when the box exceeds :data:`HINT_BOX`
    and a box with at most half the pixels still reaches ``resolution_A`` (default:
    reconstruct's final cut-off) at Nyquist; ``None`` when there is nothing to suggest."""
    from ..preprocess import suggest_box

    if ps.D <= HINT_BOX or not len(ps):
        return None
    if not resolution_A:
        from ..reconstruct import ReconstructConfig

        resolution_A = 1.0 / ReconstructConfig().omega_max
    apix = float(np.median(ps.apix))
    box = suggest_box(ps.D, apix, resolution_A)
    if box > ps.D / 2**0.5:  # less than half the pixels saved: not worth a word
        return None
    new_apix = ps.D * apix / box
    text = (
        f"hint: box {ps.D} at {apix:.3g} Å/pixel; ab initio to {resolution_A:.1f} Å needs "
        f"only box {box} ({new_apix:.3g} Å/pixel, Nyquist {2 * new_apix:.1f} Å): add "
        f"--downsample {box} for about {(ps.D / box) ** 2:.0f}x less memory and time per "
        "image"
    )
    log.info(text)
    return text
