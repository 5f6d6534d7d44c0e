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
