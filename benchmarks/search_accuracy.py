#!/usr/bin/env python
"""Benchmark `search_accuracy` (issue 13): the coarse-to-fine pose search
(:class:`cryorecon.model.search.CoarseToFine`) against the exact sum of Eq. 4 on the same
particles, beside the paper's importance sampling (Sec. 3.4).

A small set is simulated in-process (GroEL-GroES, the built-in 1AON; ``--box`` at ``--apix``;
defocus 1-3 µm; shifts within ±3 px; uniform random poses) at each ``--snr``. For each map of
``--maps`` and each cut-off of ``--resolutions`` (Å) the particles form one minibatch:

* ``exact``: :class:`~cryorecon.model.objective.ExactQuadrature` (log p per particle, the
  gradient with respect to the map, the exact pose posteriors);
* each search variant (``--variant NAME:key=value,...``: fields of
  :class:`~cryorecon.model.search.SearchConfig`; ``default`` is ``SearchConfig()``, a plain
  ``accurate`` or ``fast`` the search's modes, :func:`~cryorecon.model.search.search_config`);
* ``importance``: :class:`~cryorecon.model.objective.ImportanceSampled` with s0 ``--s0`` and
  a previous visit that stored the exact posterior at the same map at iteration
  ``--tau-prev`` (alpha and T of Eq. 20 from the paper's schedule then; the most favourable
  case for it: the map did not change between visits).

Maps: ``truth``; ``lowpass``: the truth low-passed at ``--lowpass-A`` (a map that lags its
cut-off); ``mixed``: half the truth, half a random-sphere start of the same norm (a map that
is partly wrong).

Recorded per row: the relative error ``|log p - log p_exact| / |log p_exact|`` per particle
(median, p90, max) and in nats (median, max), the gradient's cosine and relative error
``|g - g_exact| / |g_exact|``, the fraction of the level's poses evaluated (``fraction``) and
the same counting the padding of per-image sets (``computed``), the share of the exact
path's (pose x coefficient) products that the search computed (``work``, search only), the
share of images the search routed to the exact sum, and the wall time of one minibatch
(likelihood and gradient) against the exact path's. The hierarchy of the search is built
before the timing (once per cut-off in a run).

Prints a table and writes JSON (``--out``).

    python benchmarks/search_accuracy.py
    python benchmarks/search_accuracy.py --snr 0.05 --maps truth --resolutions 25 --n-particles 16
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_variant(text: str):
    """``NAME`` or ``NAME:key=value,key=value`` -> (name, SearchConfig)."""
    from cryorecon.model.search import SEARCH_MODES, SearchConfig, search_config

    name, _, rest = text.partition(":")
    if name in SEARCH_MODES and not rest:
        return name, search_config(name)
    kinds = {f.name: f.type for f in fields(SearchConfig)}
    kw = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in kinds:
            raise SystemExit(
                f"--variant {text}: unknown SearchConfig field {k!r} (known: {sorted(kinds)})"
            )
        default = getattr(SearchConfig(), k)
        kw[k] = (
            None
            if v.lower() == "none"
            else type(default)(float(v))
            if default is not None
            else float(v)
        )
    return name, SearchConfig(**kw)


def lowpass(V: torch.Tensor, apix: float, res_A: float) -> torch.Tensor:
    """``V`` low-passed at ``res_A`` Å (raised-cosine edge one Fourier pixel wide)."""
    D = V.shape[-1]
    k = torch.fft.fftfreq(D, d=apix)
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    s = torch.sqrt(kx**2 + ky**2 + kz**2)
    f0, w = 1.0 / res_A, 1.0 / (D * apix)
    filt = torch.clamp((f0 + w / 2 - s) / w, 0, 1)
    filt = 0.5 - 0.5 * torch.cos(math.pi * filt)
    return torch.fft.ifftn(torch.fft.fftn(V) * filt).real.to(torch.float32)


def make_map(
    kind: str, truth: torch.Tensor, apix: float, lowpass_A: float, seed: int
) -> torch.Tensor:
    if kind == "truth":
        return truth
    if kind == "lowpass":
        return lowpass(truth, apix, lowpass_A)
    if kind == "mixed":
        from cryorecon.start import random_spheres

        D = truth.shape[-1]
        sph = random_spheres(D, 0.4 * D, 8, torch.Generator().manual_seed(seed))
        sph = sph * (truth.norm() / sph.norm())
        return (0.5 * truth + 0.5 * sph).contiguous()
    raise SystemExit(f"unknown map {kind!r}")


def compare(ev, ex, t, t_ex) -> dict:
    rel = ((ev.loglik.double() - ex.loglik.double()).abs() / ex.loglik.double().abs()).cpu().numpy()
    nats = (ev.loglik.double() - ex.loglik.double()).abs().cpu().numpy()
    g, g0 = ev.grad.double(), ex.grad.double()
    return {
        "rel_median": float(np.median(rel)),
        "rel_p90": float(np.percentile(rel, 90)),
        "rel_max": float(rel.max()),
        "nats_median": float(np.median(nats)),
        "nats_max": float(nats.max()),
        "grad_cos": float((g * g0).sum() / (g.norm() * g0.norm())),
        "grad_rel": float((g - g0).norm() / g0.norm()),
        "fraction": float(ev.fraction),
        "computed": float(ev.computed),
        "seconds": round(t, 3),
        "exact_seconds": round(t_ex, 3),
        "speedup": round(t_ex / t, 2),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--apix", type=float, default=10.0)
    ap.add_argument("--n-particles", type=int, default=32)
    ap.add_argument("--snr", type=float, nargs="+", default=[0.05, 0.5])
    ap.add_argument(
        "--maps", nargs="+", default=["truth", "mixed"], choices=["truth", "lowpass", "mixed"]
    )
    ap.add_argument("--lowpass-A", type=float, default=60.0)
    ap.add_argument(
        "--resolutions", type=float, nargs="+", default=[40.0, 33.0], help="cut-offs (Å)"
    )
    ap.add_argument("--grid-scale", type=float, default=1.0)
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        help="search variant NAME[:key=value,...] (SearchConfig fields); repeatable",
    )
    ap.add_argument("--s0", type=float, default=10.0, help="importance sampling's s0 (0: skip it)")
    ap.add_argument("--tau-prev", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "search_accuracy.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from _common import machine_info, quiet, write_json
    from cryorecon.config import ReconstructConfig
    from cryorecon.model.importance import ImportanceSampler, ISConfig
    from cryorecon.model.objective import ExactQuadrature, ImportanceSampled
    from cryorecon.model.search import CoarseToFine, level_radii
    from cryorecon.preprocess import image_batch
    from cryorecon.simulate import density_from_model, simulate_particles
    from cryorecon.start import make_level

    quiet()
    t_start = time.perf_counter()
    machine = machine_info()  # the code's commit as the run starts
    D, apix, N = args.box, args.apix, args.n_particles
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    shift_sigma_px = 0.05 * D  # the driver's default prior width (5% of the box)
    truth = density_from_model(None, D=D, apix=apix)
    idx = np.arange(N)
    schedule = ReconstructConfig().schedule(apix)
    rows = []
    head = (
        f"{'snr':>5} {'map':>7} {'res_A':>5} {'method':>12} "
        f"{'rel_med':>8} {'rel_p90':>8} {'rel_max':>8} "
        f"{'nats_max':>8} {'g_cos':>7} {'g_rel':>6} {'fraction':>8} {'computed':>8} {'work':>7} "
        f"{'exact%':>6} {'s':>6} {'exact_s':>7}"
    )
    print(
        f"box {D} at {apix:g} Å/px, {N} particles, grid scale {args.grid_scale:g}, "
        f"variants {[n for n, _ in variants]}",
        flush=True,
    )
    print(head, flush=True)
    for snr in args.snr:
        b = next(
            simulate_particles(
                truth, N, apix, snr, seed=args.seed, batch_size=N, shift_range_px=3.0
            )
        )
        for kind in args.maps:
            V = make_map(kind, truth, apix, args.lowpass_A, args.seed)
            for res in args.resolutions:
                lvl = make_level(
                    1.0 / res, D, apix, shift_sigma_px, args.grid_scale, "cpu", 2, 2**28
                )
                batch = image_batch(torch.from_numpy(b.images), b.ctf, apix, lvl.halfplane, 0.8 * D)
                exact = ExactQuadrature(2)
                exact.evaluate(V, batch, idx[:2], lvl, tau=1)  # warm-up: slicing set-up of the grid
                t0 = time.perf_counter()
                ex, post = exact.evaluate_with_posteriors(V, batch, lvl, True, want_posteriors=True)
                t_ex = time.perf_counter() - t0
                common = {
                    "snr": snr,
                    "map": kind,
                    "resolution_A": res,
                    "radius_px": lvl.halfplane.radius,
                    "poses": lvl.n_poses,
                    "coefficients": lvl.halfplane.M,
                    "exact_loglik_median": float(ex.loglik.median()),
                }
                out = []
                for name, cfg in variants:
                    s = CoarseToFine(
                        D, apix, shift_sigma_px, args.grid_scale, 2, cfg, cache_bytes=2**28
                    )
                    t0 = time.perf_counter()
                    s.hierarchy(lvl)
                    t_build = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    ev = s.evaluate(V, batch, idx, lvl, tau=1)
                    t = time.perf_counter() - t0
                    st = getattr(s, "last_stats", {}) or {}
                    out.append(
                        {
                            "method": name,
                            "config": asdict(cfg),
                            **compare(ev, ex, t, t_ex),
                            "work": st.get("work"),
                            "routed_exact": st.get("routed_exact", 0.0),
                            "levels": level_radii(
                                lvl.halfplane.radius, cfg.coarse_radius, cfg.coarse_fraction
                            ),
                            "build_seconds": round(t_build, 3),
                            "stats": st,
                        }
                    )
                if args.s0 > 0:
                    sampler = ImportanceSampler(N, ISConfig(s0=args.s0), schedule, args.seed)
                    sampler.update_exact(
                        idx, args.tau_prev, post.post_rot.cpu(), post.post_shift.cpu(), lvl.grid
                    )
                    t0 = time.perf_counter()
                    ev = ImportanceSampled(sampler, 2).evaluate(
                        V, batch, idx, lvl, args.tau_prev + 1, record=False
                    )
                    t = time.perf_counter() - t0
                    out.append(
                        {
                            "method": "importance",
                            "s0": args.s0,
                            **compare(ev, ex, t, t_ex),
                            "work": None,
                            "routed_exact": None,
                        }
                    )
                for r in out:
                    rows.append({**common, **r})
                    w = "-" if r["work"] is None else f"{r['work']:.4f}"
                    rx = "-" if r["routed_exact"] is None else f"{100 * r['routed_exact']:.0f}"
                    print(
                        f"{snr:>5g} {kind:>7} {res:>5g} {r['method']:>12} {r['rel_median']:>8.2e} "
                        f"{r['rel_p90']:>8.2e} {r['rel_max']:>8.2e} "
                        f"{r['nats_max']:>8.2f} {r['grad_cos']:>7.4f} "
                        f"{r['grad_rel']:>6.3f} {r['fraction']:>8.4f} "
                        f"{r['computed']:>8.4f} {w:>7} {rx:>6} "
                        f"{r['seconds']:>6.2f} {r['exact_seconds']:>7.2f}",
                        flush=True,
                    )
    result = {
        "benchmark": "search_accuracy",
        "dataset": {
            "structure": "GroEL-GroES (1AON)",
            "box": D,
            "apix": apix,
            "n_particles": N,
            "seed": args.seed,
            "shift_range_px": 3.0,
            "shift_sigma_px": shift_sigma_px,
        },
        "grid_scale": args.grid_scale,
        "lowpass_A": args.lowpass_A,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "machine": machine,
        "command": "benchmarks/search_accuracy.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
