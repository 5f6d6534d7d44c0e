"""Crossmatch a catalogpred catalog with an external table, and find infrared excess.

For every row of the external table (CSV, Parquet, FITS or VOTable, identified by content) the
nearest catalog row within ``radius_arcsec`` is found (astropy ``match_to_catalog_sky``). Only
the HEALPix leaves around the external positions are read (for a radius above a tenth of a leaf and
more than 2,000 external rows, every leaf).

When the external table has observed W1–W4 magnitudes with errors (AllWISE ``w1mpro``/``w1sigmpro``,
``w1_mag``/``w1_mag_err`` or VizieR ``W1mag``/``e_W1mag``; any case), or fluxes in nanomaggies (Legacy
Surveys and DESI ``flux_w1``/``flux_ivar_w1``, AB: :func:`~catalogpred.tables.with_flux_magnitudes`),
each band gets::

    w1_excess       = m_pred - m_obs                                  [mag]
    w1_excess_sigma = (m_pred - m_obs) / sqrt(sigma_pred^2 + sigma_obs^2)

A **positive** excess means the object is *brighter* in the infrared than its optical spectrum
predicts (obscured AGN, dusty starbursts). This is the catalog's χ convention (``catalog.py``).
``ir_excess`` is true when any band's ``excess_sigma`` exceeds the threshold (default 3), null when
no band could be compared; ``ir_excess_bands`` lists those bands, ``chi2_n`` is the mean χ² of the
compared bands. Observed magnitudes are taken as Vega (AllWISE ``w?mpro``) unless their unit or
``mag_system`` says AB (converted to Vega first); non-detections (σ null, NaN or ≥ 99, as in AllWISE upper
limits; a flux ≤ 0) give null excess.

>>> t = crossmatch("demo-output/catalog", "allwise.parquet", radius_arcsec=1.5)   # doctest: +SKIP
>>> t.filter(t["ir_excess"]).num_rows                                              # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .spectra import VEGA_TO_AB, WISE_UCD_RANGE
from .errors import ConfigError, InputFileError, RejectReason
from .tables import (BANDS, MAG_SYSTEMS, NON_DETECTION_SIGMA, find_photometry_columns,  # noqa: F401 (re-exported)
                     PREDICTED_COLUMNS, float_values, magnitude_systems, photometry_input_columns,
                     predicted_columns, warn_if_ab_read_as_vega, with_flux_magnitudes)
from .query import CatalogQuery, Cone, angle_value, astropy_to_arrow, open_catalog
from .query.convert import in_memory_to_arrow

__all__ = ["crossmatch", "ir_excess", "query_ir_excess", "own_photometry_columns", "read_external", "find_radec_columns", "find_photometry_columns", "magnitude_systems", "MAG_SYSTEMS", "BANDS",
           "EXTERNAL_SUFFIX", "NON_DETECTION_SIGMA"]

log = logging.getLogger(__name__)

#: suffix of external columns whose name is also a catalog column.
EXTERNAL_SUFFIX = "_ext"
#: matched rows a band needs before crossmatch checks its median excess for AB magnitudes read as Vega
MIN_ROWS_AB_CHECK = 10
#: crossmatch radius when none is given, arcsec (AllWISE positions are good to ~0.5 arcsec; SDSS fibres are 3 arcsec)
DEFAULT_RADIUS_ARCSEC = 1.5
_RA_NAMES = ("ra", "ra_deg", "radeg", "ra_icrs", "raj2000", "_raj2000", "ra_j2000", "plug_ra", "target_ra", "alpha")
_DEC_NAMES = ("dec", "dec_deg", "decdeg", "de_icrs", "dec_icrs", "dej2000", "_dej2000", "decj2000", "dec_j2000",
              "plug_dec", "target_dec", "delta")


# --------------------------------------------------------------------------- reading
def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"SIMPLE  ="):
        return "fits"
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x1f\x8b"):
        return "fits" if ".fit" in path.name.lower() else "csv"
    text = head.lstrip().lower()
    if text.startswith(b"<?xml") or text.startswith(b"<votable"):
        return "votable"
    return "csv"


def read_external(path, format: str | None = None) -> pa.Table:
    """Read an external table into Arrow (units in the field metadata where the file has them).

    The format is identified by content (FITS signature, Parquet magic, XML), else CSV;
    ``format`` ("csv", "parquet", "fits", "votable") overrides.

    Raises
    ------
    InputFileError
        If the file is missing or cannot be read as that format.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file", RejectReason.UNREADABLE_FILE)
    fmt = (format or _sniff(path)).lower()
    try:
        if fmt == "parquet":
            return pq.read_table(path)
        if fmt in ("fits", "votable"):
            import warnings

            from astropy.table import Table
            from astropy.units import UnitsWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnitsWarning)
                t = Table.read(path, format="fits" if fmt == "fits" else "votable")
            return astropy_to_arrow(t)
        if fmt == "csv":
            import pyarrow.csv as pacsv

            return pacsv.read_csv(path, read_options=pacsv.ReadOptions(), parse_options=pacsv.ParseOptions(
                delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except Exception as exc:
        raise InputFileError(f"{path}: cannot read as {fmt}: {exc}", RejectReason.UNREADABLE_FILE) from exc
    raise ConfigError(f"unknown external format {format!r}; use csv, parquet, fits or votable")


def _to_arrow(external) -> pa.Table:
    """An external table given as a path (:func:`read_external`) or in memory (pyarrow, astropy, pandas)."""
    out = read_external(external) if isinstance(external, (str, os.PathLike)) else in_memory_to_arrow(external)
    if out is None:
        raise ConfigError(f"external must be a path, pyarrow/astropy Table or pandas DataFrame, got "
                          f"{type(external).__name__}")
    return out


def _unit_of(field: pa.Field) -> str:
    """The ``unit`` of a field's metadata (as :func:`read_external` and ``tables.read_table_any`` put it), or ''."""
    return (field.metadata or {}).get(b"unit", b"").decode(errors="replace")


def find_radec_columns(names, ra_col: str | None = None, dec_col: str | None = None) -> tuple[str, str]:
    """The RA and Dec column names (given, or guessed case-insensitively from common names)."""
    lower = {n.lower(): n for n in names}

    def pick(given, candidates, what):
        if given is not None:
            if given in names:
                return given
            if given.lower() in lower:
                return lower[given.lower()]
            raise ConfigError(f"external table has no column {given!r}; columns: {', '.join(names)}")
        for c in candidates:
            if c in lower:
                return lower[c]
        raise ConfigError(f"cannot tell which external column is {what}; pass --{what}-col ({what}_col= in "
                          f"Python) (columns: {', '.join(names)})")

    return pick(ra_col, _RA_NAMES, "ra"), pick(dec_col, _DEC_NAMES, "dec")


def _degrees(col, name: str, sexagesimal: str, unit: str = "") -> np.ndarray:
    """float64 degrees of a position column: numbers in their column's ``unit`` (the field metadata ``unit``:
    FITS TUNITn, VOTable unit; deg when there is none; rad, arcsec, hourangle, ``'15 deg'`` are converted), or
    text that is sexagesimal (RA in hours: '12:50:07.6', '12 50 07.6', '12h50m07.6s'; Dec in degrees) as SIMBAD
    and VizieR tables give it. NaN where null or empty.

    Raises ConfigError for a numeric column whose unit is not an angle (or not a unit astropy knows)."""
    import astropy.units as u

    try:
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = None
    angle = _angle_unit(unit, name, sexagesimal, numeric=values is not None)
    if values is not None:
        return values if angle is None or angle == u.deg else (values * angle).to_value(u.deg)
    from astropy.coordinates import Angle

    text = [v.strip() if isinstance(v, str) else "" for v in col.to_pylist()]
    out = np.full(len(text), np.nan)
    have = [i for i, v in enumerate(text) if v]
    try:
        out[have] = Angle([text[i] for i in have], unit=angle or sexagesimal).deg
    except (TypeError, ValueError, u.UnitsError) as exc:
        raise ConfigError(f"external column {name!r} is neither degrees nor sexagesimal "
                          f"({'RA in hours, 12:50:07.6' if sexagesimal == 'hourangle' else 'Dec, +07:02:55'}): {exc}") from exc
    return out


#: position column units astropy does not parse, as surveys spell them (VizieR's sexagesimal h:m:s, d:m:s)
_ANGLE_SPELLINGS = {"degree": "deg", "degrees": "deg", "degs": "deg", "radian": "rad", "radians": "rad",
                    "h:m:s": "hourangle", "d:m:s": "deg", "hms": "hourangle", "dms": "deg"}


def _angle_unit(unit: str, name: str, sexagesimal: str, numeric: bool):
    """The astropy angle unit of a position column's ``unit`` string; None when it has none. Hours ('h', a time
    unit to astropy) are hour angle on an RA column. Raises ConfigError for a numeric column whose unit is not
    an angle; a text column's values carry their own (12h50m, 12:50:07.6) and such a unit is ignored."""
    import warnings

    import astropy.units as u

    text = (unit or "").strip()
    if not text:
        return None
    text = _ANGLE_SPELLINGS.get(text.lower(), text)
    parsed = None
    for fmt in (None, "fits", "cds", "vounit"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", u.UnitsWarning)
                parsed = u.Unit(text, format=fmt)
            break
        except ValueError:
            continue
    if parsed is not None and sexagesimal == "hourangle" and parsed == u.hour:
        return u.hourangle
    if parsed is not None and parsed.physical_type == "angle":
        return parsed
    if not numeric:
        return None
    raise ConfigError(f"external column {name!r} has unit {unit!r}, not an angle astropy knows (deg, rad, arcsec, "
                      "hourangle): convert the column to degrees, or correct its unit")


# --------------------------------------------------------------------------- matching
def _pixels_near(ra: np.ndarray, dec: np.ndarray, radius_deg: float, order: int, all_pixels) -> set[int] | None:
    """Leaves that may hold a catalog row within ``radius_deg`` of any point (None: read all)."""
    if len(ra) == 0:
        return set()
    import astropy.units as u
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix.nested import lonlat_to_healpix, neighbours

    cell_deg = math.degrees(math.sqrt(4 * math.pi / (12 * 4 ** order)))
    if radius_deg < 0.1 * cell_deg:
        # a row within the radius lies in the point's cell or one of its neighbours
        pix = lonlat_to_healpix(Longitude(ra * u.deg), Latitude(dec * u.deg), order).astype(np.int64)
        nb = neighbours(np.unique(pix).astype(np.uint64), order).astype(np.int64)
        return {int(p) for p in np.unique(nb) if p >= 0}
    if len(ra) <= 2000:
        out: set[int] = set()
        for a, d in zip(ra, dec):
            out |= Cone(float(a), float(d), radius_deg).cover(order, all_pixels)
        return out
    return None


def crossmatch(catalog, external, *, radius_arcsec: float | None = None, radius=None, ra_col: str | None = None,
               dec_col: str | None = None, columns=None, excess_threshold: float = 3.0,
               keep_unmatched: bool = False, mag_system: str = "auto") -> pa.Table:
    """Nearest catalog row within ``radius_arcsec`` of each external row, with IR-excess columns.

    Parameters
    ----------
    catalog : path or CatalogQuery
        A catalog, or a query on one: its cone/box/where cuts apply to the candidates, its ``select`` columns
        are the output's catalog columns (unless ``columns`` is given) and its ``limit`` caps the output rows.
    external : path, pyarrow Table, astropy Table or pandas DataFrame
        The external table; a path may be CSV, Parquet, FITS or VOTable.
    radius_arcsec : float, str or astropy Quantity
        Match radius (default 1.5 arcsec): a number in arcsec, an angle Quantity (``2 * u.arcsec``) or text with a
        unit (``"0.5arcmin"``; :func:`~catalogpred.query.angle_value`).
    radius : astropy Quantity or str, optional
        Same as ``radius_arcsec`` (keyword form, as :meth:`~catalogpred.query.CatalogQuery.cone` takes it).
    ra_col, dec_col : str, optional
        External position columns (ICRS), guessed from common names when omitted: numbers in the column's unit
        (FITS TUNITn, VOTable unit: deg, rad, hourangle...; degrees when it has none), or sexagesimal text.
    columns : list of str or "all", optional
        Catalog columns in the output (default: the query's ``select``, else the catalog's default columns).
    excess_threshold : float
        ``ir_excess`` is true where any band's ``w?_excess_sigma`` exceeds this.
    keep_unmatched : bool
        Keep external rows without a match (catalog columns null).
    mag_system : {"auto", "vega", "ab"}
        System of the external W1-W4 magnitudes. AB magnitudes are converted to Vega (the catalog's system)
        with ``m_Vega = m_AB - VEGA_TO_AB[band]`` before the excess; "auto": from each column's unit
        (:func:`magnitude_systems`; Vega unless it says AB).

    Returns
    -------
    pyarrow.Table
        Catalog columns, then external columns (``_ext`` appended to names the catalog also has),
        ``ext_row`` (row number in the external table), ``separation_arcsec`` and, when the external
        table has W1–W4 photometry, ``w?_excess``, ``w?_excess_sigma``, ``chi2_n``, ``ir_excess``,
        ``ir_excess_bands``. Units are in the field metadata (an external column without one: deg for the
        positions, mag for the magnitudes compared); the catalog's table metadata (VO-Parquet) comes along, as
        with a query's rows, so that :func:`~catalogpred.query.write_table` describes every column in Parquet.
    """
    if radius is not None and radius_arcsec is not None:
        raise ConfigError(f"crossmatch takes one radius, got radius_arcsec={radius_arcsec!r} and radius={radius!r}")
    radius_arcsec = angle_value(next((r for r in (radius, radius_arcsec) if r is not None), DEFAULT_RADIUS_ARCSEC),
                                "arcsec", "crossmatch radius")
    if not radius_arcsec > 0:
        raise ConfigError(f"crossmatch needs a positive radius (arcsec), got {radius_arcsec}")
    q = catalog if isinstance(catalog, CatalogQuery) else open_catalog(catalog)
    ext = _to_arrow(external)
    predicted = predicted_columns(ext)  # an external catalogpred export: its predictions are not observations
    ext = with_flux_magnitudes(ext, exclude=predicted)
    rcol, dcol = find_radec_columns(ext.column_names, ra_col, dec_col)
    ext_ra = _degrees(ext.column(rcol), rcol, "hourangle", _unit_of(ext.schema.field(rcol)))
    ext_dec = _degrees(ext.column(dcol), dcol, "deg", _unit_of(ext.schema.field(dcol)))
    ok = np.isfinite(ext_ra) & np.isfinite(ext_dec) & (np.abs(ext_dec) <= 90)
    if (~ok).any():
        log.warning("crossmatch: %d external rows have no valid position (%s, %s) and cannot match",
                    int((~ok).sum()), rcol, dcol)
    radius_deg = radius_arcsec / 3600.0

    schema = q.schema
    if columns is None and q.columns:
        out_cols = list(q.columns)
    elif columns is None:
        default = q.properties.get("hats_cols_default", "").split()
        out_cols = [c for c in default if c in schema.names] or [c for c in schema.names if c != "latent"]
    elif columns == "all" or columns == ["all"]:
        out_cols = list(schema.names)
    else:
        out_cols = list(columns.split(",") if isinstance(columns, str) else columns)
        out_cols = [c.strip() for c in out_cols if c.strip()]
    phot = find_photometry_columns([c for c in ext.column_names if c not in predicted])
    systems = magnitude_systems(ext.schema, phot, mag_system)
    if "ab" in systems.values():
        log.info("external magnitudes in AB, converted to Vega: %s",
                 ", ".join(phot[b][0] for b in phot if systems[b] == "ab"))
    need = ["ra", "dec"] + [f"{b}_mag{s}" for b in phot for s in ("", "_err")]
    read_cols = out_cols + [c for c in need if c not in out_cols]

    near = _pixels_near(np.mod(ext_ra[ok], 360.0), ext_dec[ok], radius_deg, q.order, q.pixels)
    cq = replace(q, max_rows=None).select(read_cols)  # a limit applies to the output, not the candidates
    if near is not None:
        cq = replace(cq, pixels=tuple(sorted(near & set(q.pixels))))
    cat = cq.to_arrow()
    log.info("%d external rows against %d catalog rows from %d leaves", ext.num_rows, cat.num_rows,
             len(cq._leaf_pixels()))

    n = ext.num_rows
    idx = np.zeros(n, np.int64)
    sep = np.full(n, np.nan)
    matched = np.zeros(n, bool)
    if cat.num_rows and ok.any():
        import astropy.units as u
        from astropy.coordinates import SkyCoord

        cat_c = SkyCoord(cat.column("ra").to_numpy() * u.deg, cat.column("dec").to_numpy() * u.deg)
        ext_c = SkyCoord(ext_ra[ok] * u.deg, ext_dec[ok] * u.deg)
        i, d2, _ = ext_c.match_to_catalog_sky(cat_c)
        idx[ok] = i
        sep[ok] = d2.to_value(u.arcsec)
        matched[ok] = sep[ok] <= radius_arcsec
    rows = np.flatnonzero(matched | keep_unmatched)[:q.max_rows]  # the query's limit: the first rows of the output
    take = pa.array(idx[rows], mask=~matched[rows])
    log.info("%d of %d external rows matched within %g arcsec", int(matched.sum()), n, radius_arcsec)

    arrays, fields = [], []
    cat_m = cat.take(take)
    for name in out_cols:
        arrays.append(cat_m.column(name))
        fields.append(cat.schema.field(name))
    ext_m = ext.take(pa.array(rows))
    # columns this function adds: an external column of the same name (e.g. an earlier crossmatch's) gets _ext too
    added = {"ext_row", "separation_arcsec", "chi2_n", "ir_excess", "ir_excess_bands",
             *(f"{b}{s}" for b in phot for s in ("_mag_obs", "_mag_obs_err", "_excess", "_excess_sigma"))}
    # every catalog column name, selected or not: an external column is named the same whatever --columns says
    taken = set(schema.names) | (added if phot else {"ext_row", "separation_arcsec"})
    # the units the positions and magnitudes were taken in, for those that do not say
    ext_units = {rcol: "deg", dcol: "deg", **{c: "mag" for b in phot for c in phot[b]}}
    for fld in ext.schema:
        name = fld.name if fld.name not in taken else fld.name + EXTERNAL_SUFFIX
        taken.add(name)
        arrays.append(ext_m.column(fld.name))
        fields.append(_external_field(fld, name, ext_units.get(fld.name, "")))
    arrays.append(pa.array(rows, pa.int64()))
    fields.append(_field("ext_row", pa.int64(), "", "meta.id", "Row number (0-based) in the external table"))
    sep_out = sep[rows]
    arrays.append(pa.array(sep_out, pa.float64(), mask=~matched[rows]))
    fields.append(_field("separation_arcsec", pa.float64(), "arcsec", "pos.angDistance",
                         "Great-circle distance between the catalog and external positions"))
    if phot:
        a, f = _excess_columns(cat_m, ext_m, phot, excess_threshold, systems)
        arrays += a
        fields += f
    # the catalog's table metadata (VO-Parquet), as a query's rows carry it: write_table describes the columns
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


def _external_field(fld: pa.Field, name: str, unit: str) -> pa.Field:
    """An external column's field in the output: named ``name``, its metadata (units of a FITS or VOTable) kept,
    a description where it has none, and ``unit`` where it has none and is numeric: the unit crossmatch took it in
    (deg for the positions, mag for the magnitudes)."""
    meta = dict(fld.metadata or {})
    numeric = pa.types.is_integer(fld.type) or pa.types.is_floating(fld.type)
    if unit and numeric and not meta.get(b"unit"):
        meta[b"unit"] = unit.encode()
    if not meta.get(b"description"):
        meta[b"description"] = f"{fld.name} of the external table".encode()
    return pa.field(name, fld.type, nullable=fld.nullable, metadata=meta)


def ir_excess(table: pa.Table, *, excess_threshold: float = 3.0, mag_system: str = "auto") -> pa.Table:
    """``table`` (catalog rows: predicted ``w?_mag``/``w?_mag_err``) with the IR-excess columns of
    :func:`crossmatch` (``w?_mag_obs``, ``w?_mag_obs_err``, ``w?_excess``, ``w?_excess_sigma``, ``chi2_n``,
    ``ir_excess``, ``ir_excess_bands``), from observed WISE photometry in the same rows: for a catalog
    whose survey carries it (DESI: the FIBERMAP's Legacy Surveys ``flux_w1``/``flux_w2`` in nanomaggies, AB),
    or for a table that already joined one. Rows without observations get null excess.

    >>> t = ir_excess(open_catalog("desi-ir/").select("all").to_arrow())   # doctest: +SKIP

    Raises ConfigError when the table has no observed W1-W4 (magnitudes with errors, or fluxes with
    inverse variances), or lacks the predicted magnitudes of a band it observes.
    """
    names = [n for n in table.column_names if n not in PREDICTED_COLUMNS]
    observed = with_flux_magnitudes(table.select(names))
    phot = find_photometry_columns(observed.column_names)
    if not phot:
        raise ConfigError("no observed W1-W4 in these rows: magnitudes with errors (w1mpro/w1sigmpro, W1mag/e_W1mag, "
                          "...) or fluxes in nanomaggies (flux_w1/flux_ivar_w1, as DESI catalogs carry); columns: "
                          + ", ".join(names))
    missing = [c for b in phot for c in (f"{b}_mag", f"{b}_mag_err") if c not in table.column_names]
    if missing:
        raise ConfigError(f"no predicted {', '.join(missing)} in these rows to compare the observations with")
    systems = magnitude_systems(observed.schema, phot, mag_system)
    taken = set(table.column_names)
    arrays, fields = _excess_columns(table, observed, phot, excess_threshold, systems)
    clash = [f.name for f in fields if f.name in taken]
    if clash:
        raise ConfigError(f"these rows already have {', '.join(clash)} (an earlier crossmatch or ir_excess)")
    for arr, fld in zip(arrays, fields):
        table = table.append_column(fld, arr)
    return table


def own_photometry_columns(names) -> list[str]:
    """The columns of a catalog (``names``) that hold observed W1-W4 of its own rows (DESI's ``flux_w1``,
    ``flux_ivar_w1``, ...: :func:`~catalogpred.tables.photometry_input_columns`, predictions left out)."""
    return photometry_input_columns([n for n in names if n not in PREDICTED_COLUMNS])


def query_ir_excess(q: CatalogQuery, *, excess_threshold: float = 3.0) -> pa.Table:
    """The rows of catalog query ``q``, its columns (all when it selects none), then :func:`ir_excess`'s, from the
    catalog's own observed photometry (read as well, shown only where ``q`` selects it)."""
    names = q.schema.names
    wanted = list(q.columns) if q.columns else names
    read = wanted + [c for c in (*PREDICTED_COLUMNS, *own_photometry_columns(names)) if c in names and c not in wanted]
    table = ir_excess(q.select(read).to_arrow(), excess_threshold=excess_threshold)
    return table.select(wanted + table.column_names[len(read):])


def _field(name, type_, unit, ucd, description) -> pa.Field:
    return pa.field(name, type_, metadata={b"unit": unit.encode(), b"ucd": ucd.encode(),
                                           b"description": description.encode()})


def _excess_columns(cat_m: pa.Table, ext_m: pa.Table, phot: dict, threshold: float, systems: dict):
    arrays, fields = [], []
    chi2 = []
    over = []
    medians = {}  # median predicted - observed of bands read as Vega: AB read as Vega shows as the offsets
    n = cat_m.num_rows
    for b, (mcol, ecol) in phot.items():
        m_pred, s_pred = float_values(cat_m.column(f"{b}_mag")), float_values(cat_m.column(f"{b}_mag_err"))
        m_obs, s_obs = float_values(ext_m.column(mcol)), float_values(ext_m.column(ecol))
        ab = systems[b] == "ab"
        source = (ext_m.schema.field(mcol).metadata or {}).get(b"derived_from", b"").decode().split(",")[0]
        obs = (f"(22.5 - 2.5 log10 {source} - {VEGA_TO_AB[b]}, nanomaggies to Vega)" if source
               else f"({mcol} - {VEGA_TO_AB[b]}, AB to Vega)" if ab else mcol)
        detected = np.isfinite(m_obs) & np.isfinite(s_obs) & (s_obs >= 0) & (s_obs < NON_DETECTION_SIGMA)
        valid = detected & np.isfinite(m_pred) & np.isfinite(s_pred) & (m_obs < NON_DETECTION_SIGMA)
        m_obs = m_obs - VEGA_TO_AB[b] if ab else m_obs
        with np.errstate(invalid="ignore", divide="ignore"):
            ex = m_pred - m_obs
            sig = ex / np.sqrt(s_pred ** 2 + s_obs ** 2)
        valid &= np.isfinite(sig)
        # the observed magnitude as compared (Vega), so that a reader or a plot needs no unit logic of its own
        arrays += [pa.array(np.where(detected, m_obs, 0.0), pa.float64(), mask=~detected),
                   pa.array(np.where(detected, s_obs, 0.0), pa.float64(), mask=~detected)]
        fields += [_field(f"{b}_mag_obs", pa.float64(), "mag", f"phot.mag;em.IR.{WISE_UCD_RANGE[b]}",
                          f"Observed {b.upper()} from {obs}, Vega: the magnitude {b}_excess compares; null for "
                          "non-detections"),
                   _field(f"{b}_mag_obs_err", pa.float64(), "mag", "stat.error;phot.mag", f"1-sigma error of {b}_mag_obs ({ecol})")]
        arrays.append(pa.array(np.where(valid, ex, 0.0), pa.float64(), mask=~valid))
        fields.append(_field(f"{b}_excess", pa.float64(), "mag", "phot.mag;arith.diff",
                             f"{b}_mag - {obs}: predicted minus observed {b.upper()} (Vega); positive = brighter "
                             "in the IR than predicted"))
        arrays.append(pa.array(np.where(valid, sig, 0.0), pa.float64(), mask=~valid))
        fields.append(_field(f"{b}_excess_sigma", pa.float64(), "", "stat.value;arith.ratio",
                             f"({b}_mag - {obs}) / sqrt({b}_mag_err^2 + {ecol}^2); positive = IR excess"))
        chi2.append(np.where(valid, sig ** 2, np.nan))
        over.append(np.where(valid, sig > threshold, False))
        if not ab and valid.sum() >= MIN_ROWS_AB_CHECK:
            medians[b] = float(np.median(ex[valid]))
    warn_if_ab_read_as_vega(medians, "crossmatch")
    chi2 = np.vstack(chi2) if chi2 else np.zeros((0, n))
    n_valid = np.isfinite(chi2).sum(0)
    with np.errstate(invalid="ignore"):
        chi2_n = np.where(n_valid > 0, np.nansum(chi2, 0) / np.maximum(n_valid, 1), np.nan)
    arrays.append(pa.array(chi2_n, pa.float64(), mask=n_valid == 0))
    fields.append(_field("chi2_n", pa.float64(), "", "stat.fit.chi2",
                         "Mean chi^2 over the compared bands, chi = (m_pred - m_obs)/sqrt(sigma_pred^2 + sigma_obs^2)"))
    over = np.vstack(over) if over else np.zeros((0, n), bool)
    flag = over.any(0)
    arrays.append(pa.array(flag, pa.bool_(), mask=n_valid == 0))
    fields.append(_field("ir_excess", pa.bool_(), "", "meta.code",
                         f"True if any band has excess_sigma > {threshold:g} (more IR than the optical predicts); "
                         "null if no band could be compared"))
    bands = list(phot)
    names = [",".join(b for b, o in zip(bands, over[:, i]) if o) for i in range(n)]
    arrays.append(pa.array(names, pa.string()))
    fields.append(_field("ir_excess_bands", pa.string(), "", "meta.note",
                         f"Bands with excess_sigma > {threshold:g}, e.g. 'w3,w4' (empty if none)"))
    return arrays, fields
