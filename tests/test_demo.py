"""`catalogpred demo` end to end on a small mock survey (the same code `make demo` runs)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from catalogpred.cli import main


def test_demo_end_to_end(tmp_path, capsys, client):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--n-spectra", "300", "--workers", "2", "--no-progress",
                 "--surveys", "sdss,desi,pfs"]) == 0
    captured = capsys.readouterr()
    assert "cone query" in captured.out and str(out / "catalog") in captured.out
    assert f"{out / 'model'} (SDSS), {out / 'model-desi'} (DESI + PFS)" in captured.out
    for p in ("store.zarr/zarr.json", "model/bundle.json", "model/MODEL_CARD.md", "model-desi/bundle.json",
              "catalog/hats.properties",
              "catalog/rejects.parquet", "catalog/run_manifest.json", "colour_colour.png"):
        assert (out / p).exists(), p
    card = json.loads((out / "model" / "bundle.json").read_text())["card"]
    assert card["kind"] == "demo" and "not the published spender model" in card["summary"]
    manifest = json.loads((out / "catalog" / "run_manifest.json").read_text())
    assert manifest["counts"]["catalog_rows"] + manifest["counts"]["rejects"] == manifest["counts"]["inputs"]
    assert {"duplicate_id", "missing_hdu", "no_valid_pixels", "nonfinite_flux", "norm_window_empty", "unreadable_file",
            "sky_fibre", "unassigned_fibre", "flux_standard"} <= set(manifest["counts"]["rejects_by_reason"])
    rej = pq.read_table(out / "catalog" / "rejects.parquet").to_pandas()
    assert (rej.survey == "sdss").sum() == 7
    # `catalogpred info CATALOG` lists each bundle once, with its grid and the surveys it predicted (it listed the
    # DESI-grid bundle twice, as grids "desi" and "pfs", and not the SDSS one); the header names both models
    from catalogpred.query import catalog_info

    models = {m["model_id"]: m for m in catalog_info(out / "catalog")["models"]}
    sdss_id, desi_id = (json.loads((out / b / "bundle.json").read_text())["model_id"] for b in ("model", "model-desi"))
    assert set(models) == {sdss_id, desi_id}
    assert models[sdss_id]["grid"] == "sdss" and models[sdss_id]["surveys"] == ["sdss"]
    assert models[desi_id]["grid"] == "desi" and sorted(models[desi_id]["surveys"]) == ["desi", "pfs"]
    assert f"catalogpred_model_id={','.join(sorted([sdss_id, desi_id]))}" in (out / "catalog" / "hats.properties").read_text()
    # `catalogpred info STORE` accounts for the same spectra, per survey and per reason
    from catalogpred.store import store_info

    rows = pq.ParquetDataset(out / "catalog" / "dataset").read(columns=["survey"]).to_pandas().survey.value_counts()
    for survey, s in store_info(out / "store.zarr")["surveys"].items():
        ingest = rej[(rej.survey == survey) & (rej.stage == "ingest")]
        assert s["rows_rejected"] == len(ingest) and s["rejects_by_reason"] == ingest.reason.value_counts().to_dict()
        assert s["rows_ok"] == rows[survey] + ((rej.survey == survey) & (rej.stage == "predict")).sum()
    # the head learned the optical-IR coupling of the mock: predictions track the mock photometry
    cat = cat_all = pq.ParquetDataset(out / "catalog" / "dataset").read().to_pandas()
    assert set(cat.survey) == {"sdss", "desi", "pfs"}
    for survey in ("desi", "pfs"):  # the DESI-grid bundle predicts DESI and resampled PFS spectra
        part = cat[cat.survey == survey]
        assert len(part) > 0 and part["w1_mag"].notna().all() and part.model_id.str.startswith("catalogpred-demo-desi").all()
    cat = cat[cat.survey == "sdss"]
    phot = pq.read_table(out / "mock" / "sdss" / "allwise_photometry.parquet").to_pandas()
    m = cat.merge(phot, on=["plate", "mjd", "fiberid"])
    assert len(m) == 300
    assert np.corrcoef(m["w1_mag"], m["w1mpro"])[0, 1] > 0.7
    lsdb = pytest.importorskip("lsdb")
    assert len(lsdb.open_catalog(str(out / "catalog")).compute()) == manifest["counts"]["catalog_rows"]
    from hats.io.validation import is_valid_catalog

    assert is_valid_catalog(str(out / "catalog"), strict=True)  # one file per leaf: the leaves' part files merged
    assert manifest["merged_leaves"]["leaves"] > 0
    # the DESI-grid demo bundle, trained on a DEMO encoder, says it is a demo
    assert json.loads((out / "model-desi" / "bundle.json").read_text())["card"]["kind"] == "demo"
    # training rows from a store whose DESI-grid groups (desi, pfs) differ in columns: PFS has no targetid, and
    # the 17-digit TARGETIDs still join exactly (they went through float64 before)
    from catalogpred.pipeline import training_table_from_store

    desi_phot = out / "mock" / "desi" / "allwise_photometry.parquet"
    data = training_table_from_store(str(out / "store.zarr"), str(desi_phot), str(out / "model-desi"), client=client,
                                     join_on="TARGETID")
    assert len(data["ids"]) == (cat_all.survey == "desi").sum() and all(i.startswith("desi-") for i in data["ids"])
    # the mock DESI photometry sits at its targets' positions: a positional cross-match finds every DESI row
    from catalogpred.crossmatch import crossmatch

    xm = crossmatch(out / "catalog", desi_phot, radius_arcsec=0.1,
                    columns=["source_id", "targetid"])
    assert xm.num_rows == (cat_all.survey == "desi").sum()
    assert xm.column("targetid").to_pylist() == xm.column("targetid_ext").to_pylist()  # each with its own target


def test_demo_never_deletes_what_it_did_not_make(tmp_path, capsys):
    """`demo --output DIR` replaces its own subdirectories only: a DIR with a foreign model/ is refused."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.pt").write_bytes(b"someone else's")
    assert main(["demo", "--output", str(tmp_path), "--n-spectra", "10", "--no-progress"]) == 1
    assert "did not make" in capsys.readouterr().err
    assert (tmp_path / "model" / "weights.pt").read_bytes() == b"someone else's"
