"""Query results out: :func:`write_table` (Parquet, FITS, VOTable, CSV, by extension) and
:func:`format_table` (an aligned text table for a terminal).
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import CatalogError, ConfigError
from .convert import _field_meta, _is_list, _list_to_2d, _to_pandas, arrow_to_astropy, in_memory_to_arrow

log = logging.getLogger(__name__)

#: output formats of :func:`write_table` (by file extension).
OUTPUT_FORMATS = (".csv", ".parquet", ".fits", ".vot")
_FORMAT_ALIASES = {".fit": ".fits", ".fts": ".fits", ".votable": ".vot", ".xml": ".vot", ".pq": ".parquet"}


def _normalise_format(dest, fmt: str | None) -> str:
    if fmt is None:
        if not isinstance(dest, (str, os.PathLike)):
            raise ConfigError(f"writing to a stream needs a format: fmt= one of {', '.join(OUTPUT_FORMATS)}")
        name = str(dest).lower()
        fmt = os.path.splitext(name[:-3] if name.endswith(".gz") else name)[1]
        if name.endswith(".gz") and _FORMAT_ALIASES.get(fmt, fmt) == ".parquet":
            raise ConfigError(f"{dest}: Parquet compresses its columns itself, and no reader opens a gzipped "
                              "Parquet file; name it .parquet")
    fmt = fmt.lower() if fmt.startswith(".") else "." + fmt.lower()
    fmt = _FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {fmt!r} for {dest}; use one of {', '.join(OUTPUT_FORMATS)} "
                          "(by file extension)")
    return fmt


def _as_arrow(table) -> pa.Table:
    """A result as an Arrow table: a :class:`CatalogQuery` run, else :func:`~.convert.in_memory_to_arrow`."""
    out = table.to_arrow() if hasattr(table, "to_arrow") else in_memory_to_arrow(table)
    if out is None:
        raise ConfigError(f"cannot write a {type(table).__name__}: give a pyarrow Table, a catalog query, an astropy "
                          "Table or a pandas DataFrame")
    return out


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
    from which ``Table.read`` rebuilds the masked column. A null list (``latent`` of an unmatched row) is a
    masked row: NaN in FITS and Parquet (with a ``<name>.mask`` list there), empty in VOTable.

    ``table`` may be a pyarrow Table, a catalog query (run first), an astropy Table (units kept) or a pandas
    DataFrame. ``dest`` may be a path (``.gz`` compresses FITS, VOTable and CSV) or a stream with ``fmt`` (CSV
    only for text streams). ``overwrite=False`` refuses an existing file.

    Raises
    ------
    ConfigError
        If ``dest``'s directory does not exist, or ``dest`` is a directory.
    CatalogError
        If ``dest`` exists and ``overwrite`` is false, or the file cannot be written.
    """
    table = _as_arrow(table)
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
    """``table`` as :func:`write_table` writes it to Parquet: a ``<name>.mask`` column after each boolean or list
    column with nulls (:func:`_with_mask_columns`), astropy's string widths and ``table_meta_yaml`` header
    (:func:`_astropy_header`: plain ``Table.read`` takes units, descriptions and UCDs from it) and, when it has
    VO-Parquet metadata, that metadata for its columns."""
    from ..catalog import _with_string_lengths

    meta = {k: v for k, v in (table.schema.metadata or {}).items()
            if not k.startswith(b"table::len::") and k != b"table_meta_yaml"}
    _warn_inexact_integers(table)
    table, masked = _with_mask_columns(table.replace_schema_metadata(meta or None))
    table = _with_string_lengths(table)
    meta = dict(table.schema.metadata or {})
    if b"IVOA.VOTable-Parquet.content" in meta:
        try:
            meta[b"IVOA.VOTable-Parquet.content"] = _vo_parquet_content(table.schema).encode()
        except Exception as exc:  # a column type VOTable cannot describe: no VO metadata rather than a wrong one
            log.warning("no VO-Parquet metadata in the export (%s)", exc)
            meta = {k: v for k, v in meta.items() if not k.startswith(b"IVOA.VOTable-Parquet.")}
    meta[b"table_meta_yaml"] = _astropy_header(table.schema, masked).encode()
    return table.replace_schema_metadata(meta)


def _with_mask_columns(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """``table`` with a ``<name>.mask`` column (true where ``<name>`` is null) after each column with nulls that
    astropy's Parquet reader cannot read, and those names; :func:`_astropy_header` declares the pairs, and
    astropy (``Table.read``, ``format="parquet.votable"``) rebuilds a masked column from them, its own convention.

    - A boolean column with nulls (``ir_excess`` of rows with no band compared) keeps its nulls for Arrow
      readers; astropy read it as objects, and ``format="parquet.votable"`` failed.
    - A list column with null rows (``latent`` of an unmatched external row, ``crossmatch --keep-unmatched``)
      gets NaN in those rows, and a ``<name>.mask`` list of the same size: astropy cannot read a null array
      (``ValueError: all input arrays must have the same shape``), so Arrow readers see NaN there, as astropy's
      own writer would write a masked 2-D column.

    Other readers see one more column per pair. Strings and numbers get none: a multi-survey export has a dozen
    columns with nulls (a DESI column in an SDSS row), and as many extra columns would clutter every reader;
    astropy reads their nulls as ``'None'`` and NaN (README; :func:`_warn_inexact_integers`)."""
    names = []
    for f, col in zip(table.schema, table.columns):
        if not col.null_count or f"{f.name}.mask" in table.column_names:
            continue
        if pa.types.is_boolean(f.type):
            mask_type, mask = pa.bool_(), pc.is_null(col)
        elif pa.types.is_fixed_size_list(f.type) and pa.types.is_floating(f.type.value_type):
            size = f.type.list_size
            values, mask2d = _list_to_2d(f, col.combine_chunks())  # NaN in the null rows, and their mask
            mask_type = pa.list_(pa.bool_(), size)
            mask = pa.FixedSizeListArray.from_arrays(pa.array(mask2d.ravel()), size)
            table = table.set_column(table.schema.get_field_index(f.name), f.with_nullable(False),
                                     pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), f.type.value_type),
                                                                       size))
        else:
            continue
        meta = {b"unit": b"", b"ucd": b"meta.code",
                b"description": f"True where {f.name} is null (astropy's mask of {f.name}: Table.read restores a "
                                f"masked {f.name} from it)".encode()}
        table = table.add_column(table.schema.get_field_index(f.name) + 1,
                                 pa.field(f"{f.name}.mask", mask_type, nullable=False, metadata=meta), mask)
        names.append(f.name)
    return table, names


def _warn_inexact_integers(table: pa.Table) -> None:
    """Warn about integer columns with nulls whose values float64 cannot hold exactly (above 2**53,
    e.g. DESI's 17-digit TARGETID in a multi-survey export): astropy's Parquet readers turn an integer column with
    nulls into float64, so use pyarrow/pandas (nullable Int64) or a FITS/VOTable export to read them exactly."""
    names = []
    for f, col in zip(table.schema, table.columns):
        if pa.types.is_integer(f.type) and col.null_count and col.null_count < len(col):
            big = pc.max(pc.abs(col.cast(pa.int64()))).as_py() if f.type != pa.uint64() else pc.max(col).as_py()
            if big is not None and big > 2 ** 53:
                names.append(f.name)
    if names:
        log.warning("%s: integers with nulls (rows of another survey); astropy's Parquet readers read such a column "
                    "as float64, which cannot hold these values exactly: read the file with pyarrow or pandas, or "
                    "export .fits/.vot for astropy", ", ".join(names))


def _astropy_header(schema: pa.Schema, masked=()) -> str:
    """astropy's ``table_meta_yaml`` for ``schema``, as astropy's own Parquet writer stores it: plain
    ``Table.read`` (format "parquet") takes each column's unit, description and UCD (``meta["ucd"]``) from it,
    and builds each column of ``masked`` as a masked column from it and its ``<name>.mask`` column."""
    from collections import OrderedDict

    from astropy.table import Column
    from astropy.table.meta import get_yaml_from_header
    from astropy.table.serialize import SerializedColumn

    def np_dtype(t: pa.DataType):
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return np.dtype("U1")
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return np.dtype("S1")
        try:
            return np.dtype(t.to_pandas_dtype())
        except (NotImplementedError, TypeError):
            return np.dtype(object)

    cols = []
    for fld in schema:
        md = _field_meta(fld)
        t = fld.type
        shape = (0, t.list_size) if pa.types.is_fixed_size_list(t) else (0,)
        dtype = np_dtype(t.value_type) if pa.types.is_fixed_size_list(t) else \
            np.dtype(object) if _is_list(t) else np_dtype(t)
        col = Column(np.zeros(shape, dtype), name=fld.name, unit=md.get("unit") or None,
                     description=md.get("description") or None)
        if md.get("ucd"):
            col.meta["ucd"] = md["ucd"]
        cols.append(col)
    header = {"cols": cols}
    if masked:
        header["meta"] = OrderedDict(__serialized_columns__={
            name: {"__class__": "astropy.table.column.MaskedColumn", "data": SerializedColumn({"name": name}),
                   "mask": SerializedColumn({"name": f"{name}.mask"}),
                   **({"dtype": "bool"} if pa.types.is_boolean(schema.field(name).type) else {})}  # Arrow nulls
            for name in masked})                                                                # read as objects
    return "\n".join(get_yaml_from_header(header))


def _vo_parquet_content(schema: pa.Schema) -> str:
    """The VO-Parquet VOTable XML (:func:`catalogpred.catalog.vo_table_xml`) of exactly ``schema``'s columns, in
    its order, strings as wide as the ``table::len::`` metadata says: astropy's ``format="parquet.votable"``
    stacks the FIELDs' empty table on the data, and a variable-length (``*``) string does not stack on a fixed one.
    """
    import warnings
    from xml.sax.saxutils import escape as xml_escape

    from astropy.io.votable import parse
    from astropy.io.votable.exceptions import W50
    from astropy.units import UnitsWarning

    from ..catalog import Column, vo_table_xml

    cols = [Column(f.name, f.type, *(_field_meta(f).get(k, "") for k in ("unit", "ucd", "description")))
            for f in schema if f.name != "_healpix_29"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)  # VOUnit deprecates 'erg' and 'Angstrom', still valid
        warnings.simplefilter("ignore", W50)  # mag(AB) (an external flux as AB magnitudes): no VOUnit, kept as is
        vot = parse(io.BytesIO(vo_table_xml(cols).encode()))
    fields = vot.get_first_table().fields
    by_name = {f.name: f for f in fields}
    ordered = [by_name[n] for n in schema.names]  # vo_table_xml adds _healpix_29 last: where it is, or not at all
    lengths = schema.metadata or {}
    # astropy's writer wraps a long DESCRIPTION over indented lines (breaking at hyphens too), which its reader
    # keeps: each is written as a short token, then replaced by the description itself, so that it reads back
    # as written, as the table_meta_yaml header has it (parquet.votable stacks the two: no merge conflict)
    descriptions = {}
    for i, f in enumerate(ordered):
        if f.datatype in ("char", "unicodeChar") and f"table::len::{f.name}".encode() in lengths:
            f.arraysize = lengths[f"table::len::{f.name}".encode()].decode()
        text = _field_meta(schema.field(f.name)).get("description", "")
        if text:
            f.description = f"catalogpred-description-{i}"
            descriptions[f.description] = xml_escape(text)
    fields.clear()
    fields.extend(ordered)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)
        warnings.simplefilter("ignore", W50)
        vot.to_xml(buf)
    return re.sub(r"catalogpred-description-\d+", lambda m: descriptions[m.group(0)], buf.getvalue().decode("utf-8"))


def _write_fits(table: pa.Table, dest) -> None:
    import warnings

    from astropy.io import fits
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
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # a long TTYPE comment below is cut, as meant
        if not no_fits_unit:
            t.write(dest, format="fits", overwrite=True)
            return
        buf = io.BytesIO()  # written by astropy (which keeps such units in its metadata), then commented in memory:
        t.write(buf, format="fits")  # a stream cannot be reopened for update
        buf.seek(0)
        with fits.open(buf) as hdus:
            header = hdus[1].header
            for i in range(1, header["TFIELDS"] + 1):  # not TUNITn: a unit astropy cannot parse overrides its metadata
                if header[f"TTYPE{i}"] in no_fits_unit:
                    header.comments[f"TTYPE{i}"] = f"unit: {no_fits_unit[header[f'TTYPE{i}']]}"
            hdus.writeto(dest, overwrite=True)


def _write_votable(table: pa.Table, dest) -> None:
    import warnings

    from astropy.table import Table
    from astropy.units import UnitsWarning

    from ..catalog import _vo_unit

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
    """An aligned text table for a terminal: header, a units line, and the rows (numbers right-aligned). ``table``
    as :func:`write_table` takes it."""
    table = _as_arrow(table)
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
