"""catalogpred on one CUDA GPU: encoder precisions, the store reader, and ``predict`` end to end.

    python bench/bench_gpu.py                      # a machine with a CUDA GPU, CUDA torch and the [gpu] extra
    python bench/bench_gpu.py --bundle demo-output/model --json gpu.json
    python bench/bench_gpu.py --device cpu --quick # the same code on the CPU (a smoke run of this script)

Not part of ``make bench`` (which runs on the 2-core CPU machines); run it where there is a GPU.
Everything is measured in one run, each figure against a baseline of the same run:

1. **Ceilings** of this card: a bf16 and an fp32 (IEEE, no TF32) 8192³ matrix product, and host-to-device
   copies (pinned, pageable). They put the encoder's TFLOP/s and the reader's GB/s in proportion.
2. **Encoder** on the SDSS (3921 px) and DESI (7781 px) grids. Reference (issue 4): the straightforward
   fp32 eager forward pass, batch 256, inference mode, IEEE fp32 (cuDNN TF32 off), host batches copied
   to the device and latents copied back one batch at a time; also the same with torch's default TF32
   convolutions. Against it: catalogpred's :func:`~catalogpred.model.bundle.encode` (the block moves to
   the device once) in fp32 and in bf16 (mixed precision), with each implementation (1-D convolutions,
   GEMMs, channels-last 2-D convolutions) and with ``auto`` (what predict uses). Latent error =
   max |Δ| / max |reference| (and / the smallest latent std); Δmag through a seeded head and through the
   bundle's own head.
3. **Reader**: one store shard's metadata and flux (:func:`catalogpred.store.read_shard`) on one thread,
   with zarr-python alone and with TensorStore for the numeric arrays (the default), each alone and beside
   a thread running Python (another block's work in the same worker: how much the read needs the GIL).
   With ``--parts …,host``, the CPU side of one GPU worker process on any machine: read, an emulated
   model step (the H100's: 27 ms of GPU, the GIL released, and 10 ms of Python per block) and write,
   from 1 and 2 block threads, with each read engine and switch interval, and with each number of
   part-file writer threads (``--write-threads 2,1``, as ``$CATALOGPRED_WRITE_THREADS``), with each
   part-file format (``--part-formats arrow,parquet``: Arrow, what ``predict`` writes when it merges the
   leaves, and Parquet, ``predict --no-merge``'s), and with several such processes (``--procs 2``, as
   ``predict --workers-per-gpu 2``), each with its own GIL. Then finalize, and the merge of the leaves from
   Parquet and from Arrow part files.
   With ``--parts …,blocks``, also what one worker process can do without Dask: ``read_shard`` from 1-8
   threads, and :func:`~catalogpred.tasks.predict_block` (read, bf16 model, Parquet) from 1, 2 and 4
   threads, eager and compiled. The split of task time into read, model, write and the rest (Arrow tables, HEALPix index) under
   contention says whether the GPU, the reads or the interpreter lock bounds a worker.
4. **predict end to end** (:func:`~catalogpred.pipeline.run_predict`, bf16, catalog written, finalized) on
   a LocalCUDACluster with 2, 1 and 3 blocks sharing the GPU (``--blocks``), and optionally with several
   worker processes per GPU (``--procs``, as ``predict --workers-per-gpu``; every worker is warmed
   up, compiled where the run compiles, before the timed run) or with I/O worker processes for the reads and writes
   (``--io-workers``, as ``predict --io-workers``), or with another read engine (``--read-engines
   tensorstore,zarr``, as ``predict --read-engine``) or another GIL switch interval in the workers
   (``--switch-ms 5,0.5``) or number of part-file writer threads (``--write-threads 8,1``), on a
   synthetic SDSS store of 100,000 spectra; for 2
   blocks also 10,000 first, for the peak RSS per worker and its growth (issue 5: < 1.5 GB, < 10 %).
   GPU busy % is sampled with NVML during each run; task time is split into store reads, model and
   Parquet writes, which tells what bounds the run. Then each block count again with
   ``compile="yes"`` (``predict --compile yes``; ``--compile-e2e no`` skips these): each worker compiles
   the encoder in a warm-up run (its time is in the note), then the timed run; the note counts the graphs
   compiled inside the timed run, which should be 0. ``--e2e-repeats N`` times N runs per configuration (the
   value is their median, the note lists each): two machines of one kind, and two runs, differ. Each run
   merges the leaves' part files after the last block, as ``predict`` does by default (the note gives the merge's
   seconds); ``--no-merge-e2e`` also runs each block count with ``predict --no-merge``.
5. **torch.compile** (``--parts …,compile``) of the GEMM and NHWC encoders in bf16, outside predict:
   compile time and speed.

``--compile-e2e only`` runs step 4 compiled only (the RSS rows then come from the first compiled run).

``--json`` writes every row (and the environment) to a file; the table goes to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import format_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_pipeline import synthetic_rows, write_bundle, write_synthetic_store  # noqa: E402

SIZES = {
    "full": dict(n_sdss=16384, n_desi=8192, n_small=10_000, n_large=100_000, blocks=(2, 1, 3), repeats=3,
                 compile_e2e=True),
    "quick": dict(n_sdss=512, n_desi=256, n_small=256, n_large=1024, blocks=(2,), repeats=1, compile_e2e=False),
}
#: on a CPU (a smoke run of this script) bf16 autocast is emulated and ~20x slower than fp32
CPU_ENCODER_ROWS = 32
REF_BATCH = 256
BATCH = 2048
TARGET_E2E = 50_000  # SDSS spectra/s end to end on one H100, bf16 (issue 5)


# ----------------------------------------------------------------------------------------- helpers


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _best(fn, dev: str, repeats: int) -> float:
    """Best wall seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


class _Tf32:
    """Context: cuDNN/cuBLAS TF32 allowed or not (restored on exit)."""

    def __init__(self, allow: bool):
        self.allow = allow

    def __enter__(self):
        self.old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.allow

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.old


class GpuSampler:
    """Mean and max GPU utilisation (NVML, %) while the context is open; ``None`` without NVML."""

    def __init__(self, every: float = 0.05):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._h = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML / no GPU
            self._nvml = None

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)
            self._stop.wait(self.every)

    def __enter__(self):
        if self._nvml:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._nvml:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self):
        return float(np.mean(self.samples)) if self.samples else None


def environment(dev: str) -> dict:
    import importlib.metadata as md

    env = {"device": dev, "torch": torch.__version__, "cpus": os.cpu_count()}
    for pkg in ("zarr", "tensorstore", "dask", "distributed", "dask-cuda", "numcodecs", "pyarrow", "numpy"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if dev.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


# ----------------------------------------------------------------------------------------- 1. ceilings


def ceilings(dev: str, quick: bool) -> tuple[list[dict], dict]:
    n = 1024 if (quick or not dev.startswith("cuda")) else 8192
    out = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp32", torch.float32, False)):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        with _Tf32(tf32):
            t = _best(lambda a=a, b=b: [a @ b for _ in range(5)], dev, 2) / 5
        out[name] = 2 * n**3 / t / 1e12
        del a, b
    rows = [{"name": f"ceiling: {k} matmul {n}^3", "value": v, "unit": "TFLOP/s", "note": "IEEE fp32 (no TF32)"
             if k == "fp32" else None} for k, v in out.items()]
    if dev.startswith("cuda"):
        host = torch.empty(256 * 2**20 // 4, dtype=torch.float32)
        pinned = host.pin_memory()
        for name, src in (("pinned", pinned), ("pageable", host)):
            t = _best(lambda: src.to(dev, non_blocking=False), dev, 3)
            out[f"h2d_{name}"] = src.numel() * 4 / t / 1e9
            rows.append({"name": f"ceiling: host-to-device copy, {name}", "value": out[f"h2d_{name}"], "unit": "GB/s"})
    return rows, out


# ----------------------------------------------------------------------------------------- 2. encoder


def _reference_encode(enc, flux: np.ndarray, dev: str) -> np.ndarray:
    """The straightforward fp32 eager pass: host batch of 256 -> device -> encoder -> host."""
    out = []
    with torch.inference_mode():
        for lo in range(0, len(flux), REF_BATCH):
            out.append(enc(torch.from_numpy(flux[lo:lo + REF_BATCH]).to(dev)).cpu())
    return torch.cat(out).numpy()


def encoder_rows(dev: str, grid, n: int, bundle: str | None, repeats: int, peak: dict) -> list[dict]:
    from catalogpred.model.bundle import encode
    from catalogpred.model.encoder import encoder_flops
    from catalogpred.model.head import head_features

    model, from_bundle = _load_model(dev, grid, bundle)
    enc = model.encoder
    d = synthetic_rows(np.random.default_rng(11), n, grid.wave)
    flux = np.ascontiguousarray(d["flux"])
    z = torch.as_tensor(d["z"], dtype=torch.float32, device=dev)
    norm = torch.as_tensor(d["norm"], dtype=torch.float32, device=dev)
    flops = encoder_flops(grid.n_pix)

    from catalogpred.model.head import IRHead

    torch.manual_seed(1)
    seeded_head = IRHead().to(dev).eval()

    def mags(lat, head=seeded_head):
        if head is None:
            return None
        with torch.inference_mode():
            m, _ = head(head_features(torch.as_tensor(lat, device=dev), z, norm))
        return m.float().cpu().numpy()

    with _Tf32(False):
        t_ref = _best(lambda: _reference_encode(enc, flux, dev), dev, repeats)
        lat_ref = _reference_encode(enc, flux, dev)
    m_ref = mags(lat_ref)
    trained = model.head if from_bundle else None  # the bundle's own head, trained on this encoder's latents
    mt_ref = mags(lat_ref, trained)
    scale = float(np.max(np.abs(lat_ref)))
    spread = float(np.min(np.std(lat_ref, axis=0)))  # smallest latent spread across spectra
    rows = [{"name": f"encoder {grid.name}: reference fp32 eager, batch {REF_BATCH}", "value": n / t_ref,
             "unit": "spectra/s", "note": f"{n:,d} spectra; IEEE fp32; {n / t_ref * flops / 1e12:.2f} TFLOP/s"}]
    if dev.startswith("cuda"):  # what plain torch gives: cuDNN convolutions in TF32 by default
        with _Tf32(True):
            t_tf32 = _best(lambda: _reference_encode(enc, flux, dev), dev, repeats)
            err = float(np.max(np.abs(_reference_encode(enc, flux, dev) - lat_ref)) / scale)
        rows.append({"name": f"encoder {grid.name}: reference with TF32 convolutions (torch default)",
                     "value": n / t_tf32, "unit": "spectra/s", "baseline": n / t_ref, "ratio": t_ref / t_tf32,
                     "note": f"latent err {err:.1e}"})
    variants = [("fp32 (IEEE) convolutions", "fp32", BATCH, "conv"), ("fp32 (IEEE) NHWC", "fp32", BATCH, "nhwc"),
                ("bf16 mixed convolutions", "bf16", BATCH, "conv"), ("bf16 mixed GEMM", "bf16", BATCH, "gemm"),
                ("bf16 mixed NHWC", "bf16", BATCH, "nhwc"), ("bf16 auto (as predict)", "bf16", BATCH, "auto")]
    for label, precision, batch, impl in variants:
        with _Tf32(False):
            t = _best(lambda: encode(enc, flux, batch_size=batch, precision=precision, device=dev, impl=impl), dev,
                      repeats)
            lat = encode(enc, flux, batch_size=batch, precision=precision, device=dev, impl=impl)
        err = float(np.max(np.abs(lat - lat_ref)) / scale)
        err_spread = float(np.max(np.abs(lat - lat_ref)) / spread)
        dmag = float(np.max(np.abs(mags(lat) - m_ref)))
        dmag_trained = float(np.max(np.abs(mags(lat, trained) - mt_ref))) if trained is not None else None
        tflops = n / t * flops / 1e12
        peak_key = "bf16" if precision == "bf16" else "fp32"
        row = {"name": f"encoder {grid.name}: catalogpred {label}, batch {batch}", "value": n / t, "unit": "spectra/s",
               "baseline": n / t_ref, "ratio": t_ref / t,
               "note": f"latent err {err:.1e} of max|latent|, {err_spread:.1e} of the smallest latent std; "
                       f"max|dmag| {dmag:.4f} (seeded head)"
                       + (f", {dmag_trained:.4f} (bundle head)" if dmag_trained is not None else "")
                       + f"; {tflops:.1f} TFLOP/s = {tflops / peak[peak_key]:.0%} of measured {peak_key} matmul"}
        if precision == "bf16" and batch == BATCH and impl == "auto":
            row["target"] = ">= 1.8x, err <= 1%, dmag <= 0.02"
            row["pass"] = t_ref / t >= 1.8 and err <= 0.01 and dmag <= 0.02
        if precision == "fp32" and impl == "conv":
            row["target"] = ">= 1.0x, err <= 1e-5"
            row["pass"] = t_ref / t >= 0.95 and err <= 1e-5
        rows.append(row)
    return rows


def compiled_rows(dev: str, grid, n: int, bundle: str | None, repeats: int) -> list[dict]:
    """torch.compile (inductor, default mode) of the GEMM and NHWC encoders in bf16 (mixed): compile time, speed.

    ``predict --compile`` compiles the NHWC path (``model.bundle.COMPILE_IMPL``); the GEMM path is the
    alternative. The baseline is the same IEEE fp32 reference as in :func:`encoder_rows`.
    """
    from catalogpred.model.encoder import features_gemm, features_nhwc

    enc = _load_model(dev, grid, bundle)[0].encoder
    flux = np.ascontiguousarray(synthetic_rows(np.random.default_rng(11), n, grid.wave)["flux"])
    x = torch.from_numpy(flux).to(dev)
    with _Tf32(False):
        lat_ref = _reference_encode(enc, flux, dev)
        t_ref = _best(lambda: _reference_encode(enc, flux, dev), dev, 1)
    scale = float(np.max(np.abs(lat_ref)))
    rows = []
    for name, feats in (("GEMM", features_gemm), ("NHWC", features_nhwc)):
        fn = torch.compile(lambda y, f=feats: enc.mlp(f(enc, y, True)), dynamic=False)
        b = min(BATCH, n)

        def run():
            with torch.inference_mode():
                return torch.cat([fn(x[lo:lo + b]).float() for lo in range(0, n - n % b, b)])

        try:
            t0 = time.perf_counter()
            lat = run().cpu().numpy()
            t_compile = time.perf_counter() - t0
            t = _best(run, dev, repeats)
        except Exception as exc:  # noqa: BLE001 - report, keep the other rows
            rows.append({"name": f"encoder {grid.name}: torch.compile {name} bf16", "value": None,
                         "note": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
            continue
        err = float(np.max(np.abs(lat - lat_ref[:len(lat)])) / scale)
        m = len(lat)
        rows.append({"name": f"encoder {grid.name}: torch.compile {name} bf16 mixed, batch {b}", "value": m / t,
                     "unit": "spectra/s", "baseline": n / t_ref, "ratio": (m / t) / (n / t_ref),
                     "note": f"latent err {err:.1e}; compile + first pass {t_compile:.0f} s"})
    return rows


def _load_model(dev: str, grid, bundle: str | None):
    """``(model, True)``: ``bundle`` on ``dev`` if it is on ``grid``; else ``(seeded encoder and head, False)``
    (the published architecture's cost)."""
    from catalogpred.model.bundle import load_bundle

    model = load_bundle(bundle, dev) if bundle else None
    if model is not None and model.info.grid.n_pix == grid.n_pix:
        return model, True
    tmp = tempfile.mkdtemp()
    try:
        return load_bundle(_seeded_bundle(tmp, grid), dev), False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _seeded_bundle(root: str, grid) -> str:
    from catalogpred.model.bundle import ModelCard, save_bundle
    from catalogpred.model.encoder import SpectrumEncoder
    from catalogpred.model.head import IRHead

    torch.manual_seed(0)
    save_bundle(os.path.join(root, grid.name), SpectrumEncoder(n_pix=grid.n_pix), IRHead(), name="bench", version="0",
                grid=grid, card=ModelCard(kind="demo", summary="seeded benchmark bundle (random weights)"))
    return os.path.join(root, grid.name)


# ----------------------------------------------------------------------------------------- 3. reader


def _beside_a_python_thread(fn) -> tuple[float, float]:
    """``(wall s of fn(), loops/s of a pure-Python thread running meanwhile)``: the other thread stands for
    another block's Python work in the same worker process (it only lets go of the GIL when forced)."""
    stop, loops = threading.Event(), []

    def spin():
        n = 0
        while not stop.is_set():
            n += 1
        loops.append(n)

    t = threading.Thread(target=spin)
    t.start()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    stop.set()
    t.join()
    return wall, loops[0] / wall


def reader_rows(dev: str, store_path: str, repeats: int, switch_ms=(None,)) -> tuple[list[dict], float]:
    """What a predict task reads first: one shard's metadata and flux (:func:`catalogpred.store.read_shard`),
    with each read engine, alone and beside a thread running Python (at each GIL switch interval of
    ``switch_ms``, None: Python's default), with the memory settings of a ``dev`` worker
    (:func:`~catalogpred.tasks.read_block`). Returns the rows and the default engine's rate."""
    from catalogpred import store
    from catalogpred.tasks import TRIM_MIB, _keep_freed_memory

    _keep_freed_memory(TRIM_MIB[f"predict-{dev.split(':')[0]}"])
    _, layout = store.open_survey(store_path, "sdss")
    shards = [int(s) for s in store.done_shards(store_path, "sdss")][:8]
    shard = shards[1] if len(shards) > 1 else shards[0]
    n = store.read_shard(store_path, "sdss", shard)[0].num_rows
    mb = n * layout.grid.n_pix * 4 / 1e6
    engines = ["zarr"] + (["tensorstore"] if store.resolve_read_engine("auto", store_path) == "tensorstore" else [])
    alone_loops = _beside_a_python_thread(lambda: time.sleep(0.5))[1]
    rows, rate, busy_base = [], {}, None
    for engine in engines:
        t = _best(lambda: store.read_shard(store_path, "sdss", shard, engine=engine), "cpu", repeats)
        rate[engine] = n / t
        rows.append({"name": f"reader: one {n:,d}-row shard, metadata + flux (read_shard), {engine}, one thread",
                     "value": n / t, "unit": "spectra/s", "baseline": rate["zarr"], "ratio": n / t / rate["zarr"],
                     "note": f"{t * 1e3:.0f} ms; flux {mb / t / 1e3:.2f} GB/s decoded"})
    default_switch = sys.getswitchinterval()
    for engine, sw in [(e, sw) for sw in switch_ms for e in engines]:
        sys.setswitchinterval(default_switch if sw is None else sw / 1e3)
        rows_read = sum(store.read_shard(store_path, "sdss", s, engine=engine)[0].num_rows for s in shards)
        wall, loops = _beside_a_python_thread(
            lambda: [store.read_shard(store_path, "sdss", s, engine=engine) for s in shards])
        sys.setswitchinterval(default_switch)
        busy_base = busy_base or rows_read / wall
        rows.append({"name": f"reader: read_shard beside a thread running Python, {engine}, {len(shards)} shards"
                             + (f", switch interval {sw:g} ms" if sw is not None else ""),
                     "value": rows_read / wall, "unit": "spectra/s", "baseline": busy_base,
                     "ratio": rows_read / wall / busy_base,
                     "note": f"{1e3 * wall / len(shards):.0f} ms per shard (alone {1e3 * n / rate[engine]:.0f} ms); "
                             f"the other thread ran at {100 * loops / alone_loops:.0f}% of its speed alone; "
                             f"GIL switch interval {(default_switch if sw is None else sw / 1e3) * 1e3:g} ms"})
    return rows, rate[store.resolve_read_engine("auto", store_path)]


def _predict_columns(store_path: str, bundle: str | None = None) -> tuple[list, int]:
    """The catalog columns and HEALPix order that :func:`~catalogpred.pipeline.run_predict` would use (without a
    ``bundle``: the 10 latents of :func:`_emulated_infer`)."""
    from catalogpred import catalog as cat
    from catalogpred import store
    from catalogpred.model.bundle import read_bundle_info
    from catalogpred.surveys import column_docs

    _, layout = store.open_survey(store_path, "sdss")
    n = store.read_meta(store_path, "sdss", ["status"]).num_rows  # non-EMPTY rows, as run_predict counts them
    n_latent = read_bundle_info(bundle).n_latent if bundle else 10
    return cat.catalog_columns(n_latent, layout.meta_columns, column_docs(["sdss"])), cat.choose_order(n)


def block_rows(dev: str, root: Path, bundle: str, store_path: str, threads=(1, 2, 4)) -> list[dict]:
    """One worker process without Dask: ``read_shard`` and ``predict_block`` over every shard of the store
    from N threads (as N blocks share a GPU worker), with the task-time split."""
    from concurrent.futures import ThreadPoolExecutor

    from catalogpred import store
    from catalogpred.tasks import predict_block

    shards = [int(s) for s in store.done_shards(store_path, "sdss")]
    n = sum(store.read_shard(store_path, "sdss", s)[0].num_rows for s in shards)  # also warms the page cache
    rows = []
    for t in (1, 2, 4, 8):
        with ThreadPoolExecutor(t) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda s: store.read_shard(store_path, "sdss", s), shards))
            wall = time.perf_counter() - t0
        rows.append({"name": f"in-process: read_shard from {t} thread(s), {len(shards)} shards", "value": n / wall,
                     "unit": "spectra/s", "note": f"wall {wall:.2f} s"})
    compiles = (False, True) if dev.startswith("cuda") else (False,)  # a CPU smoke run: eager, 1-2 threads
    threads = threads if dev.startswith("cuda") else threads[:2]
    columns, order = _predict_columns(store_path, bundle)
    precision = "bf16" if dev.startswith("cuda") else "fp32"
    kw = dict(precision=precision, batch_size=BATCH if dev.startswith("cuda") else 64, device=dev.split(":")[0])
    base = None
    for compile in compiles:
        for t in threads:
            cat_path = str(root / f"blocks-{int(compile)}-{t}")
            t_warm = time.perf_counter()
            predict_block(store_path, "sdss", shards[0], bundle, str(root / "blocks-warm"), order, columns,
                          compile=compile, **kw)
            t_warm = time.perf_counter() - t_warm
            with ThreadPoolExecutor(t) as pool, GpuSampler() as gpu:
                t0 = time.perf_counter()
                res = list(pool.map(lambda s: predict_block(store_path, "sdss", s, bundle, cat_path, order, columns,
                                                            compile=compile, **kw), shards))
                wall = time.perf_counter() - t0
            shutil.rmtree(cat_path, ignore_errors=True)
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
            ms = {k: 1e3 * sum(r[f"seconds_{k}"] for r in res) / len(res) for k in ("read", "model", "write")}
            other = 1e3 * sum(r["seconds"] for r in res) / len(res) - sum(ms.values())
            rate = sum(r["n_rows"] + r["n_rejects"] for r in res) / wall
            base = base or rate
            busy = f"GPU busy {gpu.mean:.0f}%; " if gpu.mean is not None else ""
            rows.append({
                "name": f"in-process: predict_block from {t} thread(s), {precision}{', compiled' if compile else ''}",
                "value": rate, "unit": "spectra/s", "baseline": base, "ratio": rate / base,
                "note": f"{busy}ms per block: read {ms['read']:.0f}, model {ms['model']:.0f}, write {ms['write']:.0f}, "
                        f"other {other:.0f}; wall {wall:.1f} s"
                        + (f"; first block (compiles) {t_warm:.0f} s" if compile and t == threads[0] else "")})
            print(format_rows(rows[-1:]), file=sys.stderr, flush=True)
    shutil.rmtree(root / "blocks-warm", ignore_errors=True)
    return rows


#: the model step of a GPU block, for ``--parts host``: milliseconds the GPU computes while the host thread
#: waits without the GIL, and milliseconds of Python (kernel launches, copies) that hold it. From the H100
#: run 3 (bench/results/gpu-h100-2026-11-26-run3.json): the model task took 37 ms per 4,096-row block, and
#: the GPU was busy 20 % of a 136 ms block, about 27 ms; the rest, about 10 ms, is host time.
EMULATED_MODEL_MS = (27.0, 10.0)


def _emulated_infer(block: dict, gpu_ms: float, python_ms: float) -> dict:
    """:func:`~catalogpred.tasks.infer_block`'s output for a block without a model: ``python_ms`` of Python,
    then ``gpu_ms`` asleep (the GIL released, as while a CUDA stream computes); seeded random latents and
    magnitudes of the right shapes."""
    from catalogpred import store

    t0 = time.perf_counter()
    n = int((block["meta"].column("status").to_numpy() == store.RowStatus.OK).sum())
    end = t0 + python_ms / 1e3
    spins = 0
    while time.perf_counter() < end:
        spins += 1
    time.sleep(gpu_ms / 1e3)
    rng = np.random.default_rng(n)
    out = {k: v for k, v in block.items() if k != "flux"}
    out.update(latents=rng.standard_normal((n, 10), dtype=np.float32),
               mean=rng.normal(15, 1, (n, 4)).astype(np.float32), sigma=np.full((n, 4), 0.1, np.float32),
               ood=np.zeros(n, np.float32), model_id="emulated", ood_threshold=1.0,
               seconds_model=time.perf_counter() - t0)
    return out


def _host_block(store_path: str, shard: int, cat_path: str, order: int, columns: list, engine: str,
                model_ms=EMULATED_MODEL_MS, part_format: str = "arrow") -> dict:
    """What a GPU worker does with one block, the model emulated: ``read_block``, :func:`_emulated_infer`,
    ``write_block`` (part files in ``part_format``: ``arrow`` as ``predict`` writes them when it merges the
    leaves, its default; ``parquet`` as ``predict --no-merge`` does)."""
    from catalogpred.tasks import read_block, write_block

    t0 = time.perf_counter()
    block = read_block(store_path, "sdss", shard, device="cuda", engine=engine)
    return write_block(_emulated_infer(block, *model_ms), cat_path, order, columns, started=t0,
                       part_format=part_format)


def _host_process(store_path: str, shards: list, cat_path: str, order: int, columns: list, engine: str,
                  threads: int, model_ms=EMULATED_MODEL_MS, part_format: str = "arrow") -> list[dict]:
    """One emulated GPU worker process (:func:`host_rows`): ``shards`` from ``threads`` block threads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda sh: _host_block(store_path, sh, cat_path, order, columns, engine, model_ms,
                                                    part_format), shards))


def _host_warm(store_path: str, engine: str) -> int:
    """Start-up of a process of the pool: imports, the reader's handles; long enough that each process gets one."""
    from catalogpred.tasks import read_block

    read_block(store_path, "sdss", 0, device="cuda", engine=engine)
    time.sleep(0.5)
    return os.getpid()


def host_rows(root: Path, store_path: str, model_ms=EMULATED_MODEL_MS, switch_ms=(None,), threads=(1, 2),
              repeats: int = 3, write_threads=(None,), procs=(1,), part_formats=("arrow",),
              save=None) -> list[dict]:
    """The host side of one GPU worker process, on any machine: read_block, an emulated model step
    (:data:`EMULATED_MODEL_MS`) and write_block over every shard of the store from 1 and 2 threads (blocks
    sharing a GPU), with each read engine and GIL switch interval, and with the last engine (TensorStore, the
    default, where installed) and each further number of part-file writer threads (``write_threads``, None:
    catalogpred's default), and each further part-file format (``part_formats``: the first, ``arrow``, is what
    ``predict`` writes when it merges the leaves; ``parquet`` is ``predict --no-merge``'s, and what every run
    wrote until 2026-11-28). With ``procs`` above 1, also that many such processes (``predict
    --workers-per-gpu``), each with 1 and 2 block threads and its share of the shards: each has its own
    interpreter lock. Not a GPU figure: what the CPU side allows when the model step costs what it cost
    on the H100, and the GPU has room for more (it was busy 20 % of the time). ``save(rows)``: as in
    :func:`e2e_rows`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from catalogpred import catalog as cat
    from catalogpred import store
    from catalogpred.tasks import block_key

    shards = [int(s) for s in store.done_shards(store_path, "sdss")]
    columns, order = _predict_columns(store_path)
    engines = ["zarr"] + (["tensorstore"] if store.resolve_read_engine("auto", store_path) == "tensorstore" else [])
    default_switch = sys.getswitchinterval()
    rows, base = [], None
    f0 = part_formats[0]
    configs = ([(e, sw, write_threads[0], 1, f0) for e in engines for sw in switch_ms]
               + [(engines[-1], switch_ms[0], w, 1, f0) for w in write_threads[1:]]
               + [(engines[-1], switch_ms[0], write_threads[0], 1, f) for f in part_formats[1:]]
               + [(engines[-1], switch_ms[0], write_threads[0], p, f0) for p in procs if p > 1])
    for engine, sw, writer, n_procs, fmt in configs:
        for t in threads:
            cat_path = str(root / f"host-{engine}-{sw}-{t}-{writer}-{n_procs}-{fmt}")
            sys.setswitchinterval(default_switch if sw is None else sw / 1e3)
            best = None
            try:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(mock.patch.dict(os.environ))  # the environment restored after
                    os.environ.pop("CATALOGPRED_WRITE_THREADS", None)
                    if writer is not None:
                        os.environ["CATALOGPRED_WRITE_THREADS"] = str(writer)
                    if n_procs == 1:
                        def one_round():
                            return _host_process(store_path, shards, cat_path, order, columns, engine, t, model_ms,
                                                 fmt)
                    else:  # spawned processes inherit the environment set above
                        pool = stack.enter_context(ProcessPoolExecutor(
                            n_procs, mp_context=multiprocessing.get_context("spawn")))
                        assert len(set(pool.map(_host_warm, [store_path] * n_procs, [engine] * n_procs))) == n_procs

                        def one_round():
                            parts = pool.map(_host_process, *zip(*[
                                (store_path, shards[i::n_procs], cat_path, order, columns, engine, t, model_ms, fmt)
                                for i in range(n_procs)]))
                            return [r for part in parts for r in part]
                    for _ in range(repeats):
                        shutil.rmtree(cat_path, ignore_errors=True)
                        t0 = time.perf_counter()
                        res = one_round()
                        wall = time.perf_counter() - t0
                        best = (wall, res) if best is None or wall < best[0] else best
            finally:
                sys.setswitchinterval(default_switch)
                shutil.rmtree(cat_path, ignore_errors=True)
            wall, res = best
            assert sorted(r["block"] for r in res) == sorted(block_key("sdss", s) for s in shards)  # each block once
            rate = sum(r["n_rows"] + r["n_rejects"] for r in res) / wall
            base = base or rate
            ms = {k: 1e3 * sum(r[f"seconds_{k}"] for r in res) / len(res) for k in ("read", "model", "write")}
            who = (f"{n_procs} GPU worker processes, {t} block thread(s) each" if n_procs > 1
                   else f"a GPU worker: {t} block thread(s)")
            rows.append({
                "name": f"host side of {who}, reader {engine}"
                        + (f", switch interval {sw:g} ms" if sw is not None else "")
                        + f", {fmt} part files from {writer or cat.default_write_threads()} thread(s)"
                        + f" (model emulated: {model_ms[0]:g} ms GPU + {model_ms[1]:g} ms Python per block)",
                "value": rate, "unit": "spectra/s", "baseline": base, "ratio": rate / base,
                "note": f"best of {repeats}; ms per block: read {ms['read']:.0f}, model {ms['model']:.0f}, "
                        f"write {ms['write']:.0f}; {len(shards)} shards"})
            print(format_rows(rows[-1:]), file=sys.stderr, flush=True)
            if save is not None:
                save(rows)
    return rows


def finalize_rows(root: Path, store_path: str, repeats: int = 3) -> list[dict]:
    """``finalize_catalog`` after the host side of a GPU worker (:func:`host_rows`, 2 block threads) wrote the
    catalog as ``predict --no-merge`` does (Parquet part files): with the part files' footers read as the blocks
    finished (``predict`` reads them in a thread of its client while the workers run: here before the timer)
    against reading them all in finalize (the baseline). Best of ``repeats`` each; the metadata files are rewritten
    each time. Then predict's merge of the leaves (:func:`~catalogpred.catalog.merge_leaf` in threads) from those
    Parquet part files, and from the Arrow part files that ``predict`` writes when it merges (its default), each
    followed by finalize, once."""
    from catalogpred import catalog as cat
    from catalogpred import store
    from catalogpred.tasks import block_key

    shards = [int(s) for s in store.done_shards(store_path, "sdss")]
    columns, order = _predict_columns(store_path)
    n = store.read_meta(store_path, "sdss", ["status"]).num_rows  # the inputs finalize accounts for
    cat_path = str(root / "finalize")
    res = _host_process(store_path, shards, cat_path, order, columns, "auto", 2, part_format="parquet")
    cat.import_finalize_deps_in_background(columns).join()
    finalize_kw = dict(catalog_name="bench", order=order, blocks=[block_key("sdss", s) for s in shards],
                       columns=columns, expected_inputs=n, manifest={})
    best = {}
    for how in ("all footers in finalize", "footers read as blocks finished"):
        for _ in range(repeats):
            footers = None
            if how.startswith("footers read"):
                reader = cat.FooterReader(cat_path, order)
                for r in res:
                    reader.block_done(r["block"], r["pixels"])
                footers = reader.footers()
            t0 = time.perf_counter()
            counts = cat.finalize_catalog(cat_path, **finalize_kw, footers=footers)
            best[how] = min(best.get(how, float("inf")), time.perf_counter() - t0)
    parts = sum(len(r["pixels"]) for r in res)
    base = best["all footers in finalize"]
    rows = [{"name": f"finalize: {counts['catalog_rows']:,d} rows in {parts} part files, {how}", "value": t, "unit": "s",
             "baseline": base, "ratio": t / base, "note": f"best of {repeats}; {len(res)} blocks"}
            for how, t in best.items()]
    # predict's merge of each leaf's part files (before finalize), here from threads as in a GPU worker's task slots
    threads = min(4, os.cpu_count() or 1)
    merge = {"parquet": _merge_and_finalize(cat_path, order, res, threads, finalize_kw)}
    shutil.rmtree(cat_path, ignore_errors=True)
    arrow_path = str(root / "finalize-arrow")
    res_arrow = _host_process(store_path, shards, arrow_path, order, columns, "auto", 2, part_format="arrow")
    merge["arrow"] = _merge_and_finalize(arrow_path, order, res_arrow, threads, finalize_kw)
    shutil.rmtree(arrow_path, ignore_errors=True)
    for m in merge.values():
        assert m["rows"] == counts["catalog_rows"]
    base_merge = merge["parquet"]["merge_s"]
    return rows + [
        {"name": f"merge: {m['files']} {fmt} part files into {m['leaves']} leaf files, {threads} threads",
         "value": m["merge_s"], "unit": "s", "baseline": base_merge, "ratio": m["merge_s"] / base_merge,
         "note": "predict's merge_leaves after the last block (one task per leaf); "
                 + ("from the Arrow part files predict writes when it merges (its default)" if fmt == "arrow" else
                    "from Parquet part files (the baseline: predict --no-merge's, merged by a later run)")}
        for fmt, m in merge.items()] + [
        {"name": f"finalize after the merge from {fmt} part files", "value": m["finalize_s"], "unit": "s",
         "baseline": base, "ratio": m["finalize_s"] / base,
         "note": "one run; merge + finalize after it against finalize on the Parquet part files: "
                 f"{m['merge_s'] + m['finalize_s']:.3f} against {best['footers read as blocks finished']:.3f} s"}
        for fmt, m in merge.items()]


def _merge_and_finalize(cat_path: str, order: int, res: list[dict], threads: int, finalize_kw: dict) -> dict:
    """Merge every leaf of the catalog the blocks ``res`` wrote at ``cat_path`` from ``threads`` threads, then
    finalize it: the seconds of each, the files merged, the leaves and the catalog's rows."""
    from concurrent.futures import ThreadPoolExecutor

    from catalogpred import catalog as cat

    todo = cat.leaves_to_merge(cat_path, order, {r["block"]: r["pixels"] for r in res})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        merged = list(pool.map(lambda leaf: cat.merge_leaf(cat_path, order, *leaf), todo))
    t_merge = time.perf_counter() - t0
    t0 = time.perf_counter()
    counts = cat.finalize_catalog(cat_path, **finalize_kw)
    return {"merge_s": t_merge, "finalize_s": time.perf_counter() - t0, "files": sum(r["merged"] for r in merged),
            "leaves": len(merged), "rows": counts["catalog_rows"]}


# ----------------------------------------------------------------------------------------- 4. end to end


def _maxrss(client) -> float:
    """The largest peak RSS of the workers, bytes (:func:`catalogpred.cluster.peak_rss_bytes`)."""
    from catalogpred.cluster import peak_rss_bytes

    return max(client.run(peak_rss_bytes).values())


def _graphs_compiled() -> int:
    """Graphs torch.compile (dynamo) has compiled in this process, first compilations and recompilations."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _warm_every_worker(client, store_path: str, bundle: str, out: Path, opts: dict) -> None:
    """Predict the warm-up store's first block once on every GPU worker (every worker on CPUs), in parallel,
    so that no process meets its first-block costs (compilation, the encoder implementation timing, CUDA
    start-up) in the timed run. ``run_predict`` on the warm-up store gives its one block to one worker only:
    with several worker processes per GPU the others compiled during the timed run (the H100's 4-process
    figure of 6,356/s, run 3, did)."""
    from catalogpred import store
    from catalogpred.cluster import gpu_task_resources
    from catalogpred.pipeline import DEFAULT_BATCH
    from catalogpred.tasks import predict_block

    cuda = opts["device"] == "cuda"
    columns, order = _predict_columns(store_path, bundle)
    shard = int(store.done_shards(store_path, "sdss")[0])
    workers = [a for a, w in client.scheduler_info()["workers"].items()
               if not cuda or w.get("resources", {}).get("GPU", 0) >= 1]
    futures = [client.submit(predict_block, store_path, "sdss", shard, bundle, str(out / f"worker-{i}"), order, columns,
                             precision=opts["precision"], batch_size=DEFAULT_BATCH[opts["device"]],
                             device=opts["device"], compile=opts["compile"] == "yes", read_engine=opts["read_engine"],
                             workers=[a], allow_other_workers=False, pure=False,
                             resources=gpu_task_resources(opts["blocks_per_gpu"]) if cuda else None)
               for i, a in enumerate(workers)]
    client.gather(futures)
    shutil.rmtree(out, ignore_errors=True)


def e2e_rows(dev: str, root: Path, bundle: str, stores: dict, size: dict, bare_rate: float | None,
             reader_rate: float, save=None) -> list[dict]:
    """``predict`` end to end in every configuration (module docstring, step 4). ``save(rows)`` is called with
    the rows so far after each configuration, so that a run stopped by a time limit keeps what it measured."""
    from catalogpred.cluster import dask_client
    from catalogpred.pipeline import run_predict

    precision = "bf16" if dev.startswith("cuda") else "fp32"
    rows = []
    n_large, n_small = size["n_large"], size["n_small"]
    blocks = size["blocks"] if dev.startswith("cuda") else (1,)
    modes = {"only": ("yes",), True: ("no", "yes")}.get(size.get("compile_e2e"), ("no",))
    engines = size.get("read_engines", ("auto",))
    switches = size.get("switch_ms", (None,))  # None: Python's default (5 ms)
    writers = size.get("write_threads", (None,))  # None: catalog.default_write_threads()
    e0, sw0, w0 = engines[0], switches[0], writers[0]
    procs = [p for p in size.get("procs", ()) if p > 1] if dev.startswith("cuda") else []  # GPU workers per GPU
    configs = ([(b, 1, m, 0, e0, sw0, w0, True) for m in modes for b in blocks]
               + [(b, p, modes[0], 0, e0, sw0, w0, True) for p in procs for b in blocks]
               + [(b, 1, m, io, e0, sw0, w0, True) for io in size.get("io_workers", ()) if io > 0 for m in modes
                  for b in blocks]
               + [(b, 1, modes[0], 0, e, sw0, w0, True) for e in engines[1:] for b in blocks]
               + [(b, 1, modes[0], 0, e0, sw, w0, True) for sw in switches[1:] for b in blocks]
               + [(b, 1, modes[0], 0, e0, sw0, w, True) for w in writers[1:] for b in blocks]
               # predict --no-merge: the part files left as the blocks wrote them (predict before 2026-11-28)
               + [(b, 1, modes[0], 0, e0, sw0, w0, False) for b in blocks if size.get("no_merge_e2e")])
    for b, procs, compile, io, engine, switch_ms, writer, merge in configs:
        kw = (dict(device="cuda", blocks_per_gpu=b, workers_per_gpu=procs) if dev.startswith("cuda")
              else dict(n_workers=2, device="cpu"))
        kw["io_workers"] = io
        opts = dict(progress=False, precision=precision, device=dev.split(":")[0], blocks_per_gpu=b, compile=compile,
                    read_engine=engine, merge=merge)
        tag = f"{b}-{procs}-{compile}-{io}-{engine}-{switch_ms}-{writer}-{merge}"
        t_start = time.perf_counter()
        with dask_client(**kw) as client:
            t_cluster = time.perf_counter() - t_start
            if switch_ms is not None:  # the interpreter's GIL switch interval in every worker process
                client.run(sys.setswitchinterval, switch_ms / 1e3)
            if writer is not None:  # part-file writer threads per block (catalog.default_write_threads)
                client.run(os.environ.__setitem__, "CATALOGPRED_WRITE_THREADS", str(writer))
            t0 = time.perf_counter()
            run_predict(stores["warm"], bundle, str(root / f"warm-{tag}"), client=client, **opts)
            _warm_every_worker(client, stores["warm"], bundle, root / f"warm-workers-{tag}", opts)
            t_warm = time.perf_counter() - t0
            rss_small = None
            if (b == blocks[0] and procs == 1 and compile == modes[0] and not io and engine == e0 and switch_ms == sw0
                    and writer == w0 and merge):
                run_predict(stores["small"], bundle, str(root / f"small-{tag}"), client=client, **opts)
                rss_small = _maxrss(client)
            graphs = client.run(_graphs_compiled)
            timed = []  # (wall s, summary, GPU busy %) of each timed run, into a new catalog each
            for r in range(size.get("e2e_repeats", 1)):
                with GpuSampler() as gpu:
                    t0 = time.perf_counter()
                    s = run_predict(stores["large"], bundle, str(root / f"large-{tag}-{r}"), client=client, **opts)
                    timed.append((time.perf_counter() - t0, s, gpu.mean))
                assert s.rows + s.rejects == n_large and s.settings["compile"] is (compile == "yes"), s.table()
            # a compilation inside the timed runs (a worker's first block of another input kind, say) costs
            # seconds: the H100 figures of 2026-11-27 before the fix of _encode_on_device show it
            compiled = sum(n - graphs.get(w, 0) for w, n in client.run(_graphs_compiled).items())
            rss_large = _maxrss(client)
        # the value is the median run (of an odd number; the slower middle one of an even number), the note lists all
        wall, s, busy_mean = sorted(timed, key=lambda t: t[0])[len(timed) // 2]
        rate = n_large / wall
        busy = f"GPU busy {busy_mean:.0f}%" if busy_mean is not None else "no NVML"
        if len(timed) > 1:
            busy += f"; {len(timed)} timed runs: " + " / ".join(f"{n_large / t[0]:,.0f}" for t in timed) + "/s, the median shown"
        how = ((f", {procs} worker processes per GPU" if procs > 1 else "") + (", torch.compile" if compile == "yes" else "")
               + (f", {io} I/O workers (read, model, write tasks)" if io else "")
               + f", reader {s.settings['read_engine']}"
               + (f", GIL switch interval {switch_ms:g} ms" if switch_ms is not None else "")
               + (f", {writer} part-file writer thread(s)" if writer is not None else "")
               + ("" if merge else ", --no-merge"))
        row = {"name": f"predict end to end, {precision}, {b} block(s) per GPU{how} ({n_large:,d} spectra)"
               if dev.startswith("cuda") else "predict end to end, CPU twin, 2 workers"
                                              f"{how} ({n_large:,d} spectra)",
               "value": rate, "unit": "spectra/s", "baseline": bare_rate,
               "ratio": rate / bare_rate if bare_rate else None,
               "note": f"{busy}; task-s read {s.seconds_read:.1f}, model {s.seconds_model:.1f}, write "
                       f"{s.seconds_write:.1f}; wall {wall:.1f} s, merge after the last block {s.seconds_merge:.2f} s "
                       f"({s.files_merged} files into {s.leaves_merged} leaves, {s.leaves_merged_early} of them "
                       f"as their blocks finished), finalize {s.seconds_finalize:.2f} s; "
                       f"cluster start {t_cluster:.0f} s; "
                       f"reader alone {reader_rate:,.0f}/s per thread"
                       + (f"; warm-up run with compilation {t_warm:.0f} s" if compile == "yes" else "")
                       + (f"; {compiled} graph(s) compiled in the timed run(s)" if compile == "yes" else "")}
        if compile == "yes":
            row["graphs_compiled_in_timed_run"] = compiled
        if dev.startswith("cuda"):
            row["target"] = f">= {TARGET_E2E:,d}/s (H100)"
            row["pass"] = rate >= TARGET_E2E
        rows.append(row)
        print(format_rows([row]), file=sys.stderr, flush=True)
        if rss_small is not None:
            growth = rss_large / rss_small - 1
            rows += [
                {"name": f"predict: peak RSS per worker, {n_small:,d} spectra", "value": rss_small / 1e9, "unit": "GB",
                 "target": "< 1.5", "pass": rss_small < 1.5e9},
                {"name": f"predict: peak RSS per worker, {n_large:,d} spectra", "value": rss_large / 1e9, "unit": "GB",
                 "baseline": rss_small / 1e9, "ratio": rss_large / rss_small, "target": "< 1.5",
                 "pass": rss_large < 1.5e9},
                {"name": f"predict: RSS growth {n_small:,d} -> {n_large:,d} spectra", "value": 100 * growth,
                 "unit": "%", "target": "< 10", "pass": growth < 0.10},
            ]
        if save is not None:
            save(rows)
    return rows


# ----------------------------------------------------------------------------------------- main


def run(dev: str, quick: bool, bundle: str | None, out: Path, json_path: str | None, parts: list[str],
        grids: list[str] = ("sdss", "desi")) -> list[dict]:
    from catalogpred.spectra import DESI_GRID, SDSS_GRID

    size = SIZES["quick" if quick else "full"]
    rows: list[dict] = []
    env = environment(dev)
    print(json.dumps(env), file=sys.stderr, flush=True)

    def save(more=()):
        if json_path:
            Path(json_path).write_text(json.dumps({"environment": env, "rows": rows + list(more)}, indent=2,
                                                  default=str) + "\n")

    if dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    peak = {"bf16": float("nan"), "fp32": float("nan")}
    if "ceilings" in parts:
        r, peak = ceilings(dev, quick)
        rows += r
        save()
    bare = None
    if "encoder" in parts:
        for grid, n in ((SDSS_GRID, size["n_sdss"]), (DESI_GRID, size["n_desi"])):
            if grid.name not in grids:
                continue
            t0 = time.perf_counter()
            n = n if dev.startswith("cuda") else CPU_ENCODER_ROWS
            r = encoder_rows(dev, grid, n, bundle, size["repeats"], peak)
            rows += r
            print(format_rows(r), f"\n[{grid.name} encoder: {time.perf_counter() - t0:.0f} s]", file=sys.stderr,
                  flush=True)
            if grid is SDSS_GRID:
                bare = next(x["value"] for x in r if ("bf16 auto" if dev.startswith("cuda") else "fp32 (IEEE) conv")
                            in x["name"])
            save()
    if any(p in parts for p in ("reader", "host", "blocks", "e2e")):
        root = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=out))
        try:
            bundle_e2e = bundle or write_bundle(root / "model")
            t0 = time.perf_counter()
            procs = max(1, min(16, (os.cpu_count() or 2) - 1))
            stores = {}
            needed = ("warm", "small", "large") if "e2e" in parts or "blocks" in parts else ("large",)
            for name, n in (("warm", 64), ("small", size["n_small"]), ("large", size["n_large"])):
                if name not in needed:
                    continue
                stores[name] = str(root / f"{name}.zarr")
                write_synthetic_store(stores[name], n, processes=procs if n > 8192 else 1, seed=7 if name == "warm" else 5)
            print(f"[stores written: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
            r, reader_rate = reader_rows(dev, stores["large"], size["repeats"], size.get("switch_ms", (None,)))
            rows += r
            save()
            if "host" in parts:
                rows += host_rows(root, stores["large"], switch_ms=size.get("switch_ms", (None,)),
                                  repeats=size["repeats"], write_threads=size.get("write_threads", (None,)),
                                  part_formats=size.get("part_formats", ("arrow",)),
                                  procs=size.get("procs", (1,)), save=save)
                rows += finalize_rows(root, stores["large"], repeats=size["repeats"])
                save()
            if "blocks" in parts:
                rows += block_rows(dev, root, bundle_e2e, stores["large"])
                save()
            if "e2e" in parts:
                rows += e2e_rows(dev, root, bundle_e2e, stores, size, bare, reader_rate, save=save)
                save()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    if "compile" in parts:
        r = compiled_rows(dev, SDSS_GRID, size["n_sdss"] if dev.startswith("cuda") else CPU_ENCODER_ROWS, bundle,
                          size["repeats"])
        rows += r
        print(format_rows(r), file=sys.stderr, flush=True)
        save()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--bundle", default=None, help="an SDSS-grid bundle (default: seeded random weights)")
    p.add_argument("--out", default=str(REPO / "bench-output"), help="where temporary stores go")
    p.add_argument("--json", default=None, help="also write the rows and the environment to this JSON file")
    p.add_argument("--parts", default="ceilings,encoder,e2e,compile",
                   help="comma-separated, run in this order: ceilings,encoder,reader,host,blocks,e2e,compile "
                        "(reader: the store reader alone, also run by the others; host: a GPU worker's CPU side with "
                        "an emulated model step, on any machine; blocks: one worker process without Dask; compile: "
                        "torch.compile rows)")
    p.add_argument("--blocks", default=None, help="blocks per GPU to run end to end, e.g. 2 or 2,1,3 (default 2,1,3)")
    p.add_argument("--grids", default="sdss,desi", help="encoder rows for these grids")
    p.add_argument("--compile-e2e", choices=("yes", "no", "only"), default=None,
                   help="also run end to end with predict --compile yes (default: yes, no with --quick); "
                        "only: compiled runs alone")
    p.add_argument("--io-workers", default=None, help="also run end to end with this many I/O worker processes "
                                                      "(predict --io-workers), e.g. 4,8")
    p.add_argument("--read-engines", default=None,
                   help="run end to end with each predict --read-engine, the first for every config and the others "
                        "for the plain configs, e.g. tensorstore,zarr (default: auto)")
    p.add_argument("--switch-ms", default=None,
                   help="GIL switch intervals (ms) to set in the worker processes (sys.setswitchinterval), the first "
                        "for every config and the others for the plain configs, e.g. 5,0.5 (default: Python's 5 ms)")
    p.add_argument("--write-threads", default=None,
                   help="part-file writer threads per block (CATALOGPRED_WRITE_THREADS), the first for every config "
                        "and the others for the plain configs, e.g. 8,1 (default: catalogpred's, the CPU count up "
                        "to 8)")
    p.add_argument("--part-formats", default=None,
                   help="part-file formats in the host emulation (--parts host), the first for every config and "
                        "the others for the plain configs, e.g. arrow,parquet (default: arrow, predict's when it "
                        "merges the leaves)")
    p.add_argument("--n-large", type=int, default=None,
                   help="spectra in the end-to-end store (default 100,000). More spreads predict's fixed costs "
                        "(start-up, finalize: ~0.4 s at 100,000 on 2 cores) over more blocks, as in a survey run")
    p.add_argument("--e2e-repeats", type=int, default=None,
                   help="timed end-to-end runs per configuration, each into a new catalog (default 1): the row's "
                        "value is the median, its note lists each, e.g. 3 (about 3 s more per run on a GPU)")
    p.add_argument("--no-merge-e2e", action="store_true",
                   help="also run each block count end to end with predict --no-merge (part files left as the blocks "
                        "wrote them), to show what merging the leaves costs")
    p.add_argument("--procs", default=None, help="also run with this many worker processes per GPU (predict "
                                                 "--workers-per-gpu), e.g. 2,3: end to end on a GPU, and the host "
                                                 "emulation (--parts host) on any machine")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.io_workers:
        for v in SIZES.values():
            v["io_workers"] = tuple(int(n) for n in args.io_workers.split(","))
    if args.read_engines:
        for v in SIZES.values():
            v["read_engines"] = tuple(args.read_engines.split(","))
    if args.switch_ms:
        for v in SIZES.values():
            v["switch_ms"] = tuple(float(x) for x in args.switch_ms.split(","))
    if args.write_threads:
        for v in SIZES.values():
            v["write_threads"] = tuple(int(x) for x in args.write_threads.split(","))
    if args.part_formats:
        for v in SIZES.values():
            v["part_formats"] = tuple(args.part_formats.split(","))
    if args.n_large:
        for v in SIZES.values():
            v["n_large"] = args.n_large
    if args.no_merge_e2e:
        for v in SIZES.values():
            v["no_merge_e2e"] = True
    if args.e2e_repeats:
        if args.e2e_repeats < 1:
            p.error("--e2e-repeats must be at least 1")
        for v in SIZES.values():
            v["e2e_repeats"] = args.e2e_repeats
    if args.procs:
        for v in SIZES.values():
            v["procs"] = tuple(int(p) for p in args.procs.split(","))
    if args.compile_e2e:
        for v in SIZES.values():
            v["compile_e2e"] = {"yes": True, "no": False}.get(args.compile_e2e, args.compile_e2e)
    if args.blocks:
        for v in SIZES.values():
            v["blocks"] = tuple(int(b) for b in args.blocks.split(","))
    rows = run(dev, args.quick, args.bundle, Path(args.out), args.json, args.parts.split(","), args.grids.split(","))
    print(format_rows(rows))
    failed = [r["name"] for r in rows if r.get("pass") is False]
    print(f"\ntargets {'met' if not failed else 'NOT met: ' + '; '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
