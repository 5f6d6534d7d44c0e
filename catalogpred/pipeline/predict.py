"""Predict on Dask: finished store shards → catalog blocks, one task per shard (:func:`run_predict`); one task per
HEALPix leaf that merges its part files into one file, as soon as the leaf's last block is done and, for what is
left, after the last block (:mod:`.merge`); then finalize (HATS metadata, accounting, run manifest).

:func:`plan_predict` checks the bundles against the store and lists the blocks without a cluster
(``predict --dry-run``). A catalog is resumed only by the run that made it (:func:`_check_resumable`); a block
that fails on every retry becomes ``predict_error`` rejects (:func:`_reject_failed_block`).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import catalog as cat
from .. import runlock, store
from ..cluster import (BLOCKS_PER_GPU, IO_RESOURCE, check_workers, default_torch_threads, gpu_task_resources,
                       resolve_compile, resolve_device, retire_unfit_workers, same_code, shared_path)
from ..errors import CatalogError, ConfigError, RejectReason
from ..surveys import column_docs
from ..tasks import block_key, infer_block, predict_block, read_block, write_block
from .merge import LeafMerger, merge_leaves, plan_in_background
from .runner import PipelineError, n_workers, reasons_lines, run_bounded, versions

__all__ = ["run_predict", "plan_predict", "PredictPlan", "PredictSummary", "DEFAULT_BATCH", "check_catalog_target",
           "predict_order", "merge_leaves"]

log = logging.getLogger(__name__)


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
    seconds_merge: float = 0.0  #: wall seconds merging leaves' part files after the last block (merge_leaves)
    leaves_merged: int = 0  #: leaves whose part files were merged into one file
    files_merged: int = 0  #: files merged into those leaves' files
    leaves_merged_early: int = 0  #: of leaves_merged, those merged as soon as their blocks finished (LeafMerger)
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
                 f"  time             {self.seconds:>9.1f} s ({rate:,.0f} rows/s; merge {self.seconds_merge:.2f} s, "
                 f"finalize {self.seconds_finalize:.2f} s)",
                 *([f"  merged leaves    {self.leaves_merged:>9,d}   ({self.files_merged:,d} files into one file each; "
                    f"{self.leaves_merged_early:,d} of them as their blocks finished)"] if self.leaves_merged else []),
                 f"  task time        read {self.seconds_read:.1f} s, model {self.seconds_model:.1f} s, "
                 f"write {self.seconds_write:.1f} s (summed over tasks)"]
        return "\n".join(lines + reasons_lines(self.reasons))



#: spectra per forward pass when none is given. On CPUs a batch's activations dominate a worker's
#: memory (batch × 128 channels × n_pix × 4 B per tensor, about three alive: 0.5 GB each at 256 SDSS
#: spectra) and a smaller batch is no slower; GPUs want large batches.
DEFAULT_BATCH = {"cpu": 64, "cuda": 2048}


def _store_groups(planned: "PredictPlan") -> dict:
    """The random id of each store group the run predicts (a re-created group has a new one)."""
    return {s: store.group_uid(planned.store_path, s) for s in planned.surveys}


def _check_resumable(catalog_path: str, plan: dict, planned: "PredictPlan", groups: dict) -> None:
    """Refuse to resume a catalog (its ``plan.json``: ``plan``) that this run's blocks (``planned``, store groups
    ``groups``) would not match: other models, another store (or the same path re-created: each survey group has a
    random id), other catalog columns (e.g. more surveys)."""
    model_ids, store_path, column_names = planned.model_ids, planned.store_path, [c.name for c in planned.columns]
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
    """Close a block whose task failed on every retry (client side); returns how many of its spectra became
    ``predict_error`` rejects (its OK rows).

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
    return int(ok.sum())


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
        return {s: self.infos[g][0] if g in self.infos else None for s, g in self.grids.items()}

    @property
    def survey_model(self) -> dict:
        """survey -> model_id"""
        return {s: self.infos[g][1].model_id if g in self.infos else None for s, g in self.grids.items()}

    @property
    def model_ids(self) -> list:
        return sorted(i.model_id for _, i in self.infos.values())

    @property
    def model(self):
        """BundleInfo of the first survey's bundle (the run manifest's ``model``)"""
        return self.infos[next((g for g in self.grids.values() if g in self.infos), next(iter(self.infos)))][1]

    def summary(self) -> dict:
        return {"store": self.store_path, "models": {g: i.model_id for g, (_, i) in self.infos.items()},
                "surveys": {s: {"model": m, "blocks": sum(b[0] == s for b in self.blocks)}
                            for s, m in self.survey_model.items()},
                "blocks": len(self.blocks), "input_spectra": self.inputs}


def plan_predict(store_path: str, bundle_path, surveys: list[str] | None = None) -> PredictPlan:
    """Check that the bundles cover the store's surveys (one bundle per grid, one latent size) and list the
    blocks: :class:`PredictPlan`. Raises ConfigError with what to do instead."""
    from ..model.bundle import read_bundle_info

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
        status = g["meta"]["status"][:]
        done_rows = np.repeat(g["shard_done"][:].astype(bool), layout.shard_rows)
        if layout.grid.name not in infos and ((status == store.RowStatus.OK) & done_rows).any():
            raise ConfigError(f"{store_path}/{name} is on the {layout.grid.name} grid but no --model bundle is "
                              f"(given: {', '.join(f'{k}: {v[1].model_id}' for k, v in infos.items())}); add a "
                              f"{layout.grid.name} bundle" + ("" if surveys else " or restrict with --surveys"))
        # a group of rejects only (e.g. one broken file) needs no bundle: its blocks only write their rejects
        grids[name] = layout.grid.name
        for s in store.done_shards(store_path, name):
            blocks.append((name, int(s)))
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
                read_engine: str = "auto", merge: bool = True) -> PredictSummary:
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

    ``merge`` (default True): merge the part files of each HEALPix leaf (one per block that has rows in it) into one
    file, so that a query opens one file per leaf: as soon as the leaf's last block is done, while other blocks run
    (:class:`~.merge.LeafMerger`; which blocks have rows in which leaf is read from the store's positions), and after
    the last block for the leaves left (:func:`merge_leaves`). Without it a
    catalog of millions of rows holds tens of thousands of small files, and scanning it is tens of times slower
    (README, "One file per leaf").

    One predict at a time writes a catalog, and none starts while an ingest writes its store
    (:mod:`catalogpred.runlock`; :class:`~catalogpred.runlock.BusyError` otherwise). Several predicts may read
    one store into different catalogs.
    """
    catalog_path = shared_path(catalog_path)
    runlock.check_not_written(shared_path(store_path))
    with runlock.write_lock(catalog_path, "predict"):
        return _predict(store_path, bundle_path, catalog_path, client=client, overwrite=overwrite, precision=precision,
                        batch_size=batch_size, order=order, torch_threads=torch_threads, device=device,
                        progress=progress, catalog_name=catalog_name, surveys=surveys, blocks_per_gpu=blocks_per_gpu,
                        compile=compile, read_engine=read_engine, merge=merge)


def _predict(store_path: str, bundle_path, catalog_path: str, *, client, overwrite: bool, precision: str,
             batch_size: int | None, order: int | None, torch_threads: int | None, device: str, progress: bool | None,
             catalog_name: str | None, surveys: list[str] | None, blocks_per_gpu: int, compile: str | bool,
             read_engine: str, merge: bool) -> PredictSummary:
    """:func:`run_predict` with the catalog's lock held."""
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

    shared = [store_path, *bundle_paths, catalog_path]  # what every worker must see, at the same paths
    checked = check_workers(client, shared)
    device = resolve_device(device, client)
    resources = gpu_task_resources(blocks_per_gpu) if device == "cuda" else None
    batch_size = batch_size or DEFAULT_BATCH[device]
    if resources and client.scheduler_info()["workers"] and not n_workers(client, resources):
        raise ConfigError("--device cuda: no Dask worker offers the GPU resource; start GPU workers with "
                          "`dask worker ... --resources GPU=1` (or `dask cuda worker`), or use --device cpu")
    plan_file = Path(catalog_path) / cat.RUN_DIR / "plan.json"
    if overwrite and os.path.exists(catalog_path):  # check_catalog_target (above) allowed it
        shutil.rmtree(catalog_path)
    groups = _store_groups(planned)
    column_names = [c.name for c in columns]
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        _check_resumable(catalog_path, plan, planned, groups)
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
    compile = resolve_compile(compile, device, inputs * len(todo) // max(len(blocks), 1), n_workers(client, resources))
    if read_engine not in store.READ_ENGINES:
        raise ConfigError(f"read engine must be one of {store.READ_ENGINES}, not {read_engine!r}")
    cat.default_write_threads()  # a bad $CATALOGPRED_WRITE_THREADS fails here, not in every block on the workers
    # part files that the merge after the last block rewrites are Arrow IPC files: cheaper to write (in the GPU
    # worker's block threads) and to read back than Parquet (cat.PART_FORMATS); without merging they are the
    # catalog's Parquet files
    part_format = "arrow" if merge else "parquet"
    if not merge:
        _check_no_arrow_parts(catalog_path)
    kwargs = dict(precision=precision, batch_size=batch_size, device=device, torch_threads=torch_threads,
                  compile=compile)
    args = [(str(store_path), s, sh, survey_bundle[s], catalog_path, order, columns) for s, sh in todo]
    keys = [f"predict-{block_key(s, sh)}-{os.urandom(4).hex()}" for s, sh in todo]
    n_io = n_workers(client, IO_RESOURCE)  # with I/O workers, a block is three tasks (submit_split)

    read_task, infer_task, write_task = same_code(read_block), same_code(infer_block), same_code(write_block)

    def submit_split(key, a):
        """A block as three tasks: read and write on I/O workers, the model where ``resources`` allow."""
        store_p, survey, shard, bundle_p, catalog_p, order_, columns_ = a
        io = dict(retries=2, pure=False, resources=IO_RESOURCE)
        block = client.submit(read_task, store_p, survey, shard, device=device, engine=read_engine,
                              key=f"{key}-read", **io)
        pred = client.submit(infer_task, block, bundle_p, **kwargs, key=f"{key}-model", retries=2, pure=False,
                             resources=resources)
        return client.submit(write_task, pred, catalog_p, order_, columns_, part_format=part_format, key=key, **io)

    # hats imports (and the VO table is built) while the blocks run rather than after them (set-up above is done)
    cat.import_finalize_deps_in_background(columns)
    # part-file footers read as blocks finish, not all after the last one; merging the leaves replaces the part files
    # of most leaves, and finalize reads the merged files' footers instead
    footers = None if merge else cat.FooterReader(catalog_path, order)
    # a leaf is merged as soon as the last block with rows in it is done (which blocks those are is read from the
    # store's positions in a thread meanwhile); whatever is left is merged after the last block
    merger = LeafMerger(client, catalog_path, order, plan_in_background(str(store_path), todo, order), done,
                        resources=IO_RESOURCE if n_io else None) if merge and todo else None

    def block_done(key, summary):
        if footers is not None and summary.get("pixels"):
            footers.block_done(summary["block"], summary["pixels"])
        if merger is not None:
            merger.block_done(summary["block"], summary.get("pixels") or {})

    def visible(key, summary) -> str | None:
        """None if the block's done marker is there as this client sees the catalog (its worker shares it)."""
        marker = cat.block_done_path(catalog_path, summary["block"])
        return None if os.path.exists(marker) else f"its done marker {marker} is not there"

    try:
        results, errors = run_bounded(client, predict_block, args,
                                      {**kwargs, "read_engine": read_engine, "part_format": part_format}, desc="predict",
                                      keys=keys, progress=progress, resources=resources, on_done=block_done,
                                      verify=visible, checked_workers=checked,
                                      on_new_workers=lambda addrs: retire_unfit_workers(client, addrs, shared),
                                      tasks_per_worker=blocks_per_gpu if resources else 1,
                                      submit=submit_split if n_io else None, io_resources=IO_RESOURCE if n_io else None)
    except BaseException:
        if merger is not None:
            merger.cancel()
        raise
    early = merger.finish() if merger is not None else {"leaves": 0, "files": 0, "rows": 0, "seconds": 0.0}
    if errors and not results and len(todo) > 1:
        raise PipelineError(f"all {len(todo)} prediction blocks failed (e.g. {next(iter(errors.values()))}); "
                            "re-run the same command to resume")
    key_block = dict(zip(keys, todo))
    failed = {}
    for k, err in sorted(errors.items()):
        s, sh = key_block[k]
        n_ok = _reject_failed_block(str(store_path), s, sh, catalog_path, err)
        failed[block_key(s, sh)] = err
        log.error("block %s failed on every retry: its %d spectra go to rejects as %s (%s); re-run to retry it",
                  block_key(s, sh), n_ok, RejectReason.PREDICT_ERROR.value, err)
    summary.blocks_failed = len(failed)
    summary.seconds_model = sum(r["seconds_model"] for r in results.values())
    summary.seconds_read = sum(r["seconds_read"] for r in results.values())
    summary.seconds_write = sum(r["seconds_write"] for r in results.values())
    writers = {r["write_threads"] for r in results.values() if r.get("write_threads")}
    earlier = _earlier_settings(catalog_path) if not results else {}
    block_keys = [block_key(s, sh) for s, sh in blocks]
    manifest = {
        "catalogpred_run": "predict",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store": os.path.abspath(store_path),
        "surveys": chosen,
        "model": {"path": infos[info.grid.name][0], "model_id": info.model_id, "kind": info.card.kind,
                  "grid": info.grid.name},
        # by survey: the bundle each survey's rows come from (one bundle may serve several surveys of its grid)
        "models": {name: {"path": survey_bundle[name], "model_id": survey_model[name], "grid": planned.grids[name],
                          "kind": infos[planned.grids[name]][1].card.kind} for name in chosen
                   if survey_bundle[name] is not None},
        "settings": {"precision": precision, "batch_size": batch_size, "order": order, "device": device,
                     "torch_threads": torch_threads, "compile": compile,
                     # GPU worker processes (more than the GPUs with --workers-per-gpu)
                     **({"blocks_per_gpu": blocks_per_gpu, "gpu_workers": n_workers(client, resources)}
                        if resources else {}),
                     **({"io_workers": n_io} if n_io else {}),
                     "merge_leaves": merge,  # each leaf's part files merged into one file (merge_leaves)
                     # what read the shards on the workers ("auto" resolves there); a re-run that ran no block
                     # keeps what the earlier run recorded
                     "read_engine": ",".join(sorted({r.get("read_engine") or read_engine for r in results.values()}))
                     or earlier.get("read_engine") or read_engine,
                     # part-file writer threads per block on the workers (catalog.default_write_threads)
                     **({"write_threads": ",".join(map(str, sorted(writers)))} if writers else
                        {"write_threads": earlier["write_threads"]} if "write_threads" in earlier else {})},
        "versions": versions(),  # the client's; what ran the model on the workers is model_runtime
        "model_runtime": _model_runtimes(catalog_path, block_keys, done, results),
        "ingest_runs": {name: store.ingest_history(store_path, name) for name in chosen},
        "blocks": block_keys,
        "failed_blocks": failed,
        "units": {"w?_mag": "Vega mag (AllWISE w?mpro)", "norm": "1e-17 erg/s/cm2/Angstrom", "ra/dec": "deg ICRS"},
    }
    summary.settings = {k: v for k, v in manifest["settings"].items()
                        if k in ("device", "precision", "batch_size", "compile", "blocks_per_gpu", "gpu_workers",
                                 "io_workers", "read_engine", "write_threads")}
    if merge:
        t_merge = time.perf_counter()
        merged = merge_leaves(client, catalog_path, order, manifest["blocks"], progress=progress,
                              resources=IO_RESOURCE if n_io else None, checked_workers=checked, shared=shared)
        summary.seconds_merge = time.perf_counter() - t_merge
        summary.leaves_merged = merged["leaves"] + early["leaves"]
        summary.files_merged = merged["files"] + early["files"]
        summary.leaves_merged_early = early["leaves"]
        manifest["merged_leaves"] = {**{k: merged[k] + early.get(k, 0) for k in merged},
                                     "wall_seconds": summary.seconds_merge, "as_blocks_finished": early}
    t_finalize = time.perf_counter()
    counts = cat.finalize_catalog(catalog_path, catalog_name=catalog_name or Path(catalog_path).name, order=order,
                                  blocks=manifest["blocks"], columns=columns, expected_inputs=inputs, manifest=manifest,
                                  footers=footers.footers() if footers is not None else None)
    summary.seconds_finalize = time.perf_counter() - t_finalize
    summary.rows, summary.rejects, summary.reasons = counts["catalog_rows"], counts["rejects"], counts["rejects_by_reason"]
    suited = cat.choose_order(summary.rows)
    if suited > order + 1:  # a grown catalog: 16x or more the rows per pixel its order was chosen for
        log.warning("%s holds %s rows at HEALPix order %d (about %s per leaf on an all-sky spread); order %d suits "
                    "it: predict --overwrite --order %d re-partitions it", catalog_path, f"{summary.rows:,d}", order,
                    f"{summary.rows // (12 * 4 ** order):,d}", suited, suited)
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_no_arrow_parts(catalog_path: str) -> None:
    """Refuse ``--no-merge`` on a catalog whose earlier run left Arrow part files to merge (it was stopped before
    its merge): they are not a catalog's files until merged."""
    arrow = cat.arrow_part_files(catalog_path)
    if arrow:
        raise ConfigError(f"--no-merge: {catalog_path} holds {len(arrow)} Arrow part files of an earlier run, to be "
                          f"merged into their leaves' Parquet files (e.g. {arrow[0]}); run predict without --no-merge "
                          "to finish it, or with --overwrite to start again")


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


def _model_runtimes(catalog_path: str, blocks: list[str], done: dict, results: dict) -> list[dict]:
    """The run manifest's ``model_runtime``: each distinct :func:`~catalogpred.tasks.model_runtime` that ran the
    model of the catalog's ``blocks``, with how many blocks it ran (most first). This run's blocks count from their
    ``results``, earlier runs' from their done markers (``done``, read when this run started; one written before
    catalogpred recorded it counts as ``{"device": "not recorded"}``). Blocks without a spectrum to predict, and
    blocks that failed, do not count. Logs a warning when the blocks ran on more than one."""
    ran = {r["block"]: r.get("runtime") for r in results.values()}
    counts: Counter = Counter()
    for b in blocks:
        if b in ran:
            runtime = ran[b]
        elif b in done and not done[b].get("error"):
            runtime = done[b].get("runtime", {"device": "not recorded"} if done[b].get("n_rows") else None)
        else:
            continue
        if runtime:
            counts[json.dumps(runtime, sort_keys=True)] += 1
    runtimes = [{**json.loads(k), "blocks": n} for k, n in counts.most_common()]
    if len(runtimes) > 1:
        log.warning("the blocks of %s ran the model on %d different software versions or devices; their predictions "
                    "may differ in floating-point rounding (run_manifest.json, model_runtime): %s", catalog_path,
                    len(runtimes), "; ".join(cat.runtime_text(r) for r in runtimes))
    return runtimes


def _earlier_settings(catalog_path) -> dict:
    """The ``settings`` of the run manifest a catalog has from an earlier run ({} if none or unreadable)."""
    try:
        return json.loads((Path(catalog_path) / "run_manifest.json").read_text()).get("settings", {})
    except (OSError, ValueError):
        return {}


def predict_order(catalog_path, inputs: int, order: int | None = None, *, overwrite: bool = False,
                  plan: PredictPlan | None = None) -> tuple[int, bool]:
    """The HEALPix order that :func:`run_predict` will use, and whether it resumes an existing catalog (which
    keeps its order): ``predict --dry-run`` reports it. With the run's ``plan``, a catalog that this run would
    refuse to resume (other models, store or columns: :func:`_check_resumable`) raises here as it would there."""
    plan_file = Path(catalog_path) / cat.RUN_DIR / "plan.json"
    if not overwrite and plan_file.exists():
        made = json.loads(plan_file.read_text())
        if plan is not None:
            _check_resumable(str(catalog_path), made, plan, _store_groups(plan))
        return int(made["order"]), True
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

