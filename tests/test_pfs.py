"""PFS: fixture files vs the datamodel, the reader (units, masks, redshifts, selection, corrupt files),
flux-conserving resampling, and an end-to-end ingest + predict on a real LocalCluster."""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from hypothesis import given, settings
from hypothesis import strategies as st

from catalogpred.errors import InputFileError, RejectReason
from catalogpred.mock_pfs import (MASK_PLANES, plan_pfs_targets, write_pfs_coadd, write_pfs_cozcandidates,
                                  write_pfs_survey)
from catalogpred.spectra import (DESI_GRID, PixelMask, check_spectra, fnu_njy_to_flam17, pixel_edges,
                                 resample_flux_conserving)
from catalogpred.surveys import ReadOptions, Selection, identify_survey, read_spectra
from catalogpred.surveys.pfs import bad_mask_bits, mask_planes

COADD_HDUS = ["PRIMARY", "TARGET", "TARGETFLUX", "OBSERVATIONS", "WAVELENGTH", "FLUX", "MASK", "SKY", "COVAR", "COVAR2",
              "METADATA", "FLUXTABLE", "NOTES"]
OBJECT_HDUS = ["PRIMARY", "FLUX", "MASK", "TARGET", "SKY", "COVAR", "COVAR2", "OBSERVATIONS", "NOTES", "FLUX_TABLE"]
#: DESI pixel j sits on pfsCoadd pixel j - 125 (both 0.8 Å; 3600 vs 3700 Å starts)
OFFSET = 125


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    d = tmp_path_factory.mktemp("pfs-survey")
    return write_pfs_survey(d, n_objects=20, seed=11, n_bad=4)


@pytest.fixture(scope="module")
def coadd(survey):
    return next(p for p in survey.paths if p.name.startswith("pfsCoadd-00001"))


def _truth(survey, name):
    t = survey.truth.to_pandas()
    return t[t.source_file == name].sort_values("row_in_file").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- files


def test_coadd_layout_matches_datamodel(coadd):
    with fits.open(coadd) as h:
        assert [x.name for x in h] == COADD_HDUS
        assert h[0].header["DAMD_VER"] == 1
        assert isinstance(h["MASK"], fits.CompImageHDU) and h["MASK"].data.dtype == np.int32
        for name in ("TARGET", "TARGETFLUX", "OBSERVATIONS", "COVAR", "METADATA", "FLUXTABLE", "NOTES"):
            assert isinstance(h[name], fits.BinTableHDU), name
        for name in ("WAVELENGTH", "FLUX", "SKY", "COVAR2"):
            assert type(h[name]) is fits.ImageHDU, name
        tgt = h["TARGET"].columns
        assert tgt.names == ["targetId", "catId", "tract", "patch", "objId", "ra", "dec", "targetType"]
        codes = [f[:2] if f.startswith("P") else f[0] for f in tgt.formats]
        assert codes == ["I", "J", "J", "PA", "K", "D", "D", "I"]
        assert h["TARGETFLUX"].columns.names == ["targetId", "filterName", "fiberFlux"]
        assert h["OBSERVATIONS"].columns.names == ["targetId", "visit", "arm", "spectrograph", "pfsDesignId", "fiberId",
                                                  "pfiNominal", "pfiCenter", "obsTime", "expTime"]
        assert h["OBSERVATIONS"].columns["pfiNominal"].format == "2D"
        n = len(h["TARGET"].data)
        wave = h["WAVELENGTH"].data
        assert wave.dtype == np.dtype(">f8") and wave.shape == (11251,)
        np.testing.assert_array_equal(wave, np.linspace(370.0, 1270.0, 11251))  # nm
        assert h["FLUX"].data.dtype == np.dtype(">f4") and h["FLUX"].data.shape == (n, 11251)
        assert h["FLUX"].header["BUNIT"] == "nJy" and h["WAVELENGTH"].header["BUNIT"] == "nm"
        assert h["SKY"].data.shape == (n, 11251) and h["COVAR2"].data.shape == (n, 10, 10)
        cov = h["COVAR"]
        assert cov.columns.names == ["row_0", "row_1", "row_2"]
        assert all(f.startswith("PE") for f in cov.columns.formats)
        assert len(cov.data) == n and len(cov.data["row_0"][0]) == 11251
        ft = h["FLUXTABLE"].columns
        assert ft.names == ["targetId", "wavelength", "flux", "error", "mask"]
        assert [f[:2] for f in ft.formats[1:]] == ["QD", "QE", "QE", "QJ"]
        assert len(h["NOTES"].data) == n
        # mask planes declared as keywords (HIERARCH for long names), also in the METADATA YAML
        mh = h["MASK"].header
        assert mh["MP_BAD"] == 0 and mh["MP_NO_DATA"] == 8 and mh["MP_CR"] == 3
        assert "HIERARCH MP_NO_DATA" in repr(mh)
        import yaml

        md = yaml.safe_load("".join(np.char.decode(h["METADATA"].data["metadata"][0].astype("S"))))  # as the datamodel
        assert md["MP_NO_DATA"] == 8
        # NO_DATA (e.g. below 380 nm, no arm) has NaN or 0 flux
        flux, mask = h["FLUX"].data, h["MASK"].data
        nodata = (mask & (1 << 8)) != 0
        assert nodata[:, wave < 380.0].all() and nodata[:, wave > 1260.0].all()
        assert np.all(np.isnan(flux[nodata]) | (flux[nodata] == 0))
        assert set(h["TARGET"].data["targetType"]) == {1, 2, 3}
        assert np.isnan(flux[nodata]).any() and (flux[nodata] == 0).any()  # both conventions occur
        # galaxy continuum is 1e2-1e5 nJy
        sci = h["TARGET"].data["targetType"] == 1
        med = np.nanmedian(np.where(nodata, np.nan, flux)[sci], axis=1)
        assert np.all((med > 30) & (med < 1e5))


def test_pfs_object_layout(survey):
    path = next(p for p in survey.paths if p.name.startswith("pfsObject"))
    m = re.match(r"^pfsObject-(\d{5})-(\d{5})-(.*)-([0-9a-f]{16})-(\d{3})-0x([0-9a-f]{16})\.fits$", path.name)
    assert m
    with fits.open(path) as h:
        assert [x.name for x in h] == OBJECT_HDUS
        assert isinstance(h["MASK"], fits.CompImageHDU)
        fh = h["FLUX"].header
        assert fh["CTYPE1"] == "WAVE" and fh["CUNIT1"] == "nm"
        n = h["FLUX"].data.size
        assert fh["CRPIX1"] == 0.5 * n + 1.5
        th = h["TARGET"].header
        assert th["CATID"] == int(m.group(1)) and th["TRACT"] == int(m.group(2)) and th["PATCH"] == m.group(3)
        assert f"{th['OBJID']:016x}" == m.group(4) and th["TARGETTYPE"] == 1
        assert h["TARGET"].columns.names == ["filterName", "fiberFlux"]
        assert h["COVAR"].data.shape == (3, n)
        assert h["MASK"].header["MP_NO_DATA"] == 8
        for hdu in ("FLUX", "MASK", "SKY", "COVAR"):  # the datamodel's reader needs it on FLUX
            assert h[hdu].header["DAMD_VER"] == 2, hdu
        assert int(m.group(5)) == len(h["OBSERVATIONS"].data)


def test_visit_hash_is_the_datamodels():
    """calculatePfsVisitHash: SHA-1 of str([b'108562', ...]) of the sorted visits, low 63 bits (value computed with
    the datamodel's own function)."""
    from catalogpred.mock_pfs import _visit_hash

    assert _visit_hash([125833, 108562, 122680, 119564]) == 0x12B7783079047D47


def test_noise_is_what_the_variance_says(survey):
    """chi^2 per pixel of the mock's noise about its model is 1 on sky-line pixels as elsewhere: the variance
    written to COVAR holds all the noise drawn."""
    from catalogpred.mock_pfs import render_pfs_spectrum

    t = survey.targets[0]
    r = render_pfs_spectrum(t)
    ok = np.isfinite(r["flux"]) & np.isfinite(r["variance"]) & (r["variance"] > 0) & (r["mask"] == 0)
    chi2 = (r["flux"].astype(np.float64) - r["model"]) ** 2 / np.where(ok, r["variance"], 1.0)
    from catalogpred.mock_pfs import PFS_WAVE_NM, _sky_model_njy

    cont, lines = _sky_model_njy(PFS_WAVE_NM, 1.0)
    on_lines = ok & (lines > 2.0 * cont)
    assert on_lines.sum() > 200 and 0.8 < chi2[on_lines].mean() < 1.2 and 0.9 < chi2[ok].mean() < 1.1


def test_cozcandidates_layout(survey):
    z = survey.redshift_paths[0]
    assert z.name == "pfsCoZCandidates-00001.fits"
    with fits.open(z) as h:
        names = [x.name for x in h]
        assert names[:6] == ["PRIMARY", "TARGET", "WARNINGS", "ERRORS", "CLASSIFICATION", "GALAXY_CANDIDATES"]
        for o in ("GALAXY", "QSO"):
            assert {f"{o}_CANDIDATES", f"{o}_MODELS", f"{o}_REDSHIFT_GRID", f"{o}_LN_PDF", f"{o}_LINES"} <= set(names)
        assert {"STAR_CANDIDATES", "STAR_MODELS", "STAR_VELOCITY_GRID", "STAR_LN_PDF"} <= set(names)
        gc = h["GALAXY_CANDIDATES"].data
        assert gc.columns.names == ["targetId", "cRank", "redshift", "redshiftError", "redshiftProba", "subClass",
                                    "continuumFile", "lineCatalogRatioFile", "modelId"]
        tgt = h["TARGET"].data
        truth = survey.truth.to_pandas().drop_duplicates("obj_id").set_index("obj_id")  # a target's spectra share z
        best = {}
        for row in gc:
            if row["cRank"] == 0:
                best[int(tgt["objId"][row["targetId"]])] = float(row["redshift"])
        assert best and all(abs(best[o] - truth.loc[o, "z"]) < 1e-6 for o in best)
        assert list(gc["cRank"]) != sorted(gc["cRank"])  # shuffled: readers must use cRank
    assert identify_survey(z) == "aux:pfs-redshifts"


def test_cozcandidates_with_the_older_redshifError_spelling(survey, tmp_path):
    """Older drp_1dpipe wrote GALAXY_CANDIDATES.redshifError: the same redshift errors."""
    from catalogpred.surveys.pfs import load_cozcandidates

    src = survey.redshift_paths[0]
    old = tmp_path / src.name
    with fits.open(src) as h:
        h["GALAXY_CANDIDATES"].columns.change_name("redshiftError", "redshifError")
        h.writeto(old)
    a, b = load_cozcandidates(src), load_cozcandidates(old)
    assert len(a) == len(b) and np.isfinite(a._zerr).any()
    np.testing.assert_array_equal(a._zerr, b._zerr)


def test_fixture_is_deterministic(tmp_path):
    a = write_pfs_survey(tmp_path / "a", n_objects=6, seed=3, n_files=1, n_pfs_objects=1, fluxtable=False)
    b = write_pfs_survey(tmp_path / "b", n_objects=6, seed=3, n_files=1, n_pfs_objects=1, fluxtable=False)
    assert [p.name for p in a.paths] == [p.name for p in b.paths]
    for pa_, pb in zip(a.paths + a.redshift_paths, b.paths + b.redshift_paths):
        assert pa_.read_bytes() == pb.read_bytes(), pa_.name
    assert a.truth.to_pandas().equals(b.truth.to_pandas())


# ----------------------------------------------------------------------------------------------- units


def test_fnu_to_flam_against_astropy():
    import astropy.units as u

    for lam in (3700.0, 5500.0, 9000.0, 12000.0):
        expected = (1234.5 * u.nJy).to(u.erg / u.s / u.cm**2 / u.AA, equivalencies=u.spectral_density(lam * u.AA))
        assert fnu_njy_to_flam17(1234.5, lam) == pytest.approx(expected.value / 1e-17, rel=1e-10)


def test_reader_flux_is_unit_conversion_of_file_njy(coadd):
    blk = read_spectra(coadd)
    assert blk.survey == "pfs" and blk.grid == DESI_GRID and len(blk) == blk.flux.shape[0]
    with fits.open(coadd) as h:
        wave_aa = h["WAVELENGTH"].data * 10.0
        flux = h["FLUX"].data.astype(np.float64)
        var = np.array([r for r in h["COVAR"].data["row_0"]], np.float64)
        mask = h["MASK"].data
    np.testing.assert_allclose(wave_aa[: DESI_GRID.n_pix - OFFSET], DESI_GRID.wave[OFFSET:], rtol=0, atol=1e-6)
    bad = bad_mask_bits(MASK_PLANES)
    checked = 0
    for lam in (3900.0, 4500.0, 5500.0, 6400.0, 7500.0, 8600.0, 9700.0):
        j = int(np.argmin(np.abs(DESI_GRID.wave - lam)))
        for i in range(len(blk)):
            k = j - OFFSET
            if (int(mask[i, k]) & bad) or not np.isfinite(flux[i, k]):
                assert blk.ivar[i, j] == 0
                continue
            expected = fnu_njy_to_flam17(flux[i, k], wave_aa[k])
            assert blk.flux[i, j] == pytest.approx(expected, rel=1e-5, abs=1e-30)
            fac = fnu_njy_to_flam17(1.0, wave_aa[k])
            assert blk.ivar[i, j] == pytest.approx(1.0 / var[i, k] / fac**2, rel=1e-5)
            checked += 1
    assert checked > 40
    # blue of 3700 Å the DESI grid is not covered; NO_DATA (370-380 nm) is masked by the pipeline
    nocov = (blk.mask & PixelMask.NO_COVERAGE) != 0
    assert nocov[:, :OFFSET].all() and not nocov[:, OFFSET:].any()
    assert (blk.ivar[:, :OFFSET] == 0).all() and (blk.flux[:, :OFFSET] == 0).all()
    j380 = DESI_GRID.wave < 3799.0
    assert ((blk.mask[:, OFFSET:][:, j380[OFFSET:]] & PixelMask.PIPELINE) != 0).all()


def test_nan_flux_is_masked_not_corruption(coadd):
    blk = read_spectra(coadd)
    assert np.isfinite(blk.flux).all() and np.isfinite(blk.ivar).all()
    _, _, _, norm, reasons, _ = check_spectra(blk.flux, blk.ivar, blk.mask, DESI_GRID.wave, blk.meta["z"])
    kept = blk.reject_reason == ""
    assert kept.sum() >= 3
    assert all(reasons[i] is None for i in np.flatnonzero(kept)), reasons
    assert RejectReason.NONFINITE_FLUX not in reasons


def test_informational_mask_planes_do_not_mask(coadd):
    blk = read_spectra(coadd)
    with fits.open(coadd) as h:
        mask = h["MASK"].data
        flux = h["FLUX"].data
    overlap = 1 << MASK_PLANES["OVERLAP"]
    only_overlap = (mask == overlap) & np.isfinite(flux)
    i, k = np.argwhere(only_overlap)[0]
    assert blk.ivar[i, k + OFFSET] > 0 and blk.mask[i, k + OFFSET] == 0
    cr = np.argwhere((mask & (1 << MASK_PLANES["CR"])) != 0)[0]
    assert blk.ivar[cr[0], cr[1] + OFFSET] == 0 and blk.mask[cr[0], cr[1] + OFFSET] & PixelMask.PIPELINE


def test_informational_plane_at_bit_31(coadd, tmp_path):
    """MASK is int32: a plane at bit 31 makes the value negative. Moving OVERLAP (informational) there changes
    nothing read: bit 31 must not sign-extend into the high bits, which count as bad."""
    moved = tmp_path / coadd.name
    with fits.open(coadd) as h:
        old_bit = int(h["MASK"].header["MP_OVERLAP"])
        m = h["MASK"].data.astype(np.int64)
        on = (m & (1 << old_bit)) != 0
        m = (m & ~(1 << old_bit)) | np.where(on, 1 << 31, 0)
        h["MASK"].data = (m & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
        h["MASK"].header["MP_OVERLAP"] = 31
        h.writeto(moved)
    assert (fits.getdata(moved, "MASK") < 0).any()
    a, b = read_spectra(coadd), read_spectra(moved)
    np.testing.assert_array_equal(a.ivar, b.ivar) and np.testing.assert_array_equal(a.mask, b.mask)


def test_n_visit_counts_distinct_visits(coadd, survey, tmp_path):
    """nVisit as the datamodel counts it: distinct visits, so OBSERVATIONS rows per arm do not count twice."""
    twice = tmp_path / coadd.name
    with fits.open(coadd) as h:  # targetId and visit, the columns nVisit needs, each row twice (as per arm)
        obs = h["OBSERVATIONS"].data
        h["OBSERVATIONS"] = fits.BinTableHDU.from_columns(
            [fits.Column("targetId", "J", array=np.tile(obs["targetId"], 2)),
             fits.Column("visit", "J", array=np.tile(obs["visit"], 2))], name="OBSERVATIONS")
        h.writeto(twice)
    a, b = read_spectra(coadd), read_spectra(twice)
    files = survey.truth.column("source_file").to_pylist()  # targets are in truth order
    by_obj = {t.obj_id: t.n_visit for t, f in zip(survey.targets, files) if f == coadd.name}
    assert a.meta["n_visit"].tolist() == [by_obj[o] for o in a.meta["obj_id"].tolist()]
    np.testing.assert_array_equal(a.meta["n_visit"], b.meta["n_visit"])


def test_mask_bits_come_from_keywords_not_constants(tmp_path):
    ts = plan_pfs_targets(3, seed=5, n_sky=1)
    a = write_pfs_coadd(tmp_path / "a" / "pfsCoadd-a.fits", ts, fluxtable=False)
    planes = {name: (bit + 7) % 20 for name, bit in MASK_PLANES.items()}  # another numbering
    b = write_pfs_coadd(tmp_path / "b" / "pfsCoadd-b.fits", ts, mask_planes=planes, fluxtable=False)
    with fits.open(a) as ha, fits.open(b) as hb:
        assert not np.array_equal(ha["MASK"].data, hb["MASK"].data)
        assert mask_planes(hb["MASK"].header) == planes
    ba, bb = read_spectra(a), read_spectra(b)
    np.testing.assert_array_equal(ba.flux, bb.flux)
    np.testing.assert_array_equal(ba.ivar, bb.ivar)
    np.testing.assert_array_equal(ba.mask, bb.mask)


# ----------------------------------------------------------------------------------------------- resampling


def _brute_resample(w_in, f, iv, w_out):
    """Loop implementation: overlap-weighted mean of good pixels and its variance."""
    def edges(w):
        return np.concatenate([[w[0] - (w[1] - w[0]) / 2], (w[1:] + w[:-1]) / 2, [w[-1] + (w[-1] - w[-2]) / 2]])

    ei, eo = edges(np.asarray(w_in, float)), edges(np.asarray(w_out, float))
    for k in range(len(eo)):  # resample_flux_conserving snaps edges within 1e-6 pixel of an input edge
        width = min(eo[max(k, 1)] - eo[max(k, 1) - 1], eo[min(k + 1, len(eo) - 1)] - eo[min(k + 1, len(eo) - 1) - 1])
        near = ei[np.argmin(np.abs(ei - eo[k]))]
        if abs(near - eo[k]) <= 1e-6 * width:
            eo[k] = near
    fo, vo, cov = np.zeros(len(w_out)), np.zeros(len(w_out)), np.zeros(len(w_out), bool)
    for j in range(len(w_out)):
        lo, hi = eo[j], eo[j + 1]
        cov[j] = lo >= ei[0] and hi <= ei[-1]
        num = den = var = 0.0
        for i in range(len(w_in)):
            o = max(0.0, min(hi, ei[i + 1]) - max(lo, ei[i]))
            if o > 0 and iv[i] > 0:
                num += o * f[i]
                den += o
                var += o * o / iv[i]
        if den > 0:
            fo[j], vo[j] = num / den, var / den**2
    return fo, vo, cov


@st.composite
def _grids(draw):
    n_in = draw(st.integers(3, 40))
    widths = np.array(draw(st.lists(st.floats(0.2, 3.0), min_size=n_in, max_size=n_in)))
    start = draw(st.floats(3000.0, 9000.0))
    w_in = start + np.cumsum(widths) - widths / 2  # irregular centres
    flux = np.array(draw(st.lists(st.floats(-50.0, 500.0), min_size=n_in, max_size=n_in)))
    n_out = draw(st.integers(2, 30))
    return w_in, flux, n_out


@settings(max_examples=60, deadline=None)
@given(g=_grids())
def test_resampling_conserves_flux(g):
    w_in, flux, n_out = g
    e_in = pixel_edges(w_in)
    ivar = np.ones_like(flux)
    # an output grid spanning exactly the input range: total flux is conserved
    width = (e_in[-1] - e_in[0]) / n_out
    w_out = e_in[0] + width * (np.arange(n_out) + 0.5)
    f_out, iv_out, cov = resample_flux_conserving(w_in, flux, ivar, w_out)
    assert cov.all()
    total_in = np.sum(flux * np.diff(e_in))
    # (to snap_tol = 1e-6: an output edge within 1e-6 pixel of an input edge is moved onto it)
    scale = np.sum(np.abs(flux) * np.diff(e_in))
    assert np.sum(f_out * width) == pytest.approx(total_in, rel=0, abs=2e-6 * scale + 1e-12)
    # any output grid: each covered pixel integrates the input over its bin (loop implementation)
    w_sub = np.linspace(e_in[0] + 0.3, e_in[-1] - 0.1, n_out + 3)
    f2, iv2, cov2 = resample_flux_conserving(w_in, flux, ivar, w_sub)
    fb, vb, covb = _brute_resample(w_in, flux, ivar, w_sub)
    np.testing.assert_array_equal(cov2, covb)
    np.testing.assert_allclose(f2[cov2], fb[cov2], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(1.0 / iv2[cov2], vb[cov2], rtol=1e-9)
    assert np.all(f2[~cov2] == 0) and np.all(iv2[~cov2] == 0)


@settings(max_examples=40, deadline=None)
@given(g=_grids(), data=st.data())
def test_masked_pixels_contribute_nothing(g, data):
    w_in, flux, n_out = g
    masked = np.array(data.draw(st.lists(st.booleans(), min_size=len(w_in), max_size=len(w_in))))
    ivar = np.where(masked, 0.0, 2.0)
    e = pixel_edges(w_in)
    w_out = np.linspace(e[0] + 0.05, e[-1] - 0.05, n_out + 2)
    a = resample_flux_conserving(w_in, np.where(masked, np.nan, flux), ivar, w_out)
    b = resample_flux_conserving(w_in, np.where(masked, 1e30, flux), ivar, w_out)
    c = _brute_resample(w_in, flux, ivar, w_out)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.isfinite(a[0]).all()
    np.testing.assert_allclose(a[0], np.where(a[1] > 0, c[0], 0.0), rtol=1e-9, atol=1e-9)


def test_resample_constant_linear_and_aligned():
    w_in = np.linspace(3700.0, 12700.0, 11251)
    # constant F_λ stays constant on any covered output grid
    f, iv, cov = resample_flux_conserving(w_in, np.full(w_in.size, 3.5), np.full(w_in.size, 4.0), DESI_GRID.wave)
    assert cov.sum() == DESI_GRID.n_pix - OFFSET
    np.testing.assert_allclose(f[cov], 3.5, rtol=1e-12)
    np.testing.assert_allclose(iv[cov], 4.0, rtol=1e-9)  # aligned pixels: one input pixel each
    # a linear spectrum on aligned pixels comes back unchanged, masked pixels stay masked
    lin = 0.01 * w_in - 20.0
    ivar = np.ones_like(lin)
    ivar[[2000, 2001, 5000]] = 0
    f, iv, cov = resample_flux_conserving(w_in, lin, ivar, DESI_GRID.wave)
    j = np.arange(OFFSET, DESI_GRID.n_pix)
    good = ivar[j - OFFSET] > 0
    np.testing.assert_allclose(f[j][good], lin[j - OFFSET][good], rtol=1e-10)
    assert (iv[j][~good] == 0).all() and (f[j][~good] == 0).all()
    # a linear spectrum on a coarser grid: the bin mean is the value at the bin centre
    w_out = np.arange(4000.0, 9000.0, 2.4)
    f, iv, cov = resample_flux_conserving(w_in, lin, np.ones_like(lin), w_out)
    np.testing.assert_allclose(f, 0.01 * w_out - 20.0, rtol=1e-9)


def test_resampled_ivar_gives_unit_chi2():
    rng = np.random.default_rng(42)
    w_in = np.arange(4000.0, 4300.0, 1.0)
    sigma = rng.uniform(0.5, 2.0, w_in.size)
    noise = rng.standard_normal((3000, w_in.size)) * sigma
    ivar = np.broadcast_to(1.0 / sigma**2, noise.shape)
    for w_out in (np.arange(4010.3, 4290.0, 0.8), np.arange(4010.0, 4290.0, 2.7)):
        f, iv, cov = resample_flux_conserving(w_in, noise, ivar, w_out)
        chi2 = (f[:, cov] ** 2 * iv[:, cov])
        assert chi2.mean() == pytest.approx(1.0, abs=0.02)
        ratio = f[:, cov].var(axis=0) * iv[0, cov]  # per-pixel empirical variance vs 1/ivar
        assert np.median(ratio) == pytest.approx(1.0, abs=0.05)


def test_resampled_variance_includes_input_covariance():
    """With ``covar``, 1/ivar_out is diag(R C Rᵀ) exactly (R: the resampling weights, C: banded covariance)."""
    rng = np.random.default_rng(3)
    w_in = np.arange(4000.0, 4060.0, 1.0)  # 1 Å (legacy pfsObject) onto 0.8 Å and 2.7 Å
    n_in = w_in.size
    sigma = rng.uniform(0.5, 2.0, n_in)
    c1 = 0.4 * sigma[:-1] * sigma[1:]
    c2 = -0.1 * sigma[:-2] * sigma[2:]
    cov = np.diag(sigma**2) + np.diag(c1, 1) + np.diag(c1, -1) + np.diag(c2, 2) + np.diag(c2, -2)
    covar = np.zeros((2, n_in))
    covar[0, :-1], covar[1, :-2] = c1, c2
    ivar = 1.0 / sigma**2
    ivar[[10, 11, 30]] = 0  # masked pixels: out of R and of C
    for w_out in (np.arange(4003.3, 4055.0, 0.8), np.arange(4003.0, 4055.0, 2.7)):
        # R from the (linear) resampling of unit spectra with the same mask
        R = resample_flux_conserving(w_in, np.eye(n_in), np.broadcast_to(ivar, (n_in, n_in)), w_out)[0].T
        _, iv, covered = resample_flux_conserving(w_in, np.zeros(n_in), ivar, w_out, covar=covar)
        exact = np.einsum("ji,ik,jk->j", R, cov, R)
        ok = covered & (iv > 0)
        np.testing.assert_allclose(1.0 / iv[ok], exact[ok], rtol=1e-10)
        _, iv0, _ = resample_flux_conserving(w_in, np.zeros(n_in), ivar, w_out)
        assert np.abs(iv0[ok] / iv[ok] - 1).max() > 0.05  # without covar the variance is off
    # per-spectrum covariances [n, K, n_in] and a constant one broadcast give the same
    f2, iv2, _ = resample_flux_conserving(w_in, np.ones((2, n_in)), np.broadcast_to(ivar, (2, n_in)), w_out,
                                          covar=np.stack([covar, covar]))
    np.testing.assert_array_equal(iv2[0], iv) and np.testing.assert_array_equal(iv2[1], iv)
    with pytest.raises(ValueError, match="covar"):
        resample_flux_conserving(w_in, np.ones(n_in), ivar, w_out, covar=np.zeros((2, n_in - 1)))
    # correlated noise drawn from C: empirical variance per output pixel matches 1/ivar_out
    noise = rng.multivariate_normal(np.zeros(n_in), cov, size=20000)
    f, iv, covered = resample_flux_conserving(w_in, noise, np.broadcast_to(ivar, noise.shape), w_out, covar=covar)
    ok = covered & (iv[0] > 0)
    assert np.median(f[:, ok].var(axis=0) * iv[0, ok]) == pytest.approx(1.0, abs=0.03)


def _with_covar(path, out, rows_1_2):
    """A copy of the pfsObject ``path`` at ``out`` whose COVAR rows 1 and 2 are ``rows_1_2(sd)`` (sd: the
    standard deviation per pixel, 0 where row 0 is not a positive number); returns the COVAR written."""
    with fits.open(path) as h:
        c = h["COVAR"].data.astype(np.float64)
        sd = np.sqrt(np.where(np.isfinite(c[0]) & (c[0] > 0), c[0], 0.0))
        c[1], c[2] = rows_1_2(sd)
        h["COVAR"].data = c.astype(np.float32)
        h.writeto(out)
    return c.astype(np.float32).astype(np.float64)


def test_covar_off_diagonals_enter_the_variance_off_the_desi_pixels(survey, coadd, tmp_path):
    """Legacy 0.1 nm pfsObject: COVAR rows 1-2 change the resampled ivar as resample(covar=...) says; the
    pixel-aligned pfsCoadd: they change nothing."""
    from catalogpred.spectra import fnu_njy_to_flam17

    path = next(p for p in survey.paths if p.name.startswith("pfsObject"))
    zero, corr = tmp_path / "zero" / path.name, tmp_path / "corr" / path.name
    zero.parent.mkdir(), corr.parent.mkdir()
    _with_covar(path, zero, lambda sd: (np.zeros_like(sd), np.zeros_like(sd)))

    def banded(sd):
        r1, r2 = np.zeros_like(sd), np.zeros_like(sd)
        r1[:-1], r2[:-2] = 0.3 * sd[:-1] * sd[1:], 0.1 * sd[:-2] * sd[2:]
        return r1, r2

    c32 = _with_covar(path, corr, banded)
    a, b = read_spectra(zero), read_spectra(corr)
    np.testing.assert_array_equal(a.flux, b.flux)
    ok = (a.ivar[0] > 0) & (b.ivar[0] > 0)
    ratio = a.ivar[0, ok] / b.ivar[0, ok]  # = var with / var without covariance
    assert ratio.max() > 1.1 and ratio.min() > 0.99  # positive correlations: larger variance where pixels share
    # the reader's number is resample_flux_conserving's with the covariance in F_λ units
    blk_wave = DESI_GRID.wave
    from catalogpred.surveys.pfs import wcs_wavelength_angstrom

    with fits.open(corr) as h:
        w = wcs_wavelength_angstrom(h["FLUX"].header, h["FLUX"].data.size)
        f_nu, mask = h["FLUX"].data.astype(np.float64), h["MASK"].data.astype(np.int64)
    fac = fnu_njy_to_flam17(np.ones(1), w)
    good = ((mask & bad_mask_bits(mask_planes(fits.getheader(corr, "MASK")))) == 0) & np.isfinite(f_nu) & (c32[0] > 0)
    iv = np.where(good, 1.0 / np.where(good, c32[0], 1.0), 0.0) / fac**2
    cov = np.zeros((2, w.size))
    cov[0, :-1] = c32[1, :-1] * fac[:-1] * fac[1:]
    cov[1, :-2] = c32[2, :-2] * fac[:-2] * fac[2:]
    _, iv_ref, _ = resample_flux_conserving(w, np.where(good, f_nu * fac, 0.0), iv, blk_wave, covar=cov)
    np.testing.assert_allclose(b.ivar[0], iv_ref.astype(np.float32), rtol=1e-6)
    # pfsCoadd (0.8 Å on DESI's pixels): off-diagonals do not change any pixel
    aligned = tmp_path / coadd.name
    with fits.open(coadd) as h:
        rows = h["COVAR"].data
        for k in (1, 2):
            for i in range(len(rows)):
                rows[f"row_{k}"][i][:] = 0.3 * np.nan_to_num(rows["row_0"][i])
        assert np.abs(rows["row_1"][0]).max() > 0
        h.writeto(aligned)
    np.testing.assert_array_equal(read_spectra(coadd).ivar, read_spectra(aligned).ivar)


def test_mock_noise_has_the_covariance_its_covar_says():
    """The mock draws noise on each arm's native pixels and interpolates it onto the file's grid, as drp_stella
    resamples arms: the empirical variance and lag-1, lag-2 covariances of many draws are COVAR's rows 0-2,
    neighbours within an arm are correlated, and pixels across an arm boundary are not."""
    from catalogpred.mock_pfs import ARMS_NM, arm_resampled_noise

    w = np.arange(600.0, 700.0, 0.08)  # the b (to 650 nm) and r arms, on pfsCoadd's 0.08 nm steps
    var = 1.0 + 0.5 * np.sin(w / 3.0) ** 2
    rng = np.random.default_rng(3)
    draws, bands = zip(*(arm_resampled_noise(w, var, rng) for _ in range(4000)))
    d, band = np.array(draws), bands[0]
    assert all(np.array_equal(b, band) for b in bands)  # the covariance is the grid's, not the draw's
    assert np.mean(band[0] / var) == pytest.approx(1.0, abs=1e-3)  # the variance level asked for, on average
    for lag in (0, 1, 2):
        emp = (d[:, :d.shape[1] - lag] * d[:, lag:]).mean(axis=0)
        err = (emp - band[lag, :d.shape[1] - lag]) / np.sqrt(band[0, :d.shape[1] - lag] * band[0, lag:])
        assert np.abs(err).mean() < 0.03 and np.abs(err).max() < 0.15  # 1/sqrt(4000) = 0.016 per pixel
    rho1 = band[1, :-1] / np.sqrt(band[0, :-1] * band[0, 1:])
    blue = w[:-1] <= ARMS_NM["b"][1]
    edge = blue & (w[1:] > ARMS_NM["b"][1])  # the last b pixel and the first r pixel
    assert edge.sum() == 1 and rho1[edge][0] == 0.0
    assert 0.1 < rho1[blue & ~edge].mean() < 0.5 and 0.1 < rho1[~blue].mean() < 0.5


def test_reader_ivar_is_the_variance_of_the_files_correlated_noise(tmp_path):
    """End to end through the reader: on legacy 0.1 nm pfsObject files, resampled onto the DESI grid, χ² per
    pixel of (flux − the same file's noise-free flux) with the reader's ivar averages 1. Their COVAR rows 1-2
    enter it: read without them, every pixel's variance is as small or smaller."""
    from catalogpred.mock_pfs import datamodel_wavelength_nm, render_pfs_spectrum, write_pfs_object

    chi2, chi2_without, ratios = [], [], []
    for t in plan_pfs_targets(4, seed=21):
        path = write_pfs_object(tmp_path / "noisy", t)
        model = render_pfs_spectrum(t, datamodel_wavelength_nm(350.0, 1260.0, 9101))["model"]
        clean, zero = tmp_path / "clean" / path.name, tmp_path / "zero" / path.name
        clean.parent.mkdir(exist_ok=True), zero.parent.mkdir(exist_ok=True)
        with fits.open(path) as h:
            f = h["FLUX"].data
            h["FLUX"].data = np.where(np.isfinite(f), model, f).astype(np.float32)  # same NaNs: same pixels good
            h.writeto(clean)
        _with_covar(path, zero, lambda sd: (np.zeros_like(sd), np.zeros_like(sd)))
        a, b, c = read_spectra(path), read_spectra(clean), read_spectra(zero)
        ok = (a.ivar[0] > 0) & (b.ivar[0] > 0)
        np.testing.assert_array_equal(ok, (c.ivar[0] > 0) & (b.ivar[0] > 0))
        resid = a.flux[0, ok].astype(np.float64) - b.flux[0, ok]
        chi2.append(resid**2 * a.ivar[0, ok])
        chi2_without.append(resid**2 * c.ivar[0, ok])
        ratios.append(c.ivar[0, ok] / a.ivar[0, ok])
    chi2, chi2_without, ratios = map(np.concatenate, (chi2, chi2_without, ratios))
    assert chi2.size > 20000 and chi2.mean() == pytest.approx(1.0, abs=0.03)
    assert ratios.min() > 1 - 1e-5 and ratios.max() > 1.05  # the covariances only add variance here
    assert chi2_without.mean() > chi2.mean()


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="increasing"):
        resample_flux_conserving(np.array([2.0, 1.0, 3.0]), np.ones(3), np.ones(3), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="n_in"):
        resample_flux_conserving(np.array([1.0, 2.0, 3.0]), np.ones(4), np.ones(4), np.array([1.0, 2.0]))


# ----------------------------------------------------------------------------------------------- pfsObject


def test_pfs_object_reads_wcs_and_resamples(survey):
    path = next(p for p in survey.paths if p.name.startswith("pfsObject"))
    blk = read_spectra(path)
    from astropy.wcs import WCS

    with fits.open(path) as h:
        n = h["FLUX"].data.size
        # as the datamodel's WavelengthArray.fromFitsHeader reads it: astropy's 0-based pixel_to_world(1 .. n)
        wcs = WCS(h["FLUX"].header).sub(["spectral"])
        wave_aa = wcs.pixel_to_world(np.arange(1.0, n + 1.0)).to_value("Angstrom")
        flux = h["FLUX"].data.astype(np.float64)
        var = h["COVAR"].data[0].astype(np.float64)
        bad = (h["MASK"].data & bad_mask_bits(mask_planes(h["MASK"].header))) != 0
        t = h["TARGET"].header
    assert wave_aa[0] == pytest.approx(3500.0) and wave_aa[-1] == pytest.approx(12600.0)  # linspace(350, 1260, n) nm
    assert wave_aa[1] - wave_aa[0] == pytest.approx(1.0)
    fac = fnu_njy_to_flam17(1.0, wave_aa)
    good = ~bad & np.isfinite(flux) & np.isfinite(var) & (var > 0)
    fl = np.where(good, flux * fac, 0.0)
    iv = np.where(good, 1.0 / np.where(good, var, 1.0) / fac**2, 0.0)
    for lam in (4000.0, 5000.0, 6600.0, 8000.0, 9500.0):
        j = int(np.argmin(np.abs(DESI_GRID.wave - lam)))
        k = int(np.argmin(np.abs(wave_aa - DESI_GRID.wave[j])))
        sl = slice(k - 4, k + 5)
        fb, vb, _ = _brute_resample(wave_aa[sl], fl[sl], iv[sl], DESI_GRID.wave[j - 1:j + 2])
        assert blk.flux[0, j] == pytest.approx(fb[1], rel=1e-5)
        if vb[1] > 0:
            assert blk.ivar[0, j] == pytest.approx(1.0 / vb[1], rel=1e-5)
    assert not ((blk.mask & PixelMask.NO_COVERAGE) != 0).any()  # 350-1260 nm covers the DESI grid
    m = blk.meta
    assert m["cat_id"][0] == t["CATID"] and m["obj_id"][0] == t["OBJID"] and m["patch"][0] == t["PATCH"]
    assert m["source_id"][0] == f"pfs-{t['CATID']:05d}-{t['OBJID']:016x}"
    assert m["ra"][0] == t["RA"] and m["z"][0] == pytest.approx(_truth(survey, path.name).z[0], rel=1e-6)


def test_pfs_object_wcs_in_metres_reads_the_same(survey, tmp_path):
    src = next(p for p in survey.paths if p.name.startswith("pfsObject"))
    dst = tmp_path / src.name
    with fits.open(src) as h:
        for ext in ("FLUX", "MASK", "SKY", "COVAR"):
            hd = h[ext].header
            hd["CRVAL1"], hd["CDELT1"], hd["CUNIT1"] = hd["CRVAL1"] * 1e-9, hd["CDELT1"] * 1e-9, "m"
        h.writeto(dst)
    _reads_like(survey, src, dst)


def _reads_like(survey, src, dst):
    """``dst`` (a rewritten copy of ``src``, with the survey's redshift files copied beside it) reads as ``src``
    does: the same flux, masks and ids."""
    for z in survey.redshift_paths:
        (dst.parent / z.name).write_bytes(z.read_bytes())
    a, b = read_spectra(src), read_spectra(dst)
    np.testing.assert_allclose(b.flux, a.flux, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(b.mask, a.mask)
    assert list(b.meta["source_id"]) == list(a.meta["source_id"])


def test_float32_wavelengths_keep_masked_pixels_masked(tmp_path):
    """drp_stella writes its WavelengthArray as float32: the 0.08 nm grid is then off the exact one by up to
    5.9e-4 A. The reader took that grid as not aligned with DESI's, and every DESI pixel kept a sliver of its
    neighbour, so a masked (e.g. cosmic-ray) pixel came out with the neighbour's flux at full weight. Now edges
    that close snap together: the float32 file reads as the float64 one does."""
    from catalogpred.mock_pfs import PFS_WAVE_NM

    ts = plan_pfs_targets(3, seed=11)
    p64 = write_pfs_coadd(tmp_path / "a" / "pfsCoadd-00001-00011.fits", ts, fluxtable=False)
    p32 = write_pfs_coadd(tmp_path / "b" / "pfsCoadd-00001-00011.fits", ts, fluxtable=False,
                          wave_nm=PFS_WAVE_NM.astype(np.float32))
    with fits.open(p32) as h:
        assert h["WAVELENGTH"].header["BITPIX"] == -32
        bad = (h["MASK"].data & bad_mask_bits(mask_planes(h["MASK"].header))) != 0
    a, b = read_spectra(p64), read_spectra(p32)
    assert bad.sum() > 50
    for i in range(3):
        k = np.flatnonzero(bad[i])
        j = k + OFFSET  # the DESI pixel that input pixel k is (pfsCoadd's grid starts 125 DESI pixels in)
        assert (b.ivar[i, j[j < DESI_GRID.n_pix]] == 0).all()
    np.testing.assert_array_equal(b.mask, a.mask)
    np.testing.assert_array_equal(b.ivar > 0, a.ivar > 0)
    np.testing.assert_allclose(b.flux, a.flux, rtol=1e-3, atol=1e-3)  # the model rendered at float32 wavelengths


def test_pfs_object_with_a_wavelength_hdu_reads_the_same(survey, tmp_path):
    """The datamodel writes a pfsObject's wavelength as a WAVELENGTH image (nm) instead of a WCS when it is not a
    uniform WavelengthArray; the reader took such a file for a pfsCoadd and failed ("TARGET lacks columns")."""
    src = next(p for p in survey.paths if p.name.startswith("pfsObject"))
    dst = tmp_path / src.name
    with fits.open(src) as h:
        n = h["FLUX"].data.size
        from astropy.wcs import WCS

        wave_nm = WCS(h["FLUX"].header).sub(["spectral"]).pixel_to_world(np.arange(1.0, n + 1.0)).to_value("nm")
        for key in ("CTYPE1", "CUNIT1", "CRVAL1", "CRPIX1", "CDELT1"):
            h["FLUX"].header.remove(key, ignore_missing=True)
        h.insert(2, fits.ImageHDU(wave_nm, name="WAVELENGTH"))
        h.writeto(dst)
    _reads_like(survey, src, dst)


def test_pfs_calibrated_butler_names_get_per_visit_ids(tmp_path):
    """Only ``pfsCalibrated-<digits>`` names got the ``-v<visit>`` ids of single-visit spectra; a butler-style name
    read as a coadd and its rows collided with the coadd's as duplicate_id."""
    from catalogpred.surveys.pfs import _source_ids

    for name in ("pfsCalibrated-000123.fits", "pfsCalibrated-PFS-000123-abc.fits"):
        assert list(_source_ids(name, [1], [2], None)) == ["pfs-00001-0000000000000002-v000123"], name
    assert list(_source_ids("pfsCoadd-00001-00002.fits", [1], [2], None)) == ["pfs-00001-0000000000000002"]


def test_ragged_coadd_reads_per_spectrum_grids(tmp_path):
    ts = plan_pfs_targets(3, seed=8)
    path = write_pfs_coadd(tmp_path / "pfsCoadd-00001-00009.fits", ts, ragged=True, fluxtable=False)
    with fits.open(path) as h:
        assert isinstance(h["WAVELENGTH"], fits.BinTableHDU) and h["WAVELENGTH"].columns.formats[0].startswith("PD")
        lens = [len(v) for v in h["FLUX"].data["value"]]
        assert len(set(lens)) == 3
        w2 = h["WAVELENGTH"].data["value"][2] * 10.0
        f2 = h["FLUX"].data["value"][2].astype(float)
        m2 = h["MASK"].data["value"][2]
    blk = read_spectra(path)
    j = int(np.argmin(np.abs(DESI_GRID.wave - 7000.0)))
    k = j - OFFSET
    assert m2[k] == 0 or (m2[k] & bad_mask_bits(MASK_PLANES)) == 0
    assert blk.flux[2, j] == pytest.approx(fnu_njy_to_flam17(f2[k], w2[k]), rel=1e-5)


# ----------------------------------------------------------------------------------------------- redshifts, selection


def test_selection_reasons_and_redshifts_from_cozcandidates(survey):
    for path in [p for p in survey.paths if not p.name.startswith("pfsObject")]:
        blk = read_spectra(path)
        t = _truth(survey, path.name)
        assert list(blk.meta["source_id"]) == list(t.source_id)
        assert list(blk.reject_reason) == list(t.expected_reason)
        ok = (t.expected_reason == "") | (t.expected_reason == "not_galaxy")
        np.testing.assert_allclose(blk.meta["z"][ok], t.z[ok], rtol=1e-6)
        assert np.isnan(blk.meta["z"][(t.expected_reason == "no_redshift").to_numpy()]).all()
        np.testing.assert_array_equal(blk.meta["cat_id"], t.cat_id)
        np.testing.assert_array_equal(blk.meta["obj_id"], t.obj_id)
        np.testing.assert_array_equal(blk.meta["target_type"], t.target_type)
        np.testing.assert_array_equal(blk.meta["tract"], t.tract)
        assert list(blk.meta["patch"]) == list(t.patch)
        np.testing.assert_array_equal(blk.meta["ra"], t.ra)
        assert (blk.meta["n_visit"] >= 2).all() if path.name.startswith("pfsCoadd") else (blk.meta["n_visit"] == 1).all()
        for r, d in zip(blk.reject_reason, blk.reject_detail):
            assert bool(r) == bool(d)
    reasons = survey.truth.column("expected_reason").to_pylist()
    assert {"sky_fibre", "flux_standard", "no_redshift", "not_galaxy", ""} <= set(reasons)


def test_selection_can_keep_sky_fluxstd_and_any_class(coadd, survey):
    t = _truth(survey, coadd.name)
    sel = Selection(keep_sky=True, keep_fluxstd=True, spectypes=())
    blk = read_spectra(coadd, options=ReadOptions(selection=sel))
    sky = (t.target_type == 2).to_numpy()
    assert set(blk.reject_reason[sky]) == {RejectReason.NO_REDSHIFT.value}  # kept, but no galaxy redshift
    qso = (t.expected_reason == "not_galaxy").to_numpy()
    assert qso.any() and set(blk.reject_reason[qso]) == {""} and set(blk.meta["spectype"][qso]) == {"QSO"}
    detail = dict(zip(blk.meta["source_id"], blk.reject_detail))
    absent = t.source_id[t.expected_reason == "no_redshift"]
    assert all("pfsCoZCandidates-00001.fits" in detail[s] for s in absent)


def test_redshifts_from_user_tables(coadd, survey, tmp_path):
    t = _truth(survey, coadd.name)
    rng = np.random.default_rng(0)
    z_user = rng.uniform(0.05, 0.5, len(t))
    # camelCase CSV (as the datamodel spells the ids)
    csv = tmp_path / "z.csv"
    lines = ["catId,objId,z"] + [f"{c},{o},{float(z)!r}" for c, o, z in zip(t.cat_id, t.obj_id, z_user)]
    csv.write_text("\n".join(lines[:-1]) + "\n")  # the last target is left out
    blk = read_spectra(coadd, options=ReadOptions(redshifts=str(csv)))
    np.testing.assert_allclose(blk.meta["z"][:-1], z_user[:-1], rtol=1e-12)
    assert np.isnan(blk.meta["z"][-1])
    sci = (t.target_type == 1).to_numpy()
    if sci[-1]:
        assert blk.reject_reason[-1] == RejectReason.NO_REDSHIFT.value and "z.csv" in blk.reject_detail[-1]
    assert blk.reject_reason[sci][:-1].tolist().count("no_redshift") == 0  # absent/failed ones now have z
    # snake_case Parquet, with a targetId column that must not be taken for an id
    pqf = tmp_path / "z.parquet"
    pq.write_table(pa.table({"targetId": np.arange(len(t), dtype=np.int16), "cat_id": t.cat_id.to_numpy(),
                             "obj_id": t.obj_id.to_numpy(), "z": z_user, "z_err": np.full(len(t), 1e-4)}), pqf)
    blk = read_spectra(coadd, options=ReadOptions(redshifts=str(pqf)))
    np.testing.assert_allclose(blk.meta["z"], z_user, rtol=1e-12)
    np.testing.assert_allclose(blk.meta["z_err"], 1e-4)
    # the pfsCoZCandidates file itself as the table gives the same as the one found beside the spectra
    beside = read_spectra(coadd)
    given_ = read_spectra(coadd, options=ReadOptions(redshifts=str(survey.redshift_paths[0])))
    np.testing.assert_array_equal(beside.meta["z"], given_.meta["z"])
    # a DESI-keyed table (TARGETID) does not apply to PFS: the pfsCoZCandidates beside are used
    desi = tmp_path / "zpix.parquet"
    pq.write_table(pa.table({"TARGETID": np.arange(5, dtype=np.int64), "Z": np.full(5, 0.3)}), desi)
    other = read_spectra(coadd, options=ReadOptions(redshifts=str(desi)))
    np.testing.assert_array_equal(other.meta["z"], beside.meta["z"])


def test_no_redshift_file_means_no_redshift(tmp_path):
    ts = plan_pfs_targets(2, seed=4)
    path = write_pfs_coadd(tmp_path / "pfsCoadd-00001-00000.fits", ts, fluxtable=False)
    blk = read_spectra(path)
    assert set(blk.reject_reason) == {"no_redshift"}
    assert "no pfsCoZCandidates-00001.fits" in blk.reject_detail[0]
    write_pfs_cozcandidates(tmp_path, 1, ts)
    (tmp_path / "pfsCoZCandidates-00001.fits").rename(tmp_path / "pfsCoZcandidates-00001.fits")  # drp_1dpipe's spelling
    blk = read_spectra(path)
    assert set(blk.reject_reason) == {""}


# ----------------------------------------------------------------------------------------------- corrupt files


def test_corrupt_files_get_clear_reasons(survey):
    assert len(survey.bad) == 4
    for name, reason in survey.bad.items():
        path = survey.paths[0].parent / name
        with pytest.raises(InputFileError) as exc:
            read_spectra(path)
        assert exc.value.reason.value == reason, (name, str(exc.value))
        assert name in str(exc.value)
    assert set(survey.bad.values()) == {"missing_hdu", "inconsistent_file", "unreadable_file"}


def test_identify_and_count(survey, coadd):
    assert identify_survey(coadd, with_count=True) == ("pfs", len(_truth(survey, coadd.name)))
    obj = next(p for p in survey.paths if p.name.startswith("pfsObject"))
    assert identify_survey(obj, with_count=True) == ("pfs", 1)
    for name in survey.bad:
        if survey.bad[name] != "unreadable_file":
            assert identify_survey(survey.paths[0].parent / name) == "pfs"  # claimed, then rejected with a reason


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def pfs_bundle(desi_bundle):
    """A seeded (untrained) bundle on the DESI grid, which serves PFS (the shared conftest fixture)."""
    return desi_bundle


def test_end_to_end_ingest_and_predict(survey, client, pfs_bundle, tmp_path):
    from catalogpred import store
    from catalogpred.pipeline import run_ingest, run_predict

    inputs = survey.paths[0].parent
    st_path = str(tmp_path / "store.zarr")
    # 16-row shards: multi-object files are split across shards (and read in pieces)
    ing = run_ingest([str(inputs)], st_path, client=client, shard_rows=16, chunk_rows=8, progress=False)
    truth = survey.truth.to_pandas()
    assert ing.auxiliary_files == len(survey.redshift_paths)
    assert ing.files == len(survey.paths) + len(survey.bad)
    meta = store.read_meta(st_path, "pfs").to_pandas()
    # a corrupt file is quarantined as one row per piece it was planned in
    bad_rows = meta[meta.source_file.isin(list(survey.bad))]
    assert set(bad_rows.source_file) == set(survey.bad)
    assert all(r == survey.bad[f] for f, r in zip(bad_rows.source_file, bad_rows.reject_reason))
    n_inputs = len(truth) + len(bad_rows)
    assert ing.rows == n_inputs == len(meta) and ing.by_survey["pfs"]["rows"] == n_inputs
    assert ing.ok == int((truth.expected_reason == "").sum())
    expected = truth.expected_reason[truth.expected_reason != ""].value_counts().to_dict()
    for reason in bad_rows.reject_reason:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(ing.reasons) == expected
    good_rows = meta[~meta.source_file.isin(list(survey.bad))].set_index("source_id")
    assert sorted(good_rows.index) == sorted(truth.source_id)
    np.testing.assert_array_equal(good_rows.loc[truth.source_id, "row_in_file"].to_numpy(), truth.row_in_file)
    rej = meta[meta.status == store.RowStatus.REJECTED]
    assert (rej.reject_reason != "").all() and (rej.reject_detail != "").all()

    cat = tmp_path / "catalog"
    pred = run_predict(st_path, str(pfs_bundle), str(cat), client=client, progress=False)
    rows = pq.ParquetDataset(cat / "dataset").read().to_pandas()
    rejects = pq.read_table(cat / "rejects.parquet").to_pandas()
    assert len(rows) + len(rejects) == n_inputs == pred.inputs
    assert sorted(rows.source_id) == sorted(truth.source_id[truth.expected_reason == ""])
    assert {"cat_id", "obj_id", "tract", "patch", "target_type"} <= set(rows.columns)
    good = truth.set_index("source_id").loc[rows.source_id]
    np.testing.assert_array_equal(rows.obj_id.to_numpy(), good.obj_id.to_numpy())
    np.testing.assert_allclose(rows.z.to_numpy(), good.z.to_numpy(), rtol=1e-6)
    assert np.isfinite(rows[[f"w{i}_mag" for i in range(1, 5)]].to_numpy()).all()
    assert rejects.reason.value_counts().to_dict() == expected
    # drp_1d's galaxyZWarning (AIR_VACUUM_CONVERSION_IGNORED in the mock) is kept, not flagged as a bad redshift
    assert (rows["zwarning"] != 0).any() and not (rows["flags"] & 1).any()
    by_id = dict(zip(rejects.source_id, rejects.reason))
    for sid, reason in zip(truth.source_id, truth.expected_reason):
        if reason:
            assert by_id[sid] == reason


def test_single_visit_spectra_keep_their_visit_in_the_id(survey, tmp_path):
    """pfsCalibrated rows end in -v{visit}: from OBSERVATIONS, else from the file name; coadd ids stay plain."""
    calib = next(p for p in survey.paths if p.name.startswith("pfsCalibrated"))
    visit = int(re.match(r"pfsCalibrated-(\d+)", calib.name).group(1))
    blk = read_spectra(calib)
    assert all(s.endswith(f"-v{visit:06d}") for s in blk.meta["source_id"])
    assert list(blk.meta["source_id"]) == list(_truth(survey, calib.name).source_id)
    # the same target as coadd and single visit: two ids, one plain
    coadd_ids = {s for p in survey.paths if p.name.startswith("pfsCoadd") for s in read_spectra(p).meta["source_id"]}
    both = {s[: -len("-v000000")] for s in blk.meta["source_id"]} & coadd_ids
    assert len(both) == 2
    # OBSERVATIONS naming another visit wins over the file name; without OBSERVATIONS the file name gives it
    for other, drop in ((123456, False), (None, True)):
        out = tmp_path / f"{other}-{drop}" / calib.name
        out.parent.mkdir()
        with fits.open(calib) as h:
            if drop:
                del h["OBSERVATIONS"]
            else:
                h["OBSERVATIONS"].data["visit"][:] = other
            h.writeto(out)
        want = f"-v{other if other else visit:06d}"
        assert all(s.endswith(want) for s in read_spectra(out).meta["source_id"])
    renamed = tmp_path / "pfsCoadd-00009-00009.fits"  # the same file read as a coadd: plain ids
    renamed.write_bytes(calib.read_bytes())
    assert not any("-v" in s for s in read_spectra(renamed).meta["source_id"])
