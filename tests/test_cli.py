"""The command line: --help everywhere, data on stdout, errors as one line and exit 1."""
import json
import subprocess
import sys

import pytest

from catalogpred.cli import COMMANDS, main


def test_help_everywhere(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out, cmd


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "catalogpred.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "catalogpred" in out.stdout


def test_missing_store_is_one_line_error(tmp_path, capsys, random_bundle):
    rc = main(["predict", "--store", str(tmp_path / "nope.zarr"), "--model", str(random_bundle),
               "--catalog", str(tmp_path / "cat"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "error:" in err and "nope.zarr" in err and "Traceback" not in err
    assert "Dask cluster" not in err  # found before any cluster starts
    rc = main(["predict", "--store", str(tmp_path / "nope.zarr"), "--model", str(tmp_path / "no-model"),
               "--catalog", str(tmp_path / "cat")])
    err = capsys.readouterr().err
    assert rc == 1 and "no-model is not a model bundle" in err and "Dask cluster" not in err


def test_a_survey_without_a_bundle_for_its_grid_fails_before_a_cluster(tmp_path, capsys, random_bundle):
    from catalogpred import store
    from catalogpred.pipeline import plan_predict
    from catalogpred.spectra import DESI_GRID
    from catalogpred.surveys import get_reader

    import numpy as np

    st = tmp_path / "s.zarr"
    columns = get_reader("desi").meta_columns
    store.create_survey(st, store.SurveyLayout(survey="desi", grid=DESI_GRID, meta_columns=columns,
                                               shard_rows=4, chunk_rows=4))
    store.allocate_shards(st, "desi", 1)
    meta = {k: (np.array([f"{k}-0"], dtype=object) if code == "U" else np.zeros(1, code))
            for k, code in {**columns, **store.STORE_META}.items()}
    meta["status"] = np.full(1, store.RowStatus.OK, np.uint8)  # a spectrum to predict: a group of rejects only
    flux = np.ones((1, DESI_GRID.n_pix), np.float32)              # would need no bundle
    store.write_shard(st, "desi", 0, flux, flux, np.zeros(flux.shape, np.uint8), meta)
    store.mark_shards_done(st, "desi", [0])
    rc = main(["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(tmp_path / "cat")])
    err = capsys.readouterr().err
    assert rc == 1 and "is on the desi grid but no --model bundle is" in err and "Dask cluster" not in err
    with pytest.raises(Exception, match="no survey"):
        plan_predict(str(st), str(random_bundle), ["sdss"])


def test_ingest_dry_run_lists_files(sdss_files, desi_files, capsys):
    """--dry-run says what each input is (from its headers): survey and spectra, redshift-only, or a reject."""
    rc = main(["ingest", str(sdss_files[0].parent), "--store", "unused.zarr", "--dry-run"])
    cap = capsys.readouterr()
    lines = [ln.split("\t") for ln in cap.out.splitlines()]
    assert rc == 0 and len(lines) == 14 and all(p.endswith(".fits") and kind == "sdss" and n == "1" for p, kind, n in lines)
    assert "14 spectra files (14 sdss): 14 would be ingested" in cap.err
    rc = main(["ingest", str(desi_files[0].parent), "--store", "unused.zarr", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 0 and "5 spectra files (5 desi)" in err and "2 redshift-only file(s)" in err


def test_bad_inputs_fail_before_any_worker_starts(capsys, tmp_path, desi_files):
    rc = main(["ingest", "/nonexistent/spec-*.fits", "--store", "x.zarr", "--dry-run"])
    assert rc == 1 and "matches no file" in capsys.readouterr().err
    for argv, says in ((["@" + str(tmp_path / "nolist.txt")], "file list"),
                       ([str(desi_files[0].parent), "--survey", "foo"], "unknown survey 'foo'"),
                       ([str(p) for p in desi_files if p.name.startswith("redrock")], "no spectra among the inputs")):
        rc = main(["ingest", *argv, "--store", str(tmp_path / "x.zarr"), "--workers", "1"])
        err = capsys.readouterr().err
        assert rc == 1 and says in err and "Traceback" not in err, (argv, err)
        assert ("Dask cluster" not in err) or says == "no spectra among the inputs"


@pytest.mark.realdata
def test_ingest_predict_query_cli(tmp_path, sdss_files, random_bundle, capsys):
    import shutil

    inp = tmp_path / "in"
    inp.mkdir()
    for p in sdss_files[:4]:
        shutil.copy(p, inp)
    st, cat = str(tmp_path / "s.zarr"), str(tmp_path / "cat")
    assert main(["ingest", str(inp), "--store", st, "--workers", "1", "--shard-rows", "4", "--chunk-rows", "4",
                 "--no-progress", "--strict", "-q"]) == 0
    assert capsys.readouterr().err == ""  # -q: no summary, no progress, no info
    assert main(["predict", "--store", st, "--model", str(random_bundle), "--catalog", cat, "--workers", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    # a dry run on the same inputs says they are in the store already
    assert main(["ingest", str(inp), "--store", st, "--dry-run"]) == 0
    dry = capsys.readouterr()
    assert "0 would be ingested" in dry.err and "4 already there skipped" in dry.err
    assert all(ln.endswith("already in the store") for ln in dry.out.splitlines())
    # CSV on stdout, nothing else
    assert main(["query", cat, "--cone", "146.9", "-0.7", "7200", "--columns", "source_id,ra,dec,w1_mag"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "source_id,ra,dec,w1_mag" and len(out) == 1 + 4  # plate 266 is near (146.9, -0.7)
    # FITS export keeps units
    assert main(["query", cat, "--cone", "146.9", "-0.7", "7200", "--where", "z < 0.2", "-o", str(tmp_path / "o.fits")]) == 0
    from astropy.table import Table

    t = Table.read(tmp_path / "o.fits")
    assert str(t["w1_mag"].unit) == "mag" and str(t["ra"].unit) == "deg" and (t["z"] < 0.2).all() and len(t) >= 1
    assert t["latent"].shape[1] == 6
    assert main(["info", cat]) == 0
    assert "w1_mag" in capsys.readouterr().out
    # info on the store and on the bundle
    assert main(["info", st, "--json"]) == 0
    sdss = json.loads(capsys.readouterr().out)["surveys"]["sdss"]
    assert sdss["rows_ok"] + sdss["rows_rejected"] == 4 and sdss["shards_done"] == sdss["shards"] == 1
    assert sdss["grid"] == "sdss" and sdss["bytes"] > 0 and sdss["ingest_runs"] == 1
    assert main(["info", st]) == 0
    assert "4 spectra ready, 0 rejected at ingest; 1 shards of 4 rows" in capsys.readouterr().out
    assert main(["info", str(random_bundle)]) == 0
    assert capsys.readouterr().out.startswith("# Model card:")
    assert main(["info", str(random_bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"]
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err
    # unknown column: clear error
    assert main(["query", cat, "--columns", "nope"]) == 1
    assert "unknown columns" in capsys.readouterr().err


def test_mag_system_choices_are_the_tables_ones():
    from catalogpred import cli, tables

    assert cli.MAG_SYSTEMS == tables.MAG_SYSTEMS
    from catalogpred import demo

    assert cli.DEMO_MIN_SPECTRA == demo.MIN_SPECTRA  # spelled out in the CLI for --help, as MAG_SYSTEMS


def test_help_says_what_plot_and_outputs_do(capsys):
    """plot writes predicted_vs_observed.png without --external too (the catalog's own observed WISE); a CSV
    export has no units."""
    def help_of(cmd):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())

    plot = help_of("plot")
    assert "without: from the catalog's own observed WISE, DESI's flux_w1/flux_w2" in plot
    assert "default: the catalog's own observed WISE" in plot and "0-29" in plot
    query = help_of("query")
    assert ".csv (values only)" in query and "(units kept)" not in query and "'(flags & 1) > 0'" in query
    crossmatch = help_of("crossmatch")
    assert "match radius in arcsec, or with a unit" in crossmatch and "(units kept)" not in crossmatch


def test_angles_take_units_and_primes():
    from catalogpred.cli import _angle, build_parser
    from catalogpred.errors import ConfigError

    assert _angle("10'", "arcsec") == pytest.approx(600) and _angle('1.5"', "arcsec") == pytest.approx(1.5)
    assert _angle("0.5arcmin", "arcsec") == pytest.approx(30) and _angle("2", "arcsec") == 2.0
    assert _angle("1deg", "arcmin") == pytest.approx(60)
    with pytest.raises(ConfigError, match="cannot read --radius '5 kg' as an angle"):
        _angle("5 kg", "arcsec", "--radius")
    for argv in (["crossmatch", "cat/", "ext.csv"], ["plot", "cat/"]):  # --radius was a float: '2arcsec' failed
        assert build_parser().parse_args([*argv, "--radius", "2arcsec"]).radius == "2arcsec"


def test_logging_options_after_the_command():
    """-q and -v work after the command (and its nested action) as before it."""
    from catalogpred.cli import build_parser

    p = build_parser()
    assert p.parse_args(["query", "cat", "-q"]).quiet is True
    assert p.parse_args(["-q", "query", "cat"]).quiet is True
    assert p.parse_args(["query", "cat"]).quiet is False and p.parse_args(["query", "cat"]).verbose == 0
    assert p.parse_args(["ingest", "x", "--store", "s", "-vv"]).verbose == 2 and p.parse_args(["-v", "ingest", "x", "--store", "s"]).verbose == 1
    assert p.parse_args(["models", "evaluate", "b", "t", "-vv"]).verbose == 2
    assert p.parse_args(["submit", "slurm", "--jobs", "1", "-q", "--", "predict"]).quiet is True


# ------------------------------------------------------------------ user errors: one line, before any work


def _one_line_error(capsys, argv, says, cluster=False):
    """``main(argv)`` exits 1 with one ``catalogpred <cmd>: error: ...`` line (the last of stderr; log lines
    may come before it) saying ``says``, and no traceback; unless ``cluster``, before a Dask cluster starts."""
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ": error:" in ln or "ERROR" in ln]
    assert rc == 1 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (argv, err)
    assert errors[0].startswith(f"catalogpred {argv[0]}: error: ") and says in errors[0], (argv, err)
    assert "Traceback" not in err and (cluster or "Dask cluster" not in err), (argv, err)
    return errors[0]


def _no_sbatch_path(tmp_path):
    """PATH with this interpreter's directory and the basic tools, and no sbatch/qsub."""
    import os
    import shutil

    bin_dir = tmp_path / "nobatch-bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sh", "bash", "env", "cat", "mkdir", "rm"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    return f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}"


def test_submit_without_a_batch_system_is_one_line_error(tmp_path, capsys, monkeypatch):
    """No `sbatch` on PATH, or one that refuses the job: a one-line error and exit 1, not a tornado traceback
    and a wait for workers that never come."""
    import os
    import threading

    monkeypatch.setenv("PATH", _no_sbatch_path(tmp_path))
    argv = ["submit", "slurm", "--jobs", "1", "--cores", "1", "--memory", "1GB", "--", "ingest", "x.fits",
            "--store", str(tmp_path / "x.zarr")]
    _one_line_error(capsys, argv, "`sbatch` is not on PATH")
    _one_line_error(capsys, ["submit", "pbs", *argv[2:]], "`qsub` is not on PATH")
    # a batch system that refuses the second job: the first is cancelled, and the command never runs
    fake = tmp_path / "fake-bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/sh\nif mkdir {tmp_path}/first 2>/dev/null; then echo 'Submitted batch job 4242'; "
                                 "exit 0; fi\necho 'sbatch: error: Batch job submission failed: Invalid account' >&2\n"
                                 "exit 1\n")
    (fake / "scancel").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/cancelled\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", main([*argv[:3], "2", *argv[4:]])), daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "submit waited for workers although sbatch refused a job"
    err = capsys.readouterr().err
    assert result["rc"] == 1 and "Traceback" not in err, err
    assert "submitting the slurm jobs failed (1 of 2 submitted, now cancelled)" in err and "Invalid account" in err
    assert (tmp_path / "cancelled").read_text().split() == ["4242"]
    assert not (tmp_path / "x.zarr").exists()


def test_submit_refuses_job_settings_that_would_crash_or_land_in_the_script_as_nonsense(capsys, tmp_path, caplog):
    """--cores 0 was a ZeroDivisionError traceback; negative cores and GPUs, more processes than cores, a walltime
    of 'banana' and a queue with shell characters went into the job script; --memory 8 (no unit) got an unhelpful
    dask-jobqueue error; --wait-workers -3 was checked only after the jobs were submitted. A GPU job under a PBS
    resource-spec without ngpus requested no GPU at all. Without a walltime the jobs get dask-jobqueue's 30 min."""
    import logging

    base = ["submit", "slurm", "--jobs", "1", "--dry-run"]
    for extra, says in ((["--cores", "0", "--memory", "8GB"], "--cores must be at least 1"),
                        (["--cores", "-4", "--memory", "8GB"], "--cores must be at least 1"),
                        (["--cores", "8", "--memory", "8GB", "--processes", "16"], "--processes must be 1..--cores"),
                        (["--cores", "8", "--memory", "8GB", "--gpus-per-job", "-1"], "--gpus-per-job must be 0"),
                        (["--cores", "8", "--memory", "8"], "with a unit"),
                        (["--cores", "8", "--memory", "8GB", "--walltime", "banana"], "HH:MM:SS"),
                        (["--cores", "8", "--memory", "8GB", "--queue", "gpu; rm -rf"], "shell characters"),
                        (["--cores", "8", "--memory", "8GB", "--wait-workers", "-3"], "--wait-workers must be at least 1")):
        _one_line_error(capsys, [*base, *extra], says)
    config = tmp_path / "pbs.yaml"
    config.write_text('jobqueue:\n  pbs:\n    resource-spec: "select=1:ncpus=8:mem=32GB"\n')
    _one_line_error(capsys, ["submit", "pbs", "--jobs", "1", "--dry-run", "--config", str(config), "--cores", "8",
                             "--memory", "32GB", "--gpus-per-job", "2"], "requests no GPUs: add ngpus=2")
    with caplog.at_level(logging.WARNING, logger="catalogpred"):
        assert main([*base, "--cores", "8", "--memory", "8GB"]) == 0
    assert "default of 00:30:00" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catalogpred"):
        assert main([*base, "--cores", "8", "--memory", "8GB", "--walltime", "1-04:00:00"]) == 0
    assert "00:30:00" not in caplog.text and "#SBATCH -t 1-04:00:00" in capsys.readouterr().out


def test_submit_checks_the_command_with_its_own_parser(capsys, tmp_path, monkeypatch):
    """The command after `--` is parsed (and its values checked) before anything is submitted, dry run or not."""
    monkeypatch.setenv("PATH", _no_sbatch_path(tmp_path))
    base = ["submit", "slurm", "--jobs", "1", "--cores", "1", "--memory", "1GB"]
    predict = ["predict", "--store", "s.zarr", "--model", "m", "--catalog", "c"]
    for dry in (["--dry-run"], []):
        _one_line_error(capsys, [*base, *dry, "--", *predict, "--bogus"],
                        "the command after `--`: catalogpred: unrecognized arguments: --bogus")
        _one_line_error(capsys, [*base, *dry, "--", "predict", "--store", "s.zarr"],
                        "catalogpred predict: the following arguments are required: --model, --catalog")
        _one_line_error(capsys, [*base, *dry, "--", *predict, "--order", "99"], "--order 99: a HEALPix order is 0-29")
        _one_line_error(capsys, [*base, *dry, "--", "ingest", "x", "--store", "s", "--shard-rows", "0"],
                        "--shard-rows must be at least 1")
    assert main([*base, "--dry-run", "--", *predict, "--order", "3"]) == 0
    assert capsys.readouterr().out.startswith("#!/usr/bin/env bash")


def test_predict_order_is_checked_first_and_dry_run_reports_it(tmp_path, capsys, random_bundle):
    from catalogpred import catalog, cli

    assert (cli.MIN_ORDER, cli.MAX_ORDER) == (0, catalog.SPATIAL_INDEX_ORDER)
    st = tmp_path / "s.zarr"
    bench_store(st)
    cat = tmp_path / "cat"
    predict = ["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(cat)]
    for order in ("99", "-3", "30"):
        _one_line_error(capsys, [*predict, "--order", order], f"--order {order}: a HEALPix order is 0-29")
    for opt in ("--batch-size", "--workers"):
        _one_line_error(capsys, [*predict, opt, "0"], f"{opt} must be at least 1, not 0")
    assert not cat.exists()
    assert main([*predict, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["order"] == 1 and plan["resume"] is False  # choose_order: 1 for a few rows
    assert plan["merge_leaves"] is True  # each leaf's part files merged into one file, by default
    assert main([*predict, "--dry-run", "--order", "4", "--no-merge"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["order"] == 4 and plan["merge_leaves"] is False
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "HEALPix order of the leaves, 0-29" in " ".join(capsys.readouterr().out.split())
    from catalogpred.errors import ConfigError
    from catalogpred.pipeline import run_predict

    with pytest.raises(ConfigError, match="a HEALPix order is 0-29"):
        run_predict(str(st), str(random_bundle), str(cat), client=None, order=99)
    with pytest.raises(ConfigError, match="batch size must be at least 1"):
        run_predict(str(st), str(random_bundle), str(cat), client=None, batch_size=0)


def test_predict_dry_run_refuses_a_resume_the_run_would_refuse(tmp_path, capsys, random_bundle):
    """--dry-run on a catalog made with another model said "resume": true, and then the run refused it; the
    dry run now refuses it the same way, and still reports a resume the run would make."""
    import torch

    from catalogpred.model.bundle import ModelCard, save_bundle
    from catalogpred.model.encoder import SpectrumEncoder
    from catalogpred.model.head import IRHead
    from catalogpred.spectra import SDSS_GRID

    st, cat = tmp_path / "s.zarr", tmp_path / "cat"
    bench_store(st)
    predict = ["predict", "--store", str(st), "--catalog", str(cat), "--workers", "1", "--no-progress"]
    assert main([*predict, "--model", str(random_bundle)]) == 0
    capsys.readouterr()
    assert main([*predict, "--model", str(random_bundle), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["resume"] is True
    torch.manual_seed(1)
    other = tmp_path / "other"
    save_bundle(other, SpectrumEncoder(), IRHead(), name="other", version="0", grid=SDSS_GRID,
                card=ModelCard(kind="demo", summary="another seeded bundle"))
    for dry in (["--dry-run"], []):
        assert main([*predict, "--model", str(other), *dry]) == 1
        err = capsys.readouterr().err
        assert "was made with models" in err and "--overwrite" in err, dry


def bench_store(path):
    """An (empty) SDSS-grid store: enough for predict's plan, which every check here comes before or with."""
    from catalogpred import store
    from catalogpred.spectra import SDSS_GRID
    from catalogpred.surveys import get_reader

    store.create_survey(path, store.SurveyLayout(survey="sdss", grid=SDSS_GRID,
                                                 meta_columns=get_reader("sdss").meta_columns))


def test_predict_catalog_that_is_not_a_catalog(tmp_path, capsys, random_bundle):
    """A file or a foreign directory as --catalog: refused before a cluster starts; --overwrite is only
    suggested where it works, and never deletes them."""
    st = tmp_path / "s.zarr"
    bench_store(st)
    f = tmp_path / "existing.fits"
    f.write_text("SIMPLE")
    d = tmp_path / "notes"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    predict = ["predict", "--store", str(st), "--model", str(random_bundle), "--workers", "1"]
    for extra in ([], ["--overwrite"]):
        _one_line_error(capsys, [*predict, "--catalog", str(f), *extra], "is a file, not a catalog directory")
    msg = _one_line_error(capsys, [*predict, "--catalog", str(d)], "exists and is not a catalogpred catalog")
    assert "--overwrite" not in msg
    _one_line_error(capsys, [*predict, "--catalog", str(d), "--overwrite"], "not a catalog that predict made")
    assert f.read_text() == "SIMPLE" and (d / "thesis.tex").read_text() == "precious"


def test_ingest_bad_rows_and_stores_fail_before_anything_is_made(tmp_path, capsys, sdss_files):
    spec = str(sdss_files[0])
    st = tmp_path / "s.zarr"
    for argv, says in ((["--shard-rows", "-5"], "--shard-rows must be at least 1, not -5"),
                       (["--shard-rows", "0"], "--shard-rows must be at least 1, not 0"),
                       (["--chunk-rows", "0"], "--chunk-rows must be at least 1, not 0"),
                       (["--chunk-rows", "-1"], "--chunk-rows must be at least 1, not -1"),
                       (["--shard-rows", "100", "--chunk-rows", "30"], "is not a multiple of --chunk-rows 30"),
                       (["--workers", "0"], "--workers must be at least 1")):
        _one_line_error(capsys, ["ingest", spec, "--store", str(st), *argv], says)
        assert not st.exists(), argv
    from catalogpred.errors import StoreError
    from catalogpred.store import SurveyLayout
    from catalogpred.spectra import SDSS_GRID

    with pytest.raises(StoreError, match="at least 1"):
        SurveyLayout(survey="sdss", grid=SDSS_GRID, meta_columns={}, shard_rows=-5, chunk_rows=-5)
    # not a store: say so, not "create one with `catalogpred ingest`" (the command just run)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    f = tmp_path / "file.zarr"
    f.write_text("x")
    for target, says in ((other, "exists and is not a catalogpred store"), (f, "exists and is a file")):
        msg = _one_line_error(capsys, ["ingest", spec, "--store", str(target), "--workers", "1"], says)
        assert "create one with" not in msg
    assert sorted(p.name for p in other.iterdir()) == ["a.txt"]
    msg = _one_line_error(capsys, ["info", str(other / "a.txt")], "a file, not a directory")  # unchanged


def test_ingest_of_no_spectra_and_strict_are_standard_errors(tmp_path, capsys, sdss_files):
    """Inputs of which none is a survey's spectra: an error, no store of rejects. --strict: the standard line."""
    from pathlib import Path

    st = tmp_path / "s.zarr"
    readme = str(Path(__file__).parents[1] / "pyproject.toml")
    _one_line_error(capsys, ["ingest", readme, "--store", str(st), "--workers", "1", "--no-progress"],
                    "none of the 1 input file(s) is a spectra file of a known survey", cluster=True)
    assert not st.exists()
    empty = tmp_path / "empty"  # an empty directory is a new store
    empty.mkdir()
    msg = _one_line_error(capsys, ["ingest", str(sdss_files[0]), readme, "--store", str(empty), "--workers", "1",
                                   "--no-progress", "--strict", "-q"], "--strict: 1 spectra rejected", cluster=True)
    assert "ERROR" not in msg
    assert main(["info", str(empty), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["surveys"]["sdss"]["rows_ok"] == 1


@pytest.mark.realdata
def test_query_columns_where_and_id_errors(tmp_path, capsys, sdss_files, random_bundle):
    import shutil

    inp = tmp_path / "in"
    inp.mkdir()
    for p in sdss_files[:3]:
        shutil.copy(p, inp)
    st, cat = str(tmp_path / "s.zarr"), str(tmp_path / "cat")
    assert main(["ingest", str(inp), "--store", st, "--workers", "1", "--no-progress", "-q"]) == 0
    assert main(["predict", "--store", st, "--model", str(random_bundle), "--catalog", cat, "--workers", "1",
                 "--no-progress", "-q"]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["query", cat, "--columns", "source_id,source_id"], "named more than once: source_id")
    _one_line_error(capsys, ["query", cat, "--columns", " , "], "no column names in ' , '")
    _one_line_error(capsys, ["query", cat, "--sql", "SELECT * FROM catalog", "--columns", "ra,ra"], "more than once: ra")
    for where in ("z", "survey", "w1_mag - w2_mag"):
        _one_line_error(capsys, ["query", cat, "--where", where], "is not a true/false condition")
    assert main(["query", cat, "--where", "z < 10", "--where", "flags & 0", "--columns", "source_id"]) == 0
    assert capsys.readouterr().out.splitlines() == ["source_id"]  # a bare bit test is a condition (no bit: none)
    assert main(["query", cat, "--where", "(flags & 0) == 0", "--columns", "source_id"]) == 0
    ids = capsys.readouterr().out.splitlines()[1:]
    assert len(ids) == 3
    msg = _one_line_error(capsys, ["query", cat, "--id", ids[0] + "x"], "no row with source_id")
    assert msg.endswith("; ids in it look like " + ", ".join(ids))  # this catalog's, not a fixed example
    msg = _one_line_error(capsys, ["query", cat, "--id", "nope", "--where", "z < 0"], "within the --cone/--box/--where")
    assert "look like" not in msg


def test_train_members_and_demo_arguments_are_checked_first(tmp_path, capsys, random_bundle):
    _one_line_error(capsys, ["train", "--table", str(tmp_path / "none.csv"), "--encoder", str(random_bundle),
                             "-o", str(tmp_path / "m"), "--members", "0"], "--members must be at least 1, not 0")
    out = tmp_path / "o.fits"
    out.write_text("x")
    for argv, says in ((["--surveys", "pfs"], "pfs needs desi too"),
                       (["--surveys", "sdss,nosuch"], "unknown survey nosuch; choose from sdss,desi,pfs"),
                       (["--surveys", " , "], "choose from sdss,desi,pfs"),
                       (["--output", str(out)], "is a file"),
                       (["--n-spectra", "0"], "--n-spectra must be at least 10, not 0"),
                       (["--workers", "0"], "--workers must be at least 1")):
        _one_line_error(capsys, ["demo", "--output", str(tmp_path / "d"), *argv], says)
    assert not (tmp_path / "d").exists() and out.read_text() == "x"
    from catalogpred.errors import ConfigError
    from catalogpred.model.train import train_bundle

    with pytest.raises(ConfigError, match="at least 1 member"):
        train_bundle({}, random_bundle, tmp_path / "m", n_members=0)


def test_import_spender_help_describes_every_argument(capsys):
    with pytest.raises(SystemExit):
        main(["models", "import-spender", "--help"])
    out = capsys.readouterr().out
    for line in ("spender checkpoint file (.pt)", "bundle name, the start of its model_id", "replace an existing bundle"):
        assert line in " ".join(out.split()), line


def test_dashboard_flag_serves_the_dask_dashboard_and_a_taken_port_is_not_a_warning():
    """--dashboard/--dashboard-address give a local cluster a dashboard and log its link. Without them the
    scheduler's HTTP server still starts (on 8787, or a free port when 8787 is held by another run): that
    move is no warning for the user."""
    import logging
    import socket
    import urllib.request
    import warnings

    from catalogpred.cli import _dashboard_address, build_parser
    from catalogpred.cluster import DEFAULT_DASHBOARD, dask_client

    parse = build_parser().parse_args
    assert _dashboard_address(parse(["predict", "--store", "s", "--model", "m", "--catalog", "c"])) is None
    assert _dashboard_address(parse(["predict", "--store", "s", "--model", "m", "--catalog", "c",
                                     "--dashboard"])) == DEFAULT_DASHBOARD
    assert _dashboard_address(parse(["ingest", "a.fits", "--store", "s", "--dashboard-address", ":9999"])) == ":9999"

    held = socket.socket()
    try:
        try:
            held.bind(("127.0.0.1", 8787))  # another run's dashboard; if the bind fails, someone holds it already
            held.listen()
        except OSError:
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with dask_client(1, memory_limit=None) as client:
                assert client.submit(sum, [1, 2]).result() == 3
        assert not [w for w in caught if "already in use" in str(w.message)]
        records, logger = [], logging.getLogger("catalogpred.cluster")
        handler, level = logging.Handler(), logger.level
        handler.emit = records.append
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            with dask_client(1, memory_limit=None, dashboard="127.0.0.1:0") as client:
                link = client.dashboard_link
                page = urllib.request.urlopen(link, timeout=30).read().decode()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
        assert link.startswith("http://127.0.0.1:") and ":8787/" not in link and "Dask" in page
        assert f"Dask dashboard: {link}" in [r.getMessage() for r in records]
    finally:
        held.close()


def test_predict_warns_that_a_demo_bundle_is_not_science(tmp_path, capsys, random_bundle):
    """A DEMO bundle (random encoder, head fitted on mocks; the model card's kind) runs, with a warning naming it."""
    import bench_pipeline

    st = tmp_path / "s.zarr"
    bench_pipeline.write_synthetic_store(st, 8, shard_rows=8, chunk_rows=8)
    rc = main(["predict", "--store", str(st), "--model", str(random_bundle), "--catalog", str(tmp_path / "c"),
               "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 0
    assert f"{random_bundle} is a DEMO bundle (test-0+" in err and "no scientific value" in err
