"""Set-up of a run (:mod:`cryorecon.start`): particle splits and the random start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryorecon.errors import InputError
from cryorecon.start import random_spheres, split_particles


@pytest.mark.parametrize("n, heldout, minibatch", [(1000, 200, 50), (37, 200, 10), (2, 5, 3)])
def test_split_is_a_seeded_partition(n, heldout, minibatch):
    held, batches = split_particles(n, heldout, minibatch, seed=3)
    everything = np.concatenate([held, *batches])
    assert sorted(everything.tolist()) == list(range(n))
    assert len(held) == min(heldout, max(1, n // 10))
    assert max(len(b) for b in batches) <= minibatch
    again = split_particles(n, heldout, minibatch, seed=3)
    assert np.array_equal(again[0], held) and all(
        np.array_equal(a, b) for a, b in zip(again[1], batches)
    )
    if n > 10:
        assert not np.array_equal(split_particles(n, heldout, minibatch, seed=4)[0], held)


def test_split_needs_two_particles():
    with pytest.raises(InputError):
        split_particles(1, 1, 1, 0)


def test_random_spheres_lie_inside_the_particle_and_follow_the_seed():
    D, radius = 32, 10.0
    V = random_spheres(D, radius, 8, torch.Generator().manual_seed(0))
    assert V.shape == (D, D, D) and float(V.min()) >= 0 and float(V.max()) <= 1
    g = torch.arange(D, dtype=torch.float32) - D // 2
    z, y, x = torch.meshgrid(g, g, g, indexing="ij")
    outside = torch.sqrt(x**2 + y**2 + z**2) > radius + 3  # beyond the one-voxel softening
    assert float(V[outside].max()) < 0.01 and float(V.max()) > 0.9
    assert torch.equal(V, random_spheres(D, radius, 8, torch.Generator().manual_seed(0)))
    assert not torch.equal(V, random_spheres(D, radius, 8, torch.Generator().manual_seed(1)))
