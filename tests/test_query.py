"""Queries on a real (synthetic) HATS catalog written by the catalog code: results equal brute force.

The catalog is built once per module with ``bench/bench_query.py::build_catalog`` (the same
``write_fragment`` + ``finalize_catalog`` path as ``predict``), at HEALPix order 3 so that leaf
pruning matters, with rows crowded around RA 0/360, the poles and leaf corners.
"""
from __future__ import annotations

import io
import json
import warnings

import astropy.units as u
import bench_query
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from catalogpred.cli import COMMANDS, main
from catalogpred.errors import CatalogError, ConfigError
from catalogpred.query import Box, Cone, angular_separation_deg, format_table, open_catalog, write_table

N_ROWS = 12_000



def synthetic_positions(n: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    k = n // 4
    ra = np.r_[rng.uniform(0, 360, n - 3 * k), rng.normal(0, 2, k) % 360, rng.uniform(0, 360, k),
               rng.normal(45, 1.0, k) % 360]
    dec = np.r_[np.degrees(np.arcsin(rng.uniform(-1, 1, n - 3 * k))), rng.uniform(-10, 10, k),
                np.where(rng.random(k) < 0.5, 1, -1) * rng.uniform(80, 90, k), rng.normal(0, 1.0, k)]
    return ra, np.clip(dec, -90, 90)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = tmp_path_factory.mktemp("query") / "catalog"
    ra, dec = synthetic_positions(N_ROWS)
    bench_query.build_catalog(path, N_ROWS, order=3, block_rows=N_ROWS, ra=ra, dec=dec)
    return path


@pytest.fixture(scope="module")
def everything(catalog) -> pa.Table:
    """The whole catalog, read with plain pyarrow (the brute-force reference)."""
    return pq.ParquetDataset(catalog / "dataset", partitioning=None).read()


def ids(table) -> list[str]:
    return sorted(table.column("source_id").to_pylist())


def brute_cone(t, ra, dec, r_deg):
    sep = angular_separation_deg(ra, dec, t.column("ra").to_numpy(), t.column("dec").to_numpy())
    return t.filter(pa.array(sep <= r_deg))


def brute_box(t, ra0, ra1, d0, d1):
    ra, dec = t.column("ra").to_numpy(), t.column("dec").to_numpy()
    in_ra = (ra >= ra0) & (ra <= ra1) if ra0 <= ra1 else (ra >= ra0) | (ra <= ra1)
    return t.filter(pa.array(in_ra & (dec >= d0) & (dec <= d1)))


CONES = [(0.0, 0.0, 3600), (359.5, 1.0, 7200), (0.3, -5.0, 600), (45.0, 0.0, 1800), (123.0, 89.9, 3 * 3600),
         (10.0, -90.0, 5 * 3600), (200.0, 30.0, 20 * 3600), (45.0, 0.0, 10.0), (300.0, -60.0, 100 * 3600),
         (12.0, 5.0, 185 * 3600)]


@pytest.mark.parametrize("ra,dec,r", CONES)
def test_cone_equals_brute_force(catalog, everything, ra, dec, r):
    q = open_catalog(catalog).cone(ra, dec, r)
    got = q.to_arrow()
    want = brute_cone(everything, ra, dec, r / 3600)
    assert ids(got) == ids(want)
    if r < 180 * 3600:
        assert len(q.files()) <= len(open_catalog(catalog).files())
    if r <= 7200:  # small cones read few leaves
        assert len(q._leaf_pixels()) < len(q.pixels) / 4


def test_cone_random_many(catalog, everything):
    rng = np.random.default_rng(11)
    cat = open_catalog(catalog)
    for _ in range(25):
        ra, dec, r = rng.uniform(0, 360), np.degrees(np.arcsin(rng.uniform(-1, 1))), rng.uniform(1, 8 * 3600)
        assert ids(cat.cone(ra, dec, r).select("source_id,ra").to_arrow()) == ids(brute_cone(everything, ra, dec, r / 3600))


def test_cone_quantity_radius_and_centre(catalog):
    cat = open_catalog(catalog)
    a = cat.cone(45.0, 0.0, 1800).to_arrow()
    assert ids(cat.cone(45 * u.deg, 0 * u.deg, 0.5 * u.deg).to_arrow()) == ids(a)
    assert ids(cat.cone(45.0, 0.0, radius=30 * u.arcmin).to_arrow()) == ids(a)
    assert ids(cat.cone(405.0, 0.0, 1800).to_arrow()) == ids(a)  # RA wraps
    assert a.num_rows > 20


def test_cone_around_a_skycoord(catalog, everything):
    from astropy.coordinates import SkyCoord

    cat = open_catalog(catalog)
    want = ids(brute_cone(everything, 45.0, 0.0, 0.5))
    c = SkyCoord(45.0 * u.deg, 0.0 * u.deg)
    assert ids(cat.cone(c, 1800).to_arrow()) == want and want
    assert ids(cat.cone(c, radius=0.5 * u.deg).to_arrow()) == want
    assert ids(cat.cone(c.galactic, 30 * u.arcmin).to_arrow()) == want  # any frame: transformed to ICRS
    with pytest.raises(ConfigError, match="one centre"):
        cat.cone(SkyCoord([1, 2] * u.deg, [0, 0] * u.deg), 60)
    with pytest.raises(ConfigError, match="needs a centre"):
        cat.cone(45.0, radius=1 * u.deg)


@pytest.mark.parametrize("box", [(10, 50, -20, 20), (350, 10, -5, 5), (355, 2, -90, 90), (0, 360, 80, 90),
                                 (-10, 10, -3, 3), (44, 46, -1, 1), (170, 190, -90, -85), (0, 360, -90, 90),
                                 (359.9, 0.1, -10, 10), (120, 121, 0, 0.5)])
def test_box_equals_brute_force(catalog, everything, box):
    ra0, ra1, d0, d1 = box
    q = open_catalog(catalog).box(*box)
    want = brute_box(everything, ra0 % 360 if ra1 - ra0 < 360 else 0, ra1 % 360 if ra1 - ra0 < 360 else 360, d0, d1)
    assert ids(q.to_arrow()) == ids(want)
    if (ra1 - ra0) % 360 <= 20 and d1 - d0 <= 20:
        assert len(q._leaf_pixels()) < len(q.pixels) / 2


def test_box_wraps_through_zero(catalog, everything):
    t = open_catalog(catalog).box(350, 10, -5, 5).select("ra,dec").to_arrow()
    ra = t.column("ra").to_numpy()
    assert t.num_rows > 100 and ((ra >= 350) | (ra <= 10)).all() and (ra > 355).any() and (ra < 5).any()


def test_where_equals_brute_force(catalog, everything):
    cat = open_catalog(catalog)
    df = everything.to_pandas()
    got = cat.where("w1_mag - w2_mag > 0.2").where("flags == 0 and survey == 'sdss'").to_arrow()
    want = df[(df.w1_mag - df.w2_mag > 0.2) & (df["flags"] == 0) & (df.survey == "sdss")]
    assert ids(got) == sorted(want.source_id) and len(want) > 100
    # cone + box + where together, only some columns: still the brute-force rows
    q = cat.cone(0.0, 0.0, 4 * 3600).box(355, 3, -3, 3).where("z < 0.2").select(["source_id", "w3_mag"])
    ref = brute_box(brute_cone(everything, 0, 0, 4), 355, 3, -3, 3).to_pandas()
    got = q.to_arrow()
    assert got.column_names == ["source_id", "w3_mag"]
    assert ids(got) == sorted(ref[ref.z < 0.2].source_id) and got.num_rows > 5


def test_integer_ids_with_nulls_stay_exact(catalog, everything, capsys):
    """DESI TARGETIDs beside SDSS rows (null there) are 17-digit integers: float64 would merge neighbours."""
    desi = everything.filter(pc.is_valid(everything.column("targetid")))
    tid = desi.column("targetid")[3].as_py()
    cat = open_catalog(catalog)
    assert cat.where(f"targetid == {tid}").count() == 1  # tid ± 1 round to the same float64
    df = cat.where(f"targetid == {tid}").to_pandas()
    assert df.targetid.tolist() == [tid] and str(df.targetid.dtype) == "Int64"
    assert main(["query", str(catalog), "--where", f"targetid >= {tid - 1} and targetid <= {tid + 1}",
                 "--columns", "targetid", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "targetid" and sorted(lines[1:]) == [str(t) for t in (tid - 1, tid, tid + 1)
                                                          if t in set(desi.column("targetid").to_pylist())]
    assert main(["query", str(catalog), "--limit", "20", "--columns", "targetid", "--format", "csv"]) == 0
    values = capsys.readouterr().out.splitlines()[1:]
    nulls = {"", '""'}  # a one-column CSV quotes an empty field, so that the line is not blank
    assert nulls & set(values) and all(v in nulls or (v.isdigit() and len(v) == 17) for v in values)


def test_select_limit_count_id(catalog, everything):
    cat = open_catalog(catalog)
    t = cat.select("source_id, ra ,w1_mag").limit(7).to_arrow()
    assert t.column_names == ["source_id", "ra", "w1_mag"] and t.num_rows == 7
    assert cat.limit(0).to_arrow().num_rows == 0
    assert cat.where("z < 0.1").count() == int((everything.column("z").to_numpy() < 0.1).sum())
    some = everything.column("source_id").to_pylist()[::997][:5]
    got = cat.id(some).to_arrow()
    assert ids(got) == sorted(some) and got.column_names == everything.column_names
    assert cat.id(some[0]).select("source_id,z").to_arrow().num_rows == 1
    assert cat.id("sdss-nope").to_arrow().num_rows == 0
    with pytest.raises(ConfigError, match="unknown columns"):
        cat.select("nope")
    assert cat.select("all").limit(2).to_arrow().column_names == everything.column_names
    with pytest.raises(ConfigError, match="cannot evaluate"):
        cat.cone(10, 89, 1).where("nope > 1").to_arrow()  # checked even when the region is empty
    with pytest.raises(ConfigError, match="equality is '=='"):  # SQL's '=' is assignment in pandas
        cat.where("survey = 'desi'").to_arrow()
    assert cat.where("z <= 0.1 and flags != 0").count() == int(((everything.column("z").to_numpy() <= 0.1)
                                                                 & (everything.column("flags").to_numpy() != 0)).sum())
    with pytest.raises(ConfigError, match="radius"):
        cat.cone(10, 0, -1)
    with pytest.raises(ConfigError, match="dec"):
        cat.box(0, 10, 20, 10)
    with pytest.raises(CatalogError, match="hats.properties"):
        open_catalog(catalog.parent)


def test_units_survive_selection(catalog):
    t = open_catalog(catalog).cone(0, 0, 3600).select("ra,w1_mag,norm").to_astropy()
    assert t["ra"].unit == u.deg and t["w1_mag"].unit == u.mag
    assert "Vega" in t["w1_mag"].info.description


def test_sql_equals_brute_force(catalog, everything):
    cat = open_catalog(catalog)
    n = cat.sql("SELECT count(*) AS n FROM catalog").column("n")[0].as_py()
    assert n == everything.num_rows
    q = cat.cone(359.5, 1.0, 7200)
    got = q.sql("SELECT source_id, w1_mag FROM catalog ORDER BY source_id")
    assert got.column("source_id").to_pylist() == ids(brute_cone(everything, 359.5, 1.0, 2))
    assert got.schema.field("w1_mag").metadata[b"unit"] == b"mag"  # units come back on catalog columns
    q = cat.box(350, 10, -5, 5).where("flags == 0")
    assert sorted(q.sql("SELECT source_id FROM catalog").column("source_id").to_pylist()) == ids(q.to_arrow())
    agg = cat.sql("SELECT survey, count(*) AS n FROM catalog GROUP BY survey ORDER BY survey").to_pylist()
    assert [r["survey"] for r in agg] == ["desi", "sdss"] and sum(r["n"] for r in agg) == N_ROWS
    # the view holds only the pruned files: a cone's SQL reads a fraction of them
    assert len(q.files()) < len(cat.files())
    assert cat.cone(10, 89, 1).sql("SELECT count(*) AS n FROM catalog").column("n")[0].as_py() == 0
    with pytest.raises(ConfigError, match="SQL failed"):
        cat.sql("SELECT nope FROM catalog")


def test_to_lsdb_matches(catalog):
    lsdb = pytest.importorskip("lsdb")
    cat = open_catalog(catalog)
    bits = [cat.where(f"(flags & {b}) == {b}").count() for b in (1, 2, 4)]
    assert 0 < max(bits) < N_ROWS  # the bit tests below select some rows, not all
    for q in (cat.cone(0.3, -1.0, 3 * 3600), cat.box(350, 10, -5, 5).where("z < 0.3").select("source_id,z"),
              cat.where("(flags & 1) == 0"), cat.where("flags & 2").select("source_id"),
              cat.where("flags | 0").select("source_id")):
        lz = q.to_lsdb()
        assert isinstance(lz, lsdb.Catalog)
        assert sorted(lz.compute()["source_id"]) == ids(q.to_arrow())
    assert list(cat.select("source_id,z").to_lsdb().columns)[:2] == ["source_id", "z"]


@pytest.mark.parametrize("ext", [".fits", ".vot", ".parquet", ".csv"])
def test_exports_keep_units(catalog, tmp_path, ext):
    from astropy.table import QTable

    t = open_catalog(catalog).cone(45.0, 0.0, 1800).to_arrow()
    dest = tmp_path / f"out{ext}"
    write_table(t, dest)
    with pytest.raises(CatalogError, match="overwrite"):
        write_table(t, dest, overwrite=False)
    if ext == ".csv":
        lines = dest.read_text().splitlines()
        assert lines[0].split(",")[:4] == ["source_id", "survey", "ra", "dec"] and "latent_5" in lines[0]
        assert len(lines) == t.num_rows + 1
        return
    if ext == ".parquet":
        back = pq.read_table(dest)
        assert back.schema.field("w1_mag").metadata[b"unit"] == b"mag" and back.num_rows == t.num_rows
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)  # VOUnit deprecates erg (norm), read from the VOTable
        back = QTable.read(dest)
    assert len(back) == t.num_rows
    assert back["ra"].unit == u.deg and back["w1_mag"].unit == u.mag and back["w4_mag_err"].unit == u.mag
    # a survey unit outside the FITS standard keeps the survey's spelling (astropy alone would drop it)
    assert u.Unit(back["flux_w1"].unit.to_string()) == u.nanomaggy and "unWISE" in t.schema.field("flux_w1").metadata[b"description"].decode()
    np.testing.assert_allclose(np.asarray(back["flux_w1"].value, float), t.column("flux_w1").to_numpy(zero_copy_only=False))
    assert back["norm"].unit.is_equivalent(u.erg / u.s / u.cm ** 2 / u.AA)
    assert back["latent"].shape == (t.num_rows, 6)
    np.testing.assert_allclose(back["ra"].value, t.column("ra").to_numpy())
    assert list(back["source_id"]) == t.column("source_id").to_pylist()
    if ext == ".vot":
        from astropy.io.votable import parse_single_table

        fields = {f.name: f for f in parse_single_table(dest).fields}
        assert fields["ra"].ucd == "pos.eq.ra;meta.main" and "Vega" in fields["w1_mag"].description


def test_nulls_with_units_stay_null(tmp_path):
    """An integer column with a unit and nulls (e.g. one survey's column in a mixed catalog) keeps its nulls."""
    from astropy.table import Table

    from catalogpred.query import arrow_to_astropy

    fld = pa.field("mjd", pa.int32(), metadata={b"unit": b"d", b"description": b"MJD"})
    t = pa.Table.from_arrays([pa.array([55000, None, 56000], pa.int32())], schema=pa.schema([fld]))
    q = arrow_to_astropy(t)
    assert q["mjd"].unit == u.day and list(q["mjd"].mask) == [False, True, False]
    for ext in (".fits", ".vot"):
        write_table(t, tmp_path / f"m{ext}")
        back = Table.read(tmp_path / f"m{ext}")
        assert list(np.ma.getmaskarray(back["mjd"])) == [False, True, False] and back["mjd"][2] == 56000


def test_format_table_aligned(catalog):
    t = open_catalog(catalog).select("source_id,ra,dec,w1_mag,latent,flags").limit(3).to_arrow()
    lines = format_table(t).splitlines()
    assert lines[0].split() == ["source_id", "ra", "dec", "w1_mag", "latent", "flags"]
    assert lines[1].split() == ["deg", "deg", "mag"] and set(lines[2]) <= {"-", " "}
    assert len(lines) == 6 and len({len(x) for x in lines[2:]}) <= 3
    assert lines[3].index(f"{t.column('ra')[0].as_py():.6f}") + len(f"{t.column('ra')[0].as_py():.6f}") \
        == lines[0].index("ra") + 2  # numbers are right-aligned under their header


def test_regions_are_plain_values():
    assert Cone(10, 20, 1.0).contains(np.array([10.0, 12.0]), np.array([20.5, 20.0])).tolist() == [True, False]
    assert Box(350, 10, -1, 1).contains(np.array([355.0, 5.0, 20.0]), np.zeros(3)).tolist() == [True, True, False]
    assert Box(0, 360, 60, 90).cover(0, range(12)) == {0, 1, 2, 3}  # the northern base pixels
    assert Cone(0, 0, 181).cover(2, range(192)) == set(range(192))
    assert Cone(0, 0, 0.1).cover(0, range(12)) == {4} and Box(40, 50, -1, 1).cover(1, []) == set()


# --------------------------------------------------------------------------- CLI
def test_every_command_has_help_with_example(capsys):
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and f"catalogpred {cmd}" in out, cmd


def test_cli_query_csv_when_piped(catalog, everything, capsys):
    assert main(["query", str(catalog), "--cone", "0", "0", "1deg", "--columns", "source_id,ra,dec,w1_mag"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "source_id,ra,dec,w1_mag"
    assert sorted(line.split(",")[0] for line in out[1:]) == ids(brute_cone(everything, 0, 0, 1))
    assert main(["query", str(catalog), "--box", "350", "10", "-5", "5", "--limit", "4", "--columns", "ra"]) == 0
    ra = [float(x) for x in capsys.readouterr().out.splitlines()[1:]]
    assert len(ra) == 4 and all(r >= 350 or r <= 10 for r in ra)


@pytest.mark.parametrize("ra,dec", [("00:01:12", "-05:00:00"), ("0h01m12s", "-5d00m00s"), ("00 01 12", "-05 00 00"),
                                    ("0.3deg", "-300arcmin"), ("0.3", "-5")])
def test_cli_cone_takes_sexagesimal_and_southern_dec(catalog, everything, capsys, ra, dec):
    """RA 00:01:12 is 0.3 deg (hours), Dec -05:00:00 is -5 deg; argparse must not take '-05:00:00' for an option."""
    assert main(["query", str(catalog), "--cone", ra, dec, "10arcmin", "--columns", "source_id"]) == 0
    got = sorted(capsys.readouterr().out.splitlines()[1:])
    assert got == ids(brute_cone(everything, 0.3, -5.0, 10 / 60)) and got


def test_cli_cone_bad_coordinate_says_what_it_takes(catalog, capsys):
    assert main(["query", str(catalog), "--cone", "12:00:00", "north", "60"]) == 1
    assert "cannot read 'north' as Dec" in capsys.readouterr().err


def test_cli_query_table_sql_id(catalog, everything, capsys):
    some = everything.column("source_id")[5].as_py()
    assert main(["query", str(catalog), "--id", some, "--columns", "source_id,z", "--format", "table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["source_id", "z"] and lines[2].split()[0] == some and len(lines) == 3
    assert main(["query", str(catalog), "--cone", "45", "0", "1800", "--sql",
                 "SELECT survey, count(*) AS n FROM catalog GROUP BY survey ORDER BY survey"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "survey,n"
    assert sum(int(x.split(",")[1]) for x in out[1:]) == brute_cone(everything, 45, 0, 0.5).num_rows
    assert main(["query", str(catalog), "--id", "sdss-nope"]) == 1
    assert "no row with source_id sdss-nope" in capsys.readouterr().err
    assert main(["query", str(catalog), "--where", "nope > 1"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "columns:" in err and "Traceback" not in err
    assert main(["query", str(catalog), "--cone", "1", "2", "big"]) == 1
    assert "angle" in capsys.readouterr().err


def test_cli_query_outputs(catalog, tmp_path, capsys):
    from astropy.table import QTable

    for ext in (".fits", ".vot", ".parquet", ".csv"):
        dest = tmp_path / f"agn{ext}"
        assert main(["query", str(catalog), "--cone", "0", "0", "3600", "--where", "w1_mag - w2_mag > 0.1",
                     "-o", str(dest)]) == 0
        assert dest.exists()
        if ext in (".fits", ".vot"):
            t = QTable.read(dest)
            assert t["w1_mag"].unit == u.mag and ((t["w1_mag"] - t["w2_mag"]).value > 0.1).all()
    assert main(["query", str(catalog), "-o", str(tmp_path / "agn.fits")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["query", str(catalog), "--limit", "3", "-o", str(tmp_path / "agn.fits"), "--overwrite"]) == 0
    assert main(["query", str(catalog), "-o", str(tmp_path / "x.txt")]) == 1
    assert "unknown output format" in capsys.readouterr().err


def test_cli_query_into_a_closed_pipe(catalog):
    """`catalogpred query … | head -1`: no traceback when the reader stops, and the shell's SIGPIPE status."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "import sys; from catalogpred.cli import main; sys.exit(main())",
                          "query", str(catalog), "--format", "csv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"source_id,")
    p.stdout.close()  # 12,000 rows of CSV do not fit the pipe: the next write fails
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "Error" not in err


def test_cli_info(catalog, capsys):
    assert main(["info", str(catalog), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == N_ROWS and set(info["rows_per_survey"]) == {"sdss", "desi"}
    assert sum(info["rows_per_survey"].values()) == N_ROWS
    assert info["order"] == 3 and 0 < info["area_deg2"]["moc"] <= 41253 and info["area_deg2"]["moc_order"] == 8
    cols = {c["name"]: c for c in info["columns"]}
    assert cols["w1_mag"]["unit"] == "mag" and "Vega" in cols["w1_mag"]["description"]
    assert cols["latent"]["type"] == "float32[6]"
    assert main(["info", str(catalog)]) == 0
    out = capsys.readouterr().out
    assert "rows      12,000" in out and "desi" in out and "deg2" in out and "w1_mag" in out
    # one block: one file per leaf
    assert info["files"] == info["leaves"] and info["leaves_of_several_files"] == 0
    assert f"files     {info['files']:,d} Parquet files, one per leaf" in out


def test_cli_info_counts_the_leaves_of_several_files(tmp_path, capsys):
    """A catalog written with predict --no-merge: info counts the leaves that hold several files and says how to
    merge them."""
    path = tmp_path / "catalog"
    bench_query.build_catalog(path, 600, order=1, block_rows=200)
    files = sorted((path / "dataset").glob("Norder=*/Dir=*/Npix=*/*.parquet"))
    several = {f.parent for f in files if len(list(f.parent.glob("*.parquet"))) > 1}
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["files"], info["leaves_of_several_files"]) == (len(files), len(several)) and several
    assert main(["info", str(path)]) == 0
    assert (f"files     {len(files):,d} Parquet files: {len(several):,d} leaves hold several (written with predict "
            "--no-merge; the same predict without it merges them)") in capsys.readouterr().out


def test_part_files_read_in_astropy_with_null_strings(catalog):
    """A multi-survey catalog's part files hold nulls in other surveys' string columns (desi_survey of an SDSS
    row): astropy's Parquet reader takes the string widths from ``table::len::`` metadata, and without it
    failed on the nulls."""
    from astropy.table import Table

    part = next((catalog / "dataset").glob("Norder=*/Dir=*/Npix=*/*.parquet"))
    want = pq.read_table(part)
    assert want.column("desi_survey").null_count > 0
    t = Table.read(part)
    assert len(t) == want.num_rows and list(t["source_id"]) == want.column("source_id").to_pylist()
    assert b"table::len::source_id" not in pq.read_schema(catalog / "dataset" / "_common_metadata").metadata


def test_vo_parquet_fields():
    """The VO-Parquet FIELDs: the nanomaggy as a quoted VOUnit, units and list sizes."""
    from astropy.io.votable import parse_single_table

    from catalogpred.catalog import vo_table_xml

    xml = vo_table_xml(bench_query._columns())
    fields = {f.name: f for f in parse_single_table(io.BytesIO(xml.encode())).iter_fields_and_params()}
    assert "nmgy" not in xml and str(fields["flux_w1"].unit) == "nanomaggy"  # not astropy's non-VOUnit nmgy
    assert fields["latent"].arraysize == str(bench_query.N_LATENT) and fields["w1_mag"].unit == u.mag


# --------------------------------------------------------------------------- walkthrough fixes
def test_where_tests_bits_of_flags(catalog, everything, capsys):
    """'(flags & 1) > 0' tests a bit of the integer bitmask (pandas refuses '&' between a column and a number
    unless given a column of it); '&' still combines conditions, and a C-style 'flags & 2 == 2' says why not."""
    cat = open_catalog(catalog)
    flags, z = everything.column("flags").to_numpy(), everything.column("z").to_numpy()
    src = np.array(everything.column("source_id").to_pylist())
    for bit in (1, 2, 4):
        want = sorted(src[(flags & bit) > 0])
        assert ids(cat.where(f"(flags & {bit}) > 0").to_arrow()) == want and want
        assert ids(cat.where(f"(flags & {bit}) == 0").to_arrow()) == sorted(src[(flags & bit) == 0])
    assert ids(cat.where("flags & 4").to_arrow()) == sorted(src[(flags & 4) > 0])  # nonzero is true
    assert cat.where("(flags | 1) == 3").count() == int(((flags | 1) == 3).sum()) > 0
    both = cat.where("(flags & 2) > 0 & z < 0.2").to_arrow()  # '&' binds like 'and': two conditions
    assert ids(both) == sorted(src[((flags & 2) > 0) & (z < 0.2)])
    with pytest.raises(ConfigError, match=r"need parentheses: '\(flags & 2\) == 2'"):
        cat.where("flags & 2 == 2").to_arrow()
    with pytest.raises(ConfigError) as exc:  # from Python, the message names no command-line option
        cat.where("nope > 1").to_arrow()
    assert str(exc.value).startswith("cannot evaluate the filter 'nope > 1'") and "--where" not in str(exc.value)
    assert main(["query", str(catalog), "--where", "(flags & 1) > 0", "--columns", "source_id", "--format", "csv"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()[1:]) == sorted(src[(flags & 1) > 0])


def test_cone_radius_as_text_with_units(catalog, capsys):
    cat = open_catalog(catalog)
    want = ids(cat.cone(45.0, 0.0, 1800).to_arrow())
    assert want
    for r in ("30arcmin", "0.5 deg", "1800", "30'", 30 * u.arcmin):
        assert ids(cat.cone(45.0, 0.0, r).to_arrow()) == want, r
        assert ids(cat.cone(45.0, 0.0, radius=r).to_arrow()) == want, r
    for bad in ("wide", 5 * u.m, "10 kg", None):
        with pytest.raises(ConfigError, match="radius"):
            cat.cone(45.0, 0.0, bad)
    with pytest.raises(ConfigError, match="angle"):
        cat.cone(45 * u.kg, 0.0, 60)
    assert main(["query", str(catalog), "--cone", "45", "0", "30'", "--columns", "source_id"]) == 0
    assert sorted(capsys.readouterr().out.splitlines()[1:]) == want


def test_output_path_errors_are_one_line(catalog, tmp_path, capsys):
    t = open_catalog(catalog).limit(3).to_arrow()
    for ext in (".fits", ".vot", ".parquet", ".csv"):
        with pytest.raises(ConfigError, match="does not exist; create it first"):
            write_table(t, tmp_path / "nodir" / f"out{ext}")
        assert main(["query", str(catalog), "--limit", "3", "-o", str(tmp_path / "nodir" / f"out{ext}")]) == 1
        err = capsys.readouterr().err
        assert "directory" in err and "nodir" in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="is a directory"):
        write_table(t, tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        write_table(t, tmp_path / "afile" / "out.fits")
    write_table(t, tmp_path / "t.csv")
    with pytest.raises(CatalogError, match="--overwrite on the command line, overwrite=True in Python"):
        write_table(t, tmp_path / "t.csv", overwrite=False)
    assert not (tmp_path / "nodir").exists()


def test_cli_sql_with_columns_picks_from_the_result(catalog, everything, capsys):
    """--columns used to narrow the view before --sql ran (a DuckDB Binder Error on w1_mag)."""
    sql = "SELECT source_id, w1_mag FROM catalog ORDER BY source_id LIMIT 5"
    assert main(["query", str(catalog), "--sql", sql, "--columns", "source_id", "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "source_id" and out[1:] == sorted(everything.column("source_id").to_pylist())[:5]
    assert main(["query", str(catalog), "--sql", sql, "--columns", "ra"]) == 1
    err = capsys.readouterr().err
    assert "not in the --sql result" in err and "source_id, w1_mag" in err and "Binder" not in err
    with pytest.raises(SystemExit):
        main(["query", "--help"])
    assert "with --sql: columns of the SQL result" in " ".join(capsys.readouterr().out.split())


def _desi_rows(catalog) -> pa.Table:
    """Rows with DESI's flux_w1/flux_ivar_w1 (nanomaggy, nanomaggy-2) and SDSS rows with null strings."""
    t = open_catalog(catalog).cone(45.0, 0.0, 1800).to_arrow()
    assert t.column("flux_w1").null_count < t.num_rows and t.column("desi_survey").null_count > 0
    return t


def test_fits_export_keeps_nanomaggy_and_every_description(catalog, tmp_path):
    """nanomaggy has no FITS spelling: astropy keeps it in its column metadata, which a TUNIT it cannot parse
    used to override (an unrecognised unit, a warning, and the column's description and UCD lost)."""
    from astropy.io import fits
    from astropy.table import QTable

    t = _desi_rows(catalog)
    write_table(t, tmp_path / "o.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("error", u.UnitsWarning)
        back = QTable.read(tmp_path / "o.fits")
    assert back["flux_w1"].unit == u.nanomaggy and back["flux_ivar_w1"].unit == u.nanomaggy ** -2
    np.testing.assert_allclose(back["flux_w1"].value, t.column("flux_w1").to_numpy(zero_copy_only=False))
    for f in t.schema:
        md = {k.decode(): v.decode() for k, v in f.metadata.items()}
        assert (back[f.name].info.description or "") == md["description"], f.name
        assert (back[f.name].info.meta or {}).get("ucd", "") == md.get("ucd", ""), f.name
    header = fits.getheader(tmp_path / "o.fits", 1)
    i = [header[f"TTYPE{k}"] for k in range(1, header["TFIELDS"] + 1)].index("flux_w1") + 1
    assert f"TUNIT{i}" not in header and header.comments[f"TTYPE{i}"] == "unit: nanomaggy"  # for other readers


def test_votable_export_writes_valid_vounits(catalog, tmp_path):
    from astropy.io.votable import parse_single_table
    from astropy.io.votable.exceptions import W50
    from astropy.table import Table

    t = _desi_rows(catalog)
    with warnings.catch_warnings():
        warnings.simplefilter("error", W50)  # 'nmgy', '1 / nmgy2' are not VOUnits
        write_table(t, tmp_path / "o.vot")
        fields = {f.name: f for f in parse_single_table(tmp_path / "o.vot").fields}
    assert "nmgy" not in (tmp_path / "o.vot").read_text()
    assert str(fields["flux_w1"].unit) == "nanomaggy" and fields["flux_w1"].ucd.startswith("phot.flux")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)  # VOUnit deprecates erg (norm)
        back = Table.read(tmp_path / "o.vot")
    assert u.Unit(back["flux_w1"].unit.to_string()) == u.nanomaggy and back["w1_mag"].unit == u.mag
    assert u.Unit(back["flux_ivar_w1"].unit.to_string()) == u.nanomaggy ** -2


def test_parquet_export_reads_in_astropy(catalog, tmp_path):
    """Null strings (desi_survey of SDSS rows) need astropy's table::len:: widths; the VO-Parquet metadata of a
    catalog query describes exactly the exported columns (format="parquet.votable")."""
    from astropy.table import Table

    t = _desi_rows(catalog)
    write_table(t, tmp_path / "o.parquet")
    back = Table.read(tmp_path / "o.parquet")
    assert len(back) == t.num_rows and list(back["source_id"]) == t.column("source_id").to_pylist()
    assert pq.read_table(tmp_path / "o.parquet").schema.field("w1_mag").metadata[b"unit"] == b"mag"
    sub = t.select(["source_id", "desi_survey", "ra", "flux_w1"])
    write_table(sub, tmp_path / "sub.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)
        vo = Table.read(tmp_path / "sub.parquet", format="parquet.votable")
        full = Table.read(tmp_path / "o.parquet", format="parquet.votable")
    assert vo.colnames == sub.column_names and len(vo) == sub.num_rows  # no _healpix_29 of an unexported column
    assert vo["ra"].unit == u.deg and u.Unit(vo["flux_w1"].unit.to_string()) == u.nanomaggy
    assert vo["ra"].meta["ucd"] == "pos.eq.ra;meta.main" and vo["ra"].description.startswith("Right ascension")
    assert full.colnames == t.column_names and full["latent"].shape == (t.num_rows, bench_query.N_LATENT)


def test_plain_astropy_read_of_a_parquet_export_has_units(catalog, tmp_path):
    """``Table.read(x.parquet)`` (astropy's plain Parquet reader, not parquet.votable) takes units, descriptions
    and UCDs from the astropy ``table_meta_yaml`` header an export carries; it had none (w1_mag's unit None)."""
    from astropy.table import Table

    assert main(["query", str(catalog), "--limit", "5", "-o", str(tmp_path / "q.parquet")]) == 0
    back = Table.read(tmp_path / "q.parquet")
    assert back["w1_mag"].unit == u.mag and back["ra"].unit == u.deg and back["flux_w1"].unit == u.nanomaggy
    assert back["ra"].meta["ucd"] == "pos.eq.ra;meta.main" and back["w1_mag"].description.startswith("Predicted WISE")
    assert back["source_id"].unit is None and len(back) == 5


def test_parquet_export_warns_that_astropy_cannot_read_its_nullable_big_integers(catalog, tmp_path, caplog):
    """A multi-survey export has integer columns with nulls (DESI's 17-digit targetid in an SDSS row): astropy's
    Parquet readers turn them into float64, which cannot hold such values exactly; the export says so, and
    pyarrow keeps them exact."""
    import logging

    import pyarrow.parquet as pq

    out = tmp_path / "all.parquet"
    with caplog.at_level(logging.WARNING, logger="catalogpred.query.export"):
        assert main(["query", str(catalog), "-o", str(out)]) == 0
    warned = [r.getMessage() for r in caplog.records if "float64" in r.getMessage()]
    ids = [v for v in pq.read_table(out).column("targetid").to_pylist() if v is not None]
    assert ids and max(ids) > 2 ** 53 and None in pq.read_table(out).column("targetid").to_pylist()
    assert len(warned) == 1 and warned[0].startswith("targetid") and "pyarrow" in warned[0]
    with caplog.at_level(logging.WARNING, logger="catalogpred.query.export"):
        caplog.clear()
        assert main(["query", str(catalog), "--columns", "source_id,ra,dec", "-o", str(tmp_path / "s.parquet")]) == 0
    assert not [r for r in caplog.records if "float64" in r.getMessage()]


def test_sql_results_export_with_vo_parquet_metadata(catalog, tmp_path):
    """A ``--sql`` result exported to Parquet describes its columns as a query's export does: catalog columns keep
    unit/UCD/description in the VO-Parquet header, computed ones are described without them."""
    from astropy.table import Table

    out = tmp_path / "s.parquet"
    assert main(["query", str(catalog), "--sql", "SELECT source_id, w1_mag, w1_mag - w2_mag AS w12 FROM catalog "
                 "LIMIT 4", "-o", str(out)]) == 0
    back = Table.read(out, format="parquet.votable")
    assert back.colnames == ["source_id", "w1_mag", "w12"] and len(back) == 4
    assert back["w1_mag"].unit == u.mag and back["w1_mag"].meta["ucd"].startswith("phot.mag")
    assert back["w12"].unit is None


def test_sql_computed_columns_do_not_take_a_catalog_columns_metadata_by_name(catalog):
    """``ra / 15 AS ra`` (hours) kept ra's unit deg, and ``w1_mag + 2.699 AS w1_mag`` (AB) its description "Vega",
    because metadata was restored by name; now only columns passed through unchanged keep it (DuckDB's parse of
    the query says which), also renamed, qualified or from ``*``."""
    q = open_catalog(catalog)

    def units(sql):
        return {f.name: (f.metadata or {}).get(b"unit", b"-").decode() for f in q.sql(sql + " LIMIT 3").schema}

    got = units("SELECT source_id, ra / 15 AS ra, w1_mag + 2.699 AS w1_mag, dec, w2_mag AS w2, c.z FROM catalog c")
    assert got == {"source_id": "", "ra": "-", "w1_mag": "-", "dec": "deg", "w2": "mag", "z": ""}
    assert units("SELECT * REPLACE (ra / 15 AS ra) FROM catalog")["ra"] == "-"
    assert units("SELECT * FROM catalog")["ra"] == "deg"
    assert units("SELECT ra FROM (SELECT ra * 2 AS ra FROM catalog)") == {"ra": "-"}
    assert units("SELECT a.ra FROM catalog a JOIN catalog b USING (source_id)") == {"ra": "deg"}


def test_votable_export_parses_strictly(catalog, tmp_path):
    """Every FIELD's UCD and unit is valid VOTable: astropy's parser with verify="exception" reads the export
    (meta.file, a secondary UCD word, cannot stand first: source_file is meta.id;meta.file)."""
    from astropy.io.votable import parse

    dest = tmp_path / "strict.vot"
    write_table(open_catalog(catalog).limit(5).to_arrow(), dest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", u.UnitsWarning)  # VOUnit deprecates erg and Angstrom (norm): still valid
        t = parse(str(dest), verify="exception").get_first_table()
    assert t.get_field_by_id("source_file").ucd == "meta.id;meta.file"


def test_cone_and_box_read_sexagesimal_and_refuse_what_they_cannot_search(catalog):
    """cone/box read RA/Dec text as the CLI does (colon sexagesimal was refused in Python), and refuse a NaN or
    infinite centre (it searched nothing and said nothing), two radii (radius= won silently) and an ambiguous
    unit ('10 m' was read as 10 arcmin, against its docstring)."""
    from catalogpred.query import angle_value, coordinate_value

    from astropy.coordinates import Angle

    q = open_catalog(catalog)
    first = q.limit(1).to_arrow()
    ra, dec = round(first.column("ra")[0].as_py(), 2), round(first.column("dec")[0].as_py(), 2)
    ra_text = Angle(ra, u.deg).to_string(unit=u.hourangle, sep=":", precision=3)
    dec_text = Angle(dec, u.deg).to_string(unit=u.deg, sep=":", precision=3, alwayssign=True)
    assert (coordinate_value(ra_text, "ra"), coordinate_value(dec_text, "dec")) == pytest.approx((ra, dec))
    a = q.cone(ra_text, dec_text, "30arcmin").to_arrow()
    b = q.cone(ra, dec, 1800).to_arrow()
    assert a.num_rows == b.num_rows > 0 and a.column("source_id").equals(b.column("source_id"))
    lo = Angle(ra - 0.5, u.deg).to_string(unit=u.hourangle, sep=":", precision=4)
    hi = Angle(ra + 0.5, u.deg).to_string(unit=u.hourangle, sep=":", precision=4)
    assert q.box(lo, hi, dec - 0.5, dec + 0.5).to_arrow().num_rows == \
        q.box(ra - 0.5, ra + 0.5, dec - 0.5, dec + 0.5).to_arrow().num_rows > 0
    for bad, match in ((lambda: q.cone(float("nan"), 7, 60), "RA must be finite"),
                       (lambda: q.cone(150, float("inf"), 60), "Dec must be finite"),
                       (lambda: q.box(float("nan"), 10, 0, 1), "RA must be finite"),
                       (lambda: q.cone(150, 2, 600, radius=1 * u.deg), "one radius"),
                       (lambda: q.cone(150, 2, "10 m"), "ambiguous"),
                       (lambda: q.cone(150, 2, float("nan")), "must be finite")):
        with pytest.raises(ConfigError, match=match):
            bad()
    assert angle_value("0d10m") == angle_value("10'") == angle_value("10arcmin") == 600
    assert main(["query", str(catalog), "--cone", "nan", "7", "60"]) == 1


def test_write_table_takes_what_the_api_returns_and_refuses_what_it_cannot_write(catalog, tmp_path):
    """write_table/format_table took only pyarrow Tables (AttributeError on a QTable, TypeError on a query);
    FITS to a stream failed (OSError) for a column in nanomaggies; a stream without fmt got a garbled message;
    .parquet.gz wrote a plain Parquet file under a .gz name."""
    from astropy.table import Table

    first = open_catalog(catalog).limit(1).to_arrow()
    q = open_catalog(catalog).cone(first.column("ra")[0].as_py(), first.column("dec")[0].as_py(), 1800)
    rows = q.to_arrow()
    assert rows.num_rows > 0
    empty = open_catalog(catalog).where("ra > 1000")
    write_table(empty.to_astropy(), tmp_path / "empty.fits")  # an empty QTable with its 2-D latent column
    assert len(Table.read(tmp_path / "empty.fits")) == 0
    write_table(q.to_astropy(), tmp_path / "a.fits")
    write_table(q, tmp_path / "b.fits")
    write_table(q.to_pandas(), tmp_path / "c.csv")
    for name in ("a.fits", "b.fits"):
        back = Table.read(tmp_path / name)
        assert len(back) == rows.num_rows and back["w1_mag"].unit == u.mag and back["ra"].unit == u.deg
    assert "source_id" in format_table(q.to_astropy(), max_rows=2)
    everything = open_catalog(catalog).select("all").limit(5).to_arrow()
    assert "flux_w1" in everything.column_names
    buf = io.BytesIO()
    write_table(everything, buf, fmt="fits")
    assert Table.read(io.BytesIO(buf.getvalue()), format="fits")["flux_w1"].unit == u.nmgy
    for bad, match in ((lambda: write_table(everything, io.StringIO()), "needs a format"),
                       (lambda: write_table(everything, tmp_path / "x.parquet.gz"), "name it .parquet"),
                       (lambda: write_table(5, tmp_path / "x.csv"), "cannot write a int")):
        with pytest.raises(ConfigError, match=match):
            bad()


def test_a_string_column_of_nulls_reads_as_none_in_astropy(tmp_path):
    """A string column null in every row was given width 1, so astropy read 'N', not the 'None' the README says."""
    from astropy.table import Table

    t = pa.table({"source_id": ["a", "b"], "patch": pa.array([None, None], pa.string())})
    write_table(t, tmp_path / "n.parquet")
    assert list(Table.read(tmp_path / "n.parquet")["patch"]) == ["None", "None"]


def test_where_refuses_a_string_column_compared_with_a_number(catalog):
    """``source_id == 5`` compared a string with a number: pandas found no row, silently."""
    q = open_catalog(catalog)
    with pytest.raises(ConfigError, match="source_id is a string column.*quote the value"):
        q.where("source_id == 5")
    with pytest.raises(ConfigError, match="string column"):
        q.where("12 != source_id")
    assert q.where("ra > 150").to_arrow().num_rows > 0  # numbers against numbers as before


def test_open_catalog_says_what_the_path_is_instead(tmp_path):
    import zarr

    for bad in (5, None):
        with pytest.raises(ConfigError, match="catalog directory path"):
            open_catalog(bad)
    with pytest.raises(CatalogError, match="no such catalog directory"):
        open_catalog(tmp_path / "nope")
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    with pytest.raises(CatalogError, match="is a spectra store .*catalogpred predict --store"):
        open_catalog(tmp_path / "s.zarr")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bundle.json").write_text("{}")
    with pytest.raises(CatalogError, match="is a model bundle"):
        open_catalog(tmp_path / "model")


def test_select_id_and_limit_refuse_wrong_types(catalog):
    q = open_catalog(catalog)
    for bad, match in ((lambda: q.select(5), "columns must be names"), (lambda: q.id(5), "source_id string"),
                       (lambda: q.limit("a"), "whole count"), (lambda: q.limit(2.7), "whole count")):
        with pytest.raises(ConfigError, match=match):
            bad()
