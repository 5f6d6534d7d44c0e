"""Merging each HEALPix leaf's part files into one file, one Dask task per leaf (:func:`catalogpred.tasks.merge_leaf`):
as soon as the last block of the run with rows in the leaf is done, while other blocks still run
(:class:`LeafMerger`), and after the last block for every leaf that still holds part files (:func:`merge_leaves`).

A block writes one part file per leaf it has rows in, so a run of tens of thousands of blocks leaves tens of thousands
of small files; merging them is the reduce step of hats-import, done here after the blocks so that the blocks' writes
stay independent and resumable. Merging a leaf is incremental (:func:`catalogpred.catalog.merge_leaf` takes the rows
its merged file already holds, plus the part files of blocks it does not), so an early merge is only ever an
optimisation: a leaf that gets another part file after it (a block the plan did not expect there) is merged again
after the last block.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .. import catalog as cat
from .. import store
from ..cluster import retire_unfit_workers, same_code
from ..spectra import check_positions
from ..tasks import block_key, merge_leaf
from .runner import PipelineError, run_bounded

__all__ = ["merge_leaves", "block_leaves", "LeafMerger", "MERGE_MAX_ROWS"]

log = logging.getLogger(__name__)

#: rows above which a leaf is not merged (a merge task holds its leaf in memory about twice: 400 B per row of the
#: demo catalog's 54 columns in Arrow, measured); ``choose_order`` aims at 20,000 rows per leaf on an all-sky spread
MERGE_MAX_ROWS = 1_000_000


def block_leaves(store_path: str, blocks: list[tuple[str, int]], order: int) -> dict[str, set[int]]:
    """``{block key: HEALPix pixels (NESTED, at order)}``: the leaves each block of ``blocks`` ((survey, shard)) can
    write rows into, from the positions of its OK rows in the store (deg, ICRS), with the function the block computes
    its rows' ``_healpix_29`` with (hats' ``compute_spatial_index``), shifted to ``order``. A block writes into a
    subset of them: rows it rejects (a NaN prediction) write nothing."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    shift = 2 * (cat.SPATIAL_INDEX_ORDER - order)
    out: dict[str, set[int]] = {}
    by_survey: dict[str, list[int]] = defaultdict(list)
    for survey, shard in blocks:
        by_survey[survey].append(int(shard))
    for survey, shards in by_survey.items():
        for shard, ra, dec in store.shard_positions(store_path, survey, shards):
            ra, placed = check_positions(ra, dec)
            h29 = compute_spatial_index(ra[placed], dec[placed]).astype(np.int64)
            out[block_key(survey, shard)] = set(np.unique(h29 >> shift).tolist())
    return out


class LeafMerger:
    """Merge each leaf as soon as every block of this run with rows in it is done, while the other blocks run.

    ``leaves`` is :func:`block_leaves` for the run's blocks (a dict, or a Future of one, computed in a thread while
    the first blocks run); until it is ready, finished blocks wait in a list. ``done`` are the done markers of
    blocks finished by earlier runs (:func:`catalogpred.catalog.read_block_done`): their part files belong to the
    leaves too. Call :meth:`block_done` for each finished block (with its done marker's ``pixels``: rows per leaf),
    then :meth:`finish`. A merge task goes where ``resources`` say (I/O workers, when the run has them); a leaf of
    more than ``max_rows`` rows is left to :func:`merge_leaves`, and so is a leaf whose merge fails here (logged).

    Only the merges in flight are held as futures; their results are small dicts.
    """

    def __init__(self, client, catalog_path: str, order: int, leaves: dict | Future, done: dict, *,
                 resources: dict | None = None, max_rows: int = MERGE_MAX_ROWS):
        self.client, self.catalog_path, self.order = client, catalog_path, order
        self.resources, self.max_rows = resources, max_rows
        self._plan = leaves
        self._leaves_of: dict[str, set[int]] | None = None
        self._waiting: Counter = Counter()  # leaf -> blocks of the plan not done yet (set once the plan is ready)
        self._pending: list[str] = []  # finished blocks not yet counted (the plan was not ready)
        self._leaf_blocks: dict[int, list[str]] = defaultdict(list)
        self._leaf_rows: Counter = Counter()
        for block, marker in done.items():
            if not marker.get("error"):
                self._add_rows(block, marker.get("pixels") or {})
        self._futures: dict = {}  # Dask key -> future, merges in flight
        self.results: list[dict] = []

    def _add_rows(self, block: str, pixels: dict) -> None:
        for pixel, n in pixels.items():
            self._leaf_blocks[int(pixel)].append(block)
            self._leaf_rows[int(pixel)] += int(n)

    def block_done(self, block: str, pixels: dict) -> None:
        """Block ``block`` of this run is done and has ``pixels`` (``{pixel: rows}``) in the catalog; submit the
        merge of each leaf for which it was the last block still running."""
        self._add_rows(block, pixels)
        self._pending.append(block)
        self._count(wait=False)
        self._collect(wait=False)

    def _count(self, wait: bool) -> None:
        """Count the finished blocks against the plan (once it is ready, or waiting for it) and submit the merge of
        every leaf whose blocks are all done."""
        if not self._ready(wait):
            return
        for b in self._pending:
            for pixel in self._leaves_of.get(b, ()):
                self._waiting[pixel] -= 1
                if self._waiting[pixel] == 0:
                    self._submit(pixel)
        self._pending.clear()

    def _ready(self, wait: bool) -> bool:
        if self._leaves_of is None and (wait or not isinstance(self._plan, Future) or self._plan.done()):
            try:
                self._leaves_of = self._plan.result() if isinstance(self._plan, Future) else self._plan
            except Exception as exc:  # noqa: BLE001 - an optimisation only: every leaf is merged after the last block
                log.warning("could not plan which blocks write which HEALPix leaves (%s: %s); the leaves are merged "
                            "after the last block", type(exc).__name__, exc)
                self._leaves_of = {}
            self._waiting = Counter(p for pixels in self._leaves_of.values() for p in pixels)
        return self._leaves_of is not None

    def _submit(self, pixel: int) -> None:
        blocks = sorted(self._leaf_blocks.get(pixel, ()))
        if not blocks or self._leaf_rows[pixel] > self.max_rows:  # no rows after all; or left to merge_leaves
            return
        key = f"merge-{pixel}-{os.urandom(4).hex()}"
        self._futures[key] = self.client.submit(same_code(merge_leaf), self.catalog_path, self.order, pixel, blocks,
                                                True, key=key, retries=2, pure=False, resources=self.resources)

    def _collect(self, wait: bool) -> None:
        if wait and self._futures:
            from distributed import wait as wait_all

            wait_all(list(self._futures.values()))
        for key, fut in list(self._futures.items()):
            if not fut.done():
                continue
            try:
                self.results.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - merge_leaves tries the leaf again after the last block
                log.warning("merging a leaf while the blocks ran failed (%s: %s); it is merged after the last block",
                            type(exc).__name__, exc)
            fut.release()
            del self._futures[key]

    def finish(self) -> dict:
        """After the last block: wait for the plan if need be, submit the merges it makes due, wait for every merge
        in flight, and return ``{"leaves", "files", "rows", "seconds"}`` of those that merged (so far)."""
        self._count(wait=True)
        self._collect(wait=True)
        merged = [r for r in self.results if r["merged"]]
        return {"leaves": len(merged), "files": sum(r["merged"] for r in merged),
                "rows": sum(r["rows"] or 0 for r in merged), "seconds": sum(r["seconds"] for r in self.results)}

    def cancel(self) -> None:
        """Drop the merges in flight (the run is stopping; a merge is atomic, and the next run finishes it)."""
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()


def plan_in_background(store_path: str, blocks: list[tuple[str, int]], order: int) -> Future:
    """:func:`block_leaves` in a thread of its own (it reads every block's positions from the store: seconds for
    millions of spectra, which the first blocks need not wait for)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="catalogpred-leaf-plan")
    try:
        return pool.submit(block_leaves, store_path, blocks, order)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one job


def merge_leaves(client, catalog_path: str, order: int, blocks: list[str], *, progress=None,
                 resources: dict | None = None, checked_workers=(), shared: list[str] | None = None,
                 max_rows: int = MERGE_MAX_ROWS) -> dict:
    """Merge the part files of every HEALPix leaf (at ``order``) that still has part files into one Parquet file, one
    Dask task per leaf (:func:`catalogpred.tasks.merge_leaf`), once the ``blocks`` are done (their done markers say
    which blocks have rows in which leaf). Returns ``{"leaves", "files", "rows", "seconds", "rewritten"}``: the leaves
    merged, the files merged into them, their rows, the task-seconds, and the Arrow part files of too-large leaves
    rewritten.

    A leaf is merged atomically (its file is renamed into place, then its part files are deleted), so a run stopped
    while merging is finished by the next one.

    The blocks of a merging run write their part files as Arrow IPC files (``part_format="arrow"``, cheaper to
    write and to read back than Parquet: :data:`catalogpred.catalog.PART_FORMATS`). A leaf of one part file is
    written as its merged file too, so that every leaf of the catalog is one Parquet file named as hats names it
    (``Npix=N.parquet``).

    A leaf of more than ``max_rows`` rows keeps its part files (its Arrow ones each rewritten as Parquet), with a
    warning that names the order that re-partitions the catalog (a catalog grown far beyond the rows its order was
    chosen for). ``"rewritten"`` in the result counts those Arrow part files.

    Raises :class:`PipelineError` if a leaf fails on every retry (its part files are kept: the catalog is left
    unfinalized, and re-running the same command finishes it).
    """
    done = cat.read_block_done(catalog_path)
    parts = {b: done[b]["pixels"] for b in blocks if done.get(b, {}).get("pixels")}
    rows: dict[int, int] = {}
    for pixels in parts.values():
        for p, n in pixels.items():
            rows[int(p)] = rows.get(int(p), 0) + int(n)
    todo, too_large = [], []
    for pixel, leaf_blocks in cat.leaves_to_merge(catalog_path, order, parts):
        (todo if rows[pixel] <= max_rows else too_large).append((pixel, leaf_blocks))
    # a too-large leaf of Parquet part files only is final as it is: no task
    with_arrow = {p for p, _ in cat.leaves_to_merge(catalog_path, order, parts, part_format="arrow")} if too_large \
        else set()
    to_rewrite = [(pixel, b) for pixel, b in too_large if pixel in with_arrow]
    if too_large:
        log.warning("%d HEALPix leaves at order %d hold more than %s rows each (e.g. leaf %d: %s rows) and keep their "
                    "part files: a merge holds its leaf in a worker's memory. predict --overwrite --order %d "
                    "re-partitions the catalog into smaller leaves", len(too_large), order, f"{max_rows:,d}",
                    too_large[0][0], f"{rows[too_large[0][0]]:,d}", order + 1)
    if not todo and not to_rewrite:
        return {"leaves": 0, "files": 0, "rows": 0, "seconds": 0.0, "rewritten": 0}
    # a too-large leaf with Arrow part files: each rewritten as Parquet, one at a time
    args = ([(catalog_path, order, pixel, leaf_blocks, True) for pixel, leaf_blocks in todo]
            + [(catalog_path, order, pixel, leaf_blocks, False) for pixel, leaf_blocks in to_rewrite])
    keys = [f"merge-{a[2]}-{os.urandom(4).hex()}" for a in args]

    def visible(key, result) -> str | None:
        """None if the leaf's file is there as this client sees the catalog (its worker shares it)."""
        f = result.get("file")
        return None if f is None or os.path.exists(f) else f"the merged leaf file {f} is not there"

    on_new = (lambda addrs: retire_unfit_workers(client, addrs, shared)) if shared else None
    # a merge is short (milliseconds to a second): every thread of a worker gets one, with as many queued behind
    threads = max((int(w.get("nthreads") or 1) for w in client.scheduler_info()["workers"].values()), default=1)
    results, errors = run_bounded(client, merge_leaf, args, {}, desc="merge leaves", keys=keys, progress=progress,
                                  resources=resources, verify=visible, checked_workers=checked_workers,
                                  on_new_workers=on_new, tasks_per_worker=threads)
    if errors:
        raise PipelineError(f"merging {len(errors)} of {len(args)} HEALPix leaves failed on every retry (e.g. "
                            f"{next(iter(errors.values()))}); their part files are kept: re-run the same command "
                            "to finish")
    return {"leaves": sum(1 for r in results.values() if r["merged"]),
            "files": sum(r["merged"] for r in results.values()),
            "rows": sum(r["rows"] or 0 for r in results.values() if r["merged"]),
            "seconds": sum(r["seconds"] for r in results.values()),
            "rewritten": sum(r["rewritten"] for r in results.values())}
