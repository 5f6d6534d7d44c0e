"""End to end on the 14 real SDSS files + a truncated and a random-bytes file, on a real LocalCluster."""
import json
import shutil

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from catalogpred import store
from catalogpred.pipeline import run_ingest, run_predict
from catalogpred.query import angular_separation_deg, open_catalog
from catalogpred.surveys import ReadOptions, Selection

pytestmark = pytest.mark.realdata
#: every class kept (the default takes galaxies: test_sdss_reader), so the real QSOs run through, and the
#: z = 1.19 quasar meets the normalisation window check
EVERYTHING = ReadOptions(selection=Selection(spectypes=()))


@pytest.fixture(scope="module")
def built(tmp_path_factory, sdss_files, client, random_bundle):
    d = tmp_path_factory.mktemp("e2e")
    inputs = d / "inputs"
    inputs.mkdir()
    for p in sdss_files:
        shutil.copy(p, inputs / p.name)
    (inputs / "spec-9990-55555-0001.fits").write_bytes(sdss_files[1].read_bytes()[:50_000])
    (inputs / "spec-9990-55555-0002.fits").write_bytes(np.random.default_rng(1).bytes(30_000))
    ing = run_ingest([str(inputs)], str(d / "store.zarr"), client=client, shard_rows=8, chunk_rows=4, progress=False,
                     options=EVERYTHING)
    pred = run_predict(str(d / "store.zarr"), str(random_bundle), str(d / "catalog"), client=client, progress=False)
    return {"dir": d, "inputs": inputs, "ingest": ing, "predict": pred, "files": sdss_files}


def test_accounting_rows_plus_rejects_equals_inputs(built):
    cat = built["dir"] / "catalog"
    rows = pq.ParquetDataset(cat / "dataset").read().num_rows
    rejects = pq.read_table(cat / "rejects.parquet")
    assert rows + rejects.num_rows == 16
    reasons = sorted(rejects.column("reason").to_pylist())
    assert reasons == ["norm_window_empty", "unreadable_file", "unreadable_file"]
    detail = dict(zip(rejects.column("source_file").to_pylist(), rejects.column("detail").to_pylist()))
    assert "truncated" in detail["spec-9990-55555-0001.fits"]
    assert "1931-53358-0251" in " ".join(rejects.column("source_id").to_pylist())  # the z = 1.19 quasar
    manifest = json.loads((cat / "run_manifest.json").read_text())
    assert manifest["counts"]["inputs"] == 16 and manifest["counts"]["catalog_rows"] == rows


def test_ids_positions_redshifts_equal_astropy(built):
    t = pq.ParquetDataset(built["dir"] / "catalog" / "dataset").read().to_pandas().set_index("source_id")
    for p in built["files"]:
        with fits.open(p) as h:
            obj = h["SPALL" if "SPALL" in h else "SPECOBJ"].data[0]
        sid = f"sdss-{int(obj['PLATE']):04d}-{int(obj['MJD']):05d}-{int(obj['FIBERID']):04d}"
        if sid == "sdss-1931-53358-0251":
            assert sid not in t.index
            continue
        row = t.loc[sid]
        assert row["ra"] == pytest.approx(float(obj["PLUG_RA"]), abs=1e-9)
        assert row["dec"] == pytest.approx(float(obj["PLUG_DEC"]), abs=1e-9)
        assert row["z"] == pytest.approx(float(obj["Z"]), rel=1e-7)
        assert row["specobjid"] == str(obj["SPECOBJID"]).strip()
        assert row["plate"] == int(obj["PLATE"]) and row["fiberid"] == int(obj["FIBERID"])
        assert np.isfinite([row[f"w{i}_mag"] for i in range(1, 5)]).all()
        assert all(row[f"w{i}_mag_err"] > 0 for i in range(1, 5))
        assert len(row["latent"]) == 6


def test_store_flux_is_file_flux_over_norm(built):
    st = str(built["dir"] / "store.zarr")
    meta = store.read_meta(st, "sdss").to_pandas().set_index("source_id")
    for p in built["files"][:6]:
        sid = "sdss-" + p.stem[5:]
        row = meta.loc[sid]
        flux = store.read_flux(st, "sdss", np.array([row["row"]]))[0]
        with fits.open(p) as h:
            coadd = h["COADD"].data
        k = np.rint(coadd["loglam"].astype(np.float64) * 1e4).astype(int) - 35780
        for i in (100, 1000, 2500):
            assert flux[k[i]] == pytest.approx(coadd["flux"][i] / row["norm"], rel=1e-6)


def test_catalog_units_and_hats_properties(built):
    cat = built["dir"] / "catalog"
    schema = pq.read_schema(cat / "dataset" / "_common_metadata")
    assert schema.field("w1_mag").metadata[b"unit"] == b"mag"
    assert b"Vega" in schema.field("w1_mag").metadata[b"description"]
    assert schema.field("ra").metadata[b"unit"] == b"deg"
    assert b"IVOA.VOTable-Parquet.content" in schema.metadata
    assert schema.field("specobjid").type == "string" and schema.field("_healpix_29").type == "int64"
    props = (cat / "hats.properties").read_text()
    for key in ("dataproduct_type=object", "hats_col_ra=ra", "hats_col_dec=dec", "hats_npix_suffix=/",
                "catalogpred_model_id=test-0+"):
        assert key in props
    assert (cat / "partition_info.csv").exists() and (cat / "dataset" / "_metadata").exists()


def test_part_file_opens_in_astropy_with_units(built):
    from astropy.table import Table

    part = next((built["dir"] / "catalog" / "dataset").glob("Norder=*/Dir=*/Npix=*/*.parquet"))
    t = Table.read(part, format="parquet.votable")
    assert str(t["w1_mag"].unit) == "mag" and str(t["ra"].unit) == "deg"


def test_lsdb_cone_equals_brute_force_and_duckdb_count(built):
    lsdb = pytest.importorskip("lsdb")
    cat = built["dir"] / "catalog"
    c = lsdb.open_catalog(str(cat))
    full = c.compute()
    ra0, dec0, r_arcsec = 146.9, -0.7, 2 * 3600.0
    got = set(c.cone_search(ra=ra0, dec=dec0, radius_arcsec=r_arcsec).compute()["source_id"])
    sep = angular_separation_deg(ra0, dec0, full["ra"].to_numpy(), full["dec"].to_numpy())
    assert got == set(full["source_id"][sep <= r_arcsec / 3600]) and len(got) > 0
    n = duckdb.sql(f"select count(*) from read_parquet('{cat}/dataset/**/*.parquet')").fetchall()[0][0]
    assert n == len(full) == 13
    ours = set(open_catalog(cat).cone(ra0, dec0, r_arcsec).to_pandas()["source_id"])
    assert ours == got


def test_rerun_predict_resumes_without_duplicates(built, client, random_bundle):
    d = built["dir"]
    again = run_predict(str(d / "store.zarr"), str(random_bundle), str(d / "catalog"), client=client, progress=False)
    assert again.blocks_skipped == again.blocks
    ids = pq.ParquetDataset(d / "catalog" / "dataset").read(columns=["source_id"]).column("source_id").to_pylist()
    assert len(ids) == len(set(ids)) == 13


def test_overwrite_deletes_only_a_catalog_it_made(built, client, random_bundle, tmp_path):
    """--overwrite replaces predict's own catalog, and refuses a directory with other files or with the inputs."""
    from catalogpred.errors import CatalogError

    d, st = built["dir"], str(built["dir"] / "store.zarr")
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(CatalogError, match="not a catalog that predict made"):
        run_predict(st, str(random_bundle), str(mine), client=client, progress=False, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "precious"
    with pytest.raises(CatalogError, match="holds the input"):  # e.g. --catalog . beside the store
        run_predict(st, str(random_bundle), str(d), client=client, progress=False, overwrite=True)
    assert (d / "store.zarr").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    again = run_predict(st, str(random_bundle), str(empty), client=client, progress=False, overwrite=True)
    assert again.rows == 13
    again = run_predict(st, str(random_bundle), str(empty), client=client, progress=False, overwrite=True)
    assert again.rows == 13 and again.blocks_skipped == 0  # its own catalog: replaced, not resumed


def test_rerun_ingest_adds_nothing(built, client):
    d = built["dir"]
    again = run_ingest([str(built["inputs"])], str(d / "store.zarr"), client=client, shard_rows=8, progress=False)
    assert again.skipped_files == 16 and again.rows == 0


def test_duplicate_ids_rejected(tmp_path, sdss_files, client):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(sdss_files[0], inputs / sdss_files[0].name)
    shutil.copy(sdss_files[0], inputs / "copy-of-first.fits")
    s = run_ingest([str(inputs)], str(tmp_path / "s.zarr"), client=client, shard_rows=8, chunk_rows=4, progress=False)
    assert s.reasons == {"duplicate_id": 1} and s.ok == 1
    meta = store.read_meta(str(tmp_path / "s.zarr"), "sdss").to_pandas()
    dup = meta[meta.status == store.RowStatus.REJECTED]
    assert len(dup) == 1 and "already ingested" in dup.reject_detail.iloc[0]


def test_killed_predict_resumes_to_identical_catalog(tmp_path, sdss_files, client, random_bundle):
    """Kill `catalogpred predict` (whole process group) after its first block, re-run, compare with a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sdss_files:
        shutil.copy(p, inputs / p.name)
    st = str(tmp_path / "s.zarr")
    run_ingest([str(inputs)], st, client=client, shard_rows=1, chunk_rows=1, progress=False, options=EVERYTHING)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "catalogpred.cli", "predict", "--store", st, "--model", str(random_bundle),
           "--catalog", str(killed), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    blocks = killed / "_run" / "blocks"
    while time.time() < deadline and len(list(blocks.glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(blocks.glob("*.json")))
    assert 2 <= n_done < 14, "the kill must land mid-run"
    assert not (killed / "hats.properties").exists()
    rc = subprocess.run(cmd, capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    clean = run_predict(st, str(random_bundle), str(tmp_path / "clean"), client=client, progress=False)
    a = pq.ParquetDataset(killed / "dataset").read().to_pandas().sort_values("source_id").reset_index(drop=True)
    b = pq.ParquetDataset(tmp_path / "clean" / "dataset").read().to_pandas().sort_values("source_id").reset_index(drop=True)
    assert len(a) == len(b) == clean.rows == 13 and a["source_id"].is_unique
    assert list(a["source_id"]) == list(b["source_id"])
    np.testing.assert_allclose(a["w1_mag"], b["w1_mag"], rtol=1e-6)
    assert pq.read_table(killed / "rejects.parquet").num_rows == 1
    # what ran the model: the killed run's blocks (from their done markers) and the resumed run's, 13 with a spectrum
    import torch

    (runtime,) = json.loads((killed / "run_manifest.json").read_text())["model_runtime"]
    assert runtime["blocks"] == 13 and runtime["torch"] == torch.__version__ and runtime["device"].startswith("cpu")
