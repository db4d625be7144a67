"""Particle sets: metadata from RELION STAR / cryoSPARC .cs files, images from MRC stacks.

:func:`read_particles` reads the metadata (vectorised; no pixel data) and, with
``check_images=True``, opens every distinct stack's *header* once to check that it exists,
is a readable MRC file as long as its header says, holds square images of one box size,
and has every referenced index. Pixels are read lazily through :meth:`ParticleSet.images`
from stacks memory-mapped by ``mrcfile.mmap`` (the file handle is closed once the map is
made; at most ``_MAX_OPEN`` maps are kept), so a data set is never held in RAM; every batch
read is checked for NaN/Inf.

Downsampling (``read_particles(..., downsample=D)`` or :meth:`ParticleSet.at_box`): a set can
be read at a box ``D`` smaller than its stacks': each image is Fourier-cropped as it is read
(:func:`cryorecon.preprocess.fourier_crop`), :attr:`ParticleSet.D` is ``D`` and the pixel
sizes grow by ``stack box / D``; the CTF parameters (Å, kV, mm) and shifts (Å) are physical
and stay as they are, so they follow. :attr:`ParticleSet.stack_box` is the box in the files.

:func:`write_particles` writes a RELION 3.1 STAR file plus one ``.mrcs`` stack, streaming
batches into a memory-mapped file, through temporary names renamed into place.

Units: Å, degrees, kV, mm; shifts in Å with RELION 3.1's ``rlnOriginXAngst/YAngst``
meaning; angles RELION ZYZ ``(rot, tilt, psi)``.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputError, one_line
from ..progress import bar
from .checks import check_particle_values, check_readable
from .mrc import check_writable
from .paths import check_datadir, not_found_message

_MAX_OPEN = 64  # memory maps kept open at once (LRU)


# --------------------------------------------------------------------------- stacks
@dataclass(frozen=True)
class StackHeader:
    """What the MRC header says about an image stack (``nz`` images of ``ny x nx``)."""

    path: Path
    nx: int
    ny: int
    nz: int
    dtype: np.dtype
    offset: int  # byte offset of the data block
    voxel_size: float
    file_size: int


def read_stack_header(path: str | os.PathLike) -> StackHeader:
    """Read and check an MRC stack header without touching the pixel data.

    A 2D ``.mrc`` holds one image; a 3D one (``.mrcs`` or ``.mrc``, image stack or volume
    space group alike) holds ``nz`` images. Raises :class:`InputError` naming the file if it
    is missing, has a corrupt header, an unsupported (complex) mode, or is shorter than its
    header says.
    """
    from mrcfile.utils import data_dtype_from_header

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image stack")
    check_readable(path, "image stack")
    size = path.stat().st_size
    try:
        with warnings.catch_warnings():
            # Old RELION/EMAN stacks lack the 'MAP ' id or machine stamp; accept them.
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                h = m.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                nsymbt = int(h.nsymbt)
                dtype = data_dtype_from_header(h)
                vs = float(m.voxel_size.x)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: corrupt or unreadable MRC header ({one_line(exc)})") from exc
    if nx <= 0 or ny <= 0 or nz <= 0 or nsymbt < 0:
        raise InputError(
            f"{path}: corrupt MRC header (nx, ny, nz = {nx}, {ny}, {nz}; nsymbt = {nsymbt})"
        )
    if dtype.kind == "c":
        raise InputError(f"{path}: complex MRC mode; expected real-valued images")
    offset = 1024 + nsymbt
    need = offset + nx * ny * nz * dtype.itemsize
    if size < need:
        raise InputError(
            f"{path}: truncated MRC file ({size} bytes; the header describes "
            f"{nz} images of {ny}x{nx} {dtype.name}, {need} bytes)"
        )
    return StackHeader(
        path, nx, ny, nz, np.dtype(dtype), offset, vs if np.isfinite(vs) else 0.0, size
    )


def _header_for(who: str, path: Path) -> StackHeader:
    """:func:`read_stack_header`, with errors prefixed by the particle that uses the stack."""
    try:
        return read_stack_header(path)
    except InputError as exc:
        raise InputError(f"{who}: {exc}") from exc


# --------------------------------------------------------------------------- ParticleSet
@dataclass(eq=False)
class ParticleSet:
    """Particles: per-particle metadata in arrays; images read lazily from their stacks."""

    stacks: list[Path]
    stack_index: np.ndarray
    slice_index: np.ndarray
    D: int
    apix: np.ndarray
    ctf: dict[str, np.ndarray]
    angles: np.ndarray | None
    shifts: np.ndarray | None
    source: Path
    optics_group: np.ndarray
    # Not part of the core API: extra facts for reports (format, optics group names, ...).
    meta: dict = field(default_factory=dict, repr=False)
    stack_names: list[str] | None = field(default=None, repr=False)  # as written in the file
    # +1, or -1 to negate every image read (inverted contrast; see cryorecon.contrast).
    contrast_sign: float = 1.0
    # (N,) 1 or 2: the input's half-sets (rlnRandomSubset, alignments3D/split + 1), or None.
    random_subset: np.ndarray | None = None
    # Box of the images in the stacks when they are Fourier-cropped to D as read (0: D).
    stack_D: int = 0
    _headers: list = field(default=None, repr=False)
    _maps: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self):
        if self._headers is None:
            self._headers = [None] * len(self.stacks)
        if self.stack_names is None:
            self.stack_names = [str(p) for p in self.stacks]

    def __len__(self) -> int:
        return int(len(self.stack_index))

    def __getstate__(self):  # memory maps do not pickle; reopen lazily
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    @property
    def stack_box(self) -> int:
        """Box (pixels) of the images in the stack files; :attr:`D` is the box as read."""
        return int(self.stack_D or self.D)

    def at_box(self, D: int) -> ParticleSet:
        """This set read at box ``D``: images Fourier-cropped from :attr:`stack_box` to ``D``
        as they are read, pixel sizes times ``stack_box / D`` (CTF and shifts are in physical
        units and stay). ``D`` even and at most the stacks' box; ``at_box(stack_box)`` reads
        the files as they are. InputError for another ``D``."""
        box = self.stack_box
        D = int(D)
        if not box:
            raise InputError(f"{self.source}: box size unknown (no stack read); cannot downsample")
        if D % 2 or D < 8 or D > box:
            raise InputError(
                f"{self.source}: cannot downsample {box} px images to {D}: the "
                f"target box must be even, at least 8 and at most {box}"
            )
        out = self.subset(slice(None))
        out.apix = self.apix * (self.D / D)
        out.D = D
        out.stack_D = box if D != box else 0
        return out

    def image_name(self, i: int) -> str:
        """RELION-style ``N@file`` name of particle ``i`` (N 1-based), for messages."""
        return f"{int(self.slice_index[i]) + 1}@{self.stack_names[int(self.stack_index[i])]}"

    def _where(self, i: int) -> str:
        return f"{self.source}: particle {int(i)} ({self.image_name(i)})"

    def _index(self, idx) -> np.ndarray:
        if idx is None:
            return np.arange(len(self))
        if hasattr(idx, "detach"):
            idx = idx.detach().cpu().numpy()
        if isinstance(idx, slice) or (isinstance(idx, np.ndarray) and idx.dtype == bool):
            return np.arange(len(self))[idx]
        out = np.atleast_1d(np.asarray(idx)).astype(np.int64, copy=False)
        if out.ndim != 1:
            raise ValueError(f"particle indices must be 1-D, got shape {out.shape}")
        n = len(self)
        if len(out) and (out.min() < -n or out.max() >= n):
            raise IndexError(f"particle index out of range for {n} particles")
        return np.where(out < 0, out + n, out)

    def header(self, s: int) -> StackHeader:
        """The checked header of stack ``s`` (read once)."""
        h = self._headers[s]
        if h is None:
            first = np.flatnonzero(self.stack_index == s)
            who = self._where(first[0]) if len(first) else f"{self.source}"
            if not Path(self.stacks[s]).is_file():
                raise InputError(f"{who}: {self._stack_not_found(s)}")
            h = _header_for(who, self.stacks[s])
            if h.nx != h.ny:
                raise InputError(f"{who}: non-square images ({h.ny}x{h.nx}) in {h.path}")
            if self.stack_box and h.nx != self.stack_box:
                raise InputError(
                    f"{who}: box size {h.nx} in {h.path} differs from "
                    f"{self.stack_box} (mixed box sizes)"
                )
            self._headers[s] = h
        return h

    def _stack_not_found(self, s: int) -> str:
        tried = self.meta.get("stack_tried")
        tried = tried[s] if tried and s < len(tried) else [self.stacks[s]]
        return not_found_message(self.stack_names[s], tried)

    def _map(self, s: int) -> np.ndarray:
        """Stack ``s`` as a read-only (nz, ny, nx) memory map."""
        mm = self._maps.get(s)
        if mm is None:
            h = self.header(s)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # as in read_stack_header
                    with mrcfile.mmap(h.path, mode="r", permissive=True) as m:
                        mm = m.data.reshape(h.nz, h.ny, h.nx)
            except Exception as exc:
                raise InputError(f"{h.path}: cannot map the image data ({one_line(exc)})") from exc
            self._maps[s] = mm
            while len(self._maps) > _MAX_OPEN:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(s)
        return mm

    def images(self, idx) -> np.ndarray:
        """Images ``idx`` as float32 ``(len(idx), D, D)``, times :attr:`contrast_sign`
        (Fourier-cropped from the stacks' box when that is larger); raises InputError on
        NaN/Inf pixels."""
        out = self.stack_images(idx)
        if self.stack_D and self.stack_D != self.D and len(out):
            import torch

            from ..preprocess import fourier_crop

            out = fourier_crop(torch.from_numpy(out), self.D).numpy()
        return out

    def stack_images(self, idx) -> np.ndarray:
        """Images ``idx`` as stored, float32 ``(len(idx), stack_box, stack_box)``, times
        :attr:`contrast_sign`; raises InputError on NaN/Inf pixels."""
        idx = self._index(idx)
        box = self.stack_box
        out = np.empty((len(idx), box, box), dtype=np.float32)
        if len(idx) == 0:
            return out
        st = self.stack_index[idx]
        sl = self.slice_index[idx]
        order = np.argsort(st, kind="stable")
        st_sorted = st[order]
        cuts = np.flatnonzero(np.diff(st_sorted)) + 1
        for group in np.split(order, cuts):
            s = int(st[group[0]])
            h = self.header(s)
            if h.nx != box:  # D unknown (0) when read without checks and no size in metadata
                raise InputError(
                    f"{self._where(idx[group[0]])}: box size {h.nx} differs from {box}"
                )
            rows = sl[group]
            beyond = rows >= h.nz
            if beyond.any():
                j = idx[group[np.flatnonzero(beyond)[0]]]
                raise InputError(
                    f"{self._where(j)}: index beyond the stack {h.path} ({h.nz} images)"
                )
            mm = self._map(s)
            try:
                out[group] = mm[rows]
            except OSError as exc:
                raise InputError(
                    f"{self._where(idx[group[0]])}: cannot read {h.path} ({one_line(exc)})"
                ) from exc
        finite = np.isfinite(out).all(axis=(1, 2))
        if not finite.all():
            j = idx[np.flatnonzero(~finite)[0]]
            raise InputError(f"{self._where(j)}: image holds NaN or Inf pixels")
        if self.contrast_sign < 0:
            np.negative(out, out=out)
        return out

    def iter_batches(
        self, batch_size: int, idx=None, desc: str | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` in batches of ``batch_size``, with a progress bar."""
        idx = self._index(idx)
        batch_size = max(1, int(batch_size))
        with bar(total=len(idx), desc=desc or "images", unit="img") as pb:
            for a in range(0, len(idx), batch_size):
                chunk = idx[a : a + batch_size]
                yield chunk, self.images(chunk)
                pb.update(len(chunk))

    def subset(self, idx) -> ParticleSet:
        """A new ParticleSet of the particles ``idx`` (sharing the stacks and their headers)."""
        idx = self._index(idx)
        return ParticleSet(
            stacks=list(self.stacks),
            stack_index=self.stack_index[idx],
            slice_index=self.slice_index[idx],
            D=self.D,
            apix=self.apix[idx],
            ctf={k: v[idx] for k, v in self.ctf.items()},
            angles=None if self.angles is None else self.angles[idx],
            shifts=None if self.shifts is None else self.shifts[idx],
            source=self.source,
            optics_group=self.optics_group[idx],
            meta=dict(self.meta),
            stack_names=list(self.stack_names),
            contrast_sign=self.contrast_sign,
            random_subset=None if self.random_subset is None else self.random_subset[idx],
            stack_D=self.stack_D,
            _headers=list(self._headers),
        )


# --------------------------------------------------------------------------- reading
def read_particles(
    path: str | os.PathLike,
    require_ctf: bool = True,
    check_images: bool = True,
    datadir: str | os.PathLike | None = None,
    downsample: int | None = None,
) -> ParticleSet:
    """Read a particle set from a RELION ``.star`` or cryoSPARC ``.cs`` file.

    ``datadir``: the folder the image names are relative to, looked at first (InputError if it
    does not exist); without it stacks are looked for beside the file, in every folder above
    it (a RELION project's root), then in the current folder (:mod:`cryorecon.io.paths`).

    ``downsample``: read the images Fourier-cropped to this box (:meth:`ParticleSet.at_box`).
    ``require_ctf``: raise InputError if a CTF column is missing (else ``ctf`` is ``{}``).
    ``check_images``: open each distinct stack's header once and check existence, readable
    header and full length, square images, one box size, and every index in range (no pixel
    data read). Without it no stack is opened here; ``D`` comes from ``rlnImageSize`` /
    ``blob/shape`` when the metadata has it, else from the first readable stack header, else 0,
    and the same checks happen lazily in :meth:`ParticleSet.images`.

    Example (``cryorecon.read_particles``)::

        >>> import tempfile, cryorecon
        >>> out = tempfile.mkdtemp()
        >>> _ = cryorecon.simulate(out, n=10, D=32, apix=11.0, seed=0)
        >>> particles = cryorecon.read_particles(f"{out}/particles.star")
        >>> len(particles), particles.D, particles.images([0, 1]).shape
        (10, 32, (2, 32, 32))
    """
    path = Path(path)
    datadir = check_datadir(datadir)
    suffix = path.suffix.lower()
    if suffix == ".star":
        from .star import read_star_particles

        raw = read_star_particles(path, require_ctf=require_ctf, datadir=datadir)
    elif suffix == ".cs":
        from .cryosparc import read_cs_particles

        raw = read_cs_particles(path, require_ctf=require_ctf, datadir=datadir)
    else:
        raise InputError(
            f"{path}: unknown particle file type {path.suffix or '(no suffix)'!r}; "
            "expected a RELION .star or cryoSPARC .cs file"
        )
    n = raw["n"]
    stacks = [Path(p) for p in raw["stack_paths"]]
    ps = ParticleSet(
        stacks=stacks,
        stack_index=np.asarray(raw["stack_index"], dtype=np.int64),
        slice_index=np.asarray(raw["slice_index"], dtype=np.int64),
        D=0,
        apix=np.asarray(raw["apix"], dtype=np.float64),
        ctf=raw["ctf"],
        angles=raw["angles"],
        shifts=raw["shifts"],
        source=path,
        optics_group=np.asarray(raw["optics_group"], dtype=np.int64),
        meta={
            "format": raw["format"],
            "optics_names": raw["optics_names"],
            "stack_found": list(raw["stack_found"]),
            "stack_tried": list(raw["stack_tried"]),
        },
        stack_names=list(raw["stack_names"]),
        random_subset=raw.get("random_subset"),
    )
    assert len(ps) == n

    # Box size from the metadata, if stated: must be one value.
    box = raw["box"]
    D_meta = 0
    if box is not None:
        values = np.unique(box)
        if len(values) > 1:
            i = int(np.flatnonzero(box != box[0])[0])
            raise InputError(
                f"{ps._where(i)}: mixed box sizes in the metadata "
                f"({', '.join(str(int(v)) for v in values)})"
            )
        D_meta = int(values[0])

    if check_images:
        _check_stacks(ps, D_meta)
    else:
        ps.D = D_meta
        if not ps.D:
            for s, found in enumerate(raw["stack_found"]):
                if found:
                    try:
                        ps.D = read_stack_header(stacks[s]).nx
                    except InputError:
                        continue
                    break
    check_particle_values(ps)
    if downsample:
        ps = ps.at_box(downsample)
    return ps


def _check_stacks(ps: ParticleSet, D_meta: int) -> None:
    """Header-level checks of every distinct stack (each opened once), vectorised over particles."""
    nst = len(ps.stacks)
    first = np.full(nst, -1, dtype=np.int64)
    # first particle in each stack, for messages
    order = np.arange(len(ps))[::-1]
    first[ps.stack_index[order]] = order
    maxslice = np.full(nst, -1, dtype=np.int64)
    np.maximum.at(maxslice, ps.stack_index, ps.slice_index)
    D = D_meta
    D_from = "the metadata (rlnImageSize / blob/shape)" if D_meta else None
    for s in range(nst):
        who = ps._where(first[s])
        if not ps.stacks[s].is_file():
            raise InputError(f"{who}: {ps._stack_not_found(s)}")
        h = _header_for(who, ps.stacks[s])
        if h.nx != h.ny:
            raise InputError(f"{who}: non-square images ({h.ny}x{h.nx}) in {h.path}")
        if D and h.nx != D:
            raise InputError(
                f"{who}: mixed box sizes: {h.path} holds {h.nx}x{h.nx} images, "
                f"but {D_from} says {D}"
            )
        if not D:
            D, D_from = h.nx, str(h.path)
        if maxslice[s] >= h.nz:
            j = int(np.flatnonzero((ps.stack_index == s) & (ps.slice_index >= h.nz))[0])
            raise InputError(f"{ps._where(j)}: index beyond the stack {h.path} ({h.nz} images)")
        ps._headers[s] = h
    ps.D = int(D)


# --------------------------------------------------------------------------- writing
def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _per_particle(name: str, value, n: int | None) -> np.ndarray:
    arr = _to_numpy(value).astype(np.float64)
    if arr.ndim == 0:
        if n is None:
            return arr
        return np.full(n, float(arr))
    if arr.ndim != 1 or (n is not None and len(arr) != n):
        raise ValueError(f"{name}: expected a scalar or ({n},) array, got shape {arr.shape}")
    return arr


def write_particles(
    star_path,
    images,
    apix,
    ctf: dict,
    angles=None,
    shifts=None,
    overwrite: bool = False,
    stack_name: str | None = None,
    batch_size: int = 1000,
) -> Path:
    """Write particles as RELION 3.1: ``star_path`` plus one MRC stack beside it.

    ``images``: an array ``(N, D, D)`` or an iterable of float batches ``(b, D, D)`` (streamed
    into a memory-mapped stack, so the set need not fit in RAM; then N comes from the
    per-particle metadata). ``apix`` (Å) and each ``ctf`` entry (keys as
    :attr:`ParticleSet.ctf`; ``phase_shift``/``bfactor`` optional) are scalars or (N,) arrays;
    ``angles`` (N, 3) degrees RELION ZYZ; ``shifts`` (N, 2) Å (rlnOriginX/YAngst).
    ``stack_name`` (default ``<star stem>.mrcs``) is relative to the STAR file's folder.
    Refuses to overwrite unless ``overwrite``; writes temporary files then renames them, so a
    failure leaves nothing behind. Returns the STAR path.
    """
    from .star import CTF_DEFAULTS, CTF_KEYS, relion31_tables

    star_path = Path(star_path)
    stack_name = stack_name or f"{star_path.stem}.mrcs"
    if Path(stack_name).is_absolute():
        raise ValueError("stack_name must be relative to the STAR file's folder")
    stack_path = star_path.parent / stack_name
    if stack_path.resolve() == star_path.resolve():
        raise ValueError("stack and STAR file must differ")
    check_writable(star_path, overwrite)
    check_writable(stack_path, overwrite)
    missing = [k for k in CTF_KEYS if k not in ctf and k not in CTF_DEFAULTS]
    if missing:
        raise ValueError(f"write_particles: ctf lacks {', '.join(missing)}")

    # N: from an array of images, else from the per-particle metadata.
    arr = None
    if hasattr(images, "shape") and len(images.shape) == 3:
        arr = images
        n = int(arr.shape[0])
    else:
        lengths = {len(_to_numpy(v)) for v in [apix, *ctf.values()] if _to_numpy(v).ndim == 1}
        for v in (angles, shifts):
            if v is not None:
                lengths.add(len(_to_numpy(v)))
        if len(lengths) != 1:
            raise ValueError(
                "write_particles: with images given as batches, the number of particles "
                "must follow from per-particle (N,) metadata arrays of one length; got "
                f"lengths {sorted(lengths)}"
            )
        n = lengths.pop()
    if n == 0:
        raise ValueError("write_particles: no particles")
    apix_arr = _per_particle("apix", apix, n)
    if not (np.isfinite(apix_arr).all() and (apix_arr > 0).all()):
        raise ValueError("write_particles: apix must be positive")
    ctf_arr = {
        k: _per_particle(f"ctf[{k!r}]", ctf.get(k, CTF_DEFAULTS.get(k)), n) for k in CTF_KEYS
    }
    ang = None if angles is None else _to_numpy(angles).astype(np.float64).reshape(n, 3)
    sh = None if shifts is None else _to_numpy(shifts).astype(np.float64).reshape(n, 2)

    if arr is not None:
        batches: Iterable = (arr[a : a + batch_size] for a in range(0, n, batch_size))
    else:
        batches = images

    width = max(6, len(str(n)))
    names = np.char.add(
        np.char.add(np.char.zfill(np.arange(1, n + 1).astype(str), width), "@"),
        Path(stack_name).as_posix(),
    )
    tmp_stack = stack_path.with_name(f".{stack_path.name}.tmp{os.getpid()}")
    tmp_star = star_path.with_name(f".{star_path.name}.tmp{os.getpid()}")
    stack_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        it = iter(batches)
        first = _to_numpy(next(it, np.empty((0, 0, 0), np.float32)))
        if first.ndim == 2:
            first = first[None]
        if first.ndim != 3 or first.shape[0] == 0 or first.shape[1] != first.shape[2]:
            raise ValueError(
                f"write_particles: images must be square (b, D, D) batches, got {first.shape}"
            )
        D = int(first.shape[-1])
        done = 0
        lo, hi, s1, s2 = np.inf, -np.inf, 0.0, 0.0
        with mrcfile.new_mmap(tmp_stack, shape=(n, D, D), mrc_mode=2, overwrite=True) as m:
            m.set_image_stack()
            m.voxel_size = float(apix_arr[0])

            def put(b):
                nonlocal done, lo, hi, s1, s2
                b = _to_numpy(b)
                if b.ndim == 2:
                    b = b[None]
                if b.shape[1:] != (D, D):
                    raise ValueError(
                        f"write_particles: batch of shape {b.shape}, expected (b, {D}, {D})"
                    )
                if done + len(b) > n:
                    raise ValueError(f"write_particles: more than {n} images given")
                b = b.astype(np.float32, copy=False)
                if not np.isfinite(b).all():
                    j = done + int(np.flatnonzero(~np.isfinite(b).all(axis=(1, 2)))[0])
                    raise ValueError(f"write_particles: image {j} holds NaN or Inf")
                m.data[done : done + len(b)] = b
                done += len(b)
                lo, hi = min(lo, float(b.min())), max(hi, float(b.max()))
                b64 = b.astype(np.float64)
                s1 += float(b64.sum())
                s2 += float((b64 * b64).sum())

            put(first)
            for b in it:
                put(b)
            if done != n:
                raise ValueError(f"write_particles: {done} images given for {n} particles")
            count = float(n) * D * D
            mean = s1 / count
            m.header.dmin, m.header.dmax, m.header.dmean = lo, hi, mean
            m.header.rms = float(np.sqrt(max(s2 / count - mean * mean, 0.0)))
        optics, particles = relion31_tables(names, apix_arr, ctf_arr, ang, sh, D=D)
        import starfile

        starfile.write({"optics": optics, "particles": particles}, tmp_star)
        os.replace(tmp_stack, stack_path)
        os.replace(tmp_star, star_path)
    except BaseException:
        for t in (tmp_stack, tmp_star):
            try:
                t.unlink()
            except FileNotFoundError:
                pass
        raise
    return star_path
