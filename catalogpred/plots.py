"""Figures of a catalog: sky density, colour–colour with the AGN wedge, magnitude histograms, predicted vs observed.

Each ``*_figure`` function returns a matplotlib :class:`~matplotlib.figure.Figure` made without
pyplot (so it works headless and inside notebooks, whatever the backend), and each ``plot_*``
function saves it as a PNG and returns the path. :func:`plot_catalog` writes them all
(``catalogpred plot``).

>>> paths = plot_catalog("demo-output/catalog", "plots/")          # doctest: +SKIP
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .catalog import SPATIAL_INDEX_ORDER
from .errors import CatalogError, ConfigError
from .query import SKY_AREA_DEG2, CatalogQuery, open_catalog

__all__ = ["sky_density_figure", "colour_colour_figure", "magnitude_histograms_figure",
           "predicted_vs_observed_figure", "plot_sky_density", "plot_colour_colour", "plot_magnitude_histograms",
           "plot_predicted_vs_observed", "plot_catalog", "offset_stats", "JARRETT11_WEDGE"]

log = logging.getLogger(__name__)

BANDS = ("w1", "w2", "w3", "w4")
#: the Jarrett et al. (2011) AGN box in (W2−W3, W1−W2), Vega: 2.2 < W2−W3 < 4.2, W1−W2 < 1.7,
#: W1−W2 > 0.1 (W2−W3) + 0.38; the closed outline as (x, y).
JARRETT11_WEDGE = ([2.2, 2.2, 4.2, 4.2, 2.2], [1.7, 0.1 * 2.2 + 0.38, 0.1 * 4.2 + 0.38, 1.7, 1.7])


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def _query(catalog) -> CatalogQuery:
    return catalog if isinstance(catalog, CatalogQuery) else open_catalog(catalog)


def _save(fig, png_path) -> Path:
    png_path = Path(png_path)
    try:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png_path)
    except OSError as exc:  # a file where a directory should be, no permission
        raise CatalogError(f"cannot write {png_path}: {exc.strerror or exc}") from exc
    return png_path


def _check_order(order) -> None:
    """A HEALPix order for the density map: 0..29 (the ``_healpix_29`` index), or None (from the data)."""
    if order is not None and (isinstance(order, bool) or not isinstance(order, (int, np.integer))
                              or not 0 <= order <= SPATIAL_INDEX_ORDER):
        raise ConfigError(f"HEALPix order {order!r} is out of range: the density map takes 0 to {SPATIAL_INDEX_ORDER} "
                          "(default: from the data, 3 to 8)")


def _columns(catalog, cols):
    """pandas frame with ``cols`` from a catalog path, a query, or an existing DataFrame."""
    if hasattr(catalog, "columns") and hasattr(catalog, "iloc"):
        return catalog[list(cols)]
    return _query(catalog).select(list(cols)).to_pandas()


# --------------------------------------------------------------------------- sky density
def _auto_order(h29: np.ndarray) -> int:
    """Highest order (3..8) whose occupied pixels hold a median of at least 5 rows."""
    for order in range(8, 3, -1):
        _, counts = np.unique(h29 >> (2 * (SPATIAL_INDEX_ORDER - order)), return_counts=True)
        if len(counts) and np.median(counts) >= 5:
            return order
    return 3


def sky_density_figure(catalog, *, order: int | None = None, title: str | None = None):
    """Mollweide map of the rows per deg² in HEALPix pixels of ``order`` (from ``_healpix_29``).

    Each occupied pixel is drawn as its own quadrilateral, so any order works; RA increases to
    the left, as on the sky. ``order`` defaults to the highest (≤ 8) with a median ≥ 5 rows per pixel.
    """
    from cdshealpix.nested import vertices
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import LogNorm

    _check_order(order)
    h29 = _columns(catalog, ["_healpix_29"])["_healpix_29"].to_numpy()
    order = _auto_order(h29) if order is None else order
    pix, counts = np.unique(h29 >> (2 * (SPATIAL_INDEX_ORDER - order)), return_counts=True)
    density = counts / (SKY_AREA_DEG2 / (12 * 4 ** order))
    fig = _figure(figsize=(8, 4.6), dpi=110)
    ax = fig.add_subplot(projection="mollweide")
    if len(pix):
        lon, lat = vertices(pix.astype(np.uint64), order)
        x = -np.radians(np.mod(lon.deg + 180.0, 360.0) - 180.0)  # x = -RA: east to the left
        y = np.radians(lat.deg)
        # pixels straddling RA = 180 deg: move the stray corners next to the others, draw on both sides
        span = x.max(1) - x.min(1) > np.pi
        x[span] = np.where(x[span] < 0, x[span] + 2 * np.pi, x[span])
        polys = [np.c_[xi, yi] for xi, yi in zip(x, y)] + [np.c_[xi - 2 * np.pi, yi] for xi, yi in zip(x[span], y[span])]
        vals = np.r_[density, density[span]]
        norm = LogNorm(vmin=vals.min(), vmax=max(vals.max(), vals.min() * 1.01))
        coll = PolyCollection(polys, array=vals, cmap="viridis", norm=norm, edgecolors="face", linewidths=0.3)
        ax.add_collection(coll)
        fig.colorbar(coll, ax=ax, orientation="horizontal", pad=0.06, fraction=0.05,
                     label=f"rows per deg² (HEALPix order {order})")
    ticks = np.radians(np.arange(-150, 181, 30))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{int(round(np.mod(-np.degrees(t), 360))) % 360}°" for t in ticks], fontsize=7)
    ax.grid(True, lw=0.4, alpha=0.5)
    ax.set_title(title or f"sky density: {len(h29):,d} rows in {len(pix):,d} pixels")
    return fig


def plot_sky_density(catalog, png_path, **kw) -> Path:
    """Save :func:`sky_density_figure` as a PNG; returns the path."""
    return _save(sky_density_figure(catalog, **kw), png_path)


# --------------------------------------------------------------------------- colour-colour
def colour_colour_figure(catalog, photometry=None, *, title: str | None = None, mag_system: str = "auto"):
    """Predicted W1−W2 vs W2−W3 (Vega) with the Jarrett et al. (2011) AGN wedge.

    ``photometry`` (a path or table: pyarrow, astropy or pandas) draws the observed colours behind: its W1-W3
    found by name (``w1mpro``, ``W1mag``, DESI's ``flux_w1`` in nanomaggies, ...) and in Vega (AB converted;
    ``mag_system`` as :func:`~catalogpred.tables.wise_vega_magnitudes` takes it).
    """
    t = _columns(catalog, ["w1_mag", "w2_mag", "w3_mag"])
    x, y = t["w2_mag"] - t["w3_mag"], t["w1_mag"] - t["w2_mag"]
    fig = _figure(figsize=(5.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    if photometry is not None:
        w1, w2, w3 = _observed_vega(photometry, mag_system).T[:3]
        ax.scatter(w2 - w3, w1 - w2, s=3, alpha=0.35, color="0.6", label=f"observed ({len(w1)})")
    ax.scatter(x, y, s=4, alpha=0.6, color="C0", label=f"predicted ({len(t)})")
    ax.plot(*JARRETT11_WEDGE, color="C3", lw=1.2, label="Jarrett+11 AGN box")
    ax.set_xlabel("W2 − W3 [Vega mag]")
    ax.set_ylabel("W1 − W2 [Vega mag]")
    ax.set_title(title or "predicted WISE colours")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def _observed_vega(photometry, mag_system: str) -> np.ndarray:
    """float64 [n, 4]: the observed W1-W4 (Vega; NaN where a band is missing) of a photometry path or table."""
    from .crossmatch import _to_arrow
    from .tables import wise_vega_magnitudes

    what = str(photometry) if isinstance(photometry, (str, Path)) else "the photometry table"
    return wise_vega_magnitudes(_to_arrow(photometry), mag_system, what=what, need_errors=False)[0]


def plot_colour_colour(catalog_path, png_path, photometry_path=None, *, title: str | None = None) -> Path:
    """Save :func:`colour_colour_figure` as a PNG; returns the path (``catalogpred demo`` uses it)."""
    return _save(colour_colour_figure(catalog_path, photometry_path, title=title), png_path)


# --------------------------------------------------------------------------- histograms
def magnitude_histograms_figure(catalog, *, bins: int = 40):
    """Histograms of the predicted magnitudes (top) and their 1σ errors (bottom), per band."""
    cols = [f"{b}_mag" for b in BANDS] + [f"{b}_mag_err" for b in BANDS]
    t = _columns(catalog, cols)
    fig = _figure(figsize=(11, 5), dpi=100)
    axes = fig.subplots(2, 4)
    for j, b in enumerate(BANDS):
        for i, (col, label) in enumerate(((f"{b}_mag", f"{b.upper()} [Vega mag]"), (f"{b}_mag_err", f"σ({b.upper()}) [mag]"))):
            v = t[col].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            ax = axes[i, j]
            if len(v):
                ax.hist(v, bins=bins, color=f"C{j}", alpha=0.8)
                ax.axvline(np.median(v), color="k", lw=0.8, ls="--")
            ax.set_xlabel(label)
            if j == 0:
                ax.set_ylabel("rows")
    fig.suptitle(f"predicted magnitudes and errors ({len(t):,d} rows; dashed: median)")
    fig.tight_layout()
    return fig


def plot_magnitude_histograms(catalog, png_path, **kw) -> Path:
    """Save :func:`magnitude_histograms_figure` as a PNG; returns the path."""
    return _save(magnitude_histograms_figure(catalog, **kw), png_path)


# --------------------------------------------------------------------------- predicted vs observed
def predicted_vs_observed_figure(matched, *, title: str | None = None):
    """Predicted vs observed magnitude per band for a :func:`~catalogpred.crossmatch.crossmatch` result.

    Rows flagged ``ir_excess`` are drawn in red; the dashed line is equality (above it: brighter
    in the IR than predicted). Each panel gives the number of compared rows, the bias (mean of
    predicted - observed) and the rms of predicted - observed (:func:`offset_stats`), in mag.
    """
    df = matched.to_pandas() if hasattr(matched, "to_pandas") and not hasattr(matched, "iloc") else matched
    phot = _observed_columns(list(df.columns))
    fig = _figure(figsize=(8.5, 8), dpi=100)
    axes = fig.subplots(2, 2).ravel()
    flag = df["ir_excess"].fillna(False).to_numpy(dtype=bool) if "ir_excess" in df else np.zeros(len(df), bool)
    for ax, b in zip(axes, BANDS):
        ax.set_title(b.upper())
        if b not in phot:
            ax.text(0.5, 0.5, "no observed magnitude", ha="center", va="center", transform=ax.transAxes)
            continue
        mcol, ecol = phot[b]
        obs = df[mcol].to_numpy(dtype=float)
        sig = df[ecol].to_numpy(dtype=float)
        pred = df[f"{b}_mag"].to_numpy(dtype=float)
        ok = np.isfinite(obs) & np.isfinite(pred) & np.isfinite(sig) & (sig < 99)
        ax.errorbar(obs[ok & ~flag], pred[ok & ~flag], xerr=sig[ok & ~flag], fmt=".", ms=3, lw=0.4, alpha=0.5,
                    color="C0", label="matched")
        if (ok & flag).any():
            ax.errorbar(obs[ok & flag], pred[ok & flag], xerr=sig[ok & flag], fmt="o", ms=3, lw=0.4, color="C3",
                        label="IR excess")
        if ok.any():
            lo, hi = np.nanmin(np.r_[obs[ok], pred[ok]]), np.nanmax(np.r_[obs[ok], pred[ok]])
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            n, bias, rms = offset_stats(pred[ok], obs[ok])
            ax.text(0.03, 0.95, f"n={n}  bias={bias:+.2f}  rms={rms:.2f} mag", transform=ax.transAxes, va="top",
                    fontsize=8)
        ax.set_xlabel(f"observed {b.upper()} [Vega mag]")
        ax.set_ylabel(f"predicted {b}_mag [Vega mag]")
        ax.legend(loc="best", fontsize=7)
    fig.suptitle(title or f"predicted vs observed ({len(df):,d} matches)")
    fig.tight_layout()
    return fig


def offset_stats(pred, obs) -> tuple[int, float, float]:
    """``(n, bias, rms)`` of ``pred - obs`` over the finite pairs, in the inputs' unit (mag): bias is the mean
    offset, rms the root mean square sqrt(mean((pred - obs)^2)) (not the standard deviation about the bias;
    rms^2 = bias^2 + std^2). NaN when no pair is finite."""
    d = np.asarray(pred, float) - np.asarray(obs, float)
    d = d[np.isfinite(d)]
    if not len(d):
        return 0, float("nan"), float("nan")
    return len(d), float(d.mean()), float(np.sqrt(np.mean(d ** 2)))


def plot_predicted_vs_observed(matched, png_path, **kw) -> Path:
    """Save :func:`predicted_vs_observed_figure` as a PNG; returns the path."""
    return _save(predicted_vs_observed_figure(matched, **kw), png_path)


def _observed_columns(names) -> dict[str, tuple[str, str]]:
    """Observed magnitude and error columns per band: a crossmatch's ``w?_mag_obs`` (Vega, as it compared
    them, AB converted), else the external table's own (:func:`~catalogpred.crossmatch.find_photometry_columns`,
    taken to be Vega) for a table that did not come from :func:`~catalogpred.crossmatch.crossmatch`."""
    from .crossmatch import find_photometry_columns

    ours = {b: (f"{b}_mag_obs", f"{b}_mag_obs_err") for b in BANDS if f"{b}_mag_obs" in names}
    return ours or find_photometry_columns(names)


def _own_observations(q):
    """The rows of catalog query ``q`` that carry observed WISE of their own (DESI), with
    :func:`~catalogpred.crossmatch.ir_excess`'s columns, as a DataFrame; None when the catalog has none."""
    import pyarrow.compute as pc

    from .crossmatch import PREDICTED_COLUMNS, own_photometry_columns, query_ir_excess

    if not own_photometry_columns(q.schema.names):
        return None
    t = query_ir_excess(q.select(PREDICTED_COLUMNS))
    t = t.filter(pc.is_valid(t.column("chi2_n")))
    return t.to_pandas() if t.num_rows else None


# --------------------------------------------------------------------------- all of them
def plot_catalog(catalog, out_dir, *, external=None, radius_arcsec: float = 1.5, ra_col: str | None = None,
                 dec_col: str | None = None, order: int | None = None, mag_system: str = "auto") -> list[Path]:
    """Write the standard PNGs of a catalog into ``out_dir``; returns their paths.

    ``sky_density.png``, ``colour_colour.png``, ``magnitudes.png``, and ``predicted_vs_observed.png``: with
    ``external`` (a table with observed W1–W4) after a crossmatch within ``radius_arcsec`` (``mag_system``:
    the external magnitudes' system, as in :func:`~catalogpred.crossmatch.crossmatch`), else from the
    catalog's own observed WISE where it has some (DESI's ``flux_w1``/``flux_w2``:
    :func:`~catalogpred.crossmatch.ir_excess`).
    """
    out_dir = Path(out_dir)
    _check_order(order)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; the plots go into a directory (created if missing)")
    q = _query(catalog)
    cols = ["_healpix_29"] + [f"{b}_mag" for b in BANDS] + [f"{b}_mag_err" for b in BANDS]
    t = q.select(cols).to_pandas()
    phot = None
    matched = None
    if external is not None:
        from .crossmatch import crossmatch

        matched = crossmatch(q, external, radius_arcsec=radius_arcsec, ra_col=ra_col, dec_col=dec_col,
                             mag_system=mag_system).to_pandas()
        p = _observed_columns(list(matched.columns))
        if all(b in p for b in ("w1", "w2", "w3")):
            phot = matched[[p[b][0] for b in ("w1", "w2", "w3")]].set_axis(["w1mpro", "w2mpro", "w3mpro"], axis=1)
    else:
        matched = _own_observations(q)
    paths = [plot_sky_density(t, out_dir / "sky_density.png", order=order),
             _save(colour_colour_figure(t, phot), out_dir / "colour_colour.png"),
             plot_magnitude_histograms(t, out_dir / "magnitudes.png")]
    if matched is not None:
        title = None if external is not None else f"predicted vs the catalog's own observed WISE ({len(matched):,d} rows)"
        paths.append(plot_predicted_vs_observed(matched, out_dir / "predicted_vs_observed.png", title=title))
    log.info("plots written to %s", out_dir)
    return paths
