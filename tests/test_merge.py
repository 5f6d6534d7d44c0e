"""Merging each HEALPix leaf's part files into one file after the last block (``catalog.merge_leaf``,
``pipeline.merge_leaves``): the rows, their order, the atomic protocol, and what finalize makes of merged leaves.

Catalogs are written the way predict writes them (``bench/bench_query.py::build_catalog``: ``write_fragment``,
done markers, ``finalize_catalog``), without a model: with Parquet part files (``predict --no-merge``, then merged) or
Arrow ones (what ``predict`` writes when it merges: finalize refuses them until they are merged).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import bench_query
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogpred import catalog as cat
from catalogpred.errors import CatalogError
from catalogpred.query import open_catalog

ORDER = 1
N_ROWS, BLOCK_ROWS = 3000, 500  # 6 blocks, each with rows in most of the 48 leaves of order 1


def _build(path: Path, part_format: str = "parquet") -> tuple[list[str], dict]:
    bench_query.build_catalog(path, N_ROWS, block_rows=BLOCK_ROWS, order=ORDER, vo_table=True,
                              part_format=part_format, finalize=part_format == "parquet")
    blocks = [f"bench-{b:06d}" for b in range(N_ROWS // BLOCK_ROWS)]
    kw = dict(catalog_name="c", order=ORDER, blocks=blocks, columns=bench_query._columns(), expected_inputs=N_ROWS,
              manifest={})
    return blocks, kw


def _part(path: Path, pixel: int, block: str) -> str:
    """Block ``block``'s part file in leaf ``pixel``, Arrow or Parquet."""
    return cat._part_file(path, ORDER, pixel, block, os.path.exists)


def _parts(path: Path) -> dict[str, list[int]]:
    return {b: d["pixels"] for b, d in cat.read_block_done(path).items()}


def _files_by_leaf(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in sorted((path / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*/[!._]*")):
        out.setdefault(f.parent.name, []).append(f.name)
    return out


def _rows(path: Path):
    """Every row of the catalog's data files, Parquet or Arrow, sorted by source_id."""
    files = sorted((path / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*/[!._]*"))
    return pa.concat_tables(cat._read_whole(str(f)).replace_schema_metadata(None) for f in files).sort_by("source_id")


@pytest.fixture(params=["parquet", "arrow"])
def unmerged(tmp_path, request) -> tuple[Path, list[str], dict]:
    path = tmp_path / "catalog"
    blocks, kw = _build(path, request.param)
    return path, blocks, kw


@pytest.fixture
def unmerged_parquet(tmp_path) -> tuple[Path, list[str], dict]:
    path = tmp_path / "catalog"
    blocks, kw = _build(path)
    return path, blocks, kw


def test_merging_leaves_keeps_every_row_once_in_one_sorted_file_per_leaf(unmerged):
    from hats.io.validation import is_valid_catalog

    path, blocks, kw = unmerged
    before = _rows(path)
    by_leaf = _files_by_leaf(path)
    assert max(len(v) for v in by_leaf.values()) == len(blocks)  # a part file per block in a leaf
    if (path / "hats.properties").exists():  # Parquet part files, finalized as they are (predict --no-merge)
        assert not is_valid_catalog(str(path), strict=True)  # hats' strict check wants one file per leaf
    else:
        with pytest.raises(CatalogError, match=r"part files are Arrow files written to be merged .* run predict "
                                               "again, without --no-merge"):
            cat.finalize_catalog(path, **kw)
    todo = cat.leaves_to_merge(path, ORDER, _parts(path))
    assert [p for p, _ in todo] == sorted(int(leaf.split("=")[1]) for leaf in by_leaf)  # every leaf
    results = [cat.merge_leaf(path, ORDER, pixel, leaf_blocks) for pixel, leaf_blocks in todo]
    assert sum(r["rows"] for r in results) == sum(
        n for d in cat.read_block_done(path).values() for p, n in d["pixels"].items() if int(p) in dict(todo))
    assert sum(r["deleted"] for r in results) == sum(r["merged"] for r in results)

    after = _files_by_leaf(path)
    assert set(after) == set(by_leaf)
    for leaf, files in after.items():
        assert files == [f"{leaf}.parquet"], leaf
    merged = sorted((path / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*/Npix=*.parquet"))
    for f in merged:
        t = pq.read_table(f)
        h = t.column("_healpix_29").to_numpy()
        assert np.all(np.diff(h) >= 0)  # sorted within the leaf, as hats-import sorts one
        assert cat.merged_blocks(f) == sorted(b for b, px in _parts(path).items() if f.parent.name[5:] in px)
        md = t.schema.metadata
        assert md[b"IVOA.VOTable-Parquet.version"] == b"1.0"  # the part files' schema metadata, kept
        longest = max(len(s) for s in t.column("source_id").to_pylist())
        assert int(md[b"table::len::source_id"]) >= longest  # astropy's string widths, for the whole leaf
        assert t.schema.field("w1_mag").metadata == pq.read_schema(f).field("w1_mag").metadata  # units kept
    after_rows = _rows(path)
    assert after_rows.equals(before)  # the same rows, values and all
    assert cat.leaves_to_merge(path, ORDER, _parts(path)) == []  # nothing left to merge

    counts = cat.finalize_catalog(path, **kw)
    assert counts["catalog_rows"] == N_ROWS
    md = pq.read_metadata(path / cat.DATASET_DIR / "_metadata")
    listed = {md.row_group(i).column(0).file_path for i in range(md.num_row_groups)}
    assert listed == {os.path.relpath(f, path / cat.DATASET_DIR)
                      for f in (path / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*/*.parquet")}
    common = pq.read_schema(path / cat.DATASET_DIR / "_common_metadata").metadata
    assert cat.MERGED_BLOCKS_KEY not in common and not [k for k in common if k.startswith(b"table::len::")]
    assert is_valid_catalog(str(path), strict=True)
    q = open_catalog(path)
    assert q.count() == N_ROWS and len(q.files()) == len(by_leaf)


def test_a_stopped_merge_is_finished_by_the_next_merge_or_by_finalize(unmerged):
    """A merge killed before its rename leaves a temporary file (ignored, then deleted by finalize) and every part
    file. The merged file is renamed into place before the part files are deleted; part files it already holds are
    what a merge killed in between leaves, and either the next merge of the leaf or finalize deletes them."""
    path, blocks, kw = unmerged
    pixel, leaf_blocks = cat.leaves_to_merge(path, ORDER, _parts(path))[0]
    # stopped before the rename: a half-written merged file under its temporary name, the part files all there
    half = Path(cat.merged_path(path, ORDER, pixel)).with_name(f".Npix={pixel}.parquet.0123abcd.tmp")
    half.write_bytes(b"PAR1 half a merged file")
    assert (pixel, leaf_blocks) in cat.leaves_to_merge(path, ORDER, _parts(path))  # not counted as a data file
    kept = {f: f.read_bytes() for f in (Path(_part(path, pixel, b)) for b in leaf_blocks[:2])}
    cat.merge_leaf(path, ORDER, pixel, leaf_blocks)
    for f, data in kept.items():  # as if the merge stopped before deleting them
        f.write_bytes(data)
    assert (pixel, leaf_blocks) in cat.leaves_to_merge(path, ORDER, _parts(path))
    again = cat.merge_leaf(path, ORDER, pixel, leaf_blocks)
    assert (again["merged"], again["deleted"], again["rows"]) == (0, 2, None)
    assert _files_by_leaf(path)[f"Npix={pixel}"] == [f"Npix={pixel}.parquet"]

    for pixel_, blocks_ in cat.leaves_to_merge(path, ORDER, _parts(path)):  # the other leaves
        if pixel_ != pixel:
            cat.merge_leaf(path, ORDER, pixel_, blocks_)
    for f, data in kept.items():  # and again, with finalize next
        f.write_bytes(data)
    assert cat.finalize_catalog(path, **kw)["catalog_rows"] == N_ROWS
    assert _files_by_leaf(path)[f"Npix={pixel}"] == [f"Npix={pixel}.parquet"]
    assert len(_rows(path)) == N_ROWS and not half.exists()  # finalize deletes what a killed writer left


def test_a_merged_leaf_takes_in_the_blocks_of_a_grown_store(unmerged):
    """A catalog whose store grew: new blocks write part files into leaves merged by the earlier run; the next merge
    merges them with the merged file. Finalize before that merge counts both (Parquet part files) or refuses the
    Arrow ones."""
    path, blocks, kw = unmerged
    earlier = blocks[:4]
    done = cat.read_block_done(path)
    for pixel, leaf_blocks in cat.leaves_to_merge(path, ORDER, {b: done[b]["pixels"] for b in earlier}):
        cat.merge_leaf(path, ORDER, pixel, leaf_blocks)
    by_leaf = _files_by_leaf(path)
    assert any(len(v) > 1 and f"{leaf}.parquet" in v for leaf, v in by_leaf.items())  # merged + the newer blocks
    if any(f.endswith(".arrow") for v in by_leaf.values() for f in v):  # predict's: finalized once merged
        with pytest.raises(CatalogError, match="Arrow files written to be merged"):
            cat.finalize_catalog(path, **kw)
    else:  # --no-merge part files next to merged files: both count
        assert cat.finalize_catalog(path, **kw)["catalog_rows"] == N_ROWS
    before = _rows(path)
    for pixel, leaf_blocks in cat.leaves_to_merge(path, ORDER, _parts(path)):
        r = cat.merge_leaf(path, ORDER, pixel, leaf_blocks)
        assert cat.merged_blocks(r["file"]) == leaf_blocks
    assert all(len(v) == 1 for v in _files_by_leaf(path).values())
    assert _rows(path).equals(before)
    assert cat.finalize_catalog(path, **kw)["catalog_rows"] == N_ROWS


def test_merge_and_finalize_refuse_what_the_run_did_not_write(unmerged):
    """A source_id in a leaf twice, a missing part file, or a merged file holding a block the run did not finish:
    refused with the reason, and the leaf left as it was."""
    path, blocks, kw = unmerged
    pixel, leaf_blocks = cat.leaves_to_merge(path, ORDER, _parts(path))[0]
    leaf = Path(cat.pixel_dir(path, ORDER, pixel))
    src = Path(_part(path, pixel, leaf_blocks[0]))
    copy = src.with_name(f"part-bench-copy{src.suffix}")
    shutil.copy(src, copy)  # its rows written twice
    listing = sorted(os.listdir(leaf))
    n = cat._read_whole(str(copy)).num_rows
    with pytest.raises(CatalogError, match=f"leaf {pixel} holds {n} source_id values twice"):
        cat.merge_leaf(path, ORDER, pixel, leaf_blocks + ["bench-copy"])
    assert sorted(os.listdir(leaf)) == listing  # nothing written, nothing deleted
    copy.unlink()

    with pytest.raises(CatalogError, match="1 part files of finished blocks are missing"):
        cat.merge_leaf(path, ORDER, pixel, leaf_blocks + ["bench-lost"])
    r = cat.merge_leaf(path, ORDER, pixel, leaf_blocks)
    with pytest.raises(CatalogError, match="holds rows of blocks that are not finished blocks of this run"):
        cat.merge_leaf(path, ORDER, pixel, leaf_blocks[1:])
    marker = Path(cat.block_done_path(path, leaf_blocks[0]))
    os.replace(marker, marker.with_suffix(".aside"))  # the block is not a finished block of this run
    with pytest.raises(CatalogError, match="holds rows of blocks that are not finished blocks of this run"):
        cat.finalize_catalog(path, **{**kw, "blocks": [b for b in blocks if b != leaf_blocks[0]],
                                      "expected_inputs": N_ROWS - BLOCK_ROWS})
    os.replace(marker.with_suffix(".aside"), marker)
    # a merged file without the list of its blocks (not written by catalogpred) is refused too
    t = pq.read_table(r["file"])
    pq.write_table(t.replace_schema_metadata({k: v for k, v in t.schema.metadata.items()
                                              if k != cat.MERGED_BLOCKS_KEY}), r["file"])
    with pytest.raises(CatalogError, match="does not list the blocks it holds"):
        cat.finalize_catalog(path, **kw)


def test_the_merge_benchmark_runs(tmp_path, monkeypatch):
    """bench_query's merge rows at a tiny size: the merge through predict's merge_leaves on a real 2-process local
    cluster, and the same rows from the filter and the cone before and after it."""
    monkeypatch.setattr(bench_query, "MERGE_QUICK", (4000, 1000))
    rows = bench_query.merge_rows(tmp_path, quick=True, repeats=1)
    merge, flt, cone, fin = rows
    assert merge["name"].startswith("merge: ") and " part files into " in merge["name"] and merge["value"] > 0
    assert "4,000 rows" in merge["note"]
    assert flt["pass"] and cone["pass"] and flt["ratio"] > 0 and fin["baseline"] > 0
    path = tmp_path / "merge-4000-1000"
    assert all(len(files) == 1 for files in _files_by_leaf(path).values())
    assert open_catalog(path).count() == 4000


def test_merge_leaves_runs_a_task_per_leaf_and_leaves_a_too_large_leaf_alone(unmerged, caplog):
    """pipeline.merge_leaves on a real (in-process) Dask cluster: one task per leaf; a leaf of more than max_rows
    rows keeps its part files (Arrow ones rewritten as Parquet, one by one), with a warning naming the order that
    re-partitions the catalog."""
    import logging

    from distributed import Client, LocalCluster, get_task_stream

    from catalogpred.pipeline import merge_leaves

    path, blocks, kw = unmerged
    arrow = bool(cat.arrow_part_files(path))
    rows: dict[int, int] = {}
    for d in cat.read_block_done(path).values():
        for p, n in d["pixels"].items():
            rows[int(p)] = rows.get(int(p), 0) + n
    several = [p for p, _ in cat.leaves_to_merge(path, ORDER, _parts(path))]
    cap = sorted(rows[p] for p in several)[len(several) // 2]  # half the leaves are larger
    large = [p for p in several if rows[p] > cap]
    assert large
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client, caplog.at_level(logging.WARNING, logger="catalogpred.pipeline"):
        with get_task_stream(client) as first:
            out = merge_leaves(client, str(path), ORDER, blocks, progress=False, max_rows=cap)
        # again: the too-large leaves now hold Parquet part files only, final as they are, so no merge task runs
        with get_task_stream(client) as second:
            again = merge_leaves(client, str(path), ORDER, blocks, progress=False, max_rows=cap)
    merges = [[t for t in s.data if str(t["key"]).startswith("merge-")] for s in (first, second)]
    assert len(merges[0]) == len(several) - len(large) + (len(large) if arrow else 0)
    assert merges[1] == [] and again == {"leaves": 0, "files": 0, "rows": 0, "seconds": 0.0, "rewritten": 0}
    assert out["leaves"] == len(several) - len(large)
    assert out["rows"] == sum(rows[p] for p in several if p not in large)
    assert [r.getMessage() for r in caplog.records if "keep their part files" in r.getMessage()] == 2 * [
        f"{len(large)} HEALPix leaves at order {ORDER} hold more than {cap:,d} rows each (e.g. leaf {large[0]}: "
        f"{rows[large[0]]:,d} rows) and keep their part files: a merge holds its leaf in a worker's memory. "
        f"predict --overwrite --order {ORDER + 1} re-partitions the catalog into smaller leaves"]  # at each merge
    by_leaf = _files_by_leaf(path)
    assert all(len(by_leaf[f"Npix={p}"]) > 1 for p in large)
    assert all(f.startswith("part-") and f.endswith(".parquet") for p in large for f in by_leaf[f"Npix={p}"])
    assert out["rewritten"] == (sum(len(by_leaf[f"Npix={p}"]) for p in large) if arrow else 0)
    assert not cat.arrow_part_files(path)
    assert all(by_leaf[f"Npix={p}"] == [f"Npix={p}.parquet"] for p in several if p not in large)
    assert cat.finalize_catalog(path, **kw)["catalog_rows"] == N_ROWS


def test_leaf_merger_merges_a_leaf_when_its_planned_blocks_are_done(tmp_path):
    """pipeline.merge.LeafMerger on a real (in-process) Dask cluster, told of the finished blocks one at a time: a
    leaf is merged once every block the plan names for it is done, with the part files of all finished blocks, and
    the others wait. Leaves of the last block that the plan left out are merged without its part files, and
    merge_leaves after the last block merges those into them. The catalog ends with one file per leaf and every row
    once."""
    from distributed import Client, LocalCluster

    from catalogpred.pipeline import merge_leaves
    from catalogpred.pipeline.merge import LeafMerger

    path = tmp_path / "catalog"
    blocks, kw = _build(path, "arrow")
    before, parts = _rows(path), _parts(path)
    plan = {b: set(map(int, parts[b])) for b in blocks}
    late = blocks[-1]
    assert plan[late] == set(range(48))  # every block has rows in every leaf of order 1
    wrong = set(range(24, 48))
    plan[late] -= wrong  # the plan misses half the leaves that the last block writes into
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        merger = LeafMerger(client, str(path), ORDER, plan, {})
        for b in blocks[:-1]:
            merger.block_done(b, parts[b])
        first = merger.finish()
        assert {p for p in range(48) if os.path.exists(cat.merged_path(path, ORDER, p))} == wrong
        assert first["leaves"] == len(wrong) and first["files"] == len(wrong) * (len(blocks) - 1)
        assert all(os.path.exists(_part(path, p, late)) for p in range(48))  # the last block's part files wait
        merger.block_done(late, parts[late])
        done = merger.finish()
        assert done["leaves"] == 48 and done["rows"] == N_ROWS - sum(parts[late][str(p)] for p in wrong)
        rest = merge_leaves(client, str(path), ORDER, blocks, progress=False)
    assert rest["leaves"] == len(wrong) and rest["files"] == 2 * len(wrong)  # each: its merged file, the late part
    assert all(files == [f"{leaf}.parquet"] for leaf, files in _files_by_leaf(path).items())
    assert _rows(path).equals(before)
    assert cat.finalize_catalog(path, **kw)["catalog_rows"] == N_ROWS


def test_leaves_to_merge_and_finalize_take_a_path_spelled_any_way(unmerged, monkeypatch):
    """A relative catalog path with ``./`` or a trailing slash names the same files as the absolute one."""
    path, blocks, kw = unmerged
    monkeypatch.chdir(path.parent)
    want = cat.leaves_to_merge(path, ORDER, _parts(path))
    for spelled in (f"./{path.name}", f"{path.name}/", str(path) + "/"):
        assert cat.leaves_to_merge(spelled, ORDER, _parts(path)) == want, spelled
    for pixel, leaf_blocks in want:
        cat.merge_leaf(f"./{path.name}/", ORDER, pixel, leaf_blocks)
    assert cat.finalize_catalog(f"./{path.name}", **kw)["catalog_rows"] == N_ROWS
    assert cat.write_dataset_metadata(f"./{path.name}/", ORDER, _parts(path), kw["columns"])


def test_arrow_and_parquet_part_files_merge_into_the_same_bytes(tmp_path):
    """The merged leaf files do not depend on the part files' format: the same blocks written as Arrow (predict's,
    when it merges) and as Parquet (predict --no-merge's, merged by a later run) merge into identical files, and a
    leaf of one Arrow part file is written as its merged file too."""
    made = {}
    for fmt in ("arrow", "parquet"):
        path = tmp_path / fmt
        _build(path, fmt)
        results = [cat.merge_leaf(path, ORDER, *leaf) for leaf in cat.leaves_to_merge(path, ORDER, _parts(path))]
        assert all(r["file"] == cat.merged_path(path, ORDER, r["pixel"]) for r in results)
        made[fmt] = {f.relative_to(path): f.read_bytes()
                     for f in sorted((path / cat.DATASET_DIR).glob("Norder=*/Dir=*/Npix=*/*"))}
    assert made["arrow"] == made["parquet"] and len(made["arrow"]) == 48  # every leaf of order 1

    one = tmp_path / "one"  # one block: every leaf holds one part file
    bench_query.build_catalog(one, 400, block_rows=400, order=ORDER, part_format="arrow", finalize=False)
    todo = cat.leaves_to_merge(one, ORDER, _parts(one))
    assert todo and all(len(b) == 1 for _, b in todo)
    for leaf in todo:
        assert cat.merge_leaf(one, ORDER, *leaf)["merged"] == 1
    assert all(files == [f"{leaf}.parquet"] for leaf, files in _files_by_leaf(one).items())
    blocks = sorted(_parts(one))
    counts = cat.finalize_catalog(one, catalog_name="c", order=ORDER, blocks=blocks, columns=bench_query._columns(),
                                  expected_inputs=400, manifest={})
    assert counts["catalog_rows"] == 400
