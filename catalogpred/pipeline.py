"""Orchestration on Dask: plan the work, submit tasks with bounded concurrency, show progress, summarise.

- :func:`run_ingest`: input files → store shards (one task per shard), then duplicate-id check.
- :func:`run_predict`: store shards → catalog blocks (one task per shard), then finalize.

Both are resumable: ingest skips files already in finished shards; predict skips
blocks with a done marker. Tasks are the functions in :mod:`.tasks`. At most
``2 × workers`` tasks are in flight, so memory stays bounded for any store size.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from . import catalog as cat
from . import store
from .cluster import (BLOCKS_PER_GPU, IO_RESOURCE, TASKS_IN_FLIGHT_PER_WORKER, check_workers, default_torch_threads,
                      gpu_task_resources, resolve_compile, resolve_device, shared_path)
from .errors import CatalogError, ConfigError, RejectReason
from .surveys import column_docs, get_reader
from .tasks import block_key, detect_survey, infer_block, ingest_shard, predict_block, read_block, write_block

__all__ = ["expand_inputs", "run_ingest", "run_predict", "IngestSummary", "PredictSummary", "PipelineError"]

log = logging.getLogger(__name__)

FITS_PATTERNS = ("*.fits", "*.fits.gz", "*.fit", "*.fits.fz")


class PipelineError(CatalogError):
    """Some tasks failed on every retry; the run can be resumed."""


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files, directories (searched recursively for FITS files), globs and ``@filelist.txt`` → sorted absolute paths.

    Raises
    ------
    ConfigError
        If an input matches nothing.
    """
    out: list[str] = []
    for item in inputs:
        item = str(item)
        if item.startswith("@"):
            if not os.path.isfile(item[1:]):
                raise ConfigError(f"file list {item[1:]} does not exist (@FILE names a text file of paths, one per line)")
            lines = Path(item[1:]).read_text().splitlines()
            out += expand_inputs([ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])
        elif os.path.isdir(item):
            found = [p for pat in FITS_PATTERNS for p in glob.glob(os.path.join(item, "**", pat), recursive=True)]
            if not found:
                raise ConfigError(f"directory {item} holds no FITS files ({', '.join(FITS_PATTERNS)})")
            out += found
        elif os.path.exists(item):
            out.append(item)
        else:
            found = glob.glob(item, recursive=True)
            if not found:
                raise ConfigError(f"input {item!r} matches no file")
            out += found
    return sorted(dict.fromkeys(os.path.abspath(p) for p in out))


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="task", file=sys.stderr, disable=(None if enabled is None else not enabled),
                dynamic_ncols=True)


def _n_workers(client, resources: dict | None = None) -> int:
    """Connected workers (those offering ``resources``, when given)."""
    workers = client.scheduler_info()["workers"].values()
    if not resources:
        return len(workers)
    return sum(all(w.get("resources", {}).get(k, 0) >= v for k, v in resources.items()) for w in workers)


def _run_bounded(client, fn, arg_list: list[tuple], kwargs: dict, *, desc: str, keys: list[str], progress,
                 on_done=None, max_in_flight: int | None = None, weights: list[int] | None = None, unit_total=None,
                 resources: dict | None = None, recount_s: float = 1.0, tasks_per_worker: int = 1,
                 submit=None, io_resources: dict | None = None):
    """Submit ``fn(*args, **kwargs)`` for every args tuple, at most ``max_in_flight`` at once.

    The default window is :data:`~.cluster.TASKS_IN_FLIGHT_PER_WORKER` × workers × ``tasks_per_worker``
    (tasks that run at once on one worker, e.g. blocks sharing a GPU), recounted (at
    most every ``recount_s``) as tasks finish, so workers that join later get work and lost ones
    stop counting. ``resources`` (e.g. ``{"GPU": 1}``) goes on every ``client.submit``. Only the
    futures in flight are held; a result is handed to ``on_done`` and kept (small dicts only).
    ``submit(key, args) -> Future`` replaces the one ``client.submit`` per item (e.g. a chain of tasks
    whose last one has ``key``); then ``io_resources`` workers count towards the window too.
    Returns ``(results by key, errors by key)``. Failed tasks (after retries) do not stop the others.
    """
    from distributed import as_completed

    results, errors = {}, {}
    pending = list(zip(keys, arg_list))[::-1]
    bar = _progress(len(arg_list), desc, progress)
    window = {"n": 0, "at": float("-inf")}
    in_flight = 0

    def limit() -> int:
        if max_in_flight:
            return max_in_flight
        now = time.monotonic()
        if now - window["at"] >= recount_s:
            slots = tasks_per_worker * max(1, _n_workers(client, resources))
            if io_resources:
                slots = max(slots, _n_workers(client, io_resources))
            window["n"] = TASKS_IN_FLIGHT_PER_WORKER * slots
            window["at"] = now
        return window["n"]

    def fill(ac):
        nonlocal in_flight
        n = limit()
        while pending and in_flight < n:
            key, args = pending.pop()
            ac.add(submit(key, args) if submit is not None
                   else client.submit(fn, *args, **kwargs, key=key, retries=2, pure=False, resources=resources))
            in_flight += 1

    ac = as_completed(loop=client.loop)  # not the default client's loop: a process may hold several clients
    fill(ac)
    for fut in ac:
        in_flight -= 1
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - a task failed on every retry: report, keep going
            errors[fut.key] = f"{type(exc).__name__}: {exc}"
            log.error("task %s failed: %s", fut.key, errors[fut.key])
        else:
            results[fut.key] = res
            if on_done is not None:
                on_done(fut.key, res)
        fut.release()
        bar.update(1)
        fill(ac)
    bar.close()
    return results, errors


# ----------------------------------------------------------------------------------------------- ingest


@dataclass
class IngestSummary:
    store: str
    files: int = 0
    auxiliary_files: int = 0
    skipped_files: int = 0
    rows: int = 0
    ok: int = 0
    shards: int = 0
    by_survey: dict = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    def table(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        lines = [f"ingest summary: {self.store}",
                 f"  input files      {self.files:>9,d}   (already in the store, skipped: {self.skipped_files:,d}; "
                 f"redshift-only files used: {self.auxiliary_files:,d})",
                 f"  spectra          {self.rows:>9,d}   ok {self.ok:,d}, rejected {self.rejected:,d}",
                 f"  shards written   {self.shards:>9,d}",
                 f"  time             {self.seconds:>9.1f} s ({rate:,.0f} spectra/s)"]
        for s, d in self.by_survey.items():
            lines.append(f"  survey {s:<9} {d['rows']:>9,d} spectra in {d['shards']} shards")
        if self.reasons:
            lines.append("  rejects by reason:")
            lines += [f"    {r:<22} {n:>6,d}" for r, n in sorted(self.reasons.items())]
        return "\n".join(lines)


def plan_pieces(files: list[tuple[str, int]], shard_rows: int) -> list[list[tuple[str, int, int]]]:
    """Pack ``(path, n_spectra)`` into shards of at most ``shard_rows`` spectra.

    Returns one list of ``(path, lo, hi)`` pieces per shard; a file larger than a shard is
    split across consecutive shards. Pure function (tested directly).
    """
    return plan_ranges([(path, 0, max(1, int(n))) for path, n in files], shard_rows)


def plan_ranges(ranges: list[tuple[str, int, int]], shard_rows: int) -> list[list[tuple[str, int, int]]]:
    """Pack row ranges ``(path, lo, hi)`` (spectra ``lo..hi-1`` of a file) into shards of at most ``shard_rows``
    spectra, splitting a range across consecutive shards where it does not fit. Pure function."""
    shards: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = shard_rows
    for path, lo, hi in ranges:
        while lo < hi:
            take = min(room, hi - lo)
            current.append((path, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], shard_rows
    if current:
        shards.append(current)
    return shards


def missing_ranges(n: int, have) -> list[tuple[int, int]]:
    """The runs ``(lo, hi)`` of spectra ``0..n-1`` of a file that are not among the row numbers ``have``."""
    missing = np.ones(max(int(n), 0), bool)
    have = np.asarray(have, np.int64)
    missing[have[(have >= 0) & (have < len(missing))]] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], missing.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


class _FileRows:
    """The store rows of each input file of a group: ``rows(path)`` (``row_in_file`` values, one per store row,
    sorted) and ``unreadable`` (files quarantined whole, source_id ``file:<name>``). From :func:`store.read_meta`
    columns ``source_path, row_in_file, source_id``."""

    def __init__(self, meta: pa.Table):
        import pyarrow.compute as pc

        paths = meta.column("source_path").combine_chunks().dictionary_encode()
        self._index = {p: i for i, p in enumerate(paths.dictionary.to_pylist())}
        codes = paths.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        rows = meta.column("row_in_file").to_numpy().astype(np.int64)
        order = np.lexsort((rows, codes))
        self._codes, self._rows = codes[order], rows[order]
        whole = pc.starts_with(meta.column("source_id"), "file:").to_numpy(zero_copy_only=False)
        self.unreadable = {paths.dictionary[int(c)].as_py() for c in np.unique(codes[whole])}

    def rows(self, path: str) -> np.ndarray:
        i = self._index.get(path)
        if i is None:
            return np.zeros(0, np.int64)
        lo, hi = np.searchsorted(self._codes, [i, i + 1])
        return self._rows[lo:hi]

    def problems(self, path: str, n: int) -> str:
        """What is wrong with the rows of a file of ``n`` spectra ("" if each spectrum is there once, or the file
        is one unreadable-file row)."""
        rows = self.rows(path)
        if path in self.unreadable:
            return "" if len(rows) == 1 else f"an unreadable-file reject and {len(rows) - 1} more rows"
        dup = np.unique(rows[1:][np.diff(rows) == 0])
        gaps = missing_ranges(n, rows)
        extra = rows[(rows < 0) | (rows >= n)]
        out = []
        if gaps:
            out.append("missing spectra " + ", ".join(f"{a}..{b - 1}" for a, b in gaps[:3]))
        if len(dup):
            out.append("spectra stored twice " + ", ".join(map(str, dup[:5].tolist())))
        if len(extra):
            out.append(f"{len(extra)} rows beyond the file's {n} spectra")
        return "; ".join(out)


def run_ingest(inputs: list[str], store_path: str, *, client, survey: str = "auto", shard_rows: int = 4096,
               chunk_rows: int = 256, progress: bool | None = None, options=None) -> IngestSummary:
    """Ingest survey files into the Zarr store at ``store_path`` (created if needed, resumed if partial).

    Parameters
    ----------
    inputs : list of str
        Files, directories, globs, ``@filelist.txt``.
    survey : str
        A reader name, or ``"auto"`` to identify every file by content. Redshift-only files
        (DESI ``redrock-*``, SDSS ``specObj``/``spAll``) are recognised either way and used by the
        readers, not ingested. Files go to their reader's store group (:attr:`Reader.group`), so
        SDSS ``spec-*`` and ``spPlate-*`` files land in one ``sdss`` group.
    shard_rows, chunk_rows : int
        Rows per shard (= per ingest task and per prediction block) and per compressed chunk.
    options : ReadOptions, optional
        External redshift table and target selection for multi-object surveys.
    """
    from .surveys import ReadOptions, Selection

    options = options or ReadOptions()
    t0 = time.perf_counter()
    store_path = shared_path(store_path)  # workers get absolute paths (their cwd differs)
    paths = expand_inputs(inputs)
    check_workers(client, paths[:1] + [store_path])
    summary = IngestSummary(store=str(store_path))
    file_rejects: dict[str, str] = {}
    try:
        detected = client.gather(client.map(detect_survey, paths, pure=False, batch_size=256, retries=2))
    except (OSError, MemoryError) as exc:  # the machine's errors (EIO, ...), raised after Dask's retries
        raise PipelineError(f"reading the inputs failed ({type(exc).__name__}: {exc}); nothing was ingested, "
                            "re-run the same command") from exc
    by_survey: dict[str, list[tuple[str, int]]] = {}  # store group -> files
    reader_of: dict[str, str] = {}  # path -> reader name, where it differs from its group's name
    group_reader: dict[str, str] = {}  # store group -> a reader writing to it (grid, columns)
    redshift_files = []
    for path, name, n, rej in detected:
        if name is not None and name.startswith("aux:"):
            summary.auxiliary_files += 1
            redshift_files.append(path)
            continue
        summary.files += 1
        if survey != "auto":
            name = survey
        elif name is None:
            file_rejects[path] = rej
            continue
        group = get_reader(name).group  # e.g. spPlate files ("sdss-plate") go to the "sdss" group
        by_survey.setdefault(group, []).append((path, n))
        group_reader.setdefault(group, name)
        if name != group:
            reader_of[path] = name
    if summary.files == 0:
        raise ConfigError(f"no spectra among the inputs: {summary.auxiliary_files} redshift-only file(s) "
                          "(redrock, specObj/spAll, ...); give the spectra files too")
    fits_named = [p for p in file_rejects if os.path.basename(p).lower().endswith((".fits", ".fit", ".fits.gz", ".fz"))]
    if not by_survey and not fits_named:  # no input is even named like FITS: say so rather than make a store of
        example = next(iter(file_rejects.values())).split("\t", 1)[-1]  # rejects (broken FITS files are rejects)
        raise ConfigError(f"none of the {summary.files} input file(s) is a spectra file of a known survey (SDSS spec/"
                          f"spPlate, DESI, PFS; e.g. {example}); nothing was ingested (`catalogpred ingest ... "
                          "--dry-run` says what each input is)")
    if redshift_files:  # the readers look among them as well as beside the spectra
        options = dataclasses.replace(options, redshift_files=tuple(redshift_files))
    if file_rejects:
        # undetectable files are quarantined in the main survey's group, so the accounting still holds; one
        # quarantined by an earlier ingest into this store stays in the group that holds its reject row
        home = max(by_survey, key=lambda s: len(by_survey[s])) if by_survey else "sdss"
        before = store.input_paths(store_path, whole_file_rejects=True) if os.path.isdir(store_path) else {}
        for p in file_rejects:
            by_survey.setdefault(before.get(p, home), []).append((p, 1))

    for name, files in sorted(by_survey.items()):
        reader = get_reader(group_reader.get(name, name))
        if os.path.exists(store_path) and name in store.list_surveys(store_path):
            _, layout = store.open_survey(store_path, name)  # an existing group keeps its own layout
            if (layout.shard_rows, layout.chunk_rows) != (shard_rows, chunk_rows):
                log.info("%s/%s exists: appending with its shard_rows=%d, chunk_rows=%d", store_path, name,
                         layout.shard_rows, layout.chunk_rows)
        else:
            layout = store.SurveyLayout(survey=name, grid=reader.grid, meta_columns=reader.meta_columns,
                                        shard_rows=shard_rows, chunk_rows=min(chunk_rows, shard_rows))
            store.create_survey(store_path, layout)
        pieces = plan_pieces(files, layout.shard_rows)
        if len(store.done_shards(store_path, name)):
            # resume: ingest exactly the spectra of each file that no finished shard holds (a file quarantined
            # whole, source_id "file:<name>", is done), whatever the shard boundaries were last time
            have = _FileRows(store.read_meta(store_path, name, columns=["source_path", "row_in_file", "source_id"]))
            ranges = [(p, lo, hi) for p, n in files if p not in have.unreadable
                      for lo, hi in missing_ranges(int(n), have.rows(p))]
            skipped = len({p for p, _ in files} - {p for p, _, _ in ranges})
            summary.skipped_files += skipped
            if skipped and (options.redshifts or options.selection != Selection()):
                log.warning("%d of these files are already in %s/%s and were skipped: their spectra keep the "
                            "redshifts and selection of their first ingest, not this run's --redshifts/--keep-*/"
                            "--spectypes; ingest them into a new store to apply those", skipped, store_path, name)
            n_all, n_todo = sum(int(n) for _, n in files), sum(hi - lo for _, lo, hi in ranges)
            log.info("resuming %s/%s: %d of the inputs' %d spectra already ingested", store_path, name,
                     n_all - n_todo, n_all)
            pieces = plan_ranges(ranges, layout.shard_rows)
        results, errors = {}, {}
        if pieces:
            shards = store.allocate_shards(store_path, name, len(pieces))
            keys = [f"ingest-{name}-{s:06d}-{os.urandom(4).hex()}" for s in shards]
            key_to_shard = dict(zip(keys, shards))
            args = [(str(store_path), name, s, b, {p: file_rejects[p] for p, _, _ in b if p in file_rejects}, options,
                     {p: reader_of[p] for p, _, _ in b if p in reader_of} or None)
                    for s, b in zip(shards, pieces)]
            finished: list[int] = []
            results, errors = _run_bounded(client, ingest_shard, args, {}, desc=f"ingest {name}", keys=keys,
                                           progress=progress, on_done=lambda k, r: finished.append(key_to_shard[k]))
            store.mark_shards_done(store_path, name, finished)
        # duplicates and the per-file row check run on every ingest, a resumed one included (a run stopped
        # after marking its shards done still gets them)
        meta = store.read_meta(store_path, name, columns=["source_id", "status", "source_path", "row_in_file"])
        n_dup = _reject_duplicates(store_path, name, meta)
        if errors:
            raise PipelineError(f"{len(errors)} ingest tasks failed (e.g. {next(iter(errors.values()))}); "
                                "re-run the same command to resume")
        lengths = {p: k for r in results.values() for p, k in r.get("lengths", {}).items()}
        _check_file_rows(store_path, name, _FileRows(meta), [(p, lengths.get(p, n)) for p, n in files])
        for r in results.values():
            summary.rows += r["n_rows"]
            summary.ok += r["n_ok"]
            summary.reasons.update(r["reasons"])
        summary.shards += len(results)
        if n_dup:
            summary.ok -= n_dup
            summary.reasons[RejectReason.DUPLICATE_ID.value] += n_dup
        if not pieces:
            continue
        d = summary.by_survey.setdefault(name, {"rows": 0, "shards": 0})
        d["rows"] += sum(r["n_rows"] for r in results.values())
        d["shards"] += len(results)
        reasons = Counter()
        for r in results.values():
            reasons.update(r["reasons"])
        store.record_ingest(store_path, name, {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "catalogpred": __version__,
            "files": len({p for b in pieces for p, _, _ in b}), "rows": d["rows"], "shards": len(results),
            "redshifts": options.redshifts, "selection": options.selection.to_manifest(),
            "rejects_by_reason": dict(reasons) | ({"duplicate_id": n_dup} if n_dup else {}),
        })
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_file_rows(store_path: str, survey: str, have: _FileRows, files: list[tuple[str, int]]) -> None:
    """Every spectrum of every input file is in the store once (or the file is one unreadable-file reject).

    ``files``: ``(path, n_spectra)``. Raises :class:`PipelineError` naming the files whose rows are missing or
    doubled: an ingest never ends with a spectrum lost or stored twice without saying so.
    """
    bad = [(p, msg) for p, n in files if (msg := have.problems(p, int(n)))]
    if bad:
        shown = "; ".join(f"{os.path.basename(p)}: {msg}" for p, msg in bad[:3])
        raise PipelineError(f"{store_path}/{survey}: {len(bad)} input files are not stored exactly once per spectrum "
                            f"({shown}). Missing spectra are ingested by re-running the same command; spectra stored "
                            "twice need a new store")


def _reject_duplicates(store_path: str, survey: str, meta=None) -> int:
    """Mark later occurrences of an already ingested source_id as REJECTED (duplicate_id); returns the count.
    ``meta``: :func:`store.read_meta` with ``source_id, status, source_path`` (read when not given)."""
    if meta is None:
        meta = store.read_meta(store_path, survey, columns=["source_id", "status", "source_path"])
    ok = meta.column("status").to_numpy() == store.RowStatus.OK
    ids = np.asarray(meta.column("source_id").to_pylist(), dtype=object)[ok]
    rows = meta.column("row").to_numpy()[ok]
    paths = np.asarray(meta.column("source_path").to_pylist(), dtype=object)[ok]
    if len(ids) == 0:
        return 0
    _, first_idx, inverse = np.unique(ids.astype(str), return_index=True, return_inverse=True)
    dup = np.flatnonzero(first_idx[inverse] != np.arange(len(ids)))
    if len(dup):
        details = [f"{ids[i]} already ingested from {os.path.basename(str(paths[first_idx[inverse[i]]]))}" for i in dup]
        store.set_rejected(store_path, survey, rows[dup], RejectReason.DUPLICATE_ID.value, details)
        log.warning("%d duplicate source_id values in %s/%s rejected (first occurrence kept)", len(dup), store_path, survey)
    return int(len(dup))


# ----------------------------------------------------------------------------------------------- predict


@dataclass
class PredictSummary:
    catalog: str
    model_id: str
    blocks: int = 0
    blocks_skipped: int = 0
    rows: int = 0
    rejects: int = 0
    inputs: int = 0
    reasons: dict = field(default_factory=dict)
    seconds: float = 0.0
    seconds_model: float = 0.0  #: task-seconds inside encoder + head
    seconds_read: float = 0.0  #: task-seconds reading the store (metadata + flux)
    seconds_write: float = 0.0  #: task-seconds writing Parquet (part files, rejects, done markers)
    seconds_finalize: float = 0.0  #: wall seconds of finalize_catalog after the blocks (metadata, checks)
    order: int = 0
    blocks_failed: int = 0  #: blocks that failed on every retry: their spectra are predict_error rejects
    settings: dict = field(default_factory=dict)  #: device, precision, batch size, compile, ...

    def table(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        lines = [f"predict summary: {self.catalog}",
                 f"  model            {self.model_id}",
                 f"  blocks           {self.blocks:>9,d}   (already done, skipped: {self.blocks_skipped:,d}"
                 + (f"; FAILED on every retry: {self.blocks_failed:,d}, see rejects)" if self.blocks_failed else ")"),
                 f"  input spectra    {self.inputs:>9,d}",
                 f"  catalog rows     {self.rows:>9,d}",
                 f"  rejects          {self.rejects:>9,d}",
                 f"  HEALPix order    {self.order:>9d}",
                 *([f"  settings         {' '.join(f'{k}={v}' for k, v in self.settings.items())}"] if self.settings else []),
                 f"  time             {self.seconds:>9.1f} s ({rate:,.0f} rows/s; finalize {self.seconds_finalize:.2f} s)",
                 f"  task time        read {self.seconds_read:.1f} s, model {self.seconds_model:.1f} s, "
                 f"write {self.seconds_write:.1f} s (summed over tasks)"]
        if self.reasons:
            lines.append("  rejects by reason:")
            lines += [f"    {r:<22} {n:>6,d}" for r, n in sorted(self.reasons.items())]
        return "\n".join(lines)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"catalogpred": __version__, "python": sys.version.split()[0]}
    for pkg in ("numpy", "torch", "dask", "distributed", "zarr", "tensorstore", "pyarrow", "astropy", "hats",
                "fitsio"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


#: spectra per forward pass when none is given. On CPUs a batch's activations dominate a worker's
#: memory (batch × 128 channels × n_pix × 4 B per tensor, about three alive: 0.5 GB each at 256 SDSS
#: spectra) and a smaller batch is no slower; GPUs want large batches.
DEFAULT_BATCH = {"cpu": 64, "cuda": 2048}


def _check_resumable(catalog_path: str, plan: dict, model_ids: list, store_path: str, groups: dict,
                     column_names: list) -> None:
    """Refuse to resume a catalog that another run's blocks would not match: other models, another store (or the
    same path re-created: each survey group has a random id), other catalog columns (e.g. more surveys)."""
    hint = "; pass --overwrite to start over, or write to another catalog path"
    if plan.get("model_ids") != model_ids:
        raise CatalogError(f"{catalog_path} was made with models {plan.get('model_ids')}, not {model_ids}{hint}")
    if plan.get("store", store_path) != store_path:
        raise CatalogError(f"{catalog_path} was made from the store {plan['store']}, not {store_path}{hint}")
    old = plan.get("store_groups", {})
    changed = [s for s in groups if s in old and old[s] and groups[s] and old[s] != groups[s]]
    if changed:
        raise CatalogError(f"{catalog_path}: the store's {', '.join(changed)} group was re-created since this catalog "
                           f"was started (another ingest into {store_path}){hint}")
    if "columns" in plan and plan["columns"] != column_names:
        more = sorted(set(column_names) - set(plan["columns"]))
        less = sorted(set(plan["columns"]) - set(column_names))
        raise CatalogError(f"{catalog_path} has other columns than this run's surveys give (new: {more or 'none'}, "
                           f"gone: {less or 'none'}){hint}")


def _reject_failed_block(store_path: str, survey: str, shard: int, catalog_path: str, error: str) -> int:
    """Close a block whose task failed on every retry (client side); returns its rejects count.

    Its OK rows become ``predict_error`` rejects with ``error`` as detail (ingest rejects keep their
    reason), part files it may have left are removed, and its done marker records the error, so the
    accounting holds and a re-run of ``predict`` tries the block again.
    """
    import pyarrow as pa

    key = block_key(survey, shard)
    for part in Path(catalog_path, cat.DATASET_DIR).glob(f"Norder=*/Dir=*/Npix=*/part-{key}.parquet"):
        part.unlink()
    meta = store.read_meta(store_path, survey, shard=shard, columns=[
        "source_id", "survey", "source_file", "source_path", "row_in_file", "status", "reject_reason", "reject_detail"])
    ok = meta.column("status").to_numpy() == store.RowStatus.OK
    detail = error if len(error) <= 2000 else error[:2000] + " …"
    rejects = pa.table({
        "source_id": meta.column("source_id"), "survey": meta.column("survey"),
        "source_file": meta.column("source_file"), "source_path": meta.column("source_path"),
        "row_in_file": meta.column("row_in_file"), "store_row": meta.column("row"),
        "stage": pa.array(np.where(ok, "predict", "ingest").tolist(), pa.string()),
        "reason": pa.array(np.where(ok, RejectReason.PREDICT_ERROR.value,
                                    np.asarray(meta.column("reject_reason").to_pylist(), dtype=object)).tolist(), pa.string()),
        "detail": pa.array(np.where(ok, detail, np.asarray(meta.column("reject_detail").to_pylist(), dtype=object)).tolist(),
                           pa.string()),
    })
    cat.write_block_done(catalog_path, key, {"block": key, "n_rows": 0, "n_rejects": rejects.num_rows, "pixels": {},
                                             "seconds": 0.0, "seconds_model": 0.0, "error": detail}, rejects)
    return rejects.num_rows


@dataclass
class PredictPlan:
    """What :func:`run_predict` will do, read from the store and the bundles' ``bundle.json`` (no cluster):
    ``catalogpred predict --dry-run`` prints it, and the CLI makes it before starting workers so that a
    wrong path or a missing bundle fails at once."""

    store_path: str  #: absolute (workers' working directories differ)
    bundle_paths: list  #: absolute
    infos: dict  #: grid name -> (bundle path, BundleInfo)
    grids: dict  #: store group to predict -> its grid name
    blocks: list  #: (survey, shard) of every finished shard
    inputs: int  #: non-EMPTY rows of finished shards (catalog rows + rejects at the end)
    columns: list  #: catalog columns (:func:`catalogpred.catalog.catalog_columns`)

    @property
    def surveys(self) -> list:
        return list(self.grids)

    @property
    def survey_bundle(self) -> dict:
        """survey -> bundle path"""
        return {s: self.infos[g][0] for s, g in self.grids.items()}

    @property
    def survey_model(self) -> dict:
        """survey -> model_id"""
        return {s: self.infos[g][1].model_id for s, g in self.grids.items()}

    @property
    def model_ids(self) -> list:
        return sorted(i.model_id for _, i in self.infos.values())

    @property
    def model(self):
        """BundleInfo of the first survey's bundle (the run manifest's ``model``)"""
        return self.infos[next(iter(self.grids.values()))][1]

    def summary(self) -> dict:
        return {"store": self.store_path, "models": {g: i.model_id for g, (_, i) in self.infos.items()},
                "surveys": {s: {"model": m, "blocks": sum(b[0] == s for b in self.blocks)}
                            for s, m in self.survey_model.items()},
                "blocks": len(self.blocks), "input_spectra": self.inputs}


def plan_predict(store_path: str, bundle_path, surveys: list[str] | None = None) -> PredictPlan:
    """Check that the bundles cover the store's surveys (one bundle per grid, one latent size) and list the
    blocks: :class:`PredictPlan`. Raises ConfigError with what to do instead."""
    from .model.bundle import read_bundle_info

    # workers get absolute paths (their cwd differs); URLs are refused until store/catalog use fsspec
    bundle_paths = [bundle_path] if isinstance(bundle_path, (str, os.PathLike)) else list(bundle_path)
    store_path = shared_path(store_path)
    bundle_paths = [shared_path(b) for b in bundle_paths]
    infos = {}
    for bp in bundle_paths:
        binfo = read_bundle_info(bp)
        if binfo.grid.name in infos:
            raise ConfigError(f"two bundles for the {binfo.grid.name} grid: {infos[binfo.grid.name][0]} and {bp}")
        infos[binfo.grid.name] = (bp, binfo)
    n_latent = {i.n_latent for _, i in infos.values()}
    if len(n_latent) > 1:
        raise ConfigError(f"bundles have different latent sizes {sorted(n_latent)}; one catalog needs one size")
    all_surveys = store.list_surveys(store_path)
    if not all_surveys:
        raise ConfigError(f"{store_path} holds no ingested survey; run `catalogpred ingest` first")
    chosen = list(surveys) if surveys else all_surveys
    unknown = [s for s in chosen if s not in all_surveys]
    if unknown:
        raise ConfigError(f"{store_path} has no survey {unknown}; it has {all_surveys}")
    blocks, inputs, native, grids = [], 0, {}, {}
    for name in chosen:
        g, layout = store.open_survey(store_path, name)
        if layout.grid.name not in infos:
            raise ConfigError(f"{store_path}/{name} is on the {layout.grid.name} grid but no --model bundle is "
                              f"(given: {', '.join(f'{k}: {v[1].model_id}' for k, v in infos.items())}); add a "
                              f"{layout.grid.name} bundle" + ("" if surveys else " or restrict with --surveys"))
        grids[name] = layout.grid.name
        for s in store.done_shards(store_path, name):
            blocks.append((name, int(s)))
        status = g["meta"]["status"][:]
        done_rows = np.repeat(g["shard_done"][:].astype(bool), layout.shard_rows)
        inputs += int(((status != store.RowStatus.EMPTY) & done_rows).sum())
        native.update(layout.meta_columns)
    columns = cat.catalog_columns(next(iter(n_latent)), native, column_docs(chosen))
    return PredictPlan(store_path=store_path, bundle_paths=bundle_paths, infos=infos, grids=grids, blocks=blocks,
                       inputs=inputs, columns=columns)


def run_predict(store_path: str, bundle_path, catalog_path: str, *, client, overwrite: bool = False,
                precision: str = "fp32", batch_size: int | None = None, order: int | None = None,
                torch_threads: int | None = None, device: str = "cpu", progress: bool | None = None,
                catalog_name: str | None = None, surveys: list[str] | None = None,
                blocks_per_gpu: int = BLOCKS_PER_GPU, compile: str | bool = "auto",
                read_engine: str = "auto") -> PredictSummary:
    """Predict every finished shard of the store into a HATS catalog at ``catalog_path``.

    ``bundle_path`` is one bundle or a list: each survey group uses the bundle whose grid it is
    on (SDSS → an SDSS-grid bundle; DESI and PFS → a DESI-grid bundle). ``surveys`` restricts the
    run to some survey groups. An existing catalog made with the same models is resumed
    (finished blocks are skipped); ``overwrite=True`` deletes it first.

    A block that fails on every retry (e.g. a corrupted shard) does not stop the run: its spectra
    go to the rejects table as ``predict_error`` with the error text, the summary counts the
    failed blocks, and re-running the same command tries those blocks again. Raises
    :class:`PipelineError` only when every block of a run of two or more failed (that is not the
    data; the catalog is left unfinalized, ready to resume).

    ``device`` is ``cpu``, ``cuda`` or ``auto`` (cuda when the workers offer the ``GPU`` resource);
    with cuda every task is submitted with ``resources={"GPU": 1 / blocks_per_gpu}``, so
    ``blocks_per_gpu`` blocks share each worker's ``GPU=1`` (one reads its shard and writes Parquet
    on the CPU while another runs on the GPU; the workers need that many threads). ``batch_size``
    (spectra per forward pass) defaults to :data:`DEFAULT_BATCH` for the device. ``compile``
    (``auto``, ``yes``, ``no``; see :func:`resolve_compile`) runs the encoder through ``torch.compile``
    on each worker: the same latents to float32 rounding, faster on large runs. ``read_engine``
    (:data:`~catalogpred.store.READ_ENGINES`) is what reads a shard's numeric arrays on the workers:
    TensorStore by default where it is installed, else zarr-python (same values).
    """
    t0 = time.perf_counter()
    if order is not None and not 0 <= order <= cat.SPATIAL_INDEX_ORDER:
        raise ConfigError(f"order {order}: a HEALPix order is 0-{cat.SPATIAL_INDEX_ORDER} (default: from the row "
                          "count, 1-7)")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, not {batch_size}")
    planned = plan_predict(store_path, bundle_path, surveys)
    store_path, catalog_path, bundle_paths = planned.store_path, shared_path(catalog_path), planned.bundle_paths
    check_catalog_target(catalog_path, overwrite=overwrite, keep=[store_path, *bundle_paths])
    infos, chosen, blocks, inputs, columns = planned.infos, planned.surveys, planned.blocks, planned.inputs, planned.columns
    survey_bundle, survey_model, model_ids, info = (planned.survey_bundle, planned.survey_model, planned.model_ids,
                                                    planned.model)

    check_workers(client, [store_path, *bundle_paths, catalog_path])
    device = resolve_device(device, client)
    resources = gpu_task_resources(blocks_per_gpu) if device == "cuda" else None
    batch_size = batch_size or DEFAULT_BATCH[device]
    if resources and client.scheduler_info()["workers"] and not _n_workers(client, resources):
        raise ConfigError("--device cuda: no Dask worker offers the GPU resource; start GPU workers with "
                          "`dask worker ... --resources GPU=1` (or `dask cuda worker`), or use --device cpu")
    plan_file = Path(catalog_path) / cat.RUN_DIR / "plan.json"
    if overwrite and os.path.exists(catalog_path):  # check_catalog_target (above) allowed it
        shutil.rmtree(catalog_path)
    groups = {s: store.group_uid(store_path, s) for s in chosen}
    column_names = [c.name for c in columns]
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        _check_resumable(catalog_path, plan, model_ids, os.path.abspath(store_path), groups, column_names)
        if order is not None and order != plan["order"]:
            log.warning("order %d ignored: resuming %s, whose leaves are at order %d (--overwrite starts it again)",
                        order, catalog_path, plan["order"])
        order = plan["order"]
        groups = {**plan.get("store_groups", {}), **groups}
    else:
        order = order if order is not None else cat.choose_order(inputs)
        plan_file.parent.mkdir(parents=True, exist_ok=True)
    cat.atomic_write_text(plan_file, json.dumps({"model_ids": model_ids, "order": order,
                                                 "store": os.path.abspath(store_path), "store_groups": groups,
                                                 "columns": column_names}))
    for stale in Path(catalog_path).glob("**/.*.tmp"):  # left by a run killed mid-write
        stale.unlink()
    done = cat.read_block_done(catalog_path)
    # blocks that failed on every retry last time (predict_error rejects) are tried again
    todo = [(s, sh) for s, sh in blocks if block_key(s, sh) not in done or done[block_key(s, sh)].get("error")]
    summary = PredictSummary(catalog=catalog_path, model_id=", ".join(model_ids), blocks=len(blocks),
                             blocks_skipped=len(blocks) - len(todo), order=order, inputs=inputs)
    if torch_threads is None:  # local: cores / workers; remote: from each worker's nthreads
        torch_threads = default_torch_threads(client)
    compile = resolve_compile(compile, device, inputs * len(todo) // max(len(blocks), 1), _n_workers(client, resources))
    if read_engine not in store.READ_ENGINES:
        raise ConfigError(f"read engine must be one of {store.READ_ENGINES}, not {read_engine!r}")
    cat.default_write_threads()  # a bad $CATALOGPRED_WRITE_THREADS fails here, not in every block on the workers
    kwargs = dict(precision=precision, batch_size=batch_size, device=device, torch_threads=torch_threads,
                  compile=compile)
    args = [(str(store_path), s, sh, survey_bundle[s], catalog_path, order, columns) for s, sh in todo]
    keys = [f"predict-{block_key(s, sh)}-{os.urandom(4).hex()}" for s, sh in todo]
    n_io = _n_workers(client, IO_RESOURCE)  # with I/O workers, a block is three tasks (submit_split)

    def submit_split(key, a):
        """A block as three tasks: read and write on I/O workers, the model where ``resources`` allow."""
        store_p, survey, shard, bundle_p, catalog_p, order_, columns_ = a
        io = dict(retries=2, pure=False, resources=IO_RESOURCE)
        block = client.submit(read_block, store_p, survey, shard, device=device, engine=read_engine,
                              key=f"{key}-read", **io)
        pred = client.submit(infer_block, block, bundle_p, **kwargs, key=f"{key}-model", retries=2, pure=False,
                             resources=resources)
        return client.submit(write_block, pred, catalog_p, order_, columns_, key=key, **io)

    # hats imports while the blocks run rather than after them (set-up above is done, so it imports alone)
    cat.import_finalize_deps_in_background()
    results, errors = _run_bounded(client, predict_block, args, {**kwargs, "read_engine": read_engine}, desc="predict", keys=keys, progress=progress,
                                   resources=resources, tasks_per_worker=blocks_per_gpu if resources else 1,
                                   submit=submit_split if n_io else None, io_resources=IO_RESOURCE if n_io else None)
    if errors and not results and len(todo) > 1:
        raise PipelineError(f"all {len(todo)} prediction blocks failed (e.g. {next(iter(errors.values()))}); "
                            "re-run the same command to resume")
    key_block = dict(zip(keys, todo))
    failed = {}
    for k, err in sorted(errors.items()):
        s, sh = key_block[k]
        n_rej = _reject_failed_block(str(store_path), s, sh, catalog_path, err)
        failed[block_key(s, sh)] = err
        log.error("block %s failed on every retry: its %d spectra go to rejects as %s (%s); re-run to retry it",
                  block_key(s, sh), n_rej, RejectReason.PREDICT_ERROR.value, err)
    summary.blocks_failed = len(failed)
    summary.seconds_model = sum(r["seconds_model"] for r in results.values())
    summary.seconds_read = sum(r["seconds_read"] for r in results.values())
    summary.seconds_write = sum(r["seconds_write"] for r in results.values())
    writers = {r["write_threads"] for r in results.values() if r.get("write_threads")}
    manifest = {
        "catalogpred_run": "predict",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store": os.path.abspath(store_path),
        "surveys": chosen,
        "model": {"path": infos[info.grid.name][0], "model_id": info.model_id, "kind": info.card.kind,
                  "grid": info.grid.name},
        "models": {name: {"path": survey_bundle[name], "model_id": survey_model[name]} for name in chosen},
        "settings": {"precision": precision, "batch_size": batch_size, "order": order, "device": device,
                     "torch_threads": torch_threads, "compile": compile,
                     # GPU worker processes (more than the GPUs with --workers-per-gpu)
                     **({"blocks_per_gpu": blocks_per_gpu, "gpu_workers": _n_workers(client, resources)}
                        if resources else {}),
                     **({"io_workers": n_io} if n_io else {}),
                     # what read the shards on the workers ("auto" resolves there)
                     "read_engine": ",".join(sorted({r.get("read_engine") or read_engine for r in results.values()}))
                     or read_engine,
                     # part-file writer threads per block on the workers (catalog.default_write_threads)
                     **({"write_threads": ",".join(map(str, sorted(writers)))} if writers else {})},
        "versions": _versions(),
        "ingest_runs": {name: store.ingest_history(store_path, name) for name in chosen},
        "blocks": [block_key(s, sh) for s, sh in blocks],
        "failed_blocks": failed,
        "units": {"w?_mag": "Vega mag (AllWISE w?mpro)", "norm": "1e-17 erg/s/cm2/Angstrom", "ra/dec": "deg ICRS"},
    }
    summary.settings = {k: v for k, v in manifest["settings"].items()
                        if k in ("device", "precision", "batch_size", "compile", "blocks_per_gpu", "gpu_workers",
                                 "io_workers", "read_engine", "write_threads")}
    t_finalize = time.perf_counter()
    counts = cat.finalize_catalog(catalog_path, catalog_name=catalog_name or Path(catalog_path).name, order=order,
                                  blocks=manifest["blocks"], columns=columns, expected_inputs=inputs, manifest=manifest)
    summary.seconds_finalize = time.perf_counter() - t_finalize
    summary.rows, summary.rejects, summary.reasons = counts["catalog_rows"], counts["rejects"], counts["rejects_by_reason"]
    summary.seconds = time.perf_counter() - t0
    return summary


def check_catalog_target(catalog_path, *, overwrite: bool = False, keep=()) -> None:
    """Whether predict may write ``catalog_path``: a new path, an empty directory, a catalog that predict made
    (resumed, or with ``overwrite`` replaced); never a file or another directory, and with ``overwrite`` never
    one holding an input (``keep``: store and bundles). Raises :class:`CatalogError` saying what to do."""
    path = Path(catalog_path)
    plan_file = path / cat.RUN_DIR / "plan.json"
    if path.exists() and not path.is_dir():
        raise CatalogError(f"{catalog_path} is a file, not a catalog directory: predict writes a catalog (a "
                           "directory) there; choose another --catalog")
    if overwrite:
        _check_deletable(str(catalog_path), plan_file, list(keep))
    elif path.is_dir() and any(path.iterdir()) and not plan_file.exists():
        raise CatalogError(f"{catalog_path} exists and is not a catalogpred catalog (no {cat.RUN_DIR}/plan.json in "
                           "it); choose another --catalog (a new path or an empty directory)")


def predict_order(catalog_path, inputs: int, order: int | None = None, *, overwrite: bool = False) -> tuple[int, bool]:
    """The HEALPix order that :func:`run_predict` will use, and whether it resumes an existing catalog (which
    keeps its order): ``predict --dry-run`` reports it."""
    plan_file = Path(catalog_path) / cat.RUN_DIR / "plan.json"
    if not overwrite and plan_file.exists():
        return int(json.loads(plan_file.read_text())["order"]), True
    return (order if order is not None else cat.choose_order(inputs)), False


def _check_deletable(catalog_path: str, plan_file: Path, keep: list[str]) -> None:
    """``--overwrite`` deletes ``catalog_path``: only an empty directory or a catalog that predict made (it has
    ``plan_file``), and never one holding an input (``--catalog .`` beside the store would take the store)."""
    path = Path(catalog_path).resolve()
    for p in keep:
        if Path(p).resolve().is_relative_to(path):
            raise CatalogError(f"--overwrite would delete {catalog_path}, which holds the input {p}; choose another --catalog")
    if path.is_dir() and any(path.iterdir()) and not plan_file.exists():
        raise CatalogError(f"--overwrite would delete {catalog_path}, which is not a catalog that predict made "
                           f"(no {cat.RUN_DIR}/plan.json in it); delete it yourself or choose another --catalog")


# ----------------------------------------------------------------------------------------------- training data


def training_table_from_store(store_path: str, photometry_path: str, encoder_bundle: str, *, client,
                              join_on: str | None = None, match_radius_arcsec: float | None = None,
                              surveys: list[str] | None = None, mag_system: str = "auto") -> dict:
    """Latents (computed on the cluster), z, norm and matched WISE photometry for the head, as
    :func:`~catalogpred.model.train.read_training_table` returns them.

    Photometry is joined on an id column (``join_on``, compared as strings, e.g. ``specobjid``)
    or matched on the sky (nearest within ``match_radius_arcsec``). ``groups`` names each row's object by the
    photometry row it matched, so that repeat spectra of one object share a train/validation/test split. Non-detections keep their σ
    (≥ 99 means no weight in training). The photometry columns and their system (``mag_system``, AB
    converted to Vega) are read as :func:`~catalogpred.tables.wise_vega_magnitudes` reads them.
    """
    import pyarrow as pa

    from .model.bundle import read_bundle_info
    from .tables import read_table_any, wise_vega_magnitudes
    from .tasks import encode_rows

    encoder_bundle = shared_path(encoder_bundle)
    store_path = shared_path(store_path)
    info = read_bundle_info(encoder_bundle)
    phot = read_table_any(photometry_path)
    # observed W1-W4 as Vega (AB converted), one row per photometry row: carried through the match by row number
    obs_mag, obs_err, used = wise_vega_magnitudes(phot, mag_system, what=str(photometry_path))
    log.info("photometry: %s", ", ".join(f"{b} {m}/{e} ({sys_})" for b, (m, e, sys_) in used.items()))
    phot = phot.append_column("_phot_row", pa.array(np.arange(phot.num_rows)))
    pcols = {c.lower(): c for c in phot.column_names}
    parts, keyed = [], []
    for name in surveys or store.list_surveys(store_path):
        g, layout = store.open_survey(store_path, name)
        if layout.grid != info.grid:
            continue
        key_col = next((c for c in layout.meta_columns if join_on and c.lower() == join_on.lower()), None)
        want = ["source_id", "ra", "dec", "z", "norm", "status"] + ([key_col] if key_col else [])
        table = store.read_meta(store_path, name, columns=list(dict.fromkeys(want)))
        table = table.filter(pa_equal(table.column("status"), store.RowStatus.OK))
        meta = table.drop_columns([key_col]).to_pandas() if key_col else table.to_pandas()
        if key_col:  # the key as text per group, from the exact values (ints stay ints, not floats after concat)
            meta["_key"] = [str(v).strip() if v is not None else None for v in table.column(key_col).to_pylist()]
            keyed.append(name)
        meta["survey_group"] = name
        parts.append(meta)
    if not parts:
        raise ConfigError(f"{store_path} has no survey on the {info.grid.name} grid of {encoder_bundle}")
    import pandas as pd

    meta = pd.concat(parts, ignore_index=True)
    if join_on:
        if join_on.lower() not in pcols or not keyed:
            groups = ", ".join(str(m["survey_group"].iloc[0]) for m in parts if len(m)) or "none"
            raise ConfigError(f"--join-on {join_on}: " + (
                f"{photometry_path} has no such column" if join_on.lower() not in pcols else
                f"no store group on the encoder's {info.grid.name} grid ({groups}) has it"))
        if len(keyed) < len(parts):
            log.info("--join-on %s: only the groups %s have it", join_on, ", ".join(keyed))
        p = phot.to_pandas()
        p["_key"] = [str(v).strip() if v is not None else None for v in phot.column(pcols[join_on.lower()]).to_pylist()]
        m = meta.merge(p, on="_key", how="inner", suffixes=("", "_phot"))
    else:
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        rc = next((pcols[c] for c in ("ra", "raj2000", "ra_deg") if c in pcols), None)
        dc = next((pcols[c] for c in ("dec", "dej2000", "dec_deg") if c in pcols), None)
        if rc is None or dc is None:
            raise ConfigError(f"{photometry_path} has no ra/dec columns for a positional match")
        p = phot.to_pandas()
        idx, sep, _ = SkyCoord(meta["ra"].to_numpy() * u.deg, meta["dec"].to_numpy() * u.deg).match_to_catalog_sky(
            SkyCoord(p[rc].to_numpy() * u.deg, p[dc].to_numpy() * u.deg))
        ok = sep.to_value(u.arcsec) <= match_radius_arcsec
        m = pd.concat([meta[ok].reset_index(drop=True), p.iloc[idx[ok]].reset_index(drop=True).add_suffix("_phot")], axis=1)
        m = m.rename(columns={"_phot_row_phot": "_phot_row"})
    if len(m) == 0:
        raise ConfigError("no spectrum matched the photometry; check --join-on / --match-radius")
    log.info("training set: %d spectra matched to %s", len(m), photometry_path)
    futures = []
    for (name,), grp in m.groupby(["survey_group"]):
        rows = grp["row"].to_numpy()
        for chunk in np.array_split(rows, max(1, len(rows) // 2048)):
            futures.append((grp.index[np.isin(rows, chunk)],
                            client.submit(encode_rows, store_path, name, chunk, encoder_bundle, pure=False)))
    latents = np.zeros((len(m), info.n_latent), np.float32)
    for index, fut in futures:
        latents[m.index.get_indexer(index)] = fut.result()
    rows = m["_phot_row"].to_numpy(np.int64)
    return {"ids": m["source_id"].tolist(), "latents": latents, "z": m["z"].to_numpy(np.float64),
            "log_norm": np.log10(m["norm"].to_numpy(np.float64)), "mag": obs_mag[rows], "mag_err": obs_err[rows],
            "groups": [f"photometry-row-{r}" for r in rows.tolist()], "layout": "store"}


def pa_equal(column, value):
    import pyarrow.compute as pc

    return pc.equal(column, value)
