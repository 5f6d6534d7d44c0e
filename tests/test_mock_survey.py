"""Survey-scale mock files: spPlate + specObj per the SDSS datamodel, DESI coadd + redrock as the real files,
and a mixed-survey `--survey auto` ingest into one store."""
from __future__ import annotations

import hashlib

import fitsio
import numpy as np
import pytest

from catalogpred import store
from catalogpred.errors import RejectReason
from catalogpred.mock import render_sdss_spec, write_sdss_spec
from catalogpred.mock_survey import DESI_ARMS, plan_spplate_survey, write_desi_survey, write_spplate_survey
from catalogpred.pipeline import run_ingest
from catalogpred.surveys import identify_survey, read_spectra

from conftest import DESI_DIR


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    return write_spplate_survey(tmp_path_factory.mktemp("plates"), n_plates=2, fibers_per_plate=24, seed=5)


@pytest.fixture(scope="module")
def desi(tmp_path_factory):
    return write_desi_survey(tmp_path_factory.mktemp("desi"), n_files=2, spectra_per_file=40, seed=5, survey="sv3")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_spplate_follows_the_datamodel(plates):
    path = plates.plate_paths[0]
    plan = plates.plates[0]
    assert path.name == f"spPlate-{plan.plate:04d}-{plan.mjd:05d}.fits"
    with fitsio.FITS(str(path)) as f:
        assert [h.get_extname() for h in f] == ["", "IVAR", "ANDMASK", "ORMASK", "WAVEDISP", "PLUGMAP", "SKY"]
        hdr = f[0].read_header()
        assert f[0].get_dims() == [24, plan.n_pix] and hdr["BITPIX"] == -32
        assert hdr["COEFF0"] == round(plan.k0 / 1e4, 4) and hdr["COEFF1"] == 1e-4
        assert hdr["PLATEID"] == plan.plate and hdr["MJD"] == plan.mjd and hdr["ORIGIN"] == "catalogpred.mock"
        assert hdr["BUNIT"] == "1E-17 erg/cm^2/s/Ang"
        for i, bitpix in ((1, -32), (2, 32), (3, 32), (4, -32), (6, -32)):
            assert f[i].read_header()["BITPIX"] == bitpix and f[i].get_dims() == [24, plan.n_pix]
        plug = f["PLUGMAP"].read()
    assert {"OBJID", "HOLETYPE", "RA", "DEC", "MAG", "XFOCAL", "YFOCAL", "SPECTROGRAPHID", "FIBERID", "OBJTYPE"} <= set(
        plug.dtype.names)
    assert plug["FIBERID"].tolist() == list(range(1, 25))
    objtype = plug["OBJTYPE"].astype(str)
    assert sorted(np.flatnonzero(objtype == "SKY") + 1) == list(plan.sky_fibers)
    assert sorted(np.flatnonzero(objtype == "NA") + 1) == list(plan.na_fibers)
    assert (objtype == "GALAXY").sum() == len(plan.targets)


def test_specobj_table_matches_the_spec_files(plates, tmp_path):
    with fitsio.FITS(str(plates.specobj_path)) as f:
        assert len(f) == 2 and f[1].get_extname() == "" and f[1].get_exttype() == "BINARY_TBL"
        rows = f[1].read()
    assert len(rows) == len(plates.objects)
    obj = plates.objects[3]
    spec = write_sdss_spec(obj, tmp_path)
    one = fitsio.read(str(spec), "SPECOBJ")
    assert one.dtype.names == rows.dtype.names  # the spec file's SPECOBJ HDU columns
    hit = rows[(rows["PLATE"] == obj.plate) & (rows["FIBERID"] == obj.fiberid)]
    assert len(hit) == 1
    for c in ("Z", "Z_ERR", "ZWARNING", "SPECOBJID", "PLUG_RA", "PLUG_DEC", "CLASS", "SN_MEDIAN_ALL"):
        assert hit[c][0] == one[c][0], c
    sky = {(p.plate, f) for p in plates.plates for f in p.sky_fibers + p.na_fibers}
    assert not sky & set(zip(rows["PLATE"].tolist(), rows["FIBERID"].tolist()))


def test_spplate_target_pixels_equal_the_spec_file(plates):
    plan = plates.plates[1]
    obj = plan.targets[0]
    c = render_sdss_spec(obj)["coadd"]
    with fitsio.FITS(str(plates.plate_paths[1])) as f:
        row = obj.fiberid - 1
        flux = f[0][row:row + 1, :][0]
        ivar = f["IVAR"][row:row + 1, :][0]
        andmask = f["ANDMASK"][row:row + 1, :][0]
    sl = slice(obj.start_k - plan.k0, obj.end_k - plan.k0 + 1)
    np.testing.assert_array_equal(flux[sl], c["flux"])
    np.testing.assert_array_equal(ivar[sl], c["ivar"])
    np.testing.assert_array_equal(andmask[sl], c["and_mask"])
    assert (ivar[:sl.start] == 0).all() and (andmask[:sl.start] != 0).all()


def test_mock_files_are_deterministic(tmp_path):
    a = write_spplate_survey(tmp_path / "a", n_plates=1, fibers_per_plate=8, seed=2)
    b = write_spplate_survey(tmp_path / "b", n_plates=1, fibers_per_plate=8, seed=2)
    assert _sha(a.plate_paths[0]) == _sha(b.plate_paths[0]) and _sha(a.specobj_path) == _sha(b.specobj_path)
    with pytest.raises(ValueError, match="fibers_per_plate"):
        plan_spplate_survey(1, fibers_per_plate=1001)


def test_desi_coadd_layout(desi):
    path = desi.coadd_paths[0]
    plan = desi.files[0]
    assert path.name == f"coadd-sv3-dark-{plan.healpix}.fits"
    assert path.parent.as_posix().endswith(f"healpix/sv3/dark/{plan.healpix // 100}/{plan.healpix}")
    with fitsio.FITS(str(path)) as f:
        names = [h.get_extname() for h in f]
        assert names == ["", "FIBERMAP", "EXP_FIBERMAP"] + [f"{a}_{x}" for a in "BRZ" for x in
                                                             ("WAVELENGTH", "FLUX", "IVAR", "MASK", "RESOLUTION")] + ["SCORES"]
        hdr = f[0].read_header()
        assert (hdr["SPGRP"], hdr["SPGRPVAL"], hdr["HPXPIXEL"], hdr["HPXNSIDE"]) == ("healpix", plan.healpix,
                                                                                    plan.healpix, 64)
        assert (hdr["SURVEY"], hdr["PROGRAM"]) == ("sv3", "dark")
        for arm, (w0, nw) in DESI_ARMS.items():
            wave = f[f"{arm}_WAVELENGTH"].read()
            assert wave.dtype == np.float64 and len(wave) == nw and wave[0] == w0
            np.testing.assert_allclose(np.diff(wave), 0.8, atol=1e-9)
            assert f[f"{arm}_FLUX"].get_dims() == [40, nw]
            assert f[f"{arm}_RESOLUTION"].get_dims() == [40, 11, nw]
            mh = f[f"{arm}_MASK"].read_header()
            assert mh["BITPIX"] == 32 and mh["BZERO"] == 2**31  # uint32, as fuji
        assert f["FIBERMAP"].get_nrows() == 40
    assert [a[1] for a in DESI_ARMS.values()] == [2751, 2326, 2881]
    assert DESI_ARMS["Z"][0] + 0.8 * (DESI_ARMS["Z"][1] - 1) == pytest.approx(9824.0)
    with fitsio.FITS(str(desi.redrock_paths[0])) as f:
        assert [h.get_extname() for h in f] == ["", "REDSHIFTS", "FIBERMAP", "EXP_FIBERMAP", "TSNR2"]
        zs = f["REDSHIFTS"].read()
    assert zs.dtype.names == ("TARGETID", "Z", "ZERR", "ZWARN", "CHI2", "COEFF", "FITMETHOD", "NPIXELS", "SPECTYPE",
                              "SUBTYPE", "NCOEFF", "DELTACHI2")
    assert zs["TARGETID"].tolist() == list(plan.targetids)


def test_desi_columns_match_the_real_files(desi):
    real_coadd, real_rr = DESI_DIR / "coadd-sv3-dark-26065.fits", DESI_DIR / "redrock-special-dark-27247.fits"
    if not real_coadd.exists() or not real_rr.exists():
        pytest.skip(f"real DESI files not found at {DESI_DIR} (a fresh clone has no ../shared; CI does)")
    for hdu in ("FIBERMAP", "EXP_FIBERMAP", "SCORES"):
        real = fitsio.FITS(str(real_coadd))[hdu].get_rec_dtype()[0]
        mock = fitsio.FITS(str(desi.coadd_paths[0]))[hdu].get_rec_dtype()[0]
        assert mock.names == real.names, hdu
        assert [mock[n].str for n in mock.names] == [real[n].str for n in real.names], hdu
    real = fitsio.FITS(str(real_rr))
    mock = fitsio.FITS(str(desi.redrock_paths[0]))
    assert mock["REDSHIFTS"].get_rec_dtype()[0] == real["REDSHIFTS"].get_rec_dtype()[0]
    assert mock["TSNR2"].get_colnames() == real["TSNR2"].get_colnames()


def test_desi_reader_gives_the_planned_rejects(desi):
    for path, plan in zip(desi.coadd_paths, desi.files):
        assert identify_survey(path, with_count=True) == ("desi", 40)
        b = read_spectra(path)
        sid = b.meta["source_id"]
        got = {s: r for s, r in zip(sid, b.reject_reason) if r}
        want = {s: r for s, r in desi.expected_rejects.items() if s in set(sid)}
        assert got == want
        assert set(want.values()) == {RejectReason.SKY_FIBRE.value, RejectReason.UNASSIGNED_FIBRE.value,
                                      RejectReason.BAD_FIBERSTATUS.value, RejectReason.ZWARN.value,
                                      RejectReason.NOT_GALAXY.value}
        galaxy = np.array([r == "galaxy" for r in plan.roles])
        np.testing.assert_allclose(b.meta["z"][galaxy], [o.z for o, r in zip(plan.objects, plan.roles)
                                                         if r == "galaxy"], atol=2e-4)
        assert np.isfinite(b.meta["flux_w1"][galaxy]).all() and (b.meta["flux_w1"][galaxy] > 0).all()


def test_mixed_survey_auto_ingest(plates, desi, tmp_path, client):
    """spPlate + specObj + DESI coadds + redrock files in one `--survey auto` ingest: two groups, all accounted for."""
    st = str(tmp_path / "store.zarr")
    inputs = [str(plates.plate_paths[0].parent), str(desi.coadd_paths[0].parents[4])]
    summary = run_ingest(inputs, st, client=client, survey="auto", shard_rows=64, chunk_rows=32, progress=False)
    assert store.list_surveys(st) == ["desi", "sdss"]
    assert summary.auxiliary_files == 1 + len(desi.redrock_paths)
    assert summary.files == len(plates.plate_paths) + len(desi.coadd_paths)
    assert summary.rows == plates.n_spectra + desi.n_spectra
    assert summary.by_survey["sdss"]["rows"] == plates.n_spectra
    expected = {**plates.expected_rejects, **desi.expected_rejects}
    for survey in ("sdss", "desi"):
        meta = store.read_meta(st, survey, columns=["source_id", "reject_reason"]).to_pydict()
        got = {s: r for s, r in zip(meta["source_id"], meta["reject_reason"]) if r}
        assert got == {s: r for s, r in expected.items() if s in set(meta["source_id"])}, survey
