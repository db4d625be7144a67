"""Data-parallel reconstruction on ``torch.distributed`` (launched by ``torchrun``).

Each minibatch is split across the ranks (rank r takes rows r, r + W, r + 2W, ... of it);
every rank evaluates its images' likelihood, pose posteriors and gradient contribution
(Eq. 4-5), one all-reduce sums the values and gradients, and every rank takes the same SAGD
step (Algorithm 1), so the maps stay identical on all ranks. The line search's re-evaluations
(``Evaluation.refit``) are all-reduced the same way. Per-particle state (best poses, the
importance-sampling histories of Sec. 3.4) is updated by the rank that evaluated the particle;
before a checkpoint the newest row of every particle is gathered on rank 0, which alone writes
the run folder, so a checkpoint is the same whatever the number of ranks and ``--resume``
works with any number.

Backends: gloo on CPU, NCCL on CUDA (``--device cuda`` takes the GPU of ``LOCAL_RANK``).
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) nothing here is active and
a run is exactly the single-process one. A rank that dies makes the others fail in their next
collective (at once for a closed connection, else after ``CRYORECON_DIST_TIMEOUT`` seconds,
default 600); the last checkpoint, written atomically by rank 0, stays valid.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError


@dataclass
class Ranks:
    """This process's place among the ranks (``world == 1``: a single process)."""

    rank: int = 0
    world: int = 1
    bytes_reduced: int = 0  # payload of this rank's all-reduces so far
    comm_seconds: float = 0.0  # wall time spent in them (includes waiting for slower ranks)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, idx: np.ndarray) -> np.ndarray:
        """The rows of ``idx`` (a minibatch's particle indices) this rank evaluates."""
        return np.asarray(idx)[self.rank :: self.world]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (identity for one process)."""
        if self.active:
            import time

            import torch.distributed as dist

            t0 = time.perf_counter()
            dist.all_reduce(t)
            self.comm_seconds += time.perf_counter() - t0
            self.bytes_reduced += t.numel() * t.element_size()
        return t

    def sum(self, x: float) -> float:
        """A float summed over the ranks, in float64."""
        if not self.active:
            return x
        return float(
            self.sum_(torch.tensor([x], dtype=torch.float64, device=_collective_device())).item()
        )

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def gather_objects(self, obj) -> list | None:
        """Every rank's ``obj`` on every rank (list indexed by rank)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_RANKS = Ranks()


def _collective_device():
    import torch.distributed as dist

    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def setup(device: str) -> tuple[Ranks, str]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); returns this
    process's :class:`Ranks` and the device to use (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    global _RANKS
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _RANKS, device
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda requested but CUDA is not available")
        device = f"cuda:{local % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("CRYORECON_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    _RANKS = Ranks(dist.get_rank(), dist.get_world_size())
    if _RANKS.rank:  # one voice: rank 0 logs and shows progress
        from .progress import configure

        configure(quiet=True)
    return _RANKS, device


def current() -> Ranks:
    return _RANKS


def teardown() -> None:
    global _RANKS
    if _RANKS.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _RANKS = Ranks()


def newest_rows(ranks: Ranks, updated_at: np.ndarray) -> np.ndarray:
    """(N,) the rank holding each particle's newest state: the largest ``updated_at`` (the
    iteration of the last update on that rank; ties, e.g. never updated, go to rank 0)."""
    stamps = np.stack(ranks.gather_objects(np.asarray(updated_at)))
    return stamps.argmax(0)
