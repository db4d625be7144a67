"""Tests for cryorecon.optim.schedules (paper Sec. 3.3.2, 3.4.1, 4.2)."""

import math

import pytest

from cryorecon.optim.schedules import (
    Schedule,
    epsilon,
    importance_alpha,
    importance_temperature,
    omega_star,
)


@pytest.mark.parametrize(
    "tau, expected",
    [
        (0, 0.02),
        (149, 0.02),
        (150, 0.025),
        (299, 0.025),
        (300, 0.03),
        (1500, 0.07),
        (2550, 0.105),
        (2700, 0.11),
        (2850, 0.11),
        (10**6, 0.11),
    ],
)
def test_omega_star_values(tau, expected):
    # min(0.11, 0.02 + 0.005 floor(tau/150))
    assert omega_star(tau) == pytest.approx(expected)


def test_omega_star_caps_and_monotone():
    vals = [omega_star(t) for t in range(0, 4000, 7)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert max(vals) == pytest.approx(0.11)
    # Nyquist cap: apix 5.6 A -> 1/11.2 = 0.0893
    assert omega_star(10**6, nyquist=1 / 11.2) == pytest.approx(1 / 11.2)
    assert omega_star(0, nyquist=1 / 11.2) == pytest.approx(0.02)
    assert omega_star(10**6, max_=1 / 20) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "tau, expected",
    [
        (0, 2.0),
        (149, 2.0),
        (150, 1.0),
        (300, 0.5),
        (450, 0.25),
        (600, 0.125),
        (750, 1 / 16),
        (900, 1 / 16),
        (10**5, 1 / 16),
    ],
)
def test_epsilon_values(tau, expected):
    # max(1/16, 2^(1 - floor(tau/150)))
    assert epsilon(tau) == pytest.approx(expected)


def test_epsilon_monotone():
    vals = [epsilon(t) for t in range(0, 2000, 13)]
    assert all(b <= a for a, b in zip(vals, vals[1:]))
    assert min(vals) == 1 / 16


@pytest.mark.parametrize(
    "tau, expected",
    [
        (0, 1.0),
        (49, 1.0),
        (50, 2**-0.25),
        (100, 2**-0.5),
        (200, 0.5),
        (400, 0.25),
        (800, 2**-4),
        (850, 2**-4.25),
        (900, 0.05),
        (10**5, 0.05),
    ],
)
def test_importance_alpha_values(tau, expected):
    # max(0.05, 2^(-0.25 floor(tau/50))); 2^-4 = 0.0625 > 0.05, 2^-4.25 = 0.0526, 2^-4.5 = 0.044
    assert importance_alpha(tau) == pytest.approx(expected)


def test_importance_alpha_monotone_and_floor():
    vals = [importance_alpha(t) for t in range(0, 3000, 11)]
    assert all(b <= a for a, b in zip(vals, vals[1:]))
    assert vals[0] == 1.0 and min(vals) == 0.05


@pytest.mark.parametrize(
    "tau, expected",
    [
        (50, 1024.0),
        (100, 32.0),
        (150, 2 ** (10 / 3)),
        (250, 4.0),
        (500, 2.0),
        (1000, 2**0.5),
        (1550, 2 ** (10 / 31)),
        (1600, 1.25),
        (10**5, 1.25),
    ],
)
def test_importance_temperature_values(tau, expected):
    # max(1.25, 2^(10/floor(tau/50))); 2^(10/31) = 1.2506 > 1.25, 2^(10/32) = 1.2418 < 1.25
    assert importance_temperature(tau) == pytest.approx(expected)


def test_importance_temperature_at_zero_and_monotone():
    assert importance_temperature(0) == math.inf
    assert importance_temperature(49) == math.inf
    vals = [importance_temperature(t) for t in range(50, 3000, 11)]
    assert all(b <= a for a, b in zip(vals, vals[1:]))
    assert min(vals) == 1.25


def test_schedule_dataclass():
    s = Schedule()
    for t in (0, 151, 777, 5000):
        assert s.omega_star(t) == omega_star(t)
        assert s.epsilon(t) == epsilon(t)
        assert s.alpha(t) == importance_alpha(t)
        assert s.temperature(t) == importance_temperature(t)
    assert s.final_omega_tau() == 18 * 150
    assert s.omega_star(s.final_omega_tau()) == pytest.approx(0.11)
    assert s.omega_star(s.final_omega_tau() - 1) < 0.11

    s20 = Schedule.with_max_resolution(20.0)
    assert s20.omega_max == pytest.approx(0.05)
    assert s20.omega_star(10**6) == pytest.approx(0.05)
    assert s20.final_omega_tau() == 6 * 150

    sn = Schedule(apix=5.6)
    assert sn.nyquist == pytest.approx(1 / 11.2)
    assert sn.omega_star(10**6) == pytest.approx(1 / 11.2)

    custom = Schedule(omega_start=0.03, omega_step=0.01, omega_every=10, omega_max=0.06)
    assert [custom.omega_star(t) for t in (0, 10, 25, 30, 100)] == pytest.approx(
        [0.03, 0.04, 0.05, 0.06, 0.06]
    )
    with pytest.raises(ValueError):
        Schedule(apix=-1.0)
