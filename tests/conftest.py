"""Shared fixtures: real data from ../shared (skipped with a reason when absent) and a real LocalCluster."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CATALOGPRED_SHARED", REPO.parent / "shared"))
REALDATA = SHARED / "realdata"
SDSS_DIR = REALDATA / "sdss"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_gpu = None
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "gpu" in item.keywords and skip_gpu is not None:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def sdss_files() -> list[Path]:
    """The 14 real SDSS spec files in ../shared/realdata/sdss."""
    files = sorted(SDSS_DIR.glob("spec-*.fits"))
    if len(files) != 14:
        pytest.skip(f"real SDSS files not found at {SDSS_DIR} (a fresh clone has no ../shared; CI does)")
    return files


@pytest.fixture(scope="session")
def client():
    """A real two-process LocalCluster (the one ``dask_client`` starts by default), shared by the session."""
    from distributed import Client

    from catalogpred.cluster import local_cpu_cluster

    cluster = local_cpu_cluster(2, silence_logs=logging.ERROR)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture
def bad_inputs(tmp_path, sdss_files) -> dict[str, Path]:
    """A truncated copy of a real spec file and a random-bytes file named like one."""
    d = tmp_path / "bad"
    d.mkdir()
    trunc = d / "spec-9990-55555-0001.fits"
    trunc.write_bytes(sdss_files[1].read_bytes()[:50_000])
    rnd = d / "spec-9990-55555-0002.fits"
    import numpy as np

    rnd.write_bytes(np.random.default_rng(1).integers(0, 256, 30_000, dtype=np.uint8).tobytes())
    return {"truncated": trunc, "random": rnd}


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory):
    """A seeded (untrained) SDSS bundle with a head."""
    import torch

    from catalogpred.model.bundle import ModelCard, save_bundle
    from catalogpred.model.encoder import SpectrumEncoder
    from catalogpred.model.head import IRHead
    from catalogpred.spectra import SDSS_GRID

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundle") / "model"
    save_bundle(path, SpectrumEncoder(), IRHead(), name="test", version="0", grid=SDSS_GRID,
                card=ModelCard(kind="demo", summary="seeded test bundle"))
    return path


DESI_DIR = REALDATA / "desi"


@pytest.fixture(scope="session")
def desi_files() -> list[Path]:
    """The 7 real DESI files (coadd, spectra, redrock) in ../shared/realdata/desi."""
    files = sorted(DESI_DIR.glob("*.fits"))
    if len(files) != 7:
        pytest.skip(f"real DESI files not found at {DESI_DIR} (a fresh clone has no ../shared; CI does)")
    return files


@pytest.fixture(scope="session")
def desi_bundle(tmp_path_factory):
    """A seeded (untrained) DESI-grid bundle with a head (serves DESI and PFS)."""
    import torch

    from catalogpred.model.bundle import ModelCard, save_bundle
    from catalogpred.model.encoder import SpectrumEncoder
    from catalogpred.model.head import IRHead
    from catalogpred.spectra import DESI_GRID

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("desi-bundle") / "model"
    save_bundle(path, SpectrumEncoder(n_pix=DESI_GRID.n_pix), IRHead(), name="test-desi", version="0", grid=DESI_GRID,
                card=ModelCard(kind="demo", summary="seeded DESI test bundle"))
    return path
