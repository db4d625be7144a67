"""Bad particle input: each case is one InputError (one line) naming the file and the particle,
raised through the Python API and, for several, through ``cryorecon info`` (exit code 2)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

from cryorecon import cli
from cryorecon.errors import InputError
from cryorecon.io.particles import read_particles, write_particles

CTF = dict(
    defocus_u=1.5e4, defocus_v=1.4e4, defocus_angle=30.0, voltage=300.0, cs=2.7, amp_contrast=0.1
)
N, D = 4, 8


@pytest.fixture
def good(tmp_path):
    imgs = np.random.default_rng(0).normal(size=(N, D, D)).astype(np.float32)
    star = write_particles(tmp_path / "good.star", imgs, 2.0, CTF)
    return star


def _edit(star, out, fn):
    blocks = starfile.read(star, always_dict=True)
    fn(blocks)
    starfile.write(blocks, out)
    return out


def _raises(path, *patterns, **kw) -> str:
    with pytest.raises(InputError) as info:
        read_particles(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert path.name in msg
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


def _cli(args, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ["info"])  # only this command's module is needed
    rc = cli.main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _cli_fails(path, monkeypatch, capsys, *patterns):
    before = sorted(p.name for p in path.parent.iterdir())
    rc, out, err = _cli([path], monkeypatch, capsys)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cryorecon info: error: ") and path.name in lines[0]
    for p in patterns:
        assert p in lines[0]
    assert sorted(p.name for p in path.parent.iterdir()) == before  # nothing written


def test_missing_stack(good, monkeypatch, capsys):
    bad = _edit(
        good,
        good.parent / "bad.star",
        lambda b: b["particles"].__setitem__(
            "rlnImageName",
            b["particles"]["rlnImageName"].where(b["particles"].index != 2, "000003@missing.mrcs"),
        ),
    )
    _raises(bad, "particle 2", "3@missing.mrcs", "not found")
    # header checks off: the error comes when the images are read
    ps = read_particles(bad, check_images=False)
    ps.images([0, 1])
    with pytest.raises(InputError, match=r"particle 2 \(3@missing.mrcs\).*not found"):
        ps.images([2])
    _cli_fails(bad, monkeypatch, capsys, "missing.mrcs")


def test_index_beyond_stack(good, monkeypatch, capsys):
    bad = _edit(
        good,
        good.parent / "beyond.star",
        lambda b: b["particles"].__setitem__(
            "rlnImageName",
            b["particles"]["rlnImageName"].where(b["particles"].index != 3, f"{N + 5}@good.mrcs"),
        ),
    )
    _raises(bad, "particle 3", f"{N + 5}@good.mrcs", "beyond", f"{N} images")
    ps = read_particles(bad, check_images=False)
    with pytest.raises(InputError, match="particle 3"):
        ps.images([3])
    _cli_fails(bad, monkeypatch, capsys, "beyond")


def test_zero_or_garbage_image_number(good):
    bad = _edit(
        good,
        good.parent / "zero.star",
        lambda b: b["particles"].__setitem__(
            "rlnImageName",
            b["particles"]["rlnImageName"].where(b["particles"].index != 1, "0@good.mrcs"),
        ),
    )
    _raises(bad, "particle 1", "0@good.mrcs")
    bad = _edit(
        good,
        good.parent / "garbage.star",
        lambda b: b["particles"].__setitem__(
            "rlnImageName",
            b["particles"]["rlnImageName"].where(b["particles"].index != 1, "x@good.mrcs"),
        ),
    )
    _raises(bad, "particle 1", "x@good.mrcs")


def test_missing_ctf_columns(good, monkeypatch, capsys):
    def drop(b):
        b["particles"] = b["particles"].drop(columns=["rlnDefocusU"])
        b["optics"] = b["optics"].drop(columns=["rlnSphericalAberration"])

    bad = _edit(good, good.parent / "noctf.star", drop)
    _raises(bad, "rlnDefocusU", "rlnSphericalAberration")
    ps = read_particles(bad, require_ctf=False)
    assert ps.ctf == {} and len(ps) == N
    # info does not need the CTF; it reports it as absent
    rc, out, _ = _cli([bad], monkeypatch, capsys)
    assert rc == 0 and "CTF            absent" in out


def test_non_numeric_ctf_value(good):
    bad = _edit(
        good,
        good.parent / "nonnum.star",
        lambda b: b["particles"].__setitem__(
            "rlnDefocusV",
            b["particles"]["rlnDefocusV"].astype(object).where(b["particles"].index != 2, "abc"),
        ),
    )
    _raises(bad, "particle 2", "rlnDefocusV")


def test_unknown_optics_group(good):
    bad = _edit(
        good,
        good.parent / "og.star",
        lambda b: b["particles"].__setitem__(
            "rlnOpticsGroup", np.where(b["particles"].index == 1, 7, 1)
        ),
    )
    _raises(bad, "particle 1", "rlnOpticsGroup 7")


def test_mixed_box_sizes(good, monkeypatch, capsys):
    other = write_particles(
        good.parent / "other.star", np.zeros((2, D + 2, D + 2), np.float32), 2.0, CTF
    )

    def mix(b):
        o = starfile.read(other, always_dict=True)["particles"]
        b["particles"] = b["particles"].iloc[:2].copy()
        b["particles"].loc[2] = o.iloc[1]
        b["optics"]["rlnImageSize"] = D

    bad = _edit(good, good.parent / "mixed.star", mix)
    _raises(bad, "particle 2", "2@other.mrcs", "mixed box sizes", "other.mrcs")

    def mix_no_size(b):  # without rlnImageSize the stacks themselves disagree
        mix(b)
        b["optics"] = b["optics"].drop(columns=["rlnImageSize"])

    bad2 = _edit(good, good.parent / "mixed2.star", mix_no_size)
    _raises(bad2, "particle 2", "mixed box sizes", "good.mrcs")
    _cli_fails(bad2, monkeypatch, capsys, "mixed box sizes")


def test_non_square(tmp_path, monkeypatch, capsys):
    with mrcfile.new(tmp_path / "rect.mrcs") as m:
        m.set_data(np.zeros((2, D, D + 2), np.float32))
    good = write_particles(tmp_path / "g.star", np.zeros((2, D, D), np.float32), 2.0, CTF)

    def rect(b):
        b["particles"]["rlnImageName"] = ["000001@rect.mrcs", "000002@rect.mrcs"]
        b["optics"] = b["optics"].drop(columns=["rlnImageSize"])

    bad = _edit(good, tmp_path / "rect.star", rect)
    _raises(bad, "particle 0", "non-square", f"{D}x{D + 2}")
    _cli_fails(bad, monkeypatch, capsys, "non-square")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_inf_pixels(tmp_path, value):
    imgs = np.zeros((N, D, D), np.float32)
    good = write_particles(tmp_path / "n.star", imgs, 2.0, CTF)
    with mrcfile.open(tmp_path / "n.mrcs", mode="r+") as m:
        m.data[2, 3, 4] = value
    ps = read_particles(good)  # header-level checks pass; pixels not read
    assert ps.images([0, 1, 3]).shape == (3, D, D)
    with pytest.raises(InputError) as info:
        ps.images([1, 2])
    msg = str(info.value)
    assert "n.star" in msg and "particle 2 (3@n.mrcs)" in msg and "NaN or Inf" in msg
    with pytest.raises(InputError, match="particle 2"):
        list(ps.iter_batches(2))


def test_empty_star(tmp_path, monkeypatch, capsys):
    good = write_particles(tmp_path / "g.star", np.zeros((2, D, D), np.float32), 2.0, CTF)
    empty = _edit(
        good, tmp_path / "empty.star", lambda b: b.__setitem__("particles", b["particles"].iloc[:0])
    )
    _raises(empty, "no particles")
    blank = tmp_path / "blank.star"
    blank.write_text("# nothing here\n")
    _raises(blank, "no particles")
    _cli_fails(empty, monkeypatch, capsys, "no particles")


def test_truncated_mrc(good, monkeypatch, capsys):
    stack = good.parent / "good.mrcs"
    data = stack.read_bytes()
    stack.write_bytes(data[:-100])
    _raises(good, "good.mrcs", "truncated")
    _cli_fails(good, monkeypatch, capsys, "truncated")


@pytest.mark.parametrize("damage", ["mode", "dims", "short", "garbage"])
def test_corrupt_header(good, damage, monkeypatch, capsys):
    stack = good.parent / "good.mrcs"
    data = bytearray(stack.read_bytes())
    if damage == "mode":
        data[12:16] = np.int32(99).tobytes()
    elif damage == "dims":
        data[0:4] = np.int32(-5).tobytes()
    elif damage == "short":
        data = data[:300]
    else:
        data[:1024] = np.random.default_rng(1).integers(0, 256, 1024, dtype=np.uint8).tobytes()
    stack.write_bytes(bytes(data))
    _raises(good, "good.mrcs")
    _cli_fails(good, monkeypatch, capsys, "good.mrcs")


def test_unknown_suffix_and_missing_file(tmp_path, monkeypatch, capsys):
    txt = tmp_path / "particles.txt"
    txt.write_text("1@x.mrcs\n")
    _raises(txt, "unknown particle file type", ".txt")
    _cli_fails(txt, monkeypatch, capsys, "unknown")
    _raises(tmp_path / "absent.star", "no such")
    cs = tmp_path / "junk.cs"
    cs.write_bytes(b"not numpy at all")
    _raises(cs, "cryoSPARC")
