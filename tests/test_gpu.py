"""The GPU path: device choice (NVML, no CUDA context in the client), the dask-cuda cluster, GPU resources
on submit, the device-resident encoder, and the [gpu] extra.

Every GPU code path has a CPU twin here that runs without a GPU (the same functions with
``device="cpu"``, or dask-cuda/NVML replaced by stand-ins that start ordinary worker processes).
Tests marked ``gpu`` run the CUDA path itself and skip without a CUDA device (tests/conftest.py).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import bench_pipeline
import numpy as np
import pytest

from catalogpred.cluster import (GPU_RESOURCE, dask_client, default_torch_threads, gpu_count, gpu_task_resources,
                                 resolve_device)
from catalogpred.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]



def fake_pynvml(count: int | None):
    """A stand-in for nvidia-ml-py's ``pynvml``: ``count`` GPUs, or no driver (init fails) for None."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        if count is None:
            raise NVMLError("NVML Shared Library Not Found")

    mod.NVMLError = NVMLError
    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: None
    mod.nvmlDeviceGetCount = lambda: count
    return mod


# ------------------------------------------------------------------------------------ device choice


def test_resolve_device_from_nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(2))
    assert gpu_count() == 2 and resolve_device("auto") == "cuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_count() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides every GPU
    assert gpu_count() == 0 and resolve_device("auto") == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(None))  # no driver
    assert gpu_count() == 0 and resolve_device("auto") == "cpu"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert gpu_count() == 0 and resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda"
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        resolve_device("gpu")


def test_device_choice_imports_no_gpu_library():
    """The client decides with NVML only: no torch, CuPy or dask-cuda, so no CUDA context can exist."""
    code = ("import sys; from catalogpred.cluster import resolve_device, gpu_count; import catalogpred.pipeline; "
            "d = resolve_device('auto'); print(d, gpu_count(), *(m in sys.modules for m in ('torch', 'cupy', 'dask_cuda')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    device, n, *imported = out.stdout.split()
    assert device == ("cuda" if int(n) else "cpu")
    assert imported == ["False", "False", "False"], out.stdout


# ------------------------------------------------------------------------------------ the CUDA cluster (CPU twin)


def _gpu_task(i):
    import time

    from distributed import get_worker

    w = get_worker()
    time.sleep(0.3)  # long enough for the scheduler to start a second task beside it
    return i, w.address, dict(w.state.available_resources), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_cuda_cluster_one_worker_per_gpu_with_gpu_resource(monkeypatch):
    """dask_client(device="cuda") with dask-cuda and NVML stood in by ordinary LocalCluster workers."""
    from distributed import LocalCluster

    from catalogpred.pipeline import n_workers, run_bounded

    calls = []

    class StandInLocalCUDACluster(LocalCluster):
        def __init__(self, n_workers=None, threads_per_worker=1, memory_limit="auto", **kwargs):
            calls.append(dict(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs))
            super().__init__(n_workers=n_workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                             processes=True, **kwargs)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=StandInLocalCUDACluster))
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(2))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with dask_client(device="cuda", blocks_per_gpu=2) as client:
        assert calls == [dict(n_workers=2, threads_per_worker=2, resources={"GPU": 1}, dashboard_address=None,
                              silence_logs=logging.WARNING)]
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2 and all(w["resources"] == {"GPU": 1} for w in workers)
        assert resolve_device("auto", client) == "cuda" and n_workers(client, GPU_RESOURCE) == 2
        assert default_torch_threads(client) == max(1, (os.cpu_count() or 1) // 2)
        # tasks carry resources={"GPU": 0.5} on submit: two blocks share a worker's GPU, never more
        n = 12
        results, errors = run_bounded(client, _gpu_task, [(i,) for i in range(n)], {}, desc="gpu",
                                      keys=[f"gpu-{i}-{os.urandom(3).hex()}" for i in range(n)], progress=False,
                                      resources=gpu_task_resources(2), tasks_per_worker=2)
    assert not errors and sorted(r[0] for r in results.values()) == list(range(n))
    assert all(r[2]["GPU"] in (0, 0.5) for r in results.values())
    assert any(r[2]["GPU"] == 0 for r in results.values())  # two tasks ran at once on one worker
    assert gpu_task_resources(1) == GPU_RESOURCE
    with pytest.raises(ConfigError, match=">= 1"):
        gpu_task_resources(0)


def _env(name):
    return os.environ.get(name)


def test_workers_per_gpu_twins_each_gpu_worker(monkeypatch):
    """dask_client(device="cuda", workers_per_gpu=2): every GPU gets a second worker process with the same
    CUDA_VISIBLE_DEVICES and GPU=1, and memory "auto" is split between all four; dask-cuda is stood in by a
    SpecCluster that, like LocalCUDACluster, names each worker by its device and rotates the visible list."""
    import copy

    from distributed import LocalCluster

    from catalogpred.pipeline import n_workers, run_bounded

    calls = []

    class StandInLocalCUDACluster(LocalCluster):
        def __init__(self, n_workers=None, threads_per_worker=1, memory_limit="auto", **kwargs):
            calls.append(dict(n_workers=n_workers, memory_limit=memory_limit))
            super().__init__(n_workers=0, threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                             processes=True, **kwargs)
            devices = [str(d) for d in range(n_workers)]
            for i, d in enumerate(devices):
                spec = copy.deepcopy(self.new_spec)
                spec["options"]["env"] = {"CUDA_VISIBLE_DEVICES": ",".join(devices[i:] + devices[:i])}
                self.worker_spec[int(d)] = spec
            self.scale(n_workers)
            self.sync(self._correct_state)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=StandInLocalCUDACluster))
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(2))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with dask_client(device="cuda", blocks_per_gpu=1, workers_per_gpu=2) as client:
        assert calls == [dict(n_workers=2, memory_limit=0.25)]
        info = client.scheduler_info()["workers"]
        assert sorted(str(w["name"]) for w in info.values()) == ["0", "0-1", "1", "1-1"]
        assert all(w["resources"] == {"GPU": 1} for w in info.values()) and n_workers(client, GPU_RESOURCE) == 4
        from distributed.system import MEMORY_LIMIT
        assert all(w["memory_limit"] == int(0.25 * MEMORY_LIMIT) for w in info.values())
        visible = client.run(_env, "CUDA_VISIBLE_DEVICES")
        by_name = {str(info[a]["name"]): v for a, v in visible.items()}
        assert by_name == {"0": "0,1", "0-1": "0,1", "1": "1,0", "1-1": "1,0"}  # a twin drives its worker's GPU
        n = 8
        results, errors = run_bounded(client, _gpu_task, [(i,) for i in range(n)], {}, desc="gpu",
                                      keys=[f"gpu-{i}-{os.urandom(3).hex()}" for i in range(n)], progress=False,
                                      resources=gpu_task_resources(1), tasks_per_worker=1)
    assert not errors and sorted(r[0] for r in results.values()) == list(range(n))
    assert len({r[1] for r in results.values()}) == 4  # every process ran blocks
    with pytest.raises(ConfigError, match=">= 1"):
        with dask_client(device="cuda", workers_per_gpu=0):
            pass
    with pytest.raises(ConfigError, match="local CUDA cluster"):
        with dask_client(2, workers_per_gpu=2):
            pass
    with pytest.raises(ConfigError, match="existing cluster"):
        with dask_client(scheduler="tcp://127.0.0.1:1", workers_per_gpu=2):
            pass


def test_cuda_without_dask_cuda_or_gpu_workers_is_a_clear_error(monkeypatch, random_bundle, tmp_path):
    from distributed import Client, LocalCluster

    from catalogpred.pipeline import run_predict

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed
    with pytest.raises(ConfigError, match=r"\[gpu\]"):
        with dask_client(device="cuda"):
            pass
    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=None))
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(0))
    with pytest.raises(ConfigError, match="no GPU"):
        with dask_client(device="cuda"):
            pass
    # an existing cluster whose workers offer no GPU resource: refused before any task runs
    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 4, shard_rows=4, chunk_rows=4)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        assert resolve_device("auto", client) == "cpu"
        with pytest.raises(ConfigError, match="no Dask worker offers the GPU resource"):
            run_predict(str(st), random_bundle, str(tmp_path / "catalog"), client=client, device="cuda", progress=False)
    assert not (tmp_path / "catalog").exists()


def test_cli_device_flag(random_bundle, tmp_path, capsys):
    from catalogpred.cli import main

    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 4, shard_rows=4, chunk_rows=4)
    base = ["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(tmp_path / "cat")]
    assert main(base + ["--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == ("cuda" if gpu_count() else "cpu")
    if importlib.util.find_spec("dask_cuda") is None:
        assert main(base + ["--device", "cuda"]) == 1
        assert "pip install 'catalogpred[gpu]'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--device", "tpu"])
    assert main(base + ["--dry-run", "--device", "cpu", "--workers-per-gpu", "2"]) == 1  # checked before the plan
    assert "--workers-per-gpu applies to a local CUDA cluster" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the encoder on a device


def _reference_infer(model, flux, z, norm, batch_size):
    """What infer computed before the block moved to the device once: per-batch host tensors."""
    import torch

    from catalogpred.model.head import head_features

    with torch.inference_mode():
        lat = torch.cat([model.encoder(torch.from_numpy(flux[lo:lo + batch_size]))
                         for lo in range(0, len(flux), batch_size)])
        mean, sigma = model.head(head_features(lat, torch.as_tensor(z, dtype=torch.float32),
                                               torch.as_tensor(norm, dtype=torch.float32)))
    return lat.numpy(), mean.numpy(), sigma.numpy()


def _inputs(n=12, seed=0):
    from catalogpred.spectra import SDSS_GRID

    d = bench_pipeline.synthetic_rows(np.random.default_rng(seed), n, SDSS_GRID.wave)
    return np.ascontiguousarray(d["flux"]), d["z"], d["norm"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_infer_moves_block_once_and_returns_host_arrays(random_bundle, device):
    """CPU twin (device="cpu") and the CUDA path: same results as the per-batch reference on the host."""
    from catalogpred.model.bundle import encode, infer, load_bundle

    flux, z, norm = _inputs()
    ref = _reference_infer(load_bundle(random_bundle, "cpu"), flux, z, norm, batch_size=5)
    model = load_bundle(random_bundle, device)
    lat, mean, sigma = infer(model, flux, z, norm, batch_size=5)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in (lat, mean, sigma))
    tol = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)  # cuDNN may use TF32
    np.testing.assert_allclose(lat, ref[0], **tol)
    np.testing.assert_allclose(mean, ref[1], **tol)
    np.testing.assert_allclose(sigma, ref[2], **tol)
    np.testing.assert_allclose(encode(model.encoder, flux, batch_size=7, device=device), ref[0],
                               **(dict(rtol=1e-6, atol=1e-6) if device == "cpu" else tol))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_autocast_close_to_fp32(random_bundle, device):
    from catalogpred.model.bundle import infer, load_bundle

    flux, z, norm = _inputs(n=6, seed=1)  # bf16 autocast is slow on CPUs
    model = load_bundle(random_bundle, device)
    _, m32, s32 = infer(model, flux, z, norm, precision="fp32")
    _, m16, s16 = infer(model, flux, z, norm, precision="bf16")
    assert np.isfinite(m16).all() and np.isfinite(s16).all()
    assert np.abs(m16 - m32).max() < 0.1  # mag


@pytest.mark.gpu
@pytest.mark.parametrize("io_workers", [0, 2])
def test_predict_on_local_cuda_cluster_matches_cpu(random_bundle, tmp_path, client, io_workers):
    """End to end on dask-cuda (bf16) against the CPU run; the client never creates a CUDA context. With
    I/O workers, each block's read and write run on them and only its model task on the GPU worker."""
    import pyarrow.parquet as pq

    from catalogpred.pipeline import run_predict

    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 256, shard_rows=64, chunk_rows=64)
    cpu = run_predict(str(st), random_bundle, str(tmp_path / "cpu"), client=client, progress=False, device="cpu")
    # the GPU run from a fresh client process (this one may hold a CUDA context from the tests above)
    code = ("import sys, torch; from catalogpred.cli import main; "
            f"rc = main(['predict', '--store', {str(st)!r}, '--model', {str(random_bundle)!r}, '--catalog', "
            f"{str(tmp_path / 'gpu')!r}, '--device', 'auto', '--precision', 'bf16', '--batch-size', '64', "
            f"'--io-workers', '{io_workers}', '--no-progress']); "
            "print('RC', rc, 'CUDA_INITIALIZED', torch.cuda.is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "RC 0 CUDA_INITIALIZED False" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    gpu = types.SimpleNamespace(rows=pq.ParquetDataset(tmp_path / "gpu" / "dataset").read().num_rows)
    assert gpu.rows == cpu.rows == 256
    manifest = json.loads((tmp_path / "gpu" / "run_manifest.json").read_text())
    assert manifest["settings"]["device"] == "cuda"
    assert manifest["settings"].get("io_workers", 0) == io_workers
    a = pq.ParquetDataset(tmp_path / "cpu" / "dataset").read().sort_by("source_id")
    b = pq.ParquetDataset(tmp_path / "gpu" / "dataset").read().sort_by("source_id")
    assert a.column("source_id").to_pylist() == b.column("source_id").to_pylist()
    assert np.abs(a.column("w1_mag").to_numpy() - b.column("w1_mag").to_numpy()).max() < 0.1


# ------------------------------------------------------------------------------------ the [gpu] extra


def _index_reachable() -> tuple[bool, str]:
    cfg = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True,
                         text=True)
    url = os.environ.get("PIP_INDEX_URL") or (cfg.stdout.strip() if cfg.returncode == 0 else "") \
        or "https://pypi.org/simple"
    try:
        urllib.request.urlopen(url.rstrip("/") + "/dask-cuda/", timeout=15).close()
        return True, url
    except Exception as exc:  # noqa: BLE001
        return False, f"{url}: {type(exc).__name__}: {exc}"


def test_gpu_extra_resolves_with_pinned_base(tmp_path):
    """``pip install --dry-run '.[gpu]'`` resolves under constraints.txt and changes no pinned package.

    Nothing is installed. 15-60 s here (metadata of the CUDA wheels from the index), so it is not
    marked slow and runs in CI; it skips when pip's index cannot be reached.
    """
    ok, where = _index_reachable()
    if not ok:
        pytest.skip(f"pip cannot reach its package index ({where})")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           "-c", "constraints.txt", ".[gpu]"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    would_install = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                     for i in json.loads(report.read_text())["install"]}
    assert {"dask-cuda", "cupy-cuda13x"} <= set(would_install), would_install
    pins = dict(line.split("#")[0].strip().split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line.split("#")[0])
    for name, version in pins.items():
        assert would_install.get(name.lower(), version) == version, (name, would_install.get(name.lower()))


# ------------------------------------------------------------------------------------ preprocessing on the device


def _xp(name):
    if name == "numpy":
        return np
    import cupy

    return cupy


def _spectra_block(seed=3, n=24):
    """SDSS-grid spectra with the cases ingest meets: NaN flux, zero ivar, a spectrum with no good pixel."""
    from catalogpred.spectra import SDSS_GRID

    rng = np.random.default_rng(seed)
    d = bench_pipeline.synthetic_rows(rng, n, SDSS_GRID.wave)
    flux = (d["flux"] * d["norm"][:, None]).astype(np.float32)
    ivar = np.ascontiguousarray(d["ivar"] / d["norm"][:, None] ** 2, dtype=np.float32)
    mask = np.zeros(flux.shape, np.uint8)
    flux[1, 100:110] = np.nan
    ivar[2, :] = 0.0
    ivar[3, ::3] = 0.0
    return flux, ivar, mask, SDSS_GRID.wave, d["z"]


@pytest.mark.parametrize("xp_name", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_preprocessing_array_namespace_twin(xp_name):
    """check_spectra (masks, normalisation, rejects) and the flux-conserving resampling run the same code on
    numpy and on cupy arrays (``spectra.array_namespace``); the numpy run is the CPU twin, cupy must match it."""
    from catalogpred.spectra import DESI_GRID, check_spectra, fnu_njy_to_flam17, resample_flux_conserving

    xp = _xp(xp_name)
    to_np = (lambda a: a) if xp is np else (lambda a: a.get())
    flux, ivar, mask, wave, z = _spectra_block()
    ref = check_spectra(flux, ivar, mask, wave, z)
    out = check_spectra(xp.asarray(flux), xp.asarray(ivar), xp.asarray(mask), xp.asarray(wave), xp.asarray(z))
    assert all(type(a).__module__.split(".")[0] == xp.__name__ for a in out[:4])
    np.testing.assert_array_equal(to_np(out[2]), ref[2])  # mask bits
    np.testing.assert_allclose(to_np(out[3]), ref[3], rtol=1e-12)  # norm (NaN for rejects)
    np.testing.assert_allclose(to_np(out[0]), ref[0], rtol=1e-6)
    np.testing.assert_allclose(to_np(out[1]), ref[1], rtol=1e-6)
    assert out[4] == ref[4] and out[4][1] is not None and out[4][2] is not None  # NaN flux, no good pixel
    # PFS-style resampling onto the DESI grid (nm -> Å already applied), and nJy -> 1e-17 erg/s/cm²/Å
    w_in = np.linspace(3800.0, 9000.0, 3900)
    f_in = np.abs(np.nan_to_num(flux[:4, :3900])).astype(np.float64) + 1.0
    iv_in = np.full_like(f_in, 4.0)
    r_ref = resample_flux_conserving(w_in, f_in, iv_in, DESI_GRID.wave)
    r = resample_flux_conserving(xp.asarray(w_in), xp.asarray(f_in), xp.asarray(iv_in), xp.asarray(DESI_GRID.wave))
    for a, b in zip(r, r_ref):
        np.testing.assert_allclose(to_np(a), b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_np(fnu_njy_to_flam17(xp.asarray(f_in), xp.asarray(w_in))),
                               fnu_njy_to_flam17(f_in, w_in), rtol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_encoder_implementations_are_the_same_function(random_bundle, device):
    """features_gemm (convolutions as matrix products) and features_nhwc (channels-last 2-D convolutions),
    the GPU candidates, compute the same latents as the module's forward."""
    from catalogpred.errors import BundleError
    from catalogpred.model.bundle import encode, load_bundle

    flux, _, _ = _inputs(n=10, seed=4)
    enc = load_bundle(random_bundle, device).encoder
    conv = encode(enc, flux, batch_size=4, device=device, impl="conv")
    for impl in ("gemm", "nhwc"):
        other = encode(enc, flux, batch_size=4, device=device, impl=impl)
        np.testing.assert_allclose(other, conv, rtol=1e-5, atol=1e-5 * np.abs(conv).max(), err_msg=impl)
    auto = encode(enc, flux, batch_size=4, device=device)  # cpu: conv; cuda: the faster one, timed once
    np.testing.assert_allclose(auto, conv, rtol=1e-5, atol=1e-5 * np.abs(conv).max())
    for impl in ("conv", "gemm", "nhwc"):  # the same mixed precision in each: latents within 0.3 % (issue: 1 %)
        b16 = encode(enc, flux, batch_size=4, device=device, impl=impl, precision="bf16")
        assert np.abs(b16 - conv).max() <= 0.003 * np.abs(conv).max(), impl
    with pytest.raises(BundleError, match="implementation"):
        encode(enc, flux, device=device, impl="fft")


def test_bench_gpu_runs_on_the_cpu(tmp_path, monkeypatch):
    """bench/bench_gpu.py's in-process and end-to-end parts on the CPU twin (tiny sizes): the script the GPU
    runs stays runnable."""
    import bench_gpu as mod

    monkeypatch.setitem(mod.SIZES, "quick", dict(mod.SIZES["quick"], n_small=48, n_large=96, compile_e2e=True,
                                                 io_workers=(2,), read_engines=("tensorstore", "zarr"), switch_ms=(None, 1.0),
                                                 write_threads=(None, 3), no_merge_e2e=True))
    rows = mod.run("cpu", True, None, tmp_path, str(tmp_path / "rows.json"), ["blocks", "e2e"])
    names = [r["name"] for r in rows]
    in_process = [r for r in rows if r["name"].startswith("in-process: predict_block")]
    assert len(in_process) == 2 and all(r["value"] > 0 and "ms per block: read" in r["note"] for r in in_process)
    assert sum(r["name"].startswith("in-process: read_shard") for r in rows) == 4
    assert any(n.startswith("reader:") for n in names) and any("end to end" in n for n in names)
    assert any("end to end" in n and "torch.compile" in n for n in names)
    assert sum("end to end" in n and "2 I/O workers" in n for n in names) == 2  # eager and compiled
    assert sum("end to end" in n and "reader zarr" in n for n in names) == 1  # the other engine: one plain run
    assert sum("end to end" in n and "GIL switch interval 1 ms" in n for n in names) == 1
    assert sum("end to end" in n and "3 part-file writer thread(s)" in n for n in names) == 1
    assert sum("end to end" in n and "--no-merge" in n for n in names) == 1
    e2e = [r for r in rows if "end to end" in r["name"]]
    assert all(" merge " in r["note"] and "finalize" in r["note"] for r in e2e)
    readers = [r for r in rows if r["name"].startswith("reader:")]
    # 2 engines: alone, and beside Python at the default and a 1 ms switch interval
    assert len(readers) == 6 and all(r["value"] > 0 for r in readers)
    assert any("tensorstore" in r["name"] and "beside a thread" in r["name"] for r in readers)
    saved = json.loads((tmp_path / "rows.json").read_text())
    assert saved["environment"]["device"] == "cpu" and len(saved["rows"]) == len(rows)
    rss = next(r for r in rows if r["name"].startswith("predict: peak RSS per worker, 96"))
    assert 0 < rss["value"] < 10


def test_bench_gpu_reader_and_host_parts_on_the_cpu(tmp_path, monkeypatch):
    """``bench_gpu.py --parts reader,host --switch-ms 5,0.5 --procs 2``: both read engines, alone and beside a
    Python thread at each switch interval, then a GPU worker's host side (emulated model step) for each engine,
    interval and 1-2 block threads, and in two processes, writing a real catalog (every block exactly once);
    the interpreter's own interval is restored."""
    import sys

    import bench_gpu as mod

    pytest.importorskip("tensorstore")
    before = sys.getswitchinterval()
    monkeypatch.setitem(mod.SIZES, "quick", dict(mod.SIZES["quick"], n_large=2 * 4096, switch_ms=(5.0, 0.5),
                                                 write_threads=(None, 1), part_formats=("arrow", "parquet"),
                                                 procs=(1, 2)))
    monkeypatch.delenv("CATALOGPRED_WRITE_THREADS", raising=False)
    rows = mod.run("cpu", True, None, tmp_path, None, ["reader", "host"])
    assert sys.getswitchinterval() == before and "CATALOGPRED_WRITE_THREADS" not in os.environ
    host = [r for r in rows if r["name"].startswith("host side of")]
    assert len(host) == 14 and all(r["value"] > 0 and "ms per block: read" in r["note"] for r in host)
    assert sum("2 block thread(s), reader tensorstore, switch interval 0.5 ms" in r["name"] for r in host) == 1
    assert all(", arrow part files from " in r["name"] for r in host[:8])  # predict's, where it merges
    # then one writer thread: with TensorStore (the default reader) at the first switch interval, 1 and 2 blocks
    assert [r["name"].split(":")[1].split(" (")[0] for r in host[-6:-4]] == [
        f" {t} block thread(s), reader tensorstore, switch interval 5 ms, arrow part files from 1 thread(s)"
        for t in (1, 2)]
    # then Parquet part files (predict --no-merge's)
    assert all(", parquet part files from " in r["name"] for r in host[-4:-2])
    # then two worker processes (spawned, each with its share of the shards), 1 and 2 block threads each
    assert [r["name"].split(", reader")[0] for r in host[-2:]] == [
        f"host side of 2 GPU worker processes, {t} block thread(s) each" for t in (1, 2)]
    # then finalize of the catalog the host side wrote: every footer read in finalize, then read beforehand
    fin = [r for r in rows if r["name"].startswith("finalize:")]
    assert [r["name"].split(" files, ")[1] for r in fin] == ["all footers in finalize", "footers read as blocks finished"]
    assert all(r["name"].startswith("finalize: 8,192 rows in ") and r["unit"] == "s" and r["value"] > 0 for r in fin)
    assert fin[1]["baseline"] == fin[0]["value"]
    # then predict's merge of the leaves' part files, and finalize after it
    merge = [r for r in rows if r["name"].startswith("merge: ") or r["name"].startswith("finalize after the merge")]
    assert len(merge) == 4 and all(r["value"] > 0 for r in merge)
    n = merge[0]["name"].split()[1]  # part files merged: the same number from Parquet (the baseline) and from Arrow
    assert merge[0]["name"].startswith(f"merge: {n} parquet part files into ") and int(n) > 0
    assert merge[1]["name"].startswith(f"merge: {n} arrow part files into ")
    assert merge[1]["baseline"] == merge[0]["value"]
    rows = [r for r in rows if r not in host and r not in fin and r not in merge]
    names = [r["name"] for r in rows]
    assert len(rows) == 6 and all(r["value"] > 0 and r["unit"] == "spectra/s" for r in rows)
    assert sum("one thread" in n for n in names) == 2 and sum("switch interval 0.5 ms" in n for n in names) == 2
    assert {("tensorstore" in n) for n in names} == {True, False}
