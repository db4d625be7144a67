"""Bad values in particle files (issue 15): CTF parameters out of range, pixel sizes that
disagree with the stack header or with each other, and blank images. Each is a one-line
error with exit 2, or for blank images a warning naming how many, with those excluded and
the map otherwise the same."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from cryorecon import cli
from cryorecon.errors import InputError
from cryorecon.io.checks import check_ctf_values, exclude_blank, single_pixel_size
from cryorecon.io.mrc import read_map
from cryorecon.io.particles import read_particles, write_particles

CTF = dict(
    defocus_u=1.5e4, defocus_v=1.4e4, defocus_angle=30.0, voltage=300.0, cs=2.7, amp_contrast=0.1
)
N, D, APIX = 6, 16, 4.0


@pytest.fixture
def good(tmp_path):
    imgs = np.random.default_rng(0).normal(size=(N, D, D)).astype(np.float32)
    return write_particles(tmp_path / "good.star", imgs, APIX, CTF, angles=np.zeros((N, 3)))


def _edit(star, name, fn):
    blocks = starfile.read(star, always_dict=True)
    fn(blocks)
    out = star.parent / name
    starfile.write(blocks, out)
    return out


def _one_line_error(argv, capsys, *patterns) -> str:
    rc = cli.main(["-q", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    "table, label, value, expect",
    [
        ("optics", "rlnVoltage", 0.0, "rlnVoltage"),
        ("optics", "rlnVoltage", -300.0, "rlnVoltage"),
        ("optics", "rlnAmplitudeContrast", 1.0, "rlnAmplitudeContrast"),
        ("optics", "rlnAmplitudeContrast", -0.1, "rlnAmplitudeContrast"),
        ("particles", "rlnDefocusU", -1.5e4, "rlnDefocusU"),
        ("particles", "rlnDefocusV", -1.0, "rlnDefocusV"),
    ],
)
def test_out_of_range_ctf_is_an_error_when_read(good, capsys, table, label, value, expect):
    bad = _edit(good, "bad.star", lambda b: b[table].__setitem__(label, value))
    with pytest.raises(InputError) as info:
        read_particles(bad)
    msg = str(info.value)
    assert "\n" not in msg and "bad.star" in msg and expect in msg and f"{value:g}" in msg
    assert f"{N} of {N} particles" in msg
    # the commands that use the CTF stop with exit 2 before writing anything
    out = good.parent / "map.mrc"
    _one_line_error(["backproject", bad, "-o", out], capsys, expect)
    assert not out.exists()


def test_valid_edge_values_pass(good):
    ok = _edit(
        good,
        "ok.star",
        lambda b: (
            b["optics"].__setitem__("rlnAmplitudeContrast", 0.0),
            b["particles"].__setitem__("rlnDefocusU", 0.0),
        ),
    )
    assert read_particles(ok).ctf["amp_contrast"][0] == 0.0


def test_one_bad_particle_is_named(good):
    def one(b):
        d = b["particles"]["rlnDefocusU"].to_numpy().copy()
        d[3] = -20.0
        b["particles"]["rlnDefocusU"] = d

    with pytest.raises(InputError, match=r"particle 3 \(4@good.mrcs\).*-20.*1 of 6 particles"):
        read_particles(_edit(good, "one.star", one))


def test_non_finite_ctf_in_a_particle_set(good):
    ps = read_particles(good)
    ps.ctf["cs"] = ps.ctf["cs"].copy()
    ps.ctf["cs"][2] = np.inf
    with pytest.raises(InputError, match=r"particle 2 .*cs is inf"):
        check_ctf_values(ps)


def _set_header_voxel(stack, value):
    with mrcfile.open(stack, mode="r+") as m:
        m.voxel_size = value


def test_pixel_size_disagreeing_with_the_header(good, capsys):
    _set_header_voxel(good.with_suffix(".mrcs"), 9.0)
    with pytest.raises(InputError) as info:
        read_particles(good)
    msg = str(info.value)
    assert "4 Å in the metadata" in msg and "9 Å in the header" in msg and "good.mrcs" in msg
    _one_line_error(["info", good], capsys, "9 Å in the header")
    # within the tolerance, and headers that do not state a size (0 or 1), pass
    for v in (4.01, 0.0, 1.0):
        _set_header_voxel(good.with_suffix(".mrcs"), v)
        assert read_particles(good).apix[0] == pytest.approx(APIX)


def test_per_particle_pixel_sizes_that_differ(good, capsys):
    def two(b):
        b["particles"]["rlnImagePixelSize"] = [4.0, 8.0] * (N // 2)

    mixed = _edit(good, "mixed.star", two)
    _set_header_voxel(good.with_suffix(".mrcs"), 0.0)
    ps = read_particles(mixed)
    with pytest.raises(
        InputError, match=r"different pixel sizes: 4 Å \(3\), 8 Å \(3\).*separately"
    ):
        single_pixel_size(ps)
    out = good.parent / "m.mrc"
    _one_line_error(["backproject", mixed, "-o", out], capsys, "different pixel sizes")
    assert not out.exists()
    assert single_pixel_size(read_particles(good)) == APIX


# ------------------------------------------------------------------------------ blank images


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from cryorecon import progress
    from cryorecon.simulate import run_simulation

    progress.configure(quiet=True)
    out = tmp_path_factory.mktemp("sim")
    run_simulation(out, n=200, D=16, apix=24.0, snr=1.0, seed=3)
    return out


def _blank_copy(sim, tmp_path, rows, value=0.0):
    """A copy of the simulated set whose images ``rows`` have every pixel ``value``."""
    star = tmp_path / "blank.star"
    ps = read_particles(sim / "particles.star")
    imgs = ps.images(None)
    imgs[rows] = value
    write_particles(star, imgs, ps.apix, ps.ctf, angles=ps.angles, shifts=ps.shifts)
    return star


def test_blank_images_are_excluded_and_the_map_is_unchanged(sim, tmp_path, capsys):
    from cryorecon.backproject import wiener_backproject

    rows = np.arange(5, 200, 20)  # 10 of 200
    star = _blank_copy(sim, tmp_path, rows)
    out = tmp_path / "map.mrc"
    assert cli.main(["backproject", str(star), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "excluding 10 of 200 particles with blank images" in err and "6@blank.mrcs" in err
    vol, _ = read_map(out)
    # the same as the back-projection of the 190 good particles alone
    keep = np.setdiff1d(np.arange(200), rows)
    ref = wiener_backproject(read_particles(sim / "particles.star").subset(keep)).numpy()
    np.testing.assert_allclose(vol, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    # and close to the map of all 200 (a blank image does not scale the map by 1e-11)
    full = wiener_backproject(read_particles(sim / "particles.star")).numpy()
    assert np.corrcoef(vol.ravel(), full.ravel())[0, 1] > 0.95
    assert 0.5 < np.abs(vol).max() / np.abs(full).max() < 2


def test_only_blank_images_is_an_error(sim, tmp_path, capsys):
    star = _blank_copy(sim, tmp_path, np.arange(200))
    out = tmp_path / "map.mrc"
    _one_line_error(["backproject", star, "-o", out], capsys, "all 200 images are blank")
    assert not out.exists()
    _one_line_error(
        ["reconstruct", star, "-o", tmp_path / "run"], capsys, "all 200 images are blank"
    )
    assert not (tmp_path / "run").exists()


def test_constant_nonzero_images_are_blank_too(sim, tmp_path, caplog):
    ps = read_particles(sim / "particles.star")
    assert exclude_blank(ps) is ps  # the simulated set has none
    sub = exclude_blank(read_particles(_blank_copy(sim, tmp_path, [0, 1, 199], value=7.5)))
    assert len(sub) == 197
    np.testing.assert_array_equal(sub.slice_index, np.arange(2, 199))
    assert "excluding 3 of 200 particles" in caplog.text
