"""Read what a run folder holds, tolerating files that do not exist yet or are half written.

A run folder (written by :mod:`cryorecon.reconstruct`) may hold ``run.json``,
``metrics.jsonl``, ``initial.mrc``, ``volume.mrc``, ``snapshots/volume_XXXXXX.mrc``,
``poses.npz`` and ``particles.star``; a run with ``--classes K`` also ``volume_class001.mrc``
... (RELION's naming, 1-based). The report is rebuilt while the run writes these, so every
reader here returns ``None`` (or an empty result) instead of raising when a file is missing,
empty, truncated or being replaced.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SNAPSHOT_RE = re.compile(r"volume_(\d+)\.mrc$")
CLASS_MAP_RE = re.compile(r"volume_class(\d+)\.mrc$")


@dataclass
class Metrics:
    """``metrics.jsonl`` as columns (float64 arrays, NaN where a value is absent).

    ``class_fractions`` is the per-record ``class_fractions`` list of a run with several
    classes as a (records, K) float64 array (class priors, summing to 1; NaN rows where a
    record has none), or ``None`` when no record has one.
    """

    records: int = 0
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    class_fractions: np.ndarray | None = None

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
    return Metrics(records=len(recs), columns=cols, class_fractions=_class_fractions(recs))


def _class_fractions(recs: list[dict]) -> np.ndarray | None:
    """The records' ``class_fractions`` lists as a (records, K) array, K the longest list;
    NaN where a record has no list or a value is not a finite number."""
    lists = [r.get("class_fractions") for r in recs]
    lists = [x if isinstance(x, list) else [] for x in lists]
    K = max((len(x) for x in lists), default=0)
    if K == 0:
        return None
    out = np.full((len(recs), K), np.nan)
    for i, x in enumerate(lists):
        for j, v in enumerate(x):
            v = finite_number(v)
            if v is not None:
                out[i, j] = v
    return out


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


def class_map_name(number: int) -> str:
    """File name of class ``number``'s map (1-based, RELION's naming): ``volume_class001.mrc``."""
    return f"volume_class{number:03d}.mrc"


def list_class_maps(run_dir: Path) -> dict[int, Path]:
    """``{class number: path}`` of the ``volume_classNNN.mrc`` files in the run folder."""
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return {}
    out = {}
    for p in entries:
        m = CLASS_MAP_RE.match(p.name)
        if m and int(m.group(1)) > 0 and p.is_file():
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def read_class_counts(run_dir: Path) -> dict[int, int] | None:
    """Particles per class from ``rlnClassNumber`` in ``particles.star`` (``{class number:
    count}``), or ``None`` when the file is absent, unreadable or has no such column."""
    import pandas as pd

    from ..errors import InputError
    from ..io.star import read_star_blocks

    path = Path(run_dir) / "particles.star"
    if not path.is_file():
        return None
    try:
        blocks = read_star_blocks(path)
    except (InputError, OSError, ValueError):
        return None
    for df in blocks.values():
        if "rlnClassNumber" in df.columns:
            cls = pd.to_numeric(df["rlnClassNumber"], errors="coerce").to_numpy(np.float64)
            cls = cls[np.isfinite(cls)].astype(np.int64)
            numbers, counts = np.unique(cls, return_counts=True)
            return {int(k): int(n) for k, n in zip(numbers, counts)}
    return None


@dataclass
class ClassMap:
    """One class of a run with several classes.

    ``number`` is 1-based; ``volume`` is ``(map, Å/voxel)`` or ``None`` when the file is
    absent or unreadable (``exists`` tells which); ``fraction`` the latest class prior (0..1,
    ``None`` when unknown); ``particles`` the number of particles assigned to the class in
    ``particles.star`` (``None`` when unknown).
    """

    number: int
    path: Path
    exists: bool
    volume: tuple[np.ndarray, float] | None
    fraction: float | None = None
    particles: int | None = None

    @property
    def name(self) -> str:
        return self.path.name


def class_count(info: dict | None, metrics: Metrics, maps: dict[int, Path]) -> int:
    """Number of classes K of a run: the largest of ``run.json``'s ``classes``, the length
    of the metrics' ``class_fractions`` and the highest class map number (1 without any)."""
    K = (info or {}).get("classes")
    K = int(K) if isinstance(K, int) and not isinstance(K, bool) else 1
    if metrics.class_fractions is not None:
        K = max(K, metrics.class_fractions.shape[1])
    return max([K, *maps])


def final_class_fractions(info: dict | None, metrics: Metrics, K: int) -> list[float | None]:
    """Each class's latest prior (0..1): from the last metrics record that has it, else
    ``run.json``'s ``class_fractions``; ``None`` for a class with neither."""
    out: list[float | None] = [None] * K
    fr = metrics.class_fractions
    if fr is not None:
        for j in range(min(K, fr.shape[1])):
            ok = np.nonzero(np.isfinite(fr[:, j]))[0]
            if ok.size:
                out[j] = float(fr[ok[-1], j])
    saved = (info or {}).get("class_fractions")
    if isinstance(saved, list):
        for j, v in enumerate(saved[:K]):
            if out[j] is None:
                out[j] = finite_number(v)
    return out


def read_classes(run_dir: Path, info: dict | None, metrics: Metrics) -> list[ClassMap] | None:
    """The classes of a run made with ``--classes K`` (K > 1), sorted by class number, each
    with its map (read from ``volume_classNNN.mrc``), latest fraction and particle count;
    ``None`` for a run with one class."""
    run_dir = Path(run_dir)
    paths = list_class_maps(run_dir)
    K = class_count(info, metrics, paths)
    if K <= 1:
        return None
    fractions = final_class_fractions(info, metrics, K)
    counts = read_class_counts(run_dir)
    out = []
    for j in range(1, K + 1):
        path = paths.get(j, run_dir / class_map_name(j))
        out.append(
            ClassMap(
                number=j,
                path=path,
                exists=path.is_file(),
                volume=read_map_quiet(path),
                fraction=fractions[j - 1],
                particles=None if counts is None else counts.get(j, 0),
            )
        )
    return out


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
