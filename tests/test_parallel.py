"""Data-parallel runs on torch.distributed (gloo, 2 local CPU ranks by torchrun).

Tolerance: with 2 ranks each minibatch's value and gradient are sums of two partial sums
(all-reduce) instead of one, so float32 rounding differs (~1e-7 relative per step) and grows
over iterations of a non-linear optimisation; after 12 iterations the maps agree to 1e-4 of
their maximum (measured ~1e-6), far below any structural change (the maps of two seeds
differ by ~1).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cryorecon.io.mrc import read_map

FLAGS = [
    "--pose-search",
    "exact",
    "--grid-scale",
    "3",
    "--start-resolution",
    "50",
    "--resolution",
    "40",
    "--minibatch",
    "40",
    "--heldout",
    "20",
    "--heldout-every",
    "4",
    "--patience",
    "100",
    "--checkpoint-every",
    "3",
    "--report-every",
    "0",
    "--seed",
    "0",
    "--no-halves",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(n_ranks: int, star: Path, out: Path, *extra: str) -> list[str]:
    head = (
        [sys.executable, "-m", "cryorecon"]
        if n_ranks == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n_ranks),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_port()),
            "-m",
            "cryorecon",
        ]
    )
    return [*head, "-q", "reconstruct", str(star), "-o", str(out), *FLAGS, *extra]


def _run(n_ranks, star, out, *extra, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", CRYORECON_DIST_TIMEOUT="60")
    p = subprocess.run(
        _cmd(n_ranks, star, out, *extra), capture_output=True, text=True, timeout=timeout, env=env
    )
    assert p.returncode == 0, "\n".join(
        ln for ln in p.stderr.splitlines() if "Error" in ln or "error" in ln
    )[-3000:]
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cryorecon import progress
    from cryorecon.simulate import run_simulation

    progress.configure(quiet=True)
    out = tmp_path_factory.mktemp("par")
    run_simulation(out, n=260, D=24, apix=13.0, snr=0.1, seed=2)
    return out / "particles.star"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_two_ranks_give_the_single_process_map_and_resume(data, tmp_path):
    one, two, part = tmp_path / "one", tmp_path / "two", tmp_path / "part"
    _run(1, data, one, "--max-iters", "12")
    _run(2, data, two, "--max-iters", "12")
    a, b = read_map(one / "volume.mrc")[0], read_map(two / "volume.mrc")[0]
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), np.abs(a - b).max() / np.abs(a).max()
    m1, m2 = _metrics(one), _metrics(two)
    assert [r["iteration"] for r in m2] == list(range(1, 13))
    for r1, r2 in zip(m1, m2):
        assert r2["train_nll"] == pytest.approx(r1["train_nll"], rel=1e-5)
        if r1["heldout_nll"] is not None:
            assert r2["heldout_nll"] == pytest.approx(r1["heldout_nll"], rel=1e-5)
    assert json.loads((two / "run.json").read_text())["ranks"] == 2
    # poses of every visited particle reach rank 0's checkpoint and export
    p1, p2 = np.load(one / "poses.npz"), np.load(two / "poses.npz")
    assert np.array_equal(np.isfinite(p1["max_prob"]), np.isfinite(p2["max_prob"]))

    # stopped at 6 by 2 ranks, resumed by 2 ranks (and another copy by 1 process) to 12
    _run(2, data, part, "--max-iters", "6")
    import shutil

    shutil.copytree(part, tmp_path / "part1")
    _run(2, data, part, "--max-iters", "12", "--resume")
    _run(1, data, tmp_path / "part1", "--max-iters", "12", "--resume")
    for run in (part, tmp_path / "part1"):
        c = read_map(run / "volume.mrc")[0]
        assert np.abs(c - b).max() <= 1e-4 * np.abs(b).max()
        assert [r["iteration"] for r in _metrics(run)] == list(range(1, 13))


def test_a_dying_rank_stops_the_run_and_leaves_a_valid_checkpoint(data, tmp_path):
    import torch

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CRYORECON_DIST_TIMEOUT="30")
    proc = subprocess.Popen(
        _cmd(2, data, out, "--max-iters", "100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (out / "checkpoint.pt").exists():
            time.sleep(0.2)
        assert (out / "checkpoint.pt").exists(), "no checkpoint before the deadline"
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies
        t0 = time.monotonic()
        proc.wait(timeout=120)
        assert time.monotonic() - t0 < 90
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode != 0
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["tau"] >= 3 and state["tau"] % 3 == 0
    # the killed run resumes with 2 ranks from that checkpoint
    tau = int(state["tau"])
    _run(2, data, out, "--max-iters", str(tau + 3), "--resume")
    recs = _metrics(out)
    assert [r["iteration"] for r in recs] == list(range(1, tau + 4))
