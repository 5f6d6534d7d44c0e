"""Issue 4 workflows: spender checkpoint import (parity with spender 0.3), encoder-only predict,
train -> evaluate calibration on the synthetic benchmark, train from a store, offline fetch."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from catalogpred import store
from catalogpred.cli import main
from catalogpred.model.bundle import encode, load_bundle
from catalogpred.spectra import SDSS_GRID, check_spectra
from catalogpred.surveys import read_spectra


def _spender_checkpoint(path, legacy=False):
    spender = pytest.importorskip("spender", reason="spender==0.3 is a test-only dependency (pip install '.[test]')")
    from spender.instrument import Instrument

    torch.manual_seed(7)
    enc = spender.SpectrumEncoder(Instrument(torch.tensor(SDSS_GRID.wave, dtype=torch.float32)), 6).eval()
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state["decoder.wave_rest"] = torch.linspace(3000, 9000, 100)
    if legacy:  # old layout: mlp.mlp.* keys and a 257-wide first layer (z appended)
        state = {k.replace("encoder.mlp.", "encoder.mlp.mlp."): v for k, v in state.items()}
        w = state["encoder.mlp.mlp.0.weight"]
        state["encoder.mlp.mlp.0.weight"] = torch.cat([w, torch.randn(w.shape[0], 1)], 1)
    torch.save({"model": state, "losses": []}, path)
    return enc


@pytest.mark.realdata
@pytest.mark.parametrize("legacy", [False, True])
def test_import_spender_parity_on_real_sdss(tmp_path, sdss_files, capsys, legacy):
    ref = _spender_checkpoint(tmp_path / "ckpt.pt", legacy=legacy)
    assert main(["models", "import-spender", str(tmp_path / "ckpt.pt"), "--survey", "sdss", "-o", str(tmp_path / "b")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_latent"] == 6 and out["grid"] == "sdss"
    ours = load_bundle(tmp_path / "b")
    assert ours.head is None and ours.info.card.kind == "published-encoder"
    ys = []
    for p in sdss_files:
        b = read_spectra(p)
        fn, _, _, norm, reasons, _ = check_spectra(b.flux, b.ivar, b.mask, SDSS_GRID.wave, b.meta["z"])
        if reasons[0] is None:
            ys.append(fn[0])
    y = np.stack(ys)
    with torch.inference_mode():
        expected = ref(torch.from_numpy(y)).numpy()
    got = encode(ours.encoder, y)
    rel = np.max(np.abs(got - expected)) / np.max(np.abs(expected))
    assert rel <= 1e-5, rel


def test_fetch_offline_says_where_to_put_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["models", "fetch", "sdss_II", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "spender.sdss.paperII-c273bb69.pt" in err and "import-spender" in err


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released): a connection there is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("hub", ["closed port", "http://catalogpred-no-such-host.invalid"])
def test_fetch_without_a_network_fails_at_once_in_one_line(tmp_path, capsys, caplog, monkeypatch, hub):
    """A Hub that cannot be reached (a refused connection, a name that does not resolve): one try, no retry
    warnings, then one line that says what to do. It used to take 23 s, with 12 retry warnings printed twice."""
    import logging
    import time

    closed = hub == "closed port"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}" if closed else hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    assert main(["models", "fetch", "sdss_II", "--dest", str(tmp_path / "ck")]) == 1
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "could not download http" in err and "/resolve/main/spender.sdss.paperII-c273bb69.pt (" in err
    assert "models import-spender" in err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    assert not list((tmp_path / "ck").iterdir())  # nothing half-written
    if closed:  # a name lookup's time is the resolver's; a refused connection is immediate
        assert elapsed < 3, elapsed


def test_fetch_retries_only_transient_http_errors_briefly(tmp_path, monkeypatch):
    """A local server answers 503 twice, then the file: three tries, under 3 s. A lasting 503 gives up after
    three tries; a 404 after one. The file appears only when complete."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from catalogpred.errors import BundleError
    from catalogpred.model.spender_import import fetch_published

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    answers, seen = [503, 503, 200], []

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            seen.append(self.path)
            code = answers[min(len(seen), len(answers)) - 1]
            body = b"checkpoint bytes" if code == 200 else b"busy"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Hub) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        hub = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            start = time.monotonic()
            path = fetch_published("sdss_II", tmp_path, endpoint=hub)
            assert time.monotonic() - start < 3
            assert path == tmp_path / "spender.sdss.paperII-c273bb69.pt" and path.read_bytes() == b"checkpoint bytes"
            assert seen == ["/pmelchior/spender/resolve/main/spender.sdss.paperII-c273bb69.pt"] * 3
            answers[:], seen[:] = [503], []
            with pytest.raises(BundleError, match=r"HTTP 503 .*models import-spender"):
                fetch_published("desi_edr_galaxy", tmp_path, endpoint=hub)
            assert len(seen) == 3
            answers[:], seen[:] = [404], []
            with pytest.raises(BundleError, match="HTTP 404"):
                fetch_published("desi_edr_galaxy", tmp_path, endpoint=hub)
            assert len(seen) == 1
            assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .part left behind
            seen[:] = []
            assert fetch_published("sdss_II", tmp_path, endpoint=hub) == path and seen == []  # already there
        finally:
            server.shutdown()


def test_train_evaluate_calibrated_on_synthetic_benchmark(tmp_path, capsys, random_bundle):
    from catalogpred.model.synthetic import synthetic_reference_table

    pacsv.write_csv(synthetic_reference_table(20000, seed=0), tmp_path / "train.csv")
    pacsv.write_csv(synthetic_reference_table(20000, seed=1), tmp_path / "heldout.csv")
    assert main(["train", "--table", str(tmp_path / "train.csv"), "--encoder", str(random_bundle),
                 "-o", str(tmp_path / "m"), "--members", "3", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["models", "evaluate", str(tmp_path / "m"), str(tmp_path / "heldout.csv"),
                 "--png", str(tmp_path / "eval.png")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for b in ("w1", "w2", "w3", "w4"):
        assert metrics[b]["chi2_n"] == pytest.approx(1.0, abs=0.1), (b, metrics[b])
        assert metrics[b]["coverage_68"] == pytest.approx(0.6827, abs=0.02), (b, metrics[b])
        assert metrics[b]["coverage_95"] == pytest.approx(0.9545, abs=0.02), (b, metrics[b])
    assert metrics["w4"]["n"] < metrics["w1"]["n"]  # non-detections (sigma = 9999) carry no weight
    card = json.loads((tmp_path / "m" / "bundle.json").read_text())
    assert card["head_config"]["n_members"] == 3 and card["ood"]["threshold"] > 0
    assert "evaluation" in card["card"]["metrics"] and (tmp_path / "eval.png").stat().st_size > 10_000
    # the card's metrics are on the test rows, and every report says so
    assert card["card"]["metrics"]["evaluated_on"] == "test"
    assert "## Metrics (test split" in (tmp_path / "m" / "MODEL_CARD.md").read_text()
    from catalogpred.query import _model_summary

    summary = _model_summary({"path": str(tmp_path / "m")})["card"]
    assert summary["metrics_on"] == "test" and summary["metrics"]["w1"]["n"] == card["card"]["metrics"]["w1"]["n"]
    assert summary["evaluation"]["w1"]["n"] == metrics["w1"]["n"]  # `models evaluate` on the held-out table


def test_training_tables_take_any_photometry_names_and_ab(tmp_path):
    """read_training_table reads VizieR-style W1mag/e_W1mag as it reads w1mpro, converts AB when told or when the
    unit says so, and refuses a table with no photometry (it used to train on all-NaN bands)."""
    from astropy.table import Table

    from catalogpred.errors import ConfigError
    from catalogpred.model.train import read_training_table

    rng = np.random.default_rng(1)
    n = 20
    base = {**{f"latent_{i}": rng.normal(size=n) for i in range(6)}, "z": rng.uniform(0.05, 0.3, n),
            "norm": rng.uniform(1, 10, n)}
    vega = {b: rng.normal(14, 1, n) for b in ("w1", "w2", "w3", "w4")}
    offsets = {"w1": 2.699, "w2": 3.339, "w3": 5.174, "w4": 6.620}
    Table({**base, **{f"{b}mpro": vega[b] for b in vega}, **{f"{b}sigmpro": np.full(n, 0.05) for b in vega}}).write(
        tmp_path / "allwise.fits")
    Table({**base, **{f"W{b[1]}mag": vega[b] + offsets[b] for b in vega},
           **{f"e_W{b[1]}mag": np.full(n, 0.05) for b in vega}}).write(tmp_path / "vizier-ab.csv")
    t = Table({**base, **{f"{b}_mag": vega[b] + offsets[b] for b in vega}, **{f"{b}_mag_err": np.full(n, 0.05) for b in vega}})
    for b in vega:
        t[f"{b}_mag"].unit = "mag(AB)"
    t.write(tmp_path / "ab-unit.vot", format="votable")
    want = read_training_table(tmp_path / "allwise.fits")["mag"]
    np.testing.assert_allclose(want, np.stack([vega[b] for b in vega], 1))
    np.testing.assert_allclose(read_training_table(tmp_path / "vizier-ab.csv", "ab")["mag"], want, atol=1e-9)
    np.testing.assert_allclose(read_training_table(tmp_path / "ab-unit.vot")["mag"], want, atol=1e-9)  # auto: unit
    Table(base).write(tmp_path / "none.csv")
    with pytest.raises(ConfigError, match="no W1-W4 magnitude"):
        read_training_table(tmp_path / "none.csv")


def test_a_catalog_export_is_not_its_own_observation(tmp_path):
    """A catalog export has the predictions as w1_mag/w1_mag_err: training and evaluation read its observed
    columns (W1mag/e_W1mag here; a DESI export's flux_w1), never the predictions (which gave chi2 0)."""
    from astropy.table import Table

    from catalogpred.model.train import read_training_table
    from catalogpred.tables import predicted_columns

    rng = np.random.default_rng(2)
    n = 30
    base = {"latent": rng.normal(size=(n, 6)).astype(np.float32), "z": rng.uniform(0.05, 0.3, n),
            "norm": rng.uniform(1, 10, n), "model_id": np.full(n, "m-1+0")}
    pred = {f"w{i}_mag": rng.normal(14, 1, n) for i in range(1, 5)} | {f"w{i}_mag_err": np.full(n, 0.3) for i in range(1, 5)}
    obs = {f"W{i}mag": rng.normal(15, 1, n) for i in range(1, 5)} | {f"e_W{i}mag": np.full(n, 0.05) for i in range(1, 5)}
    Table({**base, **pred, **obs}).write(tmp_path / "export.fits")
    got = read_training_table(tmp_path / "export.fits")
    np.testing.assert_allclose(got["mag"], np.stack([obs[f"W{i}mag"] for i in range(1, 5)], 1))
    t = pa.table({k: v for k, v in pred.items()})
    t = t.cast(pa.schema([f.with_metadata({b"description": b"Predicted AllWISE magnitude (Vega)"}) for f in t.schema]))
    assert sorted(predicted_columns(t)) == sorted(pred)  # by description, without model_id
    assert predicted_columns(pa.table({k: v for k, v in pred.items()})) == []  # a user table's w1_mag: observed


def test_train_and_evaluate_refuse_what_they_cannot_do(tmp_path, capsys, caplog, random_bundle):
    """A band without usable observations, the wrong latent count, AB magnitudes read as Vega (a warning),
    an existing output or stray --store options: one-line errors before the work (train crashed on the band)."""
    import logging

    from catalogpred.model.synthetic import synthetic_reference_table
    from catalogpred.model.train import evaluate_bundle, read_training_table

    t = synthetic_reference_table(600, seed=3)
    pacsv.write_csv(t, tmp_path / "ok.csv")
    pacsv.write_csv(t.set_column(t.schema.get_field_index("w4sigmpro"), "w4sigmpro",
                                 pa.array(np.full(t.num_rows, 9999.0))), tmp_path / "w4nd.csv")
    assert main(["train", "--table", str(tmp_path / "w4nd.csv"), "--encoder", str(random_bundle),
                 "-o", str(tmp_path / "nd"), "--members", "1", "--no-progress"]) == 1
    assert "W4: fewer than 10 usable observations" in capsys.readouterr().err
    assert main(["train", "--table", str(tmp_path / "ok.csv"), "--encoder", str(random_bundle), "-o", str(tmp_path / "m"),
                 "--members", "1", "--no-progress"]) == 0
    capsys.readouterr()
    for argv, says in (([], "exists; choose another -o or pass --overwrite"),
                       (["--overwrite", "--photometry", "x.parquet"], "--photometry go with --store")):
        assert main(["train", "--table", str(tmp_path / "ok.csv"), "--encoder", str(random_bundle),
                     "-o", str(tmp_path / "m"), "--members", "1", *argv]) == 1
        assert says in capsys.readouterr().err
    data = read_training_table(tmp_path / "ok.csv")
    with pytest.raises(Exception, match="latents but"):
        evaluate_bundle(tmp_path / "m", {**data, "latents": data["latents"][:, :4]}, update_card=False)
    ab = dict(data, mag=data["mag"] + np.array([2.699, 3.339, 5.174, 6.620]))
    with caplog.at_level(logging.WARNING, logger="catalogpred.model.train"):
        evaluate_bundle(tmp_path / "m", ab, update_card=False)
    assert "look like AB" in caplog.text
    assert main(["models", "evaluate", str(tmp_path / "m"), str(tmp_path / "ok.csv"), "--png",
                 str(tmp_path / "nodir" / "e.png")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_store_training_encoder_only_and_ood(tmp_path, client, random_bundle):
    from catalogpred.mock import write_sdss_survey
    from catalogpred.model.bundle import save_bundle
    from catalogpred.pipeline import run_ingest, run_predict, training_table_from_store
    from catalogpred.model.train import train_bundle

    survey = write_sdss_survey(tmp_path / "mock", 160, seed=3)
    st = str(tmp_path / "s.zarr")
    run_ingest([str(tmp_path / "mock")], st, client=client, shard_rows=64, chunk_rows=32, progress=False)
    enc = load_bundle(random_bundle)
    from catalogpred.model.bundle import ModelCard

    save_bundle(tmp_path / "enc", enc.encoder, None, name="enc", version="0", grid=SDSS_GRID,
                card=ModelCard(kind="demo", summary="encoder only"))
    # an encoder-only bundle still predicts: latents, NO_PREDICTION flag, null magnitudes
    run_predict(st, str(tmp_path / "enc"), str(tmp_path / "cat0"), client=client, progress=False)
    t0 = pq.ParquetDataset(tmp_path / "cat0" / "dataset").read()
    assert t0.num_rows == 160 and t0.column("w1_mag").null_count == 160
    assert all(f & 8 for f in t0.column("flags").to_pylist())
    data = training_table_from_store(st, str(survey.photometry_path), str(tmp_path / "enc"), client=client,
                                     join_on="specobjid")
    assert len(data["ids"]) == 160 and np.isfinite(data["latents"]).all()
    info, _ = train_bundle(data, tmp_path / "enc", tmp_path / "m", n_members=2)
    # a head trained on a DEMO encoder is a demo bundle too, and its card says why
    assert info.card.kind == "demo" and "DEMO" in info.card.summary and "encoder only" in info.card.summary
    run_predict(st, str(tmp_path / "m"), str(tmp_path / "cat"), client=client, progress=False)
    t = pq.ParquetDataset(tmp_path / "cat" / "dataset").read().to_pandas()
    assert t["w1_mag"].notna().all() and (t["w1_mag_err"] > 0).all() and t["ood_score"].notna().all()
    # latents equal the encoder-only run's: the head does not change the encoder
    a = t0.to_pandas().set_index("source_id").sort_index()
    b = t.set_index("source_id").sort_index()
    np.testing.assert_allclose(np.stack(a["latent"]), np.stack(b["latent"]), rtol=1e-6)
    # positional match finds the same training rows
    data2 = training_table_from_store(st, str(survey.photometry_path), str(tmp_path / "enc"), client=client,
                                      match_radius_arcsec=1.0)
    assert sorted(data2["ids"]) == sorted(data["ids"])
    # each training row carries its own photometry row, by either match (the mock ids are specobjid strings)
    phot = pq.read_table(survey.photometry_path).to_pandas()
    phot.index = phot["specobjid"].astype(str).to_numpy()
    meta = store.read_meta(st, "sdss", ["source_id", "specobjid"]).to_pandas().set_index("source_id")
    for d in (data, data2):
        want = phot.loc[meta.loc[d["ids"], "specobjid"], "w1mpro"].to_numpy()
        np.testing.assert_array_equal(d["mag"][:, 0], want)
    # spectra that matched one photometry row (one object) share a group, so one train/validation/test split
    from catalogpred.model.train import split_by_hash

    half = tmp_path / "half.parquet"
    pq.write_table(pq.read_table(survey.photometry_path).slice(0, 40), half)
    shared = training_table_from_store(st, str(half), str(tmp_path / "enc"), client=client, match_radius_arcsec=36000.0)
    groups = np.array(shared["groups"])
    assert len(groups) > len(set(groups)) == 40
    split = split_by_hash(shared["groups"])
    assert all(len(set(split[groups == g])) == 1 for g in set(groups))
    # the same photometry in AB, said so: the same Vega magnitudes
    ab = pq.read_table(survey.photometry_path)
    for j, (b, off) in enumerate((("w1", 2.699), ("w2", 3.339), ("w3", 5.174), ("w4", 6.620))):
        i = ab.schema.get_field_index(f"{b}mpro")
        ab = ab.set_column(i, f"{b}mpro", pa.compute.add(ab.column(i), off))
    pq.write_table(ab, tmp_path / "ab.parquet")
    data3 = training_table_from_store(st, str(tmp_path / "ab.parquet"), str(tmp_path / "enc"), client=client,
                                      join_on="specobjid", mag_system="ab")
    np.testing.assert_allclose(data3["mag"], data["mag"], atol=1e-9)


def test_evaluate_refuses_an_empty_table_and_another_models_rows(tmp_path, capsys, random_bundle):
    """0 rows: an error, and neither the PNG nor the card is written (it printed n_rows 0 and replaced the card's
    Evaluation with n=0 metrics). Rows predicted by another bundle (model_id): an error naming both ids, unless
    --no-update-card (then a warning)."""
    from catalogpred.model.bundle import read_bundle_info
    from catalogpred.model.synthetic import synthetic_reference_table

    t = synthetic_reference_table(600, seed=4)
    pacsv.write_csv(t, tmp_path / "ok.csv")
    assert main(["train", "--table", str(tmp_path / "ok.csv"), "--encoder", str(random_bundle), "-o", str(tmp_path / "m"),
                 "--members", "1", "--no-progress"]) == 0
    capsys.readouterr()
    card = (tmp_path / "m" / "bundle.json").read_text(), (tmp_path / "m" / "MODEL_CARD.md").read_text()
    pacsv.write_csv(t.slice(0, 0), tmp_path / "empty.csv")
    png = tmp_path / "eval.png"
    assert main(["models", "evaluate", str(tmp_path / "m"), str(tmp_path / "empty.csv"), "--png", str(png)]) == 1
    cap = capsys.readouterr()
    assert "has no row to evaluate on (0 rows" in cap.err and "Traceback" not in cap.err and cap.out == ""
    assert not png.exists()
    assert ((tmp_path / "m" / "bundle.json").read_text(), (tmp_path / "m" / "MODEL_CARD.md").read_text()) == card
    # the same rows as a catalog export of another bundle
    mine = read_bundle_info(tmp_path / "m").model_id
    other = t.append_column("model_id", pa.array(["someone-else-1+deadbeef"] * t.num_rows))
    pacsv.write_csv(other, tmp_path / "other.csv")
    assert main(["models", "evaluate", str(tmp_path / "m"), str(tmp_path / "other.csv"), "--png", str(png)]) == 1
    err = capsys.readouterr().err
    assert "someone-else-1+deadbeef" in err and mine in err and "--no-update-card" in err and not png.exists()
    assert ((tmp_path / "m" / "bundle.json").read_text(), (tmp_path / "m" / "MODEL_CARD.md").read_text()) == card
    assert main(["models", "evaluate", str(tmp_path / "m"), str(tmp_path / "other.csv"), "--no-update-card"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["n_rows"] == 600 and "someone-else-1+deadbeef" in cap.err
    assert ((tmp_path / "m" / "bundle.json").read_text(), (tmp_path / "m" / "MODEL_CARD.md").read_text()) == card
    # its own rows: evaluated and written into the card
    pacsv.write_csv(t.append_column("model_id", pa.array([mine] * t.num_rows)), tmp_path / "mine.csv")
    assert main(["models", "evaluate", str(tmp_path / "m"), str(tmp_path / "mine.csv")]) == 0
    assert json.loads(capsys.readouterr().out)["n_rows"] == 600
    assert "## Evaluation" in (tmp_path / "m" / "MODEL_CARD.md").read_text()
