"""Command-level errors (issue 15): bad output paths caught before the work, unknown
devices, a closed stdout pipe, misleading messages, both long spellings of -o, and the
report's status after a run has ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryorecon import cli
from cryorecon.cli import build_parser
from cryorecon.io.mrc import write_map
from cryorecon.io.particles import write_particles

CTF = dict(
    defocus_u=1.5e4, defocus_v=1.4e4, defocus_angle=30.0, voltage=300.0, cs=2.7, amp_contrast=0.1
)


@pytest.fixture
def star(tmp_path) -> Path:
    imgs = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    return write_particles(tmp_path / "p.star", imgs, 4.0, CTF, angles=np.zeros((8, 3)))


@pytest.fixture
def maps(tmp_path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    vol = rng.normal(size=(16, 16, 16)).astype(np.float32)
    write_map(a, vol, 4.0)
    write_map(b, vol + 0.5 * rng.normal(size=vol.shape).astype(np.float32), 4.0)
    return a, b


def _fails(argv, capsys, code, *patterns) -> str:
    rc = cli.main(["-q", *map(str, argv)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for p in patterns:
        assert p in lines[0], (p, lines[0])
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the back-projection starts."""
    import cryorecon.commands.backproject as bp

    def boom(*a, **k):
        raise AssertionError("the back-projection ran before the output was checked")

    monkeypatch.setattr(bp, "wiener_backproject", boom)


def test_backproject_output_under_a_file_fails_before_the_work(star, tmp_path, capsys, no_work):
    (tmp_path / "afile").write_text("x")
    _fails(
        ["backproject", star, "-o", tmp_path / "afile" / "map.mrc"], capsys, 2, "afile is a file"
    )


def test_backproject_force_onto_a_folder(star, tmp_path, capsys, no_work):
    d = tmp_path / "adir"
    d.mkdir()
    (d / "keep.txt").write_text("data")
    _fails(["backproject", star, "-o", d, "--force"], capsys, 2, "is a folder")
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"]
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_backproject_into_a_read_only_folder(star, tmp_path, capsys, no_work):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        _fails(["backproject", star, "-o", d / "map.mrc"], capsys, 2, "permission denied")
    finally:
        d.chmod(0o700)


def test_backproject_existing_output_is_exit_3(star, tmp_path, capsys, no_work):
    out = tmp_path / "map.mrc"
    out.write_text("old")
    _fails(["backproject", star, "-o", out], capsys, 3, "refusing to overwrite")
    assert out.read_text() == "old"


def test_reconstruct_and_simulate_into_a_file(star, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    _fails(["reconstruct", star, "-o", f], capsys, 2, "is a file, not a folder")
    _fails(["simulate", "-o", f, "-n", "2", "--box", "16", "--apix", "24"], capsys, 2, "is a file")
    assert f.read_text() == "x"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_unknown_device_is_one_line(star, maps, tmp_path, capsys, device):
    a, b = maps
    for argv in (
        ["reconstruct", star, "-o", tmp_path / "run"],
        ["backproject", star, "-o", tmp_path / "m.mrc"],
        ["align", a, b],
        ["simulate", "-o", tmp_path / "sim", "-n", "2"],
        ["demo", "-o", tmp_path / "demo", "--quick"],
    ):
        _fails(
            [*argv, "--device", device], capsys, 2, repr(device) if device != "cuda:x" else "device"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc", "b.mrc", "p.mrcs", "p.star"]


def test_fsc_into_a_closed_pipe(maps, tmp_path):
    a, b = maps
    cmd = f"{sys.executable} -m cryorecon fsc {a} {b} -o {tmp_path / 'f'} | head -1"
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("FSC 0.5:") and len(res.stdout.splitlines()) == 1
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert (tmp_path / "f.json").is_file()


def test_binary_file_given_as_star(tmp_path, capsys):
    bad = tmp_path / "stack.star"
    bad.write_bytes(b"\0" * 1024 + np.random.default_rng(0).bytes(4096))
    _fails(["info", bad], capsys, 2, "binary data, not a text STAR file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may read anything")
def test_unreadable_stack_says_permission_denied(star, capsys):
    stack = star.with_suffix(".mrcs")
    stack.chmod(0)
    try:
        msg = _fails(["info", star], capsys, 2, "permission denied")
        assert "corrupt" not in msg
    finally:
        stack.chmod(0o644)


@pytest.mark.parametrize(
    "argv, dest",
    [
        (["reconstruct", "p.star"], "out"),
        (["backproject", "p.star"], "out"),
        (["simulate"], "out"),
        (["fsc", "a.mrc", "b.mrc"], "output"),
        (["align", "a.mrc", "b.mrc"], "output"),
        (["report", "run"], "output"),
    ],
)
def test_both_long_spellings_of_o(argv, dest):
    p = build_parser()
    for flag in ("-o", "--out", "--output"):
        assert getattr(p.parse_args([argv[0], flag, "X", *argv[1:]]), dest) == "X", flag


# ------------------------------------------------------------------------------ report status


def _ended_run(tmp_path: Path, reason: str | None, finished: bool) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    info = {
        "finished": finished,
        "stop_reason": reason,
        "iterations": 3,
        "config": {},
        "box": 16,
        "apix": 4.0,
    }
    (run / "run.json").write_text(json.dumps(info))
    lines = [
        json.dumps(
            {
                "iteration": i,
                "seconds": i * 0.1,
                "omega_star": 0.02,
                "resolution_A": 50.0,
                "epsilon": 2.0,
                "L": 10.0,
                "train_nll": 5.0,
                "heldout_nll": None,
            }
        )
        for i in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.mark.parametrize(
    "reason, finished, expect",
    [
        ("max_iters", False, "stopped after 3 iterations, not converged (at max_iters"),
        ("SIGTERM", False, "at SIGTERM"),
        (None, False, "its process ended without finishing"),
        ("converged", True, "finished (converged)"),
    ],
)
def test_report_of_an_ended_run_is_not_running(tmp_path, reason, finished, expect):
    from cryorecon.report import write_report

    text = write_report(_ended_run(tmp_path, reason, finished)).read_text()
    assert expect in text
    assert "status-running" not in text.split("<main>")[1].split("</section>")[0]
    assert 'http-equiv="refresh"' not in text


def test_report_of_a_live_run_is_running(tmp_path):
    from cryorecon.report import write_report

    run = _ended_run(tmp_path, None, False)
    code = (
        "import time; from cryorecon.runstate import RunLock; "
        f"lock = RunLock({str(run)!r}); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        text = write_report(run).read_text()
    finally:
        proc.kill()
        proc.wait()
    assert "status-running" in text and 'http-equiv="refresh"' in text


def test_equal_maps_give_equal_files(tmp_path):
    import time

    vol = np.random.default_rng(2).normal(size=(8, 8, 8)).astype(np.float32)
    write_map(tmp_path / "a.mrc", vol, 2.0)
    time.sleep(1.1)  # mrcfile's default label holds the time to the second
    write_map(tmp_path / "b.mrc", vol, 2.0)
    assert (tmp_path / "a.mrc").read_bytes() == (tmp_path / "b.mrc").read_bytes()


def test_random_bytes_given_as_cs(tmp_path, capsys):
    bad = tmp_path / "p.cs"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    msg = _fails(["info", bad], capsys, 2, "not a cryoSPARC .cs file")
    assert "pickle" not in msg
