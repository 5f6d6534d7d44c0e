"""Arrow tables to and from astropy and pandas, keeping the column metadata (unit, UCD, description).

:func:`arrow_to_astropy` and :func:`astropy_to_arrow` convert with units (:func:`in_memory_to_arrow` takes
pandas too); ``_to_pandas`` keeps integer
columns with nulls exact; ``_restore_metadata`` puts a catalog schema's field metadata back on a result.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import CatalogError


def _to_pandas(table: pa.Table):
    """``table.to_pandas()`` with pandas' nullable integer and boolean types: an integer column with nulls (one
    survey's ids in a mixed catalog, e.g. 17-digit DESI TARGETIDs) stays exact instead of becoming float64."""
    import pandas as pd

    nullable = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
                pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
                pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype()}
    return table.to_pandas(types_mapper=nullable.get)


def _restore_metadata(table: pa.Table, schema: pa.Schema, sources: dict[str, str] | None = None) -> pa.Table:
    """Give result columns that are catalog columns their unit/ucd/description back (``sources``: result column
    -> the catalog column it passes through, of the same type; default: by name), and the result the catalog's
    VO-Parquet keys, so that a Parquet export describes its columns as a query's does
    (:func:`~catalogpred.query.export.write_table` rewrites the ``content`` for the result's own columns)."""
    fields = []
    for f in table.schema:
        source = f.name if sources is None else sources.get(f.name)
        i = schema.get_field_index(source) if source is not None else -1
        if i >= 0 and schema.field(i).metadata and (schema.field(i).type == f.type or
                                                    (_is_list(f.type) and _is_list(schema.field(i).type))):
            f = f.with_metadata(schema.field(i).metadata)
        fields.append(f)
    vo = {k: v for k, v in (schema.metadata or {}).items() if k.startswith(b"IVOA.VOTable-Parquet.")}
    return pa.Table.from_arrays(table.columns, schema=pa.schema(fields, metadata=vo or None))


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)


def _field_meta(field: pa.Field) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (field.metadata or {}).items()}


def _list_to_2d(fld: pa.Field, col: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """A list column as a 2-D array ``[n, size]`` and its mask (``None`` without null rows; else true in every
    element of a null row, which holds NaN, or 0 for integers). Rows must all have one length."""
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(fld.type):
        size = fld.type.list_size
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)[valid]
        size = int(lengths.max()) if len(lengths) else 0
        if len(lengths) and lengths.min() != size:
            raise CatalogError(f"column {fld.name}: lists of different lengths ({lengths.min()} to {size}) "
                               "cannot become a 2-D column")
    flat = col.flatten().to_numpy(zero_copy_only=False)  # null rows contribute nothing
    if valid.all():
        return flat.reshape(len(col), size), None
    values = np.full((len(col), size), np.nan if flat.dtype.kind == "f" else 0, dtype=flat.dtype)
    values[valid] = flat.reshape(-1, size)
    return values, np.repeat(~valid[:, None], size, axis=1)


def arrow_to_astropy(table: pa.Table):
    """An astropy QTable with the units (and descriptions, UCDs) from the Arrow field metadata.

    List columns (``latent``) become 2-D columns; nulls become masked values (NaN for floats), a null list a
    masked row (NaN, ``crossmatch --keep-unmatched``).
    """
    import astropy.units as u
    from astropy.table import MaskedColumn, QTable

    out = QTable()
    for fld, col in zip(table.schema, table.columns):
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        mask = None
        if _is_list(fld.type):
            values, mask = _list_to_2d(fld, col)
        elif pa.types.is_string(fld.type) or pa.types.is_large_string(fld.type):
            mask = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else None
            values = np.asarray(col.fill_null("").to_pylist(), dtype=str) if len(col) else np.array([], dtype="U1")
        elif pa.types.is_null(fld.type):  # no values and no type (SQL's NULL AS x): a masked float column
            values, mask = np.full(len(col), np.nan), np.ones(len(col), bool)
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


def in_memory_to_arrow(table) -> pa.Table | None:
    """An in-memory table as Arrow: a pyarrow Table as it is, an astropy Table with its units
    (:func:`astropy_to_arrow`), a pandas DataFrame; ``None`` for anything else (the caller says what it takes)."""
    if isinstance(table, pa.Table):
        return table
    if hasattr(table, "colnames"):  # astropy Table / QTable
        return astropy_to_arrow(table)
    if hasattr(table, "columns") and hasattr(table, "dtypes"):  # pandas
        return pa.Table.from_pandas(table, preserve_index=False)
    return None


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
            inner = pa.array(data.reshape(len(data), int(np.prod(data.shape[1:]))).ravel())  # no -1: 0 rows
            arr = pa.FixedSizeListArray.from_arrays(inner, int(np.prod(data.shape[1:])))
        else:
            m = mask if mask.shape == data.shape and mask.any() else None
            if data.dtype.kind == "f":
                m = (m if m is not None else np.zeros(len(data), bool)) | ~np.isfinite(data)
                m = m if m.any() else None
            arr = (pa.array(data.tolist(), type=pa.string(), mask=m) if data.dtype.kind == "U"  # all masked: not
                   else pa.array(data, mask=m))                                                  # Arrow's null type
        md = {b"unit": (unit.to_string() if unit is not None else "").encode(),
              b"description": (getattr(col.info, "description", None) or "").encode()}
        ucd = (getattr(col.info, "meta", None) or {}).get("ucd")
        if ucd:
            md[b"ucd"] = str(ucd).encode()
        arrays.append(arr)
        fields.append(pa.field(name, arr.type, metadata=md))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
