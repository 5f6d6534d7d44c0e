"""The notebooks in notebooks/ run top to bottom (nbclient) on a fresh demo catalog, so they cannot rot.

The demo is built once for the module; the commands the notebooks show (info, crossmatch, plot)
are checked on the same output.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from catalogpred.demo import run_demo

    out = tmp_path_factory.mktemp("nbdemo") / "demo-output"
    run_demo(out, n_spectra=200, n_workers=2, progress=False, surveys=("sdss",))
    return out


@pytest.fixture(scope="module")
def demo_with_desi(tmp_path_factory):
    """SDSS for the catalog and the crossmatch, and one DESI file: rows that carry their own W1/W2."""
    from catalogpred.demo import run_demo

    out = tmp_path_factory.mktemp("nbdemo-desi") / "demo-output"
    run_demo(out, n_spectra=200, n_workers=2, progress=False, surveys=("sdss", "desi"), n_desi_files=1)
    return out


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS][:2] == ["01-demo-catalog.ipynb", "02-crossmatch-ir-excess.ipynb"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(notebook, demo_with_desi, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("CATALOGPRED_CATALOG", str(demo_with_desi / "catalog"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_commands_on_demo(demo, tmp_path, capsys):
    from astropy.table import QTable

    from catalogpred.cli import main

    cat, phot = str(demo / "catalog"), str(demo / "mock" / "sdss" / "allwise_photometry.parquet")
    assert main(["info", cat, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 200 and info["rows_per_survey"] == {"sdss": 200}
    (model,) = info["models"]
    assert model["kind"] == "demo" and "not the published spender model" in model["card"]["summary"]
    assert set(model["card"]["metrics"]) == {"w1", "w2", "w3", "w4"}
    assert info["manifest"]["counts"]["rejects"] == 7 and 0 < info["area_deg2"]["moc"] < 100
    import torch

    (runtime,) = info["manifest"]["model_runtime"]  # what ran the model in the workers: here, this machine's CPU
    assert runtime["torch"] == torch.__version__ and runtime["device"].startswith("cpu: ")
    markers = [json.loads(f.read_text()) for f in (demo / "catalog" / "_run" / "blocks").glob("*.json")]
    assert runtime["blocks"] == sum(1 for m in markers if m["runtime"]) >= 1
    assert all(m["runtime"] == {k: v for k, v in runtime.items() if k != "blocks"} for m in markers if m["runtime"])
    assert main(["info", cat]) == 0
    out = capsys.readouterr().out
    assert "DEMO bundle" in out and "rejects by reason" in out and "sdss" in out
    assert f"model ran on: {runtime['device']}; torch {torch.__version__}, " in out
    dest = tmp_path / "matched.vot"
    assert main(["crossmatch", cat, phot, "--radius", "1.5", "--columns", "source_id,plate,fiberid,w1_mag",
                 "-o", str(dest)]) == 0
    t = QTable.read(dest)
    assert len(t) == 200 and t["w1_excess"].unit.to_string() == "mag" and t["separation_arcsec"].max().value < 1e-6
    assert (t["plate"] == t["plate_ext"]).all() and (t["fiberid"] == t["fiberid_ext"]).all()
    assert main(["plot", cat, "-o", str(tmp_path / "plots"), "--external", phot]) == 0
    assert len(capsys.readouterr().out.split()) == 4
