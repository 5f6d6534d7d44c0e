"""Reliability of predict on a real multi-process LocalCluster: a worker killed mid-run, a shard that
fails on every retry, and the bounded task window of ``pipeline.run_bounded``.

Stores are synthetic (``bench/bench_pipeline.py::write_synthetic_store``: written straight through
:mod:`catalogpred.store`, no FITS), small enough that a whole predict takes seconds on 2 cores.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import bench_pipeline
import numpy as np
import pyarrow.parquet as pq
import pytest

from catalogpred import catalog as cat
from catalogpred.errors import ConfigError
from catalogpred.pipeline import PipelineError, run_bounded, run_predict

SHARD_ROWS = 8
N_SHARDS = 12
N_REJECTED = 3  # ingest rejects in the last shard



@pytest.fixture(scope="module")
def syn_store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reliability") / "store.zarr"
    bench_pipeline.write_synthetic_store(path, SHARD_ROWS * N_SHARDS, shard_rows=SHARD_ROWS, chunk_rows=4,
                                       n_rejected=N_REJECTED)
    return str(path)


@pytest.fixture(scope="module")
def cluster_client():
    """A 2-process LocalCluster with nannies of its own (its workers get killed here)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        yield cluster, client


@pytest.fixture(scope="module")
def reference(syn_store, random_bundle, cluster_client, tmp_path_factory) -> str:
    """An undisturbed run."""
    path = str(tmp_path_factory.mktemp("ref") / "catalog")
    run_predict(syn_store, random_bundle, path, client=cluster_client[1], progress=False, torch_threads=1)
    return path


def read_catalog(path) -> "object":
    table = pq.ParquetDataset(Path(path) / cat.DATASET_DIR).read()
    return table.sort_by("source_id")


def assert_same_catalog(path, ref_path):
    got, ref = read_catalog(path), read_catalog(ref_path)
    ids = got.column("source_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicated source_id"
    assert ids == ref.column("source_id").to_pylist()
    for name in ("w1_mag", "w2_mag", "w3_mag", "w4_mag", "w1_mag_err", "ra", "dec", "z", "flags", "_healpix_29"):
        np.testing.assert_array_equal(got.column(name).to_numpy(), ref.column(name).to_numpy(), err_msg=name)
    np.testing.assert_array_equal(np.stack(got.column("latent").to_numpy(zero_copy_only=False)),
                                  np.stack(ref.column("latent").to_numpy(zero_copy_only=False)))


def wait_for(cond, timeout: float, every: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(every)
    return False


# ------------------------------------------------------------------------------------ worker loss


def run_and_kill_a_worker(syn_store, random_bundle, client, path: Path, n_workers: int = 2) -> tuple:
    """run_predict, and SIGKILL a worker process running a predict task once the first block is done."""
    blocks_dir = path / cat.RUN_DIR / "blocks"
    assert wait_for(lambda: len(client.scheduler_info()["workers"]) == n_workers, timeout=60, every=0.2)
    pids = client.run(os.getpid)
    killed = {}

    def killer():
        if not wait_for(lambda: len(list(blocks_dir.glob("*.json"))) >= 1, timeout=120, every=0.01):
            return
        busy = [addr for addr, keys in client.processing().items() if any(str(k).startswith("predict-") for k in keys)]
        if busy and busy[0] in pids:
            killed.update(addr=busy[0], pid=pids[busy[0]], done_at_kill=len(list(blocks_dir.glob("*.json"))))
            os.kill(pids[busy[0]], signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_predict(syn_store, random_bundle, str(path), client=client, progress=False, torch_threads=1)
    t.join(timeout=5)
    return summary, killed


def test_worker_killed_mid_run_gives_identical_catalog(syn_store, random_bundle, cluster_client, reference, tmp_path):
    cluster, client = cluster_client
    for attempt in range(3):  # a fast machine may finish before the kill lands; then run again
        path = tmp_path / f"catalog-{attempt}"
        summary, killed = run_and_kill_a_worker(syn_store, random_bundle, client, path)
        if killed and killed["done_at_kill"] < N_SHARDS:
            break
    assert killed and killed["done_at_kill"] < N_SHARDS, f"kill did not land mid-run: {killed}"
    # complete, duplicate-free, the same as the undisturbed run
    assert summary.blocks_failed == 0
    assert summary.rows + summary.rejects == summary.inputs == SHARD_ROWS * N_SHARDS
    assert summary.reasons == {"bad_redshift": N_REJECTED}
    assert_same_catalog(path, reference)
    manifest = json.loads((path / "run_manifest.json").read_text())
    assert manifest["counts"]["catalog_rows"] == SHARD_ROWS * N_SHARDS - N_REJECTED
    assert manifest["failed_blocks"] == {}
    # the nanny restarted the killed worker
    assert wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=60, every=0.2)
    assert killed["pid"] not in client.run(os.getpid).values()


def test_part_files_dictionary_encode_strings_only(reference):
    """Part files: strings dictionary-encoded, numbers plain (zstd either way), with the VO metadata."""
    part = next((Path(reference) / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*/*.parquet"))
    meta = pq.ParquetFile(part).metadata
    encodings = {meta.schema.column(i).path: meta.row_group(0).column(i).encodings for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in encodings["source_id"] and "RLE_DICTIONARY" in encodings["survey"]
    for name in ("w1_mag", "ra", "flags", "_healpix_29"):
        assert "RLE_DICTIONARY" not in encodings[name], (name, encodings[name])
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert b"IVOA.VOTable-Parquet.content" in pq.read_schema(part).metadata


def _fragment_table(n: int = 2000):
    """A catalog block of ``n`` rows spread over the sky: at order 1 it touches all 48 pixels."""
    import bench_query

    schema = cat.catalog_schema(bench_query._columns(), {"IVOA.VOTable-Parquet.version": "1.0"})
    return bench_query._block(np.random.default_rng(4), 0, n, schema)


def _part_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("**/*")) if p.is_file()}


def test_part_files_written_in_parallel_equal_the_serial_ones(tmp_path, monkeypatch):
    """A block's part files are written from a pool of threads: the same files, byte for byte, as one thread
    writing them one after the other; ``CATALOGPRED_WRITE_THREADS`` sets the default and is checked."""
    table = _fragment_table()
    serial = cat.write_fragment(tmp_path / "serial", table, 1, "sdss-000000", write_threads=1)
    monkeypatch.setenv("CATALOGPRED_WRITE_THREADS", "6")
    assert cat.default_write_threads() == 6
    parallel = cat.write_fragment(tmp_path / "parallel", table, 1, "sdss-000000")
    assert serial == parallel and len(parallel) == 48 and sum(parallel.values()) == table.num_rows
    assert _part_files(tmp_path / "serial") == _part_files(tmp_path / "parallel")
    assert cat.default_write_threads(cpu_worker=True) == 6  # the variable applies everywhere
    monkeypatch.delenv("CATALOGPRED_WRITE_THREADS")
    # CPU workers already fill the cores; GPU and I/O workers use the CPU count up to 8
    assert cat.default_write_threads(cpu_worker=True) == 1
    assert cat.default_write_threads() == min(8, os.cpu_count() or 1)
    monkeypatch.setenv("CATALOGPRED_WRITE_THREADS", "0")
    with pytest.raises(ConfigError, match="CATALOGPRED_WRITE_THREADS"):
        cat.default_write_threads()


def test_a_failed_part_file_fails_the_block_after_the_others_finish(tmp_path):
    """One pixel's leaf cannot be created (a file is in its place): write_fragment raises that error, and only
    after every other part file is complete, so no thread is still writing when Dask retries the block."""
    table = _fragment_table()
    blocked = cat.pixel_dir(tmp_path, 1, 20)
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a directory")
    with pytest.raises(OSError):
        cat.write_fragment(tmp_path, table, 1, "sdss-000000", write_threads=4)
    written = sorted((tmp_path / cat.DATASET_DIR).glob("**/part-sdss-000000.parquet"))
    assert len(written) == 47 and not list(tmp_path.glob("**/*.tmp"))
    assert sum(pq.read_metadata(p).num_rows for p in written) == table.num_rows - int(
        (table.column("_healpix_29").to_numpy() >> 56 == 20).sum())


def test_finalize_refuses_duplicated_ids_and_unaccounted_rows(tmp_path):
    """finalize_catalog is the last check of exactly-once output: a source_id that two blocks both wrote, or
    catalog + rejects that do not add up to the store's inputs, is a CatalogError, not a catalog."""
    import bench_query

    from catalogpred.errors import CatalogError

    path = tmp_path / "catalog"
    counts = bench_query.build_catalog(path, 2000, block_rows=1000, order=2)
    assert counts["catalog_rows"] == 2000
    blocks = [f"bench-{b:06d}" for b in range(2)]
    kw = dict(catalog_name="c", order=2, columns=bench_query._columns(), manifest={})
    with pytest.raises(CatalogError, match=r"2000 catalog rows \+ 0 rejects = 2000, but the store holds 2001"):
        cat.finalize_catalog(path, blocks=blocks, expected_inputs=2001, **kw)
    assert not list(path.glob(".rejects.parquet.*")) and pq.read_table(path / "rejects.parquet").num_rows == 0
    # a third block that holds three rows of the first again (as a block written twice under two keys would)
    part = next((path / cat.DATASET_DIR).glob("**/part-bench-000000.parquet"))
    again = pq.read_table(part).slice(0, 3)
    pixels = cat.write_fragment(path, again, 2, "bench-000002", write_threads=1)
    cat.write_block_done(path, "bench-000002", {"block": "bench-000002", "n_rows": 3,
                                                "pixels": {str(k): v for k, v in pixels.items()}},
                         cat.REJECTS_SCHEMA.empty_table())
    with pytest.raises(CatalogError, match="3 duplicated source_id"):
        cat.finalize_catalog(path, blocks=[*blocks, "bench-000002"], expected_inputs=2003, **kw)
    assert cat.count_duplicate_ids(path) == 3  # leaf by leaf: each repeated row is in its first copy's leaf
    # the leaves finalize reads: those where the third block's id range overlaps the first's (its footers' statistics)
    footers = cat.write_dataset_metadata(path, 2, {b: d["pixels"] for b, d in cat.read_block_done(path).items()},
                                         kw["columns"])
    third = {os.path.dirname(p) for p in footers if p.endswith("part-bench-000002.parquet")}
    leaves = cat.leaves_to_check(footers)
    assert set(leaves) == third and all(p.endswith(".parquet") for files in leaves.values() for p in files)
    assert cat.count_duplicate_ids(path, leaves=leaves) == 3  # these leaves' part files, not _metadata
    assert cat.count_duplicate_ids(path, leaves={}) == 0


def test_rejects_are_merged_a_row_group_at_a_time(tmp_path):
    """finalize's rejects.parquet: every block's rejects in block order, in row groups of REJECTS_ROW_GROUP rows
    (more rows than one row group here), counted by reason; the same table as concatenating them all."""
    import pyarrow as pa

    rng = np.random.default_rng(3)
    reasons = np.array(["sky_fibre", "not_galaxy", "zwarn"])
    blocks, tables = [], []
    for b, n in enumerate((30_000, 0, 41_000, 1)):
        key = f"desi-{b:06d}"
        t = pa.table({"source_id": [f"{key}-{i}" for i in range(n)], "survey": ["desi"] * n,
                      "source_file": ["coadd.fits"] * n, "source_path": ["/data/coadd.fits"] * n,
                      "row_in_file": np.arange(n, dtype=np.int32), "store_row": np.arange(n, dtype=np.int64),
                      "stage": ["ingest"] * n, "reason": reasons[rng.integers(0, 3, n)], "detail": [""] * n},
                     schema=cat.REJECTS_SCHEMA)
        cat.write_block_done(tmp_path, key, {"block": key, "n_rows": 0, "pixels": {}}, t)
        blocks.append(key)
        tables.append(t)
    n, by_reason = cat.merge_rejects(tmp_path, blocks, tmp_path / "rejects.parquet")
    everything = pa.concat_tables(tables)
    merged = pq.ParquetFile(tmp_path / "rejects.parquet")
    assert merged.read().equals(everything) and n == everything.num_rows == 71_001
    sizes = [merged.metadata.row_group(i).num_rows for i in range(merged.metadata.num_row_groups)]
    assert sizes == [cat.REJECTS_ROW_GROUP, n - cat.REJECTS_ROW_GROUP]
    assert by_reason == {r: int((everything.column("reason").to_numpy(zero_copy_only=False) == r).sum())
                         for r in sorted(reasons)}
    assert cat.merge_rejects(tmp_path, [blocks[1]], tmp_path / "none.parquet") == (0, {})
    # exactly whole row groups: no empty row group after them
    key = "desi-000009"
    cat.write_block_done(tmp_path, key, {"block": key, "n_rows": 0, "pixels": {}},
                         everything.slice(0, cat.REJECTS_ROW_GROUP))
    assert cat.merge_rejects(tmp_path, [key], tmp_path / "whole.parquet")[0] == cat.REJECTS_ROW_GROUP
    assert pq.ParquetFile(tmp_path / "whole.parquet").metadata.num_row_groups == 1
    assert pq.read_table(tmp_path / "none.parquet").schema.equals(cat.REJECTS_SCHEMA)


def test_finalize_checks_the_part_files_against_the_done_markers(tmp_path):
    """finalize writes ``_metadata`` from exactly the part files the done markers name (in pixel order, valid for
    hats), reuses a footer read while the blocks ran only if its file is unchanged, and refuses a stray, a missing
    or an unreadable part file."""
    import bench_query
    import hats
    import pyarrow.dataset as pads
    from hats.io.validation import is_valid_catalog

    from catalogpred.errors import CatalogError

    path = tmp_path / "catalog"
    bench_query.build_catalog(path, 2000, block_rows=1000, order=2)
    blocks = [f"bench-{b:06d}" for b in range(2)]
    columns = bench_query._columns()
    kw = dict(catalog_name="c", order=2, blocks=blocks, columns=columns, expected_inputs=2000, manifest={})
    ds = path / cat.DATASET_DIR
    parts = sorted(str(p) for p in ds.glob("Norder=2/Dir=*/Npix=*/part-*.parquet"))
    md = pq.read_metadata(ds / "_metadata")
    listed = [md.row_group(i).column(0).file_path for i in range(md.num_row_groups)]
    assert sorted(listed) == sorted(os.path.relpath(p, ds) for p in parts) and md.num_rows == 2000
    pixels = [int(f.split("Npix=")[1].split("/")[0]) for f in listed]
    assert pixels == sorted(pixels)  # pixel order, as hats writes it
    assert is_valid_catalog(str(path))  # strict=True fails on leaves of several part files, with hats' writer too
    assert {px.pixel for px in hats.read_hats(str(path)).get_healpix_pixels()} == set(pixels)
    common = pq.read_schema(ds / "_common_metadata").metadata
    assert common[b"IVOA.VOTable-Parquet.content"].decode() == cat.vo_table_xml(columns)
    assert not [k for k in common if k.startswith(b"table::len::")]
    # the two blocks' ids do not interleave: no leaf needs its ids read
    assert cat.leaves_to_check(cat.write_dataset_metadata(path, 2, {b: cat.read_block_done(path)[b]["pixels"]
                                                                    for b in blocks}, columns)) == {}

    # footers read while the blocks ran, kept parsed or compact: the same _metadata as footers read in finalize
    written = {name: (ds / name).read_bytes() for name in ("_metadata", "_common_metadata")}
    for keep in (0, 3):
        reader = cat.FooterReader(path, 2, keep=keep)
        for b in blocks:
            reader.block_done(b, cat.read_block_done(path)[b]["pixels"])
        footers = reader.footers()
        assert sorted(footers) == parts
        kinds = [type(f.metadata) for f in footers.values()]
        assert kinds.count(pq.FileMetaData) == min(keep, len(parts)) and kinds.count(bytes) == len(parts) - min(keep, len(parts))
        cat.finalize_catalog(path, footers=footers, **kw)
        assert {name: (ds / name).read_bytes() for name in written} == written
    compact = next(f for f in footers.values() if isinstance(f.metadata, bytes))
    assert len(compact.metadata) < pq.read_metadata(parts[0]).serialized_size / 2  # no Arrow schema, no VO table

    # a footer read while the blocks ran, then its file rewritten (the same rows, another layout): read again
    changed = parts[0]
    pq.write_table(pq.read_table(changed), changed, compression="gzip", row_group_size=7)
    cat.finalize_catalog(path, footers=footers, **kw)
    via_metadata = pads.parquet_dataset(str(ds / "_metadata")).to_table().sort_by("source_id")
    assert via_metadata.equals(pads.dataset(parts, format="parquet").to_table().sort_by("source_id"))

    stray = Path(parts[1]).with_name("part-other-run.parquet")
    shutil.copy(parts[1], stray)
    with pytest.raises(CatalogError, match="1 files in the dataset were not written by this run"):
        cat.finalize_catalog(path, **kw)
    stray.unlink()
    moved = Path(parts[2]).with_name(".moved")
    os.replace(parts[2], moved)
    with pytest.raises(CatalogError, match="1 part files of finished blocks are missing"):
        cat.finalize_catalog(path, **kw)
    os.replace(moved, parts[2])
    # a part file of another schema (w1_mag as float64): refused, whether its footer was kept parsed or compact
    odd = pq.read_table(parts[3])
    pq.write_table(odd.set_column(odd.schema.get_field_index("w1_mag"), "w1_mag", odd["w1_mag"].cast("float64")),
                   parts[3])
    reader = cat.FooterReader(path, 2, keep=0)
    for b in blocks:
        reader.block_done(b, cat.read_block_done(path)[b]["pixels"])
    with pytest.raises(CatalogError, match="its part files do not share one schema"):
        cat.finalize_catalog(path, footers=reader.footers(), **kw)
    Path(parts[3]).write_bytes(b"not a Parquet file")
    with pytest.raises(CatalogError, match="not a readable Parquet file"):
        cat.finalize_catalog(path, **kw)


def test_a_part_file_never_holds_a_source_id_twice(tmp_path):
    """write_fragment refuses a block whose table holds a source_id twice (finalize's duplicate check relies on
    it) and writes nothing."""
    import pyarrow as pa

    from catalogpred.errors import CatalogError

    table = _fragment_table(100)
    twice = pa.concat_tables([table, table.slice(10, 2)])
    with pytest.raises(CatalogError, match="block sdss-000000: 2 source_id values are in it twice"):
        cat.write_fragment(tmp_path, twice, 1, "sdss-000000")
    assert not (tmp_path / cat.DATASET_DIR).exists()


def test_read_engines_give_the_same_catalog(syn_store, random_bundle, cluster_client, reference, tmp_path,
                                            monkeypatch):
    """The reference run read shards with TensorStore (the default where it is installed); zarr-python alone
    gives the same catalog, and the manifest says which engine the workers used."""
    pytest.importorskip("tensorstore")
    summary = run_predict(syn_store, random_bundle, str(tmp_path / "catalog"), client=cluster_client[1], progress=False,
                          torch_threads=1, read_engine="zarr")
    assert summary.settings["read_engine"] == "zarr"
    assert summary.settings["write_threads"] == "1"  # CPU workers write a block's part files one by one
    assert json.loads((Path(reference) / "run_manifest.json").read_text())["settings"]["read_engine"] == "tensorstore"
    assert_same_catalog(tmp_path / "catalog", reference)
    with pytest.raises(ConfigError, match="read engine"):
        run_predict(syn_store, random_bundle, str(tmp_path / "other"), client=cluster_client[1], progress=False,
                    read_engine="fast")
    monkeypatch.setenv("CATALOGPRED_WRITE_THREADS", "many")  # refused before any block runs
    with pytest.raises(ConfigError, match="CATALOGPRED_WRITE_THREADS"):
        run_predict(syn_store, random_bundle, str(tmp_path / "other"), client=cluster_client[1], progress=False)
    assert not (tmp_path / "other" / cat.RUN_DIR / "blocks").exists()


def _files_by_leaf(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted((Path(path) / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*/*.parquet")):
        out.setdefault(f.parent.name, []).append(f.name)
    return out


def test_predict_merges_each_leaf_into_one_file_and_no_merge_keeps_the_part_files(syn_store, random_bundle,
                                                                                  cluster_client, reference, tmp_path):
    """predict merges each leaf's part files (Arrow files) into one Parquet file after the last block (the reference
    catalog: one file per leaf, valid for hats' strict check). With merge=False the part files are Parquet and stay,
    with the same rows; predict again on that catalog with merging predicts no block, merges the leaves, and gives
    the reference's files, with the same rows, values and metadata."""
    from hats.io.validation import is_valid_catalog

    ref = _files_by_leaf(reference)
    assert all(files == [f"{leaf}.parquet"] for leaf, files in ref.items())  # every leaf merged, hats' name
    assert not list(Path(reference).glob("**/*.arrow"))
    assert is_valid_catalog(reference, strict=True)
    assert json.loads((Path(reference) / "run_manifest.json").read_text())["settings"]["merge_leaves"] is True

    path = str(tmp_path / "catalog")
    kw = dict(client=cluster_client[1], progress=False, torch_threads=1)
    kept = run_predict(syn_store, random_bundle, path, merge=False, **kw)
    parts = _files_by_leaf(path)
    several = {leaf: files for leaf, files in parts.items() if len(files) > 1}
    assert kept.leaves_merged == 0 and several and set(parts) == set(ref)
    assert all(f.startswith("part-") for files in parts.values() for f in files)
    assert_same_catalog(path, reference)

    merged = run_predict(syn_store, random_bundle, path, **kw)
    assert merged.blocks_skipped == merged.blocks
    assert (merged.leaves_merged, merged.files_merged) == (len(parts), sum(map(len, parts.values())))
    assert _files_by_leaf(path) == ref
    for leaf, (name,) in ref.items():
        a, b = (pq.read_table(next((Path(p) / cat.DATASET_DIR).glob(f"Norder=*/Dir=*/{leaf}/{name}")))
                for p in (path, reference))
        assert a.equals(b, check_metadata=True), leaf
    assert_same_catalog(path, reference)


def test_a_leaf_is_merged_as_soon_as_its_blocks_are_done(random_bundle, cluster_client, tmp_path, monkeypatch):
    """With blocks on separate parts of the sky (a synthetic plate per shard), each leaf is merged as soon as the
    blocks with rows in it are done, while other blocks run: no leaf is left for the merge after the last block.
    The catalog is the one that --no-merge gives, in one file per leaf, with its counts in the run manifest."""
    from catalogpred.pipeline.merge import block_leaves

    monkeypatch.setattr(bench_pipeline, "PLATE_ROWS", SHARD_ROWS)  # every shard a plate of its own
    store_path = str(tmp_path / "store.zarr")
    bench_pipeline.write_synthetic_store(store_path, SHARD_ROWS * N_SHARDS, shard_rows=SHARD_ROWS, chunk_rows=4,
                                         n_rejected=N_REJECTED)
    kw = dict(client=cluster_client[1], progress=False, torch_threads=1, order=2)
    kept = run_predict(store_path, random_bundle, str(tmp_path / "kept"), merge=False, **kw)
    summary = run_predict(store_path, random_bundle, str(tmp_path / "merged"), **kw)
    assert kept.leaves_merged_early == kept.leaves_merged == 0
    leaves = _files_by_leaf(tmp_path / "merged")
    assert len(leaves) > 2 and all(files == [f"{leaf}.parquet"] for leaf, files in leaves.items())
    # the plan from the store's positions names the leaves each block wrote into (no row of this store is rejected
    # at predict time)
    plan = block_leaves(store_path, [("sdss", s) for s in range(N_SHARDS)], 2)
    assert {b: set(map(int, d["pixels"])) for b, d in cat.read_block_done(tmp_path / "merged").items()} == plan
    assert summary.leaves_merged == summary.leaves_merged_early == len(leaves)
    assert summary.files_merged == sum(map(len, _files_by_leaf(tmp_path / "kept").values()))
    merged = json.loads((tmp_path / "merged" / "run_manifest.json").read_text())["merged_leaves"]
    assert merged["as_blocks_finished"]["leaves"] == merged["leaves"] == len(leaves)
    assert merged["wall_seconds"] == summary.seconds_merge
    assert_same_catalog(tmp_path / "merged", tmp_path / "kept")
    assert "of them as their blocks finished" in summary.table()


def test_a_run_stopped_before_its_merge_is_finished_by_the_next_and_not_by_no_merge(
        syn_store, random_bundle, cluster_client, reference, tmp_path, monkeypatch):
    """A run stopped after its blocks, before its merge, leaves Arrow part files. predict --no-merge refuses them
    (they are not a catalog's files) and says what to do; predict without it merges them and finalizes, running no
    block again, and gives the reference catalog."""
    from catalogpred.pipeline import predict as predict_mod

    path = str(tmp_path / "catalog")
    kw = dict(client=cluster_client[1], progress=False, torch_threads=1)

    def stopped(*a, **k):
        raise KeyboardInterrupt("stopped before the merge")

    monkeypatch.setattr(predict_mod, "merge_leaves", stopped)
    monkeypatch.setattr(predict_mod, "plan_in_background", lambda *a: {})  # no leaf merged while the blocks run
    with pytest.raises(KeyboardInterrupt):
        run_predict(syn_store, random_bundle, path, **kw)
    monkeypatch.undo()
    arrow = sorted(Path(path).glob(f"{cat.DATASET_DIR}/**/part-*.arrow"))
    assert arrow and not list(Path(path).glob(f"{cat.DATASET_DIR}/**/*.parquet"))
    assert all(d["part_format"] == "arrow" for d in cat.read_block_done(path).values())
    with pytest.raises(ConfigError, match=f"--no-merge: {path} holds {len(arrow)} Arrow part files of an earlier "
                                          "run.*run predict without --no-merge to finish it"):
        run_predict(syn_store, random_bundle, path, merge=False, **kw)
    done = run_predict(syn_store, random_bundle, path, **kw)
    assert done.blocks_skipped == done.blocks and done.files_merged == len(arrow)
    assert _files_by_leaf(path) == _files_by_leaf(reference)
    assert_same_catalog(path, reference)


def test_finalize_removes_a_part_file_half_written_by_a_killed_worker(syn_store, random_bundle, cluster_client,
                                                                      reference, tmp_path, monkeypatch):
    """A worker killed inside ``_atomic_write`` leaves ``.part-….tmp`` in a leaf; its task is retried
    elsewhere, and finalize must not read the half-written file as a part (hats' metadata writer would)."""
    path = tmp_path / "catalog"
    real, calls = cat.read_block_done, []

    def planting(catalog_path):
        calls.append(catalog_path)
        if len(calls) == 3:  # predict's start, merge_leaves, then finalize_catalog's: every block is done
            leaf = next((Path(catalog_path) / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*"))
            (leaf / ".part-sdss-000000.parquet.0123abcd.tmp").write_bytes(b"PAR1 half a part file")
        return real(catalog_path)

    monkeypatch.setattr(cat, "read_block_done", planting)
    summary = run_predict(syn_store, random_bundle, str(path), client=cluster_client[1], progress=False,
                          torch_threads=1)
    assert len(calls) == 3 and summary.rows + summary.rejects == SHARD_ROWS * N_SHARDS
    assert not list(path.glob("**/.*.tmp"))
    assert_same_catalog(path, reference)


# ------------------------------------------------------------------------------------ bad data


def corrupt_shard(store_path: str, shard: int, survey: str = "sdss") -> Path:
    """Overwrite the middle of a flux shard file with random bytes (its chunks fail Blosc decompression)."""
    f = Path(store_path) / survey / "flux" / "c" / str(shard) / "0"
    b = bytearray(f.read_bytes())
    n = len(b) // 2
    b[64:64 + n] = np.random.default_rng(shard).integers(0, 256, n, dtype=np.uint8).tobytes()
    f.write_bytes(bytes(b))
    return f


def test_block_failing_on_every_retry_goes_to_rejects_then_resume_retries_it(
        syn_store, random_bundle, cluster_client, reference, tmp_path):
    client = cluster_client[1]
    bad_store = tmp_path / "store.zarr"
    shutil.copytree(syn_store, bad_store)
    bad_shard = 2
    shard_file = corrupt_shard(str(bad_store), bad_shard)
    path = tmp_path / "catalog"
    summary = run_predict(str(bad_store), random_bundle, str(path), client=client, progress=False, torch_threads=1)
    key = f"sdss-{bad_shard:06d}"
    # the run finished and accounted for every spectrum
    assert summary.blocks_failed == 1
    assert summary.reasons == {"predict_error": SHARD_ROWS, "bad_redshift": N_REJECTED}
    assert summary.rows == SHARD_ROWS * (N_SHARDS - 1) - N_REJECTED
    rejects = pq.read_table(path / "rejects.parquet").to_pylist()
    errs = [r for r in rejects if r["reason"] == "predict_error"]
    assert len(errs) == SHARD_ROWS and {r["stage"] for r in errs} == {"predict"}
    assert {r["store_row"] // SHARD_ROWS for r in errs} == {bad_shard}
    assert all("blosc" in r["detail"].lower() or "checksum" in r["detail"].lower() for r in errs), errs[0]["detail"]
    manifest = json.loads((path / "run_manifest.json").read_text())
    assert list(manifest["failed_blocks"]) == [key]
    assert manifest["counts"]["rejects_by_reason"]["predict_error"] == SHARD_ROWS
    assert not list((path / cat.DATASET_DIR).glob(f"**/part-{key}.*"))
    ref_ids = set(read_catalog(reference).column("source_id").to_pylist())
    got_ids = set(read_catalog(path).column("source_id").to_pylist())
    assert got_ids == ref_ids - {r["source_id"] for r in errs}

    # the data is repaired: re-running retries only the failed block and completes the catalog
    shutil.copyfile(Path(syn_store) / "sdss" / "flux" / "c" / str(bad_shard) / "0", shard_file)
    again = run_predict(str(bad_store), random_bundle, str(path), client=client, progress=False, torch_threads=1)
    assert again.blocks_skipped == N_SHARDS - 1 and again.blocks_failed == 0
    assert again.reasons == {"bad_redshift": N_REJECTED}
    assert_same_catalog(path, reference)
    assert json.loads((path / "run_manifest.json").read_text())["failed_blocks"] == {}


def test_every_block_failing_raises(random_bundle, cluster_client, tmp_path):
    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 8, shard_rows=4, chunk_rows=4)
    for shard in (0, 1):
        corrupt_shard(str(st), shard)
    with pytest.raises(PipelineError, match="all 2 prediction blocks failed"):
        run_predict(str(st), random_bundle, str(tmp_path / "catalog"), client=cluster_client[1], progress=False)


def test_cli_exits_1_when_a_block_fails_on_every_retry_with_one_line_worker_logs(random_bundle, tmp_path, capfd):
    """A block that fails on every retry (a corrupted shard) is not bad data: without --strict the run still
    finishes its catalog, but exits 1 (it exited 0) and says to re-run. The workers log each failed try as one
    line, not distributed's "Compute Failed" block with a traceback (three of them before); the count of spectra
    sent to predict_error excludes the block's ingest rejects."""
    from catalogpred.cli import main

    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 6, shard_rows=3, chunk_rows=3)
    corrupt_shard(str(st), 1)
    argv = ["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(tmp_path / "catalog"),
            "--workers", "1", "--no-progress", "--device", "cpu"]
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert "1 prediction blocks failed on every retry" in err and "re-run the same command" in err
    assert "Compute Failed" not in err and "Traceback" not in err
    assert "failed (Dask retries it)" in err and "its 3 spectra go to rejects as predict_error" in err
    manifest = json.loads((tmp_path / "catalog" / "run_manifest.json").read_text())
    assert manifest["counts"]["catalog_rows"] == 3 and manifest["counts"]["rejects"] == 3


def test_cli_strict_exits_1_on_predict_errors(random_bundle, tmp_path, capsys):
    from catalogpred.cli import main

    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 6, shard_rows=3, chunk_rows=3)
    corrupt_shard(str(st), 1)
    argv = ["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(tmp_path / "catalog"),
            "--workers", "1", "--no-progress", "--device", "cpu", "--strict"]
    assert main(argv) == 1  # the run finished (finalized catalog), but --strict fails it
    err = capsys.readouterr().err
    assert "predict_error" in err and "failed on every retry" in err
    rejects = pq.read_table(tmp_path / "catalog" / "rejects.parquet")
    assert rejects.column("reason").to_pylist() == ["predict_error"] * 3
    assert json.loads((tmp_path / "catalog" / "run_manifest.json").read_text())["counts"]["catalog_rows"] == 3


# ------------------------------------------------------------------------------------ I/O workers


@pytest.fixture(scope="module")
def io_client():
    """One model worker and two I/O workers (``cluster.add_io_workers``): predict splits each block into
    read (I/O worker), model, write (I/O worker) tasks."""
    from distributed import Client, LocalCluster

    from catalogpred.cluster import add_io_workers

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        add_io_workers(cluster, client, 2)
        yield cluster, client


def _io_addresses(client) -> set:
    return {a for a, w in client.scheduler_info()["workers"].items() if w.get("resources", {}).get("IO")}


def test_io_workers_read_and_write_and_give_the_same_catalog(syn_store, random_bundle, io_client, reference, tmp_path):
    from distributed import get_task_stream

    client = io_client[1]
    io = _io_addresses(client)
    assert len(io) == 2 and len(client.scheduler_info()["workers"]) == 3
    with get_task_stream(client) as ts:
        summary = run_predict(syn_store, random_bundle, str(tmp_path / "catalog"), client=client, progress=False,
                              torch_threads=1)
    assert summary.settings["io_workers"] == 2 and summary.blocks == N_SHARDS
    assert summary.rows + summary.rejects == SHARD_ROWS * N_SHARDS and summary.reasons == {"bad_redshift": N_REJECTED}
    assert_same_catalog(tmp_path / "catalog", reference)
    stages = {}
    for t in ts.data:
        key = str(t["key"])
        stage = ("merge" if key.startswith("merge-") else "read" if key.endswith("-read") else
                 "model" if key.endswith("-model") else "write")
        stages.setdefault(stage, []).append(t["worker"])
    assert summary.leaves_merged > 0
    assert {k: len(v) for k, v in stages.items()} == {"read": N_SHARDS, "model": N_SHARDS, "write": N_SHARDS,
                                                      "merge": summary.leaves_merged}
    assert set(stages["read"]) | set(stages["write"]) | set(stages["merge"]) <= io  # never on the model worker
    manifest = json.loads((tmp_path / "catalog" / "run_manifest.json").read_text())
    assert manifest["settings"]["io_workers"] == 2
    assert manifest["settings"]["read_engine"] == ("tensorstore" if importlib.util.find_spec("tensorstore") else "zarr")
    # I/O workers have cores to spare for the part files (GPU workers do too): the catalog default
    assert manifest["settings"]["write_threads"] == str(cat.default_write_threads())


def test_io_workers_block_failing_on_every_retry_goes_to_rejects(syn_store, random_bundle, io_client, tmp_path):
    bad_store = tmp_path / "store.zarr"
    shutil.copytree(syn_store, bad_store)
    corrupt_shard(str(bad_store), 5)
    summary = run_predict(str(bad_store), random_bundle, str(tmp_path / "catalog"), client=io_client[1],
                          progress=False, torch_threads=1)
    assert summary.blocks_failed == 1
    assert summary.reasons == {"predict_error": SHARD_ROWS, "bad_redshift": N_REJECTED}
    assert summary.rows == SHARD_ROWS * (N_SHARDS - 1) - N_REJECTED


def test_io_worker_killed_mid_run_gives_identical_catalog(syn_store, random_bundle, io_client, reference, tmp_path):
    cluster, client = io_client
    for attempt in range(3):
        path = tmp_path / f"catalog-{attempt}"
        summary, killed = run_and_kill_a_worker(syn_store, random_bundle, client, path, n_workers=3)
        if killed and killed["done_at_kill"] < N_SHARDS:
            break
    assert killed and killed["done_at_kill"] < N_SHARDS, f"kill did not land mid-run: {killed}"
    assert summary.blocks_failed == 0 and summary.rows + summary.rejects == SHARD_ROWS * N_SHARDS
    assert_same_catalog(path, reference)
    assert wait_for(lambda: len(client.scheduler_info()["workers"]) == 3, timeout=60, every=0.2)


# ------------------------------------------------------------------------------------ bounded window


class _CountingAsCompleted:
    """Wraps distributed.as_completed to measure futures submitted but not yet handed back."""

    live = 0
    peak = 0
    history: list = []

    def __init__(self, real):
        self.real = real

    def add(self, fut):
        type(self).live += 1
        type(self).peak = max(type(self).peak, type(self).live)
        type(self).history.append(type(self).live)
        self.real.add(fut)

    def __iter__(self):
        for fut in self.real:
            type(self).live -= 1
            yield fut


def _slow_identity(i, delay):
    time.sleep(delay)
    from distributed import get_worker

    return i, get_worker().address


@pytest.fixture
def counting(monkeypatch):
    import distributed

    real = distributed.as_completed
    _CountingAsCompleted.live, _CountingAsCompleted.peak, _CountingAsCompleted.history = 0, 0, []
    monkeypatch.setattr(distributed, "as_completed", lambda **kw: _CountingAsCompleted(real(**kw)))
    return _CountingAsCompleted


def test_run_bounded_keeps_at_most_two_tasks_per_worker(cluster_client, counting):
    client = cluster_client[1]
    n = 12
    results, errors = run_bounded(client, _slow_identity, [(i, 0.05) for i in range(n)], {}, desc="t",
                                  keys=[f"bounded-{i}-{os.urandom(3).hex()}" for i in range(n)], progress=False)
    assert not errors and sorted(r[0] for r in results.values()) == list(range(n))
    assert counting.peak == 2 * len(client.scheduler_info()["workers"]) == 4


def test_run_bounded_logs_progress_lines_where_no_bar_is_shown(cluster_client, monkeypatch, caplog):
    """Off a terminal (a batch job's log; pytest's captured stderr here) the bar is off and progress goes to the
    log as lines, every PROGRESS_LOG_S seconds; --no-progress (progress=False) turns them off as well."""
    from catalogpred.pipeline import runner

    client = cluster_client[1]
    monkeypatch.setattr(runner, "PROGRESS_LOG_S", 0.0)  # a line after every task but the last
    n = 6
    for progress, lines in ((None, n - 1), (False, 0)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="catalogpred.pipeline.runner"):
            results, errors = run_bounded(client, _slow_identity, [(i, 0.01) for i in range(n)], {}, desc="predict",
                                          keys=[f"lines-{i}-{os.urandom(3).hex()}" for i in range(n)],
                                          progress=progress)
        assert not errors and len(results) == n
        got = [r.getMessage() for r in caplog.records if r.name == "catalogpred.pipeline.runner"]
        assert len(got) == lines, got
        if lines:
            assert got[0].startswith("predict: 1 of 6 tasks done (17 %), ") and "left" in got[0]
            assert got[-1].startswith("predict: 5 of 6 tasks done (83 %), ")
    assert runner.duration_text(40) == "40 s" and runner.duration_text(700) == "12 min"
    assert runner.duration_text(3 * 3600 + 300) == "3 h 05 min"


def test_run_bounded_gives_work_to_workers_that_join_later(counting):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        from catalogpred.cluster import check_workers, retire_unfit_workers

        n = 24
        done, joined, retired = [], [], []
        first = check_workers(client)

        def on_done(key, res):
            done.append(res)
            if len(done) == 2:
                cluster.scale(2)  # a worker joins mid-run

        def on_new_workers(addrs):  # as predict and ingest wire it
            joined.extend(addrs)
            retired.extend(retire_unfit_workers(client, addrs))

        results, errors = run_bounded(client, _slow_identity, [(i, 0.3) for i in range(n)], {}, desc="t",
                                      keys=[f"join-{i}-{os.urandom(3).hex()}" for i in range(n)], progress=False,
                                      on_done=on_done, recount_s=0, checked_workers=first,
                                      on_new_workers=on_new_workers)
    assert not errors and len(results) == n
    assert counting.history[:2] == [1, 2] and counting.peak == 4  # the window grew with the second worker
    workers = {addr for _, addr in results.values()}
    assert len(workers) == 2  # and the new worker got tasks
    assert joined == sorted(workers - set(first)) and retired == []  # checked when it joined, and fit


def test_run_bounded_looks_again_at_an_output_before_it_doubts_a_worker(cluster_client, caplog):
    """A finished task's output that shows only at the second look (a shared filesystem's attribute cache) is
    accepted: no worker retired, nothing submitted again."""
    from collections import Counter

    client = cluster_client[1]
    keys = [f"late-{i}-{os.urandom(3).hex()}" for i in range(4)]
    looks = Counter()

    def verify(key, res):
        looks[key] += 1
        return "not there yet" if key == keys[0] and looks[key] == 1 else None

    with caplog.at_level(logging.ERROR, logger="catalogpred.pipeline.runner"):
        results, errors = run_bounded(client, _slow_identity, [(i, 0.01) for i in range(4)], {}, desc="t", keys=keys,
                                      progress=False, verify=verify)
    assert not errors and sorted(results) == sorted(keys)
    assert looks == {keys[0]: 2, **{k: 1 for k in keys[1:]}} and not caplog.records
    assert len(client.scheduler_info()["workers"]) == 2


def test_run_bounded_stops_when_an_output_never_shows(cluster_client, monkeypatch):
    """A task whose output the client never sees runs 1 + RESUBMITS times, then the run stops with an error that
    says why once the other tasks are done; it is neither a result nor an error of the task's data."""
    from catalogpred.pipeline import runner

    monkeypatch.setattr(runner, "VERIFY_WAITS_S", ())
    client = cluster_client[1]
    keys = [f"never-{i}-{os.urandom(3).hex()}" for i in range(4)]
    looks, finished = [], []
    with pytest.raises(PipelineError, match=rf"1 tasks finished {runner.RESUBMITS + 1} times, but their outputs are "
                                            rf"not visible to this client \(e\.g\. {keys[0]}: never there"):
        run_bounded(client, _slow_identity, [(i, 0.01) for i in range(4)], {}, desc="t", keys=keys, progress=False,
                    on_done=lambda k, r: finished.append(k),
                    verify=lambda key, res: looks.append(key) or ("never there" if key == keys[0] else None))
    assert looks.count(keys[0]) == runner.RESUBMITS + 1 and sorted(finished) == sorted(keys[1:])


def test_run_bounded_says_when_no_worker_is_left_and_goes_on_when_one_joins(monkeypatch, caplog):
    """Every worker leaves mid-run (a batch job's walltime): the run logs that its tasks wait for a worker instead of
    showing a progress bar that does not move, and completes once a worker joins."""
    from distributed import Client, LocalCluster

    from catalogpred.pipeline import runner

    monkeypatch.setattr(runner, "WORKERLESS_LOG_S", 0.4)
    said = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            if "no Dask worker has been connected for" in record.getMessage():
                said.set()

    seen = Seen()
    logging.getLogger("catalogpred.pipeline.runner").addHandler(seen)
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
            def back_when_said():  # or after 30 s without the line, so that the test fails rather than hangs
                said.wait(30)
                cluster.scale(1)

            def on_done(key, res):
                if len(results_seen) == 0:
                    cluster.scale(0)  # every worker leaves
                    threading.Thread(target=back_when_said, daemon=True).start()
                results_seen.append(key)

            results_seen = []
            with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline.runner"):
                results, errors = run_bounded(client, _slow_identity, [(i, 0.2) for i in range(6)], {}, desc="predict",
                                              keys=[f"gone-{i}-{os.urandom(3).hex()}" for i in range(6)],
                                              progress=False, on_done=on_done)
    finally:
        logging.getLogger("catalogpred.pipeline.runner").removeHandler(seen)
    assert said.is_set() and not errors and sorted(r[0] for r in results.values()) == list(range(6))
    line = next(r.getMessage() for r in caplog.records if "no Dask worker" in r.getMessage())
    assert line.startswith("predict: no Dask worker has been connected for ") and " tasks wait for one" in line


def _in_worker_writing(directory: str):
    """A task for the runner: a file ``ran-<i>-<worker port>`` in ``directory``, and the worker's address (made
    here, so that it travels by value also to a worker that cannot import this test module)."""
    def task(i: int) -> dict:
        from catalogpred.cluster import worker_address

        addr = worker_address()
        Path(directory, f"ran-{i}-{addr.rsplit(':', 1)[-1]}").write_text(addr)
        return {"i": i, "worker": addr}

    return task


def test_a_task_does_not_run_on_a_worker_with_other_catalogpred_code(tmp_path, caplog):
    """A `dask worker` that imports another copy of catalogpred (the same version, one file edited: another commit)
    is the only worker when the run starts, and the run's checks have not seen it (it joined between two). Each
    task that reaches it stops before it runs (``cluster.same_code``), the worker is retired, and the tasks run again
    on a worker with this client's code, which joins once the other is gone: nothing ran on the other worker."""
    import subprocess
    import sys

    from distributed import Client, LocalCluster

    import catalogpred

    alt = tmp_path / "alt"
    shutil.copytree(Path(catalogpred.__file__).parent, alt / "catalogpred",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(alt / "catalogpred" / "store.py", "a") as f:
        f.write("# another commit\n")
    out = tmp_path / "out"
    out.mkdir()
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        other = subprocess.Popen(
            [Path(sys.executable).parent / "dask", "worker", cluster.scheduler_address, "--nthreads", "1",
             "--no-dashboard", "--name", "other-code", "--local-directory", tmp_path / "w"],
            env={**os.environ, "PYTHONPATH": str(alt)}, stdout=open(tmp_path / "other.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            client.wait_for_workers(1, timeout=90)
            addr = next(iter(client.scheduler_info()["workers"]))
            assert client.run(lambda: __import__("catalogpred").__file__)[addr].startswith(str(alt))

            def then_a_fit_worker():  # once the other one is retired
                if wait_for(lambda: addr not in client.scheduler_info()["workers"], 120):
                    cluster.scale(1)

            joins = threading.Thread(target=then_a_fit_worker, daemon=True)
            joins.start()
            with caplog.at_level(logging.ERROR, logger="catalogpred.pipeline.runner"):
                results, errors = run_bounded(client, _in_worker_writing(str(out)), [(i,) for i in range(4)], {},
                                              desc="t", keys=[f"code-{i}-{os.urandom(3).hex()}" for i in range(4)],
                                              progress=False, checked_workers=[addr])
            assert errors == {} and sorted(r["i"] for r in results.values()) == list(range(4))
            assert addr not in {r["worker"] for r in results.values()}
            assert wait_for(lambda: other.poll() is not None, 60)  # retired: its process ended
        finally:
            if other.poll() is None:
                os.killpg(other.pid, signal.SIGKILL)
                other.wait()
    port = addr.rsplit(":", 1)[-1]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"ran-{r['i']}-{r['worker'].rsplit(':', 1)[-1]}"
                                                           for r in results.values())
    assert not list(out.glob(f"ran-*-{port}"))  # nothing ran there
    assert f"Dask worker {addr} runs other catalogpred code than the client" in caplog.text
    assert "retiring that worker and running the task again" in caplog.text


def _other_code_everywhere(i):
    from catalogpred.errors import WorkerCodeError

    raise WorkerCodeError("Dask worker (none) runs other catalogpred code than the client", None)


def test_run_bounded_stops_when_a_task_finds_only_workers_with_other_code(cluster_client):
    """A task that reaches a worker with other code on every one of its 1 + RESUBMITS submissions stops the run
    with an error that says so; it is not an error of the task's data (no rejects)."""
    from catalogpred.pipeline import runner

    keys = [f"code-{i}-{os.urandom(3).hex()}" for i in range(2)]
    with pytest.raises(PipelineError, match=rf"2 tasks reached only Dask workers with other catalogpred code than this "
                                            rf"client, {runner.RESUBMITS + 1} times"):
        run_bounded(cluster_client[1], _other_code_everywhere, [(i,) for i in range(2)], {}, desc="t", keys=keys,
                    progress=False)


def _allocate_and_report(n_bytes: int) -> int:
    """In a worker: touch ``n_bytes`` of memory, free it, and return the process's peak RSS."""
    from catalogpred.cluster import peak_rss_bytes

    block = np.ones(n_bytes // 8)
    del block
    return peak_rss_bytes()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_worker_peak_rss_is_its_own_not_the_spawning_process(tmp_path):
    """The benchmarks' memory targets are per worker: ``peak_rss_bytes`` on a freshly spawned worker is its own
    high-water mark, not the 800 MB this process holds (``ru_maxrss`` there reports that, as Linux keeps it
    across fork + exec), and it sees the 300 MB the worker itself touched."""
    import resource

    from distributed import Client, LocalCluster

    from catalogpred.cluster import peak_rss_bytes

    ballast = np.ones(800_000_000 // 8)
    assert peak_rss_bytes() > 800e6
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR, local_directory=str(tmp_path)) as cluster, Client(cluster) as client:
        inherited = next(iter(client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024).values()))
        before = next(iter(client.run(peak_rss_bytes).values()))
        after = client.submit(_allocate_and_report, 300_000_000).result()
    del ballast
    assert inherited > 800e6  # what the benchmarks used to report
    assert before < 500e6  # a fresh worker: Python, numpy, distributed
    assert after > before + 250e6 and after < 800e6


def test_the_manifest_counts_what_ran_the_model_of_every_block(caplog):
    """``model_runtime`` of the run manifest: this run's blocks from their results, earlier runs' from their done
    markers (one written before catalogpred recorded it: "not recorded"); no count for blocks without a spectrum to
    predict or that failed; and a warning when the blocks ran on more than one setup."""
    from catalogpred.pipeline.predict import _model_runtimes

    cpu = {"python": "3.11.7", "numpy": "2.4.6", "torch": "2.13.0+cpu", "device": "cpu: Intel Xeon"}
    gpu = {**cpu, "torch": "2.13.0+cu130", "device": "cuda: NVIDIA H100 80GB HBM3"}
    done = {"b0": {"n_rows": 5, "runtime": cpu}, "b1": {"n_rows": 5, "runtime": cpu},
            "b2": {"n_rows": 4},  # an older marker
            "b3": {"n_rows": 0, "runtime": None},  # every spectrum of it rejected at ingest
            "b4": {"n_rows": 0, "error": "RuntimeError: ..."}}  # failed last time, and again now
    results = {"k5": {"block": "b5", "runtime": gpu}, "k6": {"block": "b6", "runtime": gpu},
               "k7": {"block": "b7", "runtime": gpu}}
    blocks = [f"b{i}" for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline.predict"):
        got = _model_runtimes("cat", blocks, done, results)
    assert got == [{**gpu, "blocks": 3}, {**cpu, "blocks": 2}, {"device": "not recorded", "blocks": 1}]
    assert "the blocks of cat ran the model on 3 different software versions or devices" in caplog.text
    assert "cuda: NVIDIA H100 80GB HBM3; torch 2.13.0+cu130, numpy 2.4.6, python 3.11.7 (3 blocks)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline.predict"):
        assert _model_runtimes("cat", blocks[5:], done, results) == [{**gpu, "blocks": 3}]
    assert not caplog.records


def test_resume_refuses_another_store_a_recreated_one_and_other_columns(random_bundle, desi_bundle, cluster_client,
                                                                        tmp_path):
    """A catalog path resumes only the run that made it: not another store, not the same path re-created (each
    survey group has a random id), not other catalog columns (e.g. more surveys); each says --overwrite."""
    from catalogpred.errors import CatalogError
    from catalogpred.mock_survey import write_desi_survey
    from catalogpred.pipeline import run_ingest

    client = cluster_client[1]
    st_a, st_b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for st in (st_a, st_b):
        bench_pipeline.write_synthetic_store(st, 16, shard_rows=8, chunk_rows=4)
    write_desi_survey(tmp_path / "desi", 1, spectra_per_file=10, seed=3, resolution=False)
    run_ingest([str(tmp_path / "desi")], str(st_a), client=client, shard_rows=8, chunk_rows=4, progress=False)
    bundles = [str(random_bundle), str(desi_bundle)]
    path = str(tmp_path / "catalog")
    first = run_predict(str(st_a), bundles, path, client=client, progress=False, torch_threads=1, surveys=["sdss"],
                        read_engine="zarr")
    assert first.rows == 16
    rejects_before = (Path(path) / "rejects.parquet").read_bytes()
    with pytest.raises(CatalogError, match="made from the store .*a.zarr.*--overwrite"):
        run_predict(str(st_b), bundles, path, client=client, progress=False, torch_threads=1, surveys=["sdss"])
    with pytest.raises(CatalogError, match=r"other columns .*new: \['coadd_fiberstatus'.*--overwrite"):
        run_predict(str(st_a), bundles, path, client=client, progress=False, torch_threads=1)
    assert (Path(path) / "rejects.parquet").read_bytes() == rejects_before  # a refused run changes nothing
    again = run_predict(str(st_a), bundles, path, client=client, progress=False, torch_threads=1, surveys=["sdss"])
    assert again.blocks_skipped == again.blocks == 2  # the same run resumes
    # with no block run, the manifest keeps what read the shards (it said "auto", the re-run's default)
    assert json.loads((Path(path) / "run_manifest.json").read_text())["settings"]["read_engine"] == "zarr"
    shutil.rmtree(st_a)
    bench_pipeline.write_synthetic_store(st_a, 16, shard_rows=8, chunk_rows=4)
    with pytest.raises(CatalogError, match="sdss group was re-created"):
        run_predict(str(st_a), bundles, path, client=client, progress=False, torch_threads=1, surveys=["sdss"])
    fresh = run_predict(str(st_a), bundles, path, client=client, progress=False, torch_threads=1, surveys=["sdss"],
                        overwrite=True)
    assert fresh.blocks_skipped == 0 and fresh.rows == 16


def test_predict_after_more_ingest_adds_only_the_new_blocks(random_bundle, cluster_client, tmp_path, monkeypatch,
                                                            caplog):
    """A survey's store grows (new files ingested into it); predict on the same catalog path predicts only the new
    blocks and finalizes the whole: the catalog and rejects equal those of one predict over the grown store. A
    catalog that outgrew its HEALPix order says how to re-partition it."""
    from catalogpred.mock import write_sdss_survey
    from catalogpred.pipeline import run_ingest

    real_order = cat.choose_order  # the order for 12 rows, and (as if the survey grew 16-fold) 2 more for 22
    monkeypatch.setattr(cat, "choose_order", lambda n, *a, **k: real_order(n, *a, **k) + (2 if n > 20 else 0))
    client = cluster_client[1]
    write_sdss_survey(tmp_path / "night1", 12, seed=1)
    write_sdss_survey(tmp_path / "night2", 10, seed=2, n_bad=2)
    st, path = str(tmp_path / "store.zarr"), str(tmp_path / "catalog")
    kw = dict(client=client, progress=False, torch_threads=1)
    run_ingest([str(tmp_path / "night1")], st, client=client, shard_rows=8, progress=False)
    first = run_predict(st, str(random_bundle), path, **kw)
    assert (first.blocks, first.rows, first.rejects) == (2, 12, 0)
    run_ingest([str(tmp_path / "night2")], st, client=client, shard_rows=8, progress=False)
    with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline"):
        grown = run_predict(st, str(random_bundle), path, **kw)
    assert (grown.blocks, grown.blocks_skipped, grown.inputs, grown.rows, grown.rejects) == (4, 2, 24, 22, 2)
    assert grown.order == first.order  # a catalog keeps its HEALPix order (--overwrite re-partitions)
    assert all(len(files) == 1 for files in _files_by_leaf(path).values())  # new blocks merged into merged leaves
    assert [r.getMessage() for r in caplog.records if "re-partitions" in r.getMessage()] == [
        f"{path} holds 22 rows at HEALPix order {first.order} (about 0 per leaf on an all-sky spread); order "
        f"{first.order + 2} suits it: predict --overwrite --order {first.order + 2} re-partitions it"]
    whole = run_predict(st, str(random_bundle), str(tmp_path / "whole"), order=first.order, **kw)
    assert whole.blocks_skipped == 0
    for name in ("dataset", "rejects.parquet"):
        a, b = (pq.read_table(Path(p) / name).to_pandas().sort_values("source_id").reset_index(drop=True)
                for p in (path, tmp_path / "whole"))
        assert len(a) == (22 if name == "dataset" else 2) and a.equals(b), name


def test_query_id_of_a_rejected_spectrum_names_its_reject_reason(random_bundle, tmp_path, capsys):
    """``query --id`` of a spectrum that is in rejects.parquet said only "no row with source_id ..."; with several
    ids, a missing one was dropped silently. Now both name the reject reason."""
    from catalogpred.cli import main

    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 6, shard_rows=6, chunk_rows=3, n_rejected=2)
    cat = str(tmp_path / "catalog")
    assert main(["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", cat, "--workers", "1",
                 "--no-progress", "--device", "cpu"]) == 0
    rejected = pq.read_table(Path(cat) / "rejects.parquet").column("source_id").to_pylist()
    kept = pq.read_table(Path(cat) / "dataset", columns=["source_id"]).column("source_id").to_pylist()
    assert len(rejected) == 2 and len(kept) == 4
    capsys.readouterr()
    assert main(["query", cat, "--id", rejected[0]]) == 1
    assert f"in its rejects.parquet: {rejected[0]} (bad_redshift)" in capsys.readouterr().err
    assert main(["query", cat, "--id", kept[0], "--id", rejected[1], "--columns", "source_id"]) == 0
    out, err = capsys.readouterr()
    assert kept[0] in out and f"no catalog row for {rejected[1]}" in err and "(bad_redshift)" in err


def test_a_group_of_rejects_only_needs_no_bundle(desi_bundle, cluster_client, tmp_path):
    """A store group that holds only rejects (e.g. one broken spec-*.fits beside DESI files) made predict ask for a
    bundle of its grid; its blocks need no model, so predict now writes their rejects without one. A group with
    spectra to predict still needs its bundle."""
    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 4, shard_rows=4, chunk_rows=4, n_rejected=4)  # sdss: 4 rejects
    summary = run_predict(str(st), str(desi_bundle), str(tmp_path / "catalog"), client=cluster_client[1],
                          progress=False, torch_threads=1)
    assert (summary.rows, summary.rejects, summary.inputs) == (0, 4, 4)
    assert pq.read_table(tmp_path / "catalog" / "rejects.parquet").column("reason").to_pylist() == ["bad_redshift"] * 4
    good = tmp_path / "good.zarr"
    bench_pipeline.write_synthetic_store(good, 4, shard_rows=4, chunk_rows=4, n_rejected=1)
    with pytest.raises(ConfigError, match="on the sdss grid but no --model bundle"):
        run_predict(str(good), str(desi_bundle), str(tmp_path / "c2"), client=cluster_client[1], progress=False)


def test_the_finalize_memory_benchmarks_run(tmp_path):
    """bench_query's finalize rows. Footers: a catalog whose part files carry the VO table, as predict's do, read
    by a FooterReader keeping all footers parsed and one keeping 8; the same rows and part files (4 blocks × 48
    pixels) either way. Rejects: the quick run's 40 blocks merged both ways into the same file and counts."""
    import bench_query

    rej = bench_query.rejects_merge(bench_query._ensure_many_rejects(tmp_path, quick=True, rebuild=False))
    assert rej["merged"]["rows"] == rej["all"]["rows"] == 40 * 4096
    assert rej["merged"]["by_reason"] == rej["all"]["by_reason"] and rej["merged"]["bytes"] == rej["all"]["bytes"]

    path = tmp_path / "catalog"
    bench_query.build_catalog(path, 2000, block_rows=500, order=1, vo_table=True)
    part = next((path / cat.DATASET_DIR).glob("**/part-*.parquet"))
    assert b"IVOA.VOTable-Parquet.content" in pq.read_schema(part).metadata
    held = bench_query.footers_held(path, keep=8)
    for how in ("parsed", "compact"):
        assert (held[how]["rows"], held[how]["files"], held[how]["dup"]) == (2000, 4 * 48, 0), held
    assert (held["parsed"]["keep"], held["compact"]["keep"]) == (10 ** 9, 8)
