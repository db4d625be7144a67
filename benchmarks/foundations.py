"""Foundations benchmark: projector accuracy, oracle resolution, and the cost of the I/O path.

Measures, with the real CLI run as subprocesses (``python -m cryorecon ...``):

1. projection error of :func:`cryorecon.fourier.slicing.project` against RELION's golden
   projections in ``../shared/data/relion_projections`` (standardised relative L2 error per
   image, the computation of ``tests/test_slicing.py``; skipped when the data are absent);
2. the oracle resolution (FSC 0.5 and 0.143 against the truth, Å) of ``cryorecon
   backproject`` with the true poses: box 64, 5.6 Å/pixel, noise-free and SNR 0.05;
3. wall time, CPU time and peak RSS of ``simulate`` and ``backproject`` at box 64
   (5.6 Å/pixel) and box 128 (2.8 Å/pixel), SNR 0.05.

Each step runs under ``/usr/bin/time -v`` when available (peak RSS of the child process);
otherwise ``resource.getrusage(RUSAGE_CHILDREN)`` deltas are used (peak RSS is then the
largest child so far, an upper bound). The 1- and 5-minute load averages are recorded
before and after each step, since the machine may be shared.

    python benchmarks/foundations.py                 # n = 10,000 (about 10-15 min on 2 cores)
    python benchmarks/foundations.py --quick         # n = 1,000 smoke test
    python benchmarks/foundations.py --n 2000 --seed 1 --out /tmp/f.json

Writes ``--out`` (JSON, default benchmarks/results/foundations.json) and a markdown table
next to it (same stem, ``.md``). The simulated stacks live in ``--work``
(default benchmarks/results/foundations_work/, large: keep it out of git).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "foundations.json"
DEFAULT_WORK = ROOT / "benchmarks" / "results" / "foundations_work"
GOLDEN = ROOT.parent / "shared" / "data" / "relion_projections"
TIME_BIN = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None  # GNU time, for -v

# The datasets: (name, box, apix, snr or None for noise-free).
DATASETS = [
    ("box64_clean", 64, 5.6, None),
    ("box64_snr0.05", 64, 5.6, 0.05),
    ("box128_snr0.05", 128, 2.8, 0.05),
]


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- projection error


def _standardise(a):
    a = a - a.mean((-1, -2), keepdim=True)
    return a / a.std((-1, -2), keepdim=True)


def _rel_err(a, b):
    """Per-image relative L2 error of standardised images (as tests/test_slicing.py)."""
    a, b = _standardise(a), _standardise(b)
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def _golden(d: Path, name: str):
    import mrcfile
    import numpy as np
    import starfile
    import torch

    from cryorecon.geometry.poses import relion_to_pose

    V = torch.from_numpy(mrcfile.read(d / "clean70SRibosome_vol_64.mrc").astype(np.float32))
    table = starfile.read(d / f"rln_proj_64_{name}.star")["particles"]
    imgs = torch.from_numpy(mrcfile.read(d / f"rln_proj_64_{name}.mrcs").astype(np.float32))
    angles = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    if "rlnOriginX" in table:  # pixels (RELION 3.0 columns), apix = 1 Å here
        origins = table[["rlnOriginX", "rlnOriginY"]].to_numpy()
    else:
        origins = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    R, t = relion_to_pose(angles, origins, 1.0)
    return V, imgs, R, t


def projection_error(golden_dir: Path) -> dict:
    if not golden_dir.is_dir():
        return {"skipped": f"golden data not found at {golden_dir}"}
    import torch

    from cryorecon.fourier.slicing import project

    out = {"data": str(golden_dir)}
    for name in ("centered", "shifted"):
        V, imgs, R, t = _golden(golden_dir, name)
        t0 = time.perf_counter()
        with torch.no_grad():
            err = _rel_err(project(V, R, t), imgs)
        out[name] = {
            "n_images": int(len(err)),
            "rel_err_mean": float(err.mean()),
            "rel_err_median": float(err.median()),
            "rel_err_max": float(err.max()),
            "wall_s": round(time.perf_counter() - t0, 3),
        }
    return out


# --------------------------------------------------------------------------- timed subprocesses


def _parse_time_v(text: str) -> dict:
    def grab(label):
        m = re.search(rf"{re.escape(label)}:\s*(\S+)", text)
        return m.group(1) if m else None

    user, sys_ = grab("User time (seconds)"), grab("System time (seconds)")
    rss = grab("Maximum resident set size (kbytes)")
    wall = grab("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    wall_s = None
    if wall:
        parts = [float(p) for p in wall.split(":")]
        wall_s = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    return {
        "wall_s_time": wall_s,
        "cpu_s": None if user is None else round(float(user) + float(sys_), 2),
        "peak_rss_mb": None if rss is None else round(int(rss) / 1024, 1),
    }


def run_step(label: str, args: list[str], work: Path) -> dict:
    """Run ``python -m cryorecon -q ARGS`` and measure it; raise on failure with its stderr."""
    cmd = [sys.executable, "-m", "cryorecon", "-q", *args]
    timefile = work / f".time_{label}.txt"
    use_time = TIME_BIN is not None
    full = [TIME_BIN, "-v", "-o", str(timefile), *cmd] if use_time else cmd
    before_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = loadavg()
    print(f"  [{label}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = loadavg()
    after_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(
            f"step {label} failed (exit {proc.returncode}):\n"
            f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        )
    rec = {
        "command": " ".join(["cryorecon", *args]),
        "wall_s": round(wall, 2),
        "load_before": load_before,
        "load_after": load_after,
    }
    if use_time and timefile.exists():
        rec.update(_parse_time_v(timefile.read_text()))
        rec["measured_by"] = "/usr/bin/time -v"
        timefile.unlink()
    else:
        rec["cpu_s"] = round(
            (after_ru.ru_utime - before_ru.ru_utime) + (after_ru.ru_stime - before_ru.ru_stime), 2
        )
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        rec["peak_rss_mb"] = round(after_ru.ru_maxrss * scale / 2**20, 1)
        rec["measured_by"] = "getrusage(RUSAGE_CHILDREN) (peak RSS = max over children so far)"
    print(
        f"      wall {rec['wall_s']:.1f} s, cpu {rec['cpu_s']} s, peak RSS {rec['peak_rss_mb']} "
        f"MB, load {load_before} -> {load_after}",
        flush=True,
    )
    return rec


def run_dataset(name: str, box: int, apix: float, snr, n: int, seed: int, work: Path) -> dict:
    d = work / f"{name}_n{n}_seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    snr_arg = "inf" if snr is None else f"{snr:g}"
    print(f"{name}: n={n}, box {box}, {apix:g} Å/px, SNR {snr_arg}", flush=True)
    rec = {
        "dataset": name,
        "n": n,
        "box": box,
        "apix": apix,
        "snr": snr,
        "seed": seed,
        "defocus_um": [1.0, 3.0],
        "voltage_kv": 300.0,
        "max_shift_px": 3.0,
        "dir": str(d),
    }
    rec["simulate"] = run_step(
        f"{name}_simulate",
        [
            "simulate",
            "-n",
            str(n),
            "--box",
            str(box),
            "--apix",
            f"{apix:g}",
            "--snr",
            snr_arg,
            "--seed",
            str(seed),
            "-o",
            str(d),
            "--force",
        ],
        work,
    )
    rec["backproject"] = run_step(
        f"{name}_backproject",
        ["backproject", str(d / "particles.star"), "-o", str(d / "oracle.mrc"), "--force"],
        work,
    )
    rec["fsc"] = run_step(
        f"{name}_fsc",
        [
            "fsc",
            str(d / "truth.mrc"),
            str(d / "oracle.mrc"),
            "-o",
            str(d / "fsc_oracle"),
            "--force",
        ],
        work,
    )
    fj = json.loads((d / "fsc_oracle.json").read_text())
    res = fj["resolution_A"]
    rec["resolution_A"] = {"0.5": res.get("0.5"), "0.143": res.get("0.143")}
    rec["nyquist_A"] = 2 * apix
    rec["fsc_json"] = str(d / "fsc_oracle.json")
    print(
        f"      oracle FSC 0.5: {rec['resolution_A']['0.5']} Å, 0.143: "
        f"{rec['resolution_A']['0.143']} Å (Nyquist {2 * apix:g} Å)",
        flush=True,
    )
    return rec


# --------------------------------------------------------------------------- report


def machine() -> dict:
    try:
        import torch

        torch_version, threads = torch.__version__, torch.get_num_threads()
    except Exception:  # pragma: no cover
        torch_version, threads = None, None
    try:
        from importlib.metadata import version

        cr_version = version("cryorecon")
    except Exception:
        cr_version = None
    git = None
    try:
        git = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except Exception:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch_version,
        "torch_threads": threads,
        "cryorecon": cr_version,
        "git_head": git,
        "loadavg_start": loadavg(),
    }


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def table(result: dict) -> str:
    lines = []
    pe = result["projection_error"]
    lines.append("Projection error vs RELION golden images (standardised relative L2 per image)")
    lines.append("")
    if "skipped" in pe:
        lines.append(f"skipped: {pe['skipped']}")
    else:
        lines.append("| set | images | mean | median | max |")
        lines.append("|---|---:|---:|---:|---:|")
        for name in ("centered", "shifted"):
            r = pe[name]
            lines.append(
                f"| {name} | {r['n_images']} | {r['rel_err_mean']:.4f} | "
                f"{r['rel_err_median']:.4f} | {r['rel_err_max']:.4f} |"
            )
    lines.append("")
    lines.append("Oracle back-projection (true poses) vs truth, and cost of each step")
    lines.append("")
    lines.append(
        "| dataset | n | box | Å/px | SNR | step | wall s | CPU s | peak RSS MB | load 1m "
        "before→after | FSC 0.5 Å | FSC 0.143 Å | Nyquist Å |"
    )
    lines.append("|---|---:|---:|---:|---|---|---:|---:|---:|---|---:|---:|---:|")
    for d in result["datasets"]:
        if "error" in d:
            lines.append(
                f"| {d['dataset']} | {d['n']} | {d['box']} | {d['apix']:g} | "
                f"{'none' if d['snr'] is None else d['snr']} | FAILED | | | | | | | |"
            )
            continue
        for step in ("simulate", "backproject"):
            s = d[step]
            lb, la = s.get("load_before"), s.get("load_after")
            load = "—" if lb is None else f"{lb[0]:.2f}→{la[0]:.2f}"
            res = d["resolution_A"] if step == "backproject" else {}
            lines.append(
                f"| {d['dataset']} | {d['n']} | {d['box']} | {d['apix']:g} | "
                f"{'none' if d['snr'] is None else format(d['snr'], 'g')} | {step} | "
                f"{_fmt(s['wall_s'])} | {_fmt(s.get('cpu_s'))} | {_fmt(s.get('peak_rss_mb'))} | "
                f"{load} | {_fmt(res.get('0.5'), '.2f') if res else ''} | "
                f"{_fmt(res.get('0.143'), '.2f') if res else ''} | "
                f"{format(d['nyquist_A'], 'g') if res else ''} |"
            )
    m = result["machine"]
    lines.append("")
    lines.append(
        f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} "
        f"({m['torch_threads']} threads), load avg at start {m['loadavg_start']}, "
        f"at end {result.get('loadavg_end')}; seed {result['seed']}; "
        f"total {result.get('total_wall_s')} s; {result['started_utc']}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="JSON output (the .md goes next to it)"
    )
    ap.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="folder for simulated data and maps"
    )
    ap.add_argument("--n", type=int, default=10000, help="particles per dataset (default 10000)")
    ap.add_argument("--quick", action="store_true", help="n = 1000 smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only",
        nargs="*",
        choices=[d[0] for d in DATASETS],
        help="run only these datasets (default: all)",
    )
    ap.add_argument("--golden", type=Path, default=GOLDEN, help="RELION golden projections folder")
    args = ap.parse_args(argv)
    n = 1000 if args.quick else args.n

    t_start = time.perf_counter()
    result = {
        "benchmark": "foundations",
        "seed": args.seed,
        "n": n,
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    print(f"machine: {result['machine']}", flush=True)
    print("projection error vs RELION ...", flush=True)
    result["projection_error"] = projection_error(args.golden)
    print(f"  {result['projection_error']}", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    result["datasets"] = []
    failed = False
    for name, box, apix, snr in DATASETS:
        if args.only and name not in args.only:
            continue
        try:
            result["datasets"].append(run_dataset(name, box, apix, snr, n, args.seed, args.work))
        except Exception as e:  # keep going: report what failed
            failed = True
            print(f"  FAILED: {e}", file=sys.stderr, flush=True)
            result["datasets"].append(
                {
                    "dataset": name,
                    "n": n,
                    "box": box,
                    "apix": apix,
                    "snr": snr,
                    "seed": args.seed,
                    "error": str(e),
                }
            )
    result["loadavg_end"] = loadavg()
    result["total_wall_s"] = round(time.perf_counter() - t_start, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    md = table(result)
    args.out.with_suffix(".md").write_text(f"# foundations benchmark (n = {n})\n\n{md}\n")
    print()
    print(md)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
