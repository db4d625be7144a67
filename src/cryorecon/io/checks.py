"""Checks on the values of a particle set, where the file is read and before a run uses it.

- :func:`check_particle_values`: CTF parameters physically meaningful (voltage > 0 kV,
  amplitude contrast in [0, 1), defocus >= 0 Å with RELION's sign, positive = underfocus,
  every value finite) and ``rlnImagePixelSize`` / ``blob/psize_A`` agreeing with the voxel
  size in each stack header that states one. Called by
  :func:`cryorecon.io.particles.read_particles`.
- :func:`single_pixel_size`: the one pixel size (Å) a reconstruction is made at; refuses
  sets whose particles have different ones.
- :func:`exclude_blank`: drops images whose pixels are all equal (all-zero padding, failed
  extraction): their background sigma is 0, so the likelihood would weigh them ~1e24 times
  more than any real image. A warning says how many; a set of only blank images is an error.

Each failure is one :class:`~cryorecon.errors.InputError` line naming the file, the particle
(``N@stack``), the value and what to do.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..progress import bar, log

#: Relative difference above which a metadata pixel size and a stack header's voxel size
#: (or two particles' pixel sizes) are called different.
APIX_HEADER_RTOL = 0.01
APIX_SPREAD_RTOL = 1e-3
#: Header voxel sizes that mean "not set" (mrcfile writes 0; many tools leave 1.0).
UNSET_VOXEL_SIZES = (0.0, 1.0)

# (key, label for messages, predicate on valid values, what is expected)
_CTF_RULES = (
    ("voltage", "voltage (rlnVoltage, kV)", lambda v: v > 0, "> 0 kV"),
    (
        "amp_contrast",
        "amplitude contrast (rlnAmplitudeContrast)",
        lambda v: (v >= 0) & (v < 1),
        "in [0, 1)",
    ),
    (
        "defocus_u",
        "defocus U (rlnDefocusU, Å)",
        lambda v: v >= 0,
        ">= 0 Å (RELION: positive = underfocus; a sign flip?)",
    ),
    (
        "defocus_v",
        "defocus V (rlnDefocusV, Å)",
        lambda v: v >= 0,
        ">= 0 Å (RELION: positive = underfocus; a sign flip?)",
    ),
)


def _count(n: int, total: int) -> str:
    return f"{n} of {total} particle{'s' if total != 1 else ''}"


def check_ctf_values(ps) -> None:
    """Raise InputError at the first particle whose CTF parameters are non-finite or out of
    range (see the module docstring). A set read without CTF (``ps.ctf == {}``) passes."""
    if not ps.ctf:
        return
    n = len(ps)
    for key, values in ps.ctf.items():
        bad = ~np.isfinite(np.asarray(values, dtype=np.float64))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"{ps._where(i)}: CTF parameter {key} is {values[i]} "
                f"({_count(int(bad.sum()), n)} not finite)"
            )
    for key, label, ok, expected in _CTF_RULES:
        if key not in ps.ctf:
            continue
        v = np.asarray(ps.ctf[key], dtype=np.float64)
        bad = ~ok(v)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"{ps._where(i)}: {label} is {v[i]:g}; expected {expected} "
                f"({_count(int(bad.sum()), n)})"
            )


def check_header_pixel_sizes(ps) -> None:
    """Raise InputError if a particle's pixel size differs from its stack header's voxel size
    by more than :data:`APIX_HEADER_RTOL` (headers whose value is in
    :data:`UNSET_VOXEL_SIZES` are skipped). Only stacks whose headers were read are checked."""
    for s, h in enumerate(ps._headers):
        if h is None or not h.voxel_size:
            continue
        hv = float(h.voxel_size)
        if any(abs(hv - u) < 1e-6 for u in UNSET_VOXEL_SIZES):
            continue
        mine = np.flatnonzero(ps.stack_index == s)
        off = np.abs(ps.apix[mine] - hv) > APIX_HEADER_RTOL * hv
        if off.any():
            i = int(mine[np.flatnonzero(off)[0]])
            raise InputError(
                f"{ps._where(i)}: pixel size {ps.apix[i]:g} Å in the metadata but "
                f"{hv:g} Å in the header of {h.path} ({int(off.sum())} particles); "
                "fix rlnImagePixelSize (or blob/psize_A) or the stack header"
            )


def check_particle_values(ps) -> None:
    """All value checks made when a particle file is read: CTF ranges and pixel sizes."""
    check_ctf_values(ps)
    check_header_pixel_sizes(ps)


def single_pixel_size(ps) -> float:
    """The particles' common pixel size in Å; InputError if they differ by more than
    :data:`APIX_SPREAD_RTOL` (a map has one voxel size, and no average of several is right)."""
    apix = np.asarray(ps.apix, dtype=np.float64)
    lo, hi = float(apix.min()), float(apix.max())
    if hi - lo <= APIX_SPREAD_RTOL * hi:
        return float(np.median(apix))
    values, counts = np.unique(np.round(apix, 4), return_counts=True)
    shown = ", ".join(f"{v:g} Å ({c})" for v, c in list(zip(values, counts))[:6])
    more = f" and {len(values) - 6} more" if len(values) > 6 else ""
    raise InputError(
        f"{ps.source}: particles have different pixel sizes: {shown}{more}; "
        "reconstruct each pixel size (optics group) separately, or rescale the "
        "images to one pixel size first (e.g. relion_image_handler --rescale_angpix)"
    )


def blank_images(ps, batch_size: int = 1000) -> np.ndarray:
    """Indices of images whose pixels are all equal (one pass over the memory-mapped stacks,
    as stored: before any Fourier cropping, which rounding would make unequal; with a
    progress bar)."""
    n = len(ps)
    blank = np.zeros(n, dtype=bool)
    with bar(total=n, desc="checking images", unit="img") as pb:
        for a in range(0, n, batch_size):
            imgs = ps.stack_images(np.arange(a, min(n, a + batch_size)))
            flat = imgs.reshape(len(imgs), -1)
            blank[a : a + len(imgs)] = flat.max(axis=1) == flat.min(axis=1)
            pb.update(len(imgs))
    return np.flatnonzero(blank)


def exclude_blank(ps, batch_size: int = 1000):
    """``ps`` without its blank (constant) images, with a warning naming how many and the
    first; InputError if every image is blank. Returns ``ps`` itself when none is."""
    bad = blank_images(ps, batch_size)
    if len(bad) == 0:
        return ps
    n = len(ps)
    first = ps.image_name(int(bad[0]))
    if len(bad) == n:
        raise InputError(
            f"{ps.source}: all {n} images are blank (every pixel equal, e.g. "
            f"{first}); nothing to reconstruct from"
        )
    log.warning(
        f"warning: {ps.source}: excluding {_count(len(bad), n)} with blank images "
        f"(every pixel equal; first {first})"
    )
    keep = np.setdiff1d(np.arange(n), bad)
    return ps.subset(keep)


def check_readable(path, what: str) -> None:
    """InputError if ``path`` (an existing file) cannot be opened for reading, saying why
    (permission denied is not corruption)."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise InputError(f"{path}: permission denied (cannot read this {what})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read this {what} ({exc.strerror})") from None


def check_text_file(path, what: str = "STAR file") -> None:
    """InputError if ``path`` cannot be read or holds binary data (NUL bytes in its first
    64 KiB), e.g. an image stack or a .cs file given where a STAR file belongs."""
    check_readable(path, what)
    with open(path, "rb") as fh:
        head = fh.read(65536)
    if b"\0" in head:
        raise InputError(
            f"{path}: binary data, not a text {what} (an MRC stack or a cryoSPARC "
            ".cs file given in its place?)"
        )


def check_npy_file(path, what: str = "cryoSPARC .cs file") -> None:
    """InputError if ``path`` cannot be read or does not start with the NumPy ``.npy`` magic
    bytes that every cryoSPARC ``.cs`` file has."""
    check_readable(path, what)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise InputError(
            f"{path}: not a {what} (no NumPy array header; a STAR file or an "
            "image stack given in its place?)"
        )
