"""Multi-class ab initio on a simulated mixture (issue 16): GroEL-GroES (PDB 1AON) and a
second structure (``--second``: GroEL alone, 1AON without the GroES chains O-U; or one
GroEL ring, chains A-G), 50/50, plus a fraction of pure-noise images, reconstructed with
``--classes K`` from a random start.

Reports, per true structure: the class most of its particles went to, the purity (share of
its particles in that class; the issue's ">= 90% in the right class"), the FSC 0.5 / 0.143
resolution of that class's map against the structure's truth after alignment, beside the
oracle (Wiener back-projection with the true poses of that structure's particles); where
the noise images went; the images of each kind in each class; which of issue 16's targets
are met; wall time. Prints a table and writes ``results/classes.json``.

    .venv/bin/python benchmarks/classes.py --n 4000 --box 64 --apix 5 --classes 3 --max-time 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine_info, quiet, score_vs_truth, write_json  # noqa: E402

SECOND = {
    # name: (chains kept from 1AON, label, centred on its own centre of mass)
    "groel": (None, "GroEL", False),  # 1AON without GroES (chains O-U), in the same frame
    "ring": (set("ABCDEFG"), "GroEL ring", True),  # one heptameric ring (GroES-bound cis ring)
}


def make_mixture(
    root: Path,
    n: int,
    D: int,
    apix: float,
    snr: float,
    noise_fraction: float,
    seed: int,
    second: str = "groel",
):
    """Write the mixture (particles.star + stack), the truths and the labels (0 = noise):
    GroEL-GroES and ``second`` (:data:`SECOND`), 50/50."""
    import gemmi
    import mrcfile

    from cryorecon.io.particles import write_particles
    from cryorecon.simulate import (
        builtin_model_path,
        density_from_model,
        model_centre,
        simulate_particles,
    )

    root.mkdir(parents=True, exist_ok=True)
    st = gemmi.read_structure(str(builtin_model_path()))
    keep, _, own_centre = SECOND[second]
    for name in [ch.name for ch in st[0]]:
        if (name >= "O") if keep is None else (name not in keep):
            st[0].remove_chain(name)
    st.write_pdb(str(root / f"{second}.pdb"))
    centre = model_centre(None)  # GroEL: one frame for both, so they differ by GroES only
    truths = [
        density_from_model(None, D=D, apix=apix, centre_A=centre),
        density_from_model(
            root / f"{second}.pdb",
            D=D,
            apix=apix,
            centre_A=model_centre(root / f"{second}.pdb") if own_centre else centre,
        ),
    ]
    n_noise = int(round(noise_fraction * n))
    n_each = (n - n_noise) // 2
    images, ctfs, labels, angles, shifts = [], [], [], [], []
    for k, V in enumerate(truths):
        b = next(simulate_particles(V, n_each, apix, snr, seed=seed + k, batch_size=n_each))
        (
            images.append(b.images),
            ctfs.append(b.ctf),
            angles.append(b.angles),
            shifts.append(b.shifts_A),
        )
        labels += [k + 1] * n_each
    if n_noise:
        b = next(
            simulate_particles(
                torch.zeros_like(truths[0]), n_noise, apix, None, seed=seed + 7, batch_size=n_noise
            )
        )
        sigma = float(np.std(images[0]))
        noise = (
            np.random.default_rng(seed + 8).normal(0.0, sigma, b.images.shape).astype(np.float32)
        )
        images.append(noise), ctfs.append(b.ctf), angles.append(b.angles), shifts.append(b.shifts_A)
        labels += [0] * n_noise
    perm = np.random.default_rng(seed).permutation(len(labels))
    ctf = {key: np.concatenate([c[key] for c in ctfs])[perm] for key in ctfs[0]}
    write_particles(
        root / "particles.star", np.concatenate(images)[perm], apix, ctf, overwrite=True
    )
    np.savez(
        root / "truth_poses.npz",
        labels=np.asarray(labels)[perm],
        angles=np.concatenate(angles)[perm],
        shifts_A=np.concatenate(shifts)[perm],
    )
    for k, V in enumerate(truths, 1):
        with mrcfile.new(root / f"truth{k}.mrc", overwrite=True) as m:
            m.set_data(V.numpy())
            m.voxel_size = apix
    return truths


def oracle(star: Path, rows: np.ndarray, angles, shifts):
    from cryorecon.backproject import wiener_backproject
    from cryorecon.io.particles import read_particles

    ps = read_particles(star).subset(rows)
    ps.angles, ps.shifts = angles[rows], shifts[rows]
    return wiener_backproject(ps)


def confusion(labels, got, K: int) -> dict:
    """The images of each true kind (``labels``: 1, 2; 0 noise) in each class (``got``,
    1-based): ``{kind: [count in class 1, ..., class K]}``."""
    names = {1: "structure1", 2: "structure2", 0: "noise"}
    return {
        names[k]: [int(np.sum((labels == k) & (got == c))) for c in range(1, K + 1)]
        for k in (1, 2, 0)
        if (labels == k).any()
    }


def confusion_and_targets(labels, got, K: int, structures: list[dict]) -> dict:
    """:func:`confusion`, and issue 16's targets: each structure within 1.5x of its oracle's
    FSC 0.5, >= 90% of its images in its class, the two in different classes, and most noise
    images in a class of neither."""
    table = confusion(labels, got, K)
    within = [
        s["resolution_A"]["0.5"] is not None
        and bool(s["resolution_A"]["0.5"] <= 1.5 * s["oracle_resolution_A"]["0.5"])
        for s in structures
    ]
    real = {s["class"] for s in structures}
    noise = table.get("noise")
    targets = {
        "within_1.5x_oracle": within,
        "at_least_90pc_in_class": [bool(s["purity"] >= 0.9) for s in structures],
        "distinct_classes": len(real) == len(structures),
        "noise_mostly_elsewhere": noise is not None
        and bool(sum(v for c, v in enumerate(noise, 1) if c not in real) > 0.5 * sum(noise)),
    }
    return {"confusion": table, "targets": targets}


def trace_classes(labels: np.ndarray, t0: float) -> list[dict]:
    """Instrument the run: every half epoch after the classes split, record the images of each
    true kind (``labels``, all particles, held-out ones included) in each class (largest
    posterior), the cut-off and the seconds since ``t0`` (``time.perf_counter``). Reads the
    run's state only."""
    import importlib

    R = importlib.import_module("cryorecon.reconstruct")
    step, trace = R.Run._step_classes, []

    def traced(self, tau, omega, lvl):
        rec = step(self, tau, omega, lvl)
        n = tau - self.class_split_at
        if n % max(1, self.K // 2) == 0:
            a = self.classes.post.argmax(1) + 1
            K = self.classes.K
            trace.append(
                {
                    "iteration": tau,
                    "epochs_since_split": round(n / self.K, 2),
                    "resolution_A": round(1 / omega, 2),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "confusion": confusion(labels, a, K),
                }
            )
        return rec

    R.Run._step_classes = traced
    return trace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=5.0)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.1, help="fraction of pure-noise images")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument(
        "--second", choices=sorted(SECOND), default="groel", help="the structure beside GroEL-GroES"
    )
    ap.add_argument("--max-time", type=float, default=12.0, help="minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=RESULTS / "classes_work")
    ap.add_argument("--out", type=Path, default=RESULTS / "classes.json")
    ap.add_argument(
        "--score-only",
        action="store_true",
        help="score the run and the mixture already in --work (no simulation, no "
        "reconstruction; wall_s is then null)",
    )
    ap.add_argument("extra", nargs="*", help="further `cryorecon reconstruct` flags (after --)")
    args = ap.parse_args(argv)
    quiet()
    import starfile

    from cryorecon.cli import main as cli

    data = args.work / "data"
    if args.score_only:
        from cryorecon.io.mrc import read_map

        if not (data / "truth_poses.npz").exists():
            ap.error(f"--score-only: no mixture in {data} (run once without it)")
        truths = [torch.as_tensor(read_map(data / f"truth{k}.mrc")[0]) for k in (1, 2)]
    else:
        truths = make_mixture(
            data, args.n, args.box, args.apix, args.snr, args.noise, args.seed, args.second
        )
    tp = np.load(data / "truth_poses.npz")
    run = args.work / f"run_k{args.classes}"
    t0 = time.perf_counter()
    trace = trace_classes(tp["labels"], t0)
    rc = (
        0
        if args.score_only
        else cli(
            [
                "-q",
                "reconstruct",
                str(data / "particles.star"),
                "-o",
                str(run),
                "--force",
                "--classes",
                str(args.classes),
                "--max-time",
                str(args.max_time),
                "--seed",
                str(args.seed),
                *args.extra,
            ]
        )
    )
    wall = None if args.score_only else time.perf_counter() - t0
    table = starfile.read(run / "particles.star")["particles"]
    rows = table["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    got = table["rlnClassNumber"].to_numpy()
    labels = tp["labels"][rows]
    result = {
        "benchmark": "classes",
        "command": " ".join(sys.argv),
        "rc": rc,
        "wall_s": None if wall is None else round(wall, 1),
        "run_seconds": json.loads((run / "run.json").read_text()).get("seconds"),
        "n": args.n,
        "box": args.box,
        "apix": args.apix,
        "snr": args.snr,
        "noise_fraction": args.noise,
        "classes": args.classes,
        "second": args.second,
        "machine": machine_info(),
        "structures": [],
        "trajectory": trace,
    }
    print(
        f"{'structure':<14}{'class':>6}{'purity':>8}{'FSC0.5':>9}{'FSC0.143':>10}{'oracle0.5':>11}"
    )
    for k, name in ((1, "GroEL-GroES"), (2, SECOND[args.second][1])):
        mine = labels == k
        cls, count = Counter(got[mine]).most_common(1)[0]
        from cryorecon.io.mrc import read_map

        vol = torch.as_tensor(read_map(run / f"volume_class{cls:03d}.mrc")[0])
        sc = score_vs_truth(truths[k - 1], vol, args.apix, args.seed, 1000)
        orc = oracle(
            data / "particles.star", np.flatnonzero(tp["labels"] == k), tp["angles"], tp["shifts_A"]
        )
        so = score_vs_truth(truths[k - 1], orc, args.apix, args.seed, 1000)
        row = {
            "structure": name,
            "class": int(cls),
            "purity": round(count / mine.sum(), 3),
            "resolution_A": sc["resolution_A"],
            "oracle_resolution_A": so["resolution_A"],
        }
        result["structures"].append(row)
        print(
            f"{name:<14}{cls:>6}{row['purity']:>8.2f}"
            f"{sc['resolution_A']['0.5'] or float('nan'):>9.1f}"
            f"{sc['resolution_A']['0.143'] or float('nan'):>10.1f}"
            f"{so['resolution_A']['0.5'] or float('nan'):>11.1f}"
        )
    noise = labels == 0
    if noise.any():
        result["noise_classes"] = {int(c): int(v) for c, v in Counter(got[noise]).items()}
        print(f"noise images by class: {result['noise_classes']}")
    result.update(confusion_and_targets(labels, got, args.classes, result["structures"]))
    print("images of each kind by class:", result["confusion"])
    print("issue 16's targets met:", result["targets"])
    write_json(args.out, result)
    print(f"wall {result['wall_s']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
