"""Queries on a catalogpred catalog: cone and box searches, filters, id lookup, SQL, exports.

>>> cat = open_catalog("demo-output/catalog")                                    # doctest: +SKIP
>>> t = cat.cone(150.1, 2.2, 600).where("w1_mag - w2_mag > 0.8").to_astropy()  # doctest: +SKIP
>>> cat.box(350, 10, -5, 5).sql("SELECT survey, count(*) AS n FROM catalog GROUP BY survey")  # doctest: +SKIP

A :class:`CatalogQuery` is lazy and immutable: each method returns a new query, and
``to_arrow``/``to_pandas``/``to_astropy``/``sql`` run it. Spatial queries first select the
HEALPix leaves (fixed order K) that overlap the region (cdshealpix, the library hats
uses), read only those part files, then apply the exact cut (great-circle distance for a
cone, RA/Dec ranges for a box). Several spatial calls combine with AND. Filters use pandas'
expression syntax on column names (``"z < 0.1 and flags == 0"``); ``sql`` uses DuckDB's SQL
with the query registered as a view named ``catalog``.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .catalog import DATASET_DIR, SPATIAL_INDEX_ORDER, pixel_dir
from .errors import CatalogError, ConfigError

__all__ = ["open_catalog", "CatalogQuery", "Cone", "Box", "angular_separation_deg", "angle_value", "write_table",
           "arrow_to_astropy", "astropy_to_arrow", "format_table", "catalog_info", "format_info", "OUTPUT_FORMATS"]

log = logging.getLogger(__name__)

#: output formats of :func:`write_table` (by file extension).
OUTPUT_FORMATS = (".csv", ".parquet", ".fits", ".vot")
_FORMAT_ALIASES = {".fit": ".fits", ".fts": ".fits", ".votable": ".vot", ".xml": ".vot", ".pq": ".parquet"}
#: full sky in square degrees (4π sr).
SKY_AREA_DEG2 = 4 * math.pi * (180 / math.pi) ** 2
#: rows gathered from the part files before the exact cuts run on them.
_CHUNK_ROWS = 65_536
#: margin (deg) added to spatial regions when choosing leaves, so rounding never drops a leaf.
_COVER_MARGIN_DEG = 1e-7


def angular_separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation in degrees (haversine; inputs in degrees)."""
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))


def angle_value(value, unit: str = "arcsec", name: str = "radius") -> float:
    """An angle as a float in ``unit``: a number (already in ``unit``), an astropy angle Quantity or ``Angle``
    (``0.5 * u.deg``), or text: a number, a value with its unit (``"10arcsec"``, ``"0.5 arcmin"``, ``"1deg"``)
    or with primes (``"10'"``, ``'1.5"'``, ``"0d10m"``, as astropy ``Angle`` reads them).

    Raises
    ------
    ConfigError
        If ``value`` is none of those, or its unit is not an angle (``"10 m"``).
    """
    import astropy.units as u

    want = u.Unit(unit)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            q = u.Quantity(text)
            if not q.unit.is_equivalent(u.deg):  # '30m' is 30 metres as a Quantity, 30 arcmin as an Angle
                raise u.UnitsError(f"{q.unit} is not an angle")
            return float(q.to_value(want))
        except (TypeError, ValueError, u.UnitsError):
            pass
        from astropy.coordinates import Angle

        try:
            return float(Angle(text).to_value(want))
        except (TypeError, ValueError, u.UnitsError) as exc:
            raise ConfigError(f"cannot read {name} {value!r} as an angle; give a number ({unit}) or a value with "
                              "its unit, e.g. 10arcsec, 0.5arcmin, 1deg") from exc
    if hasattr(value, "unit"):
        try:
            return float(u.Quantity(value).to_value(want))
        except (TypeError, ValueError, u.UnitsError) as exc:
            raise ConfigError(f"{name} must be an angle, got {value!r} ({exc})") from exc
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number ({unit}), an angle Quantity or text such as '10arcsec', "
                          f"got {value!r}") from exc


# --------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class Cone:
    """All points within ``radius_deg`` (great circle) of (``ra``, ``dec``), degrees."""

    ra: float
    dec: float
    radius_deg: float

    @property
    def radius_arcsec(self) -> float:
        return self.radius_deg * 3600.0

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        return angular_separation_deg(self.ra, self.dec, ra, dec) <= self.radius_deg

    def cover(self, order: int, pixels) -> set[int]:
        """The ``pixels`` (HEALPix nested, at ``order``) that may hold points of the cone (a superset)."""
        pix = np.asarray(sorted(pixels), np.int64)
        if self.radius_deg + _COVER_MARGIN_DEG >= 180 or len(pix) == 0:
            return set(pix.tolist())
        lon, lat = _pixel_centres(order, tuple(pix.tolist()))
        near = angular_separation_deg(self.ra, self.dec, lon, lat) <= (
            self.radius_deg + _max_pixel_radius_deg(order) + _COVER_MARGIN_DEG)
        cand = pix[near]
        if len(cand) == 0:
            return set()
        vlon, vlat, spacing = _pixel_boundaries(order, cand)
        dmin = angular_separation_deg(self.ra, self.dec, vlon, vlat).min(1)
        keep = (dmin - 0.6 * spacing - _COVER_MARGIN_DEG <= self.radius_deg) | (
            cand == _healpix_of(self.ra, self.dec, order))
        return set(cand[keep].tolist())

    def sql(self, ra: str = "ra", dec: str = "dec") -> str:
        """The same haversine cut as :meth:`contains`, as a DuckDB SQL condition."""
        s = (f"pow(sin(radians({dec} - ({self.dec!r})) / 2), 2) + cos(radians({self.dec!r})) * cos(radians({dec})) "
             f"* pow(sin(radians({ra} - ({self.ra!r})) / 2), 2)")
        return f"degrees(2 * asin(sqrt(least(greatest({s}, 0), 1)))) <= {self.radius_deg!r}"

    def lsdb_search(self):
        import lsdb

        return lsdb.ConeSearch(ra=self.ra, dec=self.dec, radius_arcsec=self.radius_arcsec)

    def __str__(self) -> str:
        return f"cone(ra={self.ra:g}, dec={self.dec:g}, radius={self.radius_arcsec:g} arcsec)"


@dataclass(frozen=True)
class Box:
    """RA/Dec ranges in degrees, boundaries included.

    ``ra_min > ra_max`` wraps through RA = 0 (``Box(350, 10, ...)`` is 350..360 and 0..10);
    ``ra_max - ra_min == 360`` is every RA.
    """

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    @property
    def full_ra(self) -> bool:
        return self.ra_max - self.ra_min >= 360

    @property
    def wraps(self) -> bool:
        return self.ra_min > self.ra_max

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        in_dec = (dec >= self.dec_min) & (dec <= self.dec_max)
        if self.full_ra:
            return in_dec
        ra = np.mod(ra, 360.0)
        if self.wraps:
            return in_dec & ((ra >= self.ra_min) | (ra <= self.ra_max))
        return in_dec & (ra >= self.ra_min) & (ra <= self.ra_max)

    @property
    def ra_length(self) -> float:
        """RA extent in degrees (through RA 0 when the box wraps)."""
        return 360.0 if self.full_ra else (self.ra_max - self.ra_min) % 360.0

    def cover(self, order: int, pixels) -> set[int]:
        """The ``pixels`` (HEALPix nested, at ``order``) that may hold points of the box (a superset)."""
        pix = np.asarray(sorted(pixels), np.int64)
        m = _COVER_MARGIN_DEG
        if len(pix) == 0 or (self.full_ra and self.dec_min <= -90 and self.dec_max >= 90):
            return set(pix.tolist())
        # 1. each pixel lies in a cap of radius R around its centre: keep caps that meet the box
        lon, lat = _pixel_centres(order, tuple(pix.tolist()))
        big_r = _max_pixel_radius_deg(order)
        keep = (lat - big_r <= self.dec_max + m) & (lat + big_r >= self.dec_min - m)
        if not self.full_ra:
            half = _ra_half_width(lat, big_r)
            keep &= _arcs_overlap(lon - half, 2 * half, self.ra_min, self.ra_length)
        cand = pix[keep]
        if len(cand) == 0:
            return set()
        # 2. a pixel meets the box iff a boundary point is in it, or the box lies inside the pixel
        vlon, vlat, spacing = _pixel_boundaries(order, cand)
        pad = 0.6 * spacing[:, None] + m
        hit = (vlat - pad <= self.dec_max) & (vlat + pad >= self.dec_min)
        if not self.full_ra:
            half = _ra_half_width(vlat, pad)
            hit &= _arcs_overlap(vlon - half, 2 * half, self.ra_min, self.ra_length)
        inside = cand == _healpix_of(self.ra_min, self.dec_min, order)
        return set(cand[hit.any(1) | inside].tolist())

    def sql(self, ra: str = "ra", dec: str = "dec") -> str:
        c = f"{dec} >= {self.dec_min!r} AND {dec} <= {self.dec_max!r}"
        if self.full_ra:
            return c
        op = "OR" if self.wraps else "AND"
        return f"{c} AND ({ra} >= {self.ra_min!r} {op} {ra} <= {self.ra_max!r})"

    def lsdb_search(self):
        import lsdb

        return lsdb.BoxSearch(ra=(self.ra_min, self.ra_max if not self.full_ra else 360.0),
                              dec=(self.dec_min, self.dec_max))

    def __str__(self) -> str:
        return f"box(ra={self.ra_min:g}..{self.ra_max:g}, dec={self.dec_min:g}..{self.dec_max:g})"


def _healpix_of(ra: float, dec: float, order: int) -> int:
    import astropy.units as u
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix.nested import lonlat_to_healpix

    return int(lonlat_to_healpix(Longitude(np.atleast_1d(ra) * u.deg), Latitude(np.atleast_1d(dec) * u.deg), order)[0])


@functools.lru_cache(maxsize=16)
def _pixel_centres(order: int, pixels: tuple) -> tuple[np.ndarray, np.ndarray]:
    from cdshealpix.nested import healpix_to_lonlat

    lon, lat = healpix_to_lonlat(np.asarray(pixels, np.uint64), order)
    return lon.deg, lat.deg


@functools.lru_cache(maxsize=32)
def _max_pixel_radius_deg(order: int) -> float:
    """Upper bound (deg) of the distance from a pixel's centre to any of its points at ``order``.

    Measured on every pixel at min(order, 6) from 16 boundary points each; scaled by 2^-Δorder
    above that, with a 10% allowance (edges bulge a little between samples; the scaling is not exact).
    """
    from cdshealpix.nested import healpix_to_lonlat, vertices

    k = min(order, 6)
    ipix = np.arange(12 * 4 ** k, dtype=np.uint64)
    lon, lat = healpix_to_lonlat(ipix, k)
    vlon, vlat = vertices(ipix, k, step=4)
    d = angular_separation_deg(lon.deg[:, None], lat.deg[:, None], vlon.deg, vlat.deg).max()
    return float(d) * 1.1 * 2.0 ** (k - order)


def _pixel_boundaries(order: int, pixels: np.ndarray):
    """32 boundary points per pixel (deg) and, per pixel, the largest gap between neighbouring points."""
    from cdshealpix.nested import vertices

    vlon, vlat = vertices(np.asarray(pixels, np.uint64), order, step=8)
    vlon, vlat = vlon.deg, vlat.deg
    gaps = angular_separation_deg(vlon, vlat, np.roll(vlon, -1, 1), np.roll(vlat, -1, 1))
    return vlon, vlat, gaps.max(1)


def _ra_half_width(dec, radius):
    """Half the RA extent (deg) of caps of ``radius`` centred at ``dec``; 180 when a cap holds a pole."""
    dec, radius = np.broadcast_arrays(np.asarray(dec, float), np.asarray(radius, float))
    polar = np.abs(dec) + radius >= 90
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sin(np.radians(radius)) / np.cos(np.radians(dec))
    half = np.degrees(np.arcsin(np.clip(np.where(polar, 1.0, ratio), 0, 1)))
    return np.where(polar, 180.0, half)


def _arcs_overlap(a, len_a, b, len_b):
    """Whether RA arcs [a, a + len_a] and [b, b + len_b] (deg, any start) share a point."""
    eps = 1e-9
    return ((np.mod(b - a, 360.0) <= len_a + eps) | (np.mod(a - b, 360.0) <= len_b + eps)
            | (len_a >= 360) | (len_b >= 360))


_IDENT = re.compile(r"`([^`]+)`|\b([A-Za-z_][A-Za-z0-9_]*)\b")


def _referenced_columns(expr: str, names) -> set[str]:
    """Column names that appear in a pandas expression (a superset is fine: they are only read)."""
    names = set(names)
    found = set()
    for quoted, bare in _IDENT.findall(expr):
        n = quoted or bare
        if n in names:
            found.add(n)
    return found


def check_column_list(columns) -> tuple:
    """Column names from ``"a,b"`` or a list, stripped; a :class:`ConfigError` when none is named or one twice."""
    cols = tuple(columns.split(",")) if isinstance(columns, str) else tuple(columns)
    cols = tuple(str(c).strip() for c in cols if str(c).strip())
    if not cols:
        raise ConfigError(f"no column names in {columns!r}; give a comma-separated list, e.g. source_id,ra,dec,w1_mag")
    twice = sorted({c for c in cols if cols.count(c) > 1})
    if twice:
        raise ConfigError(f"columns named more than once: {', '.join(twice)}; name each column once")
    return cols


# --------------------------------------------------------------------------- the query
@dataclass(frozen=True)
class CatalogQuery:
    """A lazy query on a catalog; each method returns a new query, ``to_*`` and ``sql`` run it.

    Build one with :func:`open_catalog`. Spatial regions (:meth:`cone`, :meth:`box`), filters
    (:meth:`where`) and id lookups (:meth:`id`) combine with AND; :meth:`select` and
    :meth:`limit` shape the output.

    Examples
    --------
    >>> cat = open_catalog("demo-output/catalog")                          # doctest: +SKIP
    >>> cat.cone(192.5, 7.0, 600).select("source_id,ra,dec,w1_mag").limit(5).to_pandas()  # doctest: +SKIP
    """

    path: Path
    order: int
    pixels: tuple
    regions: tuple = ()
    filters: tuple = ()
    columns: tuple | None = None
    ids: tuple | None = None
    max_rows: int | None = None
    properties: dict = field(default_factory=dict, compare=False, repr=False)

    # --- building
    def cone(self, ra, dec=None, radius_arcsec=None, *, radius=None) -> "CatalogQuery":
        """Rows within a radius of (ra, dec), or of a ``SkyCoord``: ``cone(coord, 60)``, ``cone(coord, radius=1 * u.deg)``.

        Parameters
        ----------
        ra, dec : float or astropy Quantity
            Centre, degrees (ICRS). ``ra`` may instead be an astropy ``SkyCoord`` in any frame (transformed to
            ICRS); then the second argument, if given, is the radius.
        radius_arcsec : float, str or astropy Quantity
            Radius in arcsec, any angle Quantity (``0.5 * u.deg``) or text with a unit (``"10arcsec"``,
            ``"0.5arcmin"``; :func:`angle_value`).
        radius : astropy Quantity or str, optional
            Same as ``radius_arcsec`` (keyword form).
        """
        if hasattr(ra, "icrs"):  # a SkyCoord
            if dec is not None:
                if radius_arcsec is not None or radius is not None:
                    raise ConfigError("cone(coord, radius): a SkyCoord centre takes one radius, not a dec too")
                radius_arcsec = dec
            if not ra.isscalar:
                raise ConfigError("cone needs one centre; got a SkyCoord of several positions (crossmatch for many)")
            ra, dec = ra.icrs.ra.deg, ra.icrs.dec.deg
        elif dec is None:
            raise ConfigError("cone needs a centre: cone(ra, dec, radius) in deg or cone(SkyCoord, radius)")
        r = radius if radius is not None else radius_arcsec
        if r is None:
            raise ConfigError("cone needs a radius: cone(ra, dec, 60) in arcsec or cone(ra, dec, 1 * u.deg)")
        r_arcsec = angle_value(r, "arcsec", "cone radius")
        ra, dec = angle_value(ra, "deg", "ra"), angle_value(dec, "deg", "dec")
        if not r_arcsec > 0:
            raise ConfigError(f"cone needs a positive radius (arcsec), got {r_arcsec}")
        if not (-90 <= dec <= 90):
            raise ConfigError(f"dec must be in [-90, 90] deg, got {dec}")
        return replace(self, regions=self.regions + (Cone(ra % 360.0, dec, r_arcsec / 3600.0),))

    def box(self, ra_min, ra_max, dec_min, dec_max) -> "CatalogQuery":
        """Rows with ``ra_min <= ra <= ra_max`` and ``dec_min <= dec <= dec_max`` (degrees or Quantities).

        ``ra_min > ra_max`` wraps through RA = 0: ``box(350, 10, -5, 5)`` covers 20 degrees of RA.
        """
        ra_min, ra_max = angle_value(ra_min, "deg", "ra_min"), angle_value(ra_max, "deg", "ra_max")
        dec_min, dec_max = angle_value(dec_min, "deg", "dec_min"), angle_value(dec_max, "deg", "dec_max")
        if not (-90 <= dec_min <= dec_max <= 90):
            raise ConfigError(f"box needs -90 <= dec_min <= dec_max <= 90, got dec {dec_min}..{dec_max}")
        if ra_max - ra_min >= 360:
            region = Box(0.0, 360.0, dec_min, dec_max)
        else:
            region = Box(ra_min % 360.0, ra_max % 360.0, dec_min, dec_max)
        return replace(self, regions=self.regions + (region,))

    def where(self, expr: str) -> "CatalogQuery":
        """Keep rows for which the pandas expression is true, e.g. ``"w1_mag - w2_mag > 0.8"``.

        ``&``/``|`` combine conditions (with the precedence of ``and``/``or``) and test bits of an integer
        column: ``"(flags & 2) > 0"`` (the parentheses are needed); a missing value is false."""
        if not isinstance(expr, str) or not expr.strip():
            raise ConfigError(f"where needs an expression string such as 'z < 0.1', got {expr!r}")
        return replace(self, filters=self.filters + (expr,))

    def select(self, columns) -> "CatalogQuery":
        """Only these columns in the output, in this order (region and filter columns are read as needed);
        ``"all"``: every column (as ``crossmatch(columns="all")``)."""
        cols = check_column_list(columns)
        if cols == ("all",) and "all" not in self.schema.names:
            cols = tuple(self.schema.names)
        unknown = [c for c in cols if c not in self.schema.names]
        if unknown:
            raise ConfigError(f"unknown columns {unknown}; available: {', '.join(self.schema.names)}")
        return replace(self, columns=cols)

    def limit(self, n: int) -> "CatalogQuery":
        """At most ``n`` rows (reading stops once they are found)."""
        if n is None or int(n) < 0:
            raise ConfigError(f"limit needs a count >= 0, got {n!r}")
        return replace(self, max_rows=int(n))

    def id(self, source_id) -> "CatalogQuery":
        """Rows whose ``source_id`` is ``source_id`` (a string, or several in a list)."""
        ids = (source_id,) if isinstance(source_id, str) else tuple(str(s) for s in source_id)
        if not ids:
            raise ConfigError("id needs at least one source_id")
        return replace(self, ids=ids if self.ids is None else tuple(i for i in self.ids if i in set(ids)))

    # --- what it will read
    @property
    def schema(self) -> pa.Schema:
        """Arrow schema of the catalog, with units, UCDs and descriptions in the field metadata."""
        return pq.read_schema(self.path / DATASET_DIR / "_common_metadata")

    @property
    def cone_deg(self) -> tuple | None:
        """(ra, dec, radius) in degrees of the first cone, or None (kept for older callers)."""
        for r in self.regions:
            if isinstance(r, Cone):
                return (r.ra, r.dec, r.radius_deg)
        return None

    def _leaf_pixels(self) -> list[int]:
        keep = set(self.pixels)
        for region in self.regions:
            keep = region.cover(self.order, keep)
        return sorted(keep)

    def files(self) -> list[str]:
        """Part files this query will read (after HEALPix pruning)."""
        out = []
        for p in self._leaf_pixels():
            out += sorted(str(f) for f in pixel_dir(self.path, self.order, p).glob("*.parquet"))
        return out

    def _output_columns(self, schema: pa.Schema) -> list[str]:
        return list(self.columns) if self.columns else schema.names

    def _read_columns(self, schema: pa.Schema) -> list[str] | None:
        if not self.columns:
            return None
        need = list(self.columns)
        extra = set()
        if self.regions:
            extra |= {"ra", "dec"}
        if self.ids is not None:
            extra.add("source_id")
        for expr in self.filters:
            extra |= _referenced_columns(expr, schema.names)
        return need + [c for c in schema.names if c in extra and c not in need]

    def _check_filters(self, schema: pa.Schema) -> None:
        if not self.filters:
            return
        empty = _flat_frame(schema.empty_table())
        for expr in self.filters:
            _eval_filter(empty, expr)

    # --- running
    def to_arrow(self) -> pa.Table:
        """Run the query; a :class:`pyarrow.Table` whose fields carry unit/ucd/description metadata."""
        schema = self.schema
        self._check_filters(schema)
        out_cols = self._output_columns(schema)
        read_cols = self._read_columns(schema)
        files = self.files()
        parts: list[pa.Table] = []
        n = 0
        if files and self.max_rows != 0:
            dataset = pads.dataset(files, schema=schema, format="parquet")
            flt = pc.field("source_id").isin(pa.array(self.ids, pa.string())) if self.ids is not None else None
            pending: list[pa.RecordBatch] = []
            n_pending = 0
            # pandas filters run on chunks (few calls over many small files), growing so a limit stops early
            chunk = 4096 if self.filters else 1
            batches = dataset.to_batches(columns=read_cols, filter=flt)
            for batch in itertools.chain(batches, [None]):
                if batch is not None and batch.num_rows:
                    pending.append(batch)
                    n_pending += batch.num_rows
                if not pending or (batch is not None and n_pending < chunk):
                    continue
                t = self._apply_cuts(pa.Table.from_batches(pending))
                pending, n_pending = [], 0
                chunk = min(2 * chunk, _CHUNK_ROWS)
                if t.num_rows:
                    parts.append(t)
                    n += t.num_rows
                    if self.max_rows is not None and n >= self.max_rows:
                        break
        if parts:
            table = pa.concat_tables(parts)
        else:
            table = schema.empty_table() if read_cols is None else schema.empty_table().select(read_cols)
        if self.max_rows is not None and table.num_rows > self.max_rows:
            table = table.slice(0, self.max_rows)
        return table.select(out_cols)

    def _apply_cuts(self, table: pa.Table) -> pa.Table:
        mask = None
        if self.regions:
            ra, dec = table.column("ra").to_numpy(), table.column("dec").to_numpy()
            mask = np.ones(table.num_rows, bool)
            for region in self.regions:
                mask &= region.contains(ra, dec)
            if not mask.any():
                return table.slice(0, 0)
        if self.filters:
            df = _flat_frame(table if mask is None else table.filter(pa.array(mask)))
            if mask is not None:
                table = table.filter(pa.array(mask))
            fmask = np.ones(len(df), bool)
            for expr in self.filters:
                fmask &= _eval_filter(df, expr)
            return table.filter(pa.array(fmask))
        return table if mask is None else table.filter(pa.array(mask))

    def to_pandas(self):
        """Run the query into a pandas DataFrame (``latent`` as arrays)."""
        return _to_pandas(self.to_arrow())

    def to_astropy(self):
        """Run the query into an astropy QTable with units (and descriptions) from the column metadata."""
        return arrow_to_astropy(self.to_arrow())

    def count(self) -> int:
        """Number of rows the query returns."""
        return self.select(["ra"] if not self.columns else self.columns[:1]).to_arrow().num_rows

    def to_lsdb(self):
        """The same query as a lazy :class:`lsdb.Catalog` (lsdb's own cone/box search on this catalog).

        Regions become lsdb search filters, :meth:`where` filters each partition with the evaluator
        :meth:`to_arrow` uses (bit tests included), :meth:`id`
        a ``source_id in [...]`` query; :meth:`select` picks the columns. lsdb has no lazy row limit,
        so :meth:`limit` is not applied (use ``.head(n)`` on the result).
        """
        try:
            import lsdb
        except ImportError as exc:  # pragma: no cover - lsdb is in the test extra
            raise ConfigError("to_lsdb needs lsdb: pip install 'lsdb>=0.11,<0.12'") from exc
        schema = self.schema
        read_cols = self._read_columns(schema)
        kwargs = {"columns": read_cols} if read_cols else {"columns": "all"}
        search = self.regions[0].lsdb_search() if self.regions else None
        cat = lsdb.open_catalog(str(self.path), search_filter=search, error_empty_filter=False, **kwargs)
        for region in self.regions[1:]:
            cat = cat.search(region.lsdb_search())
        for expr in self.filters:  # the same evaluator as to_arrow (bit tests, missing values False)
            cat = cat.map_partitions(_filter_frame, expr, meta=cat.meta)
        if self.ids is not None:
            cat = cat.query(f"source_id in {list(self.ids)!r}")
        if self.columns and list(self.columns) != list(read_cols or []):
            cat = cat[list(self.columns)]
        if self.max_rows is not None:
            log.warning("to_lsdb: limit(%d) is not applied to the lazy lsdb catalog; use .head(n)", self.max_rows)
        return cat

    def sql(self, query: str) -> pa.Table:
        """Run DuckDB SQL with this query registered as the view ``catalog``; returns a pyarrow Table.

        Only the part files left after HEALPix pruning are read, and the view already holds the
        exact region cut, :meth:`id` and :meth:`select` (``where`` filters are pandas expressions,
        so with them the query is run first and its result is the view). Result columns named like
        catalog columns keep their units.

        Examples
        --------
        >>> cat.cone(150, 2, 3600).sql("SELECT survey, avg(w1_mag - w2_mag) AS w12 FROM catalog GROUP BY 1")  # doctest: +SKIP
        """
        try:
            import duckdb
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("sql needs duckdb: pip install duckdb") from exc
        schema = self.schema
        con = duckdb.connect()
        try:
            if self.filters:
                view = self.to_arrow()
                con.register("catalog", view)
            else:
                files = self.files()
                cols = self._output_columns(schema)
                if not files:
                    con.register("catalog", schema.empty_table().select(cols))
                else:
                    conds = [r.sql() for r in self.regions]
                    if self.ids is not None:
                        conds.append("source_id IN (" + ", ".join(_sql_str(i) for i in self.ids) + ")")
                    where = (" WHERE " + " AND ".join(f"({c})" for c in conds)) if conds else ""
                    lim = f" LIMIT {self.max_rows}" if self.max_rows is not None else ""
                    col_sql = ", ".join(_sql_ident(c) for c in cols)
                    file_sql = "[" + ", ".join(_sql_str(f) for f in files) + "]"
                    con.execute(f"CREATE VIEW catalog AS SELECT {col_sql} FROM read_parquet({file_sql}, "
                                f"hive_partitioning = false){where}{lim}")
            try:
                rel = con.sql(query)
                if rel is None:  # a statement without a result (SET, CREATE ...)
                    return pa.table({})
                fetch = getattr(rel, "to_arrow_table", None) or getattr(rel, "fetch_arrow_table", None) or rel.arrow
                table = fetch()
            except duckdb.Error as exc:
                msg = " ".join(str(exc).split())
                raise ConfigError(f"SQL failed: {msg}; the view is named 'catalog', columns: "
                                  f"{', '.join(self._output_columns(schema))}") from exc
        finally:
            con.close()
        return _restore_metadata(table, schema)

    def __repr__(self) -> str:
        parts = [f"{str(self.path)!r}", f"order={self.order}", f"leaves={len(self._leaf_pixels())}/{len(self.pixels)}"]
        parts += [str(r) for r in self.regions]
        parts += [f"where({f!r})" for f in self.filters]
        if self.ids is not None:
            parts.append(f"id({', '.join(self.ids[:3])}{', ...' if len(self.ids) > 3 else ''})")
        if self.columns:
            parts.append(f"select({', '.join(self.columns)})")
        if self.max_rows is not None:
            parts.append(f"limit({self.max_rows})")
        return f"CatalogQuery({', '.join(parts)})"


def _sql_str(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _sql_ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _to_pandas(table: pa.Table):
    """``table.to_pandas()`` with pandas' nullable integer and boolean types: an integer column with nulls (one
    survey's ids in a mixed catalog, e.g. 17-digit DESI TARGETIDs) stays exact instead of becoming float64."""
    import pandas as pd

    nullable = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype()}
    return table.to_pandas(types_mapper=nullable.get)


def _flat_frame(table: pa.Table):
    """pandas frame of the scalar columns (list columns cannot appear in expressions)."""
    drop = [f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)]
    return _to_pandas(table.drop_columns(drop))


def _eval_filter(df, expr: str) -> np.ndarray:
    """The boolean row mask of a filter expression (pandas ``eval`` syntax; missing values are False).

    Evaluated with pandas' python engine (the same results whether numexpr is installed or not). An integer
    literal in a bitwise test on an integer column (``"(flags & 1) > 0"``) is given to pandas as a column of
    that value (:func:`_bitwise_literals`): pandas refuses ``&``, ``|`` between a column and a scalar
    ("cannot evaluate scalar only bool ops").
    """
    # a lone '=' (SQL/ADQL equality) is an assignment in pandas: say so instead of pandas' message
    hint = ("; equality is '==' (e.g. \"survey == 'desi'\"), or use --sql (sql() in Python) for SQL"
            if re.search(r"(?<![=!<>])=(?!=)", expr) else "")
    rewritten, literals = _bitwise_literals(expr, len(df))
    try:
        res = df.eval(rewritten, engine="python", resolvers=[literals] if literals else [])
    except Exception as exc:
        if "scalar only bool ops" in str(exc):  # e.g. 'flags & 2 == 2': '&' binds like 'and' in pandas
            hint += "; '&' and '|' bind like 'and'/'or' here, so bit tests need parentheses: '(flags & 2) == 2'"
        raise ConfigError(f"cannot evaluate the filter {expr!r}: {exc}{hint}; columns: {', '.join(df.columns)}") from exc
    kind = getattr(getattr(res, "dtype", None), "kind", None)
    if kind in ("i", "u"):  # a bare bit test, 'flags & 4': nonzero
        res, kind = res != 0, "b"
    elif kind == "O":  # booleans with missing values (e.g. from a string method) are a condition too
        import pandas as pd

        kind = "b" if pd.api.types.infer_dtype(res, skipna=True) in ("boolean", "empty") else "O"
    elif kind is None and isinstance(res, (bool, np.bool_)):
        kind = "b"
    if kind != "b":
        what = f" (its values are {res.dtype})" if hasattr(res, "dtype") else ""
        raise ConfigError(f"the filter {expr!r} is not a true/false condition{what}: compare it, e.g. 'z < 0.1', "
                          f"or test bits of an integer column, e.g. '(flags & 1) > 0'{hint}")
    try:
        return np.asarray(res.fillna(False) if hasattr(res, "fillna") else res, dtype=bool).reshape(len(df))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the filter {expr!r} is not a true/false condition (e.g. 'z < 0.1'){hint}") from exc


def _filter_frame(df, expr: str):
    """The rows of a pandas frame (one lsdb partition) that pass a filter expression (:func:`_eval_filter`).

    The expression is evaluated on a plain pandas view of the partition (nested-pandas' own ``eval`` adds
    nested-column syntax and a deprecation warning per call; catalog filters reference scalar columns).
    """
    import pandas as pd

    return df[_eval_filter(pd.DataFrame(df, copy=False), expr)]


#: prefix of the names :func:`_bitwise_literals` gives integer literals (not a catalog column name)
_LITERAL_NAME = "_catalogpred_int_"


def _bitwise_literals(expr: str, n_rows: int) -> tuple[str, dict]:
    """``expr`` with the integer literals of bitwise ``&``/``|`` tests (``flags & 1``) replaced by names, and
    those names' values as arrays of ``n_rows`` (so that pandas sees two columns); ``(expr, {})`` when there
    are none.

    pandas reads ``&``/``|`` as ``and``/``or`` (their precedence, elementwise on columns) and refuses a scalar
    operand. Only operands of such a test that are integer literals, beside no true/false operand, are
    replaced: ``"(flags & 4) == 0"``, not ``"z < 1 & flags == 0"`` (already two conditions).
    """
    import ast
    import io
    import tokenize

    if "&" not in expr and "|" not in expr:
        return expr, {}
    quoted: dict[str, str] = {}

    def placeholder(m) -> str:  # `quoted names` are not Python: a name for each, put back after
        quoted[f"_catalogpred_q{len(quoted)}_"] = m.group(0)
        return f"_catalogpred_q{len(quoted) - 1}_"

    try:
        words = {"&": "and", "|": "or"}
        toks = [(tokenize.NAME, words[t.string]) if t.type == tokenize.OP and t.string in words else (t.type, t.string)
                for t in tokenize.generate_tokens(io.StringIO(re.sub(r"`[^`]*`", placeholder, expr)).readline)]
        tree = ast.parse(tokenize.untokenize(toks).strip(), mode="eval")
    except (SyntaxError, tokenize.TokenError, ValueError):
        return expr, {}  # pandas says what is wrong with it
    boolean = (ast.Compare, ast.BoolOp)
    literals: dict[str, np.ndarray] = {}

    class Replace(ast.NodeTransformer):
        def visit_BoolOp(self, node):
            self.generic_visit(node)
            if any(isinstance(v, boolean) or (isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.Not))
                   or (isinstance(v, ast.Constant) and isinstance(v.value, bool)) for v in node.values):
                return node
            values = []
            for v in node.values:
                if isinstance(v, ast.Constant) and type(v.value) is int and -2 ** 63 <= v.value < 2 ** 63:
                    name = f"{_LITERAL_NAME}{len(literals)}"
                    literals[name] = np.full(n_rows, v.value, dtype=np.int64)
                    v = ast.Name(id=name, ctx=ast.Load())
                values.append(v)
            node.values = values
            return node

    tree = Replace().visit(tree)
    if not literals:
        return expr, {}
    out = ast.unparse(tree)
    for name, text in quoted.items():
        out = out.replace(name, text)
    return out, literals


def _restore_metadata(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Give result columns that are catalog columns (same name and type) their unit/ucd/description back."""
    fields = []
    for f in table.schema:
        i = schema.get_field_index(f.name)
        if i >= 0 and schema.field(i).metadata and (schema.field(i).type == f.type or
                                                    (_is_list(f.type) and _is_list(schema.field(i).type))):
            f = f.with_metadata(schema.field(i).metadata)
        fields.append(f)
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields))


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)


# --------------------------------------------------------------------------- arrow <-> astropy
def _field_meta(field: pa.Field) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}


def arrow_to_astropy(table: pa.Table):
    """An astropy QTable with the units (and descriptions, UCDs) from the Arrow field metadata.

    List columns (``latent``) become 2-D columns; nulls become masked values (NaN for floats).
    """
    import astropy.units as u
    from astropy.table import MaskedColumn, QTable

    out = QTable()
    for fld, col in zip(table.schema, table.columns):
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        mask = None
        if _is_list(fld.type):
            if pa.types.is_fixed_size_list(fld.type):
                size = fld.type.list_size
            else:
                lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
                size = int(lengths.max()) if len(lengths) else 0
            values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), size)
        elif pa.types.is_string(fld.type) or pa.types.is_large_string(fld.type):
            mask = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None
            values = np.asarray(col.fill_null("").to_pylist(), dtype=str) if len(col) else np.array([], dtype="U1")
        elif pa.types.is_floating(fld.type):
            values = col.to_numpy(zero_copy_only=False)
        elif col.null_count:
            mask = col.is_null().to_numpy(zero_copy_only=False)
            values = col.fill_null(pa.scalar(False if pa.types.is_boolean(fld.type) else 0).cast(fld.type)) \
                .to_numpy(zero_copy_only=False)
        else:
            values = col.to_numpy(zero_copy_only=False)
        md = _field_meta(fld)
        unit = md.get("unit", "")
        if unit:
            unit = u.Unit(unit.replace("Angstrom", "AA"), parse_strict="silent")
            # a QTable makes a masked column with a unit a MaskedQuantity: the nulls stay nulls
            out[fld.name] = MaskedColumn(values, mask=mask, unit=unit) if mask is not None else values * unit
        elif mask is not None:
            out[fld.name] = MaskedColumn(values, mask=mask)
        else:
            out[fld.name] = values
        out[fld.name].info.description = md.get("description", "")
        if md.get("ucd"):
            out[fld.name].info.meta = {**(out[fld.name].info.meta or {}), "ucd": md["ucd"]}
    return out


def astropy_to_arrow(t) -> pa.Table:
    """An astropy Table as Arrow, units and descriptions into the field metadata (inverse of :func:`arrow_to_astropy`)."""
    arrays, fields = [], []
    for name in t.colnames:
        col = t[name]
        unit = getattr(col, "unit", None)
        values = col.value if hasattr(col, "value") and unit is not None else col
        data = np.asarray(values)
        mask = np.asarray(getattr(col, "mask", np.zeros(len(data), bool)))
        if data.dtype.byteorder not in ("=", "|"):  # FITS is big-endian; Arrow wants native order
            data = data.astype(data.dtype.newbyteorder("="))
        if data.dtype.kind == "S":
            data = np.char.decode(data, "utf-8")
        if data.dtype.kind == "U":
            data = np.char.strip(data)
        if data.ndim > 1:
            inner = pa.array(data.reshape(len(data), -1).ravel())
            arr = pa.FixedSizeListArray.from_arrays(inner, int(np.prod(data.shape[1:])))
        else:
            m = mask if mask.shape == data.shape and mask.any() else None
            if data.dtype.kind == "f":
                m = (m if m is not None else np.zeros(len(data), bool)) | ~np.isfinite(data)
                m = m if m.any() else None
            arr = pa.array(data.tolist() if data.dtype.kind == "U" else data, mask=m)
        md = {b"unit": (unit.to_string() if unit is not None else "").encode(),
              b"description": (getattr(col.info, "description", None) or "").encode()}
        ucd = (getattr(col.info, "meta", None) or {}).get("ucd")
        if ucd:
            md[b"ucd"] = str(ucd).encode()
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, metadata=md))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --------------------------------------------------------------------------- opening
def open_catalog(path: str | os.PathLike) -> CatalogQuery:
    """Open a catalog written by ``catalogpred predict`` (reads only its small metadata files).

    Raises
    ------
    CatalogError
        If ``path`` is not a finished catalog (no ``hats.properties``).
    """
    path = Path(path)
    props = path / "hats.properties"
    if not props.exists():
        raise CatalogError(f"{path} is not a finished catalog (no hats.properties); run `catalogpred predict` "
                           "(or re-run it to finish an interrupted one)")
    properties = {}
    for line in props.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            properties[k.strip()] = v.strip()
    order = int(properties["hats_order_fixed"]) if "hats_order_fixed" in properties else None
    pixels = []
    info = path / "partition_info.csv"
    if info.exists():
        import csv

        with open(info) as fh:
            for row in csv.DictReader(fh):
                pixels.append(int(row["Npix"]))
                order = int(row["Norder"]) if order is None else order
    if order is None:
        manifest = json.loads((path / "run_manifest.json").read_text())
        order = manifest["settings"]["order"]
    return CatalogQuery(path=path, order=order, pixels=tuple(sorted(pixels)), properties=properties)


# --------------------------------------------------------------------------- output
def _normalise_format(dest, fmt: str | None) -> str:
    if fmt is None:
        name = str(dest).lower()
        fmt = os.path.splitext(name[:-3] if name.endswith(".gz") else name)[1]
    fmt = fmt.lower() if fmt.startswith(".") else "." + fmt.lower()
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {fmt!r} for {dest}; use one of {', '.join(OUTPUT_FORMATS)} "
                          "(by file extension)")
    return fmt


def write_table(table: pa.Table, dest, fmt: str | None = None, *, overwrite: bool = True) -> None:
    """Write a query result by extension (or ``fmt``):

    - ``.csv``: values only, no units (latents as ``latent_0..``);
    - ``.parquet``: as is, with the field metadata (units, UCDs, descriptions), astropy's ``table::len::``
      string widths (so that ``astropy.table.Table.read`` reads null strings) and, for a table that carries
      VO-Parquet metadata (a catalog query), that metadata rewritten for the columns written
      (``Table.read(dest, format="parquet.votable")``);
    - ``.fits`` and ``.vot`` (VOTable): units, descriptions and UCDs. A unit without a FITS spelling (the
      Legacy Surveys' nanomaggy) is kept in astropy's column metadata, which ``Table.read`` restores (its
      TTYPE comment names it for other readers); VOTable writes it as a quoted VOUnit (``'nanomaggy'``).

    Nulls in a boolean column (``ir_excess`` of unmatched rows) stay nulls: empty in VOTable; in FITS, which
    has no null logical astropy reads, the column (F where null) comes with a ``<name>.mask`` logical column,
    from which ``Table.read`` rebuilds the masked column.

    ``dest`` may be a path or a stream (CSV only for text streams). ``overwrite=False`` refuses an existing file.

    Raises
    ------
    ConfigError
        If ``dest``'s directory does not exist, or ``dest`` is a directory.
    CatalogError
        If ``dest`` exists and ``overwrite`` is false, or the file cannot be written.
    """
    if not isinstance(dest, (str, os.PathLike)):
        _write(table, dest, _normalise_format(dest, fmt))
        return
    _check_destination(Path(dest), overwrite)
    fmt = _normalise_format(dest, fmt)
    try:
        _write(table, dest, fmt)
    except OSError as exc:
        raise CatalogError(f"cannot write {dest}: {exc.strerror or exc}") from exc


def _check_destination(dest: Path, overwrite: bool) -> None:
    """A one-line error, before any work, for an output path that cannot be written."""
    if dest.is_dir():
        raise ConfigError(f"{dest} is a directory; give a file name, e.g. {dest / 'result.fits'}")
    parent = dest.parent
    if not parent.exists():
        raise ConfigError(f"cannot write {dest}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ConfigError(f"cannot write {dest}: {parent} is a file, not a directory")
    if not overwrite and dest.exists():
        raise CatalogError(f"{dest} exists; replace it with --overwrite on the command line, overwrite=True in Python")


def _write(table: pa.Table, dest, fmt: str) -> None:
    if fmt == ".parquet":
        pq.write_table(_parquet_export(table), dest)
    elif fmt == ".fits":
        _write_fits(table, dest)
    elif fmt == ".vot":
        _write_votable(table, dest)
    else:
        _to_pandas(_flatten_lists(table)).to_csv(dest, index=False)


def _parquet_export(table: pa.Table) -> pa.Table:
    """``table`` with astropy's string widths and, when it has VO-Parquet metadata, that metadata for its columns."""
    from .catalog import _with_string_lengths

    meta = {k: v for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"table::len::")}
    table = _with_string_lengths(table.replace_schema_metadata(meta or None))
    if b"IVOA.VOTable-Parquet.content" in meta:
        meta = dict(table.schema.metadata)
        try:
            meta[b"IVOA.VOTable-Parquet.content"] = _vo_parquet_content(table.schema).encode()
        except Exception as exc:  # a column type VOTable cannot describe: no VO metadata rather than a wrong one
            log.warning("no VO-Parquet metadata in the export (%s)", exc)
            meta = {k: v for k, v in meta.items() if not k.startswith(b"IVOA.VOTable-Parquet.")}
        table = table.replace_schema_metadata(meta)
    return table


def _vo_parquet_content(schema: pa.Schema) -> str:
    """The VO-Parquet VOTable XML (:func:`catalogpred.catalog.vo_table_xml`) of exactly ``schema``'s columns, in
    its order, strings as wide as the ``table::len::`` metadata says: astropy's ``format="parquet.votable"``
    stacks the FIELDs' empty table on the data, and a variable-length (``*``) string does not stack on a fixed one.
    """
    import io
    import warnings

    from astropy.io.votable import parse
    from astropy.units import UnitsWarning

    from .catalog import Column, vo_table_xml

    cols = [Column(f.name, f.type, *(_field_meta(f).get(k, "") for k in ("unit", "ucd", "description")))
            for f in schema if f.name != "_healpix_29"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)  # VOUnit deprecates 'erg' and 'Angstrom', still valid
        vot = parse(io.BytesIO(vo_table_xml(cols).encode()))
    fields = vot.get_first_table().fields
    by_name = {f.name: f for f in fields}
    ordered = [by_name[n] for n in schema.names]  # vo_table_xml adds _healpix_29 last: where it is, or not at all
    lengths = schema.metadata or {}
    for f in ordered:
        if f.datatype in ("char", "unicodeChar") and f"table::len::{f.name}".encode() in lengths:
            f.arraysize = lengths[f"table::len::{f.name}".encode()].decode()
    fields.clear()
    fields.extend(ordered)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)
        vot.to_xml(buf)
    return buf.getvalue().decode("utf-8")


def _write_fits(table: pa.Table, dest) -> None:
    import warnings

    from astropy.units import UnitsWarning
    from astropy.utils.exceptions import AstropyUserWarning

    t = arrow_to_astropy(table)
    no_fits_unit = {}
    for name in t.colnames:
        col = t[name]
        if col.dtype == bool and np.any(getattr(col, "mask", False)):  # FITS logicals have no null astropy reads
            col.info.serialize_method["fits"] = "data_mask"           # so add <name>.mask; Table.read masks it
        elif _fits_unit_missing(getattr(col, "unit", None)):  # e.g. nanomaggy: astropy keeps it in its metadata
            no_fits_unit[name] = _field_meta(table.schema.field(name))["unit"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)  # FITS units: 'erg', 'Angstrom' are fine, VOUnit frowns
        warnings.filterwarnings("ignore", "The unit .* could not be saved in native FITS", AstropyUserWarning)
        t.write(dest, format="fits", overwrite=True)
    if no_fits_unit:
        from astropy.io import fits

        with warnings.catch_warnings(), fits.open(dest, mode="update") as hdus:  # not TUNITn: a unit astropy
            warnings.simplefilter("ignore", fits.verify.VerifyWarning)            # cannot parse overrides its
            header = hdus[1].header                                               # metadata (a long comment: cut)
            for i in range(1, header["TFIELDS"] + 1):
                if header[f"TTYPE{i}"] in no_fits_unit:
                    header.comments[f"TTYPE{i}"] = f"unit: {no_fits_unit[header[f'TTYPE{i}']]}"


def _write_votable(table: pa.Table, dest) -> None:
    import warnings

    from astropy.table import Table
    from astropy.units import UnitsWarning

    from .catalog import _vo_unit

    t = Table(arrow_to_astropy(table))  # Columns, whose unit can be set (Quantities' cannot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)  # VOUnit deprecates 'erg' and 'Angstrom', still valid
        for fld in table.schema:
            unit = _field_meta(fld).get("unit", "")
            if unit:  # valid VOUnit: 'nanomaggy', not astropy's nmgy
                t[fld.name].unit = _vo_unit(unit)
        t.write(dest, format="votable", overwrite=True)  # UCDs from the column meta


def _fits_unit_missing(unit) -> bool:
    """Whether a unit has no FITS spelling (astropy then leaves TUNITn out, e.g. nanomaggy)."""
    if unit is None or isinstance(unit, str):
        return False
    try:
        unit.to_string("fits")
    except ValueError:
        return True
    return False


def _flatten_lists(table: pa.Table) -> pa.Table:
    """List columns as ``name_0, name_1, ...`` (CSV and terminal output)."""
    cols, fields = [], []
    for fld, col in zip(table.schema, table.columns):
        if _is_list(fld.type):
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            size = fld.type.list_size if pa.types.is_fixed_size_list(fld.type) else \
                int(pc.max(pc.list_value_length(col)).as_py() or 0)
            for j in range(size):
                cols.append(pc.list_element(col, j) if size else pa.nulls(len(col)))
                fields.append(pa.field(f"{fld.name}_{j}", cols[-1].type, metadata=fld.metadata))
        else:
            cols.append(col)
            fields.append(fld)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


def _format_value(v, unit: str, is_float: bool) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, np.ndarray)):
        return "[" + ", ".join(f"{x:.3g}" for x in list(v)[:3]) + (", …]" if len(v) > 3 else "]")
    if is_float:
        if not math.isfinite(v):
            return str(v)
        if unit == "deg":
            return f"{v:.6f}"
        if unit == "mag":
            return f"{v:.3f}"
        if unit == "arcsec":
            return f"{v:.3f}"
        return f"{v:.6g}"
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return str(v)


def format_table(table: pa.Table, max_rows: int | None = None) -> str:
    """An aligned text table for a terminal: header, a units line, and the rows (numbers right-aligned)."""
    shown = table if max_rows is None else table.slice(0, max_rows)
    cols = []
    for fld, col in zip(shown.schema, shown.columns):
        unit = _field_meta(fld).get("unit", "")
        is_float = pa.types.is_floating(fld.type)
        right = pa.types.is_integer(fld.type) or is_float
        cells = [_format_value(v, unit, is_float) for v in col.to_pylist()]
        width = max([len(fld.name), len(unit)] + [len(c) for c in cells])
        cols.append((fld.name, unit, cells, width, right))
    if not cols:
        return ""
    lines = ["  ".join(n.ljust(w) if not r else n.rjust(w) for n, _, _, w, r in cols).rstrip()]
    if any(u for _, u, _, _, _ in cols):
        lines.append("  ".join(u.ljust(w) if not r else u.rjust(w) for _, u, _, w, r in cols).rstrip())
    lines.append("  ".join("-" * w for *_, w, _ in cols))
    for i in range(shown.num_rows):
        lines.append("  ".join(c[i].rjust(w) if r else c[i].ljust(w) for _, _, c, w, r in cols).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------- info
def catalog_info(path, *, moc_order: int = 8) -> dict:
    """Everything ``catalogpred info`` reports, as a dict (JSON-serialisable).

    Rows per survey, sky area (leaves, and a MOC of the rows at ``moc_order``), model and card,
    run manifest counts and the columns with units and descriptions.
    """
    q = open_catalog(path)
    path = q.path
    manifest_path = path / "run_manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    t = q.select(["survey", "_healpix_29"]).to_arrow()
    surveys = {}
    if t.num_rows:
        vc = pc.value_counts(t.column("survey"))
        surveys = {str(s["values"]): int(s["counts"]) for s in vc.to_pylist()}
    h29 = t.column("_healpix_29").to_numpy()
    moc_cells = len(np.unique(h29 >> (2 * (SPATIAL_INDEX_ORDER - moc_order)))) if len(h29) else 0
    models = [_model_summary(m) for m in _manifest_models(manifest)]
    columns = []
    for f in q.schema:
        md = _field_meta(f)
        columns.append({"name": f.name, "type": _type_name(f.type), "unit": md.get("unit", ""), "ucd": md.get("ucd", ""),
                        "description": md.get("description", "")})
    return {
        "path": str(path),
        "name": q.properties.get("obs_collection", path.name),
        "rows": int(t.num_rows),
        "rows_per_survey": surveys,
        "order": q.order,
        "leaves": len(q.pixels),
        "area_deg2": {"leaves": len(q.pixels) * SKY_AREA_DEG2 / (12 * 4 ** q.order),
                      "moc": moc_cells * SKY_AREA_DEG2 / (12 * 4 ** moc_order), "moc_order": moc_order,
                      "moc_cells": moc_cells},
        "models": models,
        "manifest": {k: manifest.get(k) for k in ("created", "catalogpred_run", "store", "surveys", "settings", "counts",
                                                  "versions") if k in manifest},
        "magnitude_system": q.properties.get("catalogpred_magnitude_system", ""),
        "columns": columns,
    }


def _type_name(t: pa.DataType) -> str:
    """Short type names: ``float32[6]`` for the latents, ``string``, ``float64``."""
    names = {pa.float32(): "float32", pa.float64(): "float64", pa.string(): "string"}
    if pa.types.is_fixed_size_list(t):
        return f"{_type_name(t.value_type)}[{t.list_size}]"
    return names.get(t, str(t))


def _manifest_models(manifest: dict) -> list[dict]:
    """Model entries of a run manifest: ``models`` (by grid) merged with the single ``model`` entry."""
    entries = []
    models = manifest.get("models")
    if isinstance(models, dict):
        entries = [{"grid": grid, **m} for grid, m in models.items() if isinstance(m, dict)]
    elif isinstance(models, list):
        entries = [dict(m) for m in models if isinstance(m, dict)]
    single = manifest.get("model")
    if isinstance(single, dict):
        same = [e for e in entries if e.get("model_id") == single.get("model_id")]
        for e in same:
            for k, v in single.items():
                e.setdefault(k, v)
        if not same:
            entries.insert(0, dict(single))
    return entries


def _model_summary(model: dict) -> dict:
    """A manifest model entry plus its card (from ``bundle.json`` next to ``model.path``, when it still exists)."""
    model = dict(model)
    bundle = Path(model["path"]) / "bundle.json" if model.get("path") else None
    if bundle is None:
        return model
    if not bundle.exists():
        model["card_error"] = f"{bundle} not found (the model bundle moved?)"
        return model
    try:
        b = json.loads(bundle.read_text())
    except (OSError, ValueError) as exc:
        model["card_error"] = f"cannot read {bundle}: {exc}"
        return model
    card = b.get("card") or {}
    metrics = card.get("metrics") or {}
    model["n_latent"] = b.get("n_latent")
    model["card"] = {k: card[k] for k in ("kind", "summary", "training_data", "limitations") if card.get(k)}
    model.setdefault("kind", card.get("kind", "?"))
    model["card"]["metrics"] = _band_metrics(metrics)
    model["card"]["metrics_on"] = metrics.get("evaluated_on", "validation")  # bundles before the test split: validation
    if isinstance(metrics.get("evaluation"), dict):  # `catalogpred models evaluate` on a held-out table
        model["card"]["evaluation"] = _band_metrics(metrics["evaluation"])
    return model


def _band_metrics(metrics: dict) -> dict:
    """``{band: {chi2_n, mae, bias, coverage_68}}`` of a card's metrics (other keys: counts, the split)."""
    return {bnd: {k: metrics[bnd][k] for k in ("n", "chi2_n", "mae", "bias", "coverage_68") if k in metrics[bnd]}
            for bnd in ("w1", "w2", "w3", "w4") if isinstance(metrics.get(bnd), dict)}


def format_info(info: dict, width: int = 70) -> str:
    """The text report of :func:`catalog_info`."""
    man, a = info["manifest"], info["area_deg2"]
    counts = man.get("counts", {})
    out = [f"catalog   {info['path']}  ({info['name']})",
           f"  rows      {info['rows']:,d}" + (f"   rejects {counts['rejects']:,d}   inputs {counts['inputs']:,d}"
                                               if "rejects" in counts else "")]
    for s, n in sorted(info["rows_per_survey"].items()):
        out.append(f"    {s:<12} {n:,d}")
    out.append(f"  sky       {a['moc']:.2f} deg2 covered (MOC of the rows at order {a['moc_order']}, "
               f"{a['moc_cells']} cells); leaves {info['leaves']} HEALPix pixels at order {info['order']} "
               f"= {a['leaves']:.1f} deg2")
    for m in info["models"]:
        out.append(f"  model     {m.get('model_id', '?')} (kind {m.get('kind', '?')}, grid {m.get('grid', '?')})")
        out.append(f"    path    {m.get('path', '?')}")
        card = m.get("card") or {}
        for k in ("summary", "training_data", "limitations"):
            if card.get(k):
                out.append(f"    {k + ':':<15}" + _wrap(card[k], width, 19))
        for label, key in ((card.get("metrics_on", "validation"), "metrics"), ("evaluation", "evaluation")):
            for bnd, mt in (card.get(key) or {}).items():
                out.append(f"    {bnd} {label}: " + ", ".join(f"{k} {v:.3g}" for k, v in mt.items()))
        if m.get("card_error"):
            out.append(f"    card: {m['card_error']}")
    if man:
        out.append(f"  run       {man.get('catalogpred_run', '?')} {man.get('created', '')}; store {man.get('store', '?')}")
        reasons = counts.get("rejects_by_reason") or {}
        if reasons:
            out.append("    rejects by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        settings = man.get("settings") or {}
        if settings:
            out.append("    settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if info.get("magnitude_system"):
        out.append(f"  magnitudes {info['magnitude_system']}")
    out.append("  columns:")
    wn = max(len(c["name"]) for c in info["columns"])
    wt = max(len(c["type"]) for c in info["columns"])
    wu = max([len(c["unit"]) for c in info["columns"]] + [4])
    out.append(f"    {'name':<{wn}}  {'type':<{wt}}  {'unit':<{wu}}  description")
    for c in info["columns"]:
        out.append(f"    {c['name']:<{wn}}  {c['type']:<{wt}}  {c['unit']:<{wu}}  {c['description']}")
    return "\n".join(out)


def _wrap(text: str, width: int, indent: int) -> str:
    import textwrap

    return ("\n" + " " * indent).join(textwrap.wrap(text, width)) or ""
