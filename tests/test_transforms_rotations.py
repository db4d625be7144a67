"""Centred unitary FFTs, Hermitian half-plane, RELION Euler angles."""

import math

import pytest
import torch

from cryorecon.fourier.transforms import (
    HalfPlane,
    fft2c,
    fft3c,
    freq_grid_2d,
    ifft2c,
    ifft3c,
)
from cryorecon.geometry.rotations import (
    direction_inplane_to_matrix,
    euler_to_matrix,
    matrix_to_euler,
    random_rotations,
)


def test_fft_is_unitary_and_centred():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 16, generator=g)
    F = fft2c(x)
    assert torch.allclose((F.abs() ** 2).sum((-1, -2)), (x**2).sum((-1, -2)), rtol=1e-5)
    assert torch.allclose(F[:, 8, 8].real, x.sum((-1, -2)) / 16, rtol=1e-5)  # DC at D//2
    assert torch.allclose(ifft2c(F).real, x, atol=1e-5)
    v = torch.randn(8, 8, 8, generator=g)
    assert torch.allclose(ifft3c(fft3c(v)).real, v, atol=1e-5)
    # A delta at the centre has a flat spectrum with zero phase.
    d = torch.zeros(16, 16)
    d[8, 8] = 1
    assert torch.allclose(fft2c(d), torch.full((16, 16), 1 / 16, dtype=torch.complex64), atol=1e-6)


def test_white_noise_stays_white_with_same_sigma():
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(2000, 16, 16, generator=g)
    F = fft2c(x)
    var = (F.abs() ** 2).mean(0)
    assert torch.allclose(var, torch.full_like(var, 4.0), rtol=0.15)


def test_half_plane_covers_disc_once():
    D, radius = 16, 6.5
    h = HalfPlane(D, radius)
    x = torch.randn(3, D, D, generator=torch.Generator().manual_seed(2))
    F = fft2c(x)
    disc = torch.linalg.norm(freq_grid_2d(D, dtype=torch.float64) * D, dim=-1) < radius
    assert torch.allclose(
        (h.weight * h.gather(F).abs() ** 2).sum(-1), (F.abs() ** 2 * disc).sum((-1, -2)), rtol=1e-5
    )
    assert torch.allclose(h.scatter(h.gather(F)), F * disc, atol=1e-6)
    assert int(disc.sum()) == 2 * h.M - 1


def test_euler_matrix_relion_convention():
    # RELION Euler_angles2matrix(90, 0, 0): rows n1=(0,1,0), n2=(-1,0,0), d=(0,0,1).
    A = euler_to_matrix(torch.tensor(math.pi / 2), torch.tensor(0.0), torch.tensor(0.0))
    assert torch.allclose(A, torch.tensor([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]]), atol=1e-6)
    # Tilt 90 about y: viewing direction (third row) becomes (1, 0, 0).
    A = euler_to_matrix(torch.tensor(0.0), torch.tensor(math.pi / 2), torch.tensor(0.0))
    assert torch.allclose(A[2], torch.tensor([1.0, 0, 0]), atol=1e-6)
    assert torch.allclose(A[0], torch.tensor([0.0, 0, -1]), atol=1e-6)


def test_euler_round_trip_and_orthonormal():
    R = random_rotations(500, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(
        R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand(500, 3, 3), atol=1e-10
    )
    assert torch.allclose(torch.det(R), torch.ones(500, dtype=R.dtype))
    R2 = euler_to_matrix(*matrix_to_euler(R))
    assert torch.allclose(R, R2, atol=1e-9)


@pytest.mark.parametrize("tilt", [0.0, math.pi])
def test_euler_round_trip_at_the_poles(tilt):
    """At tilt 0 or pi only rot + psi (or rot - psi) is defined; the matrix must still come back."""
    g = torch.Generator().manual_seed(4)
    rot = torch.rand(64, generator=g, dtype=torch.float64) * 2 * math.pi
    psi = torch.rand(64, generator=g, dtype=torch.float64) * 2 * math.pi
    R = euler_to_matrix(rot, torch.full_like(rot, tilt), psi)
    for dtype, atol in [(torch.float64, 1e-9), (torch.float32, 1e-5)]:
        R2 = euler_to_matrix(*matrix_to_euler(R.to(dtype)))
        assert torch.allclose(R.to(dtype), R2, atol=atol)


def test_direction_inplane_matrix_has_direction_as_third_row():
    d = torch.nn.functional.normalize(torch.randn(50, 3, dtype=torch.float64), dim=-1)
    psi = torch.rand(50, dtype=torch.float64) * 2 * math.pi
    A = direction_inplane_to_matrix(d, psi)
    assert torch.allclose(A[:, 2], d, atol=1e-10)
