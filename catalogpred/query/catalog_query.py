"""The lazy query on a catalog, :class:`CatalogQuery`, and :func:`open_catalog`, which makes one.

A query prunes the HEALPix leaves with its regions (:mod:`.regions`), reads only those part files, then
applies the exact region cuts and the filters (:mod:`.filters`); results come out as Arrow, pandas or
astropy (:mod:`.convert`), or from DuckDB SQL on a view of the query.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..catalog import DATASET_DIR, pixel_dir
from ..errors import CatalogError, ConfigError
from .convert import _restore_metadata, _to_pandas, arrow_to_astropy
from .filters import (_check_string_comparisons, _eval_filter, _filter_frame, _flat_frame, _referenced_columns,
                      check_column_list)
from .regions import Box, Cone, angle_value, coordinate_value

log = logging.getLogger(__name__)

#: rows gathered from the part files before the exact cuts run on them.
_CHUNK_ROWS = 65_536


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
        ra, dec : float, str or astropy Quantity
            Centre (ICRS): degrees, an angle Quantity, or text (``"12h50m07.6s"``, or sexagesimal ``"12:50:07.6"``
            in hours for RA and ``"+7:02:55"`` in degrees for Dec; :func:`~catalogpred.query.coordinate_value`).
            RA is taken modulo 360. ``ra`` may instead be an astropy ``SkyCoord`` in any frame (transformed to
            ICRS); then the second argument, if given, is the radius.
        radius_arcsec : float, str or astropy Quantity
            Radius in arcsec, any angle Quantity (``0.5 * u.deg``) or text with a unit (``"10arcsec"``,
            ``"0.5arcmin"``; :func:`~catalogpred.query.angle_value`).
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
        if radius is not None and radius_arcsec is not None:
            raise ConfigError(f"cone takes one radius, got radius_arcsec={radius_arcsec!r} and radius={radius!r}")
        r = radius if radius is not None else radius_arcsec
        if r is None:
            raise ConfigError("cone needs a radius: cone(ra, dec, 60) in arcsec or cone(ra, dec, 1 * u.deg)")
        r_arcsec = angle_value(r, "arcsec", "cone radius")
        ra, dec = coordinate_value(ra, "ra"), coordinate_value(dec, "dec")
        if not r_arcsec > 0:
            raise ConfigError(f"cone needs a positive radius (arcsec), got {r_arcsec}")
        if not (-90 <= dec <= 90):
            raise ConfigError(f"dec must be in [-90, 90] deg, got {dec}")
        return replace(self, regions=self.regions + (Cone(ra % 360.0, dec, r_arcsec / 3600.0),))

    def box(self, ra_min, ra_max, dec_min, dec_max) -> "CatalogQuery":
        """Rows with ``ra_min <= ra <= ra_max`` and ``dec_min <= dec <= dec_max`` (degrees, Quantities or text, as
        :meth:`cone` takes them).

        ``ra_min > ra_max`` wraps through RA = 0: ``box(350, 10, -5, 5)`` covers 20 degrees of RA.
        """
        ra_min, ra_max = coordinate_value(ra_min, "ra"), coordinate_value(ra_max, "ra")
        dec_min, dec_max = coordinate_value(dec_min, "dec"), coordinate_value(dec_max, "dec")
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
        _check_string_comparisons(expr, self.schema)
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
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"limit needs a whole count >= 0, got {n!r}")
        return replace(self, max_rows=int(n))

    def id(self, source_id) -> "CatalogQuery":
        """Rows whose ``source_id`` is ``source_id`` (a string, or several in a list)."""
        try:
            ids = (source_id,) if isinstance(source_id, str) else tuple(str(s) for s in source_id)
        except TypeError:
            raise ConfigError(f"id needs a source_id string (e.g. 'sdss-0266-51602-0003') or a list of them, "
                              f"got {source_id!r}") from None
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
        so with them the query is run first and its result is the view). A result column that is a catalog
        column as it is (``ra``, ``c.ra``, ``ra AS alpha``, ``*``) keeps its unit, UCD and description; a
        computed one (``ra / 15 AS ra``, ``avg(w1_mag)``) has none, whatever its name.

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
                sources = _sql_column_sources(con, query, table.column_names)
            except duckdb.Error as exc:
                msg = " ".join(str(exc).split())
                raise ConfigError(f"SQL failed: {msg}; the view is named 'catalog', columns: "
                                  f"{', '.join(self._output_columns(schema))}") from exc
        finally:
            con.close()
        return _restore_metadata(table, schema, sources)

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


def _sql_column_sources(con, query: str, names: list[str]) -> dict[str, str]:
    """``{result column: catalog column}`` for the result columns of ``query`` that are catalog columns passed
    through unchanged, read from DuckDB's own parse of the query (``json_serialize_sql``): a plain column
    reference (``ra``, ``c.ra``, ``ra AS alpha``) or ``*`` (less its ``EXCLUDE``/``REPLACE`` columns) in a
    single ``SELECT`` from the view ``catalog`` (or joins of it with itself). Anything else (a computed column,
    a subquery, a CTE, a set operation) keeps no metadata: it may hold other values than the catalog column."""
    try:
        parsed = json.loads(con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()[0])
        (statement,) = parsed["statements"]
        node = statement["node"]
    except Exception:  # a statement DuckDB's serializer does not take: no column is known to be passed through
        return {}
    if node.get("type") != "SELECT_NODE" or (node.get("cte_map") or {}).get("map") or not _from_catalog_only(
            node.get("from_table") or {}):
        return {}
    items = node.get("select_list", [])
    if any(e.get("class") == "STAR" for e in items):
        if len(items) != 1:  # "*, expr": positions unknown; names made by expressions are not passed through
            made = {e.get("alias") for e in items if e.get("class") != "STAR"}
            return {n: n for n in names if n not in made}
        changed = {r["key"] for r in items[0].get("replace_list", [])}
        return {n: n for n in names if n not in changed}
    if len(items) != len(names):
        return {}
    return {name: e["column_names"][-1] for name, e in zip(names, items) if e.get("class") == "COLUMN_REF"}


def _from_catalog_only(table: dict) -> bool:
    if table.get("type") == "BASE_TABLE":
        return table.get("table_name") == "catalog" and not table.get("schema_name")
    if table.get("type") == "JOIN":
        return _from_catalog_only(table.get("left") or {}) and _from_catalog_only(table.get("right") or {})
    return False


def open_catalog(path: str | os.PathLike) -> CatalogQuery:
    """Open a catalog written by ``catalogpred predict`` (reads only its small metadata files).

    Raises
    ------
    CatalogError
        If ``path`` is not a finished catalog (no ``hats.properties``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"open_catalog needs a catalog directory path, got {path!r}")
    path = Path(path)
    props = path / "hats.properties"
    if not props.exists():
        if (path / "bundle.json").exists():
            raise CatalogError(f"{path} is a model bundle, not a catalog; `catalogpred info {path}` shows its card")
        if not path.exists():
            raise CatalogError(f"{path}: no such catalog directory")
        if (path / "zarr.json").exists():
            raise CatalogError(f"{path} is a spectra store (Zarr), not a catalog; make one from it with "
                               f"`catalogpred predict --store {path} --model BUNDLE --catalog OUT`")
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
