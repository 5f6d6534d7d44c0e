"""Tests of catalogpred.mock: format fidelity, determinism, physical coupling, bad files."""
from __future__ import annotations

import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import fitsio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from catalogpred import mock

COADD_COLUMNS = [
    ("flux", "E"), ("loglam", "E"), ("ivar", "E"), ("and_mask", "J"),
    ("or_mask", "J"), ("wdisp", "E"), ("sky", "E"), ("model", "E"),
]
REQUIRED_HDU2 = ["PLATE", "MJD", "FIBERID", "PLUG_RA", "PLUG_DEC", "Z", "Z_ERR", "ZWARNING",
                 "CLASS", "SUBCLASS", "SPECOBJID", "SN_MEDIAN_ALL", "RUN2D"]


def spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    ra = np.argsort(np.argsort(a[ok]))
    rb = np.argsort(np.argsort(b[ok]))
    return float(np.corrcoef(ra, rb)[0, 1])


def tform(col) -> str:
    f = col.format
    return f[1:] if f.startswith("1") else f


def read_all(path):
    """Open with astropy and touch every HDU's data (raises on broken files)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path) as h:
            for hdu in h:
                _ = hdu.data
            h.verify("exception")
            return [hdu.name for hdu in h]


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    out = tmp_path_factory.mktemp("mock_survey")
    return mock.write_sdss_survey(out, 20, seed=11, n_bad=7)


# ---------------------------------------------------------------- plan


def test_plan_is_deterministic_and_ids_are_sdss_like():
    a = mock.plan_sdss_survey(40, seed=7)
    b = mock.plan_sdss_survey(40, seed=7)
    c = mock.plan_sdss_survey(40, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 40
    ids = {(o.plate, o.mjd, o.fiberid) for o in a}
    assert len(ids) == 40
    assert len({o.specobjid for o in a}) == 40
    assert len({o.plate for o in a}) >= 3
    for o in a:
        assert 1000 > o.plate >= 266 or 9999 >= o.plate >= 1000
        assert 10000 <= o.mjd <= 99999
        assert 1 <= o.fiberid <= 640
        assert o.flavour == "legacy" and o.defect == ""
        assert -10.0 - 1.6 <= o.dec <= 70.0 + 1.6 and 0.0 <= o.ra < 360.0
        # inside its 3-degree plate
        cosd = np.cos(np.radians(o.plate_dec))
        dra = (o.ra - o.plate_ra + 180.0) % 360.0 - 180.0
        assert np.hypot(dra * cosd, o.dec - o.plate_dec) < 1.6
        assert 0.0 < o.z < 0.65
        assert o.filename == f"spec-{o.plate:04d}-{o.mjd:05d}-{o.fiberid:04d}.fits"
        # SPECOBJID bit-packing (DR8+): plate, fibre, mjd-50000, run2d
        sid = o.specobjid_int
        assert sid >> 50 == o.plate and (sid >> 38) & 0xFFF == o.fiberid
        assert (sid >> 24) & 0x3FFF == o.mjd - 50000
    # distinct plate centres
    centres = {(o.plate_ra, o.plate_dec) for o in a}
    assert len(centres) == len({o.plate for o in a})


def test_plan_validation_and_boss_plates():
    with pytest.raises(ValueError):
        mock.plan_sdss_survey(-1)
    with pytest.raises(ValueError):
        mock.plan_sdss_survey(10, boss_fraction=1.5)
    with pytest.raises(ValueError):
        mock.plan_sdss_survey(1300, n_plates=2)  # 640 fibres per legacy plate
    objs = mock.plan_sdss_survey(30, seed=3, n_plates=2, boss_fraction=0.5)
    assert {o.flavour for o in objs} == {"legacy", "boss"}
    assert len({o.plate for o in objs}) == 2
    assert sum(o.flavour == "boss" for o in objs) == 15
    assert mock.plan_sdss_survey(0) == []


# ---------------------------------------------------------------- files


def test_write_is_deterministic(tmp_path):
    obj = mock.plan_sdss_survey(3, seed=5)[1]
    p1 = mock.write_sdss_spec(obj, tmp_path / "a")
    p2 = mock.write_sdss_spec(obj, tmp_path / "b")
    assert p1.name == p2.name == obj.filename
    assert p1.read_bytes() == p2.read_bytes()


def test_legacy_file_format(tmp_path):
    objs = mock.plan_sdss_survey(6, seed=21)
    for obj in objs:
        path = mock.write_sdss_spec(obj, tmp_path)
        assert read_all(path) == ["PRIMARY", "COADD", "SPECOBJ"]
        with fits.open(path) as h:
            hdr = h[0].header
            assert h[0].data is None
            assert hdr["BUNIT"] == "1E-17 erg/cm^2/s/Ang"
            assert hdr["VACUUM"] is True
            assert hdr["COEFF1"] == pytest.approx(1e-4)
            assert hdr["PLATEID"] == obj.plate and hdr["MJD"] == obj.mjd and hdr["FIBERID"] == obj.fiberid
            assert hdr["PLUG_RA"] == pytest.approx(obj.ra, abs=1e-9)
            assert hdr["PLUG_DEC"] == pytest.approx(obj.dec, abs=1e-9)
            assert hdr["ORIGIN"] == "catalogpred.mock"
            cols = h["COADD"].columns
            assert [(c.name, tform(c)) for c in cols] == COADD_COLUMNS
            d = h["COADD"].data
            k = d["loglam"].astype(np.float64) * 1e4
            assert np.max(np.abs(k - np.rint(k))) < 0.01  # float32 rounding only
            assert np.all(np.diff(np.rint(k)) == 1)
            # legacy: COEFF0 is the plate start; the table starts 1-46 pixels later
            offset = np.rint(k[0]) - round(hdr["COEFF0"] * 1e4)
            assert 1 <= offset <= 46
            lam = 10.0 ** d["loglam"].astype(np.float64)
            assert 3770 < lam[0] < 3850 and 9000 < lam[-1] < 9250
            assert 0.5 < np.median(d["flux"]) < 200.0
            assert np.all(np.isfinite(d["flux"])) and np.all(d["ivar"] >= 0)
            assert (d["ivar"] > 0).mean() > 0.98
            assert np.all((d["or_mask"] & d["and_mask"]) == d["and_mask"])
            assert 0.6 < d["wdisp"].min() and d["wdisp"].max() < 1.6
            assert np.all(d["sky"] > 0)
            # bright sky lines flagged BRIGHTSKY (bit 23), e.g. [OI] 5577 (5578.9 Å vacuum)
            bright = (d["and_mask"] >> 23) & 1 == 1
            assert bright.sum() > 20
            assert np.any(np.abs(lam[bright] - 5578.9) < 3.0)
            # ivar = 0 pixels carry NODATA/FULLREJECT
            dead = d["ivar"] == 0
            assert np.all(d["and_mask"][dead] & ((1 << 24) | (1 << 18)) != 0)
            s = h["SPECOBJ"]
            names = s.columns.names
            for name in REQUIRED_HDU2:
                assert name in names
            assert tform(s.columns["SPECOBJID"]) == "22A"
            assert s.data["SPECOBJID"][0].strip() == obj.specobjid and len(s.data["SPECOBJID"][0]) == 22
            assert s.data["PLATE"][0] == obj.plate and s.data["FIBERID"][0] == obj.fiberid
            assert s.data["Z"][0] == pytest.approx(obj.z, rel=1e-6)
            assert s.data["CLASS"][0] == "GALAXY" and s.data["RUN2D"][0] == "26"
            assert s.data["SN_MEDIAN_ALL"][0] > 0
        # fitsio reads it too
        with fitsio.FITS(str(path)) as f:
            arr = f["COADD"].read()
            assert arr.dtype.names == tuple(n for n, _ in COADD_COLUMNS)
            assert arr.dtype["flux"] == np.dtype(">f4") and arr.dtype["and_mask"] == np.dtype(">i4")
            so = f["SPECOBJ"].read()
            assert int(so["FIBERID"][0]) == obj.fiberid


def test_boss_file_format(tmp_path):
    objs = mock.plan_sdss_survey(4, seed=2, boss_fraction=1.0)
    for obj in objs:
        assert obj.flavour == "boss" and 1 <= obj.fiberid <= 1000
        path = mock.write_sdss_spec(obj, tmp_path)
        assert read_all(path) == ["PRIMARY", "COADD", "SPALL"]
        with fits.open(path) as h:
            assert [(c.name, tform(c)) for c in h["COADD"].columns] == COADD_COLUMNS
            lam = 10.0 ** h["COADD"].data["loglam"].astype(np.float64)
            assert 3550 < lam[0] < 3660 and 10200 < lam[-1] < 10500
            assert round(h[0].header["COEFF0"] * 1e4) == round(np.log10(lam[0]) * 1e4)
            assert h[0].header["RUN2D"] == "v5_11_0"
            s = h["SPALL"]
            for name in REQUIRED_HDU2:
                assert name in s.columns.names
            assert tform(s.columns["SPECOBJID"]) == "K"
            assert int(s.data["SPECOBJID"][0]) == obj.specobjid_int


@pytest.mark.realdata
def test_formats_match_real_files(tmp_path, sdss_files):
    """Mock files against real ones (conftest's ``sdss_files``: $CATALOGPRED_SHARED or ../shared, else a skip)."""
    real = {p.name: p for p in sdss_files}
    legacy, boss = mock.plan_sdss_survey(2, seed=4, n_plates=2, boss_fraction=0.5)
    for obj, real_name in ((legacy, "spec-0266-51602-0107.fits"), (boss, "spec-3586-55181-0003.fits")):
        path = mock.write_sdss_spec(obj, tmp_path)
        with fits.open(real[real_name]) as r, fits.open(path) as m:
            assert [h.name for h in m] == [h.name for h in r][:3]
            assert [(c.name, tform(c)) for c in m["COADD"].columns] == [(c.name, tform(c)) for c in r["COADD"].columns]
            hdu2 = m[2].name
            real_cols = {c.name: tform(c) for c in r[hdu2].columns}
            for c in m[hdu2].columns:
                assert c.name in real_cols, c.name
                # fitsio writes 'A' columns with the width we ask for; widths may differ only for strings
                if not real_cols[c.name].endswith("A"):
                    assert tform(c) == real_cols[c.name], c.name
            for key in ("BUNIT", "VACUUM", "COEFF1", "WFITTYPE", "NWORDER"):
                assert m[0].header[key] == r[0].header[key]
            for key in ("PLATEID", "MJD", "FIBERID", "PLUG_RA", "PLUG_DEC", "COEFF0", "RADEG", "DECDEG"):
                assert key in m[0].header
            # similar flux and noise levels
            rf, mf = r["COADD"].data, m["COADD"].data
            assert abs(np.log10(np.median(mf["sky"]) / np.median(rf["sky"]))) < 0.5
            assert abs(len(mf) - len(rf)) < 120


# ---------------------------------------------------------------- physics


def halpha_ew(path) -> float:
    """Rest-frame EW(Hα + [NII]-free core) in Å, emission positive."""
    with fitsio.FITS(str(path)) as f:
        d = f["COADD"].read()
        z = float(f[2].read()["Z"][0])
    lam = 10.0 ** d["loglam"].astype(np.float64) / (1.0 + z)
    flux = d["flux"].astype(np.float64)
    good = d["ivar"] > 0
    line = good & (lam > 6556) & (lam < 6573)
    cont = good & (((lam > 6490) & (lam < 6535)) | ((lam > 6600) & (lam < 6640)))
    if line.sum() < 5 or cont.sum() < 10:
        return np.nan
    c = np.median(flux[cont])
    dl = np.gradient(lam)[line]
    return float(np.sum((flux[line] - c) * dl) / c)


def test_ir_is_coupled_to_the_physics():
    objs = mock.plan_sdss_survey(300, seed=123)
    t = mock.photometry_table(objs)
    w1, w2, w3 = (t.column(f"w{b}mpro").to_numpy() for b in (1, 2, 3))
    sf = t.column("truth_sf_frac").to_numpy()
    ssfr = t.column("truth_log_ssfr").to_numpy()
    agn = t.column("truth_agn_frac").to_numpy()
    assert spearman(w2 - w3, sf) > 0.6
    assert spearman(w2 - w3, ssfr) > 0.6
    assert spearman(w1 - w2, agn) > 0.4
    passive = ssfr < -11.5
    starforming = (ssfr > -10.3) & (agn < 0.1)
    assert passive.sum() > 20 and starforming.sum() > 20
    assert np.median((w2 - w3)[passive]) < 1.6
    assert 2.8 < np.median((w2 - w3)[starforming]) < 4.6
    normal = agn < 0.05
    assert -0.1 < np.median((w1 - w2)[normal]) < 0.25
    dominant = agn > 0.55
    if dominant.any():
        assert np.median((w1 - w2)[dominant]) >= 0.75
    # W1 tracks stellar mass at fixed distance
    z = t.column("z").to_numpy()
    logm = t.column("truth_log_mstar").to_numpy()
    bin_ = (z > 0.08) & (z < 0.13)
    assert spearman(w1[bin_], logm[bin_]) < -0.7


def test_spectra_carry_the_ir_signal(tmp_path):
    objs = mock.plan_sdss_survey(300, seed=123)[::4]  # 75 spectra spread over the plates
    t = mock.photometry_table(objs)
    paths = [mock.write_sdss_spec(o, tmp_path) for o in objs]
    ew = np.array([halpha_ew(p) for p in paths])
    assert np.isfinite(ew).sum() > 50
    c23 = t.column("w2mpro").to_numpy() - t.column("w3mpro").to_numpy()
    assert spearman(c23, ew) > 0.5
    sf = np.array([o.log_ssfr > -10.5 and o.agn_frac < 0.1 for o in objs])
    passive = np.array([o.log_ssfr < -11.5 and o.agn_frac < 0.1 for o in objs])
    assert np.nanmedian(ew[sf]) > 8.0 and np.nanmedian(ew[passive]) < 3.0
    # the optical flux level and W1 tell the same story (both ~ mass / distance²)
    medflux = []
    for p in paths:
        with fitsio.FITS(str(p)) as f:
            medflux.append(np.median(f["COADD"].read()["flux"]))
    medflux = np.array(medflux)
    assert 1.0 < np.median(medflux) < 30.0
    assert spearman(t.column("w1mpro").to_numpy(), np.log10(np.clip(medflux, 1e-3, None))) < -0.6


def test_photometry_table_schema_and_errors():
    objs = mock.plan_sdss_survey(200, seed=9)
    t = mock.photometry_table(objs)
    assert t.num_rows == 200
    assert t.equals(mock.photometry_table(objs))  # deterministic
    names = t.column_names
    for c in ["plate", "mjd", "fiberid", "specobjid", "ra", "dec", "z"] + [
        f"w{b}{s}" for s in ("mpro", "sigmpro") for b in range(1, 5)
    ]:
        assert c in names
    assert any(n.startswith("truth_") for n in names)
    assert t.schema.field("specobjid").type == pa.string()
    for b in range(1, 5):
        assert t.schema.field(f"w{b}mpro").type == pa.float64()
        assert t.schema.field(f"w{b}mpro").metadata[b"unit"] == b"mag"
    for f in t.schema:
        assert b"unit" in f.metadata and f.metadata[b"description"]
    assert t.schema.field("ra").metadata[b"unit"] == b"deg"
    assert t.column("specobjid").to_pylist() == [o.specobjid for o in objs]
    s1 = t.column("w1sigmpro").to_numpy()
    s4 = t.column("w4sigmpro").to_numpy()
    assert 0.01 < np.median(s1) < 0.06 and 0.08 < np.median(s4) < 0.6
    assert np.all(s4 >= s1)
    for b in range(1, 5):
        m = t.column(f"truth_w{b}").to_numpy()
        s = t.column(f"w{b}sigmpro").to_numpy()
        assert spearman(m, s) > 0.8  # heteroscedastic, fainter = noisier
        pull = (t.column(f"w{b}mpro").to_numpy() - m) / s
        assert 0.7 < np.std(pull) < 1.3


# ---------------------------------------------------------------- survey + bad files


def test_survey_outputs(survey):
    assert len(survey.paths) == 20 == len(survey.objects)
    assert all(p.is_file() for p in survey.paths)
    assert [p.name for p in survey.paths] == [o.filename for o in survey.objects]
    t = pq.read_table(survey.photometry_path)
    assert survey.photometry_path.name == "allwise_photometry.parquet"
    assert t.num_rows == 20
    assert t.column("fiberid").to_pylist() == [o.fiberid for o in survey.objects]
    assert t.schema.field("w3mpro").metadata[b"unit"] == b"mag"
    # good files do not collide with the bad ones
    assert not set(survey.bad) & {p.name for p in survey.paths}
    for p in survey.paths[:3]:
        assert read_all(p)[:2] == ["PRIMARY", "COADD"]


def test_bad_files_are_what_bad_says(survey):
    out = survey.photometry_path.parent
    reasons = sorted(survey.bad.values())
    assert reasons == sorted([
        "unreadable_file", "unreadable_file", "missing_hdu", "nonfinite_flux",
        "no_valid_pixels", "norm_window_empty", "duplicate_id",
    ])
    good_ids = {(o.plate, o.mjd, o.fiberid): p for o, p in zip(survey.objects, survey.paths)}
    n_truncated = n_random = 0
    for name, reason in survey.bad.items():
        path = out / name
        assert path.is_file() and name.startswith("spec-") and name.endswith(".fits")
        if reason == "unreadable_file":
            head = path.read_bytes()[:6]
            if head == b"SIMPLE":
                n_truncated += 1
                with pytest.raises(Exception):
                    read_all(path)
                with pytest.raises(OSError):
                    with fitsio.FITS(str(path)) as f:
                        f["COADD"].read()
            else:
                n_random += 1
                with pytest.raises(OSError):
                    fits.open(path)
            continue
        names = read_all(path)
        with fits.open(path) as h:
            d = h["COADD"].data
            if reason == "missing_hdu":
                assert names == ["PRIMARY", "COADD"]
                continue
            s = h[2].data
            key = (int(s["PLATE"][0]), int(s["MJD"][0]), int(s["FIBERID"][0]))
            if reason == "duplicate_id":
                assert key in good_ids
                assert good_ids[key].name != name
                assert name > good_ids[key].name  # sorts after the original
                assert path.read_bytes() == good_ids[key].read_bytes()
                continue
            assert key not in good_ids
            if reason == "nonfinite_flux":
                bad = ~np.isfinite(d["flux"])
                assert bad.any() and np.all(d["ivar"][bad] > 0)
            elif reason == "no_valid_pixels":
                assert np.all(d["ivar"] == 0)
            elif reason == "norm_window_empty":
                z = float(s["Z"][0])
                lam = 10.0 ** d["loglam"].astype(np.float64)
                assert z > 1.0
                rest = lam / (1 + z)
                assert not np.any((rest > 5300) & (rest < 5850))
                assert (d["ivar"] > 0).mean() > 0.9
    assert n_truncated == 1 and n_random == 1


def test_mapper_with_process_pool_gives_same_files(tmp_path):
    a = mock.write_sdss_survey(tmp_path / "serial", 8, seed=3, n_bad=3)
    with ProcessPoolExecutor(2) as ex:
        b = mock.write_sdss_survey(tmp_path / "pool", 8, seed=3, mapper=partial(ex.map, chunksize=2), n_bad=3)
    assert a.objects == b.objects and a.bad == b.bad
    for pa_, pb in zip(a.paths, b.paths):
        assert pa_.read_bytes() == pb.read_bytes()
    for name in a.bad:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "pool" / name).read_bytes()
