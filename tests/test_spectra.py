"""Science helpers: grids, masks, normalisation, unit conversion (numpy path = CPU twin of the cupy path)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catalogpred.errors import RejectReason
from catalogpred.spectra import (DESI_GRID, SDSS_GRID, PixelMask, check_spectra, flam17_to_fnu_njy, fnu_njy_to_flam17,
                                 loglam_to_sdss_index, lower_median, normalisation, skyline_mask)


def test_sdss_grid_matches_spender():
    assert SDSS_GRID.n_pix == 3921
    assert SDSS_GRID.wave[0] == pytest.approx(10**3.578)
    assert SDSS_GRID.wave[-1] == pytest.approx(10 ** (3.578 + 3920e-4))
    assert DESI_GRID.wave[0] == 3600.0 and DESI_GRID.wave[-1] == pytest.approx(9824.0)


def test_loglam_index_is_integer_mapping():
    loglam = np.array([3.5780, 3.5781, 3.9700, 3.5779], dtype=np.float32)  # float32 as in the files
    assert loglam_to_sdss_index(loglam).tolist() == [0, 1, 3920, -1]


def test_lower_median_matches_torch_convention():
    import torch

    v = np.array([[4.0, 1.0, 3.0, 2.0, 9.0, 7.0]])
    good = np.array([[True, True, True, True, False, False]])
    med, n = lower_median(v, good)
    assert med[0] == 2.0 and n[0] == 4  # lower of 2 and 3, as torch.median
    assert med[0] == torch.median(torch.tensor([4.0, 1.0, 3.0, 2.0])).item()


def test_skyline_mask_covers_5577():
    wave = np.array([5578.0, 5579.0, 6000.0])  # [OI] 5577 Å (air) = 5578.9 Å vacuum
    m = skyline_mask(wave)
    assert m[0] and m[1] and not m[2]


def _flat_spectrum(level=3.0, z=0.1):
    n = SDSS_GRID.n_pix
    flux = np.full((1, n), level, np.float32)
    ivar = np.full((1, n), 4.0, np.float32)
    mask = np.zeros((1, n), np.uint8)
    return flux, ivar, mask, np.array([z])


@settings(max_examples=25, deadline=None)
@given(c=st.floats(0.01, 1e4))
def test_norm_scales_with_flux(c):
    rng = np.random.default_rng(0)
    flux = rng.normal(5, 1, (1, SDSS_GRID.n_pix)).astype(np.float32)
    w = np.ones_like(flux)
    n1, _ = normalisation(flux, w, SDSS_GRID.wave, np.array([0.1]))
    n2, _ = normalisation((flux * np.float32(c)).astype(np.float32), w, SDSS_GRID.wave, np.array([0.1]))
    assert n2[0] == pytest.approx(c * n1[0], rel=1e-5)


@settings(max_examples=25, deadline=None)
@given(f=st.floats(1e-3, 1e6), lam=st.floats(3000, 13000))
def test_fnu_flam_round_trip(f, lam):
    assert flam17_to_fnu_njy(fnu_njy_to_flam17(np.array(f), lam), lam) == pytest.approx(f, rel=1e-12)


def test_fnu_flam_known_value():
    # 3631 Jy (AB zero point) at 5500 Å: F_λ = c F_ν / λ² = 3.60e-9 erg/s/cm²/Å = 3.60e8 in 1e-17 units
    assert fnu_njy_to_flam17(np.array(3631e9), 5500.0) == pytest.approx(3.598e8, rel=1e-3)


def test_check_spectra_normalises_and_masks():
    flux, ivar, mask, z = _flat_spectrum(level=3.0)
    fn, iv, m, norm, reasons, _ = check_spectra(flux, ivar, mask, SDSS_GRID.wave, z)
    assert reasons == [None]
    assert norm[0] == pytest.approx(3.0)
    assert np.allclose(fn, 1.0) and np.allclose(iv, 4.0 * 9.0)
    assert (m[0] & PixelMask.SKYLINE).any()


@pytest.mark.parametrize("case, reason", [
    ("nan", RejectReason.NONFINITE_FLUX),
    ("nan_ivar", RejectReason.NONFINITE_FLUX),
    ("zero_ivar", RejectReason.NO_VALID_PIXELS),
    ("high_z", RejectReason.NORM_WINDOW_EMPTY),
    ("negative", RejectReason.BAD_NORM),
    ("bad_z", RejectReason.BAD_REDSHIFT),
])
def test_check_spectra_rejects(case, reason):
    flux, ivar, mask, z = _flat_spectrum()
    if case == "nan":
        flux[0, 100] = np.nan
    elif case == "nan_ivar":
        ivar[0, 100] = np.inf
    elif case == "zero_ivar":
        ivar[:] = 0
    elif case == "high_z":
        z = np.array([1.19])
    elif case == "negative":
        flux[:] = -1
    elif case == "bad_z":
        z = np.array([np.nan])
    *_, norm, reasons, details = check_spectra(flux, ivar, mask, SDSS_GRID.wave, z)
    assert reasons == [reason] and details[0]
    assert not np.isfinite(norm[0])


def test_nan_flux_without_weight_is_masked_not_rejected():
    """A NaN flux where ivar = 0 is a pipeline's "no data" pixel: masked NONFINITE, the spectrum kept with
    the same norm as without it; NaN where ivar > 0 is corruption (test_check_spectra_rejects)."""
    flux, ivar, mask, z = _flat_spectrum(level=3.0)
    flux[0, 100:110], ivar[0, 100:110] = np.nan, 0.0
    fn, iv, m, norm, reasons, _ = check_spectra(flux, ivar, mask, SDSS_GRID.wave, z)
    assert reasons == [None] and norm[0] == pytest.approx(3.0)
    assert (m[0, 100:110] & PixelMask.NONFINITE).all() and (fn[0, 100:110] == 0).all() and (iv[0, 100:110] == 0).all()
    assert np.isfinite(fn).all()
