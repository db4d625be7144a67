"""CTF model: RELION's formula, term by term, checked against hand computations."""

import math

import numpy as np
import pytest
import torch

from cryorecon.fourier.ctf import ctf_2d, ctf_from_dict, electron_wavelength


def test_wavelength_known_values():
    assert electron_wavelength(300.0) == pytest.approx(0.01969, abs=1e-5)
    assert electron_wavelength(200.0) == pytest.approx(0.02508, abs=1e-5)
    assert electron_wavelength(torch.tensor([300.0]))[0].item() == pytest.approx(0.019687, abs=1e-6)
    assert electron_wavelength(np.array([200.0, 300.0])) == pytest.approx(
        [0.025079, 0.019687], abs=1e-6
    )


def _hand_ctf(fx, fy, du, dv, ang_deg, kv, cs_mm, q0, ps_deg=0.0, b=0.0):
    """RELION ctf.h written out with plain floats."""
    v = kv * 1e3
    lam = 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))
    s2 = fx * fx + fy * fy
    theta = math.atan2(fy, fx)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * math.cos(2 * (theta - math.radians(ang_deg)))
    chi = (
        math.pi * lam * df * s2
        - 0.5 * math.pi * cs_mm * 1e7 * lam**3 * s2 * s2
        + math.radians(ps_deg)
        + math.atan(q0 / math.sqrt(1 - q0 * q0))
    )
    return math.sin(chi) * math.exp(-b * s2 / 4)


def test_matches_hand_computation():
    pts = [(0.05, 0.0), (0.0, 0.08), (-0.03, 0.07), (0.11, -0.02), (0.2, 0.15)]
    freqs = torch.tensor(pts, dtype=torch.float64)
    params = [
        (15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, 0.0, 0.0),
        (22000.0, 21500.0, -70.0, 200.0, 2.0, 0.07, 35.0, 80.0),
    ]
    P = np.array(params).T
    got = ctf_2d(freqs, *P[:6], phase_shift_deg=P[6], bfactor=P[7])
    assert got.shape == (2, len(pts)) and got.dtype == torch.float32
    for i, p in enumerate(params):
        for j, (fx, fy) in enumerate(pts):
            assert got[i, j].item() == pytest.approx(_hand_ctf(fx, fy, *p), abs=2e-6)


def test_one_value_worked_out():
    # 300 kV, Cs 2.7 mm, Q0 0.1, df 20000 Å, s = 0.1 1/Å along x:
    # lambda = 0.0196876, chi = pi*lam*2e4*1e-2 - pi/2*2.7e7*lam^3*1e-4 + asin(0.1)
    lam = 12.2643247 / math.sqrt(3e5 * (1 + 0.978466e-6 * 3e5))  # 0.01968762 Å
    assert lam == pytest.approx(0.0196876, abs=1e-7)
    chi = math.pi * lam * 2e4 * 1e-2 - math.pi / 2 * 2.7e7 * lam**3 * 1e-4 + math.asin(0.1)
    got = ctf_2d(torch.tensor([[0.1, 0.0]]), 2e4, 2e4, 0.0, 300.0, 2.7, 0.1)
    assert got.item() == pytest.approx(math.sin(chi), abs=1e-5)


def test_zero_frequency_is_amplitude_contrast():
    # RELION: gamma(0) = -K3 - phase_shift, CTF = -sin(gamma) = sin(atan(Q0/sqrt(1-Q0^2))) = Q0.
    z = torch.zeros(1, 2)
    for q0 in (0.0, 0.07, 0.1, 0.5):
        assert ctf_2d(z, 15000.0, 12000.0, 10.0, 300.0, 2.7, q0).item() == pytest.approx(
            q0, abs=1e-6
        )
    # a 90 degree phase plate turns the zero-frequency value into cos(asin(Q0))
    assert ctf_2d(
        z, 5000.0, 5000.0, 0.0, 300.0, 2.7, 0.1, phase_shift_deg=90.0
    ).item() == pytest.approx(math.sqrt(1 - 0.01), abs=1e-6)


def test_sign_positive_at_low_frequency_for_underfocus():
    # Underfocus (positive defocus): the CTF rises from Q0 towards +1 before its first zero.
    s = torch.linspace(0, 0.02, 11)
    f = torch.stack([s, torch.zeros_like(s)], -1)
    c = ctf_2d(f, 20000.0, 20000.0, 0.0, 300.0, 2.7, 0.1)[0]
    assert (c > 0).all() and (torch.diff(c) > 0).all()


def test_astigmatism_rotates_with_angle():
    g = torch.rand(200, 2, generator=torch.Generator().manual_seed(0)) * 0.3 - 0.15
    a = ctf_2d(g, 18000.0, 15000.0, 25.0, 300.0, 2.7, 0.1)
    b = ctf_2d(g, 15000.0, 18000.0, 115.0, 300.0, 2.7, 0.1)  # swap U/V, add 90 degrees
    assert torch.allclose(a, b, atol=1e-5)
    # defocus U lies along the azimuth: along that direction the CTF is the isotropic dU one
    d = torch.tensor([[math.cos(math.radians(25.0)), math.sin(math.radians(25.0))]]) * 0.07
    iso = ctf_2d(d, 18000.0, 18000.0, 0.0, 300.0, 2.7, 0.1)
    assert ctf_2d(d, 18000.0, 15000.0, 25.0, 300.0, 2.7, 0.1).item() == pytest.approx(
        iso.item(), abs=1e-5
    )
    # and the CTF is even: c(-f) = c(f)
    assert torch.allclose(a, ctf_2d(-g, 18000.0, 15000.0, 25.0, 300.0, 2.7, 0.1), atol=1e-6)


def test_bfactor_envelope():
    g = torch.tensor([[0.0, 0.0], [0.05, 0.05], [0.1, -0.2]])
    a = ctf_2d(g, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1)
    b = ctf_2d(g, 15000.0, 15000.0, 0.0, 300.0, 2.7, 0.1, bfactor=100.0)
    s2 = (g**2).sum(-1)
    assert torch.allclose(b, a * torch.exp(-100.0 * s2 / 4), atol=1e-6)


def test_batched_and_dict():
    g = torch.rand(7, 50, 2, generator=torch.Generator().manual_seed(1)) * 0.2 - 0.1
    ctf = dict(
        defocus_u=np.linspace(1e4, 3e4, 7),
        defocus_v=np.linspace(9e3, 2.9e4, 7),
        defocus_angle=np.arange(7) * 20.0,
        voltage=np.full(7, 300.0),
        cs=np.full(7, 2.7),
        amp_contrast=np.full(7, 0.1),
        phase_shift=np.zeros(7),
        bfactor=np.zeros(7),
    )
    full = ctf_from_dict(ctf, None, g)
    assert full.shape == (7, 50)
    one = ctf_from_dict(ctf, [3], g[3])
    assert torch.allclose(one[0], full[3], atol=1e-6)
