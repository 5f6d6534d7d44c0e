"""The output format: a HATS (hats/lsdb 0.11) value-added catalog with units, rejects and a run manifest.

Layout::

    catalog/
      hats.properties, properties        HATS table properties (+ catalogpred_* provenance keys)
      partition_info.csv                 Norder,Npix of every leaf
      run_manifest.json                  inputs, model, versions, counts, timings, accounting
      rejects.parquet                    every input spectrum that is not in the catalog, with its reason
      dataset/
        _common_metadata, _metadata      schema (with VO-Parquet units/UCDs/descriptions) and row-group footers
        Norder=K/Dir=D/Npix=N/part-<block>.arrow      one file per (prediction block, HEALPix pixel) ...
        Norder=K/Dir=D/Npix=N/Npix=N.parquet          ... merged into one file per leaf once the blocks are done
        Norder=K/Dir=D/Npix=N/part-<block>.parquet    (predict --no-merge: the part files stay, as Parquet)
      _run/                              per-block done markers and rejects (resume state)

All leaves use one fixed order K (chosen from the expected row count), and leaves
are directories (``hats_npix_suffix=/``) so that concurrent tasks each write their own
file. Part files are written to a temporary name and renamed: a retried task
overwrites, never duplicates. After the last block, :func:`merge_leaf` merges each leaf's
part files into one Parquet file (the file lists the blocks it holds), so that a query opens one
file per leaf, as in a catalog hats-import writes. Part files that will be merged are written
in the Arrow IPC format (:data:`PART_FORMATS`): cheaper to write in the GPU worker and to read
back. This module does no computation scheduling (no Dask).

Magnitudes are **Vega** (AllWISE ``w?mpro`` system); add 2.699, 3.339, 5.174, 6.620
(W1..W4) for AB. χ convention: χ = (m_pred − m_obs)/sqrt(σ_pred² + σ_obs²).
"""
from __future__ import annotations

import enum
import functools
import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CatalogError, ConfigError
from .spectra import VEGA_TO_AB, WISE_UCD_RANGE, WISE_WAVELENGTH_UM  # noqa: F401 (re-exported: the catalog's units)

__all__ = ["Column", "CatalogFlag", "core_columns", "native_columns", "catalog_schema", "choose_order",
           "write_fragment", "write_block_done", "read_block_done", "merge_leaf", "leaves_to_merge", "finalize_catalog",
           "REJECTS_SCHEMA", "VEGA_TO_AB", "WISE_WAVELENGTH_UM", "WISE_UCD_RANGE", "DATASET_DIR"]

DATASET_DIR = "dataset"
RUN_DIR = "_run"
SPATIAL_INDEX_ORDER = 29


#: surveys whose ``zwarning`` bits are redshift-quality warnings (SDSS ZWARNING, DESI ZWARN: bits 0-9 shared), so a
#: non-zero value sets :attr:`CatalogFlag.ZWARNING`. PFS's are drp_1d's galaxyZWarning, notes of the fit's processing
#: (bit 0 AIR_VACUUM_CONVERSION_IGNORED, PDF_PEAK_NOT_FOUND, ...; the numbering changes between drp_1d versions):
#: kept in the column, not flagged.
ZWARNING_SURVEYS = ("sdss", "desi")


class CatalogFlag(enum.IntFlag):
    """Bits of the catalog ``flags`` column (0 = nothing to report)."""

    #: the survey's redshift warning (SDSS ZWARNING / DESI ZWARN) is non-zero (DESI's are rejects unless
    #: ingested with ``--keep-zwarn``); not for PFS (:data:`ZWARNING_SURVEYS`)
    ZWARNING = 1
    #: median per-pixel S/N of the spectrum below 2
    LOW_SN = 2
    #: the spectrum covers less than 80% of the model grid
    PARTIAL_COVERAGE = 4
    #: the bundle has no IR head: magnitudes are null, latents are valid
    NO_PREDICTION = 8
    #: latents outside the training distribution: ood_score above the bundle's threshold
    OUT_OF_DISTRIBUTION = 16


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    unit: str
    ucd: str
    description: str


def core_columns(n_latent: int) -> list[Column]:
    """Columns every catalog row has, in order (survey-native columns follow, then ``_healpix_29``)."""
    cols = [
        Column("source_id", pa.string(), "", "meta.id;meta.main", "Unique id across surveys, e.g. sdss-PLATE-MJD-FIBER"),
        Column("survey", pa.string(), "", "meta.dataset", "Survey of the spectrum (sdss, desi, pfs)"),
        Column("ra", pa.float64(), "deg", "pos.eq.ra;meta.main", "Right ascension (ICRS) of the fibre"),
        Column("dec", pa.float64(), "deg", "pos.eq.dec;meta.main", "Declination (ICRS) of the fibre"),
        Column("z", pa.float64(), "", "src.redshift", "Spectroscopic redshift used for normalisation and the head"),
        Column("z_err", pa.float64(), "", "stat.error;src.redshift", "Redshift error"),
        Column("zwarning", pa.int64(), "", "meta.code.qual", "Survey redshift warning bits (0 = good): SDSS ZWARNING, "
               "DESI ZWARN; for PFS drp_1d's galaxyZWarning (processing notes, not flagged)"),
    ]
    for b in ("w1", "w2", "w3", "w4"):
        cols.append(Column(f"{b}_mag", pa.float32(), "mag", f"phot.mag;em.IR.{WISE_UCD_RANGE[b]}",
                           f"Predicted WISE {b.upper()} ({WISE_WAVELENGTH_UM[b]} um) magnitude, Vega system (AllWISE {b}mpro); "
                           f"AB = Vega + {VEGA_TO_AB[b]}"))
    for b in ("w1", "w2", "w3", "w4"):
        cols.append(Column(f"{b}_mag_err", pa.float32(), "mag", "stat.error;phot.mag",
                           f"Predicted 1-sigma uncertainty of {b}_mag (model only; combine with observed errors in quadrature "
                           "for chi = (m_pred - m_obs)/sqrt(sigma_pred^2 + sigma_obs^2))"))
    cols += [
        Column("latent", pa.list_(pa.field("element", pa.float32()), n_latent), "", "meta.code.class",
               f"spender encoder latents ({n_latent} values)"),
        Column("norm", pa.float64(), "1e-17 erg/(s cm2 Angstrom)", "phot.flux.density;em.opt",
               "spender normalisation: lower median of F_lambda in rest-frame 5300-5850 Angstrom"),
        Column("snr_median", pa.float32(), "", "stat.snr", "Median per-pixel S/N over good pixels"),
        Column("ood_score", pa.float32(), "", "stat.fit.goodness",
               "Squared Mahalanobis distance of the latents from the training latents (chi2 with n_latent dof "
               "for training-like spectra); null when the bundle has no latent density"),
        Column("flags", pa.int32(), "", "meta.code.qual",
               "Quality bits: 1 ZWARNING, 2 LOW_SN (snr_median < 2), 4 PARTIAL_COVERAGE (< 80% of grid), "
               "8 NO_PREDICTION (encoder-only bundle), 16 OUT_OF_DISTRIBUTION (ood_score above the bundle threshold)"),
        Column("model_id", pa.string(), "", "meta.version", "Model bundle that made the prediction (name-version+sha256)"),
        Column("source_file", pa.string(), "", "meta.id;meta.file", "Input file name"),
    ]
    return cols


#: survey-native columns (store meta dtype code -> arrow type).
_ARROW = {"U": pa.string(), "i4": pa.int32(), "i8": pa.int64(), "f4": pa.float32(), "f8": pa.float64(), "u1": pa.uint8()}


def native_columns(meta_columns: dict, core: set, docs: dict | None = None) -> list[Column]:
    """Catalog columns for a survey's native metadata (those not already core).

    ``meta_columns``: name -> store dtype code; ``docs``: name -> ``(description, unit, ucd)`` (the readers'
    :func:`~catalogpred.surveys.column_docs`); a column without one is described as a survey column.
    """
    skip = core | {"row_in_file", "source_file"}
    out = []
    for name, code in meta_columns.items():
        if name in skip:
            continue
        desc, unit, ucd = (docs or {}).get(name, (f"Survey column {name}", "", "meta"))
        out.append(Column(name, _ARROW[code], unit, ucd, desc))
    return out


def catalog_columns(n_latent: int, meta_columns: dict, docs: dict | None = None) -> list[Column]:
    """Every catalog column in order: :func:`core_columns`, then :func:`native_columns` of ``meta_columns``
    described by ``docs``."""
    core = core_columns(n_latent)
    return core + native_columns(meta_columns, {c.name for c in core}, docs)


def catalog_schema(columns: list[Column], metadata: dict | None = None) -> pa.Schema:
    """Arrow schema with the same metadata keys (unit, ucd, description) on every field."""
    fields = [pa.field(c.name, c.type, metadata={b"unit": c.unit.encode(), b"ucd": c.ucd.encode(),
                                                 b"description": c.description.encode()}) for c in columns]
    fields.append(pa.field("_healpix_29", pa.int64(), metadata={b"unit": b"", b"ucd": b"pos.healpix",
                                                               b"description": b"HEALPix NESTED index at order 29"}))
    return pa.schema(fields, metadata={k.encode(): v.encode() for k, v in (metadata or {}).items()})


def choose_order(n_rows: int, target_rows: int = 20_000, max_order: int = 7) -> int:
    """Fixed HEALPix order K for all leaves: about ``target_rows`` per pixel for an all-sky spread, at least 1."""
    k = int(np.ceil(np.log(max(n_rows, 1) / (12 * target_rows)) / np.log(4))) if n_rows > 12 * target_rows else 1
    return int(min(max(k, 1), max_order))


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth Parquet dictionary encoding: the strings (ids, classes, survey names repeat). Numbers
    are written plain and zstd-compressed: dictionary-encoding every float of a few hundred unique values
    made a block's part files 1.3-1.5x slower to write and 13 % larger (2 cores, 7 part files, two runs)."""
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def _atomic_write(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` under a temporary name, then rename it: as Arrow IPC if ``path`` ends in
    ``.arrow``, else as Parquet (zstd, string columns dictionary-encoded)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    if path.suffix == ".arrow":
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        pq.write_table(table, tmp, compression="zstd", row_group_size=65536,
                       use_dictionary=_dictionary_columns(table.schema))
    os.replace(tmp, path)


def _with_string_lengths(table: pa.Table) -> pa.Table:
    """``table`` with astropy's ``table::len::<column>`` schema metadata (the longest value, at least 1, or 4 with
    nulls, which astropy reads as ``'None'``) for each string column, as astropy writes it:
    ``astropy.table.Table.read`` of a part file takes the string widths from there; without it astropy measures
    the values and fails on a null (a DESI column in an SDSS row of a multi-survey catalog). A width at least the
    longest value is enough, so :func:`write_fragment` computes it once per block for all its part files (0.1-0.3 ms
    per call measured on 2 cores)."""
    import pyarrow.compute as pc

    lengths = {}
    for f in table.schema:
        if pa.types.is_string(f.type) or pa.types.is_large_string(f.type):
            col = table.column(f.name)
            longest = pc.max(pc.utf8_length(col)).as_py() if table.num_rows else None
            # astropy reads a null as the text 'None': wide enough for it where there are nulls (README)
            lengths[f"table::len::{f.name}".encode()] = str(max(longest or 0, 4 if col.null_count else 1)).encode()
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **lengths}) if lengths else table


def _leaf(order: int, pixel: int) -> str:
    """``Norder=K/Dir=D/Npix=N``: a leaf directory under ``dataset/`` (HATS ``hats_npix_suffix=/``)."""
    return f"Norder={order}/Dir={(pixel // 10_000) * 10_000}/Npix={pixel}"


def pixel_dir(catalog_path, order: int, pixel: int) -> Path:
    """``dataset/Norder=K/Dir=D/Npix=N`` (a leaf directory, HATS ``hats_npix_suffix=/``)."""
    return Path(catalog_path) / DATASET_DIR / _leaf(order, pixel)


#: the formats of a block's part files: ``parquet`` (zstd, the catalog's own format: part files that stay, under
#: ``predict --no-merge``) or ``arrow`` (the Arrow IPC file format, uncompressed: part files that the merge after the
#: last block rewrites as one Parquet file per leaf, :func:`merge_leaf`). On 2 cores (pyarrow 26, the GPU benchmark's
#: part files: 474 rows of 32 columns on average) an Arrow part file took 0.6 ms to write and 0.4 ms to read, a
#: Parquet one 2.0 and 1.3 ms
PART_FORMATS = {"parquet": ".parquet", "arrow": ".arrow"}


def part_path(catalog_path, order: int, pixel: int, block_key: str, part_format: str = "parquet") -> str:
    """``<catalog>/dataset/Norder=K/Dir=D/Npix=N/part-<block>.parquet`` (or ``.arrow``, :data:`PART_FORMATS`), a
    string (finalize builds one per part file, and pathlib's joins cost ~10 µs each)."""
    return os.path.join(os.fspath(catalog_path), DATASET_DIR, _leaf(order, pixel),
                        f"part-{block_key}{PART_FORMATS[part_format]}")


def _part_paths(catalog_path, order: int, pixel: int, block_key: str) -> list[str]:
    """Block ``block_key``'s part file in leaf ``pixel`` in each of :data:`PART_FORMATS`."""
    return [part_path(catalog_path, order, pixel, block_key, f) for f in PART_FORMATS]


def _part_file(catalog_path, order: int, pixel: int, block_key: str, exists) -> str:
    """Block ``block_key``'s part file in leaf ``pixel``: the Arrow one if ``exists(path)`` says it is there, else the
    Parquet one (which may be missing too)."""
    arrow = part_path(catalog_path, order, pixel, block_key, "arrow")
    return arrow if exists(arrow) else part_path(catalog_path, order, pixel, block_key)


def default_write_threads(*, cpu_worker: bool = False) -> int:
    """Threads that write one block's part files at once: ``$CATALOGPRED_WRITE_THREADS``, else 1 in a CPU
    worker (a local CPU cluster already runs a worker process per core) and the CPU count up to 8 elsewhere
    (GPU and I/O workers have idle cores). pyarrow encodes and compresses a Parquet file outside the
    interpreter lock, so a block's part files (one per HEALPix pixel it touches) are written in parallel."""
    env = os.environ.get("CATALOGPRED_WRITE_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"CATALOGPRED_WRITE_THREADS={env!r}: expected a positive integer")
        return int(env)
    return 1 if cpu_worker else min(8, os.cpu_count() or 1)


@functools.cache
def _write_pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of ``threads`` part-file writer threads, shared by a worker's tasks. (Two first
    calls at once may each build one; the one not cached finishes its caller's files and is collected.)"""
    return ThreadPoolExecutor(threads, thread_name_prefix="catalogpred-parquet")


def write_fragment(catalog_path, table: pa.Table, order: int, block_key: str, *,
                   write_threads: int | None = None, part_format: str = "parquet") -> dict[int, int]:
    """Split ``table`` by HEALPix pixel at ``order`` and write one part file per pixel, atomically, from up to
    ``write_threads`` threads (default :func:`default_write_threads`; 1 writes them one after the other), in
    ``part_format`` (:data:`PART_FORMATS`: ``arrow`` where :func:`merge_leaf` rewrites them after the last block).

    Returns ``{pixel: rows}``. Raises CatalogError if a ``source_id`` is in ``table`` twice: a part file never
    holds one twice (finalize relies on it, :func:`leaves_to_check`).
    """
    if part_format not in PART_FORMATS:
        raise ConfigError(f"part file format must be one of {sorted(PART_FORMATS)}, not {part_format!r}")
    if table.num_rows == 0:
        return {}
    if "source_id" in table.column_names:
        import pyarrow.compute as pc

        n_unique = pc.count_distinct(table.column("source_id"), mode="all").as_py()
        if n_unique != table.num_rows:
            raise CatalogError(f"block {block_key}: {table.num_rows - n_unique} source_id values are in it twice")
    table = _with_string_lengths(table)  # once per block: a block's widths hold for each of its part files
    h29 = table.column("_healpix_29").to_numpy()
    pix = h29 >> (2 * (SPATIAL_INDEX_ORDER - order))
    order_idx = np.argsort(h29, kind="stable")
    table = table.take(pa.array(order_idx))
    pix = pix[order_idx]
    bounds = np.flatnonzero(np.diff(pix)) + 1
    parts = [(int(pix[lo]), int(lo), int(hi - lo)) for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(pix)])]

    def write(part):
        p, lo, n = part
        _atomic_write(table.slice(lo, n), Path(part_path(catalog_path, order, p, block_key, part_format)))

    threads = write_threads or default_write_threads()
    if threads > 1 and len(parts) > 1:
        futures = [_write_pool(threads).submit(write, part) for part in parts]
        wait(futures)  # all of them, so none is still writing when a failure is raised
        for f in futures:
            f.result()
    else:
        for part in parts:
            write(part)
    return {p: n for p, _, n in parts}


# --- merged leaves: one file per HEALPix leaf once the blocks are done

#: key-value metadata of a merged leaf file: the JSON list of the blocks whose rows it holds
MERGED_BLOCKS_KEY = b"catalogpred.merged_blocks"


def merged_path(catalog_path, order: int, pixel: int) -> str:
    """``<catalog>/dataset/Norder=K/Dir=D/Npix=N/Npix=N.parquet``: the one file of a merged leaf (hats' own name for
    the file in a directory leaf), a string spelled as :func:`part_path` spells part files."""
    return os.path.join(os.fspath(catalog_path), DATASET_DIR, _leaf(order, pixel), f"Npix={pixel}.parquet")


def merged_blocks(path) -> list[str]:
    """The blocks whose rows the merged leaf file ``path`` holds (its :data:`MERGED_BLOCKS_KEY`)."""
    try:
        md = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"{path}: not a readable Parquet file ({exc}); use --overwrite") from exc
    listed = (md.metadata or {}).get(MERGED_BLOCKS_KEY)
    if listed is None:
        raise CatalogError(f"{path}: a leaf file that does not list the blocks it holds (not written by "
                           "catalogpred); use --overwrite")
    return json.loads(listed)


def _pixel_blocks(parts: dict[str, list[int]]) -> dict[int, list[str]]:
    """``{pixel: blocks with rows in it}`` from ``{block: its pixels}`` (the done markers' ``pixels``)."""
    out: dict[int, list[str]] = {}
    for block, pixels in parts.items():
        for p in pixels:
            out.setdefault(int(p), []).append(block)
    return out


def expected_files(catalog_path, order: int, parts: dict[str, list[int]],
                   found) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """The data files that the finished blocks ``parts`` (block key -> its HEALPix pixels at ``order``) leave in the
    dataset, given the files ``found`` there: ``{path: (pixel, block)}``, a merged leaf file with block ``""``.
    A leaf holds its merged file (:func:`merged_path`) if it has one, and the part files of the blocks that the
    merged file does not hold (a block's Arrow part file if ``found`` has it, else its Parquet one). Also returns the
    part files that a merged file already holds: a merge stopped after its rename leaves them, and they are to be
    deleted.

    Raises CatalogError if a merged file holds a block that is not in ``parts`` (another run's).
    """
    catalog_path = Path(catalog_path)  # spelled as _listed_files spells what it finds ("./c/" -> "c")
    expected: dict[str, tuple[int, str]] = {}
    leftovers: list[str] = []
    for pixel, blocks in _pixel_blocks(parts).items():
        merged = merged_path(catalog_path, order, pixel)
        held: set[str] = set()
        if merged in found:
            held = set(merged_blocks(merged))
            stray = sorted(held - set(blocks))
            if stray:
                raise CatalogError(f"{merged} holds rows of blocks that are not finished blocks of this run "
                                   f"(e.g. {stray[:3]}); use --overwrite")
            expected[merged] = (pixel, "")
        for block in blocks:
            if block not in held:
                expected[_part_file(catalog_path, order, pixel, block, found.__contains__)] = (pixel, block)
            else:
                leftovers += [p for p in _part_paths(catalog_path, order, pixel, block) if p in found]
    return expected, leftovers


def leaves_to_merge(catalog_path, order: int, parts: dict[str, list[int]], *,
                    part_format: str | None = None) -> list[tuple[int, list[str]]]:
    """``[(pixel, its blocks)]`` of the leaves that hold a part file now (of ``part_format`` only, if given: a key
    of :data:`PART_FORMATS`), for :func:`merge_leaf`, from ``parts`` (block key -> its HEALPix pixels at ``order``:
    the done markers'). A leaf of its merged file alone is done."""
    catalog_path = Path(catalog_path)  # spelled as _listed_files spells what it finds ("./c/" -> "c")
    suffix = PART_FORMATS[part_format] if part_format else ""
    with_parts = {os.path.dirname(path) for path in _listed_files(catalog_path / DATASET_DIR)
                  if os.path.basename(path).startswith("part-") and path.endswith(suffix)}
    return [(pixel, sorted(blocks)) for pixel, blocks in sorted(_pixel_blocks(parts).items())
            if os.path.dirname(merged_path(catalog_path, order, pixel)) in with_parts]


def arrow_part_files(catalog_path) -> list[str]:
    """The Arrow part files in the catalog's dataset: written to be merged (:func:`merge_leaf`), not merged yet."""
    dataset = Path(catalog_path) / DATASET_DIR
    return sorted(p for p in _listed_files(dataset) if p.endswith(PART_FORMATS["arrow"])) if dataset.exists() else []


def _read_whole(path: str) -> pa.Table:
    """Every row and column of the Parquet or Arrow IPC (``.arrow``) file ``path``. (For a part file of the query
    benchmark's 32 columns and ~20 rows, ``ParquetFile.read`` took 1.4 ms, ``pq.read_table`` 2.1 ms: 2 cores,
    pyarrow 26.)"""
    if path.endswith(PART_FORMATS["arrow"]):
        with pa.OSFile(path) as f:
            return pa.ipc.open_file(f).read_all()
    with pq.ParquetFile(path) as f:
        return f.read()


def merge_leaf(catalog_path, order: int, pixel: int, blocks: list[str], *, one_file: bool = True) -> dict:
    """Merge the part files of the leaf ``pixel`` (HEALPix NESTED at ``order``) into one Parquet file,
    :func:`merged_path`, and delete them.

    ``blocks`` are the finished blocks with rows in the leaf (their done markers' ``pixels``); a block's part file is
    its Arrow one (``part_format="arrow"``, what ``predict`` writes when it merges) or its Parquet one. Rows that the
    leaf's merged file already holds (a leaf merged by an earlier run, whose store has grown since) are merged with
    the part files of the other blocks. The merged file is sorted by ``_healpix_29`` then ``source_id`` (as
    hats-import sorts a leaf), checked to hold every row of its sources and each ``source_id`` once, written under a
    temporary name and renamed; only then are its part files deleted. A merge stopped after the rename leaves part
    files that the merged file lists (:data:`MERGED_BLOCKS_KEY`): the next merge of the leaf, or finalize, deletes
    them. A leaf of one part file is written as its merged file too: a merged catalog's leaves are each one file,
    named as hats names it.

    The leaf is held in memory twice (read, then sorted): ``choose_order`` aims at about 20,000 rows per leaf. With
    ``one_file=False`` (a leaf too large to hold) each Arrow part file is rewritten as its Parquet part file instead,
    one at a time, and the leaf keeps a part file per block.

    Returns ``{"pixel", "file", "rows", "merged", "rewritten", "deleted"}``: the leaf's one file (None with
    ``one_file=False``), its rows (None if nothing was merged or rewritten), the files merged into it, the Arrow part
    files rewritten as Parquet (``one_file=False``) and the files deleted.

    Raises
    ------
    CatalogError
        If a part file of ``blocks`` is missing, the merged file holds a block not in ``blocks``, the files do not
        share one schema, or a ``source_id`` is in the leaf twice. The leaf is left as it was.
    """
    import pyarrow.compute as pc

    target = merged_path(catalog_path, order, pixel)
    leaf = os.path.dirname(target)  # listed once: each block's file is looked up in it, in either format
    present = {os.path.join(leaf, name) for name in os.listdir(leaf)} if os.path.isdir(leaf) else set()
    held = merged_blocks(target) if target in present else []
    stray = sorted(set(held) - set(blocks))
    if stray:
        raise CatalogError(f"{target} holds rows of blocks that are not finished blocks of this run "
                           f"(e.g. {stray[:3]}); use --overwrite")
    new_blocks = sorted(set(blocks) - set(held))
    new = [_part_file(catalog_path, order, pixel, b, present.__contains__) for b in new_blocks]
    missing = [p for p in new if p not in present]
    if missing:
        raise CatalogError(f"{catalog_path}: {len(missing)} part files of finished blocks are missing "
                           f"(e.g. {missing[:2]}); use --overwrite")
    leftovers = [p for b in held for p in _part_paths(catalog_path, order, pixel, b) if p in present]
    if not one_file:
        return _rewrite_as_parquet(pixel, new, leftovers)
    if not new:  # merged already (perhaps with leftovers), or no rows
        for p in leftovers:
            Path(p).unlink(missing_ok=True)  # missing_ok: a second merge of the leaf (a retried task) may race it
        return {"pixel": pixel, "file": target if held else None, "rows": None, "merged": 0, "rewritten": 0,
                "deleted": len(leftovers)}

    sources = ([target] if held else []) + new
    tables = [_read_whole(p) for p in sources]
    first = tables[0].schema
    for path, t in zip(sources, tables):
        if not t.schema.equals(first, check_metadata=False):
            raise CatalogError(f"{catalog_path}: the part files of leaf {pixel} do not share one schema ({path} "
                               f"differs from {sources[0]}); use --overwrite")
    n_rows = sum(t.num_rows for t in tables)
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    del tables
    if "source_id" in table.column_names:
        n_unique = pc.count_distinct(table.column("source_id"), mode="all").as_py()
        if n_unique != n_rows:
            raise CatalogError(f"{catalog_path}: leaf {pixel} holds {n_rows - n_unique} source_id values twice; "
                               "use --overwrite")
    table = table.sort_by([("_healpix_29", "ascending"), ("source_id", "ascending")])
    meta = {k: v for k, v in (first.metadata or {}).items()
            if not k.startswith(b"table::len::") and k != MERGED_BLOCKS_KEY}
    table = _with_string_lengths(table.replace_schema_metadata(meta))
    table = table.replace_schema_metadata({**table.schema.metadata,
                                           MERGED_BLOCKS_KEY: json.dumps(sorted(set(held) | set(new_blocks))).encode()})
    _atomic_write(table, Path(target))
    for p in new + leftovers:
        Path(p).unlink(missing_ok=True)
    return {"pixel": pixel, "file": target, "rows": n_rows, "merged": len(sources), "rewritten": 0,
            "deleted": len(new) + len(leftovers)}


def _rewrite_as_parquet(pixel: int, parts: list[str], leftovers: list[str]) -> dict:
    """:func:`merge_leaf` with ``one_file=False``: each Arrow file of ``parts`` written as the Parquet part file of
    its block (atomically, then deleted), one at a time; ``leftovers`` deleted."""
    rows = rewritten = 0
    for p in parts:
        if p.endswith(PART_FORMATS["arrow"]):
            t = _read_whole(p)
            _atomic_write(t, Path(p[:-len(PART_FORMATS["arrow"])] + PART_FORMATS["parquet"]))
            Path(p).unlink(missing_ok=True)
            rows, rewritten = rows + t.num_rows, rewritten + 1
    for p in leftovers:
        Path(p).unlink(missing_ok=True)
    return {"pixel": pixel, "file": None, "rows": rows if rewritten else None, "merged": 0, "rewritten": rewritten,
            "deleted": rewritten + len(leftovers)}


#: the rejects table: every input spectrum that did not make it into the catalog.
REJECTS_SCHEMA = pa.schema([
    ("source_id", pa.string()), ("survey", pa.string()), ("source_file", pa.string()), ("source_path", pa.string()),
    ("row_in_file", pa.int32()), ("store_row", pa.int64()), ("stage", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()),
])


def atomic_write_text(path, text: str) -> None:
    """Write a text file under a temporary name, then rename it: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def block_done_path(catalog_path, block_key: str) -> str:
    """The done marker of block ``block_key``: ``_run/blocks/<block>.json``."""
    return os.path.join(os.fspath(catalog_path), RUN_DIR, "blocks", f"{block_key}.json")


def block_rejects_path(catalog_path, block_key: str) -> str:
    """The rejects of block ``block_key``: ``_run/blocks/<block>.rejects.parquet`` (finalize merges them)."""
    return os.path.join(os.fspath(catalog_path), RUN_DIR, "blocks", f"{block_key}.rejects.parquet")


def write_block_done(catalog_path, block_key: str, summary: dict, rejects: pa.Table) -> None:
    """Record a finished block: its rejects, then its done marker (the commit point)."""
    _atomic_write(rejects.cast(REJECTS_SCHEMA), Path(block_rejects_path(catalog_path, block_key)))
    atomic_write_text(Path(block_done_path(catalog_path, block_key)), json.dumps(summary))


def read_block_done(catalog_path) -> dict[str, dict]:
    """Done markers of finished blocks, by block key."""
    run = Path(catalog_path) / RUN_DIR / "blocks"
    if not run.exists():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(run.glob("*.json"))}


def runtime_text(runtime: dict) -> str:
    """One entry of a run manifest's ``model_runtime`` (what ran the model of some blocks) as text:
    ``cuda: NVIDIA H100 80GB HBM3; torch 2.13.0+cu130, numpy 2.3.4, python 3.12.3 (12 blocks)``."""
    libs = ", ".join(f"{k} {runtime[k]}" for k in ("torch", "numpy", "python") if k in runtime)
    return f"{runtime.get('device', '?')}{'; ' + libs if libs else ''} ({runtime.get('blocks', 0):,d} blocks)"


def _model_ids(manifest: dict) -> str:
    """Every model id of a run, comma-separated (the run manifest's ``models``, by survey; else its ``model``)."""
    ids = [m.get("model_id", "") for m in (manifest.get("models") or {}).values() if isinstance(m, dict)]
    ids = ids or [manifest.get("model", {}).get("model_id", "")]
    return ",".join(sorted(set(filter(None, ids))))


def _vo_unit(unit: str):
    """``unit`` as an astropy unit that writes as a valid VOUnit string: a unit without a VOUnit spelling, such
    as the Legacy Surveys' nanomaggy (astropy's ``nmgy``, which VOUnit lacks), becomes a quoted unknown unit
    (``'nanomaggy'``, ``'nanomaggy'**-2``), which VOUnit allows and keeps the name, rather than an invalid string."""
    import re
    import warnings

    import astropy.units as u

    if not unit:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)  # VOUnit deprecates erg and Angstrom, still valid
            parsed = u.Unit(unit)
            if u.Unit(parsed.to_string("vounit"), format="vounit") == parsed:  # written, read back: the same
                return parsed
    except ValueError:
        pass
    m = re.fullmatch(r"([A-Za-z]+)(-?\d+)?", unit.replace(" ", ""))
    if m is None:
        return unit  # astropy keeps it, unparsed
    name, power = m.group(1), m.group(2)
    return u.Unit(f"'{name}'" + (f"**{power}" if power and power != "1" else ""), format="vounit")


#: one :func:`vo_table_xml` at a time in a process: its ``warnings.catch_warnings`` blocks change the process's
#: warning filters, and two threads' blocks interleaved left astropy's UnitsWarning unfiltered (a worker's two block
#: threads build their first part file's schema at once; a run's client builds it while its main thread waits)
_VO_XML_LOCK = threading.Lock()


def vo_table_xml(columns: list[Column]) -> str:
    """VOTable XML (no rows) describing the columns: the IVOA VO-Parquet ``content`` value.

    hats' own writer cannot describe fixed-size-list columns (``latent``), so it is built here
    with astropy: units, UCDs and descriptions per FIELD, arraysize for the latents.
    """
    with _VO_XML_LOCK:
        return _vo_table_xml(columns)


def _vo_table_xml(columns: list[Column]) -> str:
    import io

    from astropy.io.votable.tree import VOTableFile
    from astropy.table import Table

    def np_dtype(t: pa.DataType):
        if pa.types.is_fixed_size_list(t):
            return (t.value_type.to_pandas_dtype(), (t.list_size,))
        if pa.types.is_string(t):
            return "U1"
        return t.to_pandas_dtype()

    all_cols = [*columns, Column("_healpix_29", pa.int64(), "", "pos.healpix", "HEALPix NESTED index at order 29")]
    t = Table()
    for c in all_cols:
        dt = np_dtype(c.type)
        shape = (0,) + (dt[1] if isinstance(dt, tuple) else ())
        t[c.name] = np.zeros(shape, dtype=dt[0] if isinstance(dt, tuple) else dt)
        t[c.name].description = c.description
    import warnings

    from astropy.units import UnitsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)  # 'erg', 'Angstrom' are valid FITS/CDS units; VOUnit prefers SI
        for c in all_cols:
            t[c.name].unit = _vo_unit(c.unit)
        vot = VOTableFile.from_table(t)
    ucds = {c.name: c.ucd for c in all_cols}
    for f in vot.get_first_table().iter_fields_and_params():
        if ucds.get(f.name):
            f.ucd = ucds[f.name]
        # strings (unicodeChar) keep from_table's fixed arraysize: astropy's own VO-Parquet reader stacks the
        # VOTable's columns onto the data, and fails on a variable-length ("*", object) string column
        if f.datatype == "char":
            f.arraysize = "*"
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnitsWarning)
        vot.to_xml(buf)
    return buf.getvalue().decode("utf-8")


@functools.lru_cache(maxsize=4)
def _vo_table_xml_cached(columns: tuple) -> str:
    """:func:`vo_table_xml` of a run's columns, computed once per process (27-40 ms on 2 cores, profiled):
    :func:`import_finalize_deps_in_background` computes it while the blocks run."""
    return vo_table_xml(list(columns))


def common_schema(schema: pa.Schema, columns: list[Column]) -> pa.Schema:
    """The dataset's schema for ``_common_metadata`` and ``_metadata``: ``schema`` (a part file's: field units and
    descriptions) with the VO-Parquet keys of ``columns``, without one file's ``table::len::`` string widths and
    merged blocks."""
    meta = {k: v for k, v in (schema.metadata or {}).items()
            if not k.startswith(b"table::len::") and k != MERGED_BLOCKS_KEY}
    meta |= {b"IVOA.VOTable-Parquet.version": b"1.0",
             b"IVOA.VOTable-Parquet.content": _vo_table_xml_cached(tuple(columns)).encode()}
    return schema.with_metadata(meta)


def _finalize_threads() -> int:
    """Threads that read part-file footers, ids and rejects at finalize: the CPU count, at least 4, at most 16
    (reads wait on the disk as much as on a core)."""
    return max(4, min(16, os.cpu_count() or 1))


def _listed_files(dataset: Path) -> dict[str, tuple[int, int]]:
    """``{path: (bytes, mtime ns)}`` of the data files under ``dataset/Norder=*`` (names starting with ``.`` or ``_``
    are not data files, as for Arrow's dataset discovery)."""
    found = {}

    def scan(d: str):
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    scan(e.path)
                elif not e.name.startswith((".", "_")):
                    st = e.stat()
                    found[e.path] = (st.st_size, st.st_mtime_ns)

    for top in sorted(dataset.glob("Norder=*")):
        scan(str(top))
    return found


class PartFooter(NamedTuple):
    """What finalize needs of one part file's footer (:func:`read_part_footer`).

    ``metadata`` is the footer with its file path set relative to ``dataset/`` (what ``_metadata`` lists), either
    parsed or, for most footers a run's client keeps while the blocks run (:class:`FooterReader`), serialized
    without the Arrow schema and key-value metadata (:func:`compact_footer`): 7.9 KB against 185 KB parsed for a
    part file of predict's 55 columns (measured, pyarrow 26).
    """

    stat: tuple[int, int]  # the file's (bytes, mtime ns) when read
    num_rows: int
    ranges: tuple | None  # (min, max) of source_id in each row group; None without statistics
    metadata: pq.FileMetaData | bytes | None  # None in what write_dataset_metadata returns


def read_part_footer(path: str, dataset: str) -> PartFooter:
    """:class:`PartFooter` of the part file ``path`` under ``dataset`` (its file path set relative to it); a
    :class:`CatalogError` if it is not a readable Parquet file."""
    try:
        st = os.stat(path)
        md = pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CatalogError(f"{path}: not a readable Parquet file ({exc}); use --overwrite") from exc
    md.set_file_path(os.path.relpath(path, dataset))
    return PartFooter((st.st_size, st.st_mtime_ns), md.num_rows, _id_ranges(md), md)


def compact_footer(md: pq.FileMetaData, template: bytes) -> bytes | None:
    """``md``'s row groups (file paths, statistics, offsets: what ``_metadata`` lists) in a serialized footer
    without the Arrow schema and the key-value metadata, from ``template`` (:func:`footer_template` of ``md``);
    None if ``md``'s Parquet schema is not the template's."""
    out = pq.read_metadata(pa.BufferReader(template))
    try:
        out.append_row_groups(md)
    except RuntimeError:  # "AppendRowGroups requires equal schemas"
        return None
    sink = pa.BufferOutputStream()
    out.write_metadata_file(sink)
    return sink.getvalue().to_pybytes()


def footer_template(md: pq.FileMetaData) -> bytes:
    """A serialized footer with ``md``'s Parquet schema, no row groups, no Arrow schema and no key-value
    metadata: what :func:`compact_footer` appends a part file's row groups to."""
    arrow = md.schema.to_arrow_schema()
    sink = pa.BufferOutputStream()
    pq.write_metadata(pa.schema([f.remove_metadata() for f in arrow]), sink, store_schema=False)
    return sink.getvalue().to_pybytes()


def _parsed(footer: PartFooter) -> pq.FileMetaData:
    md = footer.metadata
    return pq.read_metadata(pa.BufferReader(md)) if isinstance(md, bytes) else md


#: part-file footers a run's client keeps parsed (:class:`FooterReader`); the others it keeps compact
FOOTERS_KEPT = 1024


class FooterReader:
    """Reads the part-file footers of each block as it finishes, in one background thread of the run's client, so
    that :func:`write_dataset_metadata` reads only those of blocks finished earlier (a resumed run) or changed since.

    Reading a footer holds the interpreter lock (about 0.3 ms each on 2 cores, measured: threads do not speed it
    up), and a block writes one part file per HEALPix pixel it touches, so after the last block this was about a
    quarter of finalize (211 part files for 100,000 spectra). Usage: ``block_done(key, pixels)`` from
    :func:`~catalogpred.pipeline.runner.run_bounded`'s ``on_done``, then ``footers()`` for finalize.

    The first ``keep`` footers (default :data:`FOOTERS_KEPT`) stay parsed: 185 KB each in memory for predict's 55
    columns (measured). The others are kept compact (:func:`compact_footer`, 7.9 KB), so that a run of tens of
    millions of spectra (tens of thousands of part files) does not hold gigabytes in its client; finalize parses
    a compact footer again (0.13-0.16 ms on 2 cores). For 12,279 part files the client held 209 MB of footers
    against 1,417 MB all parsed (``bench/bench_query.py``, the ``footers held`` row).
    """

    def __init__(self, catalog_path, order: int, keep: int = FOOTERS_KEPT):
        self.catalog_path, self.order = os.fspath(Path(catalog_path)), order  # as finalize spells the paths
        self.dataset = os.path.join(self.catalog_path, DATASET_DIR)
        self.keep = keep
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="catalogpred-footers")
        self._futures = []
        self._kept = 0  # footers kept parsed (only the one background thread counts)
        self._template: bytes | None = None

    def block_done(self, key: str, pixels) -> None:
        """Read the footers of block ``key``'s part files (one per pixel of ``pixels``) in the background."""
        paths = [part_path(self.catalog_path, self.order, int(p), key) for p in pixels]
        self._futures.append(self._pool.submit(self._read, paths))

    def _read(self, paths: list[str]) -> dict[str, PartFooter]:
        out = {}
        for path in paths:
            try:
                footer = read_part_footer(path, self.dataset)
            except CatalogError:  # finalize reads it again, and reports it
                continue
            if self._kept < self.keep:
                self._kept += 1
            else:
                if self._template is None:
                    self._template = footer_template(footer.metadata)
                compact = compact_footer(footer.metadata, self._template)
                if compact is not None:  # else another schema: finalize refuses it, kept parsed to say so
                    footer = footer._replace(metadata=compact)
            out[path] = footer
        return out

    def footers(self) -> dict[str, PartFooter]:
        """``{path: PartFooter}`` of every block handed to :meth:`block_done`, once all are read."""
        out = {}
        for f in self._futures:
            out.update(f.result())
        self._pool.shutdown()
        return out


#: part-file footers read at once by :func:`write_dataset_metadata` (a window of them is held parsed)
_READ_WINDOW = 256


def write_dataset_metadata(catalog_path, order: int, parts: dict[str, list[int]], columns: list[Column],
                           footers: dict[str, PartFooter] | None = None) -> dict[str, PartFooter]:
    """Write ``dataset/_metadata`` (the row-group footers of every part file, in pixel order, as hats' own writer
    orders them) and ``dataset/_common_metadata`` (the schema with the VO-Parquet keys of ``columns``) for the
    data files that ``parts`` (block key -> its HEALPix pixels at ``order``, from the done markers) leaves: part
    files and merged leaf files (:func:`expected_files`; part files a merged file already holds are deleted).
    Returns their footers, ``{path: PartFooter}`` in that order, each without its metadata.

    ``footers`` are footers read earlier (:class:`FooterReader`); one is used if its file has the same size and
    modification time now, and every other footer is read here, in threads, a window at a time: the parsed
    footers held are a window's and ``_metadata``'s own row groups (about 50 KB per part file of 55 columns).

    hats' ``write_parquet_metadata`` discovers the part files by walking the dataset and reads all their footers;
    here the done markers say which files there must be, so every file in the dataset is checked against that
    list, and footers read while the blocks ran are not read again.

    Raises
    ------
    CatalogError
        If a listed part file is missing or unreadable, or is an Arrow part file not merged yet, a data file in the
        dataset is not listed (a leaf or part file of another run), or the part files do not share one schema.
    """
    catalog_path = Path(catalog_path)  # spelled as _listed_files spells what it finds ("./c/" -> "c")
    dataset = catalog_path / DATASET_DIR
    found = _listed_files(dataset)
    expected, leftovers = expected_files(catalog_path, order, parts, found)
    for path in leftovers:  # part files a merged leaf file holds: a merge stopped after its rename left them
        Path(path).unlink(missing_ok=True)
        del found[path]
    stray = sorted(set(found) - set(expected))
    if stray:
        raise CatalogError(f"{catalog_path}: {len(stray)} files in the dataset were not written by this run "
                           f"(e.g. {stray[:2]}); use --overwrite")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CatalogError(f"{catalog_path}: {len(missing)} part files of finished blocks are missing "
                           f"(e.g. {missing[:2]}); use --overwrite")
    unmerged = sorted(p for p in expected if p.endswith(PART_FORMATS["arrow"]))
    if unmerged:
        raise CatalogError(f"{catalog_path}: {len(unmerged)} part files are Arrow files written to be merged into "
                           f"their leaf's Parquet file (e.g. {unmerged[:2]}); run predict again, without --no-merge, "
                           "to merge them")
    paths = sorted(expected, key=expected.get)  # by pixel, then block (a merged file first): as hats orders _metadata
    footers = footers or {}
    known = {p: footers[p] for p in paths if p in footers and footers[p].stat == found[p]}
    out: dict[str, PartFooter] = {}

    def in_order(pool):
        """Every part file's footer, parsed, in ``paths``' order; those not ``known`` read in the threads of
        ``pool``, a window at a time. (Parsing the compact ones in threads too was slower on 2 cores: 2.6 against
        2.5 s for 12,279 part files.)"""
        for i in range(0, len(paths), _READ_WINDOW):
            window = paths[i:i + _READ_WINDOW]
            todo = [p for p in window if p not in known]
            read = dict(zip(todo, pool.map(lambda p: read_part_footer(p, str(dataset)), todo)))
            for p in window:
                footer = known[p] if p in known else read[p]
                out[p] = footer._replace(metadata=None)
                yield p, _parsed(footer)

    with ThreadPoolExecutor(_finalize_threads()) as pool:
        footers_in_order = in_order(pool)
        first_path, first = next(footers_in_order)
        if not first.metadata or b"ARROW:schema" not in first.metadata:  # a compact footer: no field units in it
            first = read_part_footer(first_path, str(dataset)).metadata
        schema = common_schema(first.schema.to_arrow_schema(), columns)  # field units from the Arrow schema
        sink = pa.BufferOutputStream()
        pq.write_metadata(schema, sink)
        metadata = pq.read_metadata(pa.BufferReader(sink.getvalue()))  # the schema, no row groups
        metadata.append_row_groups(first)
        for p, md in footers_in_order:
            if not md.schema.equals(first.schema):
                raise CatalogError(f"{catalog_path}: its part files do not share one schema ({p} differs from "
                                   f"{first_path}); use --overwrite")
            metadata.append_row_groups(md)
    for name, write in (("_metadata", metadata.write_metadata_file),
                        ("_common_metadata", lambda where: pq.write_metadata(schema, where))):
        tmp = dataset / f".{name}.{uuid.uuid4().hex}.tmp"
        write(str(tmp))
        os.replace(tmp, dataset / name)
    return out


def leaves_to_check(footers: dict[str, PartFooter]) -> dict[str, list[str]]:
    """``{leaf directory: its part files}`` of the leaves in which two part files may share a ``source_id``: those
    whose part files' id ranges (min-max, from the footers' statistics) overlap, or lack statistics. A part file
    never holds an id twice (:func:`write_fragment` refuses such a table), so the other leaves cannot hold a
    duplicate."""
    by_leaf: dict[str, list[str]] = {}
    for path in footers:
        by_leaf.setdefault(os.path.dirname(path), []).append(path)
    out = {}
    for leaf, paths in by_leaf.items():
        if len(paths) < 2:
            continue
        if any(footers[p].ranges is None for p in paths):
            out[leaf] = paths
            continue
        ranges = sorted(r for p in paths for r in footers[p].ranges)  # by min: an overlap is between neighbours
        if any(nxt[0] <= prev[1] for prev, nxt in zip(ranges, ranges[1:])):
            out[leaf] = paths
    return out


def _id_ranges(md: pq.FileMetaData) -> tuple | None:
    """``(min, max)`` of ``source_id`` in each row group of the footer ``md``; None without the column or where
    a row group lacks the statistics."""
    if "source_id" not in md.schema.names:
        return None
    j = md.schema.names.index("source_id")
    ranges = []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(j).statistics
        if st is None or not st.has_min_max:
            return None
        ranges.append((st.min, st.max))
    return tuple(ranges)


#: what :func:`finalize_catalog` imports: hats and its dependencies (mocpy, …) take seconds to import
FINALIZE_IMPORTS = ("hats.catalog", "hats.pixel_math", "pyarrow.dataset")


def import_finalize_deps_in_background(columns: list[Column] | None = None) -> threading.Thread:
    """Import :data:`FINALIZE_IMPORTS` (and build the VO-Parquet description of ``columns``) in a daemon thread
    and return it.

    A run's client calls this when it submits the blocks, so that it imports hats (about 3 s on 2 cores,
    measured) while the workers predict instead of after them, in :func:`finalize_catalog`. An import that
    fails here fails again, with its error, in :func:`finalize_catalog`.
    """
    import importlib

    def run():
        for name in FINALIZE_IMPORTS:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported where the module is needed
                return
        if columns is not None:
            _vo_table_xml_cached(tuple(columns))

    t = threading.Thread(target=run, name="catalogpred-import-hats", daemon=True)
    t.start()
    return t


def count_duplicate_ids(catalog_path, threads: int | None = None, leaves: dict[str, list[str]] | None = None) -> int:
    """Rows of the catalog's dataset (the part files its ``_metadata`` lists) whose ``source_id`` repeats within
    their leaf (``Norder=K/Dir=D/Npix=N``), read one leaf at a time by ``threads`` threads (default
    :func:`_finalize_threads`); if ``leaves`` (``{leaf directory: its part files}``, finalize's
    :func:`leaves_to_check`) is given, only those files, without reading ``_metadata``.

    A row written twice (a retried block whose first part files survived, a part file copied by hand) lands in
    the same leaf twice, since its leaf follows from its position. A source_id shared by two different spectra
    cannot reach a catalog: ingest rejects the second as ``duplicate_id``. So the check holds the ids of a few
    leaves at a time rather than all of them. On the query benchmark's catalogs (``bench_query.duplicate_check``,
    2 cores), its peak is 115 MB against 224 MB with every id at once for 1M rows, and 1,118-1,124 MB against
    1,579-1,621 MB for 4M rows in 12,288 part files. What is left is ``_metadata`` itself, all part files'
    footers, which grows with part files × columns (hats' writer holds it too): finalize passes ``leaves``.
    """
    import pyarrow.dataset as pads  # here, not at import: it adds ~0.4 s to every process importing this module

    if leaves is not None:
        def repeats(files: list[str]) -> int:
            ids = pads.dataset(files, format="parquet").to_table(columns=["source_id"], use_threads=False)
            return ids.num_rows - len(ids.column("source_id").unique())

        groups = list(leaves.values())
    else:
        # the part files as _metadata lists them, with their footers (not read again)
        dataset = pads.parquet_dataset(str(Path(catalog_path, DATASET_DIR, "_metadata")))
        by_leaf: dict[str, list] = {}
        for fragment in dataset.get_fragments():
            by_leaf.setdefault(os.path.dirname(fragment.path), []).append(fragment)

        def repeats(fragments: list) -> int:
            ids = pads.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem).to_table(
                columns=["source_id"], use_threads=False).column("source_id")
            return len(ids) - len(ids.unique())

        groups = list(by_leaf.values())
    if not groups:
        return 0
    with ThreadPoolExecutor(max(1, threads or _finalize_threads())) as pool:
        return sum(pool.map(repeats, groups))


#: rows per row group of ``rejects.parquet`` (as :func:`_atomic_write` writes a table)
REJECTS_ROW_GROUP = 65536


def merge_rejects(catalog_path, blocks: list[str], dest) -> tuple[int, dict[str, int]]:
    """Write the rejects of ``blocks`` (their ``_run/blocks/<block>.rejects.parquet``, in that order) to the
    Parquet file ``dest``, a row group of :data:`REJECTS_ROW_GROUP` rows at a time, and return ``(rows, rows by
    reason)``.

    The blocks' files are read in threads a window at a time, and rows are written as they come, so memory
    stays a window's and a row group's whatever the number of rejects: a DESI run rejects sky fibres, stars
    and others (``not_galaxy``, ``sky_fibre``, …), which can be a large share of its inputs. Until 2026-11-28 finalize
    concatenated them all in memory and counted the reasons as Python strings.
    """
    import pyarrow.compute as pc

    paths = [block_rejects_path(catalog_path, b) for b in blocks]
    by_reason: dict[str, int] = {}
    n = written = 0  # rows read, rows written
    pending: list[pa.Table] = []  # rows read, not yet written: less than a row group
    threads = _finalize_threads()
    window = 2 * threads  # files read at once: a block holds at most its shard's rows (4,096 by default)
    with (ThreadPoolExecutor(threads) as pool,
          pq.ParquetWriter(dest, REJECTS_SCHEMA, compression="zstd",
                           use_dictionary=_dictionary_columns(REJECTS_SCHEMA)) as writer):
        for i in range(0, len(paths), window):
            for table in pool.map(pq.read_table, paths[i:i + window]):
                table = table.cast(REJECTS_SCHEMA)
                n += table.num_rows
                for row in pc.value_counts(table.column("reason")).to_pylist():
                    key = str(row["values"])  # a null reason counts as "None", as before
                    by_reason[key] = by_reason.get(key, 0) + row["counts"]
                pending.append(table)
                if n - written >= REJECTS_ROW_GROUP:
                    rest = _write_row_groups(writer, pa.concat_tables(pending))
                    written, pending = n - rest.num_rows, [rest]
        if n > written:
            writer.write_table(pa.concat_tables(pending), row_group_size=REJECTS_ROW_GROUP)
    return n, dict(sorted(by_reason.items()))


def _write_row_groups(writer: pq.ParquetWriter, table: pa.Table) -> pa.Table:
    """Write the whole row groups of ``table`` (:data:`REJECTS_ROW_GROUP` rows each); return the rest."""
    whole = table.num_rows - table.num_rows % REJECTS_ROW_GROUP
    if whole:
        writer.write_table(table.slice(0, whole), row_group_size=REJECTS_ROW_GROUP)
    return table.slice(whole)


def finalize_catalog(catalog_path, *, catalog_name: str, order: int, blocks: list[str], columns: list[Column],
                     expected_inputs: int, manifest: dict, footers: dict[str, PartFooter] | None = None) -> dict:
    """Write HATS metadata, the rejects table and the run manifest; check the accounting.

    ``footers``: part-file footers read while the blocks ran (:class:`FooterReader`, :func:`write_dataset_metadata`).

    Raises
    ------
    CatalogError
        If a block is missing, a source_id is duplicated, or catalog + rejects ≠ inputs.
    """
    from hats.catalog import TableProperties

    catalog_path = Path(catalog_path)
    done = read_block_done(catalog_path)
    missing = [b for b in blocks if b not in done]
    if missing:
        raise CatalogError(f"{catalog_path}: {len(missing)} blocks have no done marker (e.g. {missing[:3]}); "
                           "re-run predict to finish them")
    stale = [b for b in done if b not in blocks]
    if stale:
        raise CatalogError(f"{catalog_path}: done markers for blocks not in this run ({stale[:3]}); use --overwrite")
    # every block is done: a temporary file left now is from a writer killed mid-write (its task was retried)
    for half_written in catalog_path.glob("**/.*.tmp"):
        half_written.unlink(missing_ok=True)

    n_rows = sum(done[b]["n_rows"] for b in blocks)
    merged = catalog_path / f".rejects.parquet.{uuid.uuid4().hex}.tmp"  # rejects.parquet once the checks pass
    try:
        n_rejects, by_reason = merge_rejects(catalog_path, blocks, merged)
        pixels, max_rows = _write_dataset_files(catalog_path, order, {b: done[b] for b in blocks}, columns, footers)
        accounted = n_rows + n_rejects
        if accounted != expected_inputs:
            raise CatalogError(f"{catalog_path}: {n_rows} catalog rows + {n_rejects} rejects = {accounted}, "
                               f"but the store holds {expected_inputs} input spectra")
        os.replace(merged, catalog_path / "rejects.parquet")  # after the checks: a refused run leaves the old one
    finally:
        merged.unlink(missing_ok=True)

    props = TableProperties(
        catalog_name=catalog_name, catalog_type="object", total_rows=n_rows, ra_column="ra", dec_column="dec",
        healpix_column="_healpix_29", healpix_order=SPATIAL_INDEX_ORDER, npix_suffix="/", hats_max_rows=max_rows,
        default_columns=["source_id", "survey", "ra", "dec", "z", "w1_mag", "w2_mag", "w3_mag", "w4_mag",
                         "w1_mag_err", "w2_mag_err", "w3_mag_err", "w4_mag_err", "flags"],
        **{"catalogpred_model_id": _model_ids(manifest),
           "catalogpred_version": manifest.get("versions", {}).get("catalogpred", ""),
           "catalogpred_magnitude_system": "Vega (AllWISE w?mpro)",
           "catalogpred_chi_convention": "chi = (m_pred - m_obs) / sqrt(sigma_pred^2 + sigma_obs^2); chi2_N = mean chi^2",
           "hats_order_fixed": str(order)},
    )
    props.to_properties_file(catalog_path)
    counts = {"catalog_rows": n_rows, "rejects": n_rejects, "inputs": expected_inputs,
              "rejects_by_reason": by_reason, "pixels": len(pixels), "order": order}
    manifest = {**manifest, "counts": counts}
    (catalog_path / "run_manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return counts


def _write_dataset_files(catalog_path: Path, order: int, done: dict[str, dict], columns: list[Column],
                         footers: dict[str, PartFooter] | None) -> tuple[list[int], int]:
    """Finalize's dataset part for the blocks ``done`` (block key -> done marker): ``_metadata`` and
    ``_common_metadata`` (:func:`write_dataset_metadata`), the row and duplicate checks, ``partition_info.csv``.
    Returns the HEALPix pixels at ``order`` and the most rows in one of them."""
    from hats.catalog import PartitionInfo
    from hats.pixel_math import HealpixPixel

    pixels = sorted({int(p) for d in done.values() for p in d["pixels"]})
    if not pixels:  # every input was rejected: an empty catalog that still opens (schema, units, no leaves)
        ds = catalog_path / DATASET_DIR
        ds.mkdir(parents=True, exist_ok=True)
        schema = common_schema(catalog_schema(columns), columns)
        pq.write_metadata(schema, ds / "_metadata")
        pq.write_metadata(schema, ds / "_common_metadata")
        PartitionInfo.from_healpix([]).write_to_file(catalog_path / "partition_info.csv")
        return pixels, 0
    n_rows = sum(d["n_rows"] for d in done.values())
    footers = write_dataset_metadata(catalog_path, order, {b: d["pixels"] for b, d in done.items()}, columns, footers)
    total = sum(f.num_rows for f in footers.values())
    if total != n_rows:
        raise CatalogError(f"{catalog_path}: dataset holds {total} rows but the blocks reported {n_rows}; "
                           "a part file was changed after its block: use --overwrite")
    n_dup = count_duplicate_ids(catalog_path, leaves=leaves_to_check(footers))
    if n_dup:
        raise CatalogError(f"{catalog_path}: {n_dup} duplicated source_id values")
    PartitionInfo.from_healpix([HealpixPixel(order, p) for p in pixels]).write_to_file(
        catalog_path / "partition_info.csv")
    per_pixel: dict[int, int] = {}
    for d in done.values():
        for p, k in d["pixels"].items():
            per_pixel[int(p)] = per_pixel.get(int(p), 0) + k
    return pixels, max(per_pixel.values())
