"""SDSS spec reader on the 14 real files in ../shared/realdata/sdss, and on broken inputs."""
import numpy as np
import pytest
from astropy.io import fits

from catalogpred.errors import InputFileError, RejectReason
from catalogpred.spectra import SDSS_GRID, PixelMask
from catalogpred.surveys import identify_survey, read_spectra

pytestmark = pytest.mark.realdata


def test_reads_all_real_files_and_matches_astropy(sdss_files):
    for path in sdss_files:
        block = read_spectra(path)
        assert block.survey == "sdss" and len(block) == 1
        with fits.open(path) as hdul:
            obj = hdul["SPALL" if "SPALL" in hdul else "SPECOBJ"].data[0]
            coadd = hdul["COADD"].data
            plate, mjd, fiber = int(obj["PLATE"]), int(obj["MJD"]), int(obj["FIBERID"])
            assert block.meta["source_id"][0] == f"sdss-{plate:04d}-{mjd:05d}-{fiber:04d}"
            assert path.name == f"spec-{block.meta['source_id'][0][5:]}.fits"
            assert block.meta["ra"][0] == pytest.approx(float(obj["PLUG_RA"]), abs=1e-9)
            assert block.meta["dec"][0] == pytest.approx(float(obj["PLUG_DEC"]), abs=1e-9)
            assert block.meta["z"][0] == pytest.approx(float(obj["Z"]), rel=1e-7)
            assert block.meta["specobjid"][0] == str(obj["SPECOBJID"]).strip()
            # pixel placement by integer log-λ index, no interpolation
            k = np.rint(coadd["loglam"].astype(np.float64) * 1e4).astype(int) - 35780
            inside = (k >= 0) & (k < SDSS_GRID.n_pix)
            np.testing.assert_array_equal(block.flux[0, k[inside]], coadd["flux"][inside])
            np.testing.assert_array_equal(block.ivar[0, k[inside]], coadd["ivar"][inside])
            covered = (block.mask[0] & PixelMask.NO_COVERAGE) == 0
            assert covered.sum() == inside.sum()
            assert np.all(block.flux[0, ~covered] == 0) and np.all(block.ivar[0, ~covered] == 0)


def test_specobjid_string_for_all_flavours(sdss_files):
    ids = {p.name: read_spectra(p).meta["specobjid"][0] for p in sdss_files}
    # legacy 22A string, BOSS v5_11 int64, v5_13 uint64 via TZERO: all exact decimal strings
    assert ids["spec-0266-51602-0013.fits"] == "299492975510054912"
    assert ids["spec-3586-55181-0003.fits"] == "4037477977495252992"
    assert ids["spec-7340-57570-0740.fits"] == "8264308852880857088"  # stored as uint64 (TZERO) in v5_13
    assert all(v.isdigit() for v in ids.values())


def test_identify_by_content_not_name(sdss_files, tmp_path):
    renamed = tmp_path / "whatever.fits"
    renamed.write_bytes(sdss_files[0].read_bytes())
    assert identify_survey(renamed) == "sdss"


def test_truncated_and_random_files(bad_inputs):
    for key in ("truncated", "random"):
        with pytest.raises(InputFileError) as err:
            read_spectra(bad_inputs[key])
        assert err.value.reason is RejectReason.UNREADABLE_FILE
        assert bad_inputs[key].name in str(err.value)


def test_missing_specobj_hdu(sdss_files, tmp_path):
    with fits.open(sdss_files[1]) as hdul:
        out = fits.HDUList([hdul[0].copy(), hdul["COADD"].copy()])
        out.writeto(tmp_path / "spec-0266-51602-0013.fits")
    with pytest.raises(InputFileError) as err:
        read_spectra(tmp_path / "spec-0266-51602-0013.fits")
    assert err.value.reason is RejectReason.MISSING_HDU and "SPECOBJ" in str(err.value)


def test_not_an_sdss_file(tmp_path):
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros(3), name="FLUX")]).writeto(tmp_path / "x.fits")
    with pytest.raises(InputFileError) as err:
        read_spectra(tmp_path / "x.fits")
    assert err.value.reason is RejectReason.UNKNOWN_FORMAT
    assert "no reader matched (HDUs: FLUX, PRIMARY)" in str(err.value)


def test_upper_case_column_names_as_in_dr18(sdss_files, tmp_path):
    """DR18+ (SDSS-V) files spell the COADD columns FLUX, LOGLAM, IVAR, AND_MASK: the same spectrum."""
    src = sdss_files[1]
    with fits.open(src) as hdul:
        coadd = hdul["COADD"]
        cols = fits.ColDefs([fits.Column(name=c.name.upper(), format=c.format, array=coadd.data[c.name])
                             for c in coadd.columns])
        upper = fits.BinTableHDU.from_columns(cols, name="COADD")
        fits.HDUList([hdul[0].copy(), upper, hdul["SPECOBJ"].copy()]).writeto(tmp_path / src.name)
    assert "LOGLAM" in fits.getdata(tmp_path / src.name, "COADD").columns.names
    a, b = read_spectra(src), read_spectra(tmp_path / src.name)
    np.testing.assert_array_equal(a.flux, b.flux) and np.testing.assert_array_equal(a.ivar, b.ivar)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.meta["source_id"][0] == b.meta["source_id"][0] and (a.flux != 0).sum() > 3000


def test_selection_by_class_and_zwarning(sdss_files):
    """As for DESI and PFS: a CLASS outside Selection.spectypes (default GALAXY) is a reject; ZWARNING != 0 is
    kept (the catalog flags it)."""
    from catalogpred.surveys import ReadOptions, Selection

    by_name = {p.name: p for p in sdss_files}
    qso, zwarn, galaxy = (by_name[n] for n in ("spec-0332-52367-0639.fits", "spec-3586-55181-0003.fits",
                                                "spec-0266-51602-0013.fits"))
    b = read_spectra(qso)
    assert b.meta["spec_class"][0] == "QSO" and b.reject_reason[0] == RejectReason.NOT_GALAXY.value
    assert "CLASS 'QSO'" in b.reject_detail[0]
    assert read_spectra(qso, options=ReadOptions(selection=Selection(spectypes=("GALAXY", "QSO")))).reject_reason[0] == ""
    z = read_spectra(zwarn)
    assert z.meta["zwarning"][0] == 4 and z.meta["spec_class"][0] == "GALAXY" and z.reject_reason[0] == ""
    assert read_spectra(galaxy).reject_reason[0] == ""


def _with_position(src, dst, ra, dec):
    """A copy of spec file ``src`` whose SPECOBJ says PLUG_RA/PLUG_DEC = ``ra``/``dec``."""
    with fits.open(src) as hdul:
        hdul["SPECOBJ"].data["PLUG_RA"][0], hdul["SPECOBJ"].data["PLUG_DEC"][0] = ra, dec
        hdul.writeto(dst)
    return dst


def test_positions_off_the_sky_are_rejects_at_ingest_and_at_predict(sdss_files, tmp_path, client, random_bundle):
    """NaN RA, NaN Dec or |Dec| > 90 has no HEALPix pixel (hats gives NaN RA a real one, and aborts the process on
    the others): a bad_position reject at ingest; RA wraps into [0, 360). A store written before ingest
    checked positions gets the same reject at predict, and the run completes with every row accounted for."""
    import pyarrow.parquet as pq
    import zarr

    from catalogpred import store
    from catalogpred.pipeline import run_ingest, run_predict
    from catalogpred.query import open_catalog

    d = tmp_path / "in"
    d.mkdir()
    good = [p for p in sdss_files if read_spectra(p).reject_reason[0] == ""][:4]
    files = [_with_position(good[0], d / "spec-9000-50000-0001.fits", np.nan, 10.0),
             _with_position(good[1], d / "spec-9000-50000-0002.fits", 10.0, 95.0),
             _with_position(good[2], d / "spec-9000-50000-0003.fits", 370.5, -20.0), good[3]]
    st = str(tmp_path / "s.zarr")
    run_ingest([str(f) for f in files], st, client=client, progress=False)
    meta = store.read_meta(st, "sdss").to_pandas().set_index("source_file").loc[[f.name for f in files]]
    assert meta.reject_reason.tolist() == ["bad_position", "bad_position", "", ""]
    assert "Dec = 95.0" in meta.reject_detail.iloc[1] and meta.ra.iloc[2] == pytest.approx(10.5)
    # as a store from before: the third row's Dec overwritten with NaN
    row = int(meta.row.iloc[2])
    dec = zarr.open_array(f"{st}/sdss/meta/dec", mode="r+")
    dec[row] = np.nan
    cat = tmp_path / "catalog"
    summary = run_predict(st, random_bundle, str(cat), client=client, progress=False, torch_threads=1)
    assert (summary.rows, summary.rejects, summary.inputs) == (1, 3, 4)
    assert open_catalog(cat).to_arrow().column("source_file").to_pylist() == [good[3].name]
    rejects = pq.read_table(cat / "rejects.parquet").to_pandas().sort_values("source_file")  # the 3 renamed files
    assert rejects.reason.tolist() == ["bad_position"] * 3
    assert rejects.stage.tolist() == ["ingest", "ingest", "predict"]


def test_a_catalog_of_rejects_only_opens_empty(bad_inputs, tmp_path, client, random_bundle):
    """Every input rejected: the catalog has its schema and units, no rows, and opens for queries and LSDB."""
    import lsdb

    from catalogpred.cli import main
    from catalogpred.pipeline import run_ingest, run_predict
    from catalogpred.query import catalog_info, open_catalog

    st, cat = str(tmp_path / "s.zarr"), tmp_path / "catalog"
    run_ingest([str(p) for p in bad_inputs.values()], st, client=client, progress=False)
    summary = run_predict(st, random_bundle, str(cat), client=client, progress=False, torch_threads=1)
    assert (summary.rows, summary.rejects) == (0, 2)
    q = open_catalog(cat)
    t = q.cone(10.0, 10.0, 3600).to_astropy()
    assert len(t) == 0 and t["w1_mag"].unit == "mag" and q.to_arrow().num_rows == 0
    info = catalog_info(cat)
    assert info["rows"] == 0 and info["leaves"] == 0 and info["area_deg2"]["moc"] == 0
    assert main(["info", str(cat)]) == 0 and main(["query", str(cat), "--format", "csv"]) == 0
    assert len(lsdb.open_catalog(cat).compute()) == 0
