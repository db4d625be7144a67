"""symmetrize / symmetry_score and the asymmetric unit of the pose quadrature."""

from __future__ import annotations

import math

import pytest
import torch

from cryorecon.errors import InputError
from cryorecon.fourier.slicing import SliceOperator, spectrum_from_volume
from cryorecon.geometry.grids import PoseGrid
from cryorecon.geometry.rotations import euler_to_matrix, random_rotations
from cryorecon.geometry.symmetry import asymmetric_unit_mask, direction_mask, parse_symmetry
from cryorecon.symmetrize import symmetrize, symmetry_score
from cryorecon.validate import rotate_volume, spherical_mask

D = 32


def blobs(points, sigma=1.6, weights=None, D=D):
    """Sum of Gaussians at (x, y, z) positions (voxels about the centre D//2), [z, y, x]."""
    k = torch.arange(D, dtype=torch.float64) - D // 2
    z, y, x = torch.meshgrid(k, k, k, indexing="ij")
    out = torch.zeros(D, D, D, dtype=torch.float64)
    for i, (a, b, c) in enumerate(points.tolist()):
        w = 1.0 if weights is None else float(weights[i])
        out += w * torch.exp(-((x - a) ** 2 + (y - b) ** 2 + (z - c) ** 2) / (2 * sigma**2))
    return out.float()


def orbit_map(name, seeds, weights=None, sigma=1.6):
    """Exactly symmetric map: blobs at the orbit {R_g p} of each seed point p (analytic)."""
    ops = parse_symmetry(name).torch()
    pts = torch.cat([ops @ torch.as_tensor(p, dtype=torch.float64) for p in seeds])
    w = None if weights is None else torch.repeat_interleave(torch.as_tensor(weights), len(ops))
    return blobs(pts, sigma, w)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def random_map():
    g = torch.Generator().manual_seed(3)
    return torch.randn(D, D, D, generator=g) * spherical_mask(D, D / 2 - 3, edge=2.0)


@pytest.mark.parametrize("name", ["C2", "C4", "D2", "D4", "O"])
def test_grid_preserving_groups_are_exactly_idempotent(random_map, name):
    s1 = symmetrize(random_map, name)
    s2 = symmetrize(s1, name)
    assert rel(s2, s1) < 1e-5
    for g in parse_symmetry(name).torch():
        assert rel(rotate_volume(s1, g), s1) < 1e-5
    assert symmetry_score(s1, name) > 1 - 1e-9
    # a random map is far from symmetric: its invariant part is about 1/order of its power
    assert symmetry_score(random_map, name) < 1.5 / math.sqrt(parse_symmetry(name).order) + 0.05


def test_d7_symmetrize_is_nearly_idempotent_for_a_smooth_map():
    g = torch.Generator().manual_seed(4)
    pts = (torch.rand(12, 3, generator=g, dtype=torch.float64) - 0.5) * 14
    v = blobs(pts, sigma=2.0)
    s1 = symmetrize(v, "D7")
    s2 = symmetrize(s1, "D7")
    assert rel(s2, s1) < 0.03
    assert symmetry_score(s1, "D7") > 0.99
    assert symmetry_score(v, "D7") < 0.85


@pytest.mark.parametrize(
    "name,seeds",
    [
        ("D7", [(6.0, 2.0, 3.0), (2.0, -3.0, -5.0)]),
        ("C5", [(5.0, 1.0, 4.0)]),
        ("T", [(6.0, 2.0, 3.0)]),
        ("I", [(2.0, 3.0, 8.0)]),
        ("D2", [(5.0, 2.0, 3.0), (-1.0, 6.0, -2.0)]),
    ],
)
def test_map_from_symmetric_atoms_is_left_unchanged(name, seeds):
    v = orbit_map(name, seeds, sigma=1.8)
    s = symmetrize(v, name)
    assert rel(s, v) < 0.05  # trilinear damping of sigma = 1.8 voxel blobs
    # the same atoms without their orbit are changed a lot (symmetrize is not a no-op)
    single = blobs(torch.tensor(seeds, dtype=torch.float64), sigma=1.8)
    assert rel(symmetrize(single, name), single) > 0.5


def test_symmetrize_one_atom_gives_its_orbit():
    """Convention pin: averaging a blob at p gives blobs at R_g p (weight 1/order each)."""
    p = torch.tensor([[5.0, 2.0, 3.0]], dtype=torch.float64)
    want = orbit_map("D3", p.tolist(), sigma=1.8) / 6
    got = symmetrize(blobs(p, sigma=1.8), "D3")
    assert rel(got, want) < 0.05


def test_symmetrize_float64_and_bad_input():
    v = torch.rand(8, 8, 8, dtype=torch.float64)
    assert symmetrize(v, "C2").dtype == torch.float64
    assert torch.equal(symmetrize(v, "C1"), v)
    with pytest.raises(InputError):
        symmetrize(torch.rand(8, 8, 4), "C2")
    with pytest.raises(InputError):
        symmetrize(v, "Q7")


# --------------------------------------------------------------------------------------------
# Poses: the side of the group, and the asymmetric unit
# --------------------------------------------------------------------------------------------


def _freqs(D, r):
    k = torch.arange(-r, r + 1, dtype=torch.float32)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    keep = kx**2 + ky**2 <= r * r
    return torch.stack([kx[keep], ky[keep]], -1)


def test_images_at_A_and_A_Rg_agree_for_a_symmetric_map():
    """I_{A R_g} = I_A (right side), while R_g A is a different view."""
    name = "D7"
    v = orbit_map(name, [(6.0, 2.0, 3.0), (2.0, -3.0, -5.0)], weights=[1.0, 0.7], sigma=1.8)
    ops = parse_symmetry(name).torch()
    A = random_rotations(4, generator=torch.Generator().manual_seed(5))
    right = (A[:, None] @ ops[None]).reshape(-1, 3, 3)
    left = (ops[None] @ A[:, None]).reshape(-1, 3, 3)
    f = _freqs(D, 10)
    spec = spectrum_from_volume(v, 2)
    s_right = SliceOperator(right.float(), f, D, 2).slice(spec).reshape(4, len(ops), -1)
    s_left = SliceOperator(left.float(), f, D, 2).slice(spec).reshape(4, len(ops), -1)
    ref = s_right[:, :1]
    err_right = ((s_right - ref).abs().norm(dim=-1) / ref.abs().norm(dim=-1)).max()
    err_left = ((s_left - ref).abs().norm(dim=-1) / ref.abs().norm(dim=-1))[:, 1:]
    assert err_right < 0.02
    assert err_left.median() > 0.15  # ten times the right-side error


def test_cn_acts_on_rot_not_psi():
    """A R_z(t) = euler(rot + t, tilt, psi): the Cn reduction is on RELION's rot."""
    rot, tilt, psi = (torch.tensor(x, dtype=torch.float64) for x in (0.4, 1.1, 2.0))
    G = parse_symmetry("C5").torch()
    A = euler_to_matrix(rot, tilt, psi)
    found = []
    for g in G:
        B = A @ g
        found.append(
            min(
                float((euler_to_matrix(rot + s * k * 2 * math.pi / 5, tilt, psi) - B).abs().max())
                for k in range(5)
                for s in (1, -1)
            )
        )
    assert max(found) < 1e-12


@pytest.mark.parametrize("name", ["C1", "C2", "C7", "D2", "D7", "T", "O", "I", "I1", "I3", "I4"])
def test_asymmetric_unit_keeps_one_pose_per_orbit(name):
    G = parse_symmetry(name)
    ops = G.torch()
    A = random_rotations(600, generator=torch.Generator().manual_seed(6))
    orbits = (A[:, None] @ ops[None]).reshape(-1, 3, 3)
    kept = asymmetric_unit_mask(orbits, G).reshape(600, G.order).sum(1)
    assert torch.all(kept == 1)
    # kept fraction of uniform rotations ~ 1/order (binomial, 4.5 sigma)
    n = 20000
    uniform = random_rotations(n, generator=torch.Generator().manual_seed(7))
    frac = float(asymmetric_unit_mask(uniform, G).double().mean())
    p = 1 / G.order
    assert abs(frac - p) < 4.5 * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("name", ["C4", "D7", "I"])
def test_asymmetric_unit_of_the_pose_grid(name):
    grid = PoseGrid(D=32, apix=4.0, omega_star=1 / 16, shift_sigma_px=1.0)
    G = parse_symmetry(name)
    mask = asymmetric_unit_mask(grid.rotations(), G).reshape(grid.M_d, grid.M_psi)
    dmask = direction_mask(grid.directions, G)
    assert abs(float(mask.double().mean()) * G.order - 1) < 0.1
    # off the rotation axes a kept direction keeps all its in-plane angles
    full = mask.all(1)
    assert torch.equal(mask.any(1), dmask)
    assert int((full != dmask).sum()) <= 2  # only the poles (on the z axis) are reduced in psi
    # the poles (Saff-Kuijlaars puts directions exactly at +-z) keep 1/n of their psi
    n_z = {"C4": 4, "D7": 7, "I": 2}[name]
    for j in (0, grid.M_d - 1):
        if dmask[j]:
            assert abs(int(mask[j].sum()) - grid.M_psi / n_z) <= 1


def test_asymmetric_unit_poles_exactly_one_per_orbit():
    G = parse_symmetry("C4")
    psi = torch.linspace(0, 2 * math.pi, 37, dtype=torch.float64)[:-1]
    A = euler_to_matrix(torch.zeros_like(psi), torch.zeros_like(psi), psi)  # north pole
    orbits = (A[:, None] @ G.torch()[None]).reshape(-1, 3, 3)
    assert torch.all(asymmetric_unit_mask(orbits, G).reshape(-1, 4).sum(1) == 1)


def test_improper_groups_have_no_pose_asymmetric_unit():
    with pytest.raises(InputError):
        asymmetric_unit_mask(torch.eye(3)[None], "Ci")


@pytest.mark.parametrize("name", ["C4", "D7", "T", "I"])
def test_asymmetric_unit_grid_integrates_invariant_functions(name):
    from cryorecon.geometry.symmetry import asymmetric_unit_grid

    grid = PoseGrid(D=32, apix=4.0, omega_star=1 / 16, shift_sigma_px=1.0, scale=1.5)
    G = parse_symmetry(name)
    sub = asymmetric_unit_grid(grid, G)
    expected = grid.M_d / G.order
    assert abs(sub.M_d - expected) <= 3 * math.sqrt(expected) + 1
    assert abs(float(torch.logsumexp(sub.log_w_R(), 0))) < 1e-9
    third_rows = sub.directions.repeat_interleave(sub.M_psi, 0).float()
    assert torch.equal(sub.rotations()[:, 2], third_rows)
    assert grid.M_d != sub.M_d and grid.directions.shape[0] == grid.M_d  # the input is untouched
    # a G-invariant integrand f(A) = sum_g exp(k tr(B^T A R_g)) (a posterior-like bump at B and
    # its symmetry mates): the restricted and the full quadrature agree
    B = random_rotations(3, generator=torch.Generator().manual_seed(8))
    ops = G.torch()

    def integral(gr):
        A = gr.rotations(dtype=torch.float64)
        tr = torch.einsum("bij,nik,gkj->bng", B, A, ops)
        f = torch.exp(2.0 * (tr - 3)).sum(-1)  # (3, N)
        return (f * gr.log_w_R().exp()).sum(-1)

    full, restricted = integral(grid), integral(sub)
    assert torch.allclose(restricted, full, rtol=0.05)


@pytest.mark.parametrize("name, tol", [("C4", 1e-5), ("D2", 1e-5), ("C7", 0.05), ("D7", 0.05)])
def test_symmetrised_gradient_is_the_gradient_through_symmetrize(name, tol):
    """The driver symmetrises each likelihood gradient g with ``symmetrize``. The gradient of
    the loss of the symmetrised map, d/dU L(S(U)) = S^T g (autograd through the trilinear
    interpolation), must equal S(g): exactly for groups that permute voxels, up to the
    interpolation's asymmetry for the others (smooth g)."""
    G = parse_symmetry(name)
    g = torch.Generator().manual_seed(5)
    w = orbit_map("C1", [(3.0, -2.0, 4.0), (-5.0, 1.0, -2.0)], sigma=2.0).double()
    w = w + 0.3 * torch.randn(D, D, D, generator=g, dtype=torch.float64)
    w = w * spherical_mask(D, D / 2 - 4, edge=2.0).double()
    U = torch.rand(D, D, D, generator=g, dtype=torch.float64).requires_grad_(True)
    # a loss whose gradient with respect to the map is w at every map: L(V) = <w, V> + |V|^2/2
    V = symmetrize(U, G)
    loss = (w * V).sum() + 0.5 * (V * V).sum()
    (auto,) = torch.autograd.grad(loss, U)
    Vd = V.detach()
    ours = symmetrize(w + Vd, G)
    inner = spherical_mask(D, D / 2 - 5, edge=0.0).double() > 0.5
    assert rel(ours[inner], auto[inner]) < tol
