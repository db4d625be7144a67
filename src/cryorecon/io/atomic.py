"""Files written whole or not at all: a temporary name beside the target, then a rename.

A reader (a report refresh, a resumed run, another tool) never sees half a file, and a crash
mid-write leaves the previous version in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` by way of ``.NAME.tmpPID`` in the same folder; returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON (one trailing newline) to ``path``, atomically."""
    return write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
