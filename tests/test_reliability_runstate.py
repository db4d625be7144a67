"""Run-folder safety (issue 15): the lock, resume of the same data only, corrupt checkpoints
and torn logs, SIGTERM / SIGINT, and what a resume says about changed options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cryorecon import cli
from cryorecon.io.particles import read_particles, write_particles
from cryorecon.runstate import (
    LOCK_NAME,
    BusyError,
    RunLock,
    bar_total,
    folder_busy,
    particle_fingerprint,
)

FAST = [
    "--grid-scale",
    "3",
    "--start-resolution",
    "80",
    "--resolution",
    "60",
    "--minibatch",
    "50",
    "--heldout",
    "20",
    "--heldout-every",
    "5",
    "--checkpoint-every",
    "2",
    "--report-every",
    "0",
]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    from cryorecon import progress
    from cryorecon.simulate import run_simulation

    progress.configure(quiet=True)
    out = tmp_path_factory.mktemp("sim")
    run_simulation(out, n=200, D=16, apix=24.0, snr=0.1, seed=2)
    return out


@pytest.fixture(scope="module")
def done_run(sim, tmp_path_factory) -> Path:
    """A run stopped at --max-iters 4 (resumable: it did not converge)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert _cli(sim / "particles.star", out, "--max-iters", "4") == 0
    return out


def _cli(star, out, *extra, quiet=True) -> int:
    # (the CLI reconfigures logging, so tests read its messages from stderr, not caplog)
    return cli.main(
        [*(["-q"] if quiet else []), "reconstruct", str(star), "-o", str(out), *FAST, *extra]
    )


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _last_error_line(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [ln for ln in err.strip().splitlines() if ln.strip()]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ------------------------------------------------------------------------------ lock


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed."""
    code = (
        "import sys, time; from cryorecon.runstate import RunLock; "
        f"lock = RunLock({str(folder)!r}); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    return proc


def test_second_run_into_a_busy_folder_is_refused(sim, done_run, tmp_path, capsys):
    run = _copy(done_run, tmp_path / "busy")
    before = _files(run)
    proc = _holder(run)
    try:
        assert folder_busy(run)
        for extra in ([], ["--force"], ["--resume"]):
            assert _cli(sim / "particles.star", run, "--max-iters", "6", *extra) == 3
            lines = _last_error_line(capsys)
            assert len(lines) == 1 and "in use by another cryorecon run" in lines[0]
            assert f"pid {proc.pid}" in lines[0]
            assert _files(run) == {**before, LOCK_NAME: (run / LOCK_NAME).read_bytes()}
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed: its lock is stale, and the next run takes it over
    assert not folder_busy(run)
    assert _cli(sim / "particles.star", run, "--max-iters", "6", "--resume") == 0
    assert [r["iteration"] for r in _metrics(run)] == list(range(1, 7))
    assert not (run / LOCK_NAME).exists()


def test_lock_in_one_process(tmp_path):
    a = RunLock(tmp_path / "new" / "run")
    with pytest.raises(BusyError, match="in use"):
        RunLock(tmp_path / "new" / "run")
    a.release()
    a.release()  # idempotent
    assert not (tmp_path / "new").exists()  # a folder the lock made and nobody used goes again
    b = RunLock(tmp_path / "x")
    (tmp_path / "x" / "volume.mrc").write_text("")
    b.release()
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["volume.mrc"]


def test_lock_released_when_its_owner_is_gone(tmp_path):
    class Owner:
        pass

    o = Owner()
    RunLock(tmp_path, owner=o)
    assert folder_busy(tmp_path)
    del o
    assert not folder_busy(tmp_path) and not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------ fingerprint


def test_resume_with_another_particle_set_is_refused(sim, done_run, tmp_path, capsys):
    run = _copy(done_run, tmp_path / "run")
    before = _files(run)
    ps = read_particles(sim / "particles.star")
    imgs = ps.images(None)
    other = {
        "fewer": (imgs[:150], slice(0, 150)),
        "more": (np.concatenate([imgs, imgs[:50]]), None),
        "same count": (imgs[::-1].copy(), slice(None, None, -1)),
    }
    for name, (im, sel) in other.items():
        star = tmp_path / f"{name.replace(' ', '_')}.star"
        if sel is None:
            idx = np.concatenate([np.arange(200), np.arange(50)])
        else:
            idx = np.arange(200)[sel]
        write_particles(
            star,
            im,
            ps.apix[idx],
            {k: v[idx] for k, v in ps.ctf.items()},
            angles=ps.angles[idx],
            shifts=ps.shifts[idx],
        )
        assert _cli(star, run, "--max-iters", "6", "--resume") == 2, name
        lines = _last_error_line(capsys)
        assert len(lines) == 1 and "not the particle set of the checkpoint" in lines[0], lines
        assert _files(run) == before
    assert "150 particles, the checkpoint's run had 200" in _fp_message(tmp_path, run, "fewer")


def _fp_message(tmp_path, run, name) -> str:
    from cryorecon.errors import InputError
    from cryorecon.runstate import load_checkpoint

    with pytest.raises(InputError) as info:
        load_checkpoint(run / "checkpoint.pt", read_particles(tmp_path / f"{name}.star"))
    return str(info.value)


def test_fingerprint_sees_count_stacks_and_content(sim):
    ps = read_particles(sim / "particles.star")
    fp = particle_fingerprint(ps)
    assert fp["count"] == 200 and fp["stacks"] == ["particles.mrcs"] and fp["stack_bytes"][0] > 0
    assert particle_fingerprint(read_particles(sim / "particles.star")) == fp
    assert particle_fingerprint(ps.subset(np.arange(199)))["digest"] != fp["digest"]
    ps.ctf["defocus_u"] = ps.ctf["defocus_u"] + 1.0
    assert particle_fingerprint(ps)["digest"] != fp["digest"]


def test_resume_says_which_changed_options_it_applies_and_ignores(sim, done_run, tmp_path, capsys):
    run = _copy(done_run, tmp_path / "run")
    assert (
        _cli(
            sim / "particles.star",
            run,
            "--max-iters",
            "5",
            "--resume",
            "--seed",
            "7",
            "--minibatch",
            "40",
            quiet=False,
        )
        == 0
    )
    text = capsys.readouterr().err
    assert "resume applies: --max-iters 5 (checkpoint: 4)" in text
    assert "resume ignores changed options" in text and "--seed 7 (checkpoint: 0)" in text
    assert "--minibatch 40 (checkpoint: 50)" in text
    assert json.loads((run / "run.json").read_text())["config"]["seed"] == 0


def test_resume_at_its_limit_says_why_nothing_happens(sim, done_run, tmp_path, capsys):
    run = _copy(done_run, tmp_path / "run")
    assert _cli(sim / "particles.star", run, "--max-iters", "4", "--resume") == 0
    err = capsys.readouterr().err
    assert "nothing to do" in err and "larger --max-iters" in err


# ------------------------------------------------------------------------------ corrupt files


@pytest.mark.parametrize("damage", ["random", "half", "empty", "not a dict"])
def test_corrupt_checkpoint_is_one_line(sim, done_run, tmp_path, capsys, damage):
    run = _copy(done_run, tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if damage == "random":
        ckpt.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "half":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    else:
        torch.save([1, 2, 3], ckpt)
    before = _files(run)
    assert _cli(sim / "particles.star", run, "--max-iters", "6", "--resume") == 2
    lines = _last_error_line(capsys)
    assert len(lines) == 1 and "checkpoint.pt" in lines[0] and "--force" in lines[0], lines
    assert _files(run) == before


def test_torn_metrics_line_is_repaired_on_resume(sim, done_run, tmp_path, capsys):
    run = _copy(done_run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 5, "seco')
    assert _cli(sim / "particles.star", run, "--max-iters", "6", "--resume") == 0
    assert "dropped 1 unreadable line(s) (line 5" in capsys.readouterr().err
    assert [r["iteration"] for r in _metrics(run)] == list(range(1, 7))


# ------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_says_how_to_resume(sim, tmp_path, sig):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "cryorecon",
        "-q",
        "reconstruct",
        str(sim / "particles.star"),
        "-o",
        str(out),
        *FAST,
        "--max-iters",
        "500",
        "--checkpoint-every",
        "100",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if m.exists() and sum(1 for ln in m.read_text().splitlines() if ln.strip()) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert "--resume" in err and signal.Signals(sig).name in err
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    recs = _metrics(out)
    # nothing lost: the checkpoint is at the last logged iteration (not the last multiple of 100)
    assert int(state["tau"]) == recs[-1]["iteration"] >= 3
    info = json.loads((out / "run.json").read_text())
    assert info["stop_reason"] == signal.Signals(sig).name and info["finished"] is False
    assert not (out / LOCK_NAME).exists()
    # and it resumes from there
    assert (
        _cli(sim / "particles.star", out, "--max-iters", str(int(state["tau"]) + 1), "--resume")
        == 0
    )
    assert [r["iteration"] for r in _metrics(out)] == list(range(1, int(state["tau"]) + 2))


def test_progress_total_respects_max_time():
    assert bar_total(0, 0.0, 5000, 60.0) == 5000
    assert bar_total(10, 10.0, 5000, None) == 5000
    assert bar_total(10, 10.0, 5000, 60.0) == 61  # 1 s an iteration, 50 s left
    assert bar_total(10, 10.0, 20, 60.0) == 20
    assert bar_total(10, 70.0, 5000, 60.0) == 11


def test_heldout_set_cut_is_said(sim, tmp_path, capsys):
    assert (
        _cli(sim / "particles.star", tmp_path / "run", "--max-iters", "1", "--heldout", "50") == 0
    )
    assert "holding out 20 particles, not the 50 asked for" in capsys.readouterr().err


def test_lock_without_flock_falls_back_to_the_pid(tmp_path, monkeypatch):
    import errno
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / LOCK_NAME).write_text(
            json.dumps({"pid": sleeper.pid, "host": socket.gethostname()})
        )
        with pytest.raises(BusyError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path)
        assert folder_busy(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not folder_busy(tmp_path)  # its process is gone: stale
    lock = RunLock(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_second_interrupt_stops_at_once_and_keeps_the_checkpoint(sim, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cryorecon", "-q", "reconstruct", str(sim / "particles.star")]
    cmd += ["-o", str(out), *FAST, "--max-iters", "500"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            m = out / "metrics.jsonl"
            if (out / "checkpoint.pt").exists() and m.exists() and m.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        # the second signal once the first has been handled: two signals that arrive while
        # the process is inside one C call (a torch op, a figure) are delivered as one
        seen = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline().decode()
            seen.append(line)
            if not line or "finishing this iteration" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(seen) + err.decode()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    tau = int(state["tau"])
    assert tau >= 2
    assert not folder_busy(out)
    assert _cli(sim / "particles.star", out, "--max-iters", str(tau + 1), "--resume") == 0


def test_a_second_interrupt_swallowed_in_a_callback_is_not_lost(capsys):
    """Python swallows a KeyboardInterrupt raised while a weakref callback runs (matplotlib
    makes many while the report is drawn); SignalStop raises it again at restore()."""
    import weakref

    from cryorecon.runstate import SignalStop

    stop = SignalStop()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # let the handler run
            if stop.reason:
                break
            time.sleep(0.001)
        assert stop.reason == "SIGINT"

        class Thing:
            pass

        def callback(_):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100000):  # the handler runs in here; its exception is swallowed
                pass

        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing
        assert ref() is None
    except KeyboardInterrupt:  # pragma: no cover - delivered outside the callback after all
        stop.restore()
        return
    with pytest.raises(KeyboardInterrupt):
        stop.restore()
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
