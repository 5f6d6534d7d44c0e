"""Synthetic, format-faithful SDSS spectra with physically coupled WISE photometry.

The mock survey exists so that the whole pipeline (ingest → predict → catalog →
query) can run end to end without network access, and so that a model has
something real to learn: the optical spectrum and the W1–W4 magnitudes of each
mock galaxy come from the same physical parameters.

Files
-----
:func:`write_sdss_spec` writes one ``spec-PPPP-MMMMM-FFFF.fits`` file with the
layout of SDSS "lite" spectra (checked against the real files in
``shared/realdata/sdss``):

- HDU 0 ``PRIMARY``: header only (``PLATEID``, ``MJD``, ``FIBERID``, ``PLUG_RA``,
  ``PLUG_DEC``, ``BUNIT='1E-17 erg/cm^2/s/Ang'``, ``VACUUM=T``, ``COEFF0``,
  ``COEFF1=0.0001``, exposure keys, …).
- HDU 1 ``COADD``: one row per pixel, columns exactly
  ``flux(E) loglam(E) ivar(E) and_mask(J) or_mask(J) wdisp(E) sky(E) model(E)``.
  ``loglam = k/1e4`` for integer ``k`` (the global SDSS 1e-4 dex grid), vacuum
  wavelengths; flux, sky and model in 1e-17 erg s⁻¹ cm⁻² Å⁻¹; ``wdisp`` in pixels.
- HDU 2 ``SPECOBJ`` (legacy flavour; ``SPECOBJID`` is a 22-character string,
  right-justified like the real files) or ``SPALL`` (BOSS flavour, ``SPECOBJID``
  int64), one row.

Legacy spectra cover ≈3800–9200 Å (the header ``COEFF0`` is the plate's start,
the table starts 1–46 pixels later, as in real legacy files); BOSS spectra
cover ≈3600–10400 Å. Every primary header also carries
``ORIGIN = 'catalogpred.mock'`` so a mock file can never pass for SDSS data.

Physics
-------
Each galaxy has a redshift, stellar mass, young-light fraction (``sf_frac``),
specific star-formation rate, AGN fraction and dust attenuation. The optical
spectrum is old + young stellar continuum (4000 Å break, Ca H&K, G band, Mg b,
Na D, Balmer absorption) + nebular emission (Hα, Hβ, [OII], [OIII], [NII],
[SII], …) scaled with the SFR + an AGN (power law, high-ionisation narrow lines,
broad Balmer lines when dominant), attenuated by a Calzetti law, redshifted,
dimmed by the luminosity distance (flat ΛCDM, H0 = 70, Ωm = 0.3) and multiplied
by a fibre-aperture fraction. The WISE magnitudes (AllWISE-like, Vega) follow:
W1 from stellar mass and distance, W1−W2 from the AGN fraction, W2−W3 from the
specific SFR, W3−W4 from SFR and dust.

Nothing here is SDSS or WISE data, and the numbers are only roughly calibrated
(median fibre flux of a few 1e-17, EW(Hα) of tens of Å for star-forming
galaxies, W2−W3 ≈ 1 for passive and 3–4.5 for star-forming galaxies).
"""
from __future__ import annotations

import functools
import math
import os
import pathlib
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import RejectReason

__all__ = [
    "MockObject",
    "MockSurvey",
    "plan_sdss_survey",
    "write_sdss_spec",
    "photometry_table",
    "write_sdss_survey",
    "render_sdss_spec",
    "spec_filename",
    "PHOTOMETRY_FILENAME",
    "ANDMASK_BITS",
]

#: file name of the photometry table written by :func:`write_sdss_survey`.
PHOTOMETRY_FILENAME = "allwise_photometry.parquet"

#: SPPIXMASK bits used by the mock (bit numbers as in the SDSS datamodel).
ANDMASK_BITS = {
    "NEARBADPIXEL": 16,
    "LOWFLAT": 17,
    "FULLREJECT": 18,
    "SCATTEREDLIGHT": 20,
    "BRIGHTSKY": 23,
    "NODATA": 24,
    "COMBINEREJ": 25,
    "BADSKYCHI": 27,
}

_C_KMS = 299792.458
_LN10 = math.log(10.0)
_H0 = 70.0
_OMEGA_M = 0.3
_MPC_CM = 3.0856775814913673e24
#: L_λ(5500 Å) per solar mass of an old (M/L_V ≈ 3) population, erg s⁻¹ Å⁻¹.
_ELL_OLD = 1.77e29
#: Hα luminosity per unit SFR (erg s⁻¹ per M☉ yr⁻¹); Kennicutt-like, boosted
#: ×2 so that star-forming mock galaxies have SDSS-like EW(Hα) inside the fibre.
_HALPHA_PER_SFR = 2.5e41
#: absolute W1 magnitude of the Sun (Vega).
_MSUN_W1 = 3.24
#: AllWISE-like 5σ depths used by the error model (Vega mag); deeper than
#: AllWISE in W3/W4 so that passive galaxies keep finite, modest errors.
_M5 = np.array([17.4, 16.3, 13.2, 9.9])
_SIG_FLOOR = np.array([0.015, 0.018, 0.03, 0.06])
_SIG_MAX = 1.0
#: colours of a pure AGN (torus) SED, Vega: W1−W2, W2−W3, W3−W4.
_AGN_C12, _AGN_C23, _AGN_C34 = 1.15, 2.8, 2.6

_FLAVOURS = ("legacy", "boss")
_FIBERS_PER_PLATE = {"legacy": 640, "boss": 1000}
_TARGET_PER_PLATE = {"legacy": 600, "boss": 900}
_RUN2D = {"legacy": "26", "boss": "v5_11_0"}
_RUN2D_CODE = {"legacy": 26, "boss": 1100}  # (N-5)*10000 + M*100 + P for vN_M_P
_PLATE_RANGE = {"legacy": (266, 2974), "boss": (3586, 7565)}
_MJD_RANGE = {"legacy": (51578, 54663), "boss": (55171, 57500)}
_PLATE_RADIUS_DEG = 1.49


# ----------------------------------------------------------------------------
# planned objects


@dataclass(frozen=True)
class MockObject:
    """One planned mock spectrum: everything needed to write its file deterministically.

    Parameters
    ----------
    plate, mjd, fiberid : int
        SDSS identifiers (plate 4 digits, MJD 5 digits, fibre 1..640 legacy / 1..1000 BOSS).
    ra, dec : float
        Fibre position (``PLUG_RA``, ``PLUG_DEC``), degrees ICRS/J2000.
    plate_ra, plate_dec : float
        Plate centre, degrees.
    tile : int
        Tile number written to the headers.
    z : float
        Redshift (the value written as ``Z``; also the true redshift).
    log_mstar : float
        log10 stellar mass, M☉.
    sf_frac : float
        Fraction of the intrinsic rest-frame 5500 Å stellar continuum from the young
        (star-forming) population, 0..0.85.
    log_ssfr : float
        log10 specific star-formation rate, yr⁻¹.
    agn_frac : float
        Fraction of the W1 (rest ≈3 µm) flux from the AGN, 0..0.95; the optical AGN
        continuum and narrow/broad lines scale with it.
    av : float
        V-band attenuation of the stars, mag (Calzetti law; gas gets ``av/0.44``).
    vdisp : float
        Stellar velocity dispersion, km/s.
    fiber_frac : float
        Fraction of the galaxy's optical light inside the 3″ fibre (W1 is total).
    w1_true, w2_true, w3_true, w4_true : float
        Noise-free WISE magnitudes (Vega) consistent with the parameters above.
    noise_scale : float
        Plate-level variance multiplier (observing conditions), ≈0.6–1.7.
    sky_scale : float
        Plate-level sky brightness multiplier.
    coeff0_k : int
        Global log-λ pixel index of the plate's ``COEFF0`` (``COEFF0 = coeff0_k/1e4``).
    start_k, end_k : int
        Global pixel index of the first and last COADD row (inclusive).
    seed : int
        Seed of every random draw made while writing the file (noise, masks).
    flavour : str
        ``"legacy"`` (HDU ``SPECOBJ``, RUN2D 26) or ``"boss"`` (HDU ``SPALL``, RUN2D v5_11_0).
    defect : str
        ``""`` for a good file; otherwise the kind of deliberately bad file to write:
        ``"truncated"``, ``"random_bytes"``, ``"nonfinite_flux"``, ``"no_valid_pixels"``,
        ``"missing_hdu"`` (no SPECOBJ/SPALL HDU) or ``"norm_window_empty"`` (planned at z≈1.2).
    """

    plate: int
    mjd: int
    fiberid: int
    ra: float
    dec: float
    plate_ra: float
    plate_dec: float
    tile: int
    z: float
    log_mstar: float
    sf_frac: float
    log_ssfr: float
    agn_frac: float
    av: float
    vdisp: float
    fiber_frac: float
    w1_true: float
    w2_true: float
    w3_true: float
    w4_true: float
    noise_scale: float
    sky_scale: float
    coeff0_k: int
    start_k: int
    end_k: int
    seed: int
    flavour: str = "legacy"
    defect: str = ""

    @property
    def run2d(self) -> str:
        """SDSS ``RUN2D`` of this flavour (``'26'`` legacy, ``'v5_11_0'`` BOSS)."""
        return _RUN2D[self.flavour]

    @property
    def specobjid_int(self) -> int:
        """SDSS (DR8+) ``SPECOBJID`` bit-packing of plate, fibre, MJD and RUN2D, as an int."""
        return (
            (self.plate << 50)
            | (self.fiberid << 38)
            | ((self.mjd - 50000) << 24)
            | (_RUN2D_CODE[self.flavour] << 10)
        )

    @property
    def specobjid(self) -> str:
        """``SPECOBJID`` as a decimal string without padding (e.g. ``'299518814033307648'``)."""
        return str(self.specobjid_int)

    @property
    def filename(self) -> str:
        """``spec-PPPP-MMMMM-FFFF.fits``."""
        return spec_filename(self.plate, self.mjd, self.fiberid)


@dataclass
class MockSurvey:
    """What :func:`write_sdss_survey` wrote.

    Attributes
    ----------
    paths : list of pathlib.Path
        The good spec files, in the order of ``objects``.
    photometry_path : pathlib.Path
        The AllWISE-like photometry table (Parquet) of the good objects.
    objects : list of MockObject
        The planned good objects (one per path).
    bad : dict of str to str
        File name (relative to the output folder) of each deliberately bad file →
        the :class:`~catalogpred.errors.RejectReason` value a reader should give it.
    """

    paths: list[pathlib.Path]
    photometry_path: pathlib.Path
    objects: list[MockObject]
    bad: dict[str, str] = field(default_factory=dict)


def spec_filename(plate: int, mjd: int, fiberid: int) -> str:
    """SDSS spec file name, zero-padded as SDSS does: ``spec-0266-51602-0013.fits``."""
    return f"spec-{plate:04d}-{mjd:05d}-{fiberid:04d}.fits"


# ----------------------------------------------------------------------------
# cosmology and population


@functools.lru_cache(maxsize=1)
def _dl_table() -> tuple[np.ndarray, np.ndarray]:
    zg = np.linspace(0.0, 3.0, 6001)
    ez = np.sqrt(_OMEGA_M * (1 + zg) ** 3 + (1 - _OMEGA_M))
    inv = 1.0 / ez
    dc = np.concatenate([[0.0], np.cumsum(0.5 * (inv[1:] + inv[:-1]) * np.diff(zg))]) * (_C_KMS / _H0)
    return zg, (1 + zg) * dc


def luminosity_distance_mpc(z) -> np.ndarray:
    """Luminosity distance (Mpc) in flat ΛCDM (H0 = 70 km/s/Mpc, Ωm = 0.3), 0 ≤ z ≤ 3."""
    zg, dl = _dl_table()
    return np.interp(np.asarray(z, dtype=np.float64), zg, dl)


def _ir_mags(z, log_mstar, sf_frac, log_ssfr, agn_frac, av, scatter) -> np.ndarray:
    """True W1..W4 (Vega) [n, 4] from the physical parameters; ``scatter`` [n, 4] ~ N(0, 1)."""
    z = np.asarray(z, dtype=np.float64)
    mu = 5.0 * np.log10(luminosity_distance_mpc(z) * 1e5)  # 10 pc units
    ups_w1 = 0.9 - 0.5 * sf_frac  # M/L at 3.4 µm, solar units
    m_w1_abs = _MSUN_W1 - 2.5 * (log_mstar - np.log10(ups_w1))
    w1_host = m_w1_abs + mu - 1.0 * z + 0.04 * scatter[:, 0]
    s = np.clip((log_ssfr + 11.8) / 1.9, 0.0, 1.0)
    c12_h = -0.05 + 0.35 * z + 0.12 * sf_frac + 0.03 * scatter[:, 1]
    c23_h = 0.9 + 3.3 * s + 0.15 * av + 0.15 * scatter[:, 2]
    c34_h = 2.05 + 0.5 * s + 0.2 * av + 0.12 * scatter[:, 3]
    f = np.clip(agn_frac, 0.0, 0.95)
    # mix host and AGN fluxes band by band (flux ratios in Vega units)
    r12 = (1 - f) * 10 ** (0.4 * c12_h) + f * 10 ** (0.4 * _AGN_C12)
    c12 = 2.5 * np.log10(r12)
    f2 = f * 10 ** (0.4 * _AGN_C12) / r12
    r23 = (1 - f2) * 10 ** (0.4 * c23_h) + f2 * 10 ** (0.4 * _AGN_C23)
    c23 = 2.5 * np.log10(r23)
    f3 = f2 * 10 ** (0.4 * _AGN_C23) / r23
    c34 = 2.5 * np.log10((1 - f3) * 10 ** (0.4 * c34_h) + f3 * 10 ** (0.4 * _AGN_C34))
    w1 = w1_host + 2.5 * np.log10(1 - f)  # AGN adds W1 flux
    w2 = w1 - c12
    w3 = w2 - c23
    w4 = w3 - c34
    return np.stack([w1, w2, w3, w4], axis=1)


def _wise_sigma(mags: np.ndarray) -> np.ndarray:
    """AllWISE-like profile-fit errors (mag) [n, 4] for true magnitudes [n, 4]."""
    noise = 1.0857 / 5.0 * 10 ** (0.4 * (mags - _M5[None, :]))
    return np.minimum(np.sqrt(_SIG_FLOOR[None, :] ** 2 + noise**2), _SIG_MAX)


def _draw_population(rng: np.random.Generator, n: int, z_fixed: float | None = None) -> dict[str, np.ndarray]:
    """Draw n galaxies' physical parameters (vectorised)."""
    # redshift: SDSS main-sample-like bulk + a few per cent LRG-like tail
    zgrid = np.linspace(0.02, 0.35, 661)
    pz = zgrid**2 * np.exp(-((zgrid / 0.085) ** 1.5))
    cdf = np.cumsum(pz)
    cdf /= cdf[-1]
    z = np.interp(rng.random(n), cdf, zgrid)
    tail = rng.random(n) < 0.04
    z = np.where(tail, rng.uniform(0.35, 0.6, n), z)
    if z_fixed is not None:
        z = np.full(n, float(z_fixed))
        tail = np.zeros(n, dtype=bool)
    # stellar mass: flux-limited selection -> mass floor rising with z
    logm_lim = 10.35 + 1.3 * np.log10(np.clip(z, 0.01, None) / 0.1)
    log_mstar = logm_lim + rng.exponential(0.35, n) - 0.2 + rng.normal(0, 0.1, n)
    log_mstar = np.where(tail, rng.normal(11.45, 0.2, n), log_mstar)
    log_mstar = np.clip(log_mstar, 8.5, 12.2)
    # star-forming vs passive: probability falls with mass
    p_sf = 1.0 / (1.0 + np.exp((log_mstar - 10.55) / 0.3))
    p_sf = np.where(tail, 0.05, p_sf)
    is_sf = rng.random(n) < p_sf
    sf_frac = np.where(is_sf, rng.beta(5, 3, n) * 0.85, rng.beta(1.2, 14, n))
    sf_frac = np.clip(sf_frac, 0.0, 0.85)
    log_ssfr = -12.3 + 3.4 * sf_frac + rng.normal(0, 0.15, n)
    # AGN: most galaxies ~0, some obscured/LINER-like, a few dominant
    u = rng.random(n)
    agn_frac = np.where(
        u < 0.80,
        rng.beta(1, 40, n),
        np.where(u < 0.95, rng.uniform(0.08, 0.5, n), rng.uniform(0.55, 0.95, n)),
    )
    av = 0.1 + sf_frac * (0.5 + 0.5 * (log_mstar - 10.0)) + rng.normal(0, 0.12, n)
    av = np.clip(av, 0.0, 2.5)
    vdisp = 10 ** (2.2 + 0.28 * (log_mstar - 11.0) - 0.1 * sf_frac + rng.normal(0, 0.05, n))
    fiber_frac = 0.3 * np.sqrt(np.clip(z, 0.005, None) / 0.1) * 10 ** (-0.15 * (log_mstar - 10.6))
    fiber_frac = np.clip(fiber_frac * np.exp(rng.normal(0, 0.15, n)), 0.08, 0.9)
    mags = _ir_mags(z, log_mstar, sf_frac, log_ssfr, agn_frac, av, rng.normal(0, 1, (n, 4)))
    return dict(
        z=z, log_mstar=log_mstar, sf_frac=sf_frac, log_ssfr=log_ssfr, agn_frac=agn_frac,
        av=av, vdisp=vdisp, fiber_frac=fiber_frac, mags=mags,
    )


def _angsep_deg(ra1, dec1, ra2, dec2):
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    c = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(r1 - r2)
    return np.degrees(np.arccos(np.clip(c, -1, 1)))


def _plate_centres(rng: np.random.Generator, n: int, avoid: list[tuple[float, float]] = ()) -> list[tuple[float, float]]:
    """n field centres over RA 0–360, Dec −10..+70 (uniform on the sphere), ≥ 4° apart."""
    out: list[tuple[float, float]] = list(avoid)
    lo, hi = np.sin(np.radians(-10.0)), np.sin(np.radians(70.0))
    min_sep, tries = 4.0, 0
    while len(out) < len(avoid) + n:
        ra = float(rng.uniform(0.0, 360.0))
        dec = float(np.degrees(np.arcsin(rng.uniform(lo, hi))))
        tries += 1
        if tries > 200 * (n + 10):  # crowded sky (hundreds of plates): let fields overlap more
            min_sep, tries = min_sep / 2.0, 0
        if all(_angsep_deg(ra, dec, r, d) >= min_sep for r, d in out):
            out.append((round(ra, 6), round(dec, 6)))
    return out[len(avoid):]


def _plates_for(n: int, flavour: str, n_plates: int | None) -> int:
    if n == 0:
        return 0
    cap = _FIBERS_PER_PLATE[flavour]
    if n_plates is None:
        n_plates = max(math.ceil(n / _TARGET_PER_PLATE[flavour]), min(3, n))
    if n_plates < 1 or n_plates * cap < n:
        raise ValueError(
            f"{n} {flavour} spectra do not fit on {n_plates} plates of {cap} fibres; "
            f"pass n_plates >= {math.ceil(n / cap)} or leave it None"
        )
    return n_plates


def _coverage(rng: np.random.Generator, flavour: str, coeff0_k: int) -> tuple[int, int]:
    if flavour == "legacy":
        start = coeff0_k + int(rng.integers(1, 47))
        end = int(rng.integers(39625, 39646)) - int(rng.integers(0, 30))
    else:
        start = coeff0_k  # BOSS: the table starts at COEFF0
        end = int(rng.integers(40130, 40171)) - int(rng.integers(0, 25))
    return start, end


def _build_objects(
    rng: np.random.Generator,
    counts_per_plate: list[tuple[str, int]],
    seeds: Iterable[int],
    used_plates: set[int],
    z_fixed: float | None = None,
    defects: list[str] | None = None,
    avoid_centres: list[tuple[float, float]] = (),
) -> list[MockObject]:
    """Lay plates out, draw populations and make the MockObjects."""
    n_total = sum(c for _, c in counts_per_plate)
    pop = _draw_population(rng, n_total, z_fixed=z_fixed)
    centres = _plate_centres(rng, len(counts_per_plate), avoid=list(avoid_centres))
    seeds = iter(seeds)
    # plate numbers and MJDs: unique, increasing together within a flavour
    plate_ids = [0] * len(counts_per_plate)
    mjds = [0] * len(counts_per_plate)
    for flavour in _FLAVOURS:
        idx = [i for i, (f, _) in enumerate(counts_per_plate) if f == flavour]
        if not idx:
            continue
        lo, hi = _PLATE_RANGE[flavour]
        pool = np.array(sorted(set(range(lo, hi + 1)) - used_plates))
        plates = np.sort(rng.choice(pool, size=len(idx), replace=False))
        m = np.sort(rng.integers(*_MJD_RANGE[flavour], size=len(idx)))
        for j, i in enumerate(idx):
            plate_ids[i] = int(plates[j])
            mjds[i] = int(m[j])
        used_plates.update(int(p) for p in plates)
    objs: list[MockObject] = []
    k = 0
    for p, (flavour, count) in enumerate(counts_per_plate):
        pra, pdec = centres[p]
        tile = int(rng.integers(100, 2000)) if flavour == "legacy" else int(rng.integers(10000, 11500))
        noise_scale = float(np.exp(rng.normal(0.0, 0.2)))
        sky_scale = float(rng.uniform(0.8, 1.5))
        coeff0_k = int(rng.integers(35780, 35801)) if flavour == "legacy" else int(rng.integers(35510, 35571))
        fibers = np.sort(rng.choice(np.arange(1, _FIBERS_PER_PLATE[flavour] + 1), size=count, replace=False))
        r = _PLATE_RADIUS_DEG * np.sqrt(rng.random(count))
        th = rng.uniform(0, 2 * np.pi, count)
        dec = np.clip(pdec + r * np.sin(th), -89.9, 89.9)
        ra = np.mod(pra + r * np.cos(th) / np.cos(np.radians(dec)), 360.0)
        for j in range(count):
            start_k, end_k = _coverage(rng, flavour, coeff0_k)
            mags = pop["mags"][k]
            objs.append(
                MockObject(
                    plate=plate_ids[p], mjd=mjds[p], fiberid=int(fibers[j]),
                    ra=round(float(ra[j]), 8), dec=round(float(dec[j]), 8),
                    plate_ra=pra, plate_dec=pdec, tile=tile,
                    z=round(float(pop["z"][k]), 6),
                    log_mstar=round(float(pop["log_mstar"][k]), 4),
                    sf_frac=round(float(pop["sf_frac"][k]), 4),
                    log_ssfr=round(float(pop["log_ssfr"][k]), 4),
                    agn_frac=round(float(pop["agn_frac"][k]), 4),
                    av=round(float(pop["av"][k]), 4),
                    vdisp=round(float(pop["vdisp"][k]), 2),
                    fiber_frac=round(float(pop["fiber_frac"][k]), 4),
                    w1_true=round(float(mags[0]), 4), w2_true=round(float(mags[1]), 4),
                    w3_true=round(float(mags[2]), 4), w4_true=round(float(mags[3]), 4),
                    noise_scale=round(noise_scale, 4), sky_scale=round(sky_scale, 4),
                    coeff0_k=coeff0_k, start_k=start_k, end_k=end_k,
                    seed=int(next(seeds)), flavour=flavour,
                    defect=defects[k] if defects else "",
                )
            )
            k += 1
    return objs


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _object_seeds(seed: int, n: int, stream: int) -> list[int]:
    ss = np.random.SeedSequence([int(seed), stream])
    return [int(s.generate_state(1, dtype=np.uint64)[0] >> 1) for s in ss.spawn(n)]


def plan_sdss_survey(
    n_spectra: int,
    seed: int = 42,
    n_plates: int | None = None,
    boss_fraction: float = 0.0,
) -> list[MockObject]:
    """Plan a mock SDSS survey: plates, fibres, positions and galaxy parameters.

    Cheap (no spectra are computed) and deterministic: the same arguments give an
    identical list.

    Parameters
    ----------
    n_spectra : int
        Number of spectra (≥ 0).
    seed : int
        Seed of the plan and of every file written from it.
    n_plates : int, optional
        Number of plates (3° fields). Default: enough for ≈600 legacy / ≈900 BOSS
        spectra per plate, at least 3 (or n_spectra when smaller). With both
        flavours, the plates are shared out in proportion (at least one each).
    boss_fraction : float
        Fraction of spectra on BOSS plates (``SPALL`` HDU, 3600–10400 Å, fibres 1..1000).

    Returns
    -------
    list of MockObject
        Ordered by flavour, plate, then fibre; (plate, mjd, fiberid) is unique.
    """
    if n_spectra < 0:
        raise ValueError(f"n_spectra must be >= 0, got {n_spectra}")
    if not 0.0 <= boss_fraction <= 1.0:
        raise ValueError(f"boss_fraction must be in [0, 1], got {boss_fraction}")
    n_boss = int(round(boss_fraction * n_spectra))
    n_leg = n_spectra - n_boss
    if n_plates is None:
        p_leg, p_boss = _plates_for(n_leg, "legacy", None), _plates_for(n_boss, "boss", None)
    else:
        if n_plates < (n_leg > 0) + (n_boss > 0):
            raise ValueError(f"n_plates={n_plates} is too few for the requested flavours")
        if n_boss == 0:
            p_leg, p_boss = n_plates, 0
        elif n_leg == 0:
            p_leg, p_boss = 0, n_plates
        else:
            p_boss = min(max(1, int(round(n_plates * n_boss / n_spectra))), n_plates - 1)
            p_leg = n_plates - p_boss
        p_leg, p_boss = _plates_for(n_leg, "legacy", p_leg), _plates_for(n_boss, "boss", p_boss)
    counts = [("legacy", c) for c in _split(n_leg, p_leg)] if p_leg else []
    counts += [("boss", c) for c in _split(n_boss, p_boss)] if p_boss else []
    counts = [(f, c) for f, c in counts if c > 0]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0]))
    return _build_objects(rng, counts, _object_seeds(seed, n_spectra, 1), used_plates=set())


# ----------------------------------------------------------------------------
# spectra

# vacuum rest wavelengths (Å)
#: stellar absorption: (λ, depth, intrinsic σ Å) for the old population
_ABS_OLD = np.array([
    (3835.4, 0.05, 5.0), (3890.2, 0.06, 5.0), (3934.78, 0.45, 7.0), (3969.59, 0.40, 7.0),
    (4102.89, 0.08, 6.0), (4227.9, 0.10, 5.0), (4305.6, 0.18, 16.0), (4341.69, 0.07, 6.0),
    (4384.0, 0.05, 6.0), (4862.68, 0.07, 6.0), (5176.7, 0.16, 13.0), (5270.0, 0.07, 9.0),
    (5335.0, 0.05, 9.0), (5895.6, 0.11, 7.0), (6564.61, 0.05, 7.0), (8500.36, 0.06, 5.0),
    (8544.44, 0.08, 5.0), (8664.52, 0.07, 5.0),
])
#: Balmer-strong absorption of the young (A-star dominated) population
_ABS_YOUNG = np.array([
    (3798.98, 0.12, 10.0), (3836.47, 0.15, 11.0), (3890.15, 0.18, 12.0), (3934.78, 0.08, 6.0),
    (3971.2, 0.20, 12.0), (4102.89, 0.20, 13.0), (4341.69, 0.18, 13.0), (4862.68, 0.13, 12.0),
    (6564.61, 0.07, 12.0),
])
#: (λ, SF strength key, AGN-narrow strength relative to [OIII]5007)
_EMISSION = [
    # name, λvac, sf ratio function key, agn ratio (× L[OIII]5007)
    ("OII3727", 3727.09, "o2a", 0.16),
    ("OII3730", 3729.88, "o2b", 0.19),
    ("NeIII3870", 3869.86, "ne3", 0.10),
    ("Hepsilon", 3971.20, "he", 0.016),
    ("Hdelta", 4102.89, "hd", 0.026),
    ("Hgamma", 4341.69, "hg", 0.047),
    ("HeII4687", 4687.02, None, 0.02),
    ("Hbeta", 4862.68, "hb", 0.125),
    ("OIII4960", 4960.30, "o3b", 0.336),
    ("OIII5008", 5008.24, "o3a", 1.0),
    ("HeI5877", 5877.25, "he1", 0.012),
    ("OI6302", 6302.05, "o1", 0.08),
    ("NII6550", 6549.86, "n2b", 0.127),
    ("Halpha", 6564.61, "ha", 0.39),
    ("NII6585", 6585.27, "n2a", 0.39),
    ("SII6718", 6718.29, "s2a", 0.13),
    ("SII6733", 6732.67, "s2b", 0.11),
]
_BROAD = [(2799.12, 0.35, 2200.0), (4341.69, 0.13, 1900.0), (4862.68, 0.30, 1900.0), (6564.61, 1.0, 1700.0)]

#: bright night-sky lines (vacuum Å, peak in 1e-17 erg/s/cm²/Å for sky_scale = 1)
_SKY_LINES = np.array([
    (4359.6, 12.0), (5462.3, 15.0), (5578.89, 180.0), (5891.58, 45.0), (5897.56, 28.0),
    (6302.05, 70.0), (6365.54, 22.0), (6865.0, 25.0), (6925.0, 22.0), (7278.41, 39.0),
    (7342.91, 34.0), (7526.07, 41.0), (7573.83, 31.0), (7600.53, 32.0), (7752.77, 55.0),
    (7796.26, 40.0), (7823.65, 48.0), (7855.52, 37.0), (7862.82, 31.0), (7872.90, 38.0),
    (7915.88, 100.0), (7923.30, 36.0), (7966.84, 74.0), (7995.53, 81.0), (8028.02, 56.0),
    (8283.96, 38.0), (8290.88, 70.0), (8301.18, 82.0), (8346.90, 206.0), (8355.16, 77.0),
    (8384.69, 45.0), (8401.48, 151.0), (8417.54, 59.0), (8432.49, 167.0), (8454.57, 48.0),
    (8467.68, 119.0), (8507.18, 62.0), (8763.72, 62.0), (8770.32, 109.0), (8778.62, 44.0),
    (8780.74, 123.0), (8793.60, 43.0), (8829.52, 303.0), (8838.86, 116.0), (8852.25, 42.0),
    (8870.02, 65.0), (8888.29, 220.0), (8905.56, 86.0), (8922.08, 248.0), (8945.85, 73.0),
    (8960.54, 181.0), (8990.83, 44.0), (9003.82, 99.0), (9052.02, 42.0), (9309.92, 90.0),
    (9315.90, 149.0), (9326.29, 162.0), (9378.53, 388.0), (9389.28, 152.0), (9442.24, 280.0),
    (9479.45, 323.0), (9521.97, 244.0), (9569.96, 139.0), (9702.00, 191.0), (9722.50, 245.0),
    (9793.80, 661.0), (9802.36, 229.0), (9874.84, 490.0), (9917.39, 506.0), (9964.66, 325.0),
    (10015.56, 502.0), (10085.23, 358.0), (10126.78, 423.0), (10174.49, 330.0), (10192.50, 572.0),
    (10213.85, 707.0), (10289.46, 1000.0), (10298.85, 656.0), (10375.72, 1000.0),
])
_K_LO, _K_HI = 35500, 40200  # global pixel range of the cached sky/throughput templates


def _calzetti_k(lam_aa: np.ndarray) -> np.ndarray:
    """Calzetti (2000) k(λ) for rest λ in Å (extrapolated linearly beyond 2.2 µm/below 0.12 µm)."""
    x = np.clip(lam_aa, 1200.0, 22000.0) / 1e4
    blue = 2.659 * (-2.156 + 1.509 / x - 0.198 / x**2 + 0.011 / x**3) + 4.05
    red = 2.659 * (-1.857 + 1.040 / x) + 4.05
    return np.where(x < 0.63, blue, red)


def _bb_norm(lam: np.ndarray, t_k: float) -> np.ndarray:
    """Planck B_λ(T) normalised to 1 at 5500 Å."""
    c2 = 1.438777e8  # hc/k in Å K
    f = lam ** -5.0 / np.expm1(c2 / (lam * t_k))
    return f / (5500.0 ** -5.0 / math.expm1(c2 / (5500.0 * t_k)))


def _add_gaussians(out: np.ndarray, x: np.ndarray, centres, sigmas, amps, nsig: float = 6.0) -> None:
    """out += Σ amps·exp(−½((x−c)/σ)²), evaluated only within ±nsig·σ (x sorted)."""
    centres = np.asarray(centres, dtype=np.float64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    amps = np.asarray(amps, dtype=np.float64)
    lo = np.searchsorted(x, centres - nsig * sigmas)
    hi = np.searchsorted(x, centres + nsig * sigmas)
    for c, s, a, i, j in zip(centres, sigmas, amps, lo, hi):
        if j > i and a != 0.0:
            d = (x[i:j] - c) / s
            out[i:j] += a * np.exp(-0.5 * d * d)


@functools.lru_cache(maxsize=4)
def _sky_templates(flavour: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sky continuum, sky lines, variance throughput factor) on global pixels _K_LO.._K_HI."""
    k = np.arange(_K_LO, _K_HI + 1)
    lam = 10.0 ** (k / 1e4)
    cont = 3.8 + 2.2 * (lam - 3800.0) / 5400.0 + 1.5 * np.exp(-0.5 * ((lam - 5900.0) / 700.0) ** 2)
    lines = np.zeros_like(lam)
    # sky lines are unresolved: σ ≈ 1 pixel; work in pixel units
    _add_gaussians(lines, k.astype(np.float64), np.log10(_SKY_LINES[:, 0]) * 1e4,
                   np.full(len(_SKY_LINES), 1.0), _SKY_LINES[:, 1])
    blue_edge, red_edge = (3800.0, 9200.0) if flavour == "legacy" else (3600.0, 10300.0)
    thru = (
        1.0
        + 3.0 * np.exp(-(lam - blue_edge) / 220.0)
        + 1.5 * np.exp((lam - red_edge) / 350.0)
        + 0.5 * np.exp(-0.5 * ((lam - 5950.0) / 60.0) ** 2)
    )
    return cont, lines, thru


def _rest_model(obj: MockObject, lam_obs: np.ndarray, wdisp: np.ndarray) -> np.ndarray:
    """Noise-free observed F_λ (1e-17 erg/s/cm²/Å) of the galaxy at observed vacuum λ (Å)."""
    z = obj.z
    lr = lam_obs / (1.0 + z)
    dl_cm = float(luminosity_distance_mpc(z)) * _MPC_CM
    # erg/s/Å at rest 5500 -> observed 1e-17 units: × fibre / (4π d² (1+z)) / 1e-17
    to_obs = obj.fiber_frac / (4.0 * math.pi * dl_cm**2 * (1.0 + z)) / 1e-17
    mstar = 10.0 ** obj.log_mstar
    fy = obj.sf_frac
    l5500_host = mstar * _ELL_OLD / (1.0 - fy)
    sig_v = obj.vdisp
    inst_rest = wdisp * (lr * _LN10 * 1e-4)  # instrumental σ in rest Å, per pixel

    def absorption(table):
        a = np.zeros_like(lr)
        lam_c, depth, sig_i = table[:, 0], table[:, 1], table[:, 2]
        sig_t = np.sqrt(sig_i**2 + (lam_c * sig_v / _C_KMS) ** 2 + (1.3 * lam_c * _LN10 * 1e-4) ** 2)
        _add_gaussians(a, lr, lam_c, sig_t, depth * sig_i / sig_t)
        return np.clip(1.0 - a, 0.05, None)

    brk_old = 1.0 - 0.5 / (1.0 + np.exp((lr - 3990.0) / 18.0))
    old = _bb_norm(lr, 4300.0) * brk_old * absorption(_ABS_OLD)
    brk_young = 1.0 - 0.15 / (1.0 + np.exp((lr - 3760.0) / 40.0))
    young = (lr / 5500.0) ** -1.6 * brk_young * absorption(_ABS_YOUNG)
    ebv_s = obj.av / 4.05
    ebv_g = ebv_s / 0.44
    kl = _calzetti_k(lr)
    att_s = 10.0 ** (-0.4 * ebv_s * kl)
    stars = l5500_host * ((1.0 - fy) * old + fy * young) * att_s

    # AGN continuum: significant only when the AGN dominates
    fa = obj.agn_frac
    type1 = fa > 0.6
    fa_opt = fa**2 * (0.8 if type1 else 0.15)
    l5500_agn = l5500_host * fa_opt / (1.0 - fa_opt)
    agn = l5500_agn * (lr / 5500.0) ** -1.6 * att_s

    # emission lines (luminosities, erg/s)
    sfr = 10.0 ** (obj.log_ssfr) * mstar
    l_ha = _HALPHA_PER_SFR * sfr
    lm = obj.log_mstar
    l_hb = l_ha / 2.86
    o3 = float(np.clip(10 ** (0.6 - 0.5 * (lm - 9.0)), 0.15, 5.0))
    n2 = float(np.clip(0.12 + 0.25 * (lm - 9.0), 0.1, 0.55))
    o2 = float(np.clip(3.5 - 0.8 * (lm - 9.0), 1.2, 4.0))
    sf = {
        "ha": l_ha, "hb": l_hb, "hg": 0.468 * l_hb, "hd": 0.259 * l_hb, "he": 0.159 * l_hb,
        "o3a": o3 * l_hb, "o3b": o3 * l_hb / 2.98, "ne3": 0.08 * o3 * l_hb,
        "n2a": n2 * l_ha, "n2b": n2 * l_ha / 3.05, "o2a": 0.45 * o2 * l_hb, "o2b": 0.55 * o2 * l_hb,
        "s2a": 0.17 * l_ha, "s2b": 0.13 * l_ha, "o1": 0.03 * l_ha, "he1": 0.1 * l_hb,
    }
    l_o3_agn = 80.0 * fa * l5500_host
    sig_sf = 60.0 + 0.3 * sig_v
    centres, sig_kms, lums = [], [], []
    for _name, lam0, key, agn_ratio in _EMISSION:
        if key is not None:
            centres.append(lam0); sig_kms.append(sig_sf); lums.append(sf[key])
        if agn_ratio > 0 and l_o3_agn > 0:
            centres.append(lam0); sig_kms.append(220.0); lums.append(agn_ratio * l_o3_agn)
    if type1:
        for lam0, rel, s in _BROAD:
            centres.append(lam0); sig_kms.append(s); lums.append(rel * 350.0 * l5500_agn)
    centres = np.asarray(centres)
    lums = np.asarray(lums) * 10.0 ** (-0.4 * ebv_g * _calzetti_k(centres))
    inst_c = np.interp(centres, lr, inst_rest)
    sig_aa = np.sqrt((centres * np.asarray(sig_kms) / _C_KMS) ** 2 + inst_c**2)
    lines = np.zeros_like(lr)
    # L per rest Å: the (1+z) stretch is in to_obs
    _add_gaussians(lines, lr, centres, sig_aa, lums / (math.sqrt(2.0 * math.pi) * sig_aa))
    return (stars + agn + lines) * to_obs


def _subclass(obj: MockObject) -> str:
    if obj.agn_frac > 0.6:
        return "AGN BROADLINE"
    if obj.agn_frac > 0.25:
        return "AGN"
    if obj.log_ssfr > -9.9:
        return "STARBURST"
    if obj.log_ssfr > -10.8:
        return "STARFORMING"
    return ""


def render_sdss_spec(obj: MockObject) -> dict[str, Any]:
    """Compute one mock spectrum in memory (what :func:`write_sdss_spec` writes).

    Parameters
    ----------
    obj : MockObject

    Returns
    -------
    dict
        ``"coadd"``: numpy structured array [n_pix] with the COADD columns (``flux``,
        ``ivar``, ``sky``, ``model`` in 1e-17 erg/s/cm²/Å and its inverse square;
        ``loglam`` log10 Å vacuum; ``and_mask``/``or_mask`` int32 SPPIXMASK bits;
        ``wdisp`` pixels). ``"specobj"``: structured array [1] for the ``SPECOBJ``/``SPALL``
        HDU. ``"primary"``: list of FITS header cards (dicts with name, value, comment).
        ``"hdu2"``: the name of the second HDU.
    """
    rng = np.random.default_rng(np.random.SeedSequence([obj.seed, 11]))
    k = np.arange(obj.start_k, obj.end_k + 1)
    n = k.size
    loglam = k / 1e4
    lam = 10.0**loglam
    # wavelength dispersion (pixels): broader in the blue, as in real legacy/BOSS files
    wb, wr = rng.uniform(1.1, 1.35), rng.uniform(0.8, 1.0)
    t = (loglam - loglam[0]) / max(loglam[-1] - loglam[0], 1e-9)
    wdisp = wb + (wr - wb) * t**0.8 + rng.normal(0, 0.003, n)

    model = _rest_model(obj, lam, wdisp)
    cont_t, lines_t, thru_t = _sky_templates(obj.flavour)
    sl = slice(obj.start_k - _K_LO, obj.end_k - _K_LO + 1)
    sky_cont = cont_t[sl] * obj.sky_scale
    sky_lines = lines_t[sl] * obj.sky_scale
    sky = sky_cont + sky_lines
    thru = thru_t[sl]
    var = obj.noise_scale * (0.03 * (np.clip(model, 0, None) + sky) * thru + 0.1 * thru**2)
    flux = model + np.sqrt(var) * rng.standard_normal(n) + 0.015 * sky_lines * rng.standard_normal(n)
    ivar = 1.0 / var

    and_mask = np.zeros(n, dtype=np.int32)
    bright = sky_lines > 2.5 * sky_cont + 15.0
    and_mask[bright] |= 1 << ANDMASK_BITS["BRIGHTSKY"]
    or_mask = and_mask.copy()
    near = np.zeros(n, dtype=bool)
    near[:-1] |= bright[1:]
    near[1:] |= bright[:-1]
    or_mask[near & ~bright & (rng.random(n) < 0.5)] |= 1 << ANDMASK_BITS["BRIGHTSKY"]
    for bit, frac in (("NEARBADPIXEL", 0.004), ("SCATTEREDLIGHT", 0.002), ("COMBINEREJ", 0.01), ("BADSKYCHI", 0.002)):
        or_mask[rng.random(n) < frac] |= 1 << ANDMASK_BITS[bit]
    # a bad-column-like run flagged NEARBADPIXEL (ivar kept, noise inflated)
    if rng.random() < 0.15:
        length = int(rng.integers(40, 300))
        i0 = int(rng.integers(0, max(n - length, 1)))
        and_mask[i0:i0 + length] |= 1 << ANDMASK_BITS["NEARBADPIXEL"]
        or_mask[i0:i0 + length] |= 1 << ANDMASK_BITS["NEARBADPIXEL"]
        ivar[i0:i0 + length] *= 0.6
    # ivar = 0 runs (NODATA / FULLREJECT), flux interpolated across as the pipeline does
    dead = np.zeros(n, dtype=bool)
    for _ in range(int(rng.poisson(0.7))):
        length = int(rng.integers(1, 16))
        i0 = int(rng.integers(1, max(n - length - 1, 2)))
        dead[i0:i0 + length] = True
    if rng.random() < 0.08:
        dead[: int(rng.integers(1, 6))] = True
    if rng.random() < 0.08:
        dead[n - int(rng.integers(1, 6)):] = True
    if dead.any():
        bits = np.where(rng.random(n) < 0.8, 1 << ANDMASK_BITS["NODATA"], 1 << ANDMASK_BITS["FULLREJECT"]).astype(np.int32)
        and_mask[dead] |= bits[dead]
        or_mask[dead] |= bits[dead]
        ivar[dead] = 0.0
        good = ~dead
        flux[dead] = np.interp(np.flatnonzero(dead), np.flatnonzero(good), flux[good])
    or_mask |= and_mask

    zwarning = 0
    defect = obj.defect
    if defect == "nonfinite_flux":
        i0 = int(rng.integers(n // 4, n // 2))
        flux[i0:i0 + 5] = np.nan
        flux[i0 + 40] = np.inf
    elif defect == "no_valid_pixels":
        flux[:] = 0.0
        ivar[:] = 0.0
        and_mask[:] = 1 << ANDMASK_BITS["NODATA"]
        or_mask[:] = and_mask
        zwarning = (1 << 9) | (1 << 1)  # NODATA | LITTLE_COVERAGE

    coadd = np.empty(n, dtype=[
        ("flux", ">f4"), ("loglam", ">f4"), ("ivar", ">f4"), ("and_mask", ">i4"),
        ("or_mask", ">i4"), ("wdisp", ">f4"), ("sky", ">f4"), ("model", ">f4"),
    ])
    coadd["flux"] = flux
    coadd["loglam"] = loglam
    coadd["ivar"] = ivar
    coadd["and_mask"] = and_mask
    coadd["or_mask"] = or_mask
    coadd["wdisp"] = wdisp
    coadd["sky"] = sky
    coadd["model"] = model

    with np.errstate(invalid="ignore"):
        gpix = (ivar > 0) & np.isfinite(flux)
        snr = flux[gpix] * np.sqrt(ivar[gpix])
    sn_all = float(np.median(snr)) if snr.size else 0.0
    if sn_all < 2.0 and zwarning == 0 and rng.random() < 0.5:
        zwarning = 1 << 2  # SMALL_DELTA_CHI2
    bands = ((3000, 4000), (4000, 5500), (5500, 6900), (6900, 8400), (8400, 11000))
    sn_med = np.zeros(5, dtype=np.float32)
    spflux = np.zeros(5, dtype=np.float32)
    skyflux = np.zeros(5, dtype=np.float32)
    for b, (lo, hi) in enumerate(bands):
        inb = (lam >= lo) & (lam < hi)
        g = inb & gpix
        if g.any():
            sn_med[b] = np.median(flux[g] * np.sqrt(ivar[g]))
            # mean F_ν in the band -> nanomaggies (3631 Jy = 1e9 nmgy)
            fnu_jy = 3.33564095e4 * lam[g] ** 2 * flux[g] * 1e-17
            spflux[b] = np.mean(fnu_jy) / 3631.0 * 1e9
        if inb.any():
            skyflux[b] = np.mean(3.33564095e4 * lam[inb] ** 2 * sky[inb] * 1e-17) / 3631.0 * 1e9
    wave_good = lam[gpix] if gpix.any() else lam[:1]
    z_err = float(np.clip(3e-5 / max(sn_all, 0.5) * 10 + rng.normal(0, 2e-6), 5e-6, 5e-4))
    specobj = _specobj_row(obj, dict(
        z_err=z_err, zwarning=zwarning, sn_all=sn_all, sn_med=sn_med, spflux=spflux, skyflux=skyflux,
        wavemin=float(wave_good.min()), wavemax=float(wave_good.max()), wcoverage=float(gpix.sum() * 1e-4),
        anyand=int(np.bitwise_or.reduce(and_mask)), anyor=int(np.bitwise_or.reduce(or_mask)),
        rchi2=float(rng.normal(1.05, 0.05)), dof=int(gpix.sum()) - 10, vdisp_err=float(abs(rng.normal(8, 3)) + 3),
        objid=int(1237650000000000000 + rng.integers(0, 10**13)),
    ))
    primary = _primary_cards(obj, rng, fbadpix=float(1.0 - gpix.mean()) if n else 1.0)
    return {
        "coadd": coadd,
        "specobj": specobj,
        "primary": primary,
        "hdu2": "SPECOBJ" if obj.flavour == "legacy" else "SPALL",
    }


def _specobj_row(obj: MockObject, m: dict[str, Any]) -> np.ndarray:
    subclass = _subclass(obj)
    plateid = (obj.plate << 50) | ((obj.mjd - 50000) << 24) | (_RUN2D_CODE[obj.flavour] << 10)
    common_tail = [
        ("PLATE", ">i4", obj.plate), ("TILE", ">i4", obj.tile), ("MJD", ">i4", obj.mjd),
        ("FIBERID", ">i4", obj.fiberid),
    ]
    phys = [
        ("PLUG_RA", ">f8", obj.ra), ("PLUG_DEC", ">f8", obj.dec),
        ("CLASS", "S6", "GALAXY"), ("SUBCLASS", "S21", subclass),
        ("Z", ">f4", obj.z), ("Z_ERR", ">f4", m["z_err"]), ("RCHI2", ">f4", m["rchi2"]),
        ("DOF", ">i4", m["dof"]), ("RCHI2DIFF", ">f4", 0.05 + 0.01 * m["sn_all"]),
        ("VDISP", ">f4", obj.vdisp), ("VDISP_ERR", ">f4", m["vdisp_err"]),
        ("WAVEMIN", ">f4", m["wavemin"]), ("WAVEMAX", ">f4", m["wavemax"]),
        ("WCOVERAGE", ">f4", m["wcoverage"]), ("ZWARNING", ">i4", m["zwarning"]),
    ]
    sn = [("SN_MEDIAN_ALL", ">f4", m["sn_all"]), ("SN_MEDIAN", (">f4", (5,)), m["sn_med"])]
    if obj.flavour == "boss":
        sn = sn[::-1]  # BOSS spAll order: SN_MEDIAN then SN_MEDIAN_ALL
    tail = [
        ("SPECTROFLUX", (">f4", (5,)), m["spflux"]), ("SPECTROSKYFLUX", (">f4", (5,)), m["skyflux"]),
        ("ANYANDMASK", ">i4", m["anyand"]), ("ANYORMASK", ">i4", m["anyor"]),
        ("Z_NOQSO", ">f4", obj.z), ("Z_ERR_NOQSO", ">f4", m["z_err"]), ("ZWARNING_NOQSO", ">i4", m["zwarning"]),
    ]
    if obj.flavour == "legacy":
        cols = [
            ("SURVEY", "S6", "sdss"), ("INSTRUMENT", "S4", "SDSS"), ("CHUNK", "S16", f"chunk{obj.tile % 90 + 1}"),
            ("PROGRAMNAME", "S23", "legacy"), ("PLATERUN", "S16", f"chunk{obj.tile % 90 + 1}"),
            ("PLATEQUALITY", "S8", "good"), ("PLATESN2", ">f4", 20.0 / obj.noise_scale),
            ("SPECPRIMARY", "u1", 1), ("SPECLEGACY", "u1", 1),
            ("SPECOBJID", "S22", f"{obj.specobjid_int:>22d}"),
            ("BESTOBJID", "S19", str(m["objid"])), ("TARGETOBJID", "S22", f"{m['objid'] % 10**15:>22d}"),
            ("PLATEID", "S19", str(plateid)), ("NSPECOBS", ">i2", 1),
            ("RUN2D", "S3", obj.run2d), ("RUN1D", "S1", ""),
            ("PRIMTARGET", ">i4", 64), ("SECTARGET", ">i4", 0),
        ] + common_tail + phys + sn + tail
    else:
        cols = [
            ("PROGRAMNAME", "S27", "boss"), ("CHUNK", "S14", f"boss{obj.tile % 20 + 1}"),
            ("PLATEQUALITY", "S4", "good"), ("PLATESN2", ">f4", 20.0 / obj.noise_scale),
            ("PRIMTARGET", ">i4", 0), ("SECTARGET", ">i4", 0),
            ("BOSS_TARGET1", ">i8", 1), ("SPECPRIMARY", "u1", 1), ("SPECBOSS", "u1", 1),
            ("NSPECOBS", ">i2", 1),
        ] + common_tail + [("RUN2D", "S7", obj.run2d), ("RUN1D", "S7", obj.run2d), ("OBJTYPE", "S16", "GALAXY")] + phys + sn + tail + [
            ("SPECOBJID", ">i8", obj.specobjid_int), ("OBJID", "S19", str(m["objid"])),
            ("RA", ">f8", obj.ra), ("DEC", ">f8", obj.dec), ("THING_ID", ">i4", int(m["objid"] % 2**31)),
        ]
    dt = [(name, fmt) if isinstance(fmt, str) else (name,) + fmt for name, fmt, _ in cols]
    row = np.zeros(1, dtype=dt)
    for name, _fmt, val in cols:
        row[name][0] = val
    return row


def _primary_cards(obj: MockObject, rng: np.random.Generator, fbadpix: float) -> list[dict[str, Any]]:
    legacy = obj.flavour == "legacy"
    tai = obj.mjd * 86400.0 + float(rng.uniform(3.0, 10.0)) * 3600.0
    secs = tai % 86400.0
    taihms = f"{int(secs // 3600):02d}:{int(secs % 3600 // 60):02d}:{secs % 60:05.2f}"
    nexp = int(rng.integers(3, 5)) if legacy else int(rng.integers(4, 8))
    exptime = round(900.0 * nexp * float(rng.uniform(0.95, 1.05)), 2)
    sn2 = 20.0 / obj.noise_scale
    expbase = int(2000 + (obj.mjd - 51578) * 3) if legacy else int(110000 + (obj.mjd - 55171) * 40)
    cards: list[tuple[str, Any, str]] = [
        ("TAI", round(tai, 2), "1st row - Number of seconds since Nov 17 1858"),
        ("RA", round(obj.plate_ra, 5), "1st row - Right ascension of telescope boresight"),
        ("DEC", round(obj.plate_dec, 6), "1st row - Declination of telescope boresight"),
        ("EQUINOX", 2000.0, ""),
        ("RADECSYS", "FK5", ""),
        ("TAIHMS", taihms, "1st row - TAI time (HH:MM:SS.SS)"),
        ("TIMESYS", "tai", "TAI, not UTC"),
        ("MJD", obj.mjd, "MJD of observation"),
        ("MJDLIST", str(obj.mjd), ""),
        ("TELESCOP", "SDSS 2.5-M", "Sloan Digital Sky Survey"),
        ("BESTEXP", expbase, ""),
        ("NEXP_B1", nexp, "b1 camera number of exposures"),
        ("NEXP_R1", nexp, "r1 camera number of exposures"),
        ("EXPT_B1", exptime, "b1 camera exposure time (seconds)"),
        ("EXPT_R1", exptime, "r1 camera exposure time (seconds)"),
        ("EXPTIME", exptime, "Minimum of exposure times for all cameras"),
        ("FLAVOR", "science", "Flavor of this sequence (e.g., dome flat, etc.)"),
        ("QUALITY", "excellent", "night/image quality"),
        ("RADEG", round(obj.plate_ra, 6), "Right Ascension. (degrees)"),
        ("DECDEG", round(obj.plate_dec, 6), "Declination. (degrees)"),
        ("PLATEID", obj.plate, "Plate Id"),
        ("TILEID", obj.tile, "Tile Id"),
        ("CARTID", obj.plate % 9 + 1 if legacy else obj.plate % 16 + 1, "Cartridge used in this plugging"),
        ("MAPID", (obj.mjd % 100000) * 100 + 1, "Map Id"),
        ("NAME", f"{obj.plate:04d}-{obj.mjd - 3:05d}-01", "Name of target; PlateId-MJD-Mapper ReRun"),
        ("VERS2D", "v5_3_12" if legacy else "v5_11_0", "Version of idlspec2d for 2D reduction"),
        ("VERSCOMB", "v5_3_12" if legacy else "v5_11_0", "Version of idlspec2d for combining multiple spec"),
    ]
    if not legacy:
        cards.append(("RUN2D", obj.run2d, "Spectroscopic 2D reduction (extraction) name"))
    cards += [
        ("HELIO_RV", round(float(rng.uniform(-30, 30)), 8), "Heliocentric correction (added to velocities)"),
        ("VACUUM", True, "Wavelengths are in vacuum"),
        ("SKYCHI2", round(float(rng.uniform(1.0, 1.3)), 8), "Mean chi^2 of sky-subtraction"),
        ("SPEC1_G", round(sn2 * 1.2, 4), "(S/N)^2 for spec  1 at mag 20.20"),
        ("SPEC1_R", round(sn2, 4), "(S/N)^2 for spec  1 at mag 20.25"),
        ("SPEC1_I", round(sn2 * 0.8, 4), "(S/N)^2 for spec  1 at mag 19.90"),
        ("SPEC2_G", round(sn2 * 1.1, 4), "(S/N)^2 for spec  2 at mag 20.20"),
        ("SPEC2_R", round(sn2 * 0.95, 4), "(S/N)^2 for spec  2 at mag 20.25"),
        ("SPEC2_I", round(sn2 * 0.75, 4), "(S/N)^2 for spec  2 at mag 19.90"),
        ("NWORDER", 2, "Linear-log10 coefficients"),
        ("WFITTYPE", "LOG-LINEAR", "Linear-log10 dispersion"),
        ("COEFF0", round(obj.coeff0_k / 1e4, 4), "Central wavelength (log10) of first pixel"),
        ("COEFF1", 0.0001, "Log10 dispersion per pixel"),
        ("FBADPIX", round(fbadpix, 7), "Fraction of bad pixels"),
        ("WAT0_001", "system=linear", ""),
        ("WAT1_001", "wtype=linear label=Wavelength units=Angstroms", ""),
        ("DC-FLAG", 1, "Log-linear flag"),
        ("BUNIT", "1E-17 erg/cm^2/s/Ang", ""),
        ("PLUG_RA", obj.ra, "RA of object [deg]"),
        ("PLUG_DEC", obj.dec, "dec of object [deg]"),
    ]
    if legacy:
        cards.append(("SPEC_ID", f"{obj.specobjid_int:>22d}", "Unique object identifier"))
    cards += [
        ("FIBERID", obj.fiberid, "Fiber number (1-640)" if legacy else "Fiber number (1-1000)"),
        ("NEXP", 2 * nexp, "Number of individual exposures"),
    ]
    for cam in ("b1", "r1"):
        for e in range(nexp):
            i = len([c for c in cards if c[0].startswith("EXPID")]) + 1
            key = f"EXPID{i:02d}" if legacy else f"EXPID{i:03d}"
            cards.append((key, f"{cam}-{expbase + e:08d}-{expbase + nexp:08d}-{expbase + nexp + 1:08d}", ""))
    cards.append(("ORIGIN", "catalogpred.mock", "SYNTHETIC spectrum, not SDSS data"))
    out = []
    for name, value, comment in cards:
        d: dict[str, Any] = {"name": name, "value": value}
        if comment:
            d["comment"] = comment
        out.append(d)
    return out


def _write_fits(path: pathlib.Path, rendered: dict[str, Any], with_hdu2: bool = True) -> None:
    import fitsio

    tmp = path.with_name(path.name + ".part")
    with fitsio.FITS(str(tmp), "rw", clobber=True) as f:
        f.write(None, header=rendered["primary"])
        f.write(rendered["coadd"], extname="COADD")
        f[-1].write_comment("Coadded spectrum")
        if with_hdu2:
            f.write(rendered["specobj"], extname=rendered["hdu2"])
            f[-1].write_comment("Metadata from specObj row" if rendered["hdu2"] == "SPECOBJ" else "Metadata from spAll row")
    os.replace(tmp, path)


_DEFECTS = frozenset({"", "truncated", "random_bytes", "nonfinite_flux", "no_valid_pixels", "missing_hdu",
                      "norm_window_empty"})


def write_sdss_spec(obj: MockObject, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write one mock ``spec-PPPP-MMMMM-FFFF.fits`` file.

    Deterministic given ``obj`` (identical bytes for identical objects), and a pure
    module-level function, so it can run in a worker process
    (``ProcessPoolExecutor.map``, ``dask``). The file is written under a temporary
    name and renamed, so a reader never sees a half-written good file.

    Parameters
    ----------
    obj : MockObject
        The planned spectrum; ``obj.defect`` selects a deliberately bad file.
    out_dir : str or os.PathLike
        Existing or new folder; the file goes directly inside it.

    Returns
    -------
    pathlib.Path
        Path of the written file.
    """
    if obj.defect not in _DEFECTS:
        raise ValueError(f"unknown MockObject.defect {obj.defect!r}; expected one of {sorted(_DEFECTS)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / obj.filename
    if obj.defect == "random_bytes":
        rng = np.random.default_rng(np.random.SeedSequence([obj.seed, 13]))
        data = rng.integers(0, 256, size=int(rng.integers(30_000, 150_000)), dtype=np.uint8).tobytes()
        path.write_bytes(b"\x00GARBAGE" + data)  # never starts with 'SIMPLE'
        return path
    rendered = render_sdss_spec(obj)
    _write_fits(path, rendered, with_hdu2=obj.defect != "missing_hdu")
    if obj.defect == "truncated":
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(int(size * 0.55) + 17)  # mid-COADD data, not on a 2880-byte block
    return path


# ----------------------------------------------------------------------------
# photometry


_PHOT_FIELDS: list[tuple[str, pa.DataType, str, str]] = [
    ("plate", pa.int32(), "", "SDSS plate number"),
    ("mjd", pa.int32(), "d", "MJD of the spectroscopic observation"),
    ("fiberid", pa.int32(), "", "SDSS fibre number"),
    ("specobjid", pa.string(), "", "SDSS SPECOBJID as a decimal string (no padding)"),
    ("ra", pa.float64(), "deg", "Right ascension (fibre position), ICRS"),
    ("dec", pa.float64(), "deg", "Declination (fibre position), ICRS"),
    ("w1mpro", pa.float64(), "mag", "W1 (3.4 um) profile-fit magnitude, Vega (mock AllWISE)"),
    ("w2mpro", pa.float64(), "mag", "W2 (4.6 um) profile-fit magnitude, Vega (mock AllWISE)"),
    ("w3mpro", pa.float64(), "mag", "W3 (12 um) profile-fit magnitude, Vega (mock AllWISE)"),
    ("w4mpro", pa.float64(), "mag", "W4 (22 um) profile-fit magnitude, Vega (mock AllWISE)"),
    ("w1sigmpro", pa.float64(), "mag", "1-sigma uncertainty of w1mpro"),
    ("w2sigmpro", pa.float64(), "mag", "1-sigma uncertainty of w2mpro"),
    ("w3sigmpro", pa.float64(), "mag", "1-sigma uncertainty of w3mpro"),
    ("w4sigmpro", pa.float64(), "mag", "1-sigma uncertainty of w4mpro"),
    ("z", pa.float64(), "", "Redshift (true; the value written as Z in the spec file)"),
    ("truth_log_mstar", pa.float64(), "dex(Msun)", "log10 stellar mass"),
    ("truth_sf_frac", pa.float64(), "", "young-population fraction of the rest 5500 A stellar continuum"),
    ("truth_log_ssfr", pa.float64(), "dex(1/yr)", "log10 specific star-formation rate"),
    ("truth_agn_frac", pa.float64(), "", "AGN fraction of the W1 flux"),
    ("truth_av", pa.float64(), "mag", "stellar V-band attenuation (Calzetti)"),
    ("truth_vdisp", pa.float64(), "km/s", "stellar velocity dispersion"),
    ("truth_fiber_frac", pa.float64(), "", "fraction of optical light inside the fibre"),
    ("truth_w1", pa.float64(), "mag", "noise-free W1, Vega"),
    ("truth_w2", pa.float64(), "mag", "noise-free W2, Vega"),
    ("truth_w3", pa.float64(), "mag", "noise-free W3, Vega"),
    ("truth_w4", pa.float64(), "mag", "noise-free W4, Vega"),
]


def photometry_table(objs: list[MockObject]) -> pa.Table:
    """AllWISE-like observed photometry matched to the mock spectra.

    Observed magnitudes are the true ones plus Gaussian noise with heteroscedastic,
    magnitude-dependent errors (W1 ≈ 0.02–0.05 mag, W4 ≈ 0.2–0.5 mag for typical
    galaxies, capped at 1 mag). The noise of each object depends only on its seed.

    Parameters
    ----------
    objs : list of MockObject

    Returns
    -------
    pyarrow.Table
        One row per object: ``plate, mjd, fiberid`` (int32), ``specobjid`` (string),
        ``ra, dec`` (deg), ``w1mpro..w4mpro`` (Vega mag, float64), ``w1sigmpro..w4sigmpro``
        (mag), ``z`` and ``truth_*`` physical parameters. Every field has
        ``b"unit"`` and ``b"description"`` metadata.
    """
    n = len(objs)
    true = np.array([[o.w1_true, o.w2_true, o.w3_true, o.w4_true] for o in objs], dtype=np.float64).reshape(n, 4)
    sig = _wise_sigma(true) if n else np.zeros((0, 4))
    eps = np.array(
        [np.random.default_rng(np.random.SeedSequence([o.seed, 7])).standard_normal(4) for o in objs]
    ).reshape(n, 4)
    obs = true + sig * eps
    sig = np.round(sig, 3)
    obs = np.round(obs, 3)
    cols: dict[str, Any] = {
        "plate": [o.plate for o in objs], "mjd": [o.mjd for o in objs], "fiberid": [o.fiberid for o in objs],
        "specobjid": [o.specobjid for o in objs], "ra": [o.ra for o in objs], "dec": [o.dec for o in objs],
    }
    for b in range(4):
        cols[f"w{b + 1}mpro"] = obs[:, b]
    for b in range(4):
        cols[f"w{b + 1}sigmpro"] = sig[:, b]
    cols["z"] = [o.z for o in objs]
    for name in ("log_mstar", "sf_frac", "log_ssfr", "agn_frac", "av", "vdisp", "fiber_frac"):
        cols[f"truth_{name}"] = [getattr(o, name) for o in objs]
    for b in range(4):
        cols[f"truth_w{b + 1}"] = true[:, b]
    fields = [
        pa.field(name, typ, metadata={b"unit": unit.encode(), b"description": desc.encode()})
        for name, typ, unit, desc in _PHOT_FIELDS
    ]
    schema = pa.schema(fields, metadata={
        b"description": b"Mock AllWISE photometry matched to catalogpred.mock SDSS spectra (synthetic)",
        b"photometric_system": b"Vega",
    })
    arrays = [pa.array(np.asarray(cols[f.name]) if f.type != pa.string() else cols[f.name], type=f.type)
              for f in fields]
    return pa.Table.from_arrays(arrays, schema=schema)


# ----------------------------------------------------------------------------
# survey


_BAD_KINDS: list[tuple[str, str]] = [
    ("truncated", RejectReason.UNREADABLE_FILE.value),
    ("random_bytes", RejectReason.UNREADABLE_FILE.value),
    ("nonfinite_flux", RejectReason.NONFINITE_FLUX.value),
    ("no_valid_pixels", RejectReason.NO_VALID_PIXELS.value),
    ("norm_window_empty", RejectReason.NORM_WINDOW_EMPTY.value),
    ("missing_hdu", RejectReason.MISSING_HDU.value),
    ("duplicate", RejectReason.DUPLICATE_ID.value),
]


def _plan_bad(objs: list[MockObject], n_bad: int, seed: int) -> tuple[list[MockObject], list[tuple[MockObject, str]]]:
    """Bad objects to write (own plate, never clashing with good ids) and duplicates to copy."""
    kinds = [_BAD_KINDS[i % len(_BAD_KINDS)][0] for i in range(n_bad)]
    dups = [k for k in kinds if k == "duplicate"]
    others = [k for k in kinds if k != "duplicate"]
    bad_objs: list[MockObject] = []
    if others:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
        used = {o.plate for o in objs}
        seeds = _object_seeds(seed, len(others), 3)
        # one legacy "bad" plate (or more if > 600 bad files); the z≈1.2 ones get z fixed later
        counts = [("legacy", c) for c in _split(len(others), math.ceil(len(others) / 600))]
        centres = sorted({(o.plate_ra, o.plate_dec) for o in objs})
        planned = _build_objects(rng, counts, seeds, used, defects=others, avoid_centres=centres)
        hz = _draw_population(np.random.default_rng(np.random.SeedSequence([int(seed), 4])), len(planned), z_fixed=1.2)
        for i, o in enumerate(planned):
            if o.defect == "norm_window_empty":
                o = _replace_physics(o, hz, i)
            bad_objs.append(o)
    dup_pairs: list[tuple[MockObject, str]] = []
    for j in range(len(dups)):
        if not objs:
            break
        src = objs[(j * 37) % len(objs)] if len(objs) % 37 else objs[j % len(objs)]
        name = spec_filename(src.plate, src.mjd + 1 + j // len(objs), src.fiberid)
        dup_pairs.append((src, name))
    return bad_objs, dup_pairs


def _replace_physics(o: MockObject, pop: dict[str, np.ndarray], i: int) -> MockObject:
    from dataclasses import replace

    m = pop["mags"][i]
    return replace(
        o, z=float(pop["z"][i]), log_mstar=round(float(pop["log_mstar"][i]), 4),
        sf_frac=round(float(pop["sf_frac"][i]), 4), log_ssfr=round(float(pop["log_ssfr"][i]), 4),
        agn_frac=round(float(pop["agn_frac"][i]), 4), av=round(float(pop["av"][i]), 4),
        vdisp=round(float(pop["vdisp"][i]), 2), fiber_frac=round(float(pop["fiber_frac"][i]), 4),
        w1_true=round(float(m[0]), 4), w2_true=round(float(m[1]), 4),
        w3_true=round(float(m[2]), 4), w4_true=round(float(m[3]), 4),
    )


_BATCH = 25


def _write_batch(objs: list[MockObject], out_dir: str) -> list[str]:
    """Write several spec files (one task of :func:`write_sdss_survey`); returns their paths."""
    return [str(write_sdss_spec(o, out_dir)) for o in objs]


def write_sdss_survey(
    out_dir: str | os.PathLike,
    n_spectra: int,
    seed: int = 42,
    mapper: Callable[..., Iterable[Any]] = map,
    n_bad: int = 0,
    *,
    n_plates: int | None = None,
    boss_fraction: float = 0.0,
) -> MockSurvey:
    """Plan and write a whole mock SDSS survey plus its matched photometry.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output folder (created). Spec files go directly inside it; the photometry
        goes to ``<out_dir>/allwise_photometry.parquet``.
    n_spectra : int
        Number of good spectra.
    seed : int
        Seed of the plan (see :func:`plan_sdss_survey`).
    mapper : callable
        ``mapper(fn, iterable)`` that runs ``fn`` on every item and returns an iterable
        of the results, e.g. builtin ``map`` (default), ``ProcessPoolExecutor(2).map``,
        or for Dask ``lambda f, xs: client.gather(client.map(f, list(xs)))``. Each
        item is a batch of up to 25 :class:`MockObject` and ``fn`` (a picklable
        ``functools.partial`` of a module-level function) writes the batch and returns
        its paths as strings. The result is consumed with ``list()``, so the mapper
        must block or return an iterator that blocks.
    n_bad : int
        Number of extra, deliberately bad files, cycling through: truncated file,
        random bytes, NaN flux, all ivar = 0, z ≈ 1.2 (rest 5300–5850 Å window beyond
        the red end), no SPECOBJ HDU, and an exact copy of a good file under another
        name (``spec-PLATE-(MJD+1)-FIBER.fits``, sorting after the original). Bad files
        other than the copies use their own plate number, unused by good files.
    n_plates, boss_fraction : optional, keyword-only
        Passed to :func:`plan_sdss_survey`.

    Returns
    -------
    MockSurvey
        ``paths`` and ``objects`` of the good files, ``photometry_path``, and ``bad``
        (file name → expected reject reason).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if n_bad < 0:
        raise ValueError(f"n_bad must be >= 0, got {n_bad}")
    objs = plan_sdss_survey(n_spectra, seed=seed, n_plates=n_plates, boss_fraction=boss_fraction)
    bad_objs, dup_pairs = _plan_bad(objs, n_bad, seed)
    todo = objs + bad_objs
    # batches of files per task: keeps the per-task overhead of process pools / Dask small
    size = max(1, min(_BATCH, math.ceil(len(todo) / 8)))
    batches = [todo[i:i + size] for i in range(0, len(todo), size)]
    list(mapper(functools.partial(_write_batch, out_dir=str(out)), batches))
    paths = [out / o.filename for o in objs]
    bad: dict[str, str] = {}
    reason_of = dict(_BAD_KINDS)
    for o in bad_objs:
        bad[o.filename] = reason_of[o.defect]
    for src, name in dup_pairs:
        shutil.copyfile(out / src.filename, out / name)
        bad[name] = reason_of["duplicate"]
    phot_path = out / PHOTOMETRY_FILENAME
    pq.write_table(photometry_table(objs), phot_path)
    return MockSurvey(paths=paths, photometry_path=phot_path, objects=objs, bad=bad)


from .mock_pfs import write_pfs_coadd, write_pfs_cozcandidates, write_pfs_object, write_pfs_survey  # noqa: E402,F401
