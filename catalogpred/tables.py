"""User tables (CSV, Parquet, FITS, VOTable) into Arrow, and the conventions of the WISE photometry in them.

:func:`read_table_any` reads training, photometry and redshift tables. :func:`find_photometry_columns`,
:func:`magnitude_systems` and :func:`wise_vega_magnitudes` say which columns hold observed W1-W4 magnitudes
and in which system, the same way for ``crossmatch`` and for ``train``. Tables that give WISE as fluxes in
nanomaggies (Legacy Surveys catalogs and sweeps, DESI's FIBERMAP, so a DESI catalogpred catalog:
``flux_w1``/``flux_ivar_w1``) get magnitude columns first (:func:`with_flux_magnitudes`).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pyarrow as pa

from .spectra import VEGA_TO_AB, WISE_BANDS as BANDS
from .errors import ConfigError

__all__ = ["PREDICTED_COLUMNS", "predicted_columns", "read_table_any", "BANDS", "NON_DETECTION_SIGMA", "MAG_SYSTEMS", "find_photometry_columns",
           "magnitude_systems", "wise_vega_magnitudes", "float_values", "nanomaggies_to_ab", "with_flux_magnitudes", "photometry_input_columns"]

log = logging.getLogger(__name__)

#: an observed error at or above this (mag) marks a non-detection (AllWISE and the reference data use 9999).
NON_DETECTION_SIGMA = 99.0
#: (magnitude, error) column name patterns, lower case, ``{b}`` = w1..w4, in order of preference:
#: AllWISE, a crossmatch's observed columns, generic, VizieR II/328, and others.
_PHOT_PATTERNS = (("{b}mpro", "{b}sigmpro"), ("{b}_mag_obs", "{b}_mag_obs_err"), ("{b}_mag", "{b}_mag_err"),
                  ("{b}mag", "e_{b}mag"), ("{b}_mpro", "{b}_sigmpro"), ("{b}mag", "{b}magerr"),
                  ("{b}_obs", "{b}_obs_err"), ("{b}", "{b}_err"), ("{b}_mag_from_flux", "{b}_mag_from_flux_err"))
#: (flux, inverse variance) column name patterns of WISE fluxes in nanomaggies, lower case: Legacy Surveys
#: (tractor catalogs, sweeps) and DESI FIBERMAP names. :func:`with_flux_magnitudes` reads them.
_FLUX_PATTERNS = (("flux_{b}", "flux_ivar_{b}"),)
#: catalogpred's predicted magnitude columns (a catalog's, an export's): predictions, not observations
PREDICTED_COLUMNS = tuple(f"{b}_mag{s}" for b in BANDS for s in ("", "_err"))
#: AB magnitude of a flux of 1 nanomaggy: m_AB = 22.5 - 2.5 log10(f / nanomaggy)
NANOMAGGY_AB_ZERO_POINT = 22.5
#: the systems of observed W1-W4 magnitudes that catalogpred takes (``--mag-system``)
MAG_SYSTEMS = ("auto", "vega", "ab")
_AB_UNITS = ("mag(ab)", "abmag", "ab", "mag_ab", "magab", "ab_mag")


def find_photometry_columns(names, *, need_errors: bool = True) -> dict[str, tuple[str, str | None]]:
    """Observed WISE magnitude and error columns per band: ``{"w1": ("w1mpro", "w1sigmpro"), ...}``
    (case-insensitive; bands without both columns are left out, or with ``need_errors=False`` kept with
    ``None`` for the error column: a colour plot needs no errors)."""
    lower = {n.lower(): n for n in names}
    out = {}
    for b in BANDS:
        for mag, err in _PHOT_PATTERNS:
            m, e = mag.format(b=b), err.format(b=b)
            if m in lower and e in lower:
                out[b] = (lower[m], lower[e])
                break
        else:
            mags = [mag.format(b=b) for mag, _ in _PHOT_PATTERNS if mag.format(b=b) in lower]
            if mags and not need_errors:
                out[b] = (lower[mags[0]], None)
    return out


def magnitude_systems(schema: pa.Schema, phot: dict, mag_system: str = "auto") -> dict[str, str]:
    """``{band: "vega" | "ab"}`` of the magnitude columns ``phot`` (:func:`find_photometry_columns`).

    ``mag_system="auto"`` reads each column's unit (field metadata, e.g. from a FITS TUNIT or a VOTable
    unit): ``mag(AB)``/``ABmag`` is AB, anything else Vega, which AllWISE, unWISE and CatWISE magnitudes are.
    Columns made from fluxes in nanomaggies (:func:`with_flux_magnitudes`) are AB whatever ``mag_system`` says.
    """
    if mag_system not in MAG_SYSTEMS:
        raise ConfigError(f"mag_system must be one of {MAG_SYSTEMS}, not {mag_system!r}")
    out = {}
    for b, (mcol, _) in phot.items():
        meta = schema.field(mcol).metadata or {}
        unit = meta.get(b"unit", b"").decode().replace(" ", "").lower()
        if b"derived_from" in meta:  # from a flux in nanomaggies (with_flux_magnitudes): AB by definition
            out[b] = "ab"
        else:
            out[b] = mag_system if mag_system != "auto" else "ab" if unit in _AB_UNITS else "vega"
    return out


def predicted_columns(table: pa.Table) -> list[str]:
    """The ``w?_mag``/``w?_mag_err`` columns of ``table`` that are catalogpred's predictions, not observations:
    those whose description says "Predicted" (a catalog export keeps it), or all of them in a table with the
    catalog's ``model_id`` column (a CSV export, which keeps no descriptions)."""
    lower = {n.lower(): n for n in table.column_names}
    found = [lower[n] for n in PREDICTED_COLUMNS if n in lower]
    if "model_id" in lower:
        return found
    return [c for c in found
            if (table.schema.field(c).metadata or {}).get(b"description", b"").decode().lower().startswith("predicted")]


def wise_vega_magnitudes(table: pa.Table, mag_system: str = "auto", *, what: str = "the table",
                         need_errors: bool = True):
    """Observed W1-W4 of ``table`` as Vega: ``(mag, err, columns)``, float64 [n, 4] each (NaN where a band has
    no column; AB converted with :data:`VEGA_TO_AB`), and ``{band: (mag column, err column, system)}``.
    ``need_errors=False`` also reads magnitudes without an error column (``err`` NaN there).

    Raises ConfigError when no band has both a magnitude and an error column (a magnitude column, with
    ``need_errors=False``).
    """
    table = with_flux_magnitudes(table.drop_columns(predicted_columns(table)))  # a catalog's own predictions
    phot = find_photometry_columns(table.column_names, need_errors=need_errors)
    if not phot:
        raise ConfigError(f"{what} has no W1-W4 magnitude" + (" and error" if need_errors else "")
                          + " columns (e.g. w1mpro/w1sigmpro, W1mag/e_W1mag, w1_mag/w1_mag_err) nor fluxes in "
                          f"nanomaggies (flux_w1/flux_ivar_w1); columns: {', '.join(table.column_names)}")
    systems = magnitude_systems(table.schema, phot, mag_system)
    n = table.num_rows
    mag, err = np.full((n, len(BANDS)), np.nan), np.full((n, len(BANDS)), np.nan)
    for j, b in enumerate(BANDS):
        if b in phot:
            mcol, ecol = phot[b]
            m = float_values(table.column(mcol))
            mag[:, j] = m - VEGA_TO_AB[b] if systems[b] == "ab" else m
            err[:, j] = float_values(table.column(ecol)) if ecol is not None else np.nan
    for b in BANDS:  # which columns were read, in which system: a wrong guess shows up in the log
        if b in phot:
            log.info("%s: observed %s from %s/%s (%s)", what, b.upper(), *phot[b], systems[b])
    return mag, err, {b: (*phot[b], systems[b]) for b in phot}


def warn_if_ab_read_as_vega(offset: dict, what: str) -> bool:
    """Warn (and return True) when predicted − observed (``offset``: band -> mean or median, mag) sits at the Vega
    − AB offset (−:data:`VEGA_TO_AB`, within 0.3 mag) in every band that has one: the observed magnitudes are
    then very likely AB read as Vega (fix: ``--mag-system ab``, or a ``mag(AB)`` column unit). A real population
    is not 2.7-6.6 mag fainter than predicted in every band at once."""
    have = {b: v for b, v in offset.items() if v is not None and np.isfinite(v)}
    if not have or any(abs(v + VEGA_TO_AB[b]) >= 0.3 for b, v in have.items()):
        return False
    log.warning("%s: predicted - observed is %s, the Vega-AB offsets (%s); the observed magnitudes look like AB "
                "read as Vega: pass --mag-system ab (mag_system=\"ab\" in Python)", what,
                ", ".join(f"{v:+.2f}" for v in have.values()), ", ".join(f"-{VEGA_TO_AB[b]}" for b in have))
    return True


def photometry_input_columns(names) -> list[str]:
    """The columns of ``names`` that :func:`wise_vega_magnitudes` would read: magnitude and error columns
    (:func:`find_photometry_columns`), else WISE fluxes and inverse variances in nanomaggies."""
    phot = find_photometry_columns(names)
    return [c for b in phot for c in phot[b]] + [c for b, cols in _flux_columns(names, skip=phot).items() for c in cols]


def _flux_columns(names, skip=()) -> dict[str, tuple[str, str]]:
    """``{band: (flux column, inverse-variance column)}`` of WISE fluxes in nanomaggies (:data:`_FLUX_PATTERNS`,
    any case), for the bands not in ``skip``."""
    lower = {n.lower(): n for n in names}
    out = {}
    for b in BANDS:
        for pats in _FLUX_PATTERNS if b not in skip else ():
            cols = [lower.get(p.format(b=b)) for p in pats]
            if all(cols):
                out[b] = tuple(cols)
                break
    return out


def nanomaggies_to_ab(flux, ivar) -> tuple[np.ndarray, np.ndarray]:
    """AB magnitude and its 1-sigma error of fluxes in nanomaggies (the Legacy Surveys' and DESI's unit:
    1 nanomaggy = 3.631 µJy, m_AB = 22.5 - 2.5 log10 f).

    ``flux``: float [n], nanomaggy; ``ivar``: float [n], nanomaggy⁻². Returns ``(mag, err)`` float64 [n], mag(AB),
    with ``err = 2.5 / ln(10) / (f sqrt(ivar))`` (first order); NaN for a non-detection: a flux that is not
    positive (forced photometry measures noise around zero there), or an inverse variance that is zero
    (no data) or not finite.
    """
    f, iv = np.asarray(flux, np.float64), np.asarray(ivar, np.float64)
    ok = np.isfinite(f) & np.isfinite(iv) & (f > 0) & (iv > 0)
    fs = np.where(ok, f, 1.0)
    mag = np.where(ok, NANOMAGGY_AB_ZERO_POINT - 2.5 * np.log10(fs), np.nan)
    err = np.where(ok, 2.5 / np.log(10) / (fs * np.sqrt(np.where(ok, iv, 1.0))), np.nan)
    return mag, err


def with_flux_magnitudes(table: pa.Table, exclude=()) -> pa.Table:
    """``table`` with ``{b}_mag_from_flux`` and ``{b}_mag_from_flux_err`` (mag(AB), :func:`nanomaggies_to_ab`)
    added for each band that has WISE fluxes in nanomaggies (``flux_w1`` and ``flux_ivar_w1``, any case) but
    no magnitude columns :func:`find_photometry_columns` knows; unchanged when there is none.

    The added columns are null for non-detections, and carry ``unit: mag(AB)`` and ``derived_from`` in their
    field metadata: :func:`magnitude_systems` takes them as AB whatever ``mag_system`` says. Columns in
    ``exclude`` (e.g. :func:`predicted_columns`) do not count as magnitudes the table has.
    """
    have = find_photometry_columns([c for c in table.column_names if c not in set(exclude)])
    for b, (fcol, icol) in _flux_columns(table.column_names, skip=have).items():
        mag, err = nanomaggies_to_ab(float_values(table.column(fcol)), float_values(table.column(icol)))
        miss = ~np.isfinite(mag)
        for name, values, what in ((f"{b}_mag_from_flux", mag, f"{b.upper()} AB magnitude"),
                                   (f"{b}_mag_from_flux_err", err, f"1-sigma error of {b}_mag_from_flux")):
            meta = {b"unit": b"mag(AB)", b"derived_from": f"{fcol},{icol}".encode(),
                    b"description": f"{what} from {fcol} (nanomaggy): 22.5 - 2.5 log10({fcol}); null where "
                                    f"{fcol} <= 0 or {icol} = 0".encode()}
            table = table.append_column(pa.field(name, pa.float64(), metadata=meta),
                                        pa.array(np.where(miss, 0.0, values), pa.float64(), mask=miss))
    return table


def float_values(col) -> np.ndarray:
    """float64 numpy values of an Arrow column, NaN where null."""
    import pyarrow.compute as pc

    col = pc.cast(col, pa.float64())
    return col.fill_null(np.nan).to_numpy(zero_copy_only=False) if col.null_count else col.to_numpy(zero_copy_only=False)


def read_table_any(path: str | os.PathLike, hdu=None) -> pa.Table:
    """A table file as an Arrow table, by extension: .parquet/.pq, .csv/.txt, .fits/.fit(.gz), .vot/.xml.

    Vector columns of FITS tables become fixed-size lists; FITS/VOTable units go into the field metadata
    (``unit``), where :func:`magnitude_systems` looks for AB magnitudes.
    """
    path = str(path)
    low = path.lower()
    if not os.path.exists(path):
        raise ConfigError(f"table {path} does not exist")
    if low.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if low.endswith((".csv", ".txt")):
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path)
    if low.endswith((".fits", ".fit", ".fits.gz", ".vot", ".xml")):
        from astropy.table import Table

        t = Table.read(path, hdu=hdu) if hdu is not None else Table.read(path)
        arrays, fields = [], []
        for name in t.colnames:
            v = np.asarray(t[name])
            if v.dtype.kind in "SU":
                arr = pa.array(np.char.strip(v.astype(str)).tolist(), pa.string())
            elif v.ndim == 2:  # FITS data are big-endian: Arrow takes native byte order only
                arr = pa.FixedSizeListArray.from_arrays(pa.array(v.astype(v.dtype.newbyteorder("=")).ravel()),
                                                        v.shape[1])
            else:
                arr = pa.array(v.astype(v.dtype.newbyteorder("=")))
            unit = getattr(t[name], "unit", None)
            arrays.append(arr)
            fields.append(pa.field(name, arr.type, metadata={b"unit": unit.to_string().encode()} if unit else None))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    raise ConfigError(f"{path}: unknown table format; use .csv, .parquet, .fits or .vot")
