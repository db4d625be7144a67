"""Read what a run folder holds, tolerating files that do not exist yet or are half written.

A run folder (written by :mod:`cryorecon.reconstruct`) may hold ``run.json``,
``metrics.jsonl``, ``initial.mrc``, ``volume.mrc``, ``snapshots/volume_XXXXXX.mrc`` and
``poses.npz``. The report is rebuilt while the run writes these, so every reader here
returns ``None`` (or an empty result) instead of raising when a file is missing, empty,
truncated or being replaced.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SNAPSHOT_RE = re.compile(r"volume_(\d+)\.mrc$")


@dataclass
class Metrics:
    """``metrics.jsonl`` as columns (float64 arrays, NaN where a value is absent)."""

    records: int = 0
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.records

    def get(self, key: str) -> np.ndarray | None:
        col = self.columns.get(key)
        if col is None or not np.isfinite(col).any():
            return None
        return col

    def last(self, key: str):
        """Last finite value of a column, or ``None``."""
        col = self.get(key)
        if col is None:
            return None
        ok = np.nonzero(np.isfinite(col))[0]
        return float(col[ok[-1]])


def read_run_info(run_dir: Path) -> dict | None:
    """``run.json`` as a dict, or ``None`` when absent or unreadable."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def read_metrics(run_dir: Path) -> Metrics:
    """Parse ``metrics.jsonl``; skips blank or unparsable lines (a line being written).

    If a resumed run re-logged iterations, the last record of each iteration wins and the
    records are sorted by iteration.
    """
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text()
    except OSError:
        return Metrics()
    by_iter: dict = {}
    order = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        key = rec.get("iteration", None)
        if not isinstance(key, (int, float)):
            key = ("_", order)
        by_iter[key] = rec
        order += 1
    if not by_iter:
        return Metrics()
    recs = [
        by_iter[k]
        for k in sorted(by_iter, key=lambda k: (1, k[1]) if isinstance(k, tuple) else (0, k))
    ]
    keys: list[str] = []
    for r in recs:
        for k, v in r.items():
            if k not in keys and (v is None or isinstance(v, (int, float))):
                keys.append(k)
    cols = {}
    for k in keys:
        col = np.full(len(recs), np.nan)
        for i, r in enumerate(recs):
            v = r.get(k)
            if isinstance(v, bool):
                v = float(v)
            if isinstance(v, (int, float)) and math.isfinite(v):
                col[i] = v
        cols[k] = col
    return Metrics(records=len(recs), columns=cols)


def read_map_quiet(path: Path) -> tuple[np.ndarray, float] | None:
    """``(volume, apix)`` from an MRC file, or ``None`` if it is absent or unreadable."""
    from ..errors import InputError
    from ..io.mrc import read_map

    path = Path(path)
    if not path.is_file():
        return None
    try:
        vol, apix = read_map(path)
    except (InputError, OSError, ValueError):
        return None
    if vol.ndim != 3 or min(vol.shape) < 2:
        return None
    return vol, apix


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of ``snapshots/volume_XXXXXX.mrc``, sorted by iteration."""
    folder = Path(run_dir) / "snapshots"
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = SNAPSHOT_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_directions(run_dir: Path) -> np.ndarray | None:
    """Per-particle most probable view directions from ``poses.npz`` (``directions``:
    (N, 3) unit vectors, NaN rows for particles not yet visited), or ``None``."""
    path = Path(run_dir) / "poses.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if "directions" not in z.files:
                return None
            d = np.asarray(z["directions"], dtype=np.float64)
    except (OSError, ValueError, KeyError, EOFError):
        return None
    if d.ndim != 2 or d.shape[1] != 3:
        return None
    return d


def seconds_at(metrics: Metrics, iteration: float) -> float | None:
    """Run time (s) at an iteration, interpolated from the metrics; ``None`` if unknown."""
    it, sec = metrics.get("iteration"), metrics.get("seconds")
    if it is None or sec is None:
        return None
    ok = np.isfinite(it) & np.isfinite(sec)
    if not ok.any():
        return None
    if iteration <= 0:
        return 0.0
    return float(np.interp(iteration, it[ok], sec[ok]))


def value_at(metrics: Metrics, key: str, iteration: float) -> float | None:
    """The value of ``key`` at the last record with ``iteration <= iteration``."""
    it, col = metrics.get("iteration"), metrics.get(key)
    if it is None or col is None:
        return None
    ok = np.nonzero(np.isfinite(col) & (it <= iteration))[0]
    if not ok.size:
        return None
    return float(col[ok[-1]])


@dataclass
class GoldStandard:
    """``run.json["gold_standard"]`` (written from
    :meth:`cryorecon.gold_standard.GoldStandardFSC.to_json`) as arrays.

    Curves are float64 arrays over ``freq`` (1/Å), NaN where a value is null; ``randomized``
    is ``None`` when the run had no phase randomisation. Resolutions in Å (``None`` when
    unknown); ``resolution_A`` is the corrected masked FSC at 0.143, preferring the run's
    top-level ``gold_standard_resolution_A``; ``refined_to_A`` is the cut-off the halves were
    refined to (the stated resolution is no finer) and ``resolution_measured_A`` where the
    corrected curve itself crosses 0.143.
    """

    freq: np.ndarray
    unmasked: np.ndarray
    masked: np.ndarray
    corrected: np.ndarray
    randomized: np.ndarray | None
    resolution_A: float | None
    resolution_unmasked_A: float | None
    randomize_at_A: float | None
    mask: str
    warnings: list = field(default_factory=list)
    refined_to_A: float | None = None
    resolution_measured_A: float | None = None


def _curve(x, n: int) -> np.ndarray | None:
    if not isinstance(x, list) or len(x) != n:
        return None
    out = np.array(
        [v if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan for v in x],
        dtype=np.float64,
    )
    return out


def finite_number(x) -> float | None:
    """``x`` as a float if it is a finite number (not a bool), else ``None``."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def read_gold_standard(info: dict | None) -> GoldStandard | None:
    """The half-map FSC of a run from its ``run.json`` dict, or ``None`` when the run has
    none or the entry is unusable (missing curves, curves of different lengths)."""
    gs = (info or {}).get("gold_standard")
    if not isinstance(gs, dict):
        return None
    freq = gs.get("freq_1_per_A")
    if not isinstance(freq, list) or len(freq) < 2:
        return None
    n = len(freq)
    freq = _curve(freq, n)
    curves = {k: _curve(gs.get(f"fsc_{k}"), n) for k in ("unmasked", "masked", "corrected")}
    if freq is None or not np.isfinite(freq).all() or any(c is None for c in curves.values()):
        return None
    res = finite_number(info.get("gold_standard_resolution_A"))
    if res is None:
        res = finite_number(gs.get("resolution_A"))
    mask = gs.get("mask")
    if isinstance(mask, dict):
        desc = str(mask.get("description") or mask.get("how") or "")
    else:
        desc = str(mask or "")
    warnings = [str(w) for w in gs.get("warnings") or [] if isinstance(w, str)]
    return GoldStandard(
        freq=freq,
        randomized=_curve(gs.get("fsc_randomized"), n),
        resolution_A=res,
        resolution_unmasked_A=finite_number(gs.get("resolution_unmasked_A")),
        randomize_at_A=finite_number(gs.get("randomize_at_A")),
        mask=desc,
        warnings=warnings,
        refined_to_A=finite_number(gs.get("refined_to_A")),
        resolution_measured_A=finite_number(gs.get("resolution_measured_A")),
        **curves,
    )
