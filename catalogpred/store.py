"""The Zarr v3 spectra store: one group per survey, row i of every array is the same spectrum.

Layout::

    store.zarr/                         root group   attrs: catalogpred_store (schema version)
      sdss/                             survey group attrs: grid, shard_rows, chunk_rows, units
        wave        float64 [n_pix]                  Å, vacuum, observed frame
        flux        float32 [n_rows, n_pix]          F_λ / norm (dimensionless)
        ivar        float32 [n_rows, n_pix]          ivar · norm²
        mask        uint8   [n_rows, n_pix]          PixelMask bits (0 = good)
        shard_done  uint8   [n_shards]               1 once a shard's ingest task has finished
        meta/       1-D arrays [n_rows]: source_id, survey, ra, dec, z, z_err, zwarning,
                    source_file, row_in_file, norm (1e-17 erg/s/cm²/Å), status, reject_reason,
                    reject_detail, source_path, then survey-native ids (plate, mjd, …)

Every input spectrum gets a row, good or not: ``status`` is :class:`RowStatus`
(``OK`` or ``REJECTED`` with ``reject_reason``/``reject_detail``; a file that could
not be read at all gets one ``REJECTED`` row with an empty spectrum). So the
accounting invariant is simply *catalog rows + rejects = non-empty store rows*.

Rows are chunked (``chunk_rows``, default 256) inside shards (``shard_rows``,
default 4096) with Blosc-LZ4 compression. **A writer owns whole shards**: the
client allocates shards (resizing every array) and each ingest task fills exactly
one shard, padding unused rows with ``status = EMPTY``. Shards are marked done by
the client only after their task succeeded, which is what makes ingest resumable.

Everything is written with zarr-python. :func:`read_shard` (a prediction block) reads the
numeric arrays with TensorStore where it is installed (C++, outside the GIL) and the
string columns' chunks with zarr-python's own codecs (numcodecs) but not its event loop;
:data:`READ_ENGINES` lists the choices.
"""
from __future__ import annotations

import asyncio
import enum
import functools
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import StoreError
from .spectra import Grid

__all__ = [
    "STORE_SCHEMA_VERSION",
    "RowStatus",
    "SurveyLayout",
    "STORE_META",
    "create_survey",
    "open_survey",
    "list_surveys",
    "allocate_shards",
    "write_shard",
    "mark_shards_done",
    "done_shards",
    "shard_written",
    "record_ingest",
    "ingest_history",
    "read_meta",
    "shard_positions",
    "read_flux",
    "read_shard",
    "READ_ENGINES",
    "resolve_read_engine",
    "set_rejected",
    "store_info",
    "format_store_info",
]

STORE_SCHEMA_VERSION = 1
DEFAULT_SHARD_ROWS = 4096
DEFAULT_CHUNK_ROWS = 256


class RowStatus(enum.IntEnum):
    """``meta/status`` values."""

    EMPTY = 0  #: padding at the end of a shard (no input behind it)
    OK = 1  #: a spectrum ready for prediction
    REJECTED = 2  #: an input that will go to the rejects table (see reject_reason)


#: store-level metadata columns added after the reader's columns (name -> dtype code).
STORE_META = {
    "norm": "f8",  # 1e-17 erg/s/cm²/Å: the spender normalisation that flux was divided by
    "status": "u1",
    "reject_reason": "U",
    "reject_detail": "U",
    "source_path": "U",  # the input path as given to ingest (for resume)
    "snr_median": "f4",  # median per-pixel S/N = |flux|·sqrt(ivar) over good pixels
    "coverage": "f4",  # fraction of grid pixels the spectrum covers
}


def _fill_value(code: str):
    if code == "U":
        return ""
    if code.startswith("f"):
        return np.nan
    if code.startswith("u"):
        return 0
    return -1


def _zarr_dtype(code: str):
    return str if code == "U" else np.dtype(code)


@dataclass(frozen=True)
class SurveyLayout:
    """What a survey group holds: grid, sharding and metadata columns (stored in its attrs)."""

    survey: str
    grid: Grid
    meta_columns: dict
    shard_rows: int = DEFAULT_SHARD_ROWS
    chunk_rows: int = DEFAULT_CHUNK_ROWS

    def __post_init__(self):
        if self.shard_rows < 1 or self.chunk_rows < 1:
            raise StoreError(f"shard_rows ({self.shard_rows}) and chunk_rows ({self.chunk_rows}) must be at least 1")
        if self.shard_rows % self.chunk_rows:
            raise StoreError(f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")

    def to_attrs(self) -> dict:
        return {
            "catalogpred_survey": {
                "schema_version": STORE_SCHEMA_VERSION,
                "survey": self.survey,
                "grid": self.grid.to_dict(),
                "shard_rows": self.shard_rows,
                "chunk_rows": self.chunk_rows,
                "meta_columns": self.meta_columns,
                "units": {
                    "wave": "Angstrom (vacuum, observed frame)",
                    "flux": "F_lambda / norm (dimensionless)",
                    "ivar": "inverse variance of flux / norm",
                    "norm": "1e-17 erg / (s cm2 Angstrom)",
                    "ra": "deg",
                    "dec": "deg",
                },
            }
        }

    @classmethod
    def from_attrs(cls, attrs: dict, where: str) -> "SurveyLayout":
        try:
            a = attrs["catalogpred_survey"]
        except KeyError:
            raise StoreError(f"{where} is not a catalogpred survey group (no 'catalogpred_survey' attribute)") from None
        if a.get("schema_version") != STORE_SCHEMA_VERSION:
            raise StoreError(f"{where}: store schema {a.get('schema_version')} is not {STORE_SCHEMA_VERSION}; re-ingest")
        return cls(survey=a["survey"], grid=Grid.from_dict(a["grid"]), meta_columns=dict(a["meta_columns"]),
                   shard_rows=int(a["shard_rows"]), chunk_rows=int(a["chunk_rows"]))


def _compressor():
    from zarr.codecs import BloscCodec, BloscShuffle

    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle)


def _root(store_path, mode):
    import zarr

    if mode != "r":
        check_store_target(store_path)
    try:
        root = zarr.open_group(str(store_path), mode=mode)
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError
            if hasattr(zarr.errors, "GroupNotFoundError") else FileNotFoundError) as exc:
        if os.path.exists(store_path):
            raise StoreError(f"{store_path} exists and is not a Zarr store (no zarr.json in it); give the store "
                             "that `catalogpred ingest` made") from exc
        import socket

        raise StoreError(f"no Zarr store at {store_path} (seen from host {socket.gethostname()}); create one with "
                         f"`catalogpred ingest … --store {store_path}`, or, on a cluster, put it on a filesystem that "
                         "the client and every Dask worker mount at the same path") from exc
    return root


def check_store_target(store_path) -> None:
    """Whether ingest may write a store at ``store_path``: a new path, an empty directory or a catalogpred store.
    Raises :class:`StoreError` for a file, a directory holding something else, or a Zarr store that
    catalogpred did not make (ingest would write its groups among someone else's files)."""
    import json

    p = Path(store_path)
    if not p.exists():
        return
    if not p.is_dir():
        raise StoreError(f"{store_path} exists and is a file, not a catalogpred store; give --store a new path "
                         "(a directory is created) or an existing store")
    if not any(p.iterdir()):
        return
    try:
        attrs = json.loads((p / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        attrs = None
    if attrs is None or "catalogpred_store" not in attrs:
        raise StoreError(f"{store_path} exists and is not a catalogpred store ("
                         + ("no zarr.json in it" if attrs is None else "a Zarr store that catalogpred did not make")
                         + "); give --store a new path or an existing catalogpred store")


def create_survey(store_path: str | os.PathLike, layout: SurveyLayout):
    """Create (or open, if it exists with the same layout) the group of ``layout.survey``."""
    root = _root(store_path, "a")
    if "catalogpred_store" not in root.attrs:
        root.attrs["catalogpred_store"] = {"schema_version": STORE_SCHEMA_VERSION}
    if layout.survey in root:
        existing = open_survey(store_path, layout.survey)[1]
        if existing.grid != layout.grid or existing.shard_rows != layout.shard_rows:
            raise StoreError(
                f"{store_path}/{layout.survey} exists with grid {existing.grid.name} and shard_rows "
                f"{existing.shard_rows}; use those or another store"
            )
        return root[layout.survey]
    attrs = layout.to_attrs()
    attrs["catalogpred_survey"]["uid"] = uuid.uuid4().hex  # tells a re-created group from the one a catalog used
    g = root.create_group(layout.survey, attributes=attrs)
    n_pix = layout.grid.n_pix
    g.create_array("wave", shape=(n_pix,), dtype="f8", chunks=(n_pix,), compressors=None)[:] = layout.grid.wave
    shape, chunks, shards = (0, n_pix), (layout.chunk_rows, n_pix), (layout.shard_rows, n_pix)
    for name, dtype in (("flux", "f4"), ("ivar", "f4"), ("mask", "u1")):
        g.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=0,
                       compressors=_compressor())
    g.create_array("shard_done", shape=(0,), chunks=(1024,), dtype="u1", fill_value=0)
    meta = g.create_group("meta")
    for name, code in {**layout.meta_columns, **STORE_META}.items():
        # one chunk per shard and column: a predict task reads its shard's metadata in one read per column
        meta.create_array(name, shape=(0,), chunks=(layout.shard_rows,),
                          dtype=_zarr_dtype(code), fill_value=_fill_value(code), compressors=_compressor()
                          if code != "U" else "auto")
    return g


def group_uid(store_path, survey: str) -> str | None:
    """The random id a survey group got when it was created (None for groups written before ids existed)."""
    g, _ = open_survey(store_path, survey)
    return dict(g.attrs.get("catalogpred_survey", {})).get("uid")


def stored_inputs(store_path) -> dict[str, tuple[str, bool]]:
    """The input files ingested into a store: path -> (survey group holding its rows, whether its only row is an
    unreadable-file reject, source_id ``file:<name>``). Empty for a path that is not a directory yet."""
    import pyarrow.compute as pc

    if not os.path.isdir(store_path):
        return {}
    out: dict[str, tuple[str, bool]] = {}
    for group in list_surveys(store_path):
        if not len(done_shards(store_path, group)):
            continue
        meta = read_meta(store_path, group, ["source_path", "source_id"])
        whole = set(meta.filter(pc.starts_with(meta.column("source_id"), "file:")).column("source_path").to_pylist())
        out.update((p, (group, p in whole)) for p in meta.column("source_path").unique().to_pylist())
    return out


def list_surveys(store_path) -> list[str]:
    """Names of the survey groups in a store (none in an empty directory: ingest creates the store there)."""
    if os.path.isdir(store_path) and not any(os.scandir(store_path)):
        return []
    root = _root(store_path, "r")
    return sorted(name for name, node in root.groups() if "catalogpred_survey" in node.attrs)


def open_survey(store_path, survey: str):
    """Open a survey group read-only: returns ``(group, SurveyLayout)``."""
    root = _root(store_path, "r")
    if survey not in root:
        raise StoreError(f"{store_path} has no survey group {survey!r} (has: {', '.join(list_surveys(store_path)) or 'none'})")
    g = root[survey]
    return g, SurveyLayout.from_attrs(dict(g.attrs), f"{store_path}/{survey}")


def n_shards(group) -> int:
    return group["shard_done"].shape[0]


def allocate_shards(store_path, survey: str, n_new: int) -> list[int]:
    """``n_new`` shards for an ingest run's tasks: first the shards an earlier, interrupted run allocated but never
    finished (their rows are invisible: :func:`read_meta` reads finished shards only, and a task writes its shard
    whole, padding included), then new ones, growing every row array. Client-side only.

    One ingest at a time per store: a second ingest running into the same store at once would be given the
    shards the first is filling, which is why ingest holds the store's lock (:mod:`catalogpred.runlock`)."""
    import zarr

    g = zarr.open_group(str(store_path), mode="r+")[survey]
    layout = SurveyLayout.from_attrs(dict(g.attrs), f"{store_path}/{survey}")
    done = g["shard_done"][:]
    reuse = np.flatnonzero(done == 0)[:n_new].tolist()
    first = done.shape[0]
    total = first + n_new - len(reuse)
    if total > first:
        rows = total * layout.shard_rows
        for name in ("flux", "ivar", "mask"):
            g[name].resize((rows, layout.grid.n_pix))
        for name in g["meta"].array_keys():
            g["meta"][name].resize((rows,))
        g["shard_done"].resize((total,))
    return [int(s) for s in reuse] + list(range(first, total))


def write_shard(store_path, survey: str, shard: int, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray,
                meta: dict) -> None:
    """Write one whole shard (rows beyond ``len(flux)`` are padding with status EMPTY).

    Parameters
    ----------
    flux, ivar : float32 [n, n_pix]
        Normalised flux and its inverse variance, n ≤ shard_rows.
    mask : uint8 [n, n_pix]
    meta : dict[str, ndarray [n]]
        Every column of the layout plus :data:`STORE_META`.
    """
    import zarr

    g = zarr.open_group(str(store_path), mode="r+")[survey]
    layout = SurveyLayout.from_attrs(dict(g.attrs), f"{store_path}/{survey}")
    S, n = layout.shard_rows, flux.shape[0]
    if n > S:
        raise StoreError(f"shard {shard} got {n} rows, more than shard_rows={S}")
    lo, hi = shard * S, (shard + 1) * S
    if hi > g["flux"].shape[0]:
        raise StoreError(f"shard {shard} was not allocated in {store_path}/{survey}")

    def padded(a, fill):
        if n == S:
            return a
        out = np.full((S,) + a.shape[1:], fill, dtype=a.dtype)
        out[:n] = a
        return out

    columns = {**layout.meta_columns, **STORE_META}
    missing = set(columns) - set(meta)
    if missing:
        raise StoreError(f"write_shard: meta lacks {sorted(missing)}")
    arrays = {"flux": padded(flux.astype(np.float32, copy=False), 0),
              "ivar": padded(ivar.astype(np.float32, copy=False), 0),
              "mask": padded(mask.astype(np.uint8, copy=False), 0)}
    for name, code in columns.items():
        values = np.asarray(meta[name])
        if code == "U":
            out = np.full(S, "", dtype=object)
            out[:n] = values.astype(str)
            arrays[f"meta/{name}"] = out.astype(np.dtypes.StringDType())
        else:
            arrays[f"meta/{name}"] = padded(values.astype(code), _fill_value(code))
    # a shard is written whole: skip zarr's per-chunk "all fill value?" scan (padding chunks then take a few bytes)
    _on_arrays(store_path, survey, "r+", list(arrays),
               lambda name, arr: arr.with_config({"write_empty_chunks": True}).setitem(
                   _rows(lo, hi, arrays[name].ndim), arrays[name]))


def mark_shards_done(store_path, survey: str, shards: list[int]) -> None:
    """Record finished shards (client-side, after their tasks succeeded)."""
    import zarr

    if not shards:
        return
    arr = zarr.open_group(str(store_path), mode="r+")[survey]["shard_done"]
    done = arr[:]
    done[np.asarray(shards, dtype=np.int64)] = 1
    arr[:] = done


def record_ingest(store_path, survey: str, entry: dict) -> None:
    """Append an ingest run (inputs, selection, redshift source, counts) to the survey group's history."""
    import zarr

    g = zarr.open_group(str(store_path), mode="r+")[survey]
    runs = list(g.attrs.get("catalogpred_ingest_runs", []))
    runs.append(entry)
    g.attrs["catalogpred_ingest_runs"] = runs


def ingest_history(store_path, survey: str) -> list[dict]:
    """The ingest runs recorded by :func:`record_ingest`."""
    g, _ = open_survey(store_path, survey)
    return list(g.attrs.get("catalogpred_ingest_runs", []))


def done_shards(store_path, survey: str) -> np.ndarray:
    """Indices of shards whose ingest finished."""
    g, _ = open_survey(store_path, survey)
    return np.flatnonzero(g["shard_done"][:])


def shard_written(store_path, survey: str, shard: int) -> bool:
    """Whether shard ``shard``'s ``meta/status`` chunk file is there as this process sees the store. Every ingest
    task writes it (a shard holds at least one input row, OK or REJECTED, and zarr skips only chunks that are all
    fill value, EMPTY), so the client can tell a finished task whose worker wrote somewhere it cannot see."""
    path = os.path.join(os.fspath(store_path), survey, "meta", "status")
    return os.path.exists(os.path.join(path, *_chunk_key_encoder(path)((shard,)).split("/")))


@functools.lru_cache(maxsize=16)
def _chunk_key_encoder(array_path: str):
    """zarr's chunk-key encoding of the array at ``array_path`` (chunk coordinates -> ``"c/3"``)."""
    import zarr

    return zarr.open_array(array_path, mode="r").metadata.encode_chunk_key


def _rows(lo: int, hi: int, ndim: int) -> tuple:
    return (slice(lo, hi),) + (slice(None),) * (ndim - 1)


def _on_arrays(store_path, survey: str, mode: str, names: list[str], op) -> dict:
    """``{name: await op(name, array)}`` for arrays ``names`` of a survey group (``"flux"``, ``"meta/ra"``, …),
    run concurrently in one trip to zarr's event loop.

    Opening an array and reading or writing it are each a synchronous round trip otherwise (~1 ms
    apiece, ~60 per shard of metadata), and concurrent writes overlap their compression.
    """
    import zarr.api.asynchronous as za
    from zarr.core.sync import sync

    async def run_all():
        group = await za.open_group(str(store_path), mode=mode)

        async def one(name):
            return await op(name, await group.getitem(f"{survey}/{name}"))

        return await asyncio.gather(*(one(n) for n in names))

    return dict(zip(names, sync(run_all())))


def _read_arrays(store_path, survey: str, names: list[str], lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows ``lo:hi`` of several arrays of a survey group, read concurrently (:func:`_on_arrays`)."""
    return _on_arrays(store_path, survey, "r", names, lambda name, arr: arr.getitem(_rows(lo, hi, len(arr.shape))))


@functools.lru_cache(maxsize=1)
def _arrow_reads_numpy_strings() -> bool:
    """Whether this pyarrow builds a string array straight from numpy's ``StringDType`` (pyarrow 26 does,
    25 does not); else strings go through Python objects (4.9 against 1.1 ms for a shard's 11 columns)."""
    try:
        return pa.array(np.array(["a"], dtype=np.dtypes.StringDType()), type=pa.string()).to_pylist() == ["a"]
    except (TypeError, ValueError, pa.ArrowException):
        return False


def _meta_table(data: dict, names: list[str], keep: np.ndarray, rows: np.ndarray) -> pa.Table:
    cols = {"row": rows[keep]}
    for name in names:
        v = data[f"meta/{name}"][keep]
        if v.dtype.kind == "T":
            cols[name] = pa.array(v if _arrow_reads_numpy_strings() else v.astype(object), type=pa.string())
        elif v.dtype.kind == "O":  # strings read by _StringChunks
            cols[name] = pa.array(v, type=pa.string())
        else:
            cols[name] = pa.array(v)
    return pa.table(cols)


def read_meta(store_path, survey: str, columns: list[str] | None = None, shard: int | None = None,
              include_empty: bool = False) -> pa.Table:
    """Per-row metadata as an Arrow table with a ``row`` column (global store row).

    Only rows of finished shards, and (unless ``include_empty``) not EMPTY padding.
    """
    g, layout = open_survey(store_path, survey)
    S = layout.shard_rows
    done = g["shard_done"][:]
    if shard is not None:
        lo, hi = shard * S, (shard + 1) * S
        shard_ok = np.zeros(S, bool) | bool(done[shard])
    else:
        lo, hi = 0, len(done) * S
        shard_ok = np.repeat(done.astype(bool), S)
    names = columns or list({**layout.meta_columns, **STORE_META})
    need = list(dict.fromkeys([*names, "status"]))
    data = _read_arrays(store_path, survey, [f"meta/{n}" for n in need], lo, hi)
    keep = shard_ok & ((data["meta/status"] != RowStatus.EMPTY) | include_empty)
    return _meta_table(data, names, keep, np.arange(lo, hi, dtype=np.int64))


def shard_positions(store_path, survey: str, shards, rows_per_read: int = 1 << 20):
    """``(shard, ra, dec)`` for each shard of ``shards``, in increasing order: float64 [n] deg (ICRS) of its OK rows
    (those a predict block can write to the catalog). Reads about ``rows_per_read`` rows of the three columns at a
    time, so any store fits in memory."""
    _, layout = open_survey(store_path, survey)
    S = layout.shard_rows
    shards = np.unique(np.asarray(list(shards), dtype=np.int64))
    per = max(1, rows_per_read // S)
    for i in range(0, len(shards), per):
        batch = shards[i:i + per]
        lo = int(batch[0]) * S
        data = _read_arrays(store_path, survey, ["meta/ra", "meta/dec", "meta/status"], lo, (int(batch[-1]) + 1) * S)
        for shard in batch:
            rows = slice(int(shard) * S - lo, (int(shard) + 1) * S - lo)
            ok = data["meta/status"][rows] == RowStatus.OK
            yield int(shard), np.asarray(data["meta/ra"][rows][ok], np.float64), \
                np.asarray(data["meta/dec"][rows][ok], np.float64)


#: per process, ``(abspath, survey, engine) -> (stamp, layout, meta names, arrays)``: the open arrays that
#: :func:`read_shard` reads, so a predict task does not re-open ~27 arrays (read and parse their zarr.json)
#: per shard. Measured: a 4,096-row SDSS shard read 1.76x faster on an H100 machine's CPU (64,901 against
#: 36,808 spectra/s, bench_gpu) and 1.2-1.6x on 2 cores (80-98 against 101-130 ms), with the time it holds
#: the GIL (which the blocks sharing a GPU worker compete for) down from 66 to 51 ms (py-spy --gil, 2 cores).
_SHARD_ARRAYS: dict = {}

#: how :func:`read_shard` reads a shard (TensorStore cannot read Zarr's variable-length ``string`` type).
#:
#: - ``"tensorstore"``: Google's TensorStore (C++) reads and decodes the numeric arrays (flux, status, ra, …)
#:   in its own threads, without the GIL. zarr-python's sharded read spends about half its time in Python
#:   (asyncio tasks, buffers, copies) holding the GIL, which the blocks sharing one GPU worker queue for.
#:   The string columns' chunk files are read and decoded in the calling thread (:class:`_StringChunks`).
#: - ``"zarr"``: zarr-python only.
#: - ``"auto"`` (default): tensorstore when it imports and the store is a local directory, else zarr.
READ_ENGINES = ("auto", "tensorstore", "zarr")


def _group_stamp(store_path, survey: str) -> tuple[bytes, bytes]:
    """The survey group's and its flux array's ``zarr.json``: they change when the group is recreated, its
    attributes are rewritten (every ingest run) or its arrays are resized (new shards), and then the open
    arrays of :data:`_SHARD_ARRAYS` are stale. Compared by content (a few kB), not by timestamp."""
    base = os.path.join(str(store_path), survey)
    with open(os.path.join(base, "zarr.json"), "rb") as g, open(os.path.join(base, "flux", "zarr.json"), "rb") as f:
        return g.read(), f.read()


def resolve_read_engine(engine: str, store_path) -> str:
    """``"tensorstore"`` or ``"zarr"``: what :func:`read_shard` with ``engine`` (:data:`READ_ENGINES`) uses here."""
    if engine not in READ_ENGINES:
        raise ValueError(f"read engine must be one of {READ_ENGINES}, not {engine!r}")
    if engine != "auto":
        return engine
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return "zarr"
    return "tensorstore" if os.path.isdir(str(store_path)) else "zarr"


@functools.lru_cache(maxsize=1)
def _ts_context():
    """One TensorStore context per process: no chunk cache (a predict task reads each shard once)."""
    import tensorstore as ts

    return ts.Context({"cache_pool": {"total_bytes_limit": 0}})


def _ts_open(path: str):
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}, "recheck_cached_metadata": "open",
            "recheck_cached_data": False}
    return ts.open(spec, read=True, context=_ts_context())


def _shard_arrays(store_path, survey: str, engine: str = "auto"):
    """``(layout, meta column names, {name: array})`` for :func:`read_shard`, opened once per process and
    store state (:func:`_group_stamp`). An array is a zarr ``AsyncArray`` or, for numeric arrays with the
    ``"tensorstore"`` engine, a ``tensorstore.TensorStore``."""
    import zarr.api.asynchronous as za
    from zarr.core.sync import sync

    engine = resolve_read_engine(engine, store_path)
    key = (os.path.abspath(str(store_path)), survey, engine)
    try:
        stamp = _group_stamp(store_path, survey)
    except FileNotFoundError:
        stamp = None  # open_survey below says what is missing
    hit = _SHARD_ARRAYS.get(key)
    if hit is not None and stamp is not None and hit[0] == stamp:
        return hit[1:]
    _, layout = open_survey(store_path, survey)
    names = list({**layout.meta_columns, **STORE_META})
    paths = ["flux", "shard_done", *(f"meta/{n}" for n in names)]

    async def open_all():
        group = await za.open_group(str(store_path), mode="r")
        return dict(zip(paths, await asyncio.gather(*(group.getitem(f"{survey}/{p}") for p in paths))))

    arrays = sync(open_all())
    if engine == "tensorstore":
        numeric = [p for p in paths if arrays[p].dtype.kind in "biuf"]
        try:
            opened = [_ts_open(os.path.join(str(store_path), survey, p)) for p in numeric]
            arrays.update({p: f.result() for p, f in zip(numeric, opened)})
        except Exception as e:  # tensorstore raises ValueError with its own status text
            raise StoreError(f"TensorStore cannot read {store_path}/{survey} ({e}); predict --read-engine zarr "
                             "reads it with zarr-python") from e
        for p in paths:
            chunks = _StringChunks.of(arrays[p], os.path.join(str(store_path), survey, p), layout.shard_rows)
            if chunks is not None:
                arrays[p] = chunks
    _SHARD_ARRAYS[key] = (stamp, layout, names, arrays)
    return layout, names, arrays


def _is_tensorstore(array) -> bool:
    return type(array).__module__.startswith("tensorstore")


@dataclass(frozen=True)
class _StringChunks:
    """A string column of a local store whose chunk is one shard, read chunk by chunk without zarr-python's
    event loop: the chunk file's bytes, decoded with the codecs zarr-python itself decodes them with (numcodecs'
    ``Zstd`` and ``VLenUTF8``), in the calling thread.

    zarr-python reads a shard's 11 SDSS string columns in 16 ms one after the other (12 ms concurrently), mostly
    in hand-offs between the reading thread, its event loop and its codec threads, each of which waits for the
    interpreter lock that the other blocks of a GPU worker hold; this reads them in 4.0 ms (2 cores, the same
    values: ``tests/test_store.py``). A shard read beside a thread running Python went from 263-320 to 146-167 ms,
    and the emulated host side of a GPU worker with two block threads from 60,854-61,991 to 70,085-72,571
    spectra/s (``bench/GPU_RESULTS.md``). Only for the codecs zarr writes a ``str`` array with by default
    (``vlen-utf8``, optionally then ``zstd``) and one chunk per shard; any other string array stays zarr-python's.
    """

    path: str  #: the array's directory
    encode_key: object  #: zarr's chunk-key encoding: chunk coordinates -> key ("c/3")
    zstd: bool  #: vlen-utf8 then zstd (zarr's default), or vlen-utf8 alone
    fill_value: str  #: what a chunk never written holds (zarr writes no chunk that is all fill value)
    rows: int  #: rows per chunk (= per shard)

    @classmethod
    def of(cls, array, path: str, shard_rows: int):
        """A reader for a zarr ``AsyncArray`` that qualifies (see the class), else ``None``."""
        from zarr.codecs import ZstdCodec
        from zarr.codecs.vlen_utf8 import VLenUTF8Codec
        from zarr.core.chunk_grids import RegularChunkGrid

        md = getattr(array, "metadata", None)
        codecs = tuple(type(c) for c in getattr(md, "codecs", ()))
        if (getattr(md, "zarr_format", None) != 3 or codecs not in ((VLenUTF8Codec,), (VLenUTF8Codec, ZstdCodec))
                or not isinstance(md.chunk_grid, RegularChunkGrid) or md.chunk_grid.chunk_shape != (shard_rows,)
                or not os.path.isdir(path)):
            return None
        return cls(path, md.encode_chunk_key, len(codecs) == 2, str(md.fill_value), shard_rows)

    def read(self, chunk: int) -> np.ndarray:
        """object [rows]: the strings of one chunk."""
        from numcodecs import Zstd
        from numcodecs.vlen import VLenUTF8

        try:
            with open(os.path.join(self.path, *self.encode_key((chunk,)).split("/")), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return np.full(self.rows, self.fill_value, dtype=object)
        values = VLenUTF8().decode(Zstd().decode(raw) if self.zstd else raw)
        if values.shape != (self.rows,):
            raise StoreError(f"{self.path}: chunk {chunk} holds {values.shape[0]} strings, not {self.rows}")
        return values


def read_shard(store_path, survey: str, shard: int, *, engine: str = "auto") -> tuple[pa.Table, np.ndarray]:
    """One finished shard for prediction: its metadata (every column, non-EMPTY rows, as :func:`read_meta`)
    and the normalised flux float32 [n_OK, n_pix] of its ``OK`` rows, in table order.

    Arrays are opened once per process (:func:`_shard_arrays`). ``engine`` (:data:`READ_ENGINES`) says what
    reads the shard: TensorStore's reads of the numeric arrays start first and decode in its own threads while
    the string columns are read (:class:`_StringChunks`); both engines return the same values.
    """
    from zarr.core.sync import sync

    layout, names, arrays = _shard_arrays(store_path, survey, engine)
    S, have = layout.shard_rows, arrays["shard_done"].shape[0]
    if not 0 <= shard < have:
        raise StoreError(f"{store_path}/{survey} has no shard {shard} (it has {have})")
    lo, hi = shard * S, (shard + 1) * S

    def where(p):
        return slice(shard, shard + 1) if p == "shard_done" else _rows(lo, hi, len(arrays[p].shape))

    pending = {p: a[where(p)].read() for p, a in arrays.items() if _is_tensorstore(a)}
    strings = [p for p, a in arrays.items() if isinstance(a, _StringChunks)]
    by_zarr = [p for p in arrays if p not in pending and p not in strings]

    async def read_all():
        return await asyncio.gather(*(arrays[p].getitem(where(p)) for p in by_zarr))

    data = dict(zip(by_zarr, sync(read_all()))) if by_zarr else {}
    data.update({p: arrays[p].read(shard) for p in strings})
    data.update({p: f.result() for p, f in pending.items()})
    if not data["shard_done"][0]:
        raise StoreError(f"shard {shard} of {store_path}/{survey} is not finished")
    status = data["meta/status"]
    meta = _meta_table(data, names, status != RowStatus.EMPTY, np.arange(lo, hi, dtype=np.int64))
    ok_rows = np.flatnonzero(status == RowStatus.OK)
    flux = data["flux"]
    return meta, (flux if len(ok_rows) == S else flux[ok_rows])


def read_flux(store_path, survey: str, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), n_pix]: normalised flux of the given global rows (one contiguous read)."""
    g, _ = open_survey(store_path, survey)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return np.zeros((0, g["flux"].shape[1]), np.float32)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return g["flux"][lo:hi][rows - lo]


def set_rejected(store_path, survey: str, rows: np.ndarray, reason: str, details: list[str]) -> None:
    """Mark rows REJECTED after ingest (used for duplicate ids). Client-side only: one write per array."""
    import zarr

    meta = zarr.open_group(str(store_path), mode="r+")[survey]["meta"]
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return
    meta["status"].vindex[rows] = np.full(rows.size, RowStatus.REJECTED, np.uint8)
    meta["reject_reason"].vindex[rows] = np.array([reason] * rows.size, dtype=np.dtypes.StringDType())
    meta["reject_detail"].vindex[rows] = np.array(list(details), dtype=np.dtypes.StringDType())


def store_info(store_path) -> dict:
    """What a store holds, per survey group: grid, sharding, finished shards, rows by status, rejects by
    reason, ingest runs and bytes on disk (``catalogpred info STORE``). Reads the ``status`` and
    ``reject_reason`` columns of every row of the finished shards."""
    import pyarrow.compute as pc

    out = {"path": str(store_path), "kind": "store", "surveys": {}}
    for name in list_surveys(store_path):
        g, layout = open_survey(store_path, name)
        done = g["shard_done"][:].astype(bool)
        meta = read_meta(store_path, name, ["status", "reject_reason"])  # rows of finished shards, not padding
        status = meta.column("status").to_numpy()
        rejected = status == RowStatus.REJECTED
        reasons = pc.value_counts(meta.column("reject_reason").filter(pa.array(rejected))).to_pylist()
        base = os.path.join(str(store_path), name)
        runs = ingest_history(store_path, name)
        out["surveys"][name] = {
            "grid": layout.grid.name, "n_pix": layout.grid.n_pix,
            "wave_angstrom": [float(layout.grid.wave[0]), float(layout.grid.wave[-1])],
            "shard_rows": layout.shard_rows, "shards": int(done.size), "shards_done": int(done.sum()),
            "rows_ok": int((status == RowStatus.OK).sum()), "rows_rejected": int(rejected.sum()),
            "rejects_by_reason": dict(sorted((r["values"], r["counts"]) for r in reasons)),
            "ingest_runs": len(runs), "last_ingest": runs[-1].get("finished") if runs else None,
            "bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(base) for f in files),
        }
    return out


def format_store_info(info: dict) -> str:
    """The text report of :func:`store_info`."""
    out = [f"store     {info['path']}"]
    for name, s in info["surveys"].items():
        unfinished = s["shards"] - s["shards_done"]
        out += [f"  {name:<8}  {s['rows_ok']:,d} spectra ready, {s['rows_rejected']:,d} rejected at ingest; "
                f"{s['shards_done']:,d} shards of {s['shard_rows']:,d} rows"
                + (f" ({unfinished:,d} more left empty by an interrupted ingest: harmless, the next ingest of "
                   "new files fills them)" if unfinished else ""),
                f"            grid {s['grid']} ({s['n_pix']} px, {s['wave_angstrom'][0]:.1f}-{s['wave_angstrom'][1]:.1f} "
                f"Angstrom); {s['bytes'] / 1e9:.2f} GB on disk; {s['ingest_runs']} ingest run(s), last "
                f"{s['last_ingest'] or '?'}"]
        if s["rejects_by_reason"]:
            out.append("            rejects: " + ", ".join(f"{k} {v:,d}" for k, v in s["rejects_by_reason"].items()))
    if not info["surveys"]:
        out.append("  (no survey groups: nothing ingested yet)")
    return "\n".join(out)

