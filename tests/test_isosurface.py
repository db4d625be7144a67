"""Isosurfaces of the report: the level from a molecule's mass encloses its volume, dust is
hidden while the body stays, and the built-in model's mass agrees with its sequence."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryorecon.io.mrc import write_map
from cryorecon.report import plots, write_report


def _ball(D: int, centre, radius: float) -> np.ndarray:
    g = np.arange(D, dtype=np.float32)
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r2 = (x - centre[2]) ** 2 + (y - centre[1]) ** 2 + (z - centre[0]) ** 2
    return np.exp(-r2 / (2.0 * radius**2)).astype(np.float32)


def test_level_from_mass_encloses_the_molecules_volume():
    rng = np.random.default_rng(0)
    noise = 0.01 * rng.standard_normal((32, 32, 32))
    vol = (_ball(32, (16, 16, 16), 5.0) + noise).astype(np.float32)
    apix, mass_da = 4.0, 300e3  # 300 kDa: 363,000 Å^3, 5672 voxels of 64 Å^3
    level = plots.surface_level(vol, mass_da=mass_da, apix=apix)
    n = mass_da * 1.21 / apix**3
    assert plots.enclosed_voxels(mass_da, apix) == pytest.approx(n)
    above = int((vol > level).sum())
    assert abs(above - n) <= 1.5  # the level is a quantile: the count is off by at most a voxel
    assert above * apix**3 == pytest.approx(mass_da * 1.21, rel=1e-3)
    # independent: the n-th largest voxel value is the level (brute force over sorted values)
    desc = np.sort(vol.ravel())[::-1]
    assert desc[int(round(n)) - 2] >= level >= desc[int(round(n)) + 1]
    # without a mass the old rule holds: a fraction of the particle's sphere
    d = 20.0
    lv = plots.surface_level(vol, d, fraction=0.2)
    assert abs(int((vol > lv).sum()) - 0.2 * np.pi * d**3 / 6) <= 1.5


def test_hide_dust_removes_specks_and_keeps_the_body():
    D = 32
    rng = np.random.default_rng(1)
    body = _ball(D, (16, 16, 16), 4.0)
    second = 0.9 * _ball(D, (16, 16, 27), 2.2)  # a real domain: ~25% of the body's voxels
    vol = np.maximum(body, second)
    specks = [(3, 4, 5), (28, 3, 26), (4, 27, 9), (26, 26, 3)]
    for c in specks:
        vol[c] = 1.0  # single-voxel dust
    vol += 0.001 * rng.standard_normal(vol.shape).astype(np.float32)
    level = 0.5
    clean = plots.hide_dust(vol, level)
    for c in specks:
        assert clean[c] < level
    above = vol > level
    speck_mask = np.zeros_like(above)
    for c in specks:
        speck_mask[c] = True
    # every voxel of the body and of the second domain is untouched
    assert np.array_equal(clean[above & ~speck_mask], vol[above & ~speck_mask])
    assert (clean[16, 16, 27] > level) and (clean[16, 16, 16] > level)
    # the drawn surface: with dust hidden no triangle is near a speck; without, some are
    centre = np.array([16, 16, 16])

    def near_specks(tris):
        xyz = tris.reshape(-1, 3)[:, ::-1] + centre  # (x, y, z) about the centre -> [z, y, x]
        return min(np.linalg.norm(xyz - np.array(c), axis=1).min() for c in specks)

    kept = plots.surface(vol, level)
    assert near_specks(kept) > 3.0
    assert near_specks(plots.surface(vol, level, dust=None)) < 1.5
    # nothing to hide: the same array back
    assert plots.hide_dust(body, 0.5) is body


def test_builtin_model_mass_matches_its_sequence():
    import gemmi

    from cryorecon.simulate import _read_structure, model_mass_da

    mass = model_mass_da()
    st, _ = _read_structure(None)
    seq_mass = 0.0
    ligands = 0.0
    for chain in st[0]:
        names = [r.name for r in chain if gemmi.find_tabulated_residue(r.name).is_amino_acid()]
        seq_mass += gemmi.calculate_sequence_weight(names)
        for r in chain:
            if not gemmi.find_tabulated_residue(r.name).is_amino_acid():
                ligands += gemmi.find_tabulated_residue(r.name).weight
    # GroEL14-GroES7 as modelled in 1AON: about 840 kDa of protein plus ADP and Mg
    assert 800e3 < mass < 900e3
    # the atoms modelled: unresolved side-chain atoms (280 in Lys/Glu/Arg/Asp/Gln alone) make
    # the model lighter than its sequence, by well under 1%
    assert 0.99 * (seq_mass + ligands) < mass < seq_mass + ligands


def test_report_level_from_mass(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    apix = 10.0
    vol = _ball(32, (16, 16, 16), 4.0)
    write_map(run / "volume.mrc", vol, apix)
    (run / "run.json").write_text(json.dumps({"finished": True, "apix": apix, "box": 32}))
    text = write_report(run, mass_da=200e3).read_text()
    level = plots.surface_level(vol, mass_da=200e3, apix=apix)
    assert "200 kDa of protein" in text and f"level {level:.6g}" in text
    # from run.json, the hook a run records its mass by
    (run / "run.json").write_text(json.dumps({"finished": True, "apix": apix, "mass_da": 5e5}))
    assert "500 kDa of protein" in write_report(run).read_text()
    (run / "run.json").write_text(json.dumps({"finished": True, "apix": apix}))
    assert "kDa of protein" not in write_report(run).read_text()


@pytest.mark.parametrize("D", [24, 48, 96])  # interpolated x2, as is, block-averaged /2
def test_surface_sits_where_the_density_is(D):
    c = (D // 2 + D // 12, D // 2 - D // 6, D // 2)  # [z, y, x]
    vol = _ball(D, c, D / 10)
    tris = plots.surface(vol, 0.5)
    centre = tris.reshape(-1, 3).mean(axis=0)  # (x, y, z) voxels about the box centre
    want = np.array([c[2], c[1], c[0]], dtype=float) - D // 2
    np.testing.assert_allclose(centre, want, atol=0.05 * D / 10)
    # the ball's radius at level 0.5 of a Gaussian of sigma s: s sqrt(2 ln 2)
    r = np.linalg.norm(tris.reshape(-1, 3) - want, axis=1)
    assert abs(np.median(r) - D / 10 * np.sqrt(2 * np.log(2))) < 0.06 * D / 10 + 0.1


def test_principal_axes_turn_the_long_axis_to_z():
    D = 32
    g = np.arange(D, dtype=np.float32) - D // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    a = np.array([1.0, 2.0, 2.0]) / 3.0  # the long axis, (x, y, z)
    along = x * a[0] + y * a[1] + z * a[2]
    r2 = x**2 + y**2 + z**2
    vol = np.exp(-(r2 - along**2) / (2 * 2.5**2) - along**2 / (2 * 7.0**2))
    vol = vol.astype(np.float32)
    tris = plots.surface(vol, 0.5)
    R = plots.principal_axes(tris)
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(R) == pytest.approx(1.0)
    assert abs(abs(R[2] @ a) - 1) < 1e-3  # the longest axis becomes z
    turned = tris.reshape(-1, 3) @ R.T
    ext = turned.max(axis=0) - turned.min(axis=0)
    assert ext[2] > 2 * ext[0] and ext[2] > 2 * ext[1]
    assert plots.plot_isosurface(vol, 0.5)[:4] == b"\x89PNG"
    assert plots.plot_isosurface(vol, 0.5, orient=False)[:4] == b"\x89PNG"
