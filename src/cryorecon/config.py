"""Parameters of a reconstruction run (``cryorecon reconstruct``'s options).

Lengths in Å, frequencies in 1/Å, times in seconds. Defaults: the coarse-to-fine pose search
in its fast mode (:mod:`cryorecon.model.search`, ``pose_search="search"``,
``search_mode="fast"``: a coarse pass on the grid of half the band, then the final grid
around a few poses per image; docs/results.md, "Fast default pose search"), a cut-off that
starts at 40 Å and rises when the held-out error levels off
(:class:`~cryorecon.optim.adaptive.AdaptiveResolution`; the paper's fixed schedule is
``resolution_schedule="paper"``, Sec. 4.2), minibatches of 100 particles, a pose grid 3x
coarser than Sec. 3.2's in angle (``grid_scale=3``; ``grid_scale=1`` is the paper's, which at
box 64 and 40 Å is 4.8 M poses an image) and shifts on a lattice ``shift_step / omega*``
apart (:func:`~cryorecon.geometry.grids.lattice_shifts`; None: the paper's Gauss-Hermite
nodes, divided by ``grid_scale``). The adaptive schedule spends at most one epoch at a
cut-off unless ``omega_max_iters`` says otherwise. The paper's importance sampling
(Sec. 3.4, ``pose_search="importance"``) and the exact sum (``"exact"``) stay options.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model.search import SEARCH_MODES
from .optim.schedules import Schedule

POSE_SEARCHES = ("search", "importance", "exact")
RESOLUTION_SCHEDULES = ("adaptive", "paper")

# The paper's first cut-off (Sec. 4.2) and the adaptive schedule's (near 40 Å, as cryoSPARC's
# and RELION's initial models start).
PAPER_OMEGA_START = 0.02
ADAPTIVE_OMEGA_START = 1 / 40


@dataclass
class ReconstructConfig:
    """Parameters of a run. Lengths in Å, frequencies in 1/Å, times in seconds."""

    minibatch: int = 100
    prior: str = "exponential"
    prior_lambda: float | None = None
    prior_strength: float = 3.0
    car_sigma: float | None = None
    seed: int = 0
    max_iters: int = 5000
    max_time: float | None = None
    pose_search: str = "search"
    resolution_schedule: str = "adaptive"
    omega_start: float | None = None
    omega_step: float = 0.005
    omega_every: int = 150
    omega_max: float = 0.11
    omega_factor: float = 1.15
    omega_min_iters: int = 20
    omega_max_iters: int | None = None
    omega_patience: int = 2
    omega_plateau: float = 0.2
    device: str = "cpu"
    oversample: int = 2
    diameter_A: float | None = None
    shift_sigma_A: float | None = None
    grid_scale: float = 3.0
    shift_step: float | None = 0.35
    heldout: int = 200
    heldout_every: int = 10
    patience: int = 5
    line_search_every: int = 20
    checkpoint_every: int = 25
    snapshot_every: int = 100
    n_spheres: int = 8
    search_epsilon: float = 1e-3
    search_coarse_radius: float = 5.5
    search_max_rotations: int | None = None
    search_mode: str = "fast"
    s0: float = 10.0
    is_every: int | None = None
    is_check: int = 16
    is_tolerance: float = 1e-3
    report_every: float | None = 60.0
    halves: bool = True
    symmetry: str = "C1"
    # With a point group: run in C1 until the cut-off passes join_resolution_A, then align the
    # map's symmetry axes and impose the group (RELION's "run in C1 and apply symmetry
    # later"); False imposes it on the random start.
    symmetry_c1_start: bool = True
    classes: int = 1
    class_similarity: float = 0.5
    # With classes > 1: one map until the cut-off passes this, then K (Run.maybe_split_classes).
    class_resolution_A: float = 30.0
    # With classes > 1: the refined class maps differ only below this resolution
    # (model.classes.tie_to_mean); 0: no tie.
    class_difference_A: float = 40.0
    join_resolution_A: float = 40.0
    cache_gib: float = 2.0

    def __post_init__(self) -> None:
        if self.pose_search not in POSE_SEARCHES:
            raise ValueError(
                f"pose_search must be one of {POSE_SEARCHES}, got {self.pose_search!r}"
            )
        if self.search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode must be one of {SEARCH_MODES}")
        if self.resolution_schedule not in RESOLUTION_SCHEDULES:
            raise ValueError(f"resolution_schedule must be one of {RESOLUTION_SCHEDULES}")

    @property
    def first_omega(self) -> float:
        """The first cut-off (1/Å): ``omega_start``, else the schedule's default."""
        if self.omega_start is not None:
            return self.omega_start
        return PAPER_OMEGA_START if self.resolution_schedule == "paper" else ADAPTIVE_OMEGA_START

    @property
    def annealing_step(self) -> int:
        """Iterations per step of the importance annealing (Sec. 3.4.1): ``is_every``, or by
        default a third of ``omega_every``, the paper's ratio (50 to 150 iterations), so that
        sampling anneals at the same pace relative to the cut-off schedule."""
        return self.is_every if self.is_every else max(1, self.omega_every // 3)

    def schedule(self, apix: float) -> Schedule:
        """The paper's schedules (omega*, epsilon, importance annealing) for ``apix``."""
        return Schedule(
            omega_start=self.first_omega,
            omega_step=self.omega_step,
            omega_every=self.omega_every,
            omega_max=self.omega_max,
            apix=apix,
            is_every=self.annealing_step,
        )
