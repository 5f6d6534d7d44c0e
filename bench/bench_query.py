"""Query speed on a synthetic catalog: a 1° cone via catalogpred vs a full-scan DuckDB query of the same cone.

    python bench/bench_query.py            # 1M rows (built once into bench-output/query-1000000)
    python bench/bench_query.py --quick    # 100k rows

The catalog is written with the same code as ``catalogpred predict`` (``catalog.write_fragment`` per
block, ``write_block_done``, ``finalize_catalog``): the same schema, units, HEALPix order (from the row
count) and leaf layout, with random positions uniform on the sphere and plausible column values.

Both queries return the same rows and all columns, and both run in this process on the same warm
files: catalogpred as ``open_catalog(path).cone(ra, dec, 3600).to_arrow()`` (leaf pruning, then the
exact cut), DuckDB as one ``SELECT * FROM read_parquet(<every part file>) WHERE <haversine> <= 1``
on a connection opened beforehand. Each is timed over several cone centres (median of the
repeats per centre, then the median over centres). Targets (issue 6): cone < 0.5 s and ≥ 10×
faster than the full scan.

``run(quick)`` returns rows ``{name, value, unit, baseline, ratio, target}`` for ``bench/run.py``.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stamp import source_stamp  # noqa: E402
from _table import format_rows  # noqa: E402
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from catalogpred import catalog as cat  # noqa: E402
from catalogpred.query import Cone, open_catalog  # noqa: E402
from catalogpred.surveys import column_docs  # noqa: E402

N_FULL = 1_000_000
N_QUICK = 100_000
BLOCK_ROWS = 262_144
RADIUS_DEG = 1.0
TARGET_SECONDS = 0.5
TARGET_RATIO = 10.0
N_LATENT = 6


def _columns():
    return cat.catalog_columns(N_LATENT, {"plate": "i4", "mjd": "i4", "fiberid": "i4", "specobjid": "U",
                                          "spec_class": "U", "targetid": "i8", "desi_survey": "U",
                                          "flux_w1": "f4", "flux_ivar_w1": "f4"}, column_docs())


def _block(rng: np.random.Generator, start: int, n: int, schema: pa.Schema, ra=None, dec=None) -> pa.Table:
    from hats.pixel_math.spatial_index import compute_spatial_index

    if ra is None:
        ra = rng.uniform(0, 360, n)
        dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    z = rng.uniform(0.01, 0.5, n)
    w1 = rng.normal(15.0, 1.0, n)
    colour = rng.normal([0.0, 0.2, 2.5, 2.4], [0.0, 0.15, 0.6, 0.5], (n, 4))
    mags = (w1[:, None] - np.cumsum(colour, 1)).astype(np.float32)
    errs = np.abs(rng.normal([0.3, 0.35, 0.6, 0.8], 0.05, (n, 4))).astype(np.float32)
    ids = np.arange(start, start + n)
    plate = (266 + ids // 640).astype(np.int32)
    fiber = (1 + ids % 640).astype(np.int32)
    cols = {
        "source_id": pa.array([f"sdss-{p:04d}-51602-{f:04d}" for p, f in zip(plate, fiber)]),
        "survey": pa.array(np.where(ids % 5 == 0, "desi", "sdss")), "ra": ra, "dec": dec, "z": z, "z_err": rng.uniform(1e-5, 1e-4, n),
        "zwarning": np.zeros(n, np.int64),
        **{f"w{i + 1}_mag": mags[:, i] for i in range(4)}, **{f"w{i + 1}_mag_err": errs[:, i] for i in range(4)},
        "latent": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(0, 0.1, n * N_LATENT).astype(np.float32)),
                                                    N_LATENT),
        "norm": rng.lognormal(0, 0.5, n), "snr_median": rng.uniform(2, 20, n).astype(np.float32),
        "flags": rng.choice(np.array([0, 0, 0, 1, 2, 4], np.int32), n), "model_id": pa.array(["bench-1+00000000"] * n),
        "source_file": pa.array([f"spec-{p:04d}-51602-{f:04d}.fits" for p, f in zip(plate, fiber)]),
        "plate": plate, "mjd": np.full(n, 51602, np.int32), "fiberid": fiber,
        "specobjid": pa.array([str(299_489_677_444_933_632 + int(i)) for i in ids]),
        "spec_class": pa.array(["GALAXY"] * n),
        # DESI rows: 17-digit TARGETIDs (exact only as integers) and the FIBERMAP's observed W1 flux, nanomaggies
        # (AB), equal to the prediction, at S/N 20; null for SDSS rows
        "targetid": pa.array(39_627_657_385_600_000 + ids, pa.int64(), mask=ids % 5 != 0),
        "desi_survey": pa.array(["main" if i % 5 == 0 else None for i in ids], pa.string()),
        "flux_w1": pa.array(10 ** ((22.5 - (w1 + 2.699)) / 2.5), pa.float32(), mask=ids % 5 != 0),
        "flux_ivar_w1": pa.array((20 / 10 ** ((22.5 - (w1 + 2.699)) / 2.5)) ** 2, pa.float32(), mask=ids % 5 != 0),
        "_healpix_29": compute_spatial_index(ra, dec).astype(np.int64),
    }
    for f in schema:  # columns added to the catalog format later: typed nulls, so the bench keeps working
        if f.name not in cols:
            cols[f.name] = pa.nulls(n, f.type)
    return pa.Table.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def build_catalog(path, n_rows: int, *, seed: int = 6, block_rows: int = BLOCK_ROWS, order: int | None = None,
                  ra=None, dec=None, vo_table: bool = False, part_format: str = "parquet", finalize: bool = True):
    """Write a synthetic ``n_rows`` catalog at ``path`` the way ``predict`` does; returns the finalize counts.

    Positions are uniform on the sphere unless ``ra``/``dec`` (deg, length ``n_rows``) are given;
    ``order`` defaults to :func:`catalogpred.catalog.choose_order` of the row count. With ``vo_table`` every part
    file carries the VO-Parquet table, as predict's do (their footers are 3-4x larger). ``part_format``: as in
    ``write_fragment`` (``arrow``: part files to merge, which finalize refuses). Without ``finalize``, the blocks'
    part files and done markers only, and None.
    """
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    columns = _columns()
    schema = cat.catalog_schema(columns, {"IVOA.VOTable-Parquet.version": "1.0",
                                          **({"IVOA.VOTable-Parquet.content": cat.vo_table_xml(columns)}
                                             if vo_table else {})})
    order = cat.choose_order(n_rows) if order is None else order
    rng = np.random.default_rng(seed)
    blocks = []
    for b, start in enumerate(range(0, n_rows, block_rows)):
        key = f"bench-{b:06d}"
        stop = min(start + block_rows, n_rows)
        pos = (None, None) if ra is None else (np.asarray(ra[start:stop], float), np.asarray(dec[start:stop], float))
        table = _block(rng, start, stop - start, schema, *pos)
        pixels = cat.write_fragment(path, table, order, key, part_format=part_format)
        cat.write_block_done(path, key, {"block": key, "n_rows": table.num_rows,
                                         "pixels": {str(k): v for k, v in pixels.items()}},
                             cat.REJECTS_SCHEMA.empty_table())
        blocks.append(key)
    if not finalize:
        return None
    manifest = {"catalogpred_run": "bench", "model": {"model_id": "bench-1+00000000", "kind": "bench"},
                "settings": {"order": order}, "blocks": blocks}
    return cat.finalize_catalog(path, catalog_name="catalogpred_bench", order=order, blocks=blocks, columns=columns,
                                expected_inputs=n_rows, manifest=manifest)


def _ensure_catalog(out: Path, n_rows: int, rebuild: bool) -> tuple[Path, float]:
    path = out / f"query-{n_rows}"
    stamp = source_stamp("catalogpred.catalog", "catalogpred.tables", __name__)  # the code that wrote it
    if not rebuild and (path / "hats.properties").exists() and (path / ".bench-stamp").exists():
        try:
            if (open_catalog(path).properties.get("hats_nrows") == str(n_rows)
                    and (path / ".bench-stamp").read_text() == stamp):
                return path, 0.0
        except Exception:  # a broken earlier build: rebuild
            pass
    t0 = time.perf_counter()
    build_catalog(path, n_rows)
    (path / ".bench-stamp").write_text(stamp)
    return path, time.perf_counter() - t0


def _time(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm: file cache, imports, DuckDB metadata
    times, rows = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), rows


def measure(path, *, centres: int = 5, repeats: int = 3, seed: int = 1) -> dict:
    """Time the cone both ways at ``centres`` random centres; medians and row counts."""
    import duckdb

    rng = np.random.default_rng(seed)
    q0 = open_catalog(path)
    files = q0.files()
    con = duckdb.connect()
    file_sql = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    t_cp, t_db, n_cp, n_db = [], [], [], []
    for _ in range(centres):
        ra, dec = float(rng.uniform(0, 360)), float(np.degrees(np.arcsin(rng.uniform(-0.9, 0.9))))
        cone = Cone(ra, dec, RADIUS_DEG)
        sql = f"SELECT * FROM read_parquet({file_sql}, hive_partitioning = false) WHERE {cone.sql()}"

        def via_catalogpred():
            return open_catalog(path).cone(ra, dec, RADIUS_DEG * 3600).to_arrow().num_rows

        def via_duckdb():
            return con.sql(sql).to_arrow_table().num_rows

        t, n = _time(via_catalogpred, repeats)
        t_cp.append(t)
        n_cp.append(n)
        t, n = _time(via_duckdb, repeats)
        t_db.append(t)
        n_db.append(n)
    con.close()
    return {"catalogpred_s": statistics.median(t_cp), "duckdb_s": statistics.median(t_db), "rows": n_cp,
            "rows_duckdb": n_db, "files": len(files), "leaves": len(q0.pixels), "order": q0.order,
            "catalog_rows": int(q0.properties.get("hats_nrows", 0))}


#: the start of each script :func:`_in_fresh_processes` runs: ``peak_mb()``, ``path``, ``how``
_PRELUDE = """
import json, sys, time
from catalogpred import catalog as cat

def peak_mb():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024

path, how = sys.argv[1], sys.argv[2]
"""

_DUPLICATE_CHECK = _PRELUDE + """
import pyarrow.compute as pc, pyarrow.dataset as pads
base, t0 = peak_mb(), time.perf_counter()
if how == "leaf":  # finalize's check
    n_dup = cat.count_duplicate_ids(path)
else:  # every source_id at once (finalize's check until 2026-11-27)
    ids = pads.parquet_dataset(f"{path}/{cat.DATASET_DIR}/_metadata").to_table(columns=["source_id"]).column("source_id")
    n_dup = len(ids) - len(pc.unique(ids))
print(json.dumps({"mb": peak_mb() - base, "s": time.perf_counter() - t0, "dup": n_dup}))
"""


_DATASET_METADATA = _PRELUDE + """
if how == "hats":
    from hats.io.parquet_metadata import write_parquet_metadata
else:
    sys.path.insert(0, "bench")
    import bench_query
    columns = bench_query._columns()
    cat.common_schema(cat.catalog_schema(columns), columns)  # the VO table, built while the blocks run in predict
order = int(open(f"{path}/hats.properties").read().split("hats_order_fixed=")[1].split()[0])
done = cat.read_block_done(path)
base, t0 = peak_mb(), time.perf_counter()
if how == "hats":  # finalize's metadata writer until 2026-11-28
    total = write_parquet_metadata(path)
else:
    total = sum(md.num_rows for md in cat.write_dataset_metadata(path, order, {b: d["pixels"] for b, d in done.items()},
                                                                 columns).values())
print(json.dumps({"mb": peak_mb() - base, "s": time.perf_counter() - t0, "rows": total}))
"""


_FOOTERS = _PRELUDE + """
sys.path.insert(0, "bench")
import bench_query
columns = bench_query._columns()
cat.common_schema(cat.catalog_schema(columns), columns)  # the VO table, built while the blocks run in predict
import pyarrow.dataset  # imported by the duplicate check: before the baseline, as predict's client has it

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

order = int(open(f"{path}/hats.properties").read().split("hats_order_fixed=")[1].split()[0])
done = cat.read_block_done(path)
base, t0 = rss_mb(), time.perf_counter()
reader = cat.FooterReader(path, order, keep=10 ** 9 if how == "parsed" else int(how.split("=")[1]))
for b, d in done.items():  # predict's client, as each block finishes
    reader.block_done(b, d["pixels"])
footers = reader.footers()
held, t1 = rss_mb() - base, time.perf_counter()
written = cat.write_dataset_metadata(path, order, {b: d["pixels"] for b, d in done.items()}, columns, footers)
dup = cat.count_duplicate_ids(path, leaves=cat.leaves_to_check(written))
print(json.dumps({"held_mb": held, "peak_mb": peak_mb() - base, "read_s": t1 - t0, "finalize_s": time.perf_counter() - t1,
                  "rows": sum(f.num_rows for f in written.values()), "files": len(written), "dup": dup,
                  "keep": reader.keep}))
"""


_REJECTS = _PRELUDE + """
import os
blocks = sorted(k for k in cat.read_block_done(path))
dest = f"{path}/rejects-{how}.parquet"
base, t0 = peak_mb(), time.perf_counter()
if how == "all":  # finalize until 2026-11-28: every block's rejects in memory, reasons as Python strings
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq
    with ThreadPoolExecutor(cat._finalize_threads()) as pool:
        tables = list(pool.map(pq.read_table, [cat.block_rejects_path(path, b) for b in blocks]))
    rejects = pa.concat_tables(tables)
    n = rejects.num_rows
    by_reason = {str(k): int(v) for k, v in zip(*np.unique(
        np.asarray(rejects.column("reason").to_pylist(), dtype=object).astype(str), return_counts=True))}
    cat._atomic_write(rejects, cat.Path(dest))
else:
    n, by_reason = cat.merge_rejects(path, blocks, dest)
print(json.dumps({"mb": peak_mb() - base, "s": time.perf_counter() - t0, "rows": n, "by_reason": by_reason,
                  "bytes": os.path.getsize(dest)}))
"""


def _in_fresh_processes(script: str, path, hows: tuple[str, ...]) -> dict:
    """``{how: the JSON that script printed last}``, ``script`` run with ``path`` and each ``how`` in a fresh
    Python process (a peak RSS only grows)."""
    import json
    import subprocess

    out = {}
    for how in hows:
        r = subprocess.run([sys.executable, "-c", script, str(path), how], capture_output=True, text=True,
                           check=True, cwd=REPO)
        out[how] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def dataset_metadata(path) -> dict:
    """Seconds and peak memory (MB over the process's peak before it) of writing ``dataset/_metadata`` and
    ``_common_metadata``: hats' ``write_parquet_metadata`` (the baseline), then finalize's
    :func:`~catalogpred.catalog.write_dataset_metadata` (which leaves the files as finalize wrote them); each in a
    fresh process, page cache warm from the catalog's build or the query rows."""
    return _in_fresh_processes(_DATASET_METADATA, path, ("hats", "catalogpred"))


def duplicate_check(path) -> dict:
    """Peak memory (MB over the process's peak before it) and seconds of finalize's duplicate check, leaf by
    leaf and, as the baseline, every ``source_id`` at once; each in a fresh process (a peak only grows)."""
    return _in_fresh_processes(_DUPLICATE_CHECK, path, ("all", "leaf"))


def footers_held(path, keep: int = cat.FOOTERS_KEPT) -> dict:
    """Memory of the part-file footers predict's client holds while the blocks run (:class:`FooterReader`, over
    every block of the catalog at ``path``), and of finalize's ``_metadata`` and duplicate check with them: every
    footer kept parsed (``"parsed"``, the baseline: predict until 2026-11-28) against the first ``keep`` parsed and
    the rest compact (``"compact"``, predict's default); each in a fresh process."""
    out = _in_fresh_processes(_FOOTERS, path, ("parsed", f"keep={keep}"))
    return {"parsed": out["parsed"], "compact": out[f"keep={keep}"]}


#: the rejects-only run of the rejects row: (blocks, rejects per block); a DESI block of 4,096 spectra can be
#: mostly rejects (sky fibres, stars, …): 1.2M rejects is a run of a few million DESI targets
MANY_REJECTS_FULL = (300, 4096)
MANY_REJECTS_QUICK = (40, 4096)


def _ensure_many_rejects(out: Path, quick: bool, rebuild: bool) -> Path:
    """A catalog directory with only the per-block rejects files (and done markers) finalize merges."""
    n_blocks, n = MANY_REJECTS_QUICK if quick else MANY_REJECTS_FULL
    path = out / f"rejects-{n_blocks}x{n}"
    stamp = source_stamp("catalogpred.catalog", __name__)
    if rebuild or not (path / ".bench-stamp").exists() or (path / ".bench-stamp").read_text() != stamp:
        shutil.rmtree(path, ignore_errors=True)
        rng = np.random.default_rng(5)
        reasons = np.array(["sky_fibre", "not_galaxy", "zwarn", "flux_standard", "bad_fiberstatus"])
        for b in range(n_blocks):
            key = f"desi-{b:06d}"
            ids = np.arange(b * n, (b + 1) * n)
            t = pa.table({"source_id": [f"desi-{39627657385600000 + i}" for i in ids], "survey": ["desi"] * n,
                          "source_file": [f"coadd-main-dark-{10000 + b}.fits"] * n,
                          "source_path": [f"/global/cfs/cdirs/desi/spectro/redux/iron/healpix/main/dark/{b}/"
                                          f"coadd-main-dark-{10000 + b}.fits"] * n,
                          "row_in_file": np.arange(n, dtype=np.int32), "store_row": ids,
                          "stage": ["ingest"] * n, "reason": reasons[rng.integers(0, len(reasons), n)],
                          "detail": ["OBJTYPE='SKY'"] * n}, schema=cat.REJECTS_SCHEMA)
            cat.write_block_done(path, key, {"block": key, "n_rows": 0, "pixels": {}}, t)
        (path / ".bench-stamp").write_text(stamp)
    return path


def rejects_merge(path) -> dict:
    """Peak memory (MB over the process's peak before it) and seconds of writing ``rejects.parquet`` from every
    block's rejects: :func:`~catalogpred.catalog.merge_rejects` against the whole table in memory (the baseline,
    finalize until 2026-11-28); each in a fresh process."""
    return _in_fresh_processes(_REJECTS, path, ("all", "merged"))


#: the many-part-files catalog of the footer rows: (rows, blocks, order) -> 16 blocks x every pixel of the order
MANY_PARTS_FULL = (96_000, 16, 3)
MANY_PARTS_QUICK = (24_000, 16, 2)


def _ensure_many_parts(out: Path, quick: bool, rebuild: bool) -> Path:
    n_rows, n_blocks, order = MANY_PARTS_QUICK if quick else MANY_PARTS_FULL
    path = out / f"parts-{n_rows}-{order}"
    stamp = source_stamp("catalogpred.catalog", "catalogpred.tables", __name__)
    if rebuild or not (path / ".bench-stamp").exists() or (path / ".bench-stamp").read_text() != stamp:
        build_catalog(path, n_rows, block_rows=n_rows // n_blocks, order=order, vo_table=True)
        (path / ".bench-stamp").write_text(stamp)
    return path


#: the merge rows' catalog: (rows, rows per block): predict's blocks are store shards of 4,096 spectra
MERGE_FULL = (1_000_000, 4096)
MERGE_QUICK = (100_000, 4096)


def merge_rows(out: Path, quick: bool, repeats: int = 2) -> list[dict]:
    """What merging each leaf's part files into one file (predict's default since 2026-11-28) costs, and what it
    gains: a column filter that scans every leaf, a 1° cone and finalize, on the catalog as the blocks wrote it
    (the baseline, ``predict --no-merge``: Parquet part files) and after :func:`~catalogpred.pipeline.merge_leaves`
    on a 2-process local cluster (predict's local default on 2 cores). The merge reads what predict's blocks
    write when it merges: the same rows are written again as Arrow part files for it. The catalog is rebuilt each
    run (the merge changes it).

    Positions are uniform on the sky in every block, so every block has rows in every leaf: the worst case. A
    survey's blocks, ingested in plate or tile order, each touch a few leaves, and leave fewer, larger part files.
    """
    from distributed import Client

    from catalogpred.cluster import local_cpu_cluster
    from catalogpred.pipeline import merge_leaves

    n_rows, block_rows = MERGE_QUICK if quick else MERGE_FULL
    path = out / f"merge-{n_rows}-{block_rows}"
    build_catalog(path, n_rows, block_rows=block_rows, vo_table=True)
    blocks = sorted(cat.read_block_done(path))
    order = open_catalog(path).order
    finalize_kw = dict(catalog_name="catalogpred_bench", order=order, blocks=blocks, columns=_columns(),
                       expected_inputs=n_rows, manifest={})

    def measure_layout() -> dict:
        q = open_catalog(path)
        t_filter, n_filter = _time(lambda: q.where("w1_mag < 14").select("source_id,w1_mag").to_arrow().num_rows,
                                   repeats)
        t_cone, n_cone = _time(lambda: q.cone(150.0, 20.0, RADIUS_DEG * 3600).to_arrow().num_rows, repeats)
        t0 = time.perf_counter()
        cat.finalize_catalog(path, **finalize_kw)
        return {"files": len(q.files()), "leaves": len(q.pixels), "filter_s": t_filter, "filter_rows": n_filter,
                "cone_s": t_cone, "cone_rows": n_cone, "finalize_s": time.perf_counter() - t0}

    before = measure_layout()
    build_catalog(path, n_rows, block_rows=block_rows, vo_table=True, part_format="arrow", finalize=False)
    with local_cpu_cluster(2) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # the workers are up before the timer
        t0 = time.perf_counter()
        merged = merge_leaves(client, str(path), order, blocks, progress=False)
        merge_s = time.perf_counter() - t0
    cat.finalize_catalog(path, **finalize_kw)  # as predict does after the merge; measure_layout times a second one
    after = measure_layout()
    same = before["filter_rows"] == after["filter_rows"] and before["cone_rows"] == after["cone_rows"]
    label = f"{n_rows / 1e6:g}M rows" if n_rows >= 1_000_000 else f"{n_rows // 1000}k rows"
    layout = (f"{before['files']:,d} part files ({n_rows // block_rows + bool(n_rows % block_rows)} blocks of "
              f"{block_rows:,d} rows, each over the whole sky) against {after['files']:,d} merged leaf files")
    return [
        {"name": f"merge: {merged['files']:,d} Arrow part files into {merged['leaves']:,d} leaf files ({label})",
         "value": merge_s, "unit": "s", "baseline": None, "ratio": None, "target": None,
         "note": f"merge_leaves on a 2-process local cluster; {merged['rows']:,d} rows; task-seconds "
                 f"{merged['seconds']:.1f}; the part files predict's blocks write when it merges"},
        {"name": f"query: column filter over every leaf, merged leaves ({label})", "value": after["filter_s"],
         "unit": "s", "baseline": before["filter_s"], "ratio": before["filter_s"] / max(after["filter_s"], 1e-9),
         "target": None, "pass": same,
         "note": f"ratio: times faster than the part files as written (the baseline); {layout}; "
                 f"rows {after['filter_rows']:,d} = {before['filter_rows']:,d}; median of {repeats}"},
        {"name": f"query: 1 deg cone, merged leaves ({label})", "value": after["cone_s"], "unit": "s",
         "baseline": before["cone_s"], "ratio": before["cone_s"] / max(after["cone_s"], 1e-9), "target": None,
         "pass": same, "note": f"as above; rows {after['cone_rows']:,d} = {before['cone_rows']:,d}"},
        {"name": f"finalize: merged leaves ({label})", "value": after["finalize_s"], "unit": "s",
         "baseline": before["finalize_s"], "ratio": before["finalize_s"] / max(after["finalize_s"], 1e-9),
         "target": None, "note": "ratio: times faster than finalize on the part files as written (the baseline)"},
    ]


def run(quick: bool = False, *, out=None, rebuild: bool = False) -> list[dict]:
    """Build (or reuse) the synthetic catalog and measure; rows for the shared bench table."""
    out = Path(out) if out is not None else REPO / "bench-output"
    n_rows = N_QUICK if quick else N_FULL
    path, build_s = _ensure_catalog(out, n_rows, rebuild)
    m = measure(path)
    ratio = m["duckdb_s"] / m["catalogpred_s"]
    equal = m["rows"] == m["rows_duckdb"]
    # judged at full size (the quick catalog is too small for pruning to pay: a smoke run, not judged on speed)
    ok = None if quick else bool(m["catalogpred_s"] < TARGET_SECONDS and ratio >= TARGET_RATIO and equal)
    label = f"{n_rows // 1000}k rows" if n_rows < 1_000_000 else f"{n_rows / 1e6:g}M rows"
    rows = [
        {"name": f"query: 1 deg cone, catalogpred ({label})", "value": m["catalogpred_s"], "unit": "s",
         "baseline": m["duckdb_s"], "ratio": ratio, "target": f"< {TARGET_SECONDS} s, ratio >= {TARGET_RATIO:g}",
         "pass": ok, "note": "" if ok is not None else "quick run: speed not judged"},
        {"name": f"query: 1 deg cone, DuckDB full scan ({label})", "value": m["duckdb_s"], "unit": "s",
         "baseline": None, "ratio": None, "target": None},
        {"name": "query: rows per cone (median; equal in both)", "value": statistics.median(m["rows"]), "unit": "rows",
         "baseline": statistics.median(m["rows_duckdb"]), "ratio": None,
         "target": "equal" if equal else f"MISMATCH {m['rows']} vs {m['rows_duckdb']}", "pass": equal},
        {"name": f"query: catalog layout (order {m['order']}, {m['leaves']} leaves)", "value": m["files"],
         "unit": "part files", "baseline": None, "ratio": None, "target": None},
    ]
    dup = duplicate_check(path)
    rows.append({"name": f"finalize: duplicate check leaf by leaf, peak memory ({label})", "value": dup["leaf"]["mb"],
                 "unit": "MB", "baseline": dup["all"]["mb"], "ratio": dup["leaf"]["mb"] / max(dup["all"]["mb"], 1e-9),
                 "target": None, "note": f"{dup['leaf']['s']:.2f} s against {dup['all']['s']:.2f} s for every "
                                         f"source_id at once (the baseline); duplicates found: {dup['leaf']['dup']}"})
    md = dataset_metadata(path)
    rows.append({"name": f"finalize: dataset/_metadata of {m['files']:,d} part files ({label})",
                 "value": md["catalogpred"]["s"], "unit": "s", "baseline": md["hats"]["s"],
                 "ratio": md["catalogpred"]["s"] / max(md["hats"]["s"], 1e-9), "target": None,
                 "note": f"catalogpred's writer ({cat._finalize_threads()} threads) against hats' write_parquet_metadata "
                         f"(the baseline); peak memory {md['catalogpred']['mb']:.0f} against "
                         f"{md['hats']['mb']:.0f} MB; rows {md['catalogpred']['rows']:,d} = {md['hats']['rows']:,d}"})
    held = footers_held(_ensure_many_parts(out, quick, rebuild))
    new, old = held["compact"], held["parsed"]
    rows.append({"name": f"finalize: part-file footers held by predict's client, {new['files']:,d} part files",
                 "value": new["held_mb"], "unit": "MB", "baseline": old["held_mb"],
                 "ratio": new["held_mb"] / max(old["held_mb"], 1e-9), "target": None,
                 "note": f"the first {new['keep']:,d} kept parsed, the rest compact, against all parsed (the baseline); "
                         f"finalize then peaks at {new['peak_mb']:.0f} against {old['peak_mb']:.0f} MB and takes "
                         f"{new['finalize_s']:.2f} against {old['finalize_s']:.2f} s; rows {new['rows']:,d} = "
                         f"{old['rows']:,d}; part files carry the VO table, as predict's do"})
    rej = rejects_merge(_ensure_many_rejects(out, quick, rebuild))
    new, old = rej["merged"], rej["all"]
    rows.append({"name": f"finalize: rejects.parquet from {new['rows']:,d} rejects, peak memory", "value": new["mb"],
                 "unit": "MB", "baseline": old["mb"], "ratio": new["mb"] / max(old["mb"], 1e-9), "target": None,
                 "pass": new["rows"] == old["rows"] and new["by_reason"] == old["by_reason"],
                 "note": f"merged a row group at a time against the whole table in memory (the baseline); "
                         f"{new['s']:.2f} against {old['s']:.2f} s; rows and reasons equal: "
                         f"{new['rows'] == old['rows'] and new['by_reason'] == old['by_reason']}"})
    rows += merge_rows(out, quick)
    if build_s:
        rows.append({"name": f"query: build synthetic catalog ({label})", "value": build_s, "unit": "s",
                     "baseline": None, "ratio": None, "target": None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="example: python bench/bench_query.py --quick")
    p.add_argument("--quick", action="store_true", help=f"{N_QUICK:,d} rows instead of {N_FULL:,d}")
    p.add_argument("--out", default=None, help="where the synthetic catalog goes (default bench-output/)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the synthetic catalog even if present")
    args = p.parse_args(argv)
    rows = run(args.quick, out=args.out, rebuild=args.rebuild)
    print(format_rows(rows))
    cone = rows[0]
    ok = cone["value"] < TARGET_SECONDS and cone["ratio"] >= TARGET_RATIO and rows[2]["pass"]
    verdict = "quick run, speed not judged" if args.quick else f"target {'met' if ok else 'NOT met'}"
    print(f"\n{verdict}: cone {cone['value'] * 1e3:.1f} ms, full scan {cone['baseline'] * 1e3:.1f} ms, "
          f"{cone['ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
