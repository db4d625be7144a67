"""Assemble the run report: one self-contained HTML file (inline PNG figures, inline CSS,
no scripts, no network), written atomically so a browser never sees half a file.

Every section is built independently from whatever the run folder holds at that moment; a
missing file gives a short note instead of the figure, and a failure inside one section is
shown in that section without stopping the others (the driver rebuilds the report during
the run, so it must never take the run down).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .. import __version__
from ..progress import log
from ..runstate import folder_busy
from . import data, plots

#: Snapshots shown in the "progress" section (first, last and evenly spaced between).
MAX_SNAPSHOTS = 8
#: Browsers reload an unfinished run's report this often (seconds).
REFRESH_SECONDS = 60

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;\
color:#1d232a;background:#f4f6f8}
header{background:#1f3b57;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:22px;font-weight:600}
header .sub{opacity:.85;font-size:13px;margin-top:4px}
nav{background:#fff;border-bottom:1px solid #d8dee4;padding:8px 28px;font-size:13px}
nav a{margin-right:14px;color:#1f5f9c;text-decoration:none}
main{padding:8px 28px 40px;max-width:1300px}
section{background:#fff;border:1px solid #d8dee4;border-radius:6px;margin:16px 0;\
padding:10px 18px 14px}
h2{font-size:18px;margin:6px 0 8px;color:#1f3b57}
h3{font-size:15px;margin:12px 0 6px}
p.note,p.caption{font-size:13px;color:#4a5560;margin:6px 0}
p.missing{font-size:13px;color:#8a6d00;background:#fff8e0;border:1px solid #f0e0a0;\
padding:6px 10px;border-radius:4px}
p.error{font-size:13px;color:#8b1a1a;background:#fdecec;border:1px solid #f3c0c0;padding:6px 10px;\
border-radius:4px}
img{max-width:100%;height:auto;display:block;margin:6px 0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0}
.card{border:1px solid #d8dee4;border-radius:6px;padding:8px 12px;min-width:150px;\
background:#fafbfc}
.card .k{font-size:12px;color:#5b6670}
.card .v{font-size:19px;font-weight:600;margin-top:2px}
.status-finished{color:#1a7f37}.status-running{color:#1f5f9c}.status-stopped{color:#9a6700}
table{border-collapse:collapse;font-size:13px;margin:4px 0 8px}
td,th{border:1px solid #d8dee4;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f3f6}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f0f3f6;\
padding:1px 4px;border-radius:3px}
.cols{display:flex;flex-wrap:wrap;gap:24px}
.class-panel{border-top:1px solid #d8dee4;margin-top:12px;padding-top:2px}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _img(png: bytes, alt: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _table(rows, header=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


class _Context:
    """What the sections share: the run folder's contents, read once."""

    def __init__(
        self,
        run_dir: Path,
        reference,
        align: bool,
        level: float | None,
        mass_da: float | None = None,
    ):
        self.run_dir = run_dir
        self.info = data.read_run_info(run_dir) or {}
        self.metrics = data.read_metrics(run_dir)
        self.volume = data.read_map_quiet(run_dir / "volume.mrc")
        self.reference = None if reference is None else Path(reference)
        self.align = align
        self.level_override = level
        apix = self.info.get("apix")
        if not apix and self.volume is not None:
            apix = self.volume[1]
        self.apix = float(apix) if apix else 1.0
        diam_A = self.info.get("diameter_A") or (self.info.get("config") or {}).get("diameter_A")
        self.diameter_px = float(diam_A) / self.apix if diam_A else None
        mass = mass_da or self.info.get("mass_da") or (self.info.get("config") or {}).get("mass_da")
        self.mass_da = float(mass) if mass else None
        self.finished = bool(self.info.get("finished", False))
        # Running means a live process holds the run folder's lock (runstate.RunLock).
        self.running = not self.finished and folder_busy(run_dir)

    def level(self, vol: np.ndarray) -> float | None:
        if self.level_override is not None:
            return float(self.level_override)
        return plots.surface_level(vol, self.diameter_px, mass_da=self.mass_da, apix=self.apix)

    def volume_iteration(self) -> int | None:
        """Iteration of volume.mrc: the run's last iteration when finished, otherwise the
        last checkpoint (volume.mrc is rewritten with each checkpoint)."""
        last = self.metrics.last("iteration")
        if self.finished:
            return int(self.info.get("iterations") or (last or 0))
        if last is None:
            return None
        every = int((self.info.get("config") or {}).get("checkpoint_every") or 1)
        return int(last // every * every)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------


def _status(ctx: _Context) -> tuple[str, str]:
    """(css class, text): finished (converged), running (a live process holds the folder's
    lock), or stopped (ended at a limit or by a signal, or its process died)."""
    if ctx.finished:
        return "finished", f"finished ({ctx.info.get('stop_reason') or 'done'})"
    if ctx.running:
        return "running", "running" if ctx.metrics.last("iteration") is not None else "starting"
    if not ctx.info and ctx.metrics.last("iteration") is None:
        return "stopped", "no run data"
    reason = ctx.info.get("stop_reason")
    it = ctx.info.get("iterations") if reason else ctx.metrics.last("iteration")
    why = (
        f"at {reason}"
        if reason
        else "its process ended without finishing, e.g. killed; the map is the last checkpoint's"
    )
    return "stopped", f"stopped after {it} iterations, not converged ({why}; --resume continues it)"


def section_summary(ctx: _Context) -> str:
    m = ctx.metrics
    cls, text = _status(ctx)
    it = m.last("iteration")
    secs = m.last("seconds")
    if ctx.finished and ctx.info.get("seconds") is not None:
        secs = float(ctx.info["seconds"])
    ho = m.get("heldout_nll")
    best_ho = None
    if ho is not None:
        # best at the current cut-off: values at different cut-offs are not comparable
        om = m.get("omega_star")
        same = np.isfinite(ho) & ((om == m.last("omega_star")) if om is not None else True)
        best_ho = float(np.nanmin(ho[same])) if same.any() else None
    pe, pf = m.last("poses_evaluated"), m.last("poses_full")
    cards = [
        ("status", f'<span class="status-{cls}">{_e(text)}</span>'),
        ("iterations", _e(_fmt(int(it)) if it is not None else "-")),
        ("run time", _e(plots.format_seconds(secs) if secs is not None else "-")),
        ("epochs", _e(f"{m.last('epoch'):.2f}" if m.last("epoch") is not None else "-")),
        (
            "resolution cut-off",
            _e(f"{m.last('resolution_A'):.1f} Å" if m.last("resolution_A") else "-"),
        ),
        (
            "held-out error (latest / best at this cut-off)",
            _e(f"{m.last('heldout_nll'):.6g} / {best_ho:.6g}" if best_ho is not None else "-"),
        ),
        ("poses evaluated", _e(f"{pe / pf:.3g} of full" if pe is not None and pf else "-")),
        ("particles", _e(_fmt(ctx.info.get("n_particles")))),
        (
            "box, pixel",
            _e(f"{ctx.info.get('box')} px, {ctx.apix:.3g} Å" if ctx.info.get("box") else "-"),
        ),
    ]
    gs_res = data.finite_number(ctx.info.get("gold_standard_resolution_A"))
    if gs_res is not None:
        cards.insert(5, ("gold-standard resolution (half maps, FSC 0.143)", _e(f"{gs_res:.2f} Å")))
    body = (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )
    parts = [body]
    if ctx.info.get("particles"):
        parts.append(
            f'<p class="note">Particles: <code>{_e(ctx.info["particles"])}</code>. Run folder: '
            f"<code>{_e(ctx.run_dir.resolve())}</code>. The current map is <code>volume.mrc</code> "
            "in that folder (open it in ChimeraX).</p>"
        )
    if not ctx.info and not len(m):
        parts.append(_missing("No run.json or metrics.jsonl yet: the run has not started writing."))
    return "".join(parts)


def section_convergence(ctx: _Context) -> str:
    png = plots.plot_metrics(ctx.metrics)
    if png is None:
        return _missing(
            "metrics.jsonl has no records yet; the plots appear after the first iteration."
        )
    n = len(ctx.metrics)
    return (
        _img(png, "convergence plots")
        + '<p class="caption">Bottom axis: iteration; top axis: run time. Dotted vertical lines '
        "mark increases of the resolution cut-off ω*. <b>Error</b>: mean negative log-likelihood "
        "per particle; the held-out particles (never trained on) are the honest measure, and each "
        "increase of ω* adds Fourier coefficients and so shifts the curve. A run has converged "
        "when the held-out error stops falling at the final cut-off. <b>Step size</b>: SAGD steps "
        "by ε/L; the line search doubles L (triangles) when a step overshoots, and L decays "
        "slowly in between. <b>Fraction of poses</b>: with importance sampling only a fraction of "
        f'the quadrature is evaluated (1 = all).</p><p class="note">{n} iterations recorded'
        + (f" (plotted every {plots._stride(n)}th)" if plots._stride(n) > 1 else "")
        + ".</p>"
    )


def section_map(ctx: _Context) -> str:
    if ctx.volume is None:
        return _missing("volume.mrc not written yet (it appears with the first checkpoint).")
    vol, apix = ctx.volume
    it = ctx.volume_iteration()
    level = ctx.level(vol)
    parts = []
    when = f"iteration {it}" if it is not None else "latest checkpoint"
    parts.append(
        f'<p class="note">Map <code>volume.mrc</code> at {_e(when)}: box {vol.shape[0]}³, '
        f"{apix:.3g} Å/voxel ({vol.shape[0] * apix:.0f} Å wide); density range {vol.min():.3g} … "
        f"{vol.max():.3g}.</p>"
    )
    if not float(vol.max()) > float(vol.min()):
        parts.append(
            f'<p class="error">The map is flat (every voxel is {float(vol.max()):.3g}): there is '
            "no density to show. If this persists, the run has collapsed; check the pixel size, "
            "CTF parameters and --diameter, or try another --seed.</p>"
        )
    parts.append("<h3>Central slices and projections</h3>")
    parts.append(_slices(vol, apix, "central slices"))
    parts.append(
        '<p class="caption">Top: the central plane perpendicular to each axis (colour = density, '
        "shared scale). Bottom: projections (sums) along the same axes. Early in a run the map is "
        "blurred to the current cut-off; a good map shows compact density inside the particle "
        "diameter and an empty, flat background.</p>"
    )
    parts.append("<h3>Isosurface</h3>")
    how = _level_text(ctx, level) if level is not None else ""
    parts.append(_surface(vol, level, "isosurface", how))
    return "".join(parts)


def _slices(vol: np.ndarray, apix: float, alt: str) -> str:
    """Central slices and projections of a map (``apix`` Å/voxel) as an inline image."""
    return _img(plots.plot_slices(vol, apix), alt)


def _surface(vol: np.ndarray, level: float | None, alt: str, how: str) -> str:
    """The isosurface of a map at ``level`` (density units) as an inline image, with a
    caption giving the level and ``how`` it was chosen."""
    png = _img(plots.plot_isosurface(vol, level), alt)
    if level is None:
        return png + '<p class="caption">No surface: the map is flat.</p>'
    return png + f'<p class="caption">Surface at density level {_fmt(level)} {how}</p>'


def _level_text(ctx: _Context, level) -> str:
    if ctx.level_override is not None:
        return "(set by the user)."
    dust = (
        f" Pieces smaller than {plots.DUST_FRACTION:.0%} of the largest are hidden (dust), as "
        "ChimeraX's <code>surface dust</code> does."
    )
    if ctx.mass_da:
        vol_A3 = ctx.mass_da * plots.PROTEIN_A3_PER_DA
        return (
            f"(chosen automatically: the level that encloses the volume of "
            f"{ctx.mass_da / 1e3:.0f} kDa of protein, {vol_A3:.3g} Å<sup>3</sup> at "
            f"{plots.PROTEIN_A3_PER_DA} Å<sup>3</sup>/Da; in ChimeraX <code>volume #1 level "
            f"{_fmt(level)}</code> or <code>volume #1 encloseVolume {vol_A3:.4g}</code> shows "
            "the same surface)." + dust
        )
    d = ctx.diameter_px
    what = f"the particle diameter {d * ctx.apix:.0f} Å" if d else "80% of the box width"
    return (
        f"(chosen automatically: the level that encloses {plots.ENCLOSED_FRACTION:.0%} of the "
        f"volume of a sphere of {_e(what)}, so maps at different times are shown at comparable "
        f"size; in ChimeraX <code>volume #1 level {_fmt(level)}</code> shows the same surface; "
        "give the molecule's mass, <code>cryorecon report RUN --mass KDA</code>, for a level from "
        "its volume)." + dust
    )


def section_classes(ctx: _Context) -> str | None:
    """A run made with ``--classes K`` (K > 1): the class fractions over the run, then one
    panel per class map; ``None`` (no section) for a run with one class."""
    classes = data.read_classes(ctx.run_dir, ctx.info, ctx.metrics)
    if classes is None:
        return None
    png = plots.plot_class_fractions(ctx.metrics)
    if png is None:
        parts = [_missing("metrics.jsonl has no class fractions yet.")]
    else:
        parts = [
            _img(png, "class fractions"),
            '<p class="caption">Fraction of the particles in each class (the class priors '
            "estimated from the data) at each iteration. Early on the class posteriors are "
            "tempered towards uniform (<code>class_similarity</code> in "
            "<code>metrics.jsonl</code>), so the fractions stay near 1/K until the maps "
            "differ.</p>",
        ]
    known = [c for c in classes if c.fraction is not None]
    biggest = max(known, key=lambda c: c.fraction).number if known else None
    for c in classes:
        parts.append(_class_panel(ctx, c, c.number == biggest))
    return "".join(parts)


def _class_panel(ctx: _Context, c: data.ClassMap, biggest: bool) -> str:
    """One class: its file, fraction (%), particle count, central slices and surface."""
    title = f"Class {c.number}: <code>{_e(c.name)}</code>"
    facts = []
    if c.fraction is not None:
        facts.append(f"{c.fraction:.1%} of the particles (class prior)")
    if c.particles is not None:
        facts.append(f"{c.particles} particles assigned in <code>particles.star</code>")
    if biggest:
        facts.append("the most populated class, <code>volume.mrc</code>")
    parts = [f'<div class="class-panel"><h3>{title}</h3>']
    if facts:
        parts.append(f'<p class="note">{"; ".join(facts)}.</p>')
    if c.volume is None:
        why = "could not be read" if c.exists else "not written yet (it appears with a checkpoint)"
        parts.append(_missing(f"{c.name} {why}."))
        return "".join(parts) + "</div>"
    vol, apix = c.volume
    level = ctx.level(vol)
    how = "(chosen as for the current map)." if ctx.level_override is None else "(set by the user)."
    parts.append(_slices(vol, apix, f"central slices of class {c.number}"))
    parts.append(_surface(vol, level, f"isosurface of class {c.number}", how))
    return "".join(parts) + "</div>"


def _snapshot_items(ctx: _Context) -> list[tuple[int | None, str, Path | None]]:
    snaps = data.list_snapshots(ctx.run_dir)
    chosen = []
    if (ctx.run_dir / "initial.mrc").is_file():
        chosen.append((0, ctx.run_dir / "initial.mrc"))
    chosen.extend(snaps)
    vit = ctx.volume_iteration()
    if ctx.volume is not None and (not chosen or vit is None or vit > chosen[-1][0]):
        chosen.append((vit, None))  # the current map, already in memory
    if len(chosen) > MAX_SNAPSHOTS:
        idx = np.unique(np.round(np.linspace(0, len(chosen) - 1, MAX_SNAPSHOTS)).astype(int))
        chosen = [chosen[i] for i in idx]
    return [(it, p) for it, p in chosen]


def section_snapshots(ctx: _Context) -> str:
    chosen = _snapshot_items(ctx)
    if len(chosen) == 0:
        return _missing("No snapshots yet (initial.mrc, snapshots/volume_XXXXXX.mrc).")
    items = []
    for it, path in chosen:
        if path is None:
            vol = ctx.volume[0]
            name = "current (volume.mrc)"
        else:
            got = data.read_map_quiet(path)
            if got is None:
                continue
            vol = got[0]
            name = "initial (random spheres)" if it == 0 else f"iteration {it}"
        label = name
        if it:
            t = data.seconds_at(ctx.metrics, it)
            res = data.value_at(ctx.metrics, "resolution_A", it)
            extra = [
                plots.format_seconds(t) if t is not None else None,
                f"{res:.0f} Å" if res else None,
            ]
            extra = [x for x in extra if x]
            if path is None:
                label += f"\niteration {it}"
            if extra:
                label += "\n" + " · ".join(extra)
        items.append((label, vol, ctx.level(vol)))
    if not items:
        return _missing("The snapshot files could not be read yet.")
    png = plots.plot_snapshots(items)
    return (
        _img(png, "snapshots over time")
        + '<p class="caption">The map at several times (as in the paper\'s Fig. 6), oblique view, '
        "each at its own automatic level. The start is a random union of spheres; the gross shape "
        "usually settles within the first epochs, and finer detail follows as the cut-off rises. "
        "Snapshots are written every "
        f"{_e((ctx.info.get('config') or {}).get('snapshot_every', 'N'))} iterations to "
        "<code>snapshots/</code>.</p>"
    )


def section_fsc(ctx: _Context) -> str:
    if ctx.reference is None:
        return (
            '<p class="note">No reference given. With a reference map (e.g. the truth of '
            "simulated data, or a published map resampled to the same box and voxel size) run "
            "<code>cryorecon report RUN --reference REF.mrc --align</code> to add the Fourier "
            "shell correlation here.</p>"
        )
    import torch

    from ..validate import FSC_THRESHOLDS, fsc, resolution_at

    if ctx.volume is None:
        return _missing("volume.mrc not written yet; no FSC.")
    ref = data.read_map_quiet(ctx.reference)
    if ref is None:
        return f'<p class="error">Cannot read the reference map {_e(ctx.reference)}.</p>'
    vol, apix = ctx.volume
    refv, ref_apix = ref
    if refv.shape != vol.shape:
        return (
            f'<p class="error">The reference {_e(ctx.reference.name)} has box {refv.shape}, the '
            f"map {vol.shape}: resample it to the same grid first.</p>"
        )
    if not math.isclose(ref_apix, apix, rel_tol=1e-3):
        return (
            f'<p class="error">Voxel sizes differ: reference {ref_apix:.4f} Å, map {apix:.4f} '
            "Å.</p>"
        )
    parts = []
    moved = vol
    if ctx.align:
        from ..validate import align

        res = align(torch.from_numpy(refv), torch.from_numpy(vol), apix=apix, progress=False)
        moved = res.aligned.numpy()
        parts.append(
            '<p class="note">The map was aligned to the reference first (rotation, shift and '
            f"hand; {res.seconds:.0f} s): correlation {res.cc:.3f}; hand "
            f"<b>{'flipped' if res.flipped else 'kept'}</b>"
            + (
                f" (best with the other hand {res.cc_other_hand:.3f})"
                if math.isfinite(res.cc_other_hand)
                else ""
            )
            + '. An ab-initio map has an undetermined hand; "flipped" means the run found the '
            "mirror image, which <code>cryorecon align</code> corrects.</p>"
        )
    else:
        parts.append(
            '<p class="note">FSC computed directly, <b>assuming the map is already aligned</b> to '
            "the reference (an ab-initio map generally is not: rebuild the report with "
            "<code>--align</code>, or align with <code>cryorecon align</code>).</p>"
        )
    freq, curve = fsc(torch.from_numpy(refv), torch.from_numpy(np.ascontiguousarray(moved)), apix)
    resolutions = {thr: resolution_at(freq, curve, thr) for thr in FSC_THRESHOLDS}
    cutoff = ctx.metrics.last("resolution_A")
    png = plots.plot_fsc(
        freq.numpy(),
        curve.numpy(),
        resolutions,
        cutoff,
        title=f"{ctx.reference.name} vs volume.mrc" + (" (aligned)" if ctx.align else ""),
    )
    parts.append(_img(png, "FSC against the reference"))
    rows = [
        (f"FSC {thr:g}", f"{r:.2f} Å" if math.isfinite(r) else "not reached")
        for thr, r in resolutions.items()
    ]
    parts.append(_table(rows, ["threshold", "resolution"]))
    parts.append(
        '<p class="caption">Against a known reference, 0.5 is the usual threshold (0.143 is meant '
        "for two independent half maps). The run cannot resolve detail finer than the cut-off it "
        "has used (grey line); power beyond it comes from positivity and the prior (paper Fig. "
        "7).</p>"
    )
    return "".join(parts)


def section_halfmaps(ctx: _Context) -> str | None:
    """The gold-standard FSC of the run's two half maps (``run.json["gold_standard"]``);
    ``None`` (no section) when the run has no half maps."""
    if "gold_standard" not in ctx.info:
        return None
    gs = data.read_gold_standard(ctx.info)
    if gs is None:
        return _missing("run.json has a gold_standard entry, but its FSC curves cannot be read.")
    curves = {"unmasked": gs.unmasked, "masked": gs.masked, "corrected": gs.corrected}
    if gs.randomized is not None:
        curves["randomized"] = gs.randomized
    png = plots.plot_halfmap_fsc(
        gs.freq,
        curves,
        gs.resolution_A,
        gs.randomize_at_A,
        title=" vs ".join(
            ctx.info["gold_standard"].get("maps") or ["volume_half1.mrc", "volume_half2.mrc"]
        ),
    )
    res = f"{gs.resolution_A:.2f} Å" if gs.resolution_A is not None else "not reached"
    rows = [
        ("gold-standard resolution (corrected masked FSC 0.143)", res),
        (
            "halves refined to (cut-off; the stated resolution is no finer)",
            f"{gs.refined_to_A:.2f} Å" if gs.refined_to_A is not None else "-",
        ),
        (
            "corrected FSC 0.143 as measured",
            f"{gs.resolution_measured_A:.2f} Å" if gs.resolution_measured_A is not None else "-",
        ),
        (
            "unmasked FSC 0.143",
            f"{gs.resolution_unmasked_A:.2f} Å" if gs.resolution_unmasked_A is not None else "-",
        ),
        (
            "phases randomised beyond",
            f"{gs.randomize_at_A:.1f} Å" if gs.randomize_at_A is not None else "no randomisation",
        ),
        ("mask", gs.mask or "-"),
    ]
    parts = [_img(png, "half-map FSC"), _table(rows, ["", ""])]
    for w in gs.warnings:
        parts.append(f'<p class="missing">{_e(w)}</p>')
    parts.append(
        '<p class="caption">Fourier shell correlation between the two half-set '
        "reconstructions: each half's particles back-projected with the poses found for them "
        "(<code>backprojection_half1/2.mrc</code>), the halves being refined independently "
        "after a joint low-resolution start. "
        "<b>Unmasked</b>: the whole boxes; <b>masked</b>: both multiplied by the solvent mask; "
        "<b>phase-randomised</b>: the same after replacing the phases of both halves by random "
        "ones beyond the shell where the unmasked FSC drops below 0.8, which measures the "
        "correlation the mask itself adds; <b>corrected</b>: (masked - randomised) / (1 - "
        "randomised) (Chen et al. 2013, as RELION's postprocess). The resolution is where the "
        "corrected curve drops below 0.143, the criterion for half maps (Rosenthal &amp; "
        "Henderson 2003), stated no finer than the cut-off the halves were refined to; "
        "<code>volume.mrc</code> is the average of the refined halves "
        "(<code>volume_half1/2.mrc</code>) weighted by this FSC.</p>"
    )
    return "".join(parts)


def section_directions(ctx: _Context) -> str:
    d = data.read_directions(ctx.run_dir)
    if d is None:
        return _missing("poses.npz (per-particle view directions) not written yet.")
    png, n = plots.plot_directions(d)
    return (
        _img(png, "view-direction distribution")
        + f'<p class="caption">Most probable view direction of {n} of {len(d)} particles'
        + (" (the others are not visited yet)" if n < len(d) else "")
        + ", on an equal-area (Mollweide) world map: azimuth atan2(y, x) left to right, elevation "
        "asin(z) bottom to top (elevation ±90° = direction ±z, the top and bottom views). Colour "
        "is the density of views relative to a uniform distribution over the sphere. Preferred "
        "orientation shows as bright bands or spots and dark, empty regions (paper Fig. 10: an "
        "equatorial belt); views missing from whole regions limit the resolution along the "
        "corresponding direction.</p>"
    )


def section_parameters(ctx: _Context) -> str:
    info = ctx.info
    if not info:
        return _missing("run.json not written yet.")
    parts = []
    top = [
        (k, _fmt(info.get(k)))
        for k in (
            "particles",
            "n_particles",
            "n_heldout",
            "n_minibatches",
            "box",
            "apix",
            "diameter_A",
            "shift_sigma_A",
        )
        if k in info
    ]
    parts.append('<div class="cols"><div><h3>Data</h3>' + _table(top, ["", "value"]) + "</div>")
    cfg = info.get("config") or {}
    parts.append(
        "<div><h3>Parameters</h3>"
        + _table([(k, _fmt(v)) for k, v in cfg.items()], ["option", "value"])
        + "</div>"
    )
    # timings
    m = ctx.metrics
    rows = [
        ("status", _status(ctx)[1]),
        ("iterations", _fmt(info.get("iterations") if ctx.finished else m.last("iteration"))),
        (
            "run time",
            plots.format_seconds(info.get("seconds") if ctx.finished else m.last("seconds")),
        ),
    ]
    it, sec = m.get("iteration"), m.get("seconds")
    if it is not None and sec is not None and len(it) >= 2:
        total = float(sec[-1] - sec[0]) / max(1.0, float(it[-1] - it[0]))
        rows.append(("mean time per iteration", f"{total:.3g} s"))
        k = max(0, len(it) - 101)
        recent = float(sec[-1] - sec[k]) / max(1.0, float(it[-1] - it[k]))
        rows.append(("recent time per iteration", f"{recent:.3g} s"))
    timing = _table(rows, ["", ""])
    res = m.get("resolution_A")
    if it is not None and res is not None:
        lv = []
        prev = None
        for i in range(len(it)):
            r = res[i]
            if np.isfinite(r) and r != prev:
                t = sec[i] if sec is not None else None
                lv.append(
                    (f"{r:.1f} Å", int(it[i]), plots.format_seconds(t) if t is not None else "-")
                )
                prev = r
        if len(lv) > 40:
            lv = lv[:: math.ceil(len(lv) / 40)] + [lv[-1]]
        timing += "<h3>Cut-off reached</h3>" + _table(lv, ["cut-off", "at iteration", "at time"])
    parts.append("<div><h3>Timings</h3>" + timing + "</div>")
    vers = dict(info.get("versions") or {})
    vrows = [(k, _fmt(v)) for k, v in vers.items()]
    import matplotlib

    vrows.append(
        (
            "report made with",
            f"cryorecon {__version__}, numpy {np.__version__}, matplotlib "
            f"{matplotlib.__version__}, Python {sys.version.split()[0]}",
        )
    )
    parts.append("<div><h3>Versions</h3>" + _table(vrows, ["", "version"]) + "</div>")
    mach = info.get("machine") or {}
    mrows = [(k, _fmt(v)) for k, v in mach.items()]
    parts.append(
        "<div><h3>Machine</h3>"
        + (_table(mrows, ["", ""]) if mrows else _missing("not recorded"))
        + "</div></div>"
    )
    return "".join(parts)


def section_files(ctx: _Context) -> str:
    rows = []
    try:
        entries = sorted(ctx.run_dir.iterdir())
    except OSError:
        entries = []
    for p in entries:
        if p.name.startswith("."):
            continue
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_dir():
            n = sum(1 for _ in p.iterdir())
            rows.append(
                (
                    p.name + "/",
                    f"{n} files",
                    _dt.datetime.fromtimestamp(st.st_mtime).strftime("%Y-%m-%d %H:%M:%S"),
                )
            )
        else:
            rows.append(
                (
                    p.name,
                    _size(st.st_size),
                    _dt.datetime.fromtimestamp(st.st_mtime).strftime("%Y-%m-%d %H:%M:%S"),
                )
            )
    return _table(rows, ["file", "size", "modified"]) if rows else _missing("empty folder")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


SECTIONS = [
    ("summary", "Summary", section_summary),
    ("convergence", "Convergence", section_convergence),
    ("map", "Current map", section_map),
    ("classes", "Classes", section_classes),
    ("snapshots", "Progress over time", section_snapshots),
    ("halfmaps", "Half-map FSC", section_halfmaps),
    ("fsc", "FSC against a reference", section_fsc),
    ("directions", "View directions", section_directions),
    ("parameters", "Run parameters, versions, timings and machine", section_parameters),
    ("files", "Files", section_files),
]


def build_html(
    run_dir,
    reference=None,
    align: bool = False,
    level: float | None = None,
    mass_da: float | None = None,
) -> str:
    """The report page as a string (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    ctx = _Context(run_dir, reference, align, level, mass_da)
    body = []
    shown = []
    for key, title, fn in SECTIONS:
        t0 = time.perf_counter()
        try:
            content = fn(ctx)
            if content is None:  # a section that does not apply to this run
                continue
        except Exception as exc:  # one broken section must not lose the others (or the run)
            log.warning(f"report: section '{title}' failed: {exc!r}")
            log.debug(traceback.format_exc())
            content = f'<p class="error">This section could not be built: {_e(repr(exc))}</p>'
        log.debug(f"report: {key} in {time.perf_counter() - t0:.2f} s")
        body.append(f'<section id="{key}"><h2>{_e(title)}</h2>{content}</section>')
        shown.append((key, title))
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    refresh = "" if not ctx.running else f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">'
    nav = "".join(f'<a href="#{k}">{_e(t.split(",")[0])}</a>' for k, t in shown)
    sub = f"Updated {now}"
    if ctx.running:
        sub += f" · reloads every {REFRESH_SECONDS} s while the run is running"
    sub += f" · {platform.node()}" if platform.node() else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}'
        "<title>cryorecon report: "
        f"{_e(run_dir.resolve().name)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>cryorecon run report — {_e(run_dir.resolve().name)}</h1>"
        f'<div class="sub">{_e(sub)}</div></header><nav>{nav}</nav><main>'
        + "".join(body)
        + f'<p class="note">Written by cryorecon {_e(__version__)}; rebuild with <code>cryorecon '
        f"report {_e(run_dir)}</code>. Ab-initio reconstruction after Punjani, Brubaker &amp; "
        'Fleet, "Building Proteins in a Day", TPAMI 2017.</p></main></body></html>\n'
    )


def write_report(
    run_dir,
    reference=None,
    out=None,
    *,
    align: bool = False,
    level: float | None = None,
    mass_da: float | None = None,
) -> Path:
    """Write the run report for ``run_dir`` and return its path.

    Args:
        run_dir: a run folder written by ``cryorecon reconstruct`` (any stage of the run).
        reference: optional reference map (same box and voxel size) for an FSC section.
        out: where to write (default ``run_dir/report.html``).
        align: align the map to ``reference`` (rotation, shift, hand) before the FSC; takes
            tens of seconds. Without it the FSC assumes the maps are already aligned.
        level: isosurface level (default: chosen automatically, see
            :func:`cryorecon.report.plots.surface_level`).
        mass_da: the molecule's mass in daltons; the automatic level then encloses its
            volume (default: ``mass_da`` in run.json or its config, else a fraction of the
            particle's sphere).

    The file is self-contained (inline PNG figures and CSS, no scripts, no network) and is
    replaced atomically (written to a temporary file in the same folder, then renamed).
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    page = build_html(run_dir, reference=reference, align=align, level=level, mass_da=mass_da)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def refresh_report(run_dir, **kw) -> Path | None:
    """:func:`write_report` for the driver's periodic refresh: never raises (a failure is
    logged as a warning and ``None`` returned), so a report problem cannot stop a run."""
    try:
        return write_report(run_dir, **kw)
    except Exception as exc:  # noqa: BLE001 - the run matters more than its report
        log.warning(f"could not write the run report in {run_dir}: {exc!r}")
        return None
