"""The safety of a run folder: one run at a time, resumes of the same data only, readable
checkpoints and logs, and a checkpoint on SIGTERM / SIGINT.

- :class:`RunLock`: ``OUT/.cryorecon.lock``, held with ``flock`` for the life of a run. The
  kernel drops the lock when its process dies, so a lock left by a killed run (its pid gone)
  is taken over; a live holder keeps a second run out, ``--force`` included.
- :func:`particle_fingerprint`: what identifies a particle set (count, stack names and
  sizes, a digest of the per-particle metadata); stored in the checkpoint and compared on
  ``--resume`` by :func:`load_checkpoint`, which also turns an unreadable checkpoint into
  one line and reports which changed options a resume applies and which it ignores.
- :func:`trim_metrics`: the metrics log cut back to the checkpoint's iteration, dropping a
  torn (half-written) line with a warning.
- :class:`SignalStop`: SIGTERM / SIGINT set a flag the driver checks after each iteration,
  so the run checkpoints and stops cleanly; a second signal stops at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np

from .errors import CryoreconError, InputError
from .progress import log

LOCK_NAME = ".cryorecon.lock"

#: Keys every checkpoint must hold (those :meth:`cryorecon.reconstruct.Run._load` reads).
CHECKPOINT_KEYS = (
    "V",
    "sagd",
    "tau",
    "elapsed",
    "gen",
    "order",
    "heldout_state",
    "resolution",
    "config",
    "prior_state",
    "best_R",
    "best_t",
    "max_prob",
)


class BusyError(CryoreconError):
    """The run folder is in use by another live run."""

    exit_code = 3


# --------------------------------------------------------------------------- lock
def _flock(fd: int, exclusive: bool, path: Path) -> bool:
    """Try a non-blocking ``flock`` on ``fd``; False if another holder has it. Where the file
    system cannot lock (some network mounts) the pid written in ``path`` decides instead."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return not _holder_alive(path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return not _holder_alive(path)


def _holder_alive(path: Path) -> bool:
    """Whether the process named in a lock file still runs (another host's: assumed so)."""
    try:
        info = json.loads(path.read_text() or "{}")
        pid, host = int(info["pid"]), info.get("host")
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if pid == os.getpid():
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when}"


def _release(path: Path, fh, made: list[Path]) -> None:
    try:
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
            os.unlink(path)
    except OSError:
        pass
    fh.close()
    for d in made:  # folders the lock created, innermost first, removed only while empty
        try:
            d.rmdir()
        except OSError:
            break


class RunLock:
    """An exclusive lock on a run folder (created if missing), released by :meth:`release`,
    when ``owner`` is garbage-collected, or at exit; the kernel releases it if the process
    dies."""

    def __init__(self, folder, owner=None):
        self.path = Path(folder) / LOCK_NAME
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder; choose another -o/--out")
        made = []
        if not folder.exists():
            made = [folder]
            while not made[-1].parent.exists():
                made.append(made[-1].parent)
            try:
                folder.mkdir(parents=True)
            except OSError as exc:
                raise InputError(
                    f"{folder}: cannot create the run folder ({exc.strerror})"
                ) from exc
        while True:
            try:
                fh = open(self.path, "a+")
            except OSError as exc:
                raise InputError(
                    f"{folder}: cannot write in the run folder ({exc.strerror})"
                ) from exc
            if not _flock(fh.fileno(), True, self.path):
                who = _describe_holder(self.path)
                fh.close()
                raise BusyError(
                    f"{folder} is in use by another cryorecon run ({who}); wait for it "
                    f"to end or stop it, or choose another -o/--out (if no run uses it, "
                    f"delete {self.path})"
                )
            # A holder releasing the lock meanwhile may have unlinked the file: retry on a new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        old = fh.read().strip()
        if old:
            log.info(
                f"{folder}: taking over the lock of a run that is no longer running "
                f"({_describe_holder(self.path)})"
            )
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        )
        fh.flush()
        self._fh = fh
        self._finalizer = weakref.finalize(
            owner if owner is not None else self, _release, self.path, fh, made
        )

    def release(self) -> None:
        """Give the folder up (idempotent)."""
        self._finalizer()


def folder_busy(folder) -> bool:
    """True if a live process (this one included) holds ``folder``'s run lock."""
    path = Path(folder) / LOCK_NAME
    try:
        fh = open(path)
    except OSError:
        return False
    try:
        return not _flock(fh.fileno(), False, path)
    finally:
        fh.close()


# --------------------------------------------------------------------------- fingerprint
def particle_fingerprint(ps) -> dict:
    """What identifies a particle set: ``count``, ``source`` (the file's name), ``stacks``
    (names as written in the file) with their ``stack_bytes``, ``box`` (pixels, as read:
    ``--downsample``), and ``digest`` (SHA-256 of which images are used, pixel sizes and CTF
    parameters)."""
    h = hashlib.sha256()
    h.update("\0".join(ps.stack_names).encode())
    for a in (ps.stack_index, ps.slice_index, ps.apix):
        h.update(np.ascontiguousarray(a).tobytes())
    for k in sorted(ps.ctf):
        h.update(k.encode())
        h.update(np.ascontiguousarray(np.asarray(ps.ctf[k], dtype=np.float64)).tobytes())
    sizes = []
    for s in ps.stacks:
        try:
            sizes.append(int(Path(s).stat().st_size))
        except OSError:
            sizes.append(-1)
    return {
        "count": len(ps),
        "source": Path(ps.source).name,
        "stacks": list(ps.stack_names),
        "stack_bytes": sizes,
        "box": int(ps.D),
        "digest": h.hexdigest(),
    }


def fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty if the same set)."""
    out = []
    if saved["count"] != now["count"]:
        out.append(f"{now['count']} particles, the checkpoint's run had {saved['count']}")
    if saved["stacks"] != now["stacks"]:
        out.append("other image stacks")
    elif saved["stack_bytes"] != now["stack_bytes"]:
        changed = [
            n for n, a, b in zip(now["stacks"], saved["stack_bytes"], now["stack_bytes"]) if a != b
        ]
        out.append(
            f"stack {changed[0]} changed size"
            + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
        )
    if saved.get("box", now["box"]) != now["box"]:  # checkpoints before the box: digest
        out.append(
            f"images read at box {now['box']}, the checkpoint's run read them at "
            f"{saved['box']} (--downsample)"
        )
    if not out and saved["digest"] != now["digest"]:
        out.append("other images or CTF parameters")
    return out


# --------------------------------------------------------------------------- checkpoint
def read_checkpoint(path) -> dict:
    """``torch.load`` of a checkpoint, or one InputError line saying it is unreadable."""
    import torch

    path = Path(path)
    hint = f"start over with --force, or restore {path.name} from a backup"
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty checkpoint (0 bytes); {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - pickle and zip raise many kinds
        what = " ".join(str(exc).split())[:160]
        raise InputError(
            f"{path}: corrupt or truncated checkpoint ({size} bytes: {what}); {hint}"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        raise InputError(
            f"{path}: not a cryorecon checkpoint (lacks {', '.join(missing[:4])}); {hint}"
        )
    return state


def _fmt_option(k: str, v) -> str:
    return f"--{k.replace('_', '-')} {v}"


def resume_option_changes(
    saved: dict, requested: dict, defaults: dict, overrides
) -> tuple[list, list]:
    """(applied, ignored): options that differ between the checkpoint and this request, as
    ``--name new (checkpoint: old)`` strings. ``overrides`` are applied on resume; any other
    option the user changed from its default is ignored (the checkpoint's value is kept)."""
    applied, ignored = [], []
    for k, new in requested.items():
        if k not in saved or saved[k] == new:
            continue
        text = f"{_fmt_option(k, new)} (checkpoint: {saved[k]})"
        if k in overrides:
            applied.append(text)
        elif new != defaults.get(k):
            ignored.append(text)
    return applied, ignored


def load_checkpoint(path, particles, requested=None, overrides=()) -> dict:
    """Read ``path`` for ``--resume``: readable (:func:`read_checkpoint`), of the same particle
    set (InputError naming what differs), and, with ``requested`` (a ReconstructConfig), a log
    line each for the changed options the resume applies and those it ignores."""
    from dataclasses import asdict

    state = read_checkpoint(path)
    fp = state.get("fingerprint")
    if fp is None:
        log.warning(
            f"warning: {path} predates particle fingerprints; cannot check that "
            f"{particles.source} is the set it was made from"
        )
    else:
        diff = fingerprint_differences(fp, particle_fingerprint(particles))
        if diff:
            raise InputError(
                f"{particles.source}: not the particle set of the checkpoint in "
                f"{Path(path).parent} ({fp['source']}: {'; '.join(diff)}); resume with "
                "the same file, or start a new run with --force or another -o/--out"
            )
    if requested is not None:
        applied, ignored = resume_option_changes(
            state["config"], asdict(requested), asdict(type(requested)()), overrides
        )
        if applied:
            log.info(f"resume applies: {', '.join(applied)}")
        if ignored:
            log.warning(
                f"warning: resume ignores changed options (the checkpoint's values are kept): "
                f"{', '.join(ignored)}; start over with --force to use them"
            )
    return state


def trim_metrics(path, tau: int) -> None:
    """Keep the metric lines of iterations <= ``tau`` (the checkpoint's); lines that are not
    JSON (a line torn by a crash mid-write) are dropped with a warning."""
    path = Path(path)
    if not path.exists():
        return
    keep, torn = [], []
    for n, ln in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            it = int(rec["iteration"])
        except (ValueError, KeyError, TypeError):
            torn.append(n)
            continue
        if it <= tau:
            keep.append(ln)
    if torn:
        log.warning(
            f"warning: {path}: dropped {len(torn)} unreadable line(s) (line {torn[0]}; "
            "torn by a crash?); the log is repaired"
        )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- signals
class SignalStop:
    """Turns SIGTERM and SIGINT into a request to stop after the current iteration.

    :attr:`reason` is ``None`` until a signal arrives, then ``"SIGTERM"`` or ``"SIGINT"``. A
    second signal raises KeyboardInterrupt at once. Python swallows an exception raised while
    a weakref callback or ``__del__`` runs (matplotlib makes many while the report is drawn),
    so after a second signal the signal is sent again every :attr:`RESEND_SECONDS` until one
    lands (the CLI calls :meth:`interrupt_delivered`), and :meth:`restore` raises it if none
    has; Python's "Exception ignored" report of a swallowed one is silenced (it is not lost).
    Only installable from the main thread; elsewhere it does nothing. :meth:`restore` puts the
    previous handlers back.
    """

    RESEND_SECONDS = 0.2
    _delivered = threading.Event()

    @classmethod
    def interrupt_delivered(cls) -> None:
        """The KeyboardInterrupt reached the top: stop sending the signal again."""
        cls._delivered.set()

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self):
        self.reason: str | None = None
        self._forced = False
        self._old = {}
        SignalStop._delivered.clear()
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)
        self._old_hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable

    def _unraisable(self, unraisable) -> None:
        if self._forced and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return  # swallowed in a callback: sent again, or raised by restore()
        self._old_hook(unraisable)

    def _handle(self, signum, frame) -> None:
        if self.reason is not None:
            self._forced = True
            self._resend(signum)
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        log.warning(
            f"\n{self.reason}: finishing this iteration and writing a checkpoint "
            "(signal again to stop at once)"
        )

    def _resend(self, signum) -> None:
        def again():
            # still installed and not delivered: the KeyboardInterrupt was swallowed
            if self._old and not self._delivered.is_set():
                os.kill(os.getpid(), signum)

        timer = threading.Timer(self.RESEND_SECONDS, again)
        timer.daemon = True
        timer.start()

    def restore(self) -> None:
        if self._old:
            sys.unraisablehook = self._old_hook
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self._forced and not self._delivered.is_set():
            raise KeyboardInterrupt  # a second signal whose KeyboardInterrupt was swallowed


def exit_code_for(reason: str | None) -> int:
    """Shell convention for a run stopped by a signal: 128 + signal number (else 0)."""
    if reason in SignalStop.SIGNALS:
        return 128 + int(getattr(signal, reason))
    return 0


# --------------------------------------------------------------------------- progress
def bar_total(tau: int, elapsed: float, max_iters: int, max_time: float | None) -> int:
    """The iteration a run is expected to stop at: ``max_iters``, or sooner where
    ``max_time`` (seconds) at the pace so far would stop it first."""
    if max_time is None or tau <= 0 or elapsed <= 0:
        return int(max_iters)
    remaining = max(0.0, max_time - elapsed)
    return int(min(max_iters, tau + int(remaining / (elapsed / tau)) + 1))


def warn_if_nothing_to_do(reason: str | None, tau: int, elapsed: float) -> None:
    """Say why a resumed run stops before its first iteration (a limit already reached)."""
    if reason is None or tau == 0:
        return
    what = {"max_iters": "--max-iters", "max_time": "--max-time"}.get(reason)
    hint = f"; pass a larger {what} with --resume to continue" if what else ""
    log.warning(
        f"warning: nothing to do: the checkpoint (iteration {tau}, {elapsed:.0f} s) has "
        f"already reached its stop condition ({reason}){hint}"
    )


def warn_if_heldout_cut(n_heldout: int, requested: int, n: int) -> None:
    """Say so when the held-out set is smaller than asked (at most a tenth of the particles
    is held out, so that most are trained on)."""
    if n_heldout < requested:
        log.warning(
            f"warning: holding out {n_heldout} particles, not the {requested} asked for "
            f"(--heldout): at most a tenth of the {n} particles is held out"
        )
