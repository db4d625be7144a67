"""Where image stacks are found: RELION project paths, --datadir, and the missing-stack error.

A RELION project is laid out as RELION writes it: ``PROJECT/Select/job005/particles.star``
naming ``Extract/job012/Movies/mic1.mrcs`` (relative to PROJECT, not to the STAR's folder).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import starfile

from cryorecon import cli
from cryorecon.errors import InputError
from cryorecon.io.particles import read_particles, write_particles
from cryorecon.io.paths import stack_candidates

CTF = dict(
    defocus_u=1.5e4, defocus_v=1.4e4, defocus_angle=30.0, voltage=300.0, cs=2.7, amp_contrast=0.1
)
N, D = 5, 8
STACK = "Extract/job012/Movies/mic1.mrcs"


def _images(seed=0):
    return np.random.default_rng(seed).normal(size=(N, D, D)).astype(np.float32)


@pytest.fixture
def project(tmp_path):
    """PROJECT with the stack under Extract/job012/Movies and the STAR in Select/job005."""
    root = tmp_path / "project"
    src = write_particles(tmp_path / "made" / "p.star", _images(), 2.0, CTF)
    (root / STACK).parent.mkdir(parents=True)
    shutil.move(str(src.with_suffix(".mrcs")), root / STACK)
    blocks = starfile.read(src, always_dict=True)
    names = blocks["particles"]["rlnImageName"].str.split("@").str[0] + "@" + STACK
    blocks["particles"]["rlnImageName"] = names
    star = root / "Select" / "job005" / "particles.star"
    star.parent.mkdir(parents=True)
    starfile.write(blocks, star)
    (tmp_path / "elsewhere").mkdir()
    return root, star


def _cli(argv, monkeypatch, capsys, commands=None):
    if commands:
        monkeypatch.setattr(cli, "COMMANDS", commands)
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_found_from_project_root_with_no_flags(project, monkeypatch):
    root, star = project
    monkeypatch.chdir(root)
    ps = read_particles("Select/job005/particles.star")
    assert ps.stacks[0].resolve() == (root / STACK).resolve()
    np.testing.assert_array_equal(ps.images(np.arange(N)), _images())


def test_found_through_the_parent_folders_from_anywhere(project, monkeypatch):
    root, star = project
    monkeypatch.chdir(root.parent / "elsewhere")
    ps = read_particles(star)  # absolute path; the project root is a parent of the STAR's folder
    assert ps.stacks[0].resolve() == (root / STACK).resolve()
    # the STAR's own folder and Select/ were looked at first
    tried = [os.path.abspath(p) for p in ps.meta["stack_tried"][0]]
    assert tried == [
        os.path.abspath(star.parent / STACK),
        os.path.abspath(root / "Select" / STACK),
        os.path.abspath(root / STACK),
    ]


def test_datadir_when_the_star_is_outside_the_project(project, tmp_path, monkeypatch, capsys):
    root, star = project
    moved = tmp_path / "copies" / "particles.star"
    moved.parent.mkdir()
    shutil.copy(star, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(InputError) as info:
        read_particles(moved)
    msg = str(info.value)
    assert "\n" not in msg and "not found" in msg and STACK in msg and "--datadir" in msg
    # every place it looked, on the one line
    for place in stack_candidates(STACK, moved.parent):
        assert os.path.abspath(place) in msg, place
    ps = read_particles(moved, datadir=root)
    assert ps.stacks[0] == root / STACK
    np.testing.assert_array_equal(ps.images([3]), _images()[[3]])
    rc, out, err = _cli(["info", "--json", moved, "--datadir", root], monkeypatch, capsys, ["info"])
    assert rc == 0 and '"stacks_found": 1' in out
    rc, out, err = _cli(["info", moved], monkeypatch, capsys, ["info"])
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "looked for" in err


def test_datadir_is_tried_first(project, tmp_path):
    """A copy of the stack under --datadir wins over the project's."""
    root, star = project
    other = tmp_path / "other"
    (other / STACK).parent.mkdir(parents=True)
    imgs = write_particles(tmp_path / "o.star", _images(seed=1), 2.0, CTF).with_suffix(".mrcs")
    shutil.move(str(imgs), other / STACK)
    np.testing.assert_array_equal(
        read_particles(star, datadir=other).images([0]), _images(seed=1)[[0]]
    )
    np.testing.assert_array_equal(read_particles(star).images([0]), _images(seed=0)[[0]])


def test_current_folder_is_the_last_resort(project, tmp_path, monkeypatch):
    """A STAR with no project above it finds the stack relative to the current folder."""
    root, star = project
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(star, lone / "particles.star")
    monkeypatch.chdir(root)
    ps = read_particles(lone / "particles.star")
    assert os.path.abspath(ps.stacks[0]) == os.path.abspath(root / STACK)


def test_cryosparc_project_relative_blob_path(tmp_path, monkeypatch):
    """``>J3/imported/x.mrc`` is relative to the cryoSPARC project: found from a job folder
    inside it, or with --datadir."""
    proj = tmp_path / "P1"
    stack = write_particles(tmp_path / "m.star", _images(), 2.0, CTF).with_suffix(".mrcs")
    (proj / "J3" / "imported").mkdir(parents=True)
    shutil.move(str(stack), proj / "J3" / "imported" / "x.mrcs")
    dt = [
        ("blob/path", "S40"),
        ("blob/idx", "<u4"),
        ("blob/shape", "<u4", (2,)),
        ("blob/psize_A", "<f4"),
        ("ctf/df1_A", "<f4"),
        ("ctf/df2_A", "<f4"),
        ("ctf/df_angle_rad", "<f4"),
        ("ctf/accel_kv", "<f4"),
        ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"),
    ]
    cs = np.zeros(N, dtype=dt)
    cs["blob/path"] = b">J3/imported/x.mrcs"
    cs["blob/idx"] = np.arange(N)
    cs["blob/shape"] = D
    cs["blob/psize_A"] = 2.0
    cs["ctf/df1_A"], cs["ctf/df2_A"], cs["ctf/accel_kv"], cs["ctf/cs_mm"] = 1.5e4, 1.4e4, 300, 2.7
    job = proj / "J9" / "sub"
    job.mkdir(parents=True)
    for where in (job, tmp_path):
        with open(where / "particles.cs", "wb") as fh:
            np.save(fh, cs)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(read_particles(job / "particles.cs").images([2]), _images()[[2]])
    with pytest.raises(InputError, match="looked for"):
        read_particles(tmp_path / "particles.cs")
    ps = read_particles(tmp_path / "particles.cs", datadir=proj)
    np.testing.assert_array_equal(ps.images([4]), _images()[[4]])


@pytest.mark.parametrize("command", ["info", "backproject", "reconstruct", "export"])
def test_missing_datadir_is_one_line_exit_2(project, tmp_path, command, monkeypatch, capsys):
    root, star = project
    missing = tmp_path / "no_such_folder"
    target = star
    extra = []
    if command in ("backproject", "reconstruct"):
        extra = ["-o", tmp_path / "out"]
    if command == "export":
        run = tmp_path / "run"
        run.mkdir()
        (run / "run.json").write_text(f'{{"particles": "{star}"}}')
        np.savez(run / "poses.npz", eulers_deg=np.zeros((N, 3)), shifts_A=np.zeros((N, 2)))
        target = run
    before = sorted(p.name for p in tmp_path.rglob("*"))
    argv = [command, target, *extra, "--datadir", missing]
    rc, out, err = _cli(argv, monkeypatch, capsys, [command])
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cryorecon {command}: error: ")
    assert str(missing) in lines[0] and "--datadir" in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
