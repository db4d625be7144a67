"""RELION STAR reading (3.0, 3.1, 5) and the RELION 3.1 writer.

Expected values are either read independently with ``starfile`` (raw columns, so the test
checks our joins and unit conversions) or copied from the named row of the shared file.
"""

from __future__ import annotations

import pickle
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryorecon.errors import OutputExistsError
from cryorecon.io.particles import read_particles, write_particles

CTF = dict(
    defocus_u=1.5e4, defocus_v=1.4e4, defocus_angle=30.0, voltage=300.0, cs=2.7, amp_contrast=0.1
)


def _raw_stack(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as m:
            return np.asarray(m.data, dtype=np.float32).copy()


# ----------------------------------------------------------------- RELION 3.1
def test_relion31_values_and_images(formats_dir):
    d = formats_dir
    ps = read_particles(d / "relion31.star")
    raw = starfile.read(d / "relion31.star", always_dict=True)
    optics, parts = raw["optics"], raw["particles"]
    assert len(ps) == len(parts) == 5
    assert ps.D == int(optics["rlnImageSize"][0]) == 256
    # The image pixel size is rlnImagePixelSize (2.806); 1.403 in the file is
    # rlnMicrographOriginalPixelSize (the unbinned micrograph), not the particles' pixel size.
    np.testing.assert_allclose(ps.apix, optics["rlnImagePixelSize"][0])
    assert optics["rlnImagePixelSize"][0] == pytest.approx(2.806)
    assert optics["rlnMicrographOriginalPixelSize"][0] == pytest.approx(1.403)
    # Row 1 of data_particles: DefocusU 13108.082418, DefocusAngle -160.39, angles, origins (Å).
    assert ps.ctf["defocus_u"][0] == pytest.approx(13108.082418)
    assert ps.ctf["defocus_angle"][0] == pytest.approx(-160.39)
    np.testing.assert_allclose(ps.angles[0], [-102.30296, 82.318041, 124.706463])
    np.testing.assert_allclose(ps.shifts[0], [0.019324, -0.64686])
    # optics-level CTF values joined onto every particle
    np.testing.assert_allclose(ps.ctf["voltage"], optics["rlnVoltage"][0])
    np.testing.assert_allclose(ps.ctf["cs"], optics["rlnSphericalAberration"][0])
    np.testing.assert_allclose(ps.ctf["amp_contrast"], optics["rlnAmplitudeContrast"][0])
    np.testing.assert_allclose(ps.ctf["defocus_v"], parts["rlnDefocusV"])
    np.testing.assert_allclose(ps.ctf["bfactor"], parts["rlnCtfBfactor"])
    np.testing.assert_allclose(ps.shifts, parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy())
    # images: rlnImageName 000001..000005 (1-based) -> stack slices 0..4
    stack = _raw_stack(d / "relion31.mrcs")
    np.testing.assert_array_equal(ps.slice_index, np.arange(5))
    np.testing.assert_array_equal(ps.images([4, 0, 2]), stack[[4, 0, 2]])
    assert ps.images([1]).dtype == np.float32


def test_relion31_six_optics_groups_join(formats_dir):
    d = formats_dir
    f = d / "relion31.6opticsgroups.star"
    ps = read_particles(f, check_images=False)  # no stacks shipped
    raw = starfile.read(f, always_dict=True)
    optics, parts = raw["optics"], raw["particles"]
    assert len(ps) == len(parts)
    assert sorted(np.unique(ps.optics_group)) == sorted(optics["rlnOpticsGroup"])
    joined = parts[["rlnOpticsGroup"]].merge(optics, on="rlnOpticsGroup", how="left")
    np.testing.assert_allclose(ps.apix, joined["rlnImagePixelSize"])
    np.testing.assert_allclose(ps.ctf["cs"], joined["rlnSphericalAberration"])
    np.testing.assert_allclose(ps.ctf["voltage"], joined["rlnVoltage"])
    assert ps.D == 196  # rlnImageSize of every group
    # group 4 (opticsGroup1) is the one with Cs 2.6 mm; group 5 has 1.24 Å/px
    assert set(ps.ctf["cs"][ps.optics_group == 4]) <= {2.6}
    assert set(ps.apix[ps.optics_group == 5]) <= {1.24}
    assert ps.meta["optics_names"][4] == "opticsGroup1"
    assert not any(p.is_file() for p in ps.stacks)


def test_relion5(formats_dir):
    d = formats_dir
    ps = read_particles(d / "relion5.star", check_images=False)
    assert len(ps) == 17 and ps.D == 448
    np.testing.assert_allclose(ps.apix, 0.89)
    np.testing.assert_allclose(ps.ctf["voltage"], 100.0)
    np.testing.assert_allclose(ps.ctf["cs"], 1.6)
    # first row: Rot 111.508618, Tilt 36.742536, Psi 141.158035, OriginXAngst -3.12578, Y -1.41031
    np.testing.assert_allclose(ps.angles[0], [111.508618, 36.742536, 141.158035])
    np.testing.assert_allclose(ps.shifts[0], [-3.12578, -1.41031])
    assert [p.name for p in ps.stacks] == ["toy_images_a.mrcs", "toy_images_b.mrcs"]
    np.testing.assert_array_equal(ps.slice_index[:3], [0, 1, 2])
    np.testing.assert_array_equal(ps.stack_index[:3], [0, 1, 0])


# ----------------------------------------------------------------- RELION 3.0 vs 3.1
def test_sample_relion30_vs_31(formats_dir):
    d = formats_dir
    p31 = read_particles(d / "sample_particles_relion31.star")
    p30 = read_particles(d / "sample_particles_relion30.star")
    raw30 = starfile.read(d / "sample_particles_relion30.star")
    raw31 = starfile.read(d / "sample_particles_relion31.star", always_dict=True)
    assert len(p30) == len(p31) == 17 and p30.D == p31.D == 200
    # 3.1: two optics groups at different voltages (300 and 200 kV)
    groups = raw31["optics"].set_index("rlnOpticsGroup")
    assert sorted(np.unique(p31.optics_group)) == [1, 2]
    for g in (1, 2):
        np.testing.assert_allclose(
            p31.ctf["voltage"][p31.optics_group == g], groups.loc[g, "rlnVoltage"]
        )
    assert groups.loc[1, "rlnVoltage"] != groups.loc[2, "rlnVoltage"]
    # 3.0 has the voltage per particle; our optics groups split the same particles
    np.testing.assert_allclose(p30.ctf["voltage"], p31.ctf["voltage"])
    assert len(np.unique(p30.optics_group)) == 2
    np.testing.assert_array_equal(
        p30.optics_group == p30.optics_group[0], p31.optics_group == p31.optics_group[0]
    )
    # CTF agrees
    for k in ("defocus_u", "defocus_v", "defocus_angle", "cs", "amp_contrast", "phase_shift"):
        np.testing.assert_allclose(p30.ctf[k], p31.ctf[k], err_msg=k)
    # Pixel size: 3.1 states rlnImagePixelSize; 3.0 gives DetectorPixelSize (µm) * 1e4 /
    # Magnification.
    # NOTE these two sample files do NOT agree: 5 µm / 37369.2 = 1.338 Å vs 1.4 Å.
    np.testing.assert_allclose(p31.apix, 1.4)
    np.testing.assert_allclose(
        p30.apix, raw30["rlnDetectorPixelSize"] * 1e4 / raw30["rlnMagnification"]
    )
    # Shifts in Å: 3.1 copies rlnOriginX/YAngst, 3.0 converts rlnOriginX/Y (pixels) * apix.
    np.testing.assert_allclose(
        p31.shifts, raw31["particles"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    )
    np.testing.assert_allclose(
        p30.shifts, raw30[["rlnOriginX", "rlnOriginY"]].to_numpy() * p30.apix[:, None]
    )
    # Angles agree except particle 14: in the 3.1 file row 000015 repeats row 000014's values.
    keep = np.arange(17) != 14
    np.testing.assert_allclose(p30.angles[keep], p31.angles[keep])
    # same stack, same images
    np.testing.assert_array_equal(p30.images(np.arange(17)), p31.images(np.arange(17)))


def test_legacy_mrc_stack_empiar(formats_dir):
    d = formats_dir
    ps = read_particles(d / "empiar_10076_7.star")
    raw = starfile.read(d / "empiar_10076_7.star")
    assert len(ps) == 7 and ps.D == 320
    np.testing.assert_allclose(ps.apix, raw["rlnDetectorPixelSize"] * 1e4 / raw["rlnMagnification"])
    assert ps.angles is None and ps.shifts is None  # this legacy file carries no poses
    stack = _raw_stack(d / "empiar_10076_7.mrc")  # a .mrc 'volume' of 7 images, indices 1-based
    assert stack.shape == (7, 320, 320)
    np.testing.assert_array_equal(ps.images(np.arange(7)), stack)


def test_origin_in_pixels_in_31_layout(shared_data):
    """rln_proj_64_shifted.star: optics table but rlnOriginX/Y in pixels, 1.0 Å/px."""
    f = shared_data / "relion_projections" / "rln_proj_64_shifted.star"
    if not f.is_file():
        pytest.skip(f"{f} absent")
    ps = read_particles(f, require_ctf=False)
    raw = starfile.read(f, always_dict=True)["particles"]
    assert ps.ctf == {} and ps.D == 64
    np.testing.assert_allclose(ps.shifts, raw[["rlnOriginX", "rlnOriginY"]].to_numpy() * 1.0)
    np.testing.assert_allclose(ps.shifts[0], [6.0, 10.0])


# ----------------------------------------------------------------- writer
def _synthetic(n=12, D=16, seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.normal(size=(n, D, D)).astype(np.float32)
    ctf = {k: np.full(n, v) for k, v in CTF.items()}
    ctf["defocus_u"] = rng.uniform(1e4, 3e4, n)
    ctf["voltage"] = np.where(np.arange(n) < n // 2, 300.0, 200.0)
    ctf["phase_shift"] = rng.uniform(0, 90, n)
    apix = np.full(n, 1.5)
    angles = np.stack(
        [rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], 1
    )
    shifts = rng.uniform(-5, 5, (n, 2))
    return imgs, apix, ctf, angles, shifts


def test_write_read_round_trip(tmp_path):
    imgs, apix, ctf, angles, shifts = _synthetic()
    out = write_particles(tmp_path / "p.star", imgs, apix, ctf, angles, shifts)
    assert out == tmp_path / "p.star"
    raw = starfile.read(out, always_dict=True)
    assert set(raw) == {"optics", "particles"}
    for c in (
        "rlnOpticsGroup",
        "rlnOpticsGroupName",
        "rlnImagePixelSize",
        "rlnImageSize",
        "rlnImageDimensionality",
        "rlnVoltage",
        "rlnSphericalAberration",
        "rlnAmplitudeContrast",
    ):
        assert c in raw["optics"].columns, c
    for c in (
        "rlnImageName",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnPhaseShift",
        "rlnCtfBfactor",
        "rlnOpticsGroup",
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
    ):
        assert c in raw["particles"].columns, c
    assert len(raw["optics"]) == 2  # two voltages -> two optics groups
    assert raw["particles"]["rlnImageName"][0] == "000001@p.mrcs"
    with mrcfile.open(tmp_path / "p.mrcs") as m:
        assert m.voxel_size.x == pytest.approx(1.5)
        assert m.data.shape == imgs.shape
        assert m.header.dmax == pytest.approx(imgs.max())

    ps = read_particles(out)
    assert len(ps) == len(imgs) and ps.D == 16
    np.testing.assert_array_equal(ps.images(np.arange(len(imgs))), imgs)
    np.testing.assert_allclose(ps.apix, apix)
    for k in CTF:
        np.testing.assert_allclose(ps.ctf[k], ctf[k], atol=1e-6, err_msg=k)
    np.testing.assert_allclose(ps.ctf["phase_shift"], ctf["phase_shift"], atol=1e-6)
    np.testing.assert_allclose(ps.angles, angles, atol=1e-6)
    np.testing.assert_allclose(ps.shifts, shifts, atol=1e-6)
    assert sorted(np.unique(ps.optics_group)) == [1, 2]

    # never overwrite unless asked
    with pytest.raises(OutputExistsError):
        write_particles(out, imgs, apix, ctf)
    write_particles(out, imgs[:3], 2.0, CTF, overwrite=True)
    assert len(read_particles(out)) == 3


def test_write_streamed_batches_and_failure_leaves_nothing(tmp_path):
    imgs, apix, ctf, angles, shifts = _synthetic(n=10)
    batches = (imgs[a : a + 3] for a in range(0, 10, 3))
    write_particles(tmp_path / "s.star", batches, apix, ctf, stack_name="s_stack.mrcs")
    ps = read_particles(tmp_path / "s.star")
    np.testing.assert_array_equal(ps.images(np.arange(10)), imgs)
    assert ps.stacks == [tmp_path / "s_stack.mrcs"]

    def broken():
        yield imgs[:4]
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        write_particles(tmp_path / "b.star", broken(), apix, ctf)
    bad = imgs.copy()
    bad[7, 1, 1] = np.nan
    with pytest.raises(ValueError, match="image 7"):
        write_particles(tmp_path / "c.star", bad, apix, ctf)
    with pytest.raises(ValueError):  # too few images for the metadata
        write_particles(tmp_path / "d.star", iter([imgs[:4]]), apix, ctf)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["s.star", "s_stack.mrcs"], left


def test_multi_stack_order_subset_batches_pickle(tmp_path, monkeypatch):
    a = _synthetic(n=5, seed=1)
    b = _synthetic(n=7, seed=2)
    write_particles(tmp_path / "a.star", a[0], a[1], a[2])
    sub = tmp_path / "sub"
    sub.mkdir()
    write_particles(sub / "b.star", b[0], b[1], b[2])
    ra = starfile.read(tmp_path / "a.star", always_dict=True)
    rb = starfile.read(sub / "b.star", always_dict=True)
    rb["particles"]["rlnImageName"] = rb["particles"]["rlnImageName"].str.replace("@", "@sub/")
    # interleave the two stacks; one entry uses an absolute path
    parts = pd.concat([ra["particles"], rb["particles"]], ignore_index=True)
    parts["rlnOpticsGroup"] = 1
    order = np.random.default_rng(3).permutation(len(parts))
    parts = parts.iloc[order].reset_index(drop=True)
    absolute = parts.index[parts["rlnImageName"].str.contains("@sub/")][0]
    num, name = parts.loc[absolute, "rlnImageName"].split("@")
    parts.loc[absolute, "rlnImageName"] = f"{num}@{(tmp_path / name).resolve()}"
    starfile.write({"optics": ra["optics"].iloc[:1], "particles": parts}, tmp_path / "mix.star")
    monkeypatch.chdir(sub)  # paths must resolve relative to the STAR file, not the cwd
    ps = read_particles(tmp_path / "mix.star")
    everything = np.concatenate([a[0], b[0]])[order]
    assert len(ps.stacks) == 3  # a.mrcs, sub/b.mrcs, and the absolute spelling of it
    idx = np.array([11, 0, 5, 3, 3, 8])
    np.testing.assert_array_equal(ps.images(idx), everything[idx])
    got = np.concatenate([im for _, im in ps.iter_batches(5, desc="test")])
    np.testing.assert_array_equal(got, everything)
    s = ps.subset(np.array([2, 9]))
    assert len(s) == 2 and s.D == ps.D
    np.testing.assert_array_equal(s.images([1, 0]), everything[[9, 2]])
    np.testing.assert_allclose(s.ctf["defocus_u"], ps.ctf["defocus_u"][[2, 9]])
    clone = pickle.loads(pickle.dumps(ps))
    np.testing.assert_array_equal(clone.images([4]), everything[[4]])


def test_particle_columns_override_optics(tmp_path):
    imgs, apix, ctf, _, _ = _synthetic(n=4)
    star = write_particles(tmp_path / "o.star", imgs, apix, {**ctf, "voltage": 300.0})
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnVoltage"] = [300.0, 200.0, 300.0, 120.0]  # per-particle wins
    blocks["particles"]["rlnImagePixelSize"] = 1.7
    starfile.write(blocks, tmp_path / "o2.star")
    ps = read_particles(tmp_path / "o2.star", check_images=False)  # 1.7 Å: not the header
    np.testing.assert_allclose(ps.ctf["voltage"], [300.0, 200.0, 300.0, 120.0])
    np.testing.assert_allclose(ps.apix, 1.7)
    np.testing.assert_allclose(
        ps.ctf["cs"], blocks["optics"]["rlnSphericalAberration"][0]
    )  # from optics
