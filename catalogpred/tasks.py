"""Worker functions: one call = one shard of ingest or one block of predict.

They take paths and scalars, do their I/O through :mod:`.store` and :mod:`.catalog`,
and return a small summary dict. No Dask here: :mod:`.pipeline` schedules them,
and tests can call them directly. Each is idempotent: re-running a shard or block
rewrites the same files (atomic renames), so retries never duplicate rows.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import catalog as cat
from . import store
from .cluster import worker_address
from .errors import InputFileError, RejectReason
from .spectra import IVAR_FLOOR, PixelMask, check_positions, check_spectra
from .surveys import ReadOptions, SpectrumBlock, get_reader, identify_survey, read_spectra

__all__ = ["detect_survey", "ingest_shard", "predict_block", "read_block", "infer_block", "write_block", "encode_rows",
           "block_key"]

log = logging.getLogger(__name__)


def detect_survey(path: str) -> tuple[str, str | None, int, str | None]:
    """``(path, survey or None, n_spectra, reject or None)`` for one input file.

    ``survey`` is ``"aux:<name>"`` for redshift-only files; ``reject`` is ``"reason\tdetail"``. Raises only the
    machine's errors (:func:`~catalogpred.errors.is_transient`), which Dask retries.
    """
    try:
        name, n = identify_survey(path, with_count=True)
        return path, name, n, None
    except InputFileError as exc:
        return path, None, 1, f"{exc.reason.value}\t{exc}"


def _empty_block(survey: str, path: str, n_meta: dict, row: int = -1) -> SpectrumBlock:
    reader = get_reader(survey)
    n_pix = reader.grid.n_pix
    meta = {}
    for name, code in n_meta.items():
        if code == "U":
            meta[name] = np.array([""], dtype=object)
        elif code.startswith("f"):
            meta[name] = np.array([np.nan], dtype=code)
        else:
            meta[name] = np.array([-1], dtype=code)
    meta["source_id"] = np.array([f"file:{os.path.basename(path)}"], dtype=object)
    meta["survey"] = np.array([survey], dtype=object)
    meta["source_file"] = np.array([os.path.basename(path)], dtype=object)
    meta["row_in_file"] = np.array([row], np.int32)
    return SpectrumBlock(survey=survey, grid=reader.grid, flux=np.zeros((1, n_pix), np.float32),
                         ivar=np.zeros((1, n_pix), np.float32),
                         mask=np.full((1, n_pix), int(PixelMask.NO_COVERAGE), np.uint8), meta=meta)


#: rows per check_spectra call in ingest_shard: [128, n_pix] float32 arrays stay in the CPU cache
_CHECK_ROWS = 128
#: glibc trim threshold (MiB or None) last set in this process by :func:`_keep_freed_memory`
_malloc_trim: object = "as started"
#: freed memory a worker keeps mapped, per stage (MiB; None = the process's own trim threshold, which
#: Dask's nanny sets to 64 KiB). An ingest shard's footprint is up to ~1 GB (DESI). A GPU predict block's
#: host footprint is its flux and zarr's shard buffer (~0.1-0.3 GB). CPU predict keeps the process's trim
#: threshold: keeping a batch of activations mapped too (conv1's output alone is 128 MB at batch 64) raised
#: a worker's peak RSS from 0.88-0.93 GB to 1.12-1.57 GB (bench_pipeline, measured); and it trims after
#: every encoder batch (:func:`_trim_freed_memory`).
TRIM_MIB = {"ingest": 1024, "predict-cuda": 256, "predict-cpu": None}  # predict-<device>
#: arrays up to this size come from the heap in every stage (glibc's M_MMAP_THRESHOLD)
HEAP_ARRAYS_MIB = 256


def _keep_freed_memory(trim_mib: int | None) -> None:
    """Let glibc reuse freed memory in this (worker) process instead of returning it to the OS.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's mmap
    threshold at 128 KiB: every array is then a fresh mapping, unmapped when freed, and the next one of the
    same size page-faults its way back in. Here arrays up to :data:`HEAP_ARRAYS_MIB` come from the heap,
    and up to ``trim_mib`` of freed memory stays mapped (:data:`TRIM_MIB`; ``None``: the trim threshold
    the process started with, ``MALLOC_TRIM_THRESHOLD_`` or glibc's 128 KiB). Measured on 2 cores:
    - ingest spent 2.2x the CPU time without it (DESI coadds);
    - a 4,096-row SDSS shard read in a LocalCluster worker took 102-121 ms instead of 140-196 ms (medians,
      three runs);
    - CPU predict (heap arrays, the process's trim threshold) ran end to end at 65.6-66.7 spectra/s in two
      runs against 53.0-60.7/s in three without it, with peak RSS per worker 0.89-1.06 GB against
      0.89-0.94 GB (and once a 1.57 GB transient) without (bench_pipeline, 2 workers); the bare encoder on one thread ran 1.15-1.42x faster with
      it (two runs).
    Cheap per task: ``mallopt`` only when the value changes. No-op where there is no glibc ``mallopt``.
    """
    global _malloc_trim
    if trim_mib == _malloc_trim:
        return
    _malloc_trim = trim_mib
    trim = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", 128 * 1024)) if trim_mib is None else trim_mib * 2**20
    mmap = HEAP_ARRAYS_MIB * 2**20
    libc = _glibc()
    if libc is not None:  # else not glibc (macOS, musl): nothing to tune
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc malloc.h
        libc.mallopt(m_mmap_threshold, mmap)
        libc.mallopt(m_trim_threshold, trim)


@functools.lru_cache(maxsize=1)
def _glibc():
    """This process's C library if it has glibc's ``mallopt`` and ``malloc_trim``, else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _return_freed_memory() -> None:
    """Free what the last block left (a full garbage collection, then glibc ``malloc_trim(0)``, which gives the
    OS back the pages of freed memory in every malloc arena of this process).

    Called before each CPU prediction block. A block frees ~0.5 GB of arrays and activations (flux, conv
    outputs of 126 MB at batch 64); arrays that reference cycles kept alive until a later collection, and
    freed pages the arenas kept, made a worker's peak RSS creep up with the number of blocks it ran: 1.08 GB
    after its first 4,096-row block, 1.22 GB after its fifth. With this call: 1.11 GB after the first and
    after the fifth (bench_pipeline's synthetic store, 2 workers, 40,960 spectra, one run each, 2 cores).
    Not for GPU blocks, which keep freed host memory on purpose (:data:`TRIM_MIB`): re-touching it costs page
    faults that a CPU block (about a minute) does not notice. The trim is a no-op where there is no glibc.
    """
    import gc

    gc.collect()  # arrays held by reference cycles of the last block are freed now, not at some later block
    _trim_freed_memory()


def _trim_freed_memory() -> None:
    """glibc ``malloc_trim(0)``: give the OS back the freed pages of every malloc arena of this process.

    Called after every encoder batch of a CPU block (:func:`infer_block`). A batch of 64 SDSS spectra
    allocates and frees 256 MB of activations (two 128 MB conv outputs at a time). Arrays up to
    :data:`HEAP_ARRAYS_MIB` come from the heap, and without a trim part of what a batch freed stayed mapped
    until the next block: a worker's RSS between batches then stepped up by 40-200 MB at random batches, so
    its peak varied from block to block (946-1,115 MB over 8 blocks of 4,096 rows, two worker-like
    processes) and the peak over a run grew with the number of blocks it ran. With the trim: 906-909 MB in
    every block after the first, and the same seconds per block (71.9-74.7 s against 70.5-77.0 s; 2 cores,
    one torch thread per process). A batch's own 256 MB is paged in afresh either way: RSS rose by 256 MB
    in every batch of both runs. No-op where there is no glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _row_chunks(parts: list, size: int):
    """Split ``(block, lo, hi)`` row ranges into consecutive chunks of ``size`` rows (lists of ranges)."""
    cur, n = [], 0
    for blk, lo, hi in parts:
        a = lo
        while a < hi:
            e = min(hi, a + size - n)
            cur.append((blk, a, e))
            n += e - a
            a = e
            if n == size:
                yield cur
                cur, n = [], 0
    if cur:
        yield cur


def _nanmedian_rows(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, axis=1)`` (same values) by one vectorised sort instead of a per-row loop; a: float [n, m]."""
    n, m = a.shape
    if m == 0:
        return np.full(n, np.nan, a.dtype)
    count = m - np.isnan(a).sum(axis=1)
    s = np.sort(a, axis=1)  # NaN sort last
    rows = np.arange(n)
    lo = s[rows, np.maximum((count - 1) // 2, 0)]
    hi = s[rows, np.minimum(count // 2, m - 1)]
    med = np.where(count % 2 == 1, lo, np.mean(np.stack([lo, hi]), axis=0))
    return np.where(count > 0, med, np.nan).astype(a.dtype, copy=False)


def ingest_shard(store_path: str, survey: str, shard: int, pieces: list, file_rejects: dict[str, str] | None = None,
                 options: ReadOptions | None = None, readers: dict[str, str] | None = None) -> dict:
    """Read ``pieces`` of files of ``survey``, normalise, and write store shard ``shard``.

    ``pieces`` are paths or ``(path, lo, hi)``: spectra ``lo..hi-1`` of a file (large
    multi-object files are split across shards). ``file_rejects`` maps paths already
    known to be bad (from detection) to ``"reason\\tdetail"``; they get a REJECTED row
    like files that fail here. ``options`` (redshift table, selection) go to the reader.
    ``readers`` maps paths to the reader to use where it is not the one named ``survey``
    (a store group can take several formats, e.g. SDSS spec and spPlate files).
    Returns ``{"shard", "n_rows", "n_ok", "reasons": {reason: count}, "seconds", "lengths"}``, ``lengths``
    mapping each file read to its number of spectra. An error of the machine rather than the file
    (:func:`~catalogpred.errors.is_transient`) is raised, for Dask to retry the task.
    """
    t0 = time.perf_counter()
    _keep_freed_memory(TRIM_MIB["ingest"])
    _, layout = store.open_survey(store_path, survey)
    file_rejects = dict(file_rejects or {})
    parts, reasons, details, src_paths = [], [], [], []  # parts: (block, lo, hi): rows lo..hi-1 of a block
    lengths: dict[str, int] = {}
    for piece in pieces:
        path, lo, hi = (piece, 0, None) if isinstance(piece, str) else piece
        if path in file_rejects:
            reason, detail = file_rejects[path].split("\t", 1)
            blk = _empty_block(survey, path, layout.meta_columns, lo if hi is not None else -1)
            parts.append((blk, 0, 1)), reasons.append(reason), details.append(detail), src_paths.append(path)
            continue
        try:
            blk = read_spectra(path, readers.get(path, survey) if readers else survey, options)
        except InputFileError as exc:
            if hi is not None and lo > 0:  # a later piece of a file split across shards: the piece that starts at
                continue  # spectrum 0 holds the file's one reject row (the same file fails the same way there)
            blk = _empty_block(survey, path, layout.meta_columns, lo if hi is not None else -1)
            reasons.append(exc.reason.value), details.append(str(exc))
            lo, hi = 0, 1
        else:
            lengths[path] = len(blk)
            lo, hi = (0, len(blk)) if hi is None else (lo, max(lo, min(hi, len(blk))))
            reasons.extend([r or None for r in blk.reject_reason[lo:hi]]), details.extend(list(blk.reject_detail[lo:hi]))
        parts.append((blk, lo, hi))
        src_paths.extend([path] * (hi - lo))
    if not parts:
        return {"shard": shard, "n_rows": 0, "n_ok": 0, "reasons": {}, "seconds": 0.0, "lengths": lengths,
                "worker": worker_address()}
    grid = parts[0][0].grid
    if any(blk.grid != grid for blk, _, _ in parts):
        raise ValueError(f"shard {shard} of {survey}: spectra on different grids")
    # normalise in row chunks that stay in cache (every step is row-wise: the same values as one big call)
    n = len(src_paths)
    flux_n = np.empty((n, grid.n_pix), np.float32)
    ivar_n = np.empty((n, grid.n_pix), np.float32)
    mask = np.empty((n, grid.n_pix), np.uint8)
    norm = np.empty(n, np.float64)
    snr_median = np.empty(n, np.float32)
    coverage = np.empty(n, np.float32)
    check_reasons, check_details = [], []
    row = 0
    for segs in _row_chunks(parts, _CHECK_ROWS):
        if len(segs) == 1:
            blk, a, e = segs[0]
            f_in, iv_in, m_in, z_in = blk.flux[a:e], blk.ivar[a:e], blk.mask[a:e], blk.meta["z"][a:e]
        else:  # e.g. one-spectrum files: gather a chunk's rows
            f_in, iv_in, m_in = (np.concatenate([getattr(b, k)[a:e] for b, a, e in segs]) for k in ("flux", "ivar", "mask"))
            z_in = np.concatenate([np.asarray(b.meta["z"][a:e], np.float64) for b, a, e in segs])
        out = slice(row, row + len(f_in))
        row += len(f_in)
        f, iv, m, nm, rs, ds = check_spectra(f_in, iv_in, m_in, grid.wave, z_in)
        flux_n[out], ivar_n[out], mask[out], norm[out] = f, iv, m, nm
        check_reasons += rs
        check_details += ds
        good = (m == 0) & (iv > IVAR_FLOOR)  # = pixel_weights(iv, m) > 0
        snr = np.where(good, f * np.sqrt(np.maximum(iv, 0)), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows are rejects already
            snr_median[out] = _nanmedian_rows(snr)
        coverage[out] = ((m & PixelMask.NO_COVERAGE) == 0).mean(axis=1)
    status = np.full(n, store.RowStatus.OK, np.uint8)
    reason_col = np.array([""] * n, dtype=object)
    detail_col = np.array([""] * n, dtype=object)
    for i in range(n):
        r, d = (reasons[i], details[i]) if reasons[i] else (
            (check_reasons[i].value, check_details[i]) if check_reasons[i] else (None, ""))
        if r:
            status[i], reason_col[i], detail_col[i] = store.RowStatus.REJECTED, r, d
    meta = {name: np.concatenate([blk.meta[name][lo:hi] for blk, lo, hi in parts]) for name in layout.meta_columns}
    meta["ra"], placed = check_positions(meta["ra"], meta["dec"])
    for i in np.flatnonzero(~placed & (status == store.RowStatus.OK)):
        status[i], reason_col[i] = store.RowStatus.REJECTED, RejectReason.BAD_POSITION.value
        detail_col[i] = f"RA = {float(meta['ra'][i])}, Dec = {float(meta['dec'][i])} deg: not a position on the sky"
    meta.update(norm=norm, status=status, reject_reason=reason_col, reject_detail=detail_col,
                source_path=np.array(src_paths, dtype=object), snr_median=snr_median, coverage=coverage)
    store.write_shard(store_path, survey, shard, flux_n, ivar_n, mask, meta)
    counts = Counter(r for r in reason_col if r)
    dt = time.perf_counter() - t0
    log.info("stage=ingest survey=%s shard=%d pieces=%d rows=%d ok=%d s=%.2f", survey, shard, len(pieces), n,
             int((status == store.RowStatus.OK).sum()), dt)
    return {"shard": shard, "n_rows": n, "n_ok": int((status == store.RowStatus.OK).sum()),
            "reasons": dict(counts), "seconds": dt, "lengths": lengths, "worker": worker_address()}


def block_key(survey: str, shard: int) -> str:
    """Name of a prediction block (and of its part files): ``<survey>-<shard:06d>``."""
    return f"{survey}-{shard:06d}"


_TORCH_THREADS: list[int] = []


@functools.lru_cache(maxsize=8)
def _schema(columns: tuple) -> pa.Schema:
    """Catalog schema with the VO-Parquet description, so every part file carries its units."""
    return cat.catalog_schema(list(columns), {"IVOA.VOTable-Parquet.version": "1.0",
                                              "IVOA.VOTable-Parquet.content": cat.vo_table_xml(list(columns))})


@functools.lru_cache(maxsize=4)
def model_runtime(device: str) -> dict:
    """What runs a block's model in this process, for the run manifest (``model_runtime``): the versions of the
    packages whose arithmetic the predictions come from, torch's build included (``2.13.0+cpu``,
    ``2.13.0+cu130``), and the device, ``"cpu: <model name>"`` or ``"cuda: <GPU name>"`` (bf16 results differ
    in their rounding from one device to another). Often not the client's: GPU workers run a CUDA build of torch."""
    import platform

    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "device": f"{dev.type}: {name}"}


def _set_torch_threads(n: int | None) -> None:
    import torch

    if n and _TORCH_THREADS != [n]:
        torch.set_num_threads(n)
        _TORCH_THREADS[:] = [n]


def predict_block(store_path: str, survey: str, shard: int, bundle_path: str, catalog_path: str, order: int,
                  schema_columns: list, *, precision: str = "fp32", batch_size: int = 256, device: str = "cpu",
                  torch_threads: int | None = None, compile: bool = False, read_engine: str = "auto",
                  part_format: str = "parquet") -> dict:
    """Predict one store shard and write its catalog part files, rejects and done marker, in one task:
    :func:`read_block`, :func:`infer_block` and :func:`write_block` in this process.

    ``precision``, ``batch_size``, ``compile``: as in :func:`~catalogpred.model.bundle.infer`;
    ``read_engine``: as in :func:`~catalogpred.store.read_shard`; ``part_format``: as in :func:`write_block`.

    Returns ``{"block", "n_rows", "n_rejects", "pixels": {pixel: rows}, "seconds", "seconds_model",
    "seconds_read", "seconds_write", "read_engine", "write_threads", "part_format", "worker", "runtime"}``: wall
    time of the task, of encoder + head (``infer``), of the Zarr reads (metadata and flux) and of the writes (part
    files, rejects, done marker), the engine that read the shard, the threads that wrote its part files and their
    format, the worker, and what ran the model (:func:`model_runtime`, also in the done marker).
    """
    t0 = time.perf_counter()
    block = read_block(store_path, survey, shard, device=device, engine=read_engine)
    pred = infer_block(block, bundle_path, precision=precision, batch_size=batch_size, device=device,
                       torch_threads=torch_threads, compile=compile)
    return write_block(pred, catalog_path, order, schema_columns, started=t0,
                       write_threads=cat.default_write_threads(cpu_worker=device.startswith("cpu")),
                       part_format=part_format)


def read_block(store_path: str, survey: str, shard: int, *, device: str = "cpu", engine: str = "auto") -> dict:
    """Stage 1 of a prediction block: ``{"block", "meta", "flux", "seconds_read", "read_engine"}`` of one
    finished shard (:func:`~catalogpred.store.read_shard` with ``engine``: metadata of its non-EMPTY rows as
    an Arrow table, flux float32 [n_OK, n_pix] of its OK rows). ``device`` is where the block will be
    predicted (it sets how much freed memory this process keeps, :data:`TRIM_MIB`)."""
    if device.startswith("cpu"):
        _return_freed_memory()  # not counted as reading
    t0 = time.perf_counter()
    _keep_freed_memory(TRIM_MIB[f"predict-{device.split(':')[0]}"])
    engine = store.resolve_read_engine(engine, store_path)
    meta, flux = store.read_shard(store_path, survey, shard, engine=engine)  # flux of the OK rows, in table order
    return {"block": block_key(survey, shard), "meta": meta, "flux": flux, "seconds_read": time.perf_counter() - t0,
            "read_engine": engine}


def infer_block(block: dict, bundle_path: str, *, precision: str = "fp32", batch_size: int = 256,
                device: str = "cpu", torch_threads: int | None = None, compile: bool = False) -> dict:
    """Stage 2: encoder and head on a :func:`read_block` result. Returns it without ``flux`` and with
    ``latents`` float32 [n_OK, S], ``mean``/``sigma`` float32 [n_OK, 4] Vega mag (None without a head),
    ``ood`` float32 [n_OK] (or None), ``model_id``, ``ood_threshold``, ``seconds_model`` and ``runtime``
    (:func:`model_runtime`; None when the block has no spectrum to predict)."""
    from .model.bundle import cached_model, infer

    _keep_freed_memory(TRIM_MIB[f"predict-{device.split(':')[0]}"])
    _set_torch_threads(torch_threads)
    out = {k: v for k, v in block.items() if k != "flux"}
    meta, flux = block["meta"], block["flux"]
    ok = meta.column("status").to_numpy() == store.RowStatus.OK
    out.update(latents=None, mean=None, sigma=None, ood=None, model_id=None, ood_threshold=None, seconds_model=0.0,
               runtime=None)
    if ok.any():
        model = cached_model(bundle_path, device)
        good = meta.filter(pa.array(ok))
        tm = time.perf_counter()
        out["latents"], out["mean"], out["sigma"], out["ood"] = infer(
            model, flux, good.column("z").to_numpy(), good.column("norm").to_numpy(), batch_size=batch_size,
            precision=precision, with_ood=True, compile=compile,
            after_batch=_trim_freed_memory if device.startswith("cpu") else None)
        out["seconds_model"] = time.perf_counter() - tm
        out["model_id"] = model.info.model_id
        out["ood_threshold"] = model.info.ood["threshold"] if model.info.ood else None
        out["runtime"] = model_runtime(device)
    return out


def write_block(pred: dict, catalog_path: str, order: int, schema_columns: list, *, started: float | None = None,
                write_threads: int | None = None, part_format: str = "parquet") -> dict:
    """Stage 3: flags, the catalog table, its part files, the rejects and the done marker of an
    :func:`infer_block` result. Returns the block summary (see :func:`predict_block`); ``seconds`` is
    from ``started`` (this process's ``perf_counter``) or, across processes, the sum of the stages.
    ``write_threads``, ``part_format``: as in :func:`~catalogpred.catalog.write_fragment` (default threads: a GPU
    or I/O worker's, :func:`~catalogpred.catalog.default_write_threads`; ``arrow`` where the leaves are merged after
    the last block). The done marker records the format."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    t0 = time.perf_counter()
    key, meta = pred["block"], pred["meta"]
    ok = meta.column("status").to_numpy() == store.RowStatus.OK
    rejected = meta.filter(pa.array(~ok))
    rej = {
        "source_id": rejected.column("source_id"), "survey": rejected.column("survey"),
        "source_file": rejected.column("source_file"), "source_path": rejected.column("source_path"),
        "row_in_file": rejected.column("row_in_file"), "store_row": rejected.column("row"),
        "stage": pa.array(["ingest"] * rejected.num_rows, pa.string()),
        "reason": rejected.column("reject_reason"), "detail": rejected.column("reject_detail"),
    }
    rejects = [pa.table(rej)]
    pixels: dict[int, int] = {}
    t_write = 0.0
    n_rows = 0
    write_threads = write_threads or cat.default_write_threads()
    if ok.any():
        good = meta.filter(pa.array(ok))
        latents, mean, sigma, ood = pred["latents"], pred["mean"], pred["sigma"], pred["ood"]
        n = good.num_rows
        flags = np.zeros(n, np.int32)
        quality = pc.is_in(good.column("survey"), value_set=pa.array(cat.ZWARNING_SURVEYS)).to_numpy(
            zero_copy_only=False)
        flags |= np.where((good.column("zwarning").to_numpy() != 0) & quality, int(cat.CatalogFlag.ZWARNING),
                          0).astype(np.int32)
        snr = good.column("snr_median").to_numpy()
        flags |= np.where(~(snr >= 2), int(cat.CatalogFlag.LOW_SN), 0).astype(np.int32)
        flags |= np.where(good.column("coverage").to_numpy() < 0.8, int(cat.CatalogFlag.PARTIAL_COVERAGE), 0).astype(np.int32)
        finite = np.isfinite(latents).all(1)
        # rows of a store ingested before positions were checked there (check_positions)
        ra, placed = check_positions(good.column("ra").to_numpy(), good.column("dec").to_numpy())
        if ood is not None:
            flags |= np.where(ood > pred["ood_threshold"], int(cat.CatalogFlag.OUT_OF_DISTRIBUTION), 0).astype(np.int32)
        if mean is None:
            flags |= int(cat.CatalogFlag.NO_PREDICTION)
        else:
            finite &= np.isfinite(mean).all(1) & np.isfinite(sigma).all(1)
        for bad_rows, reason, detail in ((~placed, RejectReason.BAD_POSITION, "RA/Dec not finite or |Dec| > 90"),
                                         (placed & ~finite, RejectReason.NONFINITE_PREDICTION, "model output is NaN/inf")):
            if bad_rows.any():
                bad = good.filter(pa.array(bad_rows))
                rejects.append(pa.table({
                    "source_id": bad.column("source_id"), "survey": bad.column("survey"),
                    "source_file": bad.column("source_file"), "source_path": bad.column("source_path"),
                    "row_in_file": bad.column("row_in_file"), "store_row": bad.column("row"),
                    "stage": pa.array(["predict"] * bad.num_rows, pa.string()),
                    "reason": pa.array([reason.value] * bad.num_rows, pa.string()),
                    "detail": pa.array([detail] * bad.num_rows, pa.string())}))
        sel = np.flatnonzero(finite & placed)
        g = good.take(pa.array(sel))
        cols = {}
        for c in schema_columns:
            name = c.name
            if name in g.column_names:
                cols[name] = g.column(name).cast(c.type)
            elif name.endswith("_mag") or name.endswith("_mag_err"):
                j = ("w1", "w2", "w3", "w4").index(name[:2])
                src = mean if name.endswith("_mag") else sigma
                cols[name] = pa.array(src[sel, j] if src is not None else np.full(len(sel), np.nan, np.float32),
                                      pa.float32(), mask=None if src is not None else np.ones(len(sel), bool))
            elif name == "latent":
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(latents[sel].ravel(), pa.float32()),
                                                               latents.shape[1])
            elif name == "flags":
                cols[name] = pa.array(flags[sel], pa.int32())
            elif name == "ood_score":
                cols[name] = (pa.array(ood[sel], pa.float32()) if ood is not None else pa.nulls(len(sel), pa.float32()))
            elif name == "model_id":
                cols[name] = pa.array([pred["model_id"]] * len(sel), pa.string())
            else:
                cols[name] = pa.nulls(len(sel), c.type)
        cols["ra"] = pa.array(ra[sel], pa.float64())
        cols["_healpix_29"] = pa.array(compute_spatial_index(ra[sel], g.column("dec").to_numpy()).astype(np.int64))
        schema = _schema(tuple(schema_columns))
        table = pa.Table.from_pydict(cols, schema=schema)
        tw = time.perf_counter()
        pixels = cat.write_fragment(catalog_path, table, order, key, write_threads=write_threads,
                                    part_format=part_format)
        t_write = time.perf_counter() - tw
        n_rows = table.num_rows
    rejects_table = pa.concat_tables([t.cast(cat.REJECTS_SCHEMA) for t in rejects])
    marker = {"block": key, "n_rows": n_rows, "n_rejects": rejects_table.num_rows,
              "pixels": {str(k): v for k, v in pixels.items()}, "part_format": part_format,
              "runtime": pred.get("runtime")}
    tw = time.perf_counter()
    cat.write_block_done(catalog_path, key, marker, rejects_table)
    t_write += time.perf_counter() - tw
    now = time.perf_counter()
    dt = now - started if started is not None else pred["seconds_read"] + pred["seconds_model"] + (now - t0)
    summary = {**marker, "seconds": dt, "seconds_model": pred["seconds_model"], "seconds_read": pred["seconds_read"],
               "seconds_write": t_write, "read_engine": pred.get("read_engine"), "write_threads": write_threads,
               "worker": worker_address()}
    log.info("stage=predict block=%s rows=%d rejects=%d s=%.2f model_s=%.2f", key, n_rows, rejects_table.num_rows, dt,
             pred["seconds_model"])
    return summary


def merge_leaf(catalog_path: str, order: int, pixel: int, blocks: list[str], one_file: bool = True) -> dict:
    """One leaf's part files merged into one file after the last block (:func:`catalogpred.catalog.merge_leaf`):
    its summary, with ``seconds`` and ``worker``."""
    t0 = time.perf_counter()
    out = cat.merge_leaf(catalog_path, order, pixel, blocks, one_file=one_file)
    out.update(seconds=time.perf_counter() - t0, worker=worker_address())
    log.info("stage=merge leaf=%d files=%d rows=%s s=%.2f", pixel, out["merged"], out["rows"], out["seconds"])
    return out


def encode_rows(store_path: str, survey: str, rows, bundle_path: str, *, torch_threads: int | None = None,
                precision: str = "fp32") -> np.ndarray:
    """Latents float32 [len(rows), S] of store rows, with the bundle's encoder (e.g. to build head training sets)."""
    from .model.bundle import cached_model, encode

    _set_torch_threads(torch_threads)
    model = cached_model(bundle_path)
    return encode(model.encoder, store.read_flux(store_path, survey, np.asarray(rows)), precision=precision)
