"""Dependencies point one way: science helpers import no Dask or torch, readers no torch, the format layer no Dask."""
import subprocess
import sys

import pytest

CASES = {
    "catalogpred.spectra": ["dask", "distributed", "torch", "zarr"],
    "catalogpred.surveys": ["dask", "distributed", "torch"],
    "catalogpred.store": ["dask", "distributed", "torch"],
    "catalogpred.catalog": ["dask", "distributed", "torch"],
    "catalogpred.query": ["distributed", "torch"],
    "catalogpred.crossmatch": ["distributed", "torch"],
    "catalogpred.plots": ["distributed", "torch"],
    "catalogpred.redshifts": ["dask", "distributed", "torch"],
    "catalogpred.model.ood": ["dask", "distributed", "torch"],
    "catalogpred.model.bundle": ["dask", "distributed"],
    "catalogpred.cli": ["torch", "distributed", "zarr"],  # the CLI starts fast: heavy imports happen in commands
}


@pytest.mark.parametrize("module", sorted(CASES))
def test_module_does_not_import(module):
    code = f"import sys, {module}; print(' '.join(sorted(m for m in sys.modules if '.' not in m)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    leaked = [m for m in CASES[module] if m in out]
    assert not leaked, f"{module} imports {leaked}"
