"""Figures of the run report, each returned as PNG bytes.

Everything draws on matplotlib's Agg canvas through ``matplotlib.figure.Figure`` (never
pyplot), so it works headless, in threads, and leaves the global backend alone.

Isosurfaces: marching cubes (``skimage.measure.marching_cubes``) on the map, block-averaged
to at most :data:`MAX_SURFACE_BOX` voxels a side (maps of half that or less are interpolated
to twice their size for a smoother surface), drawn as a ``Poly3DCollection`` with
flat Lambert shading from a light near the viewer. The contour level comes from
:func:`surface_level`: the level that encloses the molecule's expected volume when its mass
is known (:data:`PROTEIN_A3_PER_DA` Å^3 per dalton, as ChimeraX's ``volume ... encloseVolume``),
otherwise a fixed volume (:data:`ENCLOSED_FRACTION` of the particle's sphere), so maps taken
at different times are shown at comparable sizes whatever their scale. Dust is hidden as
ChimeraX's "hide dust" does (:func:`hide_dust`): connected pieces above the level smaller
than :data:`DUST_FRACTION` of the largest piece are not drawn.
"""

from __future__ import annotations

import io
import math

import numpy as np

#: Maps bigger than this are block-averaged before marching cubes (speed).
MAX_SURFACE_BOX = 64
#: More faces than this and the surface is recomputed on a coarser grid (speed).
MAX_FACES = 30000
#: Without a mass, the isosurface encloses this fraction of the volume of the particle's sphere.
ENCLOSED_FRACTION = 0.2
#: Partial specific volume of protein: Å^3 per dalton (density 1.37 g/cm^3).
PROTEIN_A3_PER_DA = 1.21
#: Pieces of the surface with fewer voxels than this fraction of the largest piece are dust.
DUST_FRACTION = 0.05
#: The three viewpoints (matplotlib elevation, azimuth in degrees) and their names.
VIEWS = (
    (90.0, -90.0, "down z (x right, y up)"),
    (0.0, -90.0, "along +y (x right, z up)"),
    (25.0, -55.0, "oblique"),
)
#: The same viewpoints in the density's principal axes (:func:`principal_axes`).
PRINCIPAL_VIEWS = (
    (90.0, -90.0, "down the long axis"),
    (0.0, -90.0, "side (long axis up)"),
    (25.0, -55.0, "oblique"),
)
SURFACE_RGB = (0.45, 0.66, 0.90)
DPI = 90


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def format_seconds(s: float) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _time_unit(max_seconds: float) -> tuple[float, str]:
    if max_seconds < 120:
        return 1.0, "s"
    if max_seconds < 7200:
        return 60.0, "min"
    return 3600.0, "h"


# ---------------------------------------------------------------------------------------------
# convergence plots
# ---------------------------------------------------------------------------------------------

MAX_POINTS = 3000


def _stride(n: int) -> int:
    return max(1, math.ceil(n / MAX_POINTS))


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return y
    ok = np.isfinite(y)
    v = np.where(ok, y, 0.0)
    k = np.ones(window)
    num = np.convolve(v, k, mode="same")
    den = np.convolve(ok.astype(float), k, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def plot_metrics(metrics) -> bytes | None:
    """Four panels against iteration (bottom axis) and run time (top axis): held-out and
    training error, resolution cut-off, step size and Lipschitz estimate, fraction of
    poses evaluated. ``None`` when there are no records yet."""
    it = metrics.get("iteration")
    if it is None or len(metrics) == 0:
        return None
    n = len(it)
    s = _stride(n)
    sl = slice(None, None, s)
    sec = metrics.get("seconds")
    omega = metrics.get("omega_star")

    fig = _figure(12.0, 7.6)
    axes = fig.subplots(2, 2)
    (a_err, a_res), (a_step, a_pose) = axes

    # omega* changes: dotted guides on every panel
    changes = []
    if omega is not None:
        ok = np.isfinite(omega)
        w = omega[ok]
        iw = it[ok]
        changes = list(iw[1:][np.diff(w) != 0])
        if len(changes) > 60:
            changes = changes[:: math.ceil(len(changes) / 60)]

    # 1. held-out and training error
    tr = metrics.get("train_nll")
    ho = metrics.get("heldout_nll")
    if tr is not None:
        a_err.plot(it[sl], tr[sl], color="C0", lw=0.6, alpha=0.3)
        a_err.plot(
            it[sl],
            _smooth(tr, max(1, n // 60))[sl],
            color="C0",
            lw=1.4,
            label="training minibatch (smoothed)",
        )
    if ho is not None:
        ok = np.isfinite(ho)
        a_err.plot(it[ok], ho[ok], "o-", color="C3", ms=3, lw=1.4, label="held-out particles")
    if tr is not None or ho is not None:
        vals = np.concatenate([x[np.isfinite(x)] for x in (tr, ho) if x is not None])
        lo, hi = np.percentile(vals, [1, 99]) if vals.size > 20 else (vals.min(), vals.max())
        pad = 0.08 * (hi - lo) if hi > lo else abs(hi) * 0.05 + 1.0
        a_err.set_ylim(lo - pad, hi + pad)
        a_err.legend(fontsize=8, loc="upper right")
    else:
        _no_data(a_err)
    a_err.set_title("Error: negative log-likelihood per particle (lower is better)", fontsize=10)
    a_err.set_ylabel("−log p(image | map)")

    # 2. resolution cut-off
    res = metrics.get("resolution_A")
    if res is None and omega is not None:
        with np.errstate(divide="ignore"):
            res = 1.0 / omega
    if res is not None:
        a_res.step(it[sl], res[sl], where="post", color="C2", lw=1.6)
        last = metrics.last("resolution_A") or (
            1.0 / metrics.last("omega_star") if omega is not None else None
        )
        if last:
            a_res.annotate(
                f"now {last:.1f} Å",
                xy=(it[-1], last),
                xytext=(-8, 8),
                textcoords="offset points",
                ha="right",
                fontsize=9,
                color="C2",
            )
    else:
        _no_data(a_res)
    a_res.set_title("Resolution cut-off 1/ω* (lower = finer detail used)", fontsize=10)
    a_res.set_ylabel("Å")

    # 3. step size and Lipschitz estimate
    L = metrics.get("L")
    eps = metrics.get("epsilon")
    if L is not None:
        okL = np.isfinite(L) & (L > 0)
        a_step.plot(it[okL][::s], L[okL][::s], color="C4", lw=1.3, label="Lipschitz estimate L")
        a_step.set_yscale("log")
        a_step.set_ylabel("L", color="C4")
        dbl = metrics.get("line_search_doublings")
        if dbl is not None:
            hit = np.isfinite(dbl) & (dbl > 0) & okL
            if hit.any():
                a_step.plot(it[hit], L[hit], "^", color="C4", ms=4, label="line search doubled L")
        if eps is not None:
            a2 = a_step.twinx()
            okS = okL & np.isfinite(eps)
            a2.plot(
                it[okS][::s], (eps[okS] / L[okS])[::s], color="C1", lw=1.3, label="step size ε/L"
            )
            a2.set_yscale("log")
            a2.set_ylabel("step ε/L", color="C1")
            h1, l1 = a_step.get_legend_handles_labels()
            h2, l2 = a2.get_legend_handles_labels()
            a_step.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
        else:
            a_step.legend(fontsize=8, loc="upper right")
    else:
        _no_data(a_step)
    a_step.set_title("SAGD step size and Lipschitz estimate", fontsize=10)

    # 4. fraction of poses evaluated
    pe, pf = metrics.get("poses_evaluated"), metrics.get("poses_full")
    if pe is not None and pf is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = pe / pf
        ok = np.isfinite(frac) & (frac > 0)
        a_pose.plot(
            it[ok][::s],
            frac[ok][::s],
            color="C5",
            lw=1.4,
            label="poses evaluated / full quadrature",
        )
        a_pose.set_yscale("log")
        top = max(1.5, float(np.nanmax(frac[ok])) * 1.5) if ok.any() else 1.5
        bottom = min(0.5, float(np.nanmin(frac[ok])) / 2) if ok.any() else 0.5
        chk = metrics.get("is_check_rel_error")
        if chk is not None and (np.isfinite(chk) & (chk > 0)).any():
            okc = np.isfinite(chk) & (chk > 0)
            a_pose.plot(
                it[okc],
                chk[okc],
                "x",
                color="C3",
                ms=5,
                label="held-out check: rel. error of sampled log p",
            )
            a_pose.axhline(1e-3, color="C3", lw=0.8, ls="--", label="0.1% (paper's bound)")
            bottom = min(bottom, float(chk[okc].min()) / 2)
        a_pose.set_ylim(bottom, top)
        a_pose.set_ylabel("fraction")
        kl = metrics.get("kl_directions")
        if kl is not None:
            a3 = a_pose.twinx()
            okk = np.isfinite(kl)
            a3.plot(it[okk][::s], kl[okk][::s], color="C7", lw=1.0, label="KL of view directions")
            a3.set_ylabel("KL (nats)", color="C7")
            h1, l1 = a_pose.get_legend_handles_labels()
            h2, l2 = a3.get_legend_handles_labels()
            a_pose.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
        else:
            a_pose.legend(fontsize=8, loc="lower left")
    else:
        _no_data(a_pose)
    a_pose.set_title("Fraction of poses evaluated (importance sampling)", fontsize=10)

    for ax in axes.ravel():
        for c in changes:
            ax.axvline(c, color="0.6", lw=0.6, ls=":", zorder=0)
        ax.grid(alpha=0.25)
        ax.set_xlabel("iteration")
        if n == 1:
            ax.set_xlim(it[0] - 1, it[0] + 1)
        _time_axis(ax, it, sec)
    # fixed margins: tight_layout would draw the whole figure once more (slow with log axes)
    fig.subplots_adjust(left=0.075, right=0.93, bottom=0.07, top=0.91, wspace=0.45, hspace=0.5)
    return to_png(fig)


def plot_class_fractions(metrics) -> bytes | None:
    """Each class's fraction (its prior, 0..1) against iteration (bottom axis) and run time
    (top axis), one line per class labelled "class 1" ...; ``None`` when the metrics have
    no ``class_fractions``."""
    it, fr = metrics.get("iteration"), metrics.class_fractions
    if it is None or fr is None or not np.isfinite(fr).any():
        return None
    s = _stride(len(it))
    fig = _figure(9.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for j in range(fr.shape[1]):
        ok = np.isfinite(it) & np.isfinite(fr[:, j])
        ax.plot(it[ok][::s], fr[ok, j][::s], color=f"C{j % 10}", lw=1.5, label=f"class {j + 1}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of particles")
    ax.set_xlabel("iteration")
    if len(it) == 1:
        ax.set_xlim(it[0] - 1, it[0] + 1)
    ax.set_title("Class fractions (class priors)", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", ncol=min(fr.shape[1], 6))
    _time_axis(ax, it, metrics.get("seconds"))
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.13, top=0.82)
    return to_png(fig)


def _no_data(ax) -> None:
    ax.text(
        0.5, 0.5, "not recorded yet", ha="center", va="center", transform=ax.transAxes, color="0.5"
    )


def _time_axis(ax, it: np.ndarray, sec: np.ndarray | None) -> None:
    """Add a top axis with the run time matching the iteration axis."""
    if sec is None:
        return
    ok = np.isfinite(it) & np.isfinite(sec)
    if ok.sum() < 2:
        return
    x = it[ok]
    t = np.maximum.accumulate(sec[ok])
    # make both strictly increasing for a well-defined inverse
    t = t + np.arange(len(t)) * 1e-9 * max(1.0, float(t[-1]))
    scale, unit = _time_unit(float(t[-1]))
    tt = t / scale

    def fwd(v):
        return _interp_extrapolate(v, x, tt)

    def inv(v):
        return _interp_extrapolate(v, tt, x)

    top = ax.secondary_xaxis("top", functions=(fwd, inv))
    top.set_xlabel(f"run time ({unit})", fontsize=8)
    top.tick_params(labelsize=8)


def _interp_extrapolate(v, xp: np.ndarray, fp: np.ndarray):
    """Piecewise-linear interpolation, extended linearly beyond the ends (axis limits may
    reach a little past the data)."""
    v = np.asarray(v, dtype=float)
    out = np.interp(v, xp, fp)
    lo_slope = (fp[1] - fp[0]) / (xp[1] - xp[0]) if xp[1] != xp[0] else 0.0
    hi_slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2]) if xp[-1] != xp[-2] else 0.0
    out = np.where(v < xp[0], fp[0] + (v - xp[0]) * lo_slope, out)
    out = np.where(v > xp[-1], fp[-1] + (v - xp[-1]) * hi_slope, out)
    return out


# ---------------------------------------------------------------------------------------------
# slices
# ---------------------------------------------------------------------------------------------


def plot_slices(vol: np.ndarray, apix: float) -> bytes:
    """Central slices (top row) and projections (bottom row) along z, y and x."""
    D = vol.shape
    c = [s // 2 for s in D]
    slices = [vol[c[0], :, :], vol[:, c[1], :], vol[:, :, c[2]]]
    projs = [vol.sum(axis=0), vol.sum(axis=1), vol.sum(axis=2)]
    names = [("z", "x", "y"), ("y", "x", "z"), ("x", "y", "z")]
    stack = np.concatenate([s.ravel() for s in slices])
    lo, hi = np.percentile(stack, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(stack.min()), float(stack.max()) + 1e-12
    fig = _figure(10.6, 7.0)
    axes = fig.subplots(2, 3)
    im = None
    for j in range(3):
        ax = axes[0, j]
        im = ax.imshow(
            slices[j], origin="lower", cmap="magma", vmin=lo, vmax=hi, interpolation="nearest"
        )
        a, h, v = names[j]
        ax.set_title(f"central slice {a} = {c[j]}  ({h} →, {v} ↑)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax2 = axes[1, j]
        p = projs[j]
        plo, phi = np.percentile(p, [0.5, 99.8])
        ax2.imshow(
            p,
            origin="lower",
            cmap="gray",
            vmin=plo,
            vmax=phi if phi > plo else plo + 1e-12,
            interpolation="nearest",
        )
        ax2.set_title(f"projection along {a}", fontsize=10)
        ax2.set_xticks([])
        ax2.set_yticks([])
    _scale_bar(axes[0, 0], D[2], apix)
    fig.subplots_adjust(left=0.01, right=0.9, bottom=0.01, top=0.95, wspace=0.04, hspace=0.1)
    top = axes[0, 2].get_position()
    cax = fig.add_axes((0.915, top.y0, 0.014, top.height))
    fig.colorbar(im, cax=cax, label="density")
    return to_png(fig)


def _scale_bar(ax, D: int, apix: float) -> None:
    length_A = _nice(0.25 * D * apix)
    px = length_A / apix
    x0, y0 = 0.05 * D, 0.05 * D
    ax.plot([x0, x0 + px], [y0, y0], color="white", lw=3)
    ax.text(
        x0 + px / 2,
        y0 + 0.03 * D,
        f"{length_A:g} Å",
        color="white",
        ha="center",
        va="bottom",
        fontsize=9,
    )


def _nice(x: float) -> float:
    if x <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(x))
    for m in (5, 2, 1):
        if m * e <= x:
            return m * e
    return e


# ---------------------------------------------------------------------------------------------
# isosurfaces
# ---------------------------------------------------------------------------------------------


def enclosed_voxels(mass_da: float, apix: float) -> float:
    """Voxels of ``apix`` Å filled by protein of ``mass_da`` daltons
    (``mass * PROTEIN_A3_PER_DA / apix^3``)."""
    return float(mass_da) * PROTEIN_A3_PER_DA / float(apix) ** 3


def surface_level(
    vol: np.ndarray,
    diameter_px: float | None = None,
    fraction: float = ENCLOSED_FRACTION,
    *,
    mass_da: float | None = None,
    apix: float | None = None,
) -> float | None:
    """Contour level enclosing ``n`` voxels: the ``1 - n/D^3`` quantile of the voxel values.

    With ``mass_da`` (daltons) and ``apix`` (Å/voxel), ``n`` is the molecule's expected volume
    (:func:`enclosed_voxels`); otherwise ``n = fraction * pi d^3 / 6`` for a sphere of
    ``diameter_px`` voxels (default 80% of the box). ``n`` is kept within ``[1e-4, 0.5]`` of
    the box. ``None`` for a flat map."""
    vmin, vmax = float(vol.min()), float(vol.max())
    if not vmax > vmin:
        return None
    if mass_da and mass_da > 0 and apix and apix > 0:
        n = enclosed_voxels(mass_da, apix)
    else:
        d = diameter_px if diameter_px and diameter_px > 0 else 0.8 * min(vol.shape)
        n = fraction * math.pi * d**3 / 6.0
    q = 1.0 - min(0.5, max(n / vol.size, 1e-4))
    level = float(np.quantile(vol, q))
    if not vmin < level < vmax:
        level = vmin + 0.5 * (vmax - vmin)
    return level


def hide_dust(vol: np.ndarray, level: float, size_fraction: float = DUST_FRACTION) -> np.ndarray:
    """``vol`` with its dust below ``level``: the connected pieces of ``vol > level``
    (26-connected voxels) with fewer voxels than ``size_fraction`` of the largest piece are
    set to the map's minimum, so no surface is drawn around them (ChimeraX's "hide dust",
    measured in voxels). Returns ``vol`` itself when there is nothing to hide."""
    from scipy import ndimage

    labels, count = ndimage.label(vol > level, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return vol
    sizes = np.bincount(labels.ravel())[1:]
    dust = np.flatnonzero(sizes < size_fraction * sizes.max()) + 1
    if len(dust) == 0:
        return vol
    out = np.array(vol, copy=True)
    out[np.isin(labels, dust)] = float(vol.min())
    return out


def _downsample(vol: np.ndarray, max_box: int) -> tuple[np.ndarray, float]:
    """``vol`` block-averaged by an integer factor ``f`` to at most ``max_box`` a side, or,
    when it is at most half of ``max_box``, interpolated to twice its size (cubic spline,
    ``f = 1/2``) for a smoother surface. Voxel ``i`` of the result sits at ``i f + (f-1)/2``
    of ``vol``."""
    if 2 * max(vol.shape) <= max_box:
        from scipy import ndimage

        return ndimage.zoom(vol, 2, order=3, mode="nearest", grid_mode=True), 0.5
    f = math.ceil(max(vol.shape) / max_box)
    if f <= 1:
        return vol, 1
    shp = [s // f * f for s in vol.shape]
    v = vol[: shp[0], : shp[1], : shp[2]]
    v = v.reshape(shp[0] // f, f, shp[1] // f, f, shp[2] // f, f).mean(axis=(1, 3, 5))
    return v, f


def surface(
    vol: np.ndarray,
    level: float,
    max_box: int = MAX_SURFACE_BOX,
    max_faces: int = MAX_FACES,
    dust: float | None = DUST_FRACTION,
):
    """Triangles of the isosurface as an (F, 3, 3) array of (x, y, z) vertex positions in
    voxels of the original map, relative to the box centre; ``None`` if there is none.
    Pieces smaller than ``dust`` of the largest are left out (:func:`hide_dust`; ``None``
    keeps every piece)."""
    try:
        from skimage.measure import marching_cubes
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        raise ImportError("isosurfaces need scikit-image (pip install scikit-image)") from exc

    v, f = _downsample(np.asarray(vol, dtype=np.float32), max_box)
    if not float(v.min()) < level < float(v.max()):
        return None
    if dust:
        v = hide_dust(v, level, dust)
    step = 1
    while True:
        try:
            verts, faces, _, _ = marching_cubes(v, level, step_size=step, allow_degenerate=False)
        except (ValueError, RuntimeError):
            return None
        if len(faces) <= max_faces or step >= 4:
            break
        step += 1
    if len(faces) == 0:
        return None
    xyz = (
        verts[:, ::-1] * f
        + (f - 1) / 2.0
        - np.array([s // 2 for s in vol.shape[::-1]], dtype=float)
    )
    return xyz[faces]


def _eye(elev: float, azim: float) -> np.ndarray:
    e, a = math.radians(elev), math.radians(azim)
    return np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])


def _draw_surface(
    ax, tris: np.ndarray | None, elev: float, azim: float, half: float, rgb=SURFACE_RGB
) -> None:
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    if tris is not None and len(tris):
        n = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
        n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
        light = _eye(min(elev + 30.0, 89.0), azim - 35.0)
        lam = np.abs(n @ light)
        shade = 0.28 + 0.72 * lam
        col = np.empty((len(tris), 4))
        col[:, :3] = np.asarray(rgb)[None, :] * shade[:, None]
        col[:, 3] = 1.0
        # edges in the face colour hide the anti-aliasing seams between triangles
        pc = Poly3DCollection(tris, facecolors=col, edgecolors=col, linewidths=0.25)
        ax.add_collection3d(pc)
    else:
        ax.text2D(
            0.5, 0.5, "no surface", ha="center", va="center", transform=ax.transAxes, color="0.5"
        )
    ax.set_xlim(-half, half)
    ax.set_ylim(-half, half)
    ax.set_zlim(-half, half)
    ax.set_box_aspect((1, 1, 1), zoom=1.25)
    ax.view_init(elev=elev, azim=azim)
    ax.set_axis_off()


def _half_extent(tris_list, default: float) -> float:
    m = 0.0
    for t in tris_list:
        if t is not None and len(t):
            m = max(m, float(np.abs(t).max()))
    return 1.08 * m if m > 0 else default


def principal_axes(tris: np.ndarray) -> np.ndarray:
    """Rotation ``R`` (3x3, ``det R = +1``) whose rows are the principal axes of a surface's
    vertices ((x, y, z) positions), shortest first: ``tris @ R.T`` has its longest extent
    along z. Each axis points away from the side with the larger third moment (a unique
    frame; seen down z, a capped barrel such as GroEL-GroES shows its open end)."""
    pts = tris.reshape(-1, 3)
    pts = pts - pts.mean(axis=0)
    _, vecs = np.linalg.eigh(pts.T @ pts)  # ascending variance: columns short .. long
    R = vecs.T.copy()
    skew = ((pts @ R.T) ** 3).sum(axis=0)
    R[skew > 0] *= -1.0
    if np.linalg.det(R) < 0:
        R[0] *= -1.0
    return R


def plot_isosurface(vol: np.ndarray, level: float | None, orient: bool = True) -> bytes:
    """The isosurface at ``level`` seen from :data:`VIEWS`, or with ``orient`` (default)
    turned into its principal axes first (:func:`principal_axes`, views
    :data:`PRINCIPAL_VIEWS`): an ab-initio map has no preferred orientation in its box, and
    down its long axis a barrel or a ring shows its channel."""
    tris = surface(vol, level) if level is not None else None
    views = VIEWS
    if orient and tris is not None and len(tris):
        centre = tris.reshape(-1, 3).mean(axis=0)
        tris = (tris - centre) @ principal_axes(tris).T
        views = PRINCIPAL_VIEWS
    half = _half_extent([tris], min(vol.shape) / 2)
    fig = _figure(12.0, 4.2)
    for i, (el, az, name) in enumerate(views):
        ax = fig.add_subplot(1, len(views), i + 1, projection="3d")
        _draw_surface(ax, tris, el, az, half)
        ax.set_title(name, fontsize=10, y=0.98)
    fig.subplots_adjust(left=0, right=1, bottom=0, top=0.93, wspace=0)
    return to_png(fig)


def plot_snapshots(items: list[tuple[str, np.ndarray, float | None]], view=VIEWS[2]) -> bytes:
    """One isosurface per ``(label, map, level)``, in time order (paper Fig. 6)."""
    surfs = [surface(v, lv) if lv is not None else None for _, v, lv in items]
    half = _half_extent(surfs, min(items[0][1].shape) / 2)
    ncol = min(4, len(items))
    nrow = math.ceil(len(items) / ncol)
    fig = _figure(3.0 * ncol, 3.25 * nrow)
    el, az, _ = view
    for i, ((label, _, _), tris) in enumerate(zip(items, surfs)):
        ax = fig.add_subplot(nrow, ncol, i + 1, projection="3d")
        _draw_surface(ax, tris, el, az, half)
        ax.set_title(label, fontsize=9, y=0.97)
    fig.subplots_adjust(
        left=0, right=1, bottom=0, top=0.92 if nrow == 1 else 0.95, wspace=0, hspace=0.08
    )
    return to_png(fig)


# ---------------------------------------------------------------------------------------------
# FSC and view directions
# ---------------------------------------------------------------------------------------------


def draw_fsc(
    ax,
    freq,
    curves: dict,
    cutoff_A: float | None = None,
    title: str = "",
    ylabel: str = "Fourier shell correlation",
) -> None:
    """Draw FSC curves on a matplotlib axis: ``curves = {label: (curve, {threshold: Å})}``.

    The x axis is linear in spatial frequency (1/Å) and labelled in Å. One curve: the
    0.5 / 0.143 thresholds in colour with their crossings marked. Several curves: one colour
    each, with their resolutions in the legend. ``cutoff_A`` marks the finest resolution a
    run has used. Shared by ``cryorecon fsc``, the run report and the demo.
    """
    from matplotlib.ticker import FuncFormatter

    single = len(curves) == 1
    colors = {0.5: "C1", 0.143: "C2"}
    lo = -0.1
    for i, (label, (curve, res)) in enumerate(curves.items()):
        lo = min(lo, float(np.min(curve)) - 0.05)
        if single:
            ax.plot(freq, curve, "-", color="C0", lw=1.8, label=label)
            for thr, r in res.items():
                c = colors.get(thr, "C3")
                ax.axhline(thr, color=c, ls="--", lw=1)
                if r is not None and math.isfinite(r) and r > 0:
                    ax.axvline(1.0 / r, color=c, ls=":", lw=1)
                    ax.annotate(
                        f"{thr:g}: {r:.2f} Å",
                        xy=(1.0 / r, thr),
                        xytext=(4, 6),
                        textcoords="offset points",
                        color=c,
                        fontsize=9,
                    )
        else:
            txt = " / ".join(
                f"{r:.1f}" if r is not None and math.isfinite(r) else "n/a"
                for r in (res.get(0.5), res.get(0.143))
            )
            ax.plot(freq, curve, "-", color=f"C{i}", lw=1.8, label=f"{label}: {txt} Å")
    if not single:
        for thr, c in ((0.5, "0.4"), (0.143, "0.6")):
            ax.axhline(thr, color=c, ls="--", lw=1)
            ax.annotate(
                f"{thr:g}",
                xy=(0, thr),
                xytext=(2, 2),
                textcoords="offset points",
                color=c,
                fontsize=8,
            )
    if cutoff_A and cutoff_A > 0 and 1.0 / cutoff_A <= float(freq[-1]):
        ax.axvline(1.0 / cutoff_A, color="0.4", lw=1.2, label=f"cut-off used ({cutoff_A:.1f} Å)")
    ax.set_xlim(0, float(freq[-1]))
    ax.set_ylim(lo, 1.05)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda f, _: "∞" if f <= 0 else f"{1.0 / f:.3g}"))
    ax.set_xlabel("resolution (Å)  [axis linear in spatial frequency, 1/Å]")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if single:
        ax.legend(loc="upper right", fontsize=9)
    else:
        ax.legend(
            loc="upper right", fontsize=8, title="resolution at FSC 0.5 / 0.143", title_fontsize=8
        )


def save_fsc_png(path, freq, curves: dict, title: str = "", **kw) -> None:
    """:func:`draw_fsc` on its own figure, written to ``path`` as PNG (Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    draw_fsc(fig.add_subplot(1, 1, 1), freq, curves, title=title, **kw)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_fsc(
    freq: np.ndarray,
    curve: np.ndarray,
    resolutions: dict,
    cutoff_A: float | None = None,
    title: str = "",
) -> bytes:
    """FSC against spatial frequency, with the 0.5 and 0.143 thresholds and the current
    resolution cut-off (the finest detail the run has used so far)."""
    fig = _figure(7.5, 4.4)
    draw_fsc(
        fig.add_subplot(1, 1, 1),
        freq,
        {"FSC": (curve, resolutions)},
        cutoff_A=cutoff_A,
        title=title,
    )
    fig.tight_layout()
    return to_png(fig)


def draw_halfmap_fsc(
    ax,
    freq,
    curves: dict,
    resolution_A: float | None = None,
    randomize_at_A: float | None = None,
    threshold: float = 0.143,
    title: str = "",
) -> None:
    """Draw the gold-standard half-map FSC curves on a matplotlib axis.

    ``curves`` maps names to arrays over ``freq`` (1/Å): ``unmasked``, ``masked``,
    ``corrected`` (drawn thick) and optionally ``randomized`` (the phase-randomised masked
    FSC, thin dashed). The ``threshold`` line (0.143), the ``resolution_A`` crossing of the
    corrected curve and the phase-randomisation frequency (``randomize_at_A``) are marked.
    The x axis is linear in spatial frequency and labelled in Å, as in :func:`draw_fsc`.
    """
    from matplotlib.ticker import FuncFormatter

    styles = {
        "unmasked": ("C0", "-", 1.3, "unmasked"),
        "masked": ("C1", "-", 1.3, "masked"),
        "randomized": ("0.5", "--", 1.0, "phase-randomised, masked"),
        "corrected": ("C3", "-", 2.2, "corrected (masked - randomised)"),
    }
    lo = -0.1
    for key, (color, ls, lw, label) in styles.items():
        c = curves.get(key)
        if c is None:
            continue
        c = np.asarray(c, dtype=np.float64)
        if np.isfinite(c).any():
            lo = min(lo, float(np.nanmin(c)) - 0.05)
        # the corrected curve is drawn below the others: it equals the masked one up to
        # the randomisation frequency and would hide it
        ax.plot(freq, c, ls, color=color, lw=lw, label=label, zorder=2 if key == "corrected" else 3)
    ax.axhline(threshold, color="C2", ls="--", lw=1)
    ax.annotate(
        f"{threshold:g}",
        xy=(0, threshold),
        xytext=(2, 2),
        textcoords="offset points",
        color="C2",
        fontsize=8,
    )
    fmax = float(freq[-1])
    if resolution_A and math.isfinite(resolution_A) and resolution_A > 0:
        ax.axvline(1.0 / resolution_A, color="C3", ls=":", lw=1)
        right = 1.0 / resolution_A > 0.75 * fmax  # label to the left near Nyquist
        ax.annotate(
            f"{resolution_A:.2f} Å",
            xy=(1.0 / resolution_A, threshold),
            xytext=(-4 if right else 4, 6),
            textcoords="offset points",
            color="C3",
            fontsize=9,
            ha="right" if right else "left",
        )
    if randomize_at_A and randomize_at_A > 0 and 1.0 / randomize_at_A <= fmax:
        ax.axvline(
            1.0 / randomize_at_A,
            color="0.5",
            lw=1,
            label=f"phases randomised beyond {randomize_at_A:.1f} Å",
        )
    ax.set_xlim(0, fmax)
    ax.set_ylim(lo, 1.05)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda f, _: "∞" if f <= 0 else f"{1.0 / f:.3g}"))
    ax.set_xlabel("resolution (Å)  [axis linear in spatial frequency, 1/Å]")
    ax.set_ylabel("half-map FSC")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", fontsize=8)


def plot_halfmap_fsc(
    freq,
    curves: dict,
    resolution_A: float | None = None,
    randomize_at_A: float | None = None,
    title: str = "",
) -> bytes:
    """:func:`draw_halfmap_fsc` on its own figure, as PNG bytes."""
    fig = _figure(7.5, 4.4)
    draw_halfmap_fsc(
        fig.add_subplot(1, 1, 1),
        np.asarray(freq),
        curves,
        resolution_A,
        randomize_at_A,
        title=title,
    )
    fig.tight_layout()
    return to_png(fig)


def direction_bins(n: int) -> tuple[int, int]:
    """(azimuth, elevation) bin counts for ``n`` directions: about 20 per cell on average,
    between 24 x 12 and 72 x 36 cells (5 to 15 degrees wide in azimuth)."""
    n_el = int(np.clip(round(math.sqrt(max(n, 1) / 20 / 2)), 12, 36))
    return 2 * n_el, n_el


def direction_histogram(directions: np.ndarray, n_azimuth: int = 72, n_elevation: int = 36):
    """Equal-area histogram of unit vectors over (azimuth, elevation).

    Azimuth ``atan2(y, x)`` in ``n_azimuth`` equal bins; elevation ``asin(z)`` in bins uniform
    in ``z`` (so every cell covers the same solid angle). Returns ``(az_edges, el_edges, rel)``
    in radians with ``rel`` the count per cell divided by the count a uniform distribution
    would give (1 = uniform), shape (n_elevation, n_azimuth), and the number of vectors used.
    """
    d = np.asarray(directions, dtype=np.float64)
    d = d[np.isfinite(d).all(axis=1)]
    norm = np.linalg.norm(d, axis=1)
    d = d[norm > 0] / norm[norm > 0, None]
    az_edges = np.linspace(-math.pi, math.pi, n_azimuth + 1)
    z_edges = np.linspace(-1.0, 1.0, n_elevation + 1)
    el_edges = np.arcsin(z_edges)
    if len(d) == 0:
        return az_edges, el_edges, np.zeros((n_elevation, n_azimuth)), 0
    az = np.arctan2(d[:, 1], d[:, 0])
    z = np.clip(d[:, 2], -1.0, 1.0)
    h, _, _ = np.histogram2d(z, az, bins=[z_edges, az_edges])
    rel = h / (len(d) / (n_azimuth * n_elevation))
    return az_edges, el_edges, rel, len(d)


def plot_directions(directions: np.ndarray) -> tuple[bytes, int]:
    """World-map (Mollweide, equal-area) image of the view-direction distribution (paper
    Fig. 10). Returns the PNG and the number of particles with a direction."""
    from matplotlib.colors import PowerNorm

    d = np.asarray(directions, dtype=np.float64)
    n_az, n_el = direction_bins(int(np.isfinite(d).all(axis=1).sum()))
    az_e, el_e, rel, n = direction_histogram(d, n_az, n_el)
    # subdivide each cell for drawing, so the straight edges follow the map's curved outline
    sub = 4
    az_f = np.interp(np.arange(n_az * sub + 1) / sub, np.arange(n_az + 1), az_e)
    z_e = np.sin(el_e)
    el_f = np.arcsin(
        np.clip(np.interp(np.arange(n_el * sub + 1) / sub, np.arange(n_el + 1), z_e), -1, 1)
    )
    rel_f = np.repeat(np.repeat(rel, sub, axis=0), sub, axis=1)
    fig = _figure(10.0, 5.4)
    ax = fig.add_subplot(1, 1, 1, projection="mollweide")
    vmax = max(2.0, float(np.percentile(rel, 99.5))) if n else 2.0
    mesh = ax.pcolormesh(
        az_f,
        el_f,
        rel_f,
        cmap="viridis",
        norm=PowerNorm(0.6, vmin=0, vmax=vmax),
        shading="flat",
        antialiased=False,
        linewidth=0,
        rasterized=True,
    )
    ax.grid(True, color="white", alpha=0.35, lw=0.5)
    ax.tick_params(axis="x", colors="white", labelsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("azimuth atan2(y, x)")
    ax.set_ylabel("elevation asin(z)")
    fig.colorbar(
        mesh,
        ax=ax,
        orientation="horizontal",
        fraction=0.05,
        pad=0.08,
        label="particles per unit solid angle, relative to a uniform distribution (1 = uniform)",
    )
    fig.subplots_adjust(left=0.06, right=0.97, top=0.97, bottom=0.08)
    return to_png(fig), n
