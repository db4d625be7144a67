"""Checks a command makes on its outputs and device before any work, so that a bad path or
device fails in one line at once instead of after the computation."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, OutputExistsError


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path) -> None:
    parent = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not parent.is_dir():
        raise InputError(f"{path}: cannot create it, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write in {parent} (permission denied)")


def check_output_file(path, force: bool = False) -> Path:
    """An output file the command may write: not a folder, its folder creatable and
    writable, and absent unless ``force`` (else OutputExistsError, exit 3)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name for the output")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; refusing to overwrite (use --force)")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{path}: not writable (permission denied)")
    _check_parent(path)
    return path


def check_output_dir(path) -> Path:
    """An output folder: a folder or absent, and creatable / writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} exists and is a file, not a folder; choose another -o/--out")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{path}: cannot write in this folder (permission denied)")
    else:
        _check_parent(path)
    return path


def check_device(name: str) -> str:
    """``name`` if it is a torch device this machine has (cpu, cuda, cuda:N, mps), else
    InputError naming the choices."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}; use cpu or cuda (cuda:N for GPU N)") from None
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name}: CUDA is not available on this machine; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
        return name
    if (
        dev.type == "mps"
        and getattr(torch.backends, "mps", None)
        and torch.backends.mps.is_available()
    ):
        return name
    raise InputError(f"unsupported device {name!r}; use cpu or cuda (cuda:N for GPU N)")
