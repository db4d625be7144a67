"""Tests for cryorecon.geometry.grids (paper Sec. 3.2, Eq. 4)."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from cryorecon.geometry.grids import (
    PoseGrid,
    gauss_hermite_shifts,
    inplane_angles,
    lattice_shifts,
    nearest_neighbour_angles,
    quadrature_sizes,
    saff_kuijlaars,
)


@pytest.mark.parametrize("M", [1, 2, 3, 50, 675])
def test_saff_kuijlaars_unit_and_shape(M):
    d = saff_kuijlaars(M)
    assert d.shape == (M, 3) and d.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("M", [100, 675, 2000])
def test_saff_kuijlaars_covers_full_sphere(M):
    d = saff_kuijlaars(M)
    alpha = 3.6 / math.sqrt(M)  # the spacing for which Sec. 3.2 picks M = (3.6/alpha)^2
    # balanced: mean vector ~ 0, second moment ~ I/3 (no hemisphere bias)
    assert np.abs(d.mean(0)).max() < 5e-3
    np.testing.assert_allclose(d.T @ d / M, np.eye(3) / 3, atol=1e-2)
    # both poles present: full sphere, not a hemisphere
    assert d[:, 2].min() == pytest.approx(-1.0) and d[:, 2].max() == pytest.approx(1.0)
    nn = nearest_neighbour_angles(d)
    assert nn.max() < 1.1 * alpha  # max nearest-neighbour gap ~ alpha
    assert nn.min() > 0.5 * alpha  # no clumping
    # covering radius: every point of the sphere is within alpha of a grid direction
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20000, 3))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    dist, _ = cKDTree(d).query(q)
    assert (2 * np.arcsin(dist / 2)).max() < 0.8 * alpha


def test_inplane_angles():
    psi = inplane_angles(8)
    np.testing.assert_allclose(psi, np.arange(8) * math.pi / 4)
    assert psi.min() >= 0 and psi.max() < 2 * math.pi


@pytest.mark.parametrize("sigma", [0.7, 3.0])
def test_gauss_hermite_moments(sigma):
    pts, w = gauss_hermite_shifts(3, sigma)
    assert pts.shape == (9, 2) and w.shape == (9,)
    assert w.sum() == pytest.approx(1.0, abs=1e-14)
    x, y = pts[:, 0], pts[:, 1]
    assert (w * x).sum() == pytest.approx(0.0, abs=1e-12)
    assert (w * x**2).sum() == pytest.approx(sigma**2, rel=1e-12)
    assert (w * y**2).sum() == pytest.approx(sigma**2, rel=1e-12)
    assert (w * x**4).sum() == pytest.approx(3 * sigma**4, rel=1e-12)
    assert (w * x**2 * y**2).sum() == pytest.approx(sigma**4, rel=1e-12)
    # degree 2n-1 = 5 exact, odd moments vanish
    assert (w * x**5 * y).sum() == pytest.approx(0.0, abs=1e-9)
    # n = 5: E[x^6] = 15 sigma^6 exactly; a smooth function close to the truth
    pts, w = gauss_hermite_shifts(5, sigma)
    assert (w * pts[:, 0] ** 6).sum() == pytest.approx(15 * sigma**6, rel=1e-11)
    # E[cos(a x)] = exp(-a^2 sigma^2 / 2)
    pts, w = gauss_hermite_shifts(12, sigma)
    a = 0.5
    assert (w * np.cos(a * pts[:, 0])).sum() == pytest.approx(
        math.exp(-((a * sigma) ** 2) / 2), abs=1e-8
    )


def test_gauss_hermite_ordering_and_degenerate():
    pts, w = gauss_hermite_shifts(2, 1.0)
    # y-major: first two points share y, differ in x
    assert pts[0, 1] == pts[1, 1] and pts[0, 0] < pts[1, 0]
    pts, w = gauss_hermite_shifts(4, 0.0)
    np.testing.assert_array_equal(pts, [[0.0, 0.0]])
    np.testing.assert_array_equal(w, [1.0])


@pytest.mark.parametrize("sigma", [1.3, 4.0])
def test_lattice_shifts_spacing_disc_and_moments(sigma):
    h = 0.25
    pts, w = lattice_shifts(h, sigma, range_sigmas=6.0)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    # on the lattice h * (i, j), inside the disc, the origin included, y-major
    np.testing.assert_allclose(pts / h, np.rint(pts / h), atol=1e-9)
    assert np.sqrt((pts**2).sum(-1)).max() <= 6.0 * sigma * (1 + 1e-9)
    assert (np.abs(pts).sum(-1) == 0).sum() == 1
    assert np.all(np.diff(pts[:, 1]) >= 0)
    # a fine lattice over six sigmas: the prior's moments by the midpoint rule
    x, y = pts[:, 0], pts[:, 1]
    assert (w * x).sum() == pytest.approx(0.0, abs=1e-12)
    assert (w * x**2).sum() == pytest.approx(sigma**2, rel=1e-6)
    assert (w * x**2 * y**2).sum() == pytest.approx(sigma**4, rel=1e-5)
    a = 0.7
    assert (w * np.cos(a * x)).sum() == pytest.approx(math.exp(-((a * sigma) ** 2) / 2), abs=1e-6)
    # weights are the prior at the nodes
    lw = np.log(w) + (pts**2).sum(-1) / (2 * sigma**2)
    np.testing.assert_allclose(lw, lw[0], atol=1e-9)


def test_lattice_shifts_degenerate():
    pts, w = lattice_shifts(1.0, 0.0)
    np.testing.assert_array_equal(pts, [[0.0, 0.0]])
    np.testing.assert_array_equal(w, [1.0])
    # a spacing wider than the range still keeps the origin and its four neighbours
    pts, w = lattice_shifts(5.0, 1.0)
    assert len(pts) == 5 and w.argmax() == 2
    with pytest.raises(ValueError):
        lattice_shifts(0.0, 1.0)


def test_posegrid_lattice_shifts_follow_the_cutoff():
    # spacing shift_step / (omega apix) px, independent of the angular coarsening
    for omega, scale in [(0.04, 1.0), (0.04, 3.0), (0.08, 3.0)]:
        g = PoseGrid(
            D=64, apix=5.0, omega_star=omega, shift_sigma_px=3.0, scale=scale, shift_step=0.35
        )
        assert g.r_t == pytest.approx(0.35 / (omega * 5.0))
        pts, _ = lattice_shifts(0.35 / (omega * 5.0), 3.0)
        np.testing.assert_allclose(g.shifts.numpy(), pts)
        assert g.log_w_t.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    coarse = PoseGrid(D=64, apix=5.0, omega_star=0.04, shift_sigma_px=3.0, shift_step=0.35)
    fine = PoseGrid(D=64, apix=5.0, omega_star=0.08, shift_sigma_px=3.0, shift_step=0.35)
    assert fine.M_t > 3 * coarse.M_t


def test_quadrature_sizes_hand_worked():
    # D=64, apix=5.6 A, omega*=0.02 1/A: r = 64*5.6*0.02 = 7.168 Fourier pixels
    s = quadrature_sizes(64, 5.6, 0.02)
    r = 7.168
    assert s["r"] == pytest.approx(r)
    alpha = 0.5 * math.acos((r * r - 1) / (r * r + 1))
    assert s["alpha"] == pytest.approx(alpha, rel=1e-12)
    assert s["alpha"] == pytest.approx(math.atan(1 / r), rel=1e-12)  # identity
    assert s["alpha"] == pytest.approx(0.1386143, rel=1e-6)
    # (3.6/0.1386143)^2 = 674.5 -> 675 ; 2 pi / 0.1386143 = 45.33 -> 46 ; 7.168^2 = 51.38 -> 52
    assert s["M_d"] == 675
    assert s["M_psi"] == 46
    assert s["M_t"] == 52
    assert s["n_t_per_axis"] == 8  # ceil(sqrt(52)) = 8


def test_quadrature_sizes_exact_integer_and_nyquist_cap():
    # r = 4 exactly: alpha = 0.5 acos(15/17); M_t = 16 (no spurious ceil to 17)
    s = quadrature_sizes(40, 1.0, 0.1)
    assert s["r"] == pytest.approx(4.0)
    assert s["M_t"] == 16 and s["n_t_per_axis"] == 4
    # r = 1: alpha = pi/4, M_d = ceil((3.6*4/pi)^2) = ceil(21.01) = 22, M_psi = 8
    s = quadrature_sizes(10, 1.0, 0.1)
    assert s["alpha"] == pytest.approx(math.pi / 4)
    assert s["M_d"] == 22 and s["M_psi"] == 8 and s["M_t"] == 1
    # beyond Nyquist: r capped at D/2
    s = quadrature_sizes(32, 2.0, 1.0)
    assert s["r"] == 16.0 and s["M_t"] == 256


def test_quadrature_sizes_monotone_in_omega():
    prev = None
    for w in [0.02, 0.03, 0.05, 0.08, 0.11]:
        s = quadrature_sizes(128, 2.8, w)
        if prev:
            assert s["alpha"] < prev["alpha"]
            assert s["M_d"] > prev["M_d"] and s["M_psi"] > prev["M_psi"] and s["M_t"] > prev["M_t"]
        prev = s


@pytest.fixture(scope="module")
def grid():
    return PoseGrid(D=32, apix=5.0, omega_star=0.04, shift_sigma_px=2.0, scale=1.5)


def test_posegrid_sizes_and_weights(grid):
    s = quadrature_sizes(32, 5.0, 0.04)
    a = s["alpha"] * 1.5
    assert grid.M_d == math.ceil((3.6 / a) ** 2)
    assert grid.M_psi == math.ceil(2 * math.pi / a)
    assert grid.directions.shape == (grid.M_d, 3)
    assert grid.psi.shape == (grid.M_psi,)
    assert grid.shifts.shape == (grid.M_t, 2)
    assert grid.log_w_d.shape == (grid.M_d,) and grid.log_w_psi.shape == (grid.M_psi,)
    assert grid.log_w_t.shape == (grid.M_t,)
    torch.testing.assert_close(
        grid.log_w_d, torch.full_like(grid.log_w_d, math.log(4 * math.pi / grid.M_d))
    )
    torch.testing.assert_close(
        grid.log_w_psi, torch.full_like(grid.log_w_psi, math.log(2 * math.pi / grid.M_psi))
    )
    # sum_jk w_d w_psi p(R) = 1, and shift weights (prior folded in) sum to 1
    total_R = (
        grid.log_w_d.exp().sum() * grid.log_w_psi.exp().sum() * math.exp(grid.log_p_R)
    ).item()
    assert total_R == pytest.approx(1.0, abs=1e-12)
    assert torch.logsumexp(grid.log_w_R(), 0).item() == pytest.approx(0.0, abs=1e-12)
    assert grid.log_w_t.exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert grid.log_w_R().shape == (grid.n_rotations,)


def test_posegrid_rotations(grid):
    R = grid.rotations()
    assert R.dtype == torch.float32 and R.shape == (grid.M_d * grid.M_psi, 3, 3)
    R64 = grid.rotations(dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64).expand_as(R64)
    torch.testing.assert_close(R64 @ R64.transpose(-1, -2), eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        torch.linalg.det(R64), torch.ones(len(R64), dtype=torch.float64), atol=1e-10, rtol=0
    )
    # direction-major ordering: row 2 of R[j*M_psi + k] is d_j
    Rv = R64.view(grid.M_d, grid.M_psi, 3, 3)
    torch.testing.assert_close(
        Rv[:, :, 2, :], grid.directions[:, None, :].expand(-1, grid.M_psi, -1), atol=1e-10, rtol=0
    )
    # in-plane angle changes only n1, n2: psi step rotates n1 within the plane by 2 pi / M_psi
    j = grid.M_d // 3
    c = (Rv[j, 0, 0] * Rv[j, 1, 0]).sum().item()
    assert c == pytest.approx(math.cos(2 * math.pi / grid.M_psi), abs=1e-10)
    # all rotations distinct
    flat = R64.reshape(len(R64), 9)
    dmin = torch.cdist(flat[:500], flat).topk(2, largest=False).values[:, 1].min()
    assert dmin > 1e-3


def test_posegrid_spacings(grid):
    alpha = grid.sizes["alpha_used"]
    assert 0.7 * alpha < grid.r_d < 1.1 * alpha
    assert grid.r_psi == pytest.approx(2 * math.pi / grid.M_psi)
    xs = np.unique(grid.shifts[:, 0].numpy())
    assert grid.r_t == pytest.approx((xs.max() - xs.min()) / (len(xs) - 1))
    assert grid.r_t > 0


def test_posegrid_overrides_and_scale():
    g = PoseGrid(
        D=32, apix=5.0, omega_star=0.04, shift_sigma_px=1.0, M_d=20, M_psi=6, n_t_per_axis=3
    )
    assert (g.M_d, g.M_psi, g.M_t) == (20, 6, 9)
    assert g.rotations().shape == (120, 3, 3)
    g1 = PoseGrid(D=32, apix=5.0, omega_star=0.04, shift_sigma_px=1.0)
    g2 = PoseGrid(D=32, apix=5.0, omega_star=0.04, shift_sigma_px=1.0, scale=2.0)
    assert g2.M_d < g1.M_d and g2.M_psi < g1.M_psi and g2.M_t <= g1.M_t
    assert g1.sizes["M_d"] == g1.M_d and g1.n_t_per_axis == g1.sizes["n_t_per_axis"]


def test_posegrid_quadrature_integrates_over_so3():
    # E_R[R] = 0 and E_R[R_ij^2] = 1/3 under the Haar measure
    g = PoseGrid(D=32, apix=5.0, omega_star=0.05, shift_sigma_px=1.0)
    R = g.rotations(dtype=torch.float64)
    w = g.log_w_R().exp()[:, None, None]
    assert (w * R).sum(0).abs().max().item() < 1e-2
    torch.testing.assert_close(
        (w * R**2).sum(0), torch.full((3, 3), 1 / 3, dtype=torch.float64), atol=1e-2, rtol=0
    )
