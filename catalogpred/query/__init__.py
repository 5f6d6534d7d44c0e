"""Queries on a catalogpred catalog: cone and box searches, filters, id lookup, SQL, exports.

>>> cat = open_catalog("demo-output/catalog")                                    # doctest: +SKIP
>>> t = cat.cone(192.53, 7.05, 600).where("z < 0.1").to_astropy()  # doctest: +SKIP
>>> cat.box(185, 200, 0, 15).sql("SELECT survey, count(*) AS n FROM catalog GROUP BY survey")  # doctest: +SKIP

A :class:`CatalogQuery` is lazy and immutable: each method returns a new query, and
``to_arrow``/``to_pandas``/``to_astropy``/``sql`` run it. Spatial queries first select the
HEALPix leaves (fixed order K) that overlap the region (cdshealpix, the library hats
uses), read only those part files, then apply the exact cut (great-circle distance for a
cone, RA/Dec ranges for a box). Several spatial calls combine with AND. Filters use pandas'
expression syntax on column names (``"z < 0.1 and flags == 0"``); ``sql`` uses DuckDB's SQL
with the query registered as a view named ``catalog``.

The submodules, in the order the data flows through them (each imports only those above it):

- :mod:`.regions`: angles and sky regions: :func:`angular_separation_deg`, :func:`angle_value` (numbers,
  Quantities or text such as ``"10arcsec"``), :func:`coordinate_value` (RA/Dec, sexagesimal too), :class:`Cone` and :class:`Box` with their HEALPix leaf cover,
  exact cut and SQL condition; ``SKY_AREA_DEG2``.
- :mod:`.convert`: Arrow tables to astropy (:func:`arrow_to_astropy`, units from the field metadata) and back
  (:func:`astropy_to_arrow`), to pandas with nullable integers, and the field-metadata helpers.
- :mod:`.filters`: ``where`` expressions (pandas ``eval`` syntax, bit tests, missing values false) and the
  column lists of ``select``/``--columns`` (:func:`check_column_list`).
- :mod:`.catalog_query`: :func:`open_catalog` → a :class:`CatalogQuery`, which prunes leaves with the regions,
  reads those part files, applies the region cuts and filters, and returns Arrow, pandas, astropy, an lsdb
  catalog or DuckDB SQL results.
- :mod:`.export`: results out: :func:`write_table` (Parquet, FITS, VOTable, CSV) and :func:`format_table` (a
  text table for a terminal).
- :mod:`.info`: ``catalogpred info``: :func:`catalog_info` (rows, sky area, models and cards, run manifest,
  columns) and :func:`format_info`.
"""
from .regions import SKY_AREA_DEG2, Box, Cone, angle_value, angular_separation_deg, coordinate_value  # noqa: F401
from .convert import arrow_to_astropy, astropy_to_arrow
from .filters import check_column_list  # noqa: F401
from .catalog_query import CatalogQuery, open_catalog
from .export import OUTPUT_FORMATS, _check_destination, format_table, write_table  # noqa: F401
from .info import _model_summary, catalog_info, format_info  # noqa: F401

__all__ = ["open_catalog", "CatalogQuery", "Cone", "Box", "angular_separation_deg", "angle_value",
           "coordinate_value", "write_table",
           "arrow_to_astropy", "astropy_to_arrow", "format_table", "catalog_info", "format_info", "OUTPUT_FORMATS"]
