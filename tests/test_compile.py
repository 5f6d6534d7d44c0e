"""The compiled encoder (``torch.compile``, inductor): the same latents as eager, a fixed batch shape,
an eager fallback where compilation is impossible, and ``predict --compile`` on real worker processes.

The CPU tests are the twin of the GPU path: the same functions with ``device="cpu"`` (inductor's C++
backend instead of Triton). Each compilation takes 5-22 s on 2 cores.
"""
from __future__ import annotations

import json
import logging

import bench_pipeline
import numpy as np
import pyarrow.parquet as pq
import pytest

from catalogpred.cluster import COMPILE_AUTO_ROWS, resolve_compile
from catalogpred.errors import ConfigError


def _flux(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic normalised SDSS-grid spectra float32 [n, 3921]."""
    from catalogpred.spectra import SDSS_GRID

    return np.ascontiguousarray(bench_pipeline.synthetic_rows(np.random.default_rng(seed), n, SDSS_GRID.wave)["flux"])


def test_resolve_compile():
    assert resolve_compile("yes", "cpu", 1, 1) is True
    assert resolve_compile("no", "cuda", 10**9, 1) is False
    assert resolve_compile(True, "cpu", 0, 4) is True
    n = COMPILE_AUTO_ROWS["cpu"]
    assert resolve_compile("auto", "cpu", 2 * n, 2) is True  # n per worker
    assert resolve_compile("auto", "cpu", 2 * n - 1, 2) is False
    assert resolve_compile("auto", "cuda", 2 * n, 2) is False  # a GPU needs many more to pay for compiling
    assert resolve_compile("auto", "cpu", n, 0) is True  # no worker connected yet: count one
    with pytest.raises(ConfigError, match="auto, yes or no"):
        resolve_compile("maybe", "cpu", 1, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_encoder_matches_eager(random_bundle, device):
    """11 rows in batches of 4: two full batches and a last one padded to 4 (one compiled shape)."""
    from catalogpred.model.bundle import _COMPILED, encode, load_bundle

    from torch._dynamo.utils import counters

    flux = _flux(11, seed=3)
    enc = load_bundle(random_bundle, device).encoder
    eager = encode(enc, flux, batch_size=4, device=device, impl="conv")
    n_before, graphs_before = len(_COMPILED), counters["stats"]["unique_graphs"]
    got = encode(enc, flux, batch_size=4, device=device, compile=True)
    assert len(_COMPILED) == n_before + 1 and list(_COMPILED.values())[-1] is not None, "did not compile"
    # one graph: the full batches (views of the block) and the padded last one hit the graph compiled at
    # warm-up; a recompile for an input property (here once: autograd dispatch keys) costs each worker
    # process seconds on its first full block, inside the timed run of bench_gpu's later configurations
    assert counters["stats"]["unique_graphs"] == graphs_before + 1, "recompiled for the blocks' batches"
    assert got.shape == eager.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())
    again = encode(enc, flux[:3], batch_size=4, device=device, compile=True)  # fewer rows than a batch
    assert len(_COMPILED) == n_before + 1, "recompiled for the same batch size"
    np.testing.assert_allclose(again, got[:3], rtol=1e-6, atol=1e-6 * np.abs(eager).max())
    b16 = encode(enc, flux, batch_size=4, device=device, compile=True, precision="bf16")
    assert np.abs(b16 - eager).max() <= 0.003 * np.abs(eager).max()  # the eager mixed-precision bound


def test_compile_failure_falls_back_to_eager(random_bundle, caplog):
    """Where inductor cannot compile (here: no working C++ compiler), encode warns once and runs eagerly."""
    import torch._inductor.config as inductor_config

    from catalogpred.model.bundle import encode, load_bundle

    flux = _flux(5, seed=4)
    enc = load_bundle(random_bundle, "cpu").encoder  # a fresh module: nothing compiled for it yet
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}), \
            caplog.at_level(logging.WARNING, logger="catalogpred.model.bundle"):
        got = encode(enc, flux, batch_size=3, compile=True)
        again = encode(enc, flux, batch_size=3, compile=True)
    warnings = [r for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(warnings) == 1 and "running it eagerly" in warnings[0].getMessage()
    eager = encode(enc, flux, batch_size=3)
    np.testing.assert_array_equal(got, eager)
    np.testing.assert_array_equal(again, eager)


def _compiled_in_this_process() -> int:
    from catalogpred.model.bundle import _COMPILED

    return sum(fn is not None for fn in _COMPILED.values())


def test_predict_compiled_matches_eager(random_bundle, tmp_path, client):
    """``run_predict(compile="yes")`` on the two worker processes: same catalog as eager, recorded in the manifest."""
    from catalogpred.pipeline import run_predict

    st = tmp_path / "store.zarr"
    bench_pipeline.write_synthetic_store(st, 40, shard_rows=16, chunk_rows=8)
    eager = run_predict(str(st), random_bundle, str(tmp_path / "eager"), client=client, progress=False,
                        torch_threads=1, compile="no", batch_size=8)
    comp = run_predict(str(st), random_bundle, str(tmp_path / "compiled"), client=client, progress=False,
                       torch_threads=1, compile="yes", batch_size=8)
    assert comp.rows == eager.rows == 40 and comp.settings["compile"] is True and eager.settings["compile"] is False
    assert "compile=True" in comp.table()
    compiled = client.run(_compiled_in_this_process)  # {worker: compiled encoders}: not an eager fallback
    assert sum(compiled.values()) >= 1
    manifest = json.loads((tmp_path / "compiled" / "run_manifest.json").read_text())
    assert manifest["settings"]["compile"] is True
    a = pq.ParquetDataset(tmp_path / "eager" / "dataset").read().sort_by("source_id")
    b = pq.ParquetDataset(tmp_path / "compiled" / "dataset").read().sort_by("source_id")
    assert a.column("source_id").to_pylist() == b.column("source_id").to_pylist()
    la = np.stack(a.column("latent").to_numpy(zero_copy_only=False))
    lb = np.stack(b.column("latent").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-5 * np.abs(la).max())
    for band in ("w1", "w2", "w3", "w4"):
        np.testing.assert_allclose(b.column(f"{band}_mag").to_numpy(), a.column(f"{band}_mag").to_numpy(), atol=1e-4)
