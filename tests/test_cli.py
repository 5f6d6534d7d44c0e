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

    st = tmp_path / "s.zarr"
    store.create_survey(st, store.SurveyLayout(survey="desi", grid=DESI_GRID, meta_columns=get_reader("desi").meta_columns))
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
