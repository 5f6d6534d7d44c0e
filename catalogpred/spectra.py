"""Pure science helpers: wavelength grids, pixel masks, weights, normalisation, units.

Everything here is a small function on arrays. The functions take an array
namespace from their input (``numpy`` or ``cupy``; :func:`array_namespace`),
so the GPU path runs the same code as the CPU path. Nothing here imports Dask,
Zarr or torch.

Conventions
-----------
- Wavelengths are vacuum, observed frame, in Å (``wave``), unless a name says ``_nm``.
- SDSS/DESI flux density is F_λ in 1e-17 erg s⁻¹ cm⁻² Å⁻¹ (``flux``); ivar is its inverse variance.
- PFS flux density is F_ν in nJy; :func:`fnu_njy_to_flam17` converts.
- WISE W1-W4 magnitudes are Vega (AllWISE ``w?mpro``); :data:`VEGA_TO_AB` gives the AB offsets.
- A pixel is *good* when its weight ``w = ivar · (mask == 0)`` is > 0.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .errors import RejectReason

WISE_BANDS = ("w1", "w2", "w3", "w4")
#: m_AB − m_Vega for W1..W4 (Jarrett et al. 2011; FORMATS.md).
VEGA_TO_AB = {"w1": 2.699, "w2": 3.339, "w3": 5.174, "w4": 6.620}
WISE_WAVELENGTH_UM = {"w1": 3.35, "w2": 4.60, "w3": 11.56, "w4": 22.09}
#: the IVOA UCD wavelength range of each WISE band (``phot.mag;em.IR.3-4um``)
WISE_UCD_RANGE = {"w1": "3-4um", "w2": "4-8um", "w3": "8-15um", "w4": "15-30um"}

__all__ = [
    "WISE_BANDS",
    "VEGA_TO_AB",
    "WISE_WAVELENGTH_UM",
    "WISE_UCD_RANGE",
    "Grid",
    "SDSS_GRID",
    "DESI_GRID",
    "GRIDS",
    "PixelMask",
    "NORM_WINDOW_RESTFRAME",
    "IVAR_FLOOR",
    "array_namespace",
    "loglam_to_sdss_index",
    "load_skylines",
    "skyline_mask",
    "pixel_weights",
    "lower_median",
    "normalisation",
    "check_spectra",
    "fnu_njy_to_flam17",
    "flam17_to_fnu_njy",
    "pixel_edges",
    "resample_flux_conserving",
]

#: Rest-frame window of the spender normalisation median, Å.
NORM_WINDOW_RESTFRAME = (5300.0, 5850.0)
#: ivar at or below this is treated as zero weight (as spender does).
IVAR_FLOOR = 1e-6
#: speed of light in Å/s, for F_ν ↔ F_λ.
C_ANGSTROM_PER_S = 2.99792458e18


@dataclass(frozen=True)
class Grid:
    """A model's observed-frame wavelength grid.

    Parameters
    ----------
    name : str
        ``"sdss"`` or ``"desi"`` (the spender instrument the encoder was trained on).
    kind : str
        ``"loglam"`` (λ = 10**(loglam0 + dloglam·i)) or ``"linear"`` (λ = wave0 + dwave·i).
    start : float
        loglam0 (log10 Å) for ``"loglam"``, wave0 (Å) for ``"linear"``.
    step : float
        dex per pixel for ``"loglam"``, Å per pixel for ``"linear"``.
    n_pix : int
        Number of pixels.
    """

    name: str
    kind: str
    start: float
    step: float
    n_pix: int

    def __post_init__(self):
        if self.kind not in ("loglam", "linear"):
            raise ValueError(f"Grid kind must be 'loglam' or 'linear', got {self.kind!r}")
        if self.n_pix <= 0 or self.step <= 0:
            raise ValueError(f"Grid {self.name!r} needs n_pix > 0 and step > 0")

    @functools.cached_property
    def wave(self) -> np.ndarray:
        """float64 [n_pix], Å (vacuum, observed frame)."""
        i = np.arange(self.n_pix, dtype=np.float64)
        if self.kind == "loglam":
            return 10.0 ** (self.start + self.step * i)
        return self.start + self.step * i

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "start": self.start, "step": self.step, "n_pix": self.n_pix}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(name=d["name"], kind=d["kind"], start=float(d["start"]), step=float(d["step"]), n_pix=int(d["n_pix"]))


#: spender SDSS grid: λ = 10**(3.578 + 1e-4·i), i = 0..3920 (3784.4–9332.5 Å).
SDSS_GRID = Grid(name="sdss", kind="loglam", start=3.578, step=1e-4, n_pix=3921)
#: spender DESI grid: linspace(3600, 9824, 7781), 0.8 Å.
DESI_GRID = Grid(name="desi", kind="linear", start=3600.0, step=0.8, n_pix=7781)
GRIDS = {g.name: g for g in (SDSS_GRID, DESI_GRID)}

#: global SDSS log-λ pixel index of SDSS_GRID pixel 0 (round(3.578·1e4)).
SDSS_INDEX0 = 35780


class PixelMask(enum.IntFlag):
    """Bits of the per-pixel ``mask`` array in the store (uint8). 0 = good."""

    #: the survey pipeline flagged the pixel (SDSS and_mask != 0, DESI/PFS mask bits)
    PIPELINE = 1
    #: within a night-sky line (spender's skyline mask)
    SKYLINE = 2
    #: the spectrum does not cover this pixel of the model grid
    NO_COVERAGE = 4
    #: ivar <= IVAR_FLOOR
    LOW_IVAR = 8
    #: flux or ivar was NaN/inf in the file (flux set to 0 in the store)
    NONFINITE = 16


def array_namespace(*arrays):
    """Return the array module (``numpy`` or ``cupy``) of the inputs.

    Never imports cupy itself: a cupy array can only exist if cupy is imported.
    """
    for a in arrays:
        mod = type(a).__module__.split(".")[0]
        if mod == "cupy":
            import cupy

            return cupy
    return np


def loglam_to_sdss_index(loglam) -> np.ndarray:
    """Pixel index on :data:`SDSS_GRID` of SDSS ``loglam`` values (log10 Å).

    SDSS spectra live on a global grid with 1e-4 dex steps, so the mapping is an
    integer: ``round(loglam·1e4) − 35780``. No interpolation. Indices may fall
    outside [0, 3921): callers drop those pixels.
    """
    xp = array_namespace(loglam)
    return xp.rint(xp.asarray(loglam, dtype=xp.float64) * 1e4).astype(xp.int64) - SDSS_INDEX0


@functools.lru_cache(maxsize=1)
def load_skylines() -> tuple[np.ndarray, np.ndarray]:
    """The night-sky line list shipped with catalogpred (spender 0.3's, MIT).

    Returns
    -------
    wave : float64 [n_lines]
        Vacuum wavelength, Å (the file is in nm).
    intensity : float64 [n_lines]
        Relative intensity (arbitrary units).
    """
    text = resources.files("catalogpred").joinpath("data/sky-lines.txt").read_text()
    rows = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    wave_nm = np.array([float(r[0]) for r in rows])
    intensity = np.array([float(r[1]) for r in rows])
    return wave_nm * 10.0, intensity


def skyline_mask(wave, min_intensity: float = 2.0):
    """Observed-frame pixels that spender masks for night-sky lines.

    Every line with intensity > ``min_intensity`` masks pixels with
    ``|λ − λ_line| < 5·(1 + log10(I / 2))`` Å.

    Parameters
    ----------
    wave : float64 [n_pix]
        Observed-frame vacuum wavelength, Å (numpy or cupy).

    Returns
    -------
    bool [n_pix]
        True where a sky line masks the pixel.
    """
    xp = array_namespace(wave)
    line_wave, intensity = load_skylines()
    keep = intensity > min_intensity
    line_wave = xp.asarray(line_wave[keep])
    half_width = xp.asarray(5.0 * (1.0 + np.log10(intensity[keep] / 2.0)))
    # sorted lines: check the nearest few neighbours via searchsorted is overkill for ~100 lines
    dist = xp.abs(xp.asarray(wave)[:, None] - line_wave[None, :])
    return xp.any(dist < half_width[None, :], axis=1)


@functools.lru_cache(maxsize=8)
def _skyline_mask_cached(wave_bytes: bytes) -> np.ndarray:
    mask = skyline_mask(np.frombuffer(wave_bytes, dtype=np.float64))
    mask.setflags(write=False)
    return mask


def grid_skyline_mask(wave):
    """:func:`skyline_mask` of a grid's ``wave``, computed once per grid and process (numpy input), else as is."""
    xp = array_namespace(wave)
    if xp is not np:
        return skyline_mask(xp.asarray(wave))
    return _skyline_mask_cached(np.ascontiguousarray(wave, dtype=np.float64).tobytes())


def pixel_weights(ivar, mask):
    """Weights ``w = ivar`` where ``mask == 0`` and ivar > IVAR_FLOOR, else 0.

    ivar: float32 [n, n_pix] (any flux unit⁻²); mask: uint8 [n, n_pix] (:class:`PixelMask`).
    """
    xp = array_namespace(ivar)
    good = (mask == 0) & (ivar > IVAR_FLOOR)
    return xp.where(good, ivar, xp.zeros((), dtype=ivar.dtype))


def lower_median(values, good):
    """Row-wise median of ``values[good]``, taking the *lower* middle value for even counts.

    This is what ``torch.median`` returns, and so what spender's normalisation uses.

    Parameters
    ----------
    values : float [n, m]
    good : bool [n, m]

    Returns
    -------
    median : float64 [n]
        NaN where a row has no good value.
    count : int64 [n]
        Number of good values per row.
    """
    xp = array_namespace(values)
    v = xp.where(good, values.astype(xp.float64), xp.inf)
    v = xp.sort(v, axis=1)
    count = good.sum(axis=1).astype(xp.int64)
    idx = xp.maximum((count - 1) // 2, 0)
    med = xp.take_along_axis(v, idx[:, None], axis=1)[:, 0]
    return xp.where(count > 0, med, xp.nan), count


def normalisation(flux, weight, wave, z, window=NORM_WINDOW_RESTFRAME):
    """spender's normalisation: lower median of good flux in a rest-frame window.

    Parameters
    ----------
    flux : float32 [n, n_pix]
        F_λ, 1e-17 erg/s/cm²/Å, observed frame.
    weight : float32 [n, n_pix]
        Pixel weights (0 = bad), e.g. from :func:`pixel_weights` with the skyline mask applied.
    wave : float64 [n_pix]
        Observed-frame wavelength, Å.
    z : float64 [n]
        Redshift.
    window : (float, float)
        Rest-frame window, Å. Default 5300–5850 Å.

    Returns
    -------
    norm : float64 [n]
        1e-17 erg/s/cm²/Å; NaN where the window has no good pixel.
    n_window : int64 [n]
        Good pixels in the window.
    """
    xp = array_namespace(flux)
    wave = xp.asarray(wave)
    onepz = 1.0 + xp.asarray(z, dtype=xp.float64)
    n, n_pix = flux.shape
    # In each row the window is a contiguous run of pixels (wave is increasing): gather a superset of it
    # (searchsorted ± 1 pixel) and apply the exact per-pixel test there, so the median sees the same values
    # as the test on every pixel would, at a tenth of the cost.
    lo = xp.clip(xp.searchsorted(wave, window[0] * onepz, side="left") - 1, 0, n_pix)
    hi = xp.clip(xp.searchsorted(wave, window[1] * onepz, side="right") + 1, 0, n_pix)
    width = int((hi - lo).max()) if n else 0
    if width <= 0:
        return xp.full(n, xp.nan), xp.zeros(n, dtype=xp.int64)
    cols = lo[:, None] + xp.arange(width)[None, :]
    inside = cols < hi[:, None]
    cols = xp.minimum(cols, n_pix - 1)
    rest = wave[cols] / onepz[:, None]
    sel = inside & (rest > window[0]) & (rest < window[1]) & (xp.take_along_axis(weight, cols, axis=1) > 0)
    return lower_median(xp.take_along_axis(flux, cols, axis=1), sel)


def check_spectra(flux, ivar, mask, wave, z, window=NORM_WINDOW_RESTFRAME):
    """Validate and normalise a batch of spectra on a model grid.

    A non-finite ivar, or a non-finite flux where ivar > 0, on a covered pixel is a
    reject (it means corruption); a non-finite flux with ivar = 0 (a pipeline's
    "no data" pixel) is only masked (NONFINITE). So are spectra with no good
    pixel, a bad redshift, an empty normalisation window, or a non-positive norm. Each reject carries a
    :class:`~catalogpred.errors.RejectReason` and a readable detail.

    Parameters
    ----------
    flux, ivar : float32 [n, n_pix]
        As read (1e-17 erg/s/cm²/Å and its inverse variance).
    mask : uint8 [n, n_pix]
        :class:`PixelMask` bits from the reader (PIPELINE, NO_COVERAGE).
    wave : float64 [n_pix]
        Grid wavelength, Å.
    z : float64 [n]

    Returns
    -------
    flux_n : float32 [n, n_pix]
        flux / norm, with 0 where the input was non-finite or uncovered.
    ivar_n : float32 [n, n_pix]
        ivar · norm² (0 where non-finite).
    mask : uint8 [n, n_pix]
        Input bits plus SKYLINE, LOW_IVAR and NONFINITE.
    norm : float64 [n]
        1e-17 erg/s/cm²/Å (NaN for rejects; their flux and ivar are returned unscaled).
    reasons : list[RejectReason | None], details : list[str]
        Per spectrum; None for a good spectrum.
    """
    xp = array_namespace(flux)
    n = flux.shape[0]
    u8 = xp.uint8
    finite = xp.isfinite(flux) & xp.isfinite(ivar)
    mask = mask.copy()
    if bool(finite.all()):  # the usual case: no per-pixel repair needed
        n_nonfinite = xp.zeros(n, dtype=xp.int64)
        flux = flux.astype(xp.float32, copy=False)
        ivar = ivar.astype(xp.float32, copy=False)
    else:
        covered = (mask & u8(PixelMask.NO_COVERAGE)) == 0
        with np.errstate(invalid="ignore"):
            corrupt = ~xp.isfinite(ivar) | (~xp.isfinite(flux) & (ivar > 0))  # NaN flux at ivar 0: no data
        n_nonfinite = (corrupt & covered).sum(axis=1)
        mask |= xp.where(finite, u8(0), u8(PixelMask.NONFINITE))
        flux = xp.where(finite, flux, 0).astype(xp.float32)
        ivar = xp.where(finite, ivar, 0).astype(xp.float32)
    mask |= xp.where(ivar > IVAR_FLOOR, u8(0), u8(PixelMask.LOW_IVAR))
    mask |= xp.where(grid_skyline_mask(wave), u8(PixelMask.SKYLINE), u8(0))[None, :]

    weight = pixel_weights(ivar, mask)
    n_good = (weight > 0).sum(axis=1)
    z = xp.asarray(z, dtype=xp.float64)
    norm, n_window = normalisation(flux, weight, wave, xp.where(xp.isfinite(z), z, 0.0), window)

    reasons: list = [None] * n
    details = [""] * n
    to_host = (lambda a: a.get()) if xp is not np else (lambda a: a)
    h_nonfinite, h_good, h_z, h_norm, h_nwin = map(to_host, (n_nonfinite, n_good, z, norm, n_window))
    with np.errstate(invalid="ignore"):
        suspect = ((h_nonfinite > 0) | (h_good == 0) | ~np.isfinite(h_z) | (h_z <= -0.01) | (h_nwin == 0)
                   | ~(np.isfinite(h_norm) & (h_norm > 0)))
    for i in np.flatnonzero(suspect).tolist():  # only rejects need a Python-level look
        if h_nonfinite[i] > 0:
            reasons[i] = RejectReason.NONFINITE_FLUX
            details[i] = f"{int(h_nonfinite[i])} covered pixels have NaN/inf ivar, or NaN/inf flux where ivar > 0"
        elif h_good[i] == 0:
            reasons[i] = RejectReason.NO_VALID_PIXELS
            details[i] = "no pixel with ivar > 0 outside the pipeline and sky-line masks"
        elif not np.isfinite(h_z[i]) or h_z[i] <= -0.01:
            reasons[i] = RejectReason.BAD_REDSHIFT
            details[i] = f"z = {float(h_z[i])}"  # -0.5, nan: not np.float64(-0.5)
        elif h_nwin[i] == 0:
            lo, hi = (window[0] * (1 + h_z[i]), window[1] * (1 + h_z[i]))
            reasons[i] = RejectReason.NORM_WINDOW_EMPTY
            details[i] = (
                f"no good pixel in rest-frame {window[0]:.0f}-{window[1]:.0f} Å "
                f"(observed {lo:.0f}-{hi:.0f} Å at z={h_z[i]:.4f})"
            )
        elif not (np.isfinite(h_norm[i]) and h_norm[i] > 0):
            reasons[i] = RejectReason.BAD_NORM
            details[i] = f"median flux in the window is {h_norm[i]:.4g} (must be > 0)"

    accepted = xp.asarray(~suspect)  # every suspect row got a reason above
    ok = xp.isfinite(norm) & (norm > 0) & accepted
    safe = xp.where(ok, norm, 1.0)
    if xp is np:  # float64 arithmetic cast into float32 outputs, without float64 [n, n_pix] temporaries
        flux_n = np.divide(flux, safe[:, None], out=np.empty(flux.shape, np.float32), casting="unsafe")
        ivar_n = np.multiply(ivar, safe[:, None] ** 2, out=np.empty(ivar.shape, np.float32), casting="unsafe")
    else:
        flux_n = (flux / safe[:, None]).astype(xp.float32)
        ivar_n = (ivar * (safe[:, None] ** 2)).astype(xp.float32)
    return flux_n, ivar_n, mask, xp.where(ok, norm, xp.nan), reasons, details


def check_positions(ra, dec) -> tuple[np.ndarray, np.ndarray]:
    """``(ra, ok)``: RA wrapped into [0, 360) deg, and whether each position is usable: RA and Dec finite and
    |Dec| <= 90 deg. ``ra``, ``dec``: float [n], deg (ICRS). A row that is not ``ok`` has no HEALPix pixel:
    hats' spatial index quietly gives NaN RA a real pixel, and NaN or |Dec| > 90 aborts the process."""
    ra, dec = np.asarray(ra, np.float64), np.asarray(dec, np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0)
        return np.where(np.isfinite(ra), np.mod(ra, 360.0), ra), ok


def fnu_njy_to_flam17(fnu_njy, wave):
    """F_ν in nJy → F_λ in 1e-17 erg s⁻¹ cm⁻² Å⁻¹ at vacuum wavelength ``wave`` (Å).

    F_λ = c·F_ν/λ², so F_λ[1e-17 cgs/Å] = 2997.92458 · F_ν[nJy] / λ[Å]².
    Inverse variances scale by the inverse square of the same factor.
    """
    xp = array_namespace(fnu_njy)
    factor = C_ANGSTROM_PER_S * 1e-32 / 1e-17 / xp.asarray(wave, dtype=xp.float64) ** 2
    return fnu_njy * factor


def flam17_to_fnu_njy(flam17, wave):
    """Inverse of :func:`fnu_njy_to_flam17`."""
    xp = array_namespace(flam17)
    factor = C_ANGSTROM_PER_S * 1e-32 / 1e-17 / xp.asarray(wave, dtype=xp.float64) ** 2
    return flam17 / factor


def _covariance_terms(xp, covar, g, width_in, kl, kr, a_left, a_right, shape):
    """``2 Σ_L Σ_i a_i a_{i+L} C_{i,i+L}`` over the input pixels ``kl..kr`` of each output pixel (see
    :func:`resample_flux_conserving`): ``a`` is the end-bin overlap (``a_left``, ``a_right``) or the whole bin
    width of a good pixel; float64 [n, n_out]."""
    c = xp.asarray(covar, dtype=xp.float64)
    c = c[None] if c.ndim == 2 else c
    n, n_in = shape
    if c.ndim != 3 or c.shape[0] not in (1, n) or c.shape[2] != n_in:
        raise ValueError(f"covar {tuple(c.shape)} must be [K, n_in] or [n, K, n_in] with n_in = {n_in}, n = {n}")
    c = xp.where(xp.isfinite(c), c, 0.0)
    full = g * width_in  # a_i of a pixel wholly inside the output bin
    zero = xp.zeros((n, 1), dtype=xp.float64)
    out = xp.zeros((n, kl.shape[0]), dtype=xp.float64)
    for lag in range(1, min(c.shape[1], n_in - 1) + 1):
        cl = xp.broadcast_to(c[:, lag - 1, :], (n, n_in))

        def at(i):  # column i (clipped into range; callers mask where i is out of it)
            return xp.clip(i, 0, n_in - 1)

        pair = full[:, :-lag] * full[:, lag:] * cl[:, :-lag]  # pairs (i, i+lag) of whole bins
        cum = xp.concatenate([zero, xp.cumsum(pair, axis=1)], axis=1)
        lo, hi = xp.clip(kl + 1, 0, n_in - lag), xp.clip(kr - lag, 0, n_in - lag)
        inner = xp.where(kr - lag > kl + 1, cum[:, hi] - cum[:, lo], 0.0)  # both pixels whole, kl < i, i+lag < kr
        partner = xp.where(kl + lag == kr, a_right, full[:, at(kl + lag)])
        first = xp.where(kl + lag <= kr, a_left * partner * cl[:, at(kl)], 0.0)  # pair (kl, kl+lag)
        last = xp.where(kr - lag > kl, full[:, at(kr - lag)] * a_right * cl[:, at(kr - lag)], 0.0)  # (kr-lag, kr)
        out = out + 2.0 * (inner + first + last)
    return out


def pixel_edges(wave):
    """Bin edges of pixels centred on ``wave``: midpoints, with the end pixels mirrored.

    Parameters
    ----------
    wave : float64 [n] (n >= 2)
        Strictly increasing pixel centres (any unit; numpy or cupy).

    Returns
    -------
    float64 [n + 1]
        ``edges[i] .. edges[i+1]`` is pixel i.
    """
    xp = array_namespace(wave)
    w = xp.asarray(wave, dtype=xp.float64)
    mid = 0.5 * (w[1:] + w[:-1])
    first = w[:1] - (mid[:1] - w[:1])
    last = w[-1:] + (w[-1:] - mid[-1:])
    return xp.concatenate([first, mid, last])


def resample_flux_conserving(wave_in, flux, ivar, wave_out, snap_tol: float = 1e-6, covar=None):
    """Resample F_λ onto another pixel grid, conserving flux, with consistent inverse variances.

    Each pixel is a bin (:func:`pixel_edges`) over which F_λ is constant. An output pixel's
    value is the overlap-weighted mean of the *good* input pixels it overlaps,

    ``F_j = Σ_i o_ij g_i F_i / Σ_i o_ij g_i``  (``o_ij`` = overlap length, ``g_i`` = 1 if good),

    so with every input pixel good, ``F_j · width_j`` is exactly the integral of the input over
    output pixel j (flux conservation); a constant spectrum stays constant on any grid, and on
    pixel-aligned grids every pixel keeps its value. The variance is that of this weighted mean,
    ``σ_j² = Σ_i Σ_k o_ij g_i o_kj g_k C_ik / (Σ_i o_ij g_i)²``, with ``C_ii = σ_i² = 1/ivar_i`` and the
    input covariances ``C_i,i+L`` of ``covar`` (0 without it: independent pixels). Neighbouring output pixels
    that share an input pixel are correlated; each pixel's own variance is exact, so χ² per pixel averages 1.

    Input pixels with ``ivar <= 0``, non-finite ivar or non-finite flux are masked: they
    contribute nothing (their flux may be NaN). An output pixel is covered when its bin lies
    inside the input's first-to-last bin edges; uncovered pixels, and covered ones with no good
    input, get flux 0 and ivar 0. Output bin edges within ``snap_tol`` (of the output pixel width)
    of an input edge are moved onto it, so nominally aligned grids (PFS 0.8 Å from 3700 Å onto DESI
    0.8 Å from 3600 Å) map pixel to pixel despite float rounding: no 1e-12 Å sliver lets a masked
    pixel take its neighbour's value (flux is then conserved over the snapped bins, i.e. to
    ``snap_tol`` relative over the nominal ones).

    Parameters
    ----------
    wave_in : float64 [n_in]
        Strictly increasing input pixel centres (e.g. Å); n_in >= 2. numpy or cupy.
    flux : float [n_in] or [n, n_in]
        F_λ on ``wave_in`` (any flux-density-per-wavelength unit).
    ivar : float, same shape as ``flux``
        Inverse variance of ``flux`` (0 = masked).
    wave_out : float64 [n_out]
        Strictly increasing output pixel centres, same unit as ``wave_in``; n_out >= 2.
    snap_tol : float
        Distance, as a fraction of the output pixel width, within which an output bin edge is
        snapped onto the nearest input bin edge (float rounding of aligned grids).
    covar : float [K, n_in] or [n, K, n_in], optional
        Covariance of neighbouring input pixels, ``covar[..., L - 1, i] = Cov(F_i, F_{i+L})`` for lags
        L = 1..K, in the unit of ``1/ivar`` (the off-diagonal rows of a banded covariance, e.g. PFS COVAR
        rows 1 and 2). Entries at masked pixels, non-finite ones and the last L of each lag are ignored.
        On pixel-aligned grids no output pixel holds two inputs, and it changes nothing.

    Returns
    -------
    flux_out : float64 [n_out] or [n, n_out]
    ivar_out : float64, same shape as ``flux_out``
    covered : bool [n_out]
        True where the output pixel lies inside the input range.

    Examples
    --------
    >>> import numpy as np
    >>> w_in = np.arange(4000.0, 4010.0, 1.0)
    >>> w_out = np.arange(4000.5, 4008.0, 2.0)  # 2 Å pixels, each exactly two input pixels
    >>> f, iv, cov = resample_flux_conserving(w_in, np.full(10, 2.0), np.full(10, 4.0), w_out)
    >>> f.tolist(), iv.tolist(), bool(cov.all())
    ([2.0, 2.0, 2.0, 2.0], [8.0, 8.0, 8.0, 8.0], True)
    """
    xp = array_namespace(flux, ivar, wave_in, wave_out)
    wave_in = xp.asarray(wave_in, dtype=xp.float64)
    wave_out = xp.asarray(wave_out, dtype=xp.float64)
    flux = xp.asarray(flux)
    ivar = xp.asarray(ivar)
    one_d = flux.ndim == 1
    if one_d:
        flux, ivar = flux[None, :], ivar[None, :]
    if wave_in.ndim != 1 or wave_out.ndim != 1 or wave_in.shape[0] < 2 or wave_out.shape[0] < 2:
        raise ValueError("wave_in and wave_out must be 1-D with at least 2 pixels")
    if flux.ndim != 2 or flux.shape[1] != wave_in.shape[0] or ivar.shape != flux.shape:
        raise ValueError(f"flux {flux.shape} and ivar {ivar.shape} must be [n_in] or [n, n_in] with "
                         f"n_in = len(wave_in) = {wave_in.shape[0]}")
    if not bool(xp.all(xp.diff(wave_in) > 0)) or not bool(xp.all(xp.diff(wave_out) > 0)):
        raise ValueError("wave_in and wave_out must be strictly increasing")

    e_in = pixel_edges(wave_in)
    e_out = pixel_edges(wave_out)
    n_in = wave_in.shape[0]
    width_in = e_in[1:] - e_in[:-1]
    # snap output edges lying within snap_tol (of the adjacent output pixel widths) onto input edges
    w_out = e_out[1:] - e_out[:-1]
    w_edge = xp.minimum(xp.concatenate([w_out[:1], w_out]), xp.concatenate([w_out, w_out[-1:]]))
    j = xp.clip(xp.searchsorted(e_in, e_out), 1, n_in)
    nearest = xp.where(xp.abs(e_in[j] - e_out) < xp.abs(e_out - e_in[j - 1]), e_in[j], e_in[j - 1])
    e_out = xp.where(xp.abs(nearest - e_out) <= snap_tol * w_edge, nearest, e_out)
    lo, hi = e_out[:-1], e_out[1:]
    covered = (lo >= e_in[0]) & (hi <= e_in[-1])
    lo = xp.clip(lo, e_in[0], e_in[-1])
    hi = xp.clip(hi, e_in[0], e_in[-1])
    # input bins holding each output edge: e_in[kl] <= lo < e_in[kl+1], e_in[kr] < hi <= e_in[kr+1]
    kl = xp.clip(xp.searchsorted(e_in, lo, side="right") - 1, 0, n_in - 1)
    kr = xp.clip(xp.searchsorted(e_in, hi, side="left") - 1, 0, n_in - 1)
    kr = xp.maximum(kr, kl)
    same = kl == kr
    o_left = xp.where(same, hi - lo, e_in[kl + 1] - lo)  # overlap with bin kl
    o_right = xp.where(same, 0.0, hi - e_in[kr])  # overlap with bin kr (when different)
    inner = kr > kl + 1  # whole bins kl+1 .. kr-1 lie inside

    good = (ivar > 0) & xp.isfinite(ivar) & xp.isfinite(flux)
    g = good.astype(xp.float64)
    f = xp.where(good, flux, 0).astype(xp.float64)
    var = xp.where(good, 1.0 / xp.where(good, ivar, 1).astype(xp.float64), 0.0)
    zero = xp.zeros((flux.shape[0], 1), dtype=xp.float64)

    def window_sum(x_left, x_right, x_bins, weight_left, weight_right):
        """Σ over the output bin: partial end bins with given weights + whole inner bins."""
        cum = xp.concatenate([zero, xp.cumsum(x_bins, axis=1)], axis=1)
        inner_sum = xp.where(inner, cum[:, kr] - cum[:, xp.minimum(kl + 1, kr)], 0.0)
        return weight_left * x_left[:, kl] + weight_right * x_right[:, kr] + inner_sum

    den = window_sum(g, g, g * width_in, o_left, o_right)
    num = window_sum(g * f, g * f, g * f * width_in, o_left, o_right)
    vsum = window_sum(var, var, var * width_in**2, o_left**2, o_right**2)
    if covar is not None:
        vsum = vsum + _covariance_terms(xp, covar, g, width_in, kl, kr, g[:, kl] * o_left, g[:, kr] * o_right, flux.shape)
    ok = covered & (den > 0)
    safe = xp.where(ok, den, 1.0)
    flux_out = xp.where(ok, num / safe, 0.0)
    var_out = vsum / safe**2
    ivar_out = xp.where(ok & (var_out > 0), 1.0 / xp.where(var_out > 0, var_out, 1.0), 0.0)
    if one_d:
        flux_out, ivar_out = flux_out[0], ivar_out[0]
    return flux_out, ivar_out, covered
