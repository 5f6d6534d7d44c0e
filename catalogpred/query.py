"""Queries on a catalogpred catalog: cone searches, column filters, exports.

>>> cat = open_catalog("demo-output/catalog")                 # doctest: +SKIP
>>> t = cat.cone(150.1, 2.2, radius_arcsec=600).where("w1_mag - w2_mag > 0.8").to_pandas()  # doctest: +SKIP

Spatial queries first select the HEALPix leaves (fixed order K) that overlap the
region (cdshealpix, the library hats uses), read only those part files, then
apply the exact great-circle cut. Filters use pandas' expression syntax on column
names (``"z < 0.1 and flags == 0"``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .catalog import DATASET_DIR
from .errors import CatalogError, ConfigError

__all__ = ["open_catalog", "CatalogQuery", "angular_separation_deg", "write_table", "OUTPUT_FORMATS"]

OUTPUT_FORMATS = (".csv", ".parquet", ".fits")


def angular_separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation in degrees (haversine; inputs in degrees)."""
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))


@dataclass(frozen=True)
class CatalogQuery:
    """A lazy query on a catalog; each method returns a new query, ``to_*`` runs it."""

    path: Path
    order: int
    pixels: tuple
    cone_deg: tuple | None = None  # (ra, dec, radius) in degrees
    filters: tuple = ()
    columns: tuple | None = None

    # --- building
    def cone(self, ra: float, dec: float, radius_arcsec=None, *, radius=None) -> "CatalogQuery":
        """Rows within ``radius_arcsec`` (or an astropy ``radius`` Quantity) of (ra, dec) in degrees."""
        if radius is not None:
            import astropy.units as u

            radius_arcsec = radius.to_value(u.arcsec)
        if radius_arcsec is None or radius_arcsec <= 0:
            raise ConfigError("cone needs a positive radius (arcsec)")
        if not (-90 <= dec <= 90):
            raise ConfigError(f"dec must be in [-90, 90] deg, got {dec}")
        return replace(self, cone_deg=(float(ra) % 360.0, float(dec), float(radius_arcsec) / 3600.0))

    def where(self, expr: str) -> "CatalogQuery":
        """Keep rows for which the pandas expression is true, e.g. ``"w1_mag - w2_mag > 0.8"``."""
        return replace(self, filters=self.filters + (expr,))

    def select(self, columns) -> "CatalogQuery":
        """Only these columns in the output (spatial and filter columns are read as needed)."""
        cols = tuple(columns.split(",")) if isinstance(columns, str) else tuple(columns)
        return replace(self, columns=tuple(c.strip() for c in cols if c.strip()))

    # --- running
    def _leaf_pixels(self) -> list[int]:
        if self.cone_deg is None:
            return list(self.pixels)
        from astropy.coordinates import Latitude, Longitude
        import astropy.units as u
        from cdshealpix.nested import cone_search

        ra, dec, r = self.cone_deg
        ipix, _, _ = cone_search(Longitude(ra * u.deg), Latitude(dec * u.deg), r * u.deg, depth=self.order, flat=True)
        return sorted(set(int(p) for p in ipix) & set(self.pixels))

    def files(self) -> list[str]:
        """Part files this query will read (after HEALPix pruning)."""
        out = []
        for p in self._leaf_pixels():
            d = self.path / DATASET_DIR / f"Norder={self.order}" / f"Dir={(p // 10000) * 10000}" / f"Npix={p}"
            out += sorted(str(f) for f in d.glob("*.parquet"))
        return out

    def to_arrow(self) -> pa.Table:
        files = self.files()
        schema = pq.read_schema(self.path / DATASET_DIR / "_common_metadata")
        if not files:
            table = schema.empty_table()
        else:
            table = pads.dataset(files, schema=schema, format="parquet").to_table()
        if self.cone_deg is not None and table.num_rows:
            ra, dec, r = self.cone_deg
            sep = angular_separation_deg(ra, dec, table.column("ra").to_numpy(), table.column("dec").to_numpy())
            table = table.filter(pa.array(sep <= r))
        if self.filters and table.num_rows:
            flat = table.drop_columns([c for c in table.column_names if pa.types.is_fixed_size_list(table.schema.field(c).type)])
            df = flat.to_pandas()
            mask = np.ones(len(df), bool)
            for expr in self.filters:
                try:
                    mask &= df.eval(expr).to_numpy(dtype=bool)
                except Exception as exc:
                    raise ConfigError(f"cannot evaluate --where {expr!r}: {exc}; columns: {', '.join(flat.column_names)}") from exc
            table = table.filter(pa.array(mask))
        elif self.filters:
            table = table.slice(0, 0)
        if self.columns:
            unknown = [c for c in self.columns if c not in table.column_names]
            if unknown:
                raise ConfigError(f"unknown columns {unknown}; available: {', '.join(table.column_names)}")
            table = table.select(list(self.columns))
        return table

    def to_pandas(self):
        return self.to_arrow().to_pandas()

    def to_astropy(self):
        """An astropy QTable with units from the catalog's column metadata."""
        return arrow_to_astropy(self.to_arrow())

    def count(self) -> int:
        return self.to_arrow().num_rows


def arrow_to_astropy(table: pa.Table):
    import astropy.units as u
    from astropy.table import QTable

    out = QTable()
    for field, col in zip(table.schema, table.columns):
        if pa.types.is_fixed_size_list(field.type):
            values = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(col), field.type.list_size)
        else:
            values = col.to_numpy(zero_copy_only=False)
            if pa.types.is_string(field.type):
                values = values.astype(str)
        unit = (field.metadata or {}).get(b"unit", b"").decode()
        desc = (field.metadata or {}).get(b"description", b"").decode()
        if unit:
            out[field.name] = values * u.Unit(unit.replace("Angstrom", "AA"), parse_strict="silent")
        else:
            out[field.name] = values
        out[field.name].info.description = desc
    return out


def open_catalog(path: str | os.PathLike) -> CatalogQuery:
    """Open a catalog written by ``catalogpred predict`` (reads only its small metadata files)."""
    path = Path(path)
    props = path / "hats.properties"
    if not props.exists():
        raise CatalogError(f"{path} is not a finished catalog (no hats.properties); run `catalogpred predict` "
                           "(or re-run it to finish an interrupted one)")
    order = None
    for line in props.read_text().splitlines():
        if line.startswith("hats_order_fixed="):
            order = int(line.split("=", 1)[1])
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
    return CatalogQuery(path=path, order=order, pixels=tuple(sorted(pixels)))


def write_table(table: pa.Table, dest, fmt: str | None = None) -> None:
    """Write a query result: ``.csv`` (latents as latent_0..), ``.parquet`` (as is), ``.fits`` (units kept).

    ``dest`` may be a path or a text stream (CSV only).
    """
    if fmt is None:
        fmt = os.path.splitext(str(dest))[1].lower()
    if fmt == ".parquet":
        pq.write_table(table, dest)
    elif fmt == ".fits":
        import warnings

        from astropy.units import UnitsWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnitsWarning)  # FITS units: 'erg', 'Angstrom' are fine, VOUnit frowns
            arrow_to_astropy(table).write(dest, format="fits", overwrite=True)
    elif fmt == ".csv":
        flat = {}
        for field, col in zip(table.schema, table.columns):
            if pa.types.is_fixed_size_list(field.type):
                vals = col.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(col), field.type.list_size)
                for j in range(field.type.list_size):
                    flat[f"{field.name}_{j}"] = vals[:, j]
            else:
                flat[field.name] = col
        pa.table(flat).to_pandas().to_csv(dest, index=False)
    else:
        raise ConfigError(f"unknown output format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)}")
