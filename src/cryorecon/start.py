"""Set-up of a run: the quadrature level of a cut-off, the random start, its scale, and the
particle splits (paper Sec. 3.2-3.3 and Sec. 4: "a random initial density").

Everything here is computed once per run (or once per omega*): the driver
(:mod:`cryorecon.reconstruct`) and projection matching (:mod:`cryorecon.projection_matching`)
share it.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch

from .errors import InputError
from .fourier.slicing import SliceOperator, spectrum_from_volume
from .fourier.transforms import HalfPlane, cutoff_radius
from .geometry.grids import PoseGrid
from .geometry.symmetry import asymmetric_unit_grid, parse_symmetry
from .preprocess import load_batch
from .progress import log


class Level:
    """Everything that depends only on omega*: the coefficients in use (a half-plane inside
    the cut-off) and the quadrature of Sec. 3.2 (Eq. 4).

    The rotations, their weights and the cached slice operator of the full grid are built on
    first use: the coarse-to-fine search never needs the whole grid at once.
    """

    def __init__(
        self,
        omega: float,
        D: int,
        apix: float,
        shift_sigma_px: float,
        grid_scale: float,
        device,
        oversample: int = 2,
        cache_bytes: int = 2**31,
        symmetry: str = "C1",
        shift_step: float | None = None,
    ):
        self.omega, self.D, self.device = omega, D, torch.device(device)
        self.oversample, self.cache_bytes, self.symmetry = oversample, cache_bytes, symmetry
        self.shift_step = shift_step
        grid = PoseGrid(
            D=D,
            apix=apix,
            omega_star=omega,
            shift_sigma_px=shift_sigma_px,
            scale=grid_scale,
            shift_step=shift_step,
        )
        # With a point group only its asymmetric unit of poses (the rest are the same images).
        self.grid = (
            grid if symmetry == "C1" else asymmetric_unit_grid(grid, parse_symmetry(symmetry))
        )
        self.halfplane = HalfPlane(D, cutoff_radius(D, apix, omega), device=device)
        self.shifts = self.grid.shifts.to(device, torch.float32)
        self.log_w_shift = self.grid.log_w_t.to(device)

    @cached_property
    def rotations(self) -> torch.Tensor:
        """(J, 3, 3) float32 rotations of the grid, direction-major."""
        return self.grid.rotations(device=self.device)

    @cached_property
    def log_w_rot(self) -> torch.Tensor:
        return self.grid.log_w_R().to(self.device)

    @cached_property
    def slice_op(self) -> SliceOperator:
        return SliceOperator(
            self.rotations,
            self.halfplane.freqs().to(self.device) * self.D,
            self.D,
            self.oversample,
            cache_bytes=self.cache_bytes,
        )

    @property
    def n_poses(self) -> int:
        return int(self.grid.n_rotations * self.grid.M_t)


def make_level(
    omega: float,
    D: int,
    apix: float,
    shift_sigma_px: float,
    grid_scale: float,
    device,
    oversample: int = 2,
    cache_bytes: int = 2**31,
    symmetry: str = "C1",
    shift_step: float | None = None,
) -> Level:
    """The :class:`Level` of cut-off ``omega`` (1/Å) for box ``D`` at ``apix`` Å/pixel; with a
    point group (RELION's name) the pose grid covers its asymmetric unit only; ``shift_step``
    as :class:`~cryorecon.geometry.grids.PoseGrid`'s (None: the paper's Gauss-Hermite shifts)."""
    return Level(
        omega,
        D,
        apix,
        shift_sigma_px,
        grid_scale,
        device,
        oversample,
        cache_bytes,
        symmetry,
        shift_step,
    )


def split_particles(
    n: int, heldout: int, minibatch: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Held-out indices and fixed training minibatches, from a seeded permutation."""
    if n < 2:
        raise InputError(f"need at least 2 particles, got {n}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    h = min(heldout, max(1, n // 10))
    held, train = np.sort(perm[:h]), perm[h:]
    K = max(1, math.ceil(len(train) / minibatch))
    return held, [np.sort(b) for b in np.array_split(train, K)]


def half_sets(
    batches: list[np.ndarray],
    heldout: np.ndarray,
    n: int,
    seed: int,
    given: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray], list[int], list[int]]:
    """Gold-standard half-sets (RELION's ``rlnRandomSubset``, 1 or 2 per particle) and the
    training minibatches regrouped per half.

    Without ``given``, whole minibatches are dealt to the halves at random (half of them
    each) and the held-out particles split at random, so each half keeps its minibatches and
    SAGD can carry their stored gradients over. With ``given`` (the input's half-sets), every
    half's training particles are cut into new minibatches of the old size.

    Returns ``(subset (n,), batches, half, parent)``: half 1's minibatches first; ``half[k]``
    is minibatch k's half, ``parent[k]`` the index of the joint minibatch it was (-1 when
    regrouped).
    """
    rng = np.random.default_rng([seed, 2])
    subset = np.zeros(n, dtype=np.int64)
    if given is None and len(batches) >= 2:
        order = rng.permutation(len(batches))
        ones = set(order[: len(batches) // 2].tolist())
        parent = sorted(ones) + sorted(set(range(len(batches))) - ones)
        half = [1 if k in ones else 2 for k in parent]
        for k, h in zip(parent, half):
            subset[batches[k]] = h
        held = rng.permutation(np.asarray(heldout))
        subset[held[: len(held) // 2]], subset[held[len(held) // 2 :]] = 1, 2
        return subset, [batches[k] for k in parent], half, parent
    if given is not None:
        subset = np.asarray(given, dtype=np.int64).copy()
    else:
        perm = rng.permutation(n)
        subset[:] = 2
        subset[perm[: n // 2]] = 1
    size = max(len(b) for b in batches)
    train = np.sort(np.concatenate(batches))
    out, half = [], []
    for h in (1, 2):
        mine = train[subset[train] == h]
        if len(mine) == 0:
            raise InputError(f"half-set {h} has no training particles; use --no-halves")
        K = max(1, math.ceil(len(mine) / size))
        out += [np.sort(b) for b in np.array_split(mine, K)]
        half += [h] * K
    return subset, out, half, [-1] * len(out)


def random_spheres(
    D: int, radius_px: float, n_spheres: int, generator: torch.Generator
) -> torch.Tensor:
    """Random initial density (Sec. 4): a union of ``n_spheres`` solid spheres of random
    radius and position inside a ball of ``radius_px`` about the centre, softened by one voxel."""
    g = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    V = torch.zeros(D, D, D)
    for _ in range(n_spheres):
        r = float(torch.empty(()).uniform_(0.15, 0.4, generator=generator)) * radius_px
        c = torch.randn(3, generator=generator)
        c = c / c.norm() * float(torch.rand((), generator=generator)) * (radius_px - r)
        d = torch.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
        V = torch.maximum(V, torch.sigmoid((r - d) * 2.0))
    return V


def scale_to_data(
    V: torch.Tensor,
    particles,
    idx,
    level: Level,
    diameter_px: float,
    oversample: int,
    generator: torch.Generator,
    device,
) -> tuple[torch.Tensor, float]:
    """Scale the start so its CTF-modulated slices carry the images' signal power, and
    measure the data's curvature per voxel.

    Scale: a^2 = sum w (|y|^2 - sigma^2) / sum w c^2 |S(R)|^2 over a pilot batch at random
    poses. Curvature: a unit change of one voxel changes every slice coefficient by 1/D in
    modulus, so the diagonal of the negative log-likelihood's Hessian is, per particle,
    h = sum_m w_m c_m^2 / (sigma^2 D^2) (averaged over the pilot batch, current band).
    """
    from .geometry.rotations import random_rotations

    D = V.shape[-1]
    batch = load_batch(particles, idx, level.halfplane, diameter_px, device)
    R = random_rotations(len(idx), generator=generator).to(device, torch.float32)
    op = SliceOperator(R, level.halfplane.freqs().to(device) * D, D, oversample)
    S = op.slice(spectrum_from_volume(V.to(device), oversample))
    w = batch.weight
    signal = float((w * (batch.y.abs() ** 2 - batch.sigma2[:, None])).sum())
    model = float((w * batch.ctf**2 * S.abs() ** 2).sum())
    h = float(((w * batch.ctf**2).sum(-1) / batch.sigma2).mean()) / D**2
    if signal <= 0 or model <= 0:
        log.warning("could not measure the images' signal power; keeping the start's scale")
        return V, h
    return V * math.sqrt(signal / model), h


def default_exponential_lambda(V0: torch.Tensor, n_train: int, h: float, strength: float) -> float:
    """Default rate of the exponential prior (Sec. 3.3; the paper gives no value).

    The exponential's own estimate, lambda = 1 / mean(V0), does not see how much data there
    is: with few or noisy particles it empties the map. The MAP soft-thresholds a voxel by
    about lambda / H_vv, with H_vv = n_train * h the data's curvature per voxel measured on
    the start's band (:func:`scale_to_data`), so lambda is capped in those units:
    lambda = min(1 / mean(V0), strength * max(V0) * n_train * h).

    ``strength`` is an empirical knob (h is measured on the first, lowest band, so it
    understates the final curvature); its effect on the demo set is in docs/results.md.
    """
    mle = 1.0 / max(float(V0.mean()), 1e-30)
    return min(mle, strength * float(V0.max()) * n_train * h)
