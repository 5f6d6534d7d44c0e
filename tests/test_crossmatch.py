"""Crossmatch and IR excess on a constructed case: external positions moved by known offsets,
observed magnitudes shifted by known amounts from the predictions. Also ``catalogpred plot``."""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.coordinates import SkyCoord

from catalogpred.cli import main
from catalogpred.crossmatch import crossmatch, find_photometry_columns, find_radec_columns, read_external
from catalogpred.errors import ConfigError, InputFileError
from catalogpred.query import open_catalog, write_table

REPO = Path(__file__).resolve().parents[1]
N_ROWS = 4000
OFFSETS = [0.0, 0.4, 1.0, 1.49, 1.51, 2.0, 5.0]  # arcsec; radius 1.5 matches the first four


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_query", REPO / "bench" / "bench_query.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path_factory.mktemp("xmatch") / "catalog"
    bench.build_catalog(path, N_ROWS, order=2, block_rows=N_ROWS, seed=8)
    return path


@pytest.fixture(scope="module")
def rows(catalog):
    """The whole catalog (plain pyarrow), and rows chosen for the constructed case."""
    t = pq.ParquetDataset(catalog / "dataset", partitioning=None).read()
    return t


def moved(ra, dec, offset_arcsec, pa_deg):
    c = SkyCoord(ra * u.deg, dec * u.deg).directional_offset_by(pa_deg * u.deg, offset_arcsec * u.arcsec)
    return c.ra.deg, c.dec.deg


@pytest.fixture(scope="module")
def constructed(rows):
    """External table: row i is catalog row picks[i] moved by OFFSETS[i] at a random position angle."""
    rng = np.random.default_rng(4)
    picks = rng.choice(rows.num_rows, len(OFFSETS), replace=False)
    ra0, dec0 = rows.column("ra").to_numpy()[picks], rows.column("dec").to_numpy()[picks]
    ra, dec = moved(ra0, dec0, np.array(OFFSETS), rng.uniform(0, 360, len(OFFSETS)))
    ext = {"name": [f"ext{i}" for i in range(len(OFFSETS))] + ["no-position"],
           "ra": np.r_[ra, np.nan], "dec": np.r_[dec, np.nan]}
    return pa.table(ext), picks


def test_constructed_offsets(catalog, rows, constructed):
    ext, picks = constructed
    t = crossmatch(catalog, ext, radius_arcsec=1.5)
    n_match = sum(o <= 1.5 for o in OFFSETS)
    assert t.num_rows == n_match == 4
    assert t.column("ext_row").to_pylist() == list(range(n_match))
    want_ids = [rows.column("source_id")[int(p)].as_py() for p in picks[:n_match]]
    assert t.column("source_id").to_pylist() == want_ids
    np.testing.assert_allclose(t.column("separation_arcsec").to_numpy(), OFFSETS[:n_match], atol=1e-6)
    assert t.schema.field("separation_arcsec").metadata[b"unit"] == b"arcsec"
    assert "ra_ext" in t.column_names and "name" in t.column_names  # clashing external names get _ext
    narrow = crossmatch(catalog, ext, radius_arcsec=1.5, columns="source_id")  # the same names, whatever is selected
    assert narrow.column_names[:4] == ["source_id", "name", "ra_ext", "dec_ext"]
    assert "w1_excess" not in t.column_names  # no photometry, no excess columns
    # larger radius: all seven; keep_unmatched: every external row, unmatched with null catalog columns
    assert crossmatch(catalog, ext, radius_arcsec=5.01).num_rows == 7
    k = crossmatch(catalog, ext, radius_arcsec=1.5, keep_unmatched=True)
    assert k.num_rows == len(OFFSETS) + 1 and k.column("source_id").null_count == len(OFFSETS) + 1 - n_match
    assert k.column("separation_arcsec").to_pylist()[4:] == [None] * 4


def test_pruned_match_equals_brute_force(catalog, rows):
    """Positions around leaf boundaries, radii on both pruning paths: same as a match on every row."""
    rng = np.random.default_rng(9)
    cat_ra, cat_dec = rows.column("ra").to_numpy(), rows.column("dec").to_numpy()
    picks = rng.choice(rows.num_rows, 300)
    ra, dec = moved(cat_ra[picks], cat_dec[picks], rng.uniform(0, 3, 300), rng.uniform(0, 360, 300))
    ra = np.r_[ra, rng.uniform(0, 360, 300)]
    dec = np.r_[dec, np.degrees(np.arcsin(rng.uniform(-1, 1, 300)))]
    ext = pa.table({"RAJ2000": ra, "DEJ2000": dec})
    all_c = SkyCoord(cat_ra * u.deg, cat_dec * u.deg)
    idx, d2, _ = SkyCoord(ra * u.deg, dec * u.deg).match_to_catalog_sky(all_c)
    for radius in (2.0, 2 * 3600.0):  # neighbour-cell path, and per-source cone covers
        t = crossmatch(catalog, ext, radius_arcsec=radius, columns="all")
        ok = d2.to_value(u.arcsec) <= radius
        assert t.column("ext_row").to_pylist() == np.flatnonzero(ok).tolist()
        assert t.column("source_id").to_pylist() == rows.column("source_id").take(pa.array(idx[ok])).to_pylist()
        assert "latent" in t.column_names


def photometry_case(rows, picks, kind="allwise"):
    """Observed = predicted - delta, so w?_excess = delta; known errors; some non-detections."""
    pred = {b: rows.column(f"{b}_mag").to_numpy()[picks].astype(float) for b in ("w1", "w2", "w3", "w4")}
    n = len(picks)
    delta = {"w1": np.zeros(n), "w2": np.full(n, 0.1), "w3": np.r_[3.0, -3.0, 0.5, 1.0], "w4": np.r_[0.0, 0, 0, 2.5]}
    sig = {"w1": np.full(n, 0.03), "w2": np.full(n, 0.05), "w3": np.r_[0.1, 0.1, 0.2, 0.2],
           "w4": np.r_[99.0, np.nan, 0.3, 0.3]}
    obs = {b: pred[b] - delta[b] for b in pred}
    obs["w1"][2], sig["w1"][2] = np.nan, np.nan  # not detected in W1 either
    if kind == "allwise":
        cols = {**{f"{b}mpro": obs[b] for b in obs}, **{f"{b}sigmpro": sig[b] for b in sig}}
    elif kind == "mag":
        cols = {**{f"W{b[1]}_MAG": obs[b] for b in obs}, **{f"W{b[1]}_MAG_ERR": sig[b] for b in sig}}
    else:  # VizieR II/328
        cols = {**{f"W{b[1]}mag": obs[b] for b in obs}, **{f"e_W{b[1]}mag": sig[b] for b in sig}}
    return cols, delta, sig


@pytest.mark.parametrize("kind", ["allwise", "mag", "vizier"])
def test_ir_excess_known_offsets(catalog, rows, kind):
    picks = np.array([10, 20, 30, 40])
    cols, delta, sig = photometry_case(rows, picks, kind)
    ext = pa.table({"ra": rows.column("ra").to_numpy()[picks], "dec": rows.column("dec").to_numpy()[picks], **cols})
    t = crossmatch(catalog, ext, radius_arcsec=1.0, excess_threshold=3.0)
    assert t.column("source_id").to_pylist() == rows.column("source_id").take(pa.array(picks)).to_pylist()
    for b in ("w1", "w2", "w3", "w4"):
        s_pred = rows.column(f"{b}_mag_err").to_numpy()[picks].astype(float)
        want = np.where(np.isfinite(sig[b]) & (sig[b] < 99), delta[b], np.nan)
        if b == "w1":
            want[2] = np.nan
        got = np.array([np.nan if v is None else v for v in t.column(f"{b}_excess").to_pylist()])
        np.testing.assert_allclose(got, want, atol=1e-5)  # float32 predictions
        got_s = np.array([np.nan if v is None else v for v in t.column(f"{b}_excess_sigma").to_pylist()])
        np.testing.assert_allclose(got_s, want / np.sqrt(s_pred ** 2 + sig[b] ** 2), rtol=1e-5)
    # positive = brighter than predicted: row 0 (W3 3 mag brighter, sigma ~0.3-0.6) is an IR excess,
    # row 1 (3 mag fainter) is not; the flag lists the bands beyond the threshold
    flags = t.column("ir_excess").to_pylist()
    chi = np.array(t.column("w3_excess_sigma").to_pylist(), float)
    assert flags[0] is True and chi[0] > 3 and flags[1] is False and chi[1] < -3
    assert t.column("ir_excess_bands").to_pylist()[0].startswith("w3")
    assert t.schema.field("w3_excess").metadata[b"unit"] == b"mag"
    assert all(v is not None for v in t.column("chi2_n").to_pylist())
    if kind == "mag":
        assert "w1_mag_ext" not in t.column_names and "W1_MAG" in t.column_names  # case kept, no clash
    assert t.column("w4_excess").null_count == 2  # sigma 99 and NaN are non-detections


def test_ab_magnitudes_are_compared_in_vega(catalog, rows, tmp_path):
    """The same photometry given in AB (+2.699, 3.339, 5.174, 6.620) gives the same excess as in Vega, when
    told (mag_system="ab") or when the column unit says mag(AB) (FITS TUNIT, VOTable unit); w?_mag_obs is Vega."""
    from astropy.table import Table

    from catalogpred.catalog import VEGA_TO_AB

    picks = np.array([10, 20, 30, 40])
    cols, delta, sig = photometry_case(rows, picks, "allwise")
    pos = {"ra": rows.column("ra").to_numpy()[picks], "dec": rows.column("dec").to_numpy()[picks]}
    vega = crossmatch(catalog, pa.table({**pos, **cols}), radius_arcsec=1.0)
    ab_cols = {k: v + VEGA_TO_AB[k[:2]] if "mpro" in k and "sig" not in k else v for k, v in cols.items()}
    ab = pa.table({**pos, **ab_cols})
    Table({**pos, **ab_cols}).write(tmp_path / "ab.fits")
    from astropy.io import fits

    with fits.open(tmp_path / "ab.fits", mode="update") as hdus:  # as catalogs from other tools label them
        h = hdus[1].header
        for i in range(1, h["TFIELDS"] + 1):
            if h[f"TTYPE{i}"].endswith("mpro"):
                h[f"TUNIT{i}"] = "mag(AB)" if "sig" not in h[f"TTYPE{i}"] else "mag"
    for got in (crossmatch(catalog, ab, radius_arcsec=1.0, mag_system="ab"),
                crossmatch(catalog, tmp_path / "ab.fits", radius_arcsec=1.0)):  # mag_system="auto": the unit
        for b in ("w1", "w2", "w3", "w4"):
            for col in (f"{b}_excess", f"{b}_excess_sigma", f"{b}_mag_obs", f"{b}_mag_obs_err"):
                np.testing.assert_allclose(np.array(got.column(col).to_pylist(), float),
                                           np.array(vega.column(col).to_pylist(), float), atol=1e-9, err_msg=col)
        assert got.column("ir_excess").to_pylist() == vega.column("ir_excess").to_pylist()
        assert "AB to Vega" in got.schema.field("w3_excess").metadata[b"description"].decode()
    # without the unit or the option, AB numbers would be read as Vega: 2.7-6.6 mag of spurious deficit
    wrong = crossmatch(catalog, ab, radius_arcsec=1.0)
    assert np.nanmax(np.abs(np.array(wrong.column("w1_excess").to_pylist(), float)
                            - np.array(vega.column("w1_excess").to_pylist(), float) + 2.699)) < 1e-9
    np.testing.assert_allclose(np.array(vega.column("w3_mag_obs").to_pylist(), float), cols["w3mpro"])
    with pytest.raises(ConfigError, match="mag_system"):
        crossmatch(catalog, ab, mag_system="johnson")
    # a crossmatch result as the external table: its columns keep theirs, suffixed, none doubled
    again = crossmatch(catalog, vega.drop_columns(["source_id"]), radius_arcsec=1.0)
    assert len(set(again.column_names)) == again.num_columns and "w1_mag_obs_ext" in again.column_names
    np.testing.assert_allclose(np.array(again.column("w1_mag_obs").to_pylist(), float),
                               np.array(vega.column("w1_mag_obs").to_pylist(), float))


def test_all_bands_missing_gives_null_flag(catalog, rows):
    ext = pa.table({"ra": rows.column("ra").to_numpy()[:2], "dec": rows.column("dec").to_numpy()[:2],
                    **{f"w{i}mpro": [np.nan, 15.0] for i in range(1, 5)},
                    **{f"w{i}sigmpro": [np.nan, 0.1] for i in range(1, 5)}})
    t = crossmatch(catalog, ext, radius_arcsec=1.0)
    assert t.column("ir_excess").to_pylist()[0] is None and t.column("chi2_n").to_pylist()[0] is None
    assert t.column("ir_excess").to_pylist()[1] is not None


def test_read_external_formats(tmp_path, catalog, rows, constructed):
    ext, _ = constructed
    ext = ext.slice(0, len(OFFSETS))  # FITS/VOTable need no-null strings; NaN positions stay in CSV/Parquet
    base = crossmatch(catalog, ext, radius_arcsec=1.5)
    for name in ("ext.csv", "ext.parquet", "ext.fits", "ext.vot", "ext.data"):
        path = tmp_path / name
        write_table(ext, path if not name.endswith(".data") else path, ".csv" if name.endswith(".data") else None)
        back = read_external(path)
        assert back.num_rows == ext.num_rows
        t = crossmatch(catalog, path, radius_arcsec=1.5)
        assert t.column("source_id").to_pylist() == base.column("source_id").to_pylist(), name
    with pytest.raises(InputFileError, match="no such file"):
        read_external(tmp_path / "missing.csv")


def test_sexagesimal_positions(catalog, constructed, tmp_path):
    """RA/Dec as text (SIMBAD/VizieR style: RA in hours) match as their values in degrees do."""
    ext, _ = constructed
    ext = ext.slice(0, len(OFFSETS))
    c = SkyCoord(ext.column("ra").to_numpy() * u.deg, ext.column("dec").to_numpy() * u.deg)
    text = pa.table({"name": ext.column("name"), "RAJ2000": c.ra.to_string(u.hourangle, sep=":", precision=4),
                     "DEJ2000": c.dec.to_string(u.deg, sep=" ", precision=3, alwayssign=True)})
    write_table(text, tmp_path / "sx.csv")
    want = crossmatch(catalog, ext, radius_arcsec=1.5).column("source_id").to_pylist()
    assert crossmatch(catalog, tmp_path / "sx.csv", radius_arcsec=1.5).column("source_id").to_pylist() == want
    bad = pa.table({"ra": ["12:00:00"], "dec": ["north"]})
    with pytest.raises(ConfigError, match="neither degrees nor sexagesimal"):
        crossmatch(catalog, bad)


def test_column_guessing():
    assert find_radec_columns(["RAJ2000", "DEJ2000", "x"]) == ("RAJ2000", "DEJ2000")
    assert find_radec_columns(["PLUG_RA", "PLUG_DEC"]) == ("PLUG_RA", "PLUG_DEC")
    assert find_radec_columns(["a", "b"], "A", "b") == ("a", "b")
    with pytest.raises(ConfigError, match="--ra-col"):
        find_radec_columns(["x", "y"])
    assert find_photometry_columns(["W1MPRO", "W1SIGMPRO", "w2mpro"]) == {"w1": ("W1MPRO", "W1SIGMPRO")}
    assert set(find_photometry_columns(["w3_mag", "w3_mag_err", "W4mag", "e_W4mag"])) == {"w3", "w4"}


def test_cli_crossmatch(catalog, rows, tmp_path, capsys):
    from astropy.table import QTable

    picks = np.array([10, 20, 30, 40])
    cols, _, _ = photometry_case(rows, picks)
    ext = pa.table({"RA_deg": rows.column("ra").to_numpy()[picks], "Dec_deg": rows.column("dec").to_numpy()[picks],
                    **cols})
    src = tmp_path / "allwise.parquet"
    pq.write_table(ext, src)
    out = tmp_path / "matched.fits"
    assert main(["crossmatch", str(catalog), str(src), "--radius", "1.5", "-o", str(out)]) == 0
    t = QTable.read(out)
    assert len(t) == 4 and t["separation_arcsec"].unit == u.arcsec and t["w1_mag"].unit == u.mag
    assert t["w3_excess"].unit == u.mag and bool(t["ir_excess"][0])
    capsys.readouterr()
    assert main(["crossmatch", str(catalog), str(src), "--excess-only", "--columns", "source_id,w3_mag"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("source_id,w3_mag,RA_deg") and len(lines) == 1 + 1
    assert main(["crossmatch", str(catalog), str(src), "--excess-threshold", "100", "--excess-only"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # header only
    nopos = tmp_path / "nopos.csv"
    nopos.write_text("x,y\n1,2\n")
    assert main(["crossmatch", str(catalog), str(nopos)]) == 1
    assert "--ra-col" in capsys.readouterr().err
    assert main(["crossmatch", str(catalog), str(nopos), "--ra-col", "x", "--dec-col", "y", "--excess-only"]) == 1
    assert "--excess-only needs observed W1-W4" in capsys.readouterr().err


def test_cli_plot(catalog, rows, tmp_path, capsys):
    picks = np.arange(0, 400, 3)
    cols, _, _ = photometry_case(rows, np.resize(picks, 4))
    ext = pa.table({"ra": rows.column("ra").to_numpy()[picks], "dec": rows.column("dec").to_numpy()[picks],
                    **{k: np.resize(v, len(picks)) for k, v in cols.items()}})
    src = tmp_path / "obs.parquet"
    pq.write_table(ext, src)
    assert main(["plot", str(catalog), "-o", str(tmp_path / "plots"), "--external", str(src)]) == 0
    paths = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in paths)
    assert names == ["colour_colour.png", "magnitudes.png", "predicted_vs_observed.png", "sky_density.png"]
    for p in paths:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_query_object_is_the_candidate_set(catalog, rows):
    """A CatalogQuery passed to crossmatch restricts the candidates (its where applies)."""
    picks = np.arange(50)
    ext = pa.table({"ra": rows.column("ra").to_numpy()[picks], "dec": rows.column("dec").to_numpy()[picks]})
    t = crossmatch(open_catalog(catalog).where("z < 0.2"), ext, radius_arcsec=0.5)
    z = rows.column("z").to_numpy()[picks]
    assert t.column("ext_row").to_pylist() == np.flatnonzero(z < 0.2).tolist()


def test_nanomaggies_to_ab():
    from catalogpred.tables import nanomaggies_to_ab

    mag, err = nanomaggies_to_ab([1.0, 100.0, 0.0, -2.0, 5.0, np.nan], [1.0, 0.25, 1.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(mag[:2], [22.5, 17.5])  # 1 nanomaggy = 22.5 AB
    np.testing.assert_allclose(err[:2], [2.5 / np.log(10) / 1.0, 2.5 / np.log(10) / 50.0])  # 1.0857 / (S/N)
    assert np.isnan(mag[2:]).all() and np.isnan(err[2:]).all()  # f <= 0, ivar 0, NaN: not detected


def legacy_surveys_case(rows, picks, delta_w2=1.0, snr=20.0):
    """Legacy Surveys style external photometry (FLUX_W?/FLUX_IVAR_W?, nanomaggies, AB) of rows ``picks``:
    W1 as predicted, W2 ``delta_w2`` mag brighter; the last row not detected in W1 (negative flux) and with
    no W2 data (ivar 0)."""
    from catalogpred.catalog import VEGA_TO_AB

    cols = {}
    for b, delta in (("w1", 0.0), ("w2", delta_w2)):
        ab = rows.column(f"{b}_mag").to_numpy()[picks].astype(float) - delta + VEGA_TO_AB[b]
        f = 10 ** ((22.5 - ab) / 2.5)
        cols[f"FLUX_{b.upper()}"], cols[f"FLUX_IVAR_{b.upper()}"] = f, (snr / f) ** 2
    cols["FLUX_W1"][-1] = -0.5
    cols["FLUX_IVAR_W2"][-1] = 0.0
    return cols


def test_legacy_surveys_fluxes_in_nanomaggies(catalog, rows, tmp_path):
    """An external table with WISE fluxes in nanomaggies (Legacy Surveys sweeps, DESI FIBERMAP) is compared in
    Vega magnitudes: m = 22.5 - 2.5 log10 f - VEGA_TO_AB, error 1.0857/(S/N); whatever --mag-system says."""
    from astropy.table import Table

    picks = np.array([10, 20, 30, 40])
    cols = legacy_surveys_case(rows, picks)
    pos = {"RA": rows.column("ra").to_numpy()[picks], "DEC": rows.column("dec").to_numpy()[picks]}
    Table({**pos, **cols}).write(tmp_path / "sweep.fits")
    s_pred = {b: rows.column(f"{b}_mag_err").to_numpy()[picks].astype(float) for b in ("w1", "w2")}
    for t in (crossmatch(catalog, tmp_path / "sweep.fits", radius_arcsec=1.0),
              crossmatch(catalog, pa.table({**pos, **cols}), radius_arcsec=1.0, mag_system="vega")):
        assert t.num_rows == 4 and "w3_excess" not in t.column_names
        w1 = np.array(t.column("w1_excess").to_pylist(), float)
        w2 = np.array(t.column("w2_excess").to_pylist(), float)
        np.testing.assert_allclose(w1[:3], 0.0, atol=1e-5) and np.testing.assert_allclose(w2[:3], 1.0, atol=1e-5)
        assert np.isnan(w1[3]) and np.isnan(w2[3])  # not detected / no data: null, not a deficit
        np.testing.assert_allclose(np.array(t.column("w2_mag_obs_err").to_pylist(), float)[:3], 2.5 / np.log(10) / 20)
        np.testing.assert_allclose(np.array(t.column("w2_excess_sigma").to_pylist(), float)[:3],
                                   1.0 / np.hypot(s_pred["w2"][:3], 2.5 / np.log(10) / 20), rtol=1e-5)
        assert "FLUX_W2" in t.schema.field("w2_excess").metadata[b"description"].decode()
        assert t.column("w1_mag_from_flux").null_count == 1  # the derived AB column travels along


def test_ir_excess_from_the_catalogs_own_photometry(catalog, rows, tmp_path, capsys):
    """DESI rows carry the FIBERMAP's flux_w1/flux_ivar_w1 (here equal to the prediction at S/N 20):
    ir_excess compares them in the catalog's own rows; SDSS rows get null; query --ir-excess is the CLI."""
    from catalogpred.crossmatch import ir_excess

    t = ir_excess(open_catalog(catalog).to_arrow())
    desi = np.array(t.column("survey").to_pylist()) == "desi"
    ex = np.array(t.column("w1_excess").to_pylist(), float)
    assert desi.any() and np.isfinite(ex[desi]).all() and np.isnan(ex[~desi]).all()
    np.testing.assert_allclose(ex[desi], 0.0, atol=2e-5)  # float32 fluxes
    assert t.column("ir_excess").null_count == (~desi).sum() and not any(t.column("ir_excess").drop_null().to_pylist())
    with pytest.raises(ConfigError, match="already have"):
        ir_excess(t)
    with pytest.raises(ConfigError, match="no observed W1-W4"):
        ir_excess(open_catalog(catalog).select("source_id,w1_mag,w1_mag_err").to_arrow())
    # a W2 excess of 1 mag in the catalog rows, as a survey would give it
    picks = np.flatnonzero(desi)[:4]
    sub = rows.take(pa.array(picks)).drop_columns(["flux_w1", "flux_ivar_w1"])
    for k, v in legacy_surveys_case(rows, picks).items():
        sub = sub.append_column(k.lower(), pa.array(v))
    got = ir_excess(sub, excess_threshold=3.0)
    np.testing.assert_allclose(np.array(got.column("w2_excess").to_pylist(), float)[:3], 1.0, atol=1e-5)

    capsys.readouterr()
    assert main(["query", str(catalog), "--ir-excess", "--columns", "source_id,survey", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["source_id", "survey"] and "w1_excess_sigma" in header and "flux_w1" not in header
    assert len(lines) == 1 + N_ROWS
    assert main(["query", str(catalog), "--ir-excess", "--excess-only", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # predictions equal observations: none flagged
    assert main(["query", str(catalog), "--excess-only"]) == 1
    assert "go with --ir-excess" in capsys.readouterr().err
    # plot without --external: predicted vs the catalog's own observations
    assert main(["plot", str(catalog), "-o", str(tmp_path / "plots")]) == 0
    assert "predicted_vs_observed.png" in capsys.readouterr().out


# --------------------------------------------------------------------------- walkthrough fixes
def test_radius_with_units(catalog, constructed, tmp_path, capsys):
    """The radius as a number (arcsec), text with a unit (as query --cone takes it) or a Quantity."""
    ext, _ = constructed
    want = crossmatch(catalog, ext, radius_arcsec=1.5).column("source_id").to_pylist()
    for r in ("1.5arcsec", "0.025 arcmin", '1.5"', 1.5 * u.arcsec, "1.5"):
        assert crossmatch(catalog, ext, radius_arcsec=r).column("source_id").to_pylist() == want, r
    for bad in ("wide", 2 * u.kg, "-1arcsec"):
        with pytest.raises(ConfigError, match="radius"):
            crossmatch(catalog, ext, radius_arcsec=bad)
    src = tmp_path / "ext.parquet"
    pq.write_table(ext, src)
    assert main(["crossmatch", str(catalog), str(src), "--radius", "0.025arcmin", "--columns", "source_id",
                 "--format", "csv"]) == 0
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()[1:]] == want
    assert main(["crossmatch", str(catalog), str(src), "--radius", "wide"]) == 1
    err = capsys.readouterr().err
    assert "cannot read --radius 'wide' as an angle" in err and "Traceback" not in err


def test_external_positions_in_their_column_units(catalog, constructed, tmp_path):
    """RA/Dec in radians (FITS TUNIT 'rad'), hours (VOTable hourangle), arcmin (Parquet field metadata) match
    as degrees do; before, they were read as degrees and silently matched nothing."""
    from astropy.table import Table

    ext, _ = constructed
    ext = ext.slice(0, len(OFFSETS))
    want = crossmatch(catalog, ext, radius_arcsec=1.5).column("source_id").to_pylist()
    ra, dec = ext.column("ra").to_numpy(), ext.column("dec").to_numpy()
    Table({"name": ext.column("name").to_pylist(), "RA": np.radians(ra) * u.rad,
           "DEC": np.radians(dec) * u.rad}).write(tmp_path / "rad.fits")
    Table({"ra": ra / 15 * u.hourangle, "dec": dec * u.deg}).write(tmp_path / "h.vot", format="votable")
    arcmin = pa.table({"ra": ra * 60, "dec": dec * 60})
    arcmin = arcmin.cast(pa.schema([pa.field(n, pa.float64(), metadata={b"unit": b"arcmin"}) for n in ("ra", "dec")]))
    for external in (tmp_path / "rad.fits", tmp_path / "h.vot", arcmin):
        assert crossmatch(catalog, external, radius_arcsec=1.5).column("source_id").to_pylist() == want, external
    metres = pa.table({"ra": ra, "dec": dec}).cast(pa.schema([pa.field("ra", pa.float64(), metadata={b"unit": b"m"}),
                                                             pa.field("dec", pa.float64())]))
    with pytest.raises(ConfigError, match="external column 'ra' has unit 'm', not an angle"):
        crossmatch(catalog, metres)
    bogus = metres.cast(pa.schema([pa.field("ra", pa.float64(), metadata={b"unit": b"furlongs"}),
                                   pa.field("dec", pa.float64())]))
    with pytest.raises(ConfigError, match="'furlongs', not an angle"):
        crossmatch(catalog, bogus)


def test_fits_export_keeps_null_ir_excess(catalog, rows, tmp_path):
    """Unmatched rows (keep_unmatched) have a null ir_excess; FITS logicals have no null astropy reads, and the
    nulls used to come back as False. A <name>.mask column brings them back as masked values; VOTable has nulls."""
    from astropy.table import Table

    picks = np.array([10, 20, 30, 40])
    cols, _, _ = photometry_case(rows, picks)
    ra, dec = rows.column("ra").to_numpy()[picks], rows.column("dec").to_numpy()[picks]
    ext = pa.table({"ra": np.r_[ra, (ra[:2] + 1.0) % 360], "dec": np.r_[dec, dec[:2]],
                    **{k: np.r_[v, v[:2]] for k, v in cols.items()}})
    t = crossmatch(catalog, ext, radius_arcsec=1.0, keep_unmatched=True)
    flags = t.column("ir_excess").to_pylist()
    assert flags[4:] == [None, None] and True in flags and False in flags
    for ext_ in (".fits", ".vot"):
        write_table(t, tmp_path / f"m{ext_}")
        back = Table.read(tmp_path / f"m{ext_}")
        assert back["ir_excess"].dtype == bool and "ir_excess.mask" not in back.colnames
        got = [None if m else bool(v) for v, m in zip(back["ir_excess"], np.ma.getmaskarray(back["ir_excess"]))]
        assert got == flags, ext_
        assert back["ir_excess"].info.description.startswith("True if any band")


def test_unmatched_rows_latents_export_to_every_format(catalog, rows, tmp_path):
    """crossmatch --columns all --keep-unmatched: an unmatched external row has a null latent list. The FITS and
    VOTable writers failed on it ("cannot reshape array of size 24 into shape (5,6)") and astropy could not read
    the Parquet file ("all input arrays must have the same shape"). Now every format reads back in astropy with
    that row masked and the matched rows' latents exact; Parquet has NaN there and a latent.mask list."""
    import pyarrow.csv as pacsv
    from astropy.table import Table

    picks = np.array([10, 20, 30, 40])
    cols, _, _ = photometry_case(rows, picks)
    ra, dec = rows.column("ra").to_numpy()[picks], rows.column("dec").to_numpy()[picks]
    src = tmp_path / "allwise.csv"
    pacsv.write_csv(pa.table({"ra": np.r_[(ra[0] + 1.0) % 360, ra], "dec": np.r_[dec[0], dec],
                              **{k: np.r_[v[0], v] for k, v in cols.items()}}), src)
    want = rows.column("latent").to_numpy(zero_copy_only=False)[picks]
    want = np.stack(want)
    for ext_ in (".parquet", ".fits", ".vot", ".csv"):
        out = tmp_path / f"m{ext_}"
        assert main(["crossmatch", str(catalog), str(src), "--columns", "all", "--keep-unmatched",
                     "-o", str(out)]) == 0
        if ext_ == ".csv":
            back = pacsv.read_csv(out)
            assert back.column("latent_0").null_count == 1 and back.column("latent_0")[0].as_py() is None
            continue
        for fmt in ((None, "parquet.votable") if ext_ == ".parquet" else (None,)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", u.UnitsWarning)  # VOUnit deprecates erg, Angstrom (norm)
                back = Table.read(out, format=fmt)
            mask = np.ma.getmaskarray(back["latent"])
            assert back["latent"].shape == (5, want.shape[1]), (ext_, fmt)
            assert mask[0].all() and not mask[1:].any(), (ext_, fmt)
            np.testing.assert_array_equal(np.ma.getdata(back["latent"])[1:], want)
    arrow = pq.read_table(tmp_path / "m.parquet")
    assert arrow.column("latent").null_count == 0 and np.isnan(arrow.column("latent")[0].values.to_numpy()).all()
    assert arrow.column("latent.mask").to_pylist() == [[True] * want.shape[1]] + [[False] * want.shape[1]] * 4


def test_parquet_exports_read_in_astropy_with_units_and_null_flags(catalog, rows, tmp_path):
    """crossmatch -o x.parquet carries the VO-Parquet metadata of a query export (it had none: parquet.votable
    failed with KeyError b'IVOA.VOTable-Parquet.content') and astropy's header: both astropy readers get the
    units, UCDs and descriptions of the catalog columns, separation_arcsec and the external columns (a CSV's
    positions in deg, magnitudes in mag, as compared). A null ir_excess (no band compared; unmatched) reads as a
    masked bool in both (plain Table.read gave objects; parquet.votable failed to stack bool on object), for
    crossmatch and query --ir-excess alike, and stays null for Arrow readers."""
    import pyarrow.csv as pacsv
    from astropy.table import Table

    picks = np.array([10, 20, 30, 40])
    cols, _, _ = photometry_case(rows, picks)
    ra, dec = rows.column("ra").to_numpy()[picks], rows.column("dec").to_numpy()[picks]
    src = tmp_path / "allwise.csv"
    pacsv.write_csv(pa.table({"ra": np.r_[ra, (ra[0] + 1.0) % 360], "dec": np.r_[dec, dec[0]],
                              **{k: np.r_[v, v[0]] for k, v in cols.items()}}), src)
    out, ir_out = tmp_path / "x.parquet", tmp_path / "ir.parquet"
    assert main(["crossmatch", str(catalog), str(src), "--keep-unmatched", "-o", str(out)]) == 0
    assert main(["query", str(catalog), "--ir-excess", "--columns", "source_id,ra", "-o", str(ir_out)]) == 0
    flags = pq.read_table(out).column("ir_excess").to_pylist()  # Arrow: nulls kept
    assert flags[4] is None and True in flags and False in flags
    ir_flags = pq.read_table(ir_out).column("ir_excess").to_pylist()
    assert None in ir_flags and False in ir_flags

    def read(path, fmt):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)  # VOUnit deprecates erg, Angstrom (norm)
            return Table.read(path, format=fmt)

    def nullable(col):
        return [None if m else bool(v) for v, m in zip(col, np.ma.getmaskarray(col))]

    for fmt in ("parquet.votable", "parquet"):
        back = read(out, fmt)
        assert back["w1_mag"].unit == u.mag and back["ra"].unit == u.deg and back["separation_arcsec"].unit == u.arcsec
        assert back["ra_ext"].unit == u.deg and back["w1mpro"].unit == u.mag and back["w1sigmpro"].unit == u.mag
        assert back["w3_excess"].unit == u.mag and back["ext_row"].unit is None
        assert back["separation_arcsec"].meta["ucd"] == "pos.angDistance"
        assert back["w1_mag"].description.startswith("Predicted WISE W1")
        assert back["ra_ext"].description == "ra of the external table"
        assert back["ir_excess"].dtype == bool and nullable(back["ir_excess"]) == flags, fmt
        back = read(ir_out, fmt)
        assert back["ra"].unit == u.deg and back["w1_excess"].unit == u.mag
        assert back["ir_excess"].dtype == bool and nullable(back["ir_excess"]) == ir_flags, fmt
    assert "ir_excess.mask" not in read(out, "parquet").colnames  # astropy's mask column, read into the mask


def test_predicted_vs_observed_reports_bias_and_rms(catalog, rows):
    """The panels used to label np.nanstd(pred - obs) "rms": an offset of 0.5 mag in every row gave rms=0.00."""
    import pandas as pd

    from catalogpred.plots import offset_stats, predicted_vs_observed_figure

    assert offset_stats([10.0, 11.0, np.nan], [9.5, 10.5, 3.0]) == (2, 0.5, 0.5)
    n, bias, rms = offset_stats([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert n == 3 and bias == pytest.approx(1.0) and rms == pytest.approx(np.sqrt(5 / 3))
    assert offset_stats([1.0], [1.3])[1:] == pytest.approx((-0.3, 0.3))  # one row: still its offset
    for n_rows in (1, 3):
        df = pd.DataFrame({"w1_mag": [15.5] * n_rows, "w1_mag_obs": [15.0] * n_rows, "w1_mag_obs_err": [0.05] * n_rows,
                           "ir_excess": [False] * n_rows})
        fig = predicted_vs_observed_figure(df)
        ax = fig.axes[0]
        text = " ".join(t.get_text() for t in ax.texts)
        assert f"n={n_rows}" in text and "bias=+0.50" in text and "rms=0.50 mag" in text
        assert ax.get_legend()._loc == 0  # "best": not over the points in a fixed corner


def test_cli_plot_errors_are_one_line(catalog, tmp_path, capsys):
    (tmp_path / "existing.csv").write_text("x\n")
    assert main(["plot", str(catalog), "-o", str(tmp_path / "existing.csv")]) == 1
    err = capsys.readouterr().err
    assert "existing.csv is a file" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["plot", str(catalog), "-o", str(tmp_path / "p5"), "--order", "40"]) == 1
    err = capsys.readouterr().err
    assert "HEALPix order 40 is out of range: the density map takes 0 to 29" in err and "Traceback" not in err
    assert not (tmp_path / "p5").exists()
    from catalogpred.plots import sky_density_figure

    with pytest.raises(ConfigError, match="0 to 29"):
        sky_density_figure(open_catalog(catalog), order=-1)


def test_crossmatch_keeps_a_querys_select_and_limit_and_takes_radius(catalog, rows):
    """crossmatch(cat.limit(5), ...) returned every match and crossmatch(cat.select(...), ...) the default
    columns; crossmatch(radius=...) was a TypeError (cone takes it)."""
    picks = np.arange(10, 30)
    ext = pa.table({"ra": rows.column("ra").to_numpy()[picks], "dec": rows.column("dec").to_numpy()[picks]})
    q = open_catalog(catalog)
    assert crossmatch(q, ext).num_rows == 20
    assert crossmatch(q.limit(5), ext).num_rows == 5
    t = crossmatch(q.select(["source_id", "z"]), ext)
    assert t.column_names[:2] == ["source_id", "z"] and "w1_mag" not in t.column_names
    assert crossmatch(q.select("source_id"), ext, columns=["ra"]).column_names[0] == "ra"  # columns= wins
    assert crossmatch(q, ext, radius=2 * u.arcsec).num_rows == 20
    with pytest.raises(ConfigError, match="one radius"):
        crossmatch(q, ext, radius=2 * u.arcsec, radius_arcsec=1.0)


def test_crossmatch_warns_when_ab_magnitudes_look_read_as_vega(catalog, rows, caplog):
    """AB magnitudes without a unit are read as Vega: every band's excess sits at the Vega-AB offset and nothing
    was flagged, silently (models evaluate warned; crossmatch did not)."""
    import logging

    from catalogpred.spectra import VEGA_TO_AB

    picks = np.arange(100, 140)
    pred = {b: rows.column(f"{b}_mag").to_numpy()[picks].astype(float) for b in ("w1", "w2", "w3", "w4")}
    ab = pa.table({"ra": rows.column("ra").to_numpy()[picks], "dec": rows.column("dec").to_numpy()[picks],
                   **{f"{b}mpro": pred[b] + VEGA_TO_AB[b] for b in pred},
                   **{f"{b}sigmpro": np.full(len(picks), 0.05) for b in pred}})
    with caplog.at_level(logging.WARNING, logger="catalogpred"):
        crossmatch(catalog, ab, radius_arcsec=1.0)
    assert "look like AB read as Vega" in caplog.text and "--mag-system ab" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catalogpred"):
        t = crossmatch(catalog, ab, radius_arcsec=1.0, mag_system="ab")
    assert "look like AB" not in caplog.text
    assert np.allclose(t.column("w1_excess").to_numpy(), 0, atol=1e-4)


def test_colour_colour_plot_finds_observed_magnitudes_by_name(catalog, rows, tmp_path):
    """The observed colours were read from w1mpro..w3mpro only: VizieR's W1mag raised KeyError 'w1mpro'. Now any
    name crossmatch knows works, magnitudes without errors too, and AB is converted."""
    from catalogpred.plots import _observed_vega, colour_colour_figure
    from catalogpred.spectra import VEGA_TO_AB

    picks = np.array([10, 20, 30, 40])
    cols, _, _ = photometry_case(rows, picks, "vizier")
    vizier = pa.table(cols)
    mags_only = pa.table({"w1mpro": [15.0, 16.0], "w2mpro": [14.0, 15.5], "w3mpro": [11.0, 12.0]})
    np.testing.assert_allclose(_observed_vega(vizier, "auto")[:, 1], cols["W2mag"])
    np.testing.assert_allclose(_observed_vega(mags_only, "auto")[:, :3], [[15, 14, 11], [16, 15.5, 12]])
    np.testing.assert_allclose(_observed_vega(mags_only, "ab")[:, 0], [15 - VEGA_TO_AB["w1"], 16 - VEGA_TO_AB["w1"]])
    assert colour_colour_figure(catalog, vizier) is not None
    with pytest.raises(ConfigError, match="no W1-W4 magnitude columns"):
        colour_colour_figure(catalog, pa.table({"x": [1.0]}))
