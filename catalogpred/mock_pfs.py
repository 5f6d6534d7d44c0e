"""Synthetic, datamodel-faithful PFS files: ``pfsCoadd``/``pfsCalibrated``, legacy ``pfsObject``, ``pfsCoZCandidates``.

No public PFS spectrum exists (the data are proprietary), so tests and demos use files
written here, through ``astropy.io.fits``, with the layout of the PFS datamodel
(``../shared/realdata/pfs/PROVENANCE.md``; Subaru-PFS/datamodel ``PfsTargetSpectra.writeFits``,
DAMD_VER=1). Every primary header carries ``ORIGIN = 'catalogpred.mock_pfs'``.

Files
-----
:func:`write_pfs_coadd` — multi-object ``pfsCoadd`` / ``pfsCalibrated`` (same layout), HDUs in order:

==  ============  =========================================================================
0   PRIMARY       ``DAMD_VER = 1`` + free metadata
1   TARGET        targetId I, catId J, tract J, patch PA(), objId K, ra D, dec D, targetType I
2   TARGETFLUX    targetId I, filterName PA(), fiberFlux E (nJy)
3   OBSERVATIONS  targetId I, visit J, arm PA(), spectrograph I, pfsDesignId K, fiberId J,
                  pfiNominal 2D, pfiCenter 2D (mm), obsTime PA(), expTime E (s)
4   WAVELENGTH    f8 [NWAVE] nm, vacuum (BINTABLE ``value`` PD() when spectra differ in length)
5   FLUX          f4 [NOBJ, NWAVE] nJy
6   MASK          **CompImageHDU** i4 [NOBJ, NWAVE], planes as ``MP_<NAME> = bit`` keywords
7   SKY           f4 [NOBJ, NWAVE] nJy
8   COVAR         BINTABLE ``row_0, row_1, row_2`` PE(): variance (nJy²), +1 and +2 off-diagonals
9   COVAR2        f4 [NOBJ, NCOARSE, NCOARSE]
10  METADATA      targetId I, metadata PA() (YAML incl. the MP_ flags)
11  FLUXTABLE     targetId I, wavelength QD() nm, flux QE() nJy, error QE() nJy, mask QJ()
12  NOTES         NOBJ rows (the datamodel's PfsObjectNotes/PfsSingleNotes schema has no columns)
==  ============  =========================================================================

Default grid: ``np.linspace(370, 1270, 11251)`` nm (0.08 nm). NO_DATA is set where no arm covers
(below 380 nm, above 1260 nm) and in a few short gaps, with flux NaN (or 0) there; OVERLAP (an
informational plane) where two arms overlap; CR/INTRP, SAT and BAD_SKY on scattered pixels.
``WAVELENGTH``, ``FLUX`` and ``SKY`` also get ``BUNIT`` (an addition: readers must not need it).

:func:`write_pfs_object` — legacy single-object ``pfsObject-%05d-%05d-%s-%016x-%03d-0x%016x.fits``
% (catId, tract, patch, objId, nVisit % 1000, pfsVisitHash): PRIMARY, FLUX (image with the
wavelength WCS ``CTYPE1='WAVE'``, ``CUNIT1='nm'``, ``CRVAL1`` = mid-λ, ``CRPIX1 = N/2 + 1.5``,
``CDELT1``, ``DAMD_VER``), MASK (CompImage, MP_ keys + WCS), TARGET (filterName, fiberFlux; header CATID,
TRACT, PATCH, OBJID, RA, DEC, TARGETTYPE), SKY, COVAR (image 3×N), COVAR2, OBSERVATIONS, NOTES,
FLUX_TABLE. The spectrum is sampled on the datamodel's ``WavelengthArray``, ``linspace(min, max, N)``,
which that WCS describes as the datamodel reads it (0-based ``pixel_to_world(1.0 .. N)``: element i at
FITS pixel i + 2; :func:`catalogpred.surveys.pfs.wcs_wavelength_angstrom`).

:func:`write_pfs_cozcandidates` — ``pfsCoZCandidates-%05d.fits`` % catId, as drp_1dpipe writes it:
TARGET (targetId, catId, tract, patch, objId, nVisit, visitHash, ra, dec, targetType), WARNINGS,
ERRORS, CLASSIFICATION, then for GALAXY and QSO: ``*_CANDIDATES`` (targetId, cRank, redshift,
redshiftError, redshiftProba, subClass, continuumFile, lineCatalogRatioFile, modelId), ``*_MODELS``,
``*_REDSHIFT_GRID``, ``*_LN_PDF``, ``*_LINES``; for STAR: ``STAR_CANDIDATES`` (velocity…),
``STAR_MODELS``, ``STAR_VELOCITY_GRID``, ``STAR_LN_PDF``. Candidates link to TARGET by targetId.

:func:`write_pfs_survey` writes a small survey (pfsCoadd + pfsCalibrated + pfsObject files, their
pfsCoZCandidates, optional corrupt files) and returns the truth per spectrum.

Physics
-------
Galaxies reuse :mod:`catalogpred.mock`'s population and rest-frame spectra (stellar continuum,
absorption and emission lines, AGN, dust, redshift, distance), at PFS resolution (R ≈ 2300/3000/4300
in b/r/n) and a 1.05″ fibre, converted from F_λ to F_ν in nJy. Flux standards are 5500–7500 K
blackbodies with Balmer and Ca absorption at AB 17–19; sky fibres hold sky-subtraction residuals.
The noise is sky + source dominated (σ ≈ 250 nJy per 0.08 nm pixel in the optical sky continuum),
larger at the arm ends and in the near-IR sky lines. It is drawn as the PFS pipeline makes it
(:func:`arm_resampled_noise`): independently on each arm's native pixels (:data:`_ARM_STEP_NM`), then
linearly interpolated onto the file's grid, as drp_stella's ``interpolateFlux`` resamples the arms. That
correlates neighbouring pixels, and COVAR holds the exact variance and +1, +2 covariances of the noise drawn
(rows 0, 1, 2; NaN or 0 where NO_DATA is, as the flux); COVAR2 the variances of 10 coarse-bin means.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import pathlib
import re
from dataclasses import dataclass, field, replace

import numpy as np

from .spectra import flam17_to_fnu_njy

__all__ = [
    "PfsTarget",
    "PfsSurvey",
    "TARGET_TYPES",
    "MASK_PLANES",
    "ARMS_NM",
    "PFS_WAVE_NM",
    "plan_pfs_targets",
    "render_pfs_spectrum",
    "arm_resampled_noise",
    "write_pfs_coadd",
    "write_pfs_object",
    "write_pfs_cozcandidates",
    "write_pfs_survey",
    "pfs_object_filename",
    "cozcandidates_filename",
    "pfs_source_id",
]

#: datamodel ``TargetType`` values (TARGET.targetType).
TARGET_TYPES = {"SCIENCE": 1, "SKY": 2, "FLUXSTD": 3, "UNASSIGNED": 4, "ENGINEERING": 5,
                "SUNSS_IMAGING": 6, "SUNSS_DIFFUSE": 7}
SCIENCE, SKY, FLUXSTD = 1, 2, 3

#: default mask planes (name -> bit) written as ``MP_<NAME>`` keywords; readers must read the
#: keywords, so :func:`write_pfs_coadd` accepts any other numbering.
MASK_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "DETECTED_NEGATIVE": 6,
               "SUSPECT": 7, "NO_DATA": 8, "BAD_FLAT": 9, "FIBERTRACE": 10, "BAD_SKY": 11, "BAD_FLUXCAL": 12,
               "UNMASKEDNAN": 13, "OVERLAP": 14}

#: wavelength coverage of the arms (nm): blue, red, near-IR.
ARMS_NM = {"b": (380.0, 650.0), "r": (630.0, 970.0), "n": (940.0, 1260.0)}
_RESOLUTION = {"b": 2300.0, "r": 3000.0, "n": 4300.0}
#: native sampling of the arms in FLUXTABLE (nm per sample).
_ARM_STEP_NM = {"b": 0.067, "r": 0.083, "n": 0.078}
#: HSC filters of TARGETFLUX with their effective wavelength (nm).
_FILTERS = {"g_hsc": 475.0, "r2_hsc": 620.0, "i2_hsc": 770.0, "z_hsc": 890.0, "y_hsc": 975.0}

#: default pfsCoadd grid: 370-1270 nm, 0.08 nm, 11251 px (drp_stella WavelengthSamplingConfig).
PFS_WAVE_NM = np.linspace(370.0, 1270.0, 11251)
PFS_WAVE_NM.flags.writeable = False

#: catIds of the sky and flux-standard catalogues in the mock (science catIds are arguments).
SKY_CAT_ID = 1007
FLUXSTD_CAT_ID = 3006
_NCOARSE = 10
_UINT64 = (1 << 64) - 1
_ORIGIN = ("ORIGIN", "catalogpred.mock_pfs", "SYNTHETIC PFS file, not PFS data")
#: fibre-light scaling of catalogpred.mock's (SDSS-bright, 3" fibre) galaxies: PFS's 1.05" fibres and
#: fainter targets put their continuum at ~1e3-1e4 nJy
_PFS_FIBRE_FRAC = 0.06


def pfs_source_id(cat_id: int, obj_id: int) -> str:
    """``pfs-CCCCC-OOOOOOOOOOOOOOOO``: catId as in file names (%05d), objId as %016x (two's complement)."""
    return f"pfs-{int(cat_id):05d}-{int(obj_id) & _UINT64:016x}"


@dataclass(frozen=True)
class PfsTarget:
    """One planned PFS target: ids, position, type and the physics of its spectrum.

    Parameters
    ----------
    cat_id, tract, patch, obj_id : int, int, str, int
        Datamodel ids (``patch`` like ``'3,4'``; ``obj_id`` a 64-bit HSC-like id).
    ra, dec : float
        Degrees, ICRS.
    target_type : int
        1 SCIENCE, 2 SKY, 3 FLUXSTD (:data:`TARGET_TYPES`).
    seed : int
        Seed of every random draw made while rendering the spectrum.
    z : float
        True redshift (galaxies), radial velocity / c (stars), 0 (sky).
    log_mstar, sf_frac, log_ssfr, agn_frac, av, vdisp, fiber_frac : float
        Galaxy physics as in :class:`catalogpred.mock.MockObject` (``fiber_frac`` for a 1.05″ fibre).
    w1_true, w2_true, w3_true, w4_true : float
        Noise-free WISE magnitudes (Vega) coupled to the physics (NaN for sky and stars).
    teff, mag_r : float
        Flux standards: temperature (K) and AB magnitude at 620 nm.
    noise_scale : float
        Variance multiplier (observing conditions).
    n_visit : int
        Number of visits in the coadd.
    spectype : str
        Class the redshift file gives (``GALAXY``, ``QSO``, ``STAR``).
    redshift_status : str
        ``"ok"`` (candidates written), ``"failed"`` (in the redshift file, galaxy solver error, no
        GALAXY candidate) or ``"absent"`` (not in the redshift file).
    """

    cat_id: int
    tract: int
    patch: str
    obj_id: int
    ra: float
    dec: float
    target_type: int
    seed: int
    z: float = 0.0
    log_mstar: float = float("nan")
    sf_frac: float = float("nan")
    log_ssfr: float = float("nan")
    agn_frac: float = float("nan")
    av: float = float("nan")
    vdisp: float = float("nan")
    fiber_frac: float = float("nan")
    w1_true: float = float("nan")
    w2_true: float = float("nan")
    w3_true: float = float("nan")
    w4_true: float = float("nan")
    teff: float = float("nan")
    mag_r: float = float("nan")
    noise_scale: float = 1.0
    n_visit: int = 3
    spectype: str = "GALAXY"
    redshift_status: str = "ok"

    @property
    def source_id(self) -> str:
        """catalogpred's id: :func:`pfs_source_id` (catId, objId)."""
        return pfs_source_id(self.cat_id, self.obj_id)

    @property
    def visit_hash(self) -> int:
        """pfsVisitHash of the (mock) visits, as the datamodel computes it (:func:`_visit_hash`)."""
        return _visit_hash(_visits(self))


@dataclass
class PfsSurvey:
    """What :func:`write_pfs_survey` wrote.

    Attributes
    ----------
    paths : list of pathlib.Path
        Spectrum files (pfsCoadd, pfsCalibrated, pfsObject), good ones only.
    redshift_paths : list of pathlib.Path
        ``pfsCoZCandidates-%05d.fits`` files (one per science catId).
    truth : pyarrow.Table
        One row per spectrum in ``paths``: ``source_id, source_file, row_in_file, kind, cat_id, obj_id,
        tract, patch, ra, dec, target_type, z, spectype, expected_reason`` (a RejectReason value, ``""``
        for spectra that should reach the catalog) and ``w1_true..w4_true``.
    bad : dict of str to str
        File name of each deliberately corrupt file → the RejectReason value a reader gives it.
    targets : list of PfsTarget
        Every target written, in ``truth`` order.
    """

    paths: list
    redshift_paths: list
    truth: object
    bad: dict = field(default_factory=dict)
    targets: list = field(default_factory=list)


def pfs_object_filename(target: PfsTarget) -> str:
    """``pfsObject-%05d-%05d-%s-%016x-%03d-0x%016x.fits`` % (catId, tract, patch, objId, nVisit % 1000, hash)."""
    return "pfsObject-%05d-%05d-%s-%016x-%03d-0x%016x.fits" % (
        target.cat_id, target.tract, target.patch, target.obj_id & _UINT64, target.n_visit % 1000, target.visit_hash)


def cozcandidates_filename(cat_id: int) -> str:
    """``pfsCoZCandidates-%05d.fits`` % catId (drp_1dpipe spells it ``pfsCoZcandidates``; readers accept both)."""
    return "pfsCoZCandidates-%05d.fits" % cat_id


# ----------------------------------------------------------------------------------------------- planning


def _seeds(seed: int, n: int, stream: int) -> list[int]:
    ss = np.random.SeedSequence([int(seed), 0x9F5, stream])
    return [int(s.generate_state(1, dtype=np.uint64)[0] >> 1) for s in ss.spawn(n)]


def _unique_ids(rng: np.random.Generator, n: int, lo: int, hi: int, used: set) -> list[int]:
    out = []
    while len(out) < n:
        v = int(rng.integers(lo, hi))
        if v not in used:
            used.add(v)
            out.append(v)
    return out


def plan_pfs_targets(n_science: int, seed: int = 0, *, n_sky: int = 0, n_fluxstd: int = 0, cat_id: int = 1,
                     centre: tuple[float, float] | None = None, used_ids: set | None = None) -> list[PfsTarget]:
    """Plan PFS targets in one 1.3° field: galaxies, sky fibres and flux standards.

    Deterministic given the arguments. Galaxies draw their physics from
    :mod:`catalogpred.mock`'s population (z ≈ 0.02–0.6), with fibre fractions for PFS's 1.05″ fibres.

    Parameters
    ----------
    n_science, n_sky, n_fluxstd : int
        Numbers of SCIENCE, SKY and FLUXSTD targets (in that order in the result).
    seed : int
    cat_id : int
        catId of the science targets (sky and flux standards get 1007 and 3006).
    centre : (float, float), optional
        Field centre (deg); drawn from the seed when None.
    used_ids : set, optional
        objIds already taken (updated), to keep (catId, objId) unique across calls.

    Returns
    -------
    list of PfsTarget
    """
    from . import mock as _mock

    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9F5, 0]))
    used = used_ids if used_ids is not None else set()
    if centre is None:
        centre = (float(rng.uniform(0, 360)), float(np.degrees(np.arcsin(rng.uniform(-0.1, 0.85)))))
    n = n_science + n_sky + n_fluxstd
    r = 0.65 * np.sqrt(rng.random(n))
    th = rng.uniform(0, 2 * np.pi, n)
    dec = np.clip(centre[1] + r * np.sin(th), -89.9, 89.9)
    ra = np.mod(centre[0] + r * np.cos(th) / np.cos(np.radians(dec)), 360.0)
    tract = int(rng.integers(8000, 10500))
    seeds = _seeds(seed, n, 1)
    pop = _mock._draw_population(rng, n_science) if n_science else None
    out: list[PfsTarget] = []
    sci_ids = _unique_ids(rng, n_science, 1 << 40, 1 << 62, used)
    sky_ids = _unique_ids(rng, n_sky, 1 << 40, 1 << 62, used)
    std_ids = _unique_ids(rng, n_fluxstd, 1 << 50, 1 << 62, used)  # Gaia-source_id-like
    for k in range(n):
        patch = f"{int(rng.integers(0, 9))},{int(rng.integers(0, 9))}"
        common = dict(tract=tract, patch=patch, ra=round(float(ra[k]), 8), dec=round(float(dec[k]), 8), seed=seeds[k],
                      noise_scale=round(float(np.exp(rng.normal(0, 0.15))), 4), n_visit=int(rng.integers(2, 5)))
        if k < n_science:
            m = pop["mags"][k]
            out.append(PfsTarget(
                cat_id=cat_id, obj_id=sci_ids[k], target_type=SCIENCE, z=round(float(pop["z"][k]), 6),
                log_mstar=round(float(pop["log_mstar"][k]), 4), sf_frac=round(float(pop["sf_frac"][k]), 4),
                log_ssfr=round(float(pop["log_ssfr"][k]), 4), agn_frac=round(float(pop["agn_frac"][k]), 4),
                av=round(float(pop["av"][k]), 4), vdisp=round(float(pop["vdisp"][k]), 2),
                fiber_frac=round(max(float(pop["fiber_frac"][k]) * _PFS_FIBRE_FRAC, 0.005), 4),
                w1_true=round(float(m[0]), 4), w2_true=round(float(m[1]), 4), w3_true=round(float(m[2]), 4),
                w4_true=round(float(m[3]), 4), **common))
        elif k < n_science + n_sky:
            out.append(PfsTarget(cat_id=SKY_CAT_ID, obj_id=sky_ids[k - n_science], target_type=SKY, z=0.0,
                                 spectype="", **common))
        else:
            out.append(PfsTarget(cat_id=FLUXSTD_CAT_ID, obj_id=std_ids[k - n_science - n_sky], target_type=FLUXSTD,
                                 z=round(float(rng.normal(0, 1e-4)), 7), teff=round(float(rng.uniform(5500, 7500)), 1),
                                 mag_r=round(float(rng.uniform(17.0, 19.0)), 3), spectype="STAR", **common))
    return out


# ----------------------------------------------------------------------------------------------- spectra


def _arm_of(wave_nm: np.ndarray) -> np.ndarray:
    """Arm letter per pixel ('' outside every arm); the bluer arm wins in overlaps."""
    arm = np.full(wave_nm.shape, "", dtype="<U1")
    for a in ("n", "r", "b"):
        lo, hi = ARMS_NM[a]
        arm[(wave_nm >= lo) & (wave_nm <= hi)] = a
    return arm


def _throughput_factor(wave_nm: np.ndarray) -> np.ndarray:
    """Variance multiplier: 1 in the arm middles, larger at the arm ends, inf where no arm covers."""
    best = np.full(wave_nm.shape, np.inf)
    for lo, hi in ARMS_NM.values():
        inside = (wave_nm >= lo) & (wave_nm <= hi)
        f = 1.0 + 2.5 * np.exp(-(wave_nm - lo) / 6.0) + 2.5 * np.exp((wave_nm - hi) / 6.0)
        best = np.where(inside, np.minimum(best, f), best)
    return best


@functools.lru_cache(maxsize=1)
def _nir_sky_lines() -> np.ndarray:
    """Fixed list of near-IR OH lines 1040-1265 nm: (λ Å, peak in 1e-17 erg/s/cm²/Å per 3″ fibre)."""
    rng = np.random.default_rng(20240601)
    lam = np.sort(rng.uniform(10400.0, 12650.0, 90))
    return np.stack([lam, rng.uniform(150.0, 1200.0, 90)], axis=1)


def _sky_model_njy(wave_nm: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(sky continuum, sky lines) in nJy through a 1.05″ fibre at ``wave_nm``."""
    from . import mock as _mock

    lam = wave_nm * 10.0
    area = 0.12  # (1.05″ / 3″)² fibre area ratio
    cont = area * (3.8 + 2.2 * (lam - 3800.0) / 5400.0 + 1.5 * np.exp(-0.5 * ((lam - 5900.0) / 700.0) ** 2))
    lines = np.zeros_like(lam)
    table = np.concatenate([_mock._SKY_LINES, _nir_sky_lines()])
    sig = table[:, 0] / (2.355 * 3500.0)
    _mock._add_gaussians(lines, lam, table[:, 0], sig, area * table[:, 1])
    return (flam17_to_fnu_njy(cont * scale, lam), flam17_to_fnu_njy(lines * scale, lam))


def _model_njy(target: PfsTarget, wave_nm: np.ndarray) -> np.ndarray:
    """Noise-free F_ν (nJy) of the target at ``wave_nm`` (0 for sky fibres)."""
    from . import mock as _mock

    lam = np.asarray(wave_nm, np.float64) * 10.0
    if target.target_type == SCIENCE:
        arm = _arm_of(wave_nm)
        res = np.where(arm == "b", _RESOLUTION["b"], np.where(arm == "n", _RESOLUTION["n"], _RESOLUTION["r"]))
        wdisp = 1.0 / (2.355 * res * math.log(10.0) * 1e-4)  # σ in 1e-4 dex pixels, as mock._rest_model wants
        return flam17_to_fnu_njy(_mock._rest_model(target, lam, wdisp), lam)
    if target.target_type == FLUXSTD:
        lr = lam / (1.0 + target.z)
        flam = _mock._bb_norm(lr, target.teff)
        absorb = np.zeros_like(lr)
        lines = [(3934.78, 0.3, 6.0), (3969.59, 0.3, 6.0), (4102.89, 0.35, 12.0), (4341.69, 0.4, 14.0),
                 (4862.68, 0.45, 16.0), (6564.61, 0.4, 14.0), (8544.44, 0.2, 5.0), (8664.52, 0.2, 5.0)]
        t = np.array(lines)
        _mock._add_gaussians(absorb, lr, t[:, 0], t[:, 2], t[:, 1])
        fnu = flam17_to_fnu_njy(flam * np.clip(1.0 - absorb, 0.05, None), lam)
        ref = np.interp(6200.0, lam, fnu) if lam[0] < 6200.0 < lam[-1] else fnu[len(fnu) // 2]
        return fnu * (10 ** ((31.4 - target.mag_r) / 2.5) / ref)
    return np.zeros_like(lam)


def _mask_bit(planes: dict, name: str) -> int:
    return 1 << planes[name] if name in planes else 0


def arm_resampled_noise(wave_nm: np.ndarray, var: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noise on ``wave_nm`` as the PFS pipeline makes it, and its exact banded covariance.

    Each arm's noise is drawn independently on that arm's native pixels (:data:`_ARM_STEP_NM` nm apart from
    the arm's blue end), then linearly interpolated onto ``wave_nm``, as drp_stella's ``interpolateFlux``
    resamples an arm. An output pixel between native pixels k and k+1 at fraction t gets
    ``(1 - t) e_k + t e_k+1``; two output pixels that interpolate from a common native pixel are correlated.
    Pixels take the arm :func:`_arm_of` gives them (the bluer one in overlaps: no covariance across an arm
    boundary); pixels outside every arm get independent noise of variance ``var``.

    Parameters
    ----------
    wave_nm : float64 [N]
        Increasing output wavelengths (nm).
    var : float64 [N]
        Variance per output pixel (nJy²) that the noise should have; the native pixels get ``var``
        (interpolated) divided by the arm's mean of ``(1 - t)² + t²``, so the output variance has this
        level on average and beats with t about it.
    rng : numpy.random.Generator

    Returns
    -------
    noise : float64 [N]
        nJy.
    band : float64 [3, N]
        ``band[0]`` the variance of ``noise``, ``band[L, j] = Cov(noise_j, noise_j+L)`` for L = 1, 2 (0 for the
        last L pixels): the rows of PFS COVAR, exact for the process drawn.
    """
    wave_nm = np.asarray(wave_nm, np.float64)
    var = np.asarray(var, np.float64)
    n = wave_nm.size
    noise = np.zeros(n)
    band = np.zeros((3, n))
    arm = _arm_of(wave_nm)
    outside = arm == ""
    noise[outside] = np.sqrt(var[outside]) * rng.standard_normal(int(outside.sum()))
    band[0, outside] = var[outside]
    for a, (lo, hi) in ARMS_NM.items():
        idx = np.flatnonzero(arm == a)  # contiguous: the arms are intervals and wave_nm increases
        if idx.size == 0:
            continue
        step = _ARM_STEP_NM[a]
        native = lo + step * np.arange(int(math.ceil((hi - lo) / step)) + 2)
        k = np.clip(np.floor((wave_nm[idx] - lo) / step).astype(np.int64), 0, native.size - 2)
        t = (wave_nm[idx] - native[k]) / step
        weights = (1.0 - t, t)  # of native pixels k and k + 1
        v = np.interp(native, wave_nm[idx], var[idx]) / np.mean(weights[0] ** 2 + weights[1] ** 2)
        e = np.sqrt(v) * rng.standard_normal(native.size)
        noise[idx] = weights[0] * e[k] + weights[1] * e[k + 1]
        band[0, idx] = weights[0] ** 2 * v[k] + weights[1] ** 2 * v[k + 1]
        for lag in (1, 2):  # Σ over native pixels m shared by j and j + lag of w_j(m) w_j+lag(m) v_m
            if idx.size <= lag:
                continue
            c = np.zeros(idx.size - lag)
            for da, wa in enumerate(weights):
                for db, wb in enumerate(weights):
                    m = k[:-lag] + da
                    c += np.where(m == k[lag:] + db, wa[:-lag] * wb[lag:] * v[m], 0.0)
            band[lag, idx[:-lag]] = c
    return noise, band


def render_pfs_spectrum(target: PfsTarget, wave_nm: np.ndarray | None = None, *, mask_planes: dict | None = None,
                        nan_no_data: bool | None = None) -> dict:
    """Compute one PFS spectrum (what the writers put in FLUX, MASK, SKY, COVAR).

    Parameters
    ----------
    target : PfsTarget
    wave_nm : float64 [N], optional
        Vacuum wavelengths (nm); default :data:`PFS_WAVE_NM`.
    mask_planes : dict, optional
        Mask plane name -> bit (default :data:`MASK_PLANES`).
    nan_no_data : bool, optional
        NaN (True) or 0 (False) flux on NO_DATA pixels; default from the seed (both occur).

    Returns
    -------
    dict
        ``flux`` f4 [N] nJy (noisy; NaN or 0 on NO_DATA), ``mask`` i4 [N], ``covar`` f4 [3, N]
        (variance nJy², +1 and +2 off-diagonals), ``sky`` f4 [N] nJy, ``model`` f8 [N] nJy (noise-free),
        ``variance`` f8 [N] (= covar[0], NaN/0 on NO_DATA), ``sigma`` f8 [N] (finite everywhere), ``band`` f8
        [3, N] (the noise's variance and +1, +2 covariances everywhere, NO_DATA pixels included).
    """
    wave_nm = PFS_WAVE_NM if wave_nm is None else np.asarray(wave_nm, np.float64)
    planes = dict(MASK_PLANES if mask_planes is None else mask_planes)
    rng = np.random.default_rng(np.random.SeedSequence([target.seed, 0x9F5, 11]))
    n = wave_nm.size
    if nan_no_data is None:
        nan_no_data = bool(target.seed % 2)
    model = _model_njy(target, wave_nm)
    sky_cont, sky_lines = _sky_model_njy(wave_nm, float(np.exp(rng.normal(0, 0.1))))
    sky = sky_cont + sky_lines
    thru = _throughput_factor(wave_nm)
    finite_thru = np.where(np.isfinite(thru), thru, 6.0)
    # sky-line residuals (1 % of the line) are part of the noise the variance describes
    var = target.noise_scale * (7.0 * (sky + np.clip(model, 0, None)) + 80.0**2) * finite_thru + (0.01 * sky_lines) ** 2
    noise, band = arm_resampled_noise(wave_nm, var, rng)
    sigma = np.sqrt(band[0])  # the exact standard deviation of the noise drawn
    flux = model + noise

    mask = np.zeros(n, np.int64)
    no_data = ~np.isfinite(thru)
    for _ in range(int(rng.integers(0, 3))):  # short gaps (bad columns / dichroic edge)
        length = int(rng.integers(5, 30))
        i0 = int(rng.integers(n // 10, n - n // 10 - length))
        no_data[i0:i0 + length] = True
    mask[no_data] |= _mask_bit(planes, "NO_DATA")
    mask[no_data & np.isfinite(thru)] |= _mask_bit(planes, "BAD")
    overlap = np.zeros(n, bool)
    arms = list(ARMS_NM.values())
    for (lo1, hi1), (lo2, hi2) in zip(arms[:-1], arms[1:]):
        overlap |= (wave_nm >= lo2) & (wave_nm <= hi1)
    mask[overlap] |= _mask_bit(planes, "OVERLAP")  # informational: the data are good
    cr = rng.random(n) < 4e-4
    flux[cr] += sigma[cr] * rng.uniform(20, 200, int(cr.sum()))
    mask[cr] |= _mask_bit(planes, "CR") | _mask_bit(planes, "INTRP")
    bright = sky_lines > 4.0 * sky_cont
    badsky = bright & (rng.random(n) < 0.3)
    mask[badsky] |= _mask_bit(planes, "BAD_SKY")
    if target.target_type == FLUXSTD:
        sat = rng.random(n) < 2e-4
        mask[sat] |= _mask_bit(planes, "SAT")
    if rng.random() < 0.3:  # a NaN the pipeline flagged after the fact
        i = int(rng.integers(n // 4, 3 * n // 4))
        flux[i] = np.nan
        mask[i] |= _mask_bit(planes, "UNMASKEDNAN")
    fill = np.nan if nan_no_data else 0.0
    flux[no_data] = fill
    covar = band.copy()
    for lag in range(3):  # no variance on NO_DATA pixels, nor covariance with them
        covar[lag, no_data] = fill
        if lag:
            covar[lag, :-lag][no_data[lag:]] = fill
    variance = covar[0].copy()
    if mask.max(initial=0) >= 1 << 31:
        raise ValueError("mask planes must use bits 0..30 (MASK is int32)")
    return {"flux": flux.astype(np.float32), "mask": mask.astype(np.int32), "covar": covar.astype(np.float32),
            "sky": sky.astype(np.float32), "model": model, "variance": variance, "sigma": sigma, "band": band}


# ----------------------------------------------------------------------------------------------- HDU helpers


def _visits(target: PfsTarget) -> list[int]:
    rng = np.random.default_rng(np.random.SeedSequence([target.seed, 0x9F5, 21]))
    return sorted(int(v) for v in rng.choice(np.arange(100000, 130000), size=target.n_visit, replace=False))


def _visit_hash(visits: list[int]) -> int:
    """pfsVisitHash as the datamodel defines it (``calculatePfsVisitHash``): SHA-1 of the text of the list of
    the sorted visits as byte strings (``"[b'108562', b'119564']"``), its low 63 bits."""
    if visits == [0]:
        return 0
    text = str([str(v).encode() for v in sorted(visits)])
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) & 0x7FFFFFFFFFFFFFFF


def _fiber_flux(target: PfsTarget) -> dict[str, float]:
    """TARGETFLUX: noise-free mean F_ν (nJy) in ±40 nm around each HSC filter."""
    out = {}
    for name, lam in _FILTERS.items():
        w = np.linspace(lam - 40.0, lam + 40.0, 81)
        out[name] = float(np.mean(_model_njy(target, w))) if target.target_type != SKY else 0.0
    return out


def _observations(targets: list[PfsTarget], visit: int | None = None) -> dict[str, list]:
    """OBSERVATIONS rows: each target's visits (:func:`_visits`), or only ``visit`` (a per-visit file)."""
    from astropy.time import Time

    rows: dict[str, list] = {k: [] for k in ("targetId", "visit", "arm", "spectrograph", "pfsDesignId", "fiberId",
                                              "pfiNominal", "pfiCenter", "obsTime", "expTime")}
    for tid, t in enumerate(targets):
        rng = np.random.default_rng(np.random.SeedSequence([t.seed, 0x9F5, 22]))
        fiber = int(rng.integers(1, 2395))
        nominal = rng.uniform(-220.0, 220.0, 2)
        for v in ([int(visit)] if visit is not None else _visits(t)):
            day = 60400 + (v - 100000) // 40
            secs = int(rng.integers(0, 86400))
            obs_time = Time(day + secs / 86400.0, format="mjd", scale="utc").isot
            rows["targetId"].append(tid)
            rows["visit"].append(v)
            rows["arm"].append("brn")
            rows["spectrograph"].append((fiber - 1) // 599 + 1)
            design = int(hashlib.sha1(f"design{v}".encode()).hexdigest()[:16], 16) & 0x7FFFFFFFFFFFFFFF
            rows["pfsDesignId"].append(design)
            rows["fiberId"].append(fiber)
            rows["pfiNominal"].append(nominal)
            rows["pfiCenter"].append(nominal + rng.normal(0, 0.005, 2))
            rows["obsTime"].append(obs_time)
            rows["expTime"].append(900.0)
    return rows


def _fluxtable(target: PfsTarget, planes: dict) -> dict[str, np.ndarray]:
    """Un-resampled per-arm samples: wavelength (nm), flux, error (nJy), mask."""
    rng = np.random.default_rng(np.random.SeedSequence([target.seed, 0x9F5, 31]))
    waves = [np.arange(lo, hi, _ARM_STEP_NM[a]) for a, (lo, hi) in ARMS_NM.items()]
    wave = np.concatenate(waves)
    order = np.argsort(wave, kind="stable")
    wave = wave[order]
    model = _model_njy(target, wave)
    sky_cont, sky_lines = _sky_model_njy(wave)
    err = np.sqrt(target.noise_scale * (7.0 * (sky_cont + sky_lines + np.clip(model, 0, None)) + 80.0**2) * 1.3)
    flux = model + err * rng.standard_normal(wave.size)
    mask = np.zeros(wave.size, np.int64)
    cr = rng.random(wave.size) < 4e-4
    mask[cr] |= _mask_bit(planes, "CR")
    return {"wavelength": wave, "flux": flux.astype(np.float32), "error": err.astype(np.float32), "mask": mask}


def _mp_header(planes: dict):
    """``MP_<NAME> = bit`` cards (HIERARCH for names longer than 8 characters, as the datamodel notes)."""
    from astropy.io.fits import Header

    h = Header()
    for name, bit in sorted(planes.items(), key=lambda kv: kv[1]):
        key = f"MP_{name}"
        h[f"HIERARCH {key}" if len(key) > 8 else key] = (int(bit), f"Mask plane {name}")
    return h


def _metadata_yaml(target: PfsTarget, planes: dict, kind: str) -> str:
    import yaml

    md = {"DAMD_VER": 1, "DATATYPE": kind, "CATID": int(target.cat_id), "OBJID": int(target.obj_id),
          "NVISIT": 1 if kind == "pfsCalibrated" else int(target.n_visit)}
    md.update({f"MP_{k}": int(v) for k, v in planes.items()})
    return yaml.dump(md)


def _atomic_write(hdul, path: pathlib.Path) -> pathlib.Path:
    tmp = path.with_name(path.name + ".part")
    hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    return path


def _covar2(covar: np.ndarray) -> np.ndarray:
    """COVAR2 [NCOARSE, NCOARSE] from COVAR [3, N]: on the diagonal the variance of the mean of each of
    :data:`_NCOARSE` coarse bins (the banded covariance included), small correlations off it."""
    c = np.where(np.isfinite(covar), covar, 0.0).astype(np.float64)
    d = []
    for idx in np.array_split(np.arange(c.shape[1]), _NCOARSE):
        total = c[0, idx].sum() + 2.0 * c[1, idx[:-1]].sum() + 2.0 * c[2, idx[:-2]].sum()
        d.append(total / max(len(idx), 1) ** 2)
    d = np.array(d)
    c2 = 0.05 * np.sqrt(np.outer(d, d))
    np.fill_diagonal(c2, d)
    return c2.astype(np.float32)


_COADD_DEFECTS = {"": "", "missing_flux": "missing_hdu", "missing_target": "missing_hdu",
                  "row_mismatch": "inconsistent_file", "truncated": "unreadable_file"}


def write_pfs_coadd(path: str | os.PathLike, targets: list[PfsTarget], *, kind: str = "pfsCoadd",
                    wave_nm: np.ndarray | None = None, mask_planes: dict | None = None, ragged: bool = False,
                    fluxtable: bool = True, defect: str = "", visit: int | None = None) -> pathlib.Path:
    """Write a multi-object ``pfsCoadd`` or ``pfsCalibrated`` file (layout in the module docstring).

    Parameters
    ----------
    path : path-like
        Output file (its folder is created). Written under a temporary name, then renamed.
    targets : list of PfsTarget
        One spectrum per target, in TARGET order (targetId = 0..N-1).
    kind : str
        ``"pfsCoadd"`` or ``"pfsCalibrated"`` (same layout; recorded in the primary header). A pfsCalibrated
        file holds one visit's spectra: every target's OBSERVATIONS rows name that ``visit``.
    wave_nm : float64 or float32 [NWAVE], optional
        Shared wavelength grid (nm); default :data:`PFS_WAVE_NM`. A float32 grid is written as float32, as
        drp_stella writes its ``WavelengthArray`` (PROVENANCE.md says f8; the real writer follows the array).
    mask_planes : dict, optional
        Plane name -> bit for the ``MP_*`` keywords (default :data:`MASK_PLANES`).
    ragged : bool
        Give each spectrum a different length (the red end trimmed by 7·targetId pixels), so that
        WAVELENGTH, FLUX, MASK and SKY are written as BINTABLEs with a ``value`` column, as the
        datamodel does when lengths differ.
    fluxtable : bool
        Fill FLUXTABLE with per-arm samples (else empty arrays; the HDU is always written).
    defect : str
        ``""`` or a deliberately corrupt file: ``"missing_flux"`` (no FLUX HDU), ``"missing_target"``
        (no TARGET HDU), ``"row_mismatch"`` (FLUX has one row fewer than TARGET) or ``"truncated"``.
    visit : int, optional
        The visit of a pfsCalibrated file (default: the number in its name, ``pfsCalibrated-%06d.fits``).

    Returns
    -------
    pathlib.Path
    """
    from astropy.io.fits import BinTableHDU, Column, CompImageHDU, HDUList, ImageHDU, PrimaryHDU

    if defect not in _COADD_DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; expected one of {sorted(_COADD_DEFECTS)}")
    if kind not in ("pfsCoadd", "pfsCalibrated"):
        raise ValueError(f"kind must be 'pfsCoadd' or 'pfsCalibrated', got {kind!r}")
    path = pathlib.Path(path)
    if kind == "pfsCalibrated" and visit is None:
        m = re.match(r"pfsCalibrated-(\d+)", path.name)
        if not m:
            raise ValueError("a pfsCalibrated file needs its visit: pass visit= or name it pfsCalibrated-%06d.fits")
        visit = int(m.group(1))
    if kind != "pfsCalibrated" and visit is not None:
        raise ValueError("visit= is for pfsCalibrated (single-visit) files")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a float32 grid stays float32 (BITPIX -32), as drp_stella's WavelengthArray writes it
    wave = PFS_WAVE_NM if wave_nm is None else np.asarray(wave_nm, np.float32 if np.asarray(wave_nm).dtype ==
                                                          np.float32 else np.float64)
    planes = dict(MASK_PLANES if mask_planes is None else mask_planes)
    n = len(targets)
    rendered, waves = [], []
    for tid, t in enumerate(targets):
        w = wave[: wave.size - 7 * tid] if ragged else wave
        rendered.append(render_pfs_spectrum(t, w, mask_planes=planes))
        waves.append(w)

    primary = PrimaryHDU()
    primary.header["DAMD_VER"] = (1, "PfsTargetSpectra datamodel version")
    primary.header["DATATYPE"] = (kind, "PFS data product")
    primary.header["TELESCOP"] = "Subaru"
    primary.header["INSTRUME"] = "PFS"
    primary.header[_ORIGIN[0]] = _ORIGIN[1:]
    hdus = [primary]
    target_hdu = BinTableHDU.from_columns([
        Column("targetId", "I", array=np.arange(n, dtype=np.int16)),
        Column("catId", "J", array=np.array([t.cat_id for t in targets], np.int32)),
        Column("tract", "J", array=np.array([t.tract for t in targets], np.int32)),
        Column("patch", "PA()", array=[t.patch for t in targets]),
        Column("objId", "K", array=np.array([t.obj_id for t in targets], np.int64)),
        Column("ra", "D", array=np.array([t.ra for t in targets], np.float64)),
        Column("dec", "D", array=np.array([t.dec for t in targets], np.float64)),
        Column("targetType", "I", array=np.array([t.target_type for t in targets], np.int16)),
    ], name="TARGET")
    if defect != "missing_target":
        hdus.append(target_hdu)
    fluxes = [(tid, name, value) for tid, t in enumerate(targets) for name, value in _fiber_flux(t).items()]
    hdus.append(BinTableHDU.from_columns([
        Column("targetId", "I", array=np.array([f[0] for f in fluxes], np.int16)),
        Column("filterName", "PA()", array=[f[1] for f in fluxes]),
        Column("fiberFlux", "E", array=np.array([f[2] for f in fluxes], np.float32)),
    ], name="TARGETFLUX"))
    obs = _observations(targets, visit)
    hdus.append(BinTableHDU.from_columns([
        Column("targetId", "I", array=np.array(obs["targetId"], np.int16)),
        Column("visit", "J", array=np.array(obs["visit"], np.int32)),
        Column("arm", "PA()", array=obs["arm"]),
        Column("spectrograph", "I", array=np.array(obs["spectrograph"], np.int16)),
        Column("pfsDesignId", "K", array=np.array(obs["pfsDesignId"], np.int64)),
        Column("fiberId", "J", array=np.array(obs["fiberId"], np.int32)),
        Column("pfiNominal", "2D", array=np.array(obs["pfiNominal"], np.float64).reshape(-1, 2)),
        Column("pfiCenter", "2D", array=np.array(obs["pfiCenter"], np.float64).reshape(-1, 2)),
        Column("obsTime", "PA()", array=obs["obsTime"]),
        Column("expTime", "E", array=np.array(obs["expTime"], np.float32)),
    ], name="OBSERVATIONS"))

    def component(key, hdu_name, code, unit=None, compressed=False):
        data = [r[key] for r in rendered] if key != "wavelength" else waves
        if not ragged:
            arr = np.array(data)
            if defect == "row_mismatch" and key != "wavelength":
                arr = arr[:-1]
            hdu = (CompImageHDU if compressed else ImageHDU)(data=arr, name=hdu_name)
        else:
            hdu = BinTableHDU.from_columns([Column("value", f"P{code}()", array=data)], name=hdu_name)
        if unit:
            hdu.header["BUNIT"] = unit
        return hdu

    if ragged:
        hdus.append(component("wavelength", "WAVELENGTH", "D"))
    else:
        wh = ImageHDU(data=wave, name="WAVELENGTH")
        wh.header["BUNIT"] = "nm"
        hdus.append(wh)
    if defect != "missing_flux":
        hdus.append(component("flux", "FLUX", "E", "nJy"))
    mask_hdu = component("mask", "MASK", "J", compressed=True)
    mask_hdu.header.extend(_mp_header(planes))
    hdus.append(mask_hdu)
    hdus.append(component("sky", "SKY", "E", "nJy"))
    hdus.append(BinTableHDU.from_columns(
        [Column(f"row_{i}", "PE()", array=[r["covar"][i] for r in rendered]) for i in range(3)], name="COVAR"))
    hdus.append(ImageHDU(data=np.array([_covar2(r["covar"]) for r in rendered]), name="COVAR2"))
    hdus.append(BinTableHDU.from_columns([
        Column("targetId", "I", array=np.arange(n, dtype=np.int16)),
        Column("metadata", "PA()", array=[_metadata_yaml(t, planes, kind) for t in targets]),
    ], name="METADATA"))
    ft = [_fluxtable(t, planes) if fluxtable else {"wavelength": np.zeros(0), "flux": np.zeros(0, np.float32),
                                                    "error": np.zeros(0, np.float32), "mask": np.zeros(0, np.int64)}
          for t in targets]
    hdus.append(BinTableHDU.from_columns([
        Column("targetId", "I", array=np.arange(n, dtype=np.int16)),
        Column("wavelength", "QD()", array=[f["wavelength"] for f in ft]),
        Column("flux", "QE()", array=[f["flux"] for f in ft]),
        Column("error", "QE()", array=[f["error"] for f in ft]),
        Column("mask", "QJ()", array=[f["mask"].astype(np.int32) for f in ft]),
    ], name="FLUXTABLE"))
    notes = BinTableHDU.from_columns([], nrows=n, name="NOTES")
    notes.header["DAMD_VER"] = 1
    hdus.append(notes)
    _atomic_write(HDUList(hdus), path)
    if defect == "truncated":
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(int(size * 0.6) + 11)
    return path


def _wcs_cards(wave_min_nm: float, wave_max_nm: float, n: int) -> list[tuple]:
    """The datamodel's WavelengthArray WCS, with CUNIT1 = 'nm' as PROVENANCE.md gives it."""
    return [("WCSAXES", 1, "Number of coordinate axes"),
            ("CRPIX1", 0.5 * n + 1.5, "Pixel coordinate of reference point"),
            ("CDELT1", (wave_max_nm - wave_min_nm) / (n - 1), "[nm] Coordinate increment at reference point"),
            ("CUNIT1", "nm", "Units of coordinate increment and value"),
            ("CTYPE1", "WAVE", "Vacuum wavelength (linear)"),
            ("CRVAL1", 0.5 * (wave_min_nm + wave_max_nm), "[nm] Coordinate value at reference point"),
            ("CNAME1", "Wavelength", "Axis name for labelling purposes")]


def datamodel_wavelength_nm(wave_min_nm: float, wave_max_nm: float, n: int) -> np.ndarray:
    """The datamodel's ``WavelengthArray(min, max, n)``: ``linspace(min, max, n)`` nm, which :func:`_wcs_cards`
    describes as the datamodel's ``toFitsHeader`` does."""
    return np.linspace(wave_min_nm, wave_max_nm, n)


def write_pfs_object(out_dir: str | os.PathLike, target: PfsTarget, *, wave_range_nm: tuple = (350.0, 1260.0),
                     n_wave: int = 9101, mask_planes: dict | None = None, fluxtable: bool = True) -> pathlib.Path:
    """Write a legacy single-object ``pfsObject`` file (layout in the module docstring).

    The default grid is the older 0.1 nm pfsObject sampling (350–1260 nm, 9101 px), so reading it
    onto the DESI grid needs a real resampling (the pfsCoadd grid is pixel-aligned with DESI's).

    Returns
    -------
    pathlib.Path
        ``out_dir/pfsObject-%05d-%05d-%s-%016x-%03d-0x%016x.fits``.
    """
    from astropy.io.fits import BinTableHDU, Column, CompImageHDU, Header, HDUList, ImageHDU, PrimaryHDU

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    planes = dict(MASK_PLANES if mask_planes is None else mask_planes)
    cards = _wcs_cards(wave_range_nm[0], wave_range_nm[1], n_wave)
    wcs = Header()
    for c in cards:
        wcs[c[0]] = (c[1], c[2])
    wave = datamodel_wavelength_nm(wave_range_nm[0], wave_range_nm[1], n_wave)
    r = render_pfs_spectrum(target, wave, mask_planes=planes)

    primary = PrimaryHDU()
    primary.header["DATATYPE"] = ("pfsObject", "PFS data product")
    primary.header["TELESCOP"] = "Subaru"
    primary.header["INSTRUME"] = "PFS"
    primary.header[_ORIGIN[0]] = _ORIGIN[1:]
    fa_header = wcs.copy()  # the datamodel writes its version beside the WCS of every array HDU
    fa_header["DAMD_VER"] = (2, "PfsFiberArray datamodel version")
    flux = ImageHDU(r["flux"], header=fa_header.copy(), name="FLUX")
    flux.header["BUNIT"] = "nJy"
    mask_header = _mp_header(planes)
    mask_header.extend(fa_header.copy())
    mask = CompImageHDU(r["mask"], header=mask_header, name="MASK")
    ff = _fiber_flux(target)
    fl = max(len(k) for k in ff)
    thead = Header()
    for key, value in (("CATID", target.cat_id), ("TRACT", target.tract), ("PATCH", target.patch),
                       ("OBJID", target.obj_id), ("RA", target.ra), ("DEC", target.dec),
                       ("TARGETTYPE", target.target_type)):
        thead[f"HIERARCH {key}" if len(key) > 8 else key] = value
    tgt = BinTableHDU.from_columns([Column("filterName", f"{fl}A", array=list(ff)),
                                    Column("fiberFlux", "E", array=np.array(list(ff.values()), np.float32))],
                                   header=thead, name="TARGET")
    sky = ImageHDU(r["sky"], header=fa_header.copy(), name="SKY")
    covar = ImageHDU(r["covar"], header=fa_header.copy(), name="COVAR")
    covar2 = ImageHDU(_covar2(r["covar"]), name="COVAR2")
    obs = _observations([target])
    obs_hdu = BinTableHDU.from_columns([
        Column("visit", "J", array=np.array(obs["visit"], np.int32)),
        Column("arm", f"{max(len(a) for a in obs['arm'])}A", array=obs["arm"]),
        Column("spectrograph", "J", array=np.array(obs["spectrograph"], np.int32)),
        Column("pfsDesignId", "K", array=np.array(obs["pfsDesignId"], np.int64)),
        Column("fiberId", "J", array=np.array(obs["fiberId"], np.int32)),
        Column("pfiNominal", "2E", array=np.array(obs["pfiNominal"], np.float32).reshape(-1, 2)),
        Column("pfiCenter", "2E", array=np.array(obs["pfiCenter"], np.float32).reshape(-1, 2)),
    ], name="OBSERVATIONS")
    notes = BinTableHDU.from_columns([], nrows=1, name="NOTES")
    ft = _fluxtable(target, planes) if fluxtable else {"wavelength": np.zeros(0), "flux": np.zeros(0, np.float32),
                                                       "error": np.zeros(0, np.float32), "mask": np.zeros(0, np.int64)}
    ft_header = _mp_header(planes)
    ft_header["DAMD_VER"] = (1, "FluxTable datamodel version")
    ft_hdu = BinTableHDU.from_columns([Column("wavelength", "D", array=ft["wavelength"]),
                                       Column("flux", "E", array=ft["flux"]),
                                       Column("error", "E", array=ft["error"]),
                                       Column("mask", "K", array=ft["mask"])], header=ft_header, name="FLUX_TABLE")
    path = out / pfs_object_filename(target)
    return _atomic_write(HDUList([primary, flux, mask, tgt, sky, covar, covar2, obs_hdu, notes, ft_hdu]), path)


# ----------------------------------------------------------------------------------------------- redshifts

_Z_GRID = np.expm1(np.arange(0.0, np.log1p(6.0), 1e-3)).astype(np.float32)
_V_GRID = np.arange(-1000.0, 1000.1, 10.0).astype(np.float32)
_LINE_COLUMNS = ["lineName", "lineWave", "lineZ", "lineZError", "lineSigma", "lineSigmaError", "lineVelocity",
                 "lineVelocityError", "lineFlux", "lineFluxError", "lineEW", "lineEWError", "lineContinuumLevel",
                 "lineContinuumLevelError"]


def _ln_pdf(grid: np.ndarray, centres, sigmas, weights) -> np.ndarray:
    p = np.zeros(grid.size)
    for c, s, w in zip(centres, sigmas, weights):
        p += w * np.exp(-0.5 * ((grid - c) / s) ** 2) / s
    p = np.maximum(p, 1e-300)
    return np.log(p / np.trapezoid(p, grid)).astype(np.float32)


def write_pfs_cozcandidates(out_dir: str | os.PathLike, cat_id: int, targets: list[PfsTarget], *,
                            wave_nm: np.ndarray | None = None, n_galaxy_candidates: int = 3,
                            shuffle_candidates: bool = True) -> pathlib.Path:
    """Write ``pfsCoZCandidates-%05d.fits`` for the targets of one catId (layout in the module docstring).

    Each target with ``redshift_status == "ok"`` gets ``n_galaxy_candidates`` GALAXY candidates
    (cRank 0 at the true z, with the highest redshiftProba; ranks ≥ 1 at line-confusion aliases),
    one QSO and one STAR candidate, a classification (``target.spectype``), warnings and errors.
    ``"failed"`` targets get a galaxy-solver error and no GALAXY candidate; ``"absent"`` ones are
    left out. Candidate rows are shuffled (``shuffle_candidates``) so readers must use cRank.

    Returns
    -------
    pathlib.Path
    """
    from astropy.io.fits import BinTableHDU, Column, HDUList, ImageHDU, PrimaryHDU

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wave = PFS_WAVE_NM if wave_nm is None else np.asarray(wave_nm, np.float64)
    ts = [t for t in targets if t.redshift_status != "absent"]
    if any(t.cat_id != cat_id for t in ts):
        raise ValueError(f"every target must have catId {cat_id}")
    n = len(ts)
    primary = PrimaryHDU()
    for key, value, comment in (("D1D_VER", "0.48.0", "Version of the DRP_1D library"),
                                ("D1DP_VER", "0.48.0", "Version of the DRP_1DPIPE pipeline"),
                                ("DAMD_VER", 9, "Version of the data model"),
                                ("D2D_VER", "w.2025.10", "Version of stella"),
                                ("OBS_VER", "w.2025.10", "Version of obs pfs"),
                                ("U_PARAM", '{"mock": true}', "User Parameters content, json"),
                                _ORIGIN):
        primary.header[key] = (value, comment)
    tid = np.arange(n, dtype=np.int16)
    target = BinTableHDU.from_columns([
        Column("targetId", "I", array=tid),
        Column("catId", "J", array=np.array([t.cat_id for t in ts], np.int32)),
        Column("tract", "J", array=np.array([t.tract for t in ts], np.int32)),
        Column("patch", "A3", array=[t.patch for t in ts]),
        Column("objId", "K", array=np.array([t.obj_id for t in ts], np.int64)),
        Column("nVisit", "K", array=np.array([t.n_visit for t in ts], np.int64)),
        Column("visitHash", "K", array=np.array([t.visit_hash for t in ts], np.int64)),
        Column("ra", "D", array=np.array([t.ra for t in ts])),
        Column("dec", "D", array=np.array([t.dec for t in ts])),
        Column("targetType", "I", array=np.array([t.target_type for t in ts], np.int16)),
    ], name="TARGET")
    failed = np.array([t.redshift_status == "failed" for t in ts], bool)
    zwarn = np.array([(1 << 0) if (t.seed % 5 == 0) else 0 for t in ts], np.int64)  # AIR_VACUUM_CONVERSION_IGNORED
    warnings = BinTableHDU.from_columns(
        [Column("targetId", "I", array=tid), Column("initWarning", "K", array=np.zeros(n, np.int64)),
         Column("galaxyZWarning", "K", array=zwarn)]
        + [Column(c, "K", array=np.zeros(n, np.int64)) for c in ("QSOZWarning", "starZWarning", "galaxyLWarning",
                                                                  "QSOLWarning", "classificationWarning")],
        name="WARNINGS")
    gal_err = np.where(failed, 8, 0).astype(np.int64)  # BAD_CONTINUUMFIT
    errors = BinTableHDU.from_columns(
        [Column("targetId", "I", array=tid), Column("initError", "K", array=np.zeros(n, np.int64)),
         Column("galaxyZError", "K", array=gal_err)]
        + [Column(c, "K", array=np.zeros(n, np.int64)) for c in ("QSOZError", "starZError", "galaxyLError",
                                                                  "QSOLError", "classificationError")]
        + [Column("initErrorMessage", "100A", array=[""] * n),
           Column("galaxyZErrorMessage", "100A", array=["BAD_CONTINUUMFIT: negative continuum" if f else ""
                                                        for f in failed])]
        + [Column(c, "100A", array=[""] * n) for c in ("QSOZErrorMessage", "starZErrorMessage",
                                                        "galaxyLErrorMessage", "QSOLErrorMessage")],
        name="ERRORS")
    proba = {"GALAXY": (0.97, 0.02, 0.01), "QSO": (0.05, 0.93, 0.02), "STAR": (0.02, 0.01, 0.97)}
    classification = BinTableHDU.from_columns([
        Column("targetId", "I", array=tid),
        Column("class", "10A", array=[t.spectype or "GALAXY" for t in ts]),
        Column("probaGalaxy", "E", array=np.array([proba.get(t.spectype, proba["GALAXY"])[0] for t in ts], np.float32)),
        Column("probaQSO", "E", array=np.array([proba.get(t.spectype, proba["GALAXY"])[1] for t in ts], np.float32)),
        Column("probaStar", "E", array=np.array([proba.get(t.spectype, proba["GALAXY"])[2] for t in ts], np.float32)),
    ], name="CLASSIFICATION")
    hdus = [primary, target, warnings, errors, classification]

    for obj in ("GALAXY", "QSO"):
        rows, models, pdfs, lines = [], [], [], []
        for i, t in enumerate(ts):
            rng = np.random.default_rng(np.random.SeedSequence([t.seed, 0x9F5, 41, obj == "QSO"]))
            z = t.z
            zerr = float(1.5e-4 * (1 + z) * t.noise_scale)
            if obj == "GALAXY":
                if failed[i]:
                    pdfs.append(np.full(_Z_GRID.size, -np.log(_Z_GRID[-1]), np.float32))
                    continue
                alias = [(1 + z) * 6564.61 / 5008.24 - 1, (1 + z) * 5008.24 / 3728.5 - 1, (1 + z) * 1.12 - 1]
                zs = [z] + [a for a in alias if 0 < a < 6][: n_galaxy_candidates - 1]
                probas = [0.9] + [0.1 / (k + 1) / 1.5 for k in range(len(zs) - 1)]
            else:
                zs = [float(rng.uniform(0.5, 4.0))]
                probas = [0.6]
            for rank, (zc, pc) in enumerate(zip(zs, probas)):
                model_id = len(models)
                rows.append((i, rank, zc, zerr * (1 + rank), pc, "" if obj == "GALAXY" else "broadline",
                             "ssp_5Gyr_z008.dat" if obj == "GALAXY" else "qso_template.dat",
                             "linecatalog_ratios_sf.tsv", model_id))
                shifted = replace(t, z=zc)
                galaxy_model = obj == "GALAXY" and t.target_type == SCIENCE
                models.append(_model_njy(shifted, wave).astype(np.float32) if galaxy_model
                              else np.zeros(wave.size, np.float32))
            pdfs.append(_ln_pdf(_Z_GRID, zs, [max(zerr, 2e-3)] * len(zs), probas))
            if obj == "GALAXY" and t.target_type == SCIENCE:
                for name, lam in (("Halpha", 656.461), ("[OIII]5007", 500.824), ("Hbeta", 486.268)):
                    lines.append((i, name, lam, z, zerr, 0.15, 0.02, 80.0, 10.0, float(rng.uniform(1, 50)) * 1e-18,
                                  1e-18, 1.0, 0.1, 1000.0, 100.0))
        if shuffle_candidates and len(rows) > 1:
            order = np.random.default_rng(np.random.SeedSequence([int(cat_id), 0x9F5, 42])).permutation(len(rows))
            rows = [rows[k] for k in order]
        cand_cols = [
            Column("targetId", "I", array=np.array([r[0] for r in rows], np.int16)),
            Column("cRank", "J", array=np.array([r[1] for r in rows], np.int32)),
            Column("redshift", "E", array=np.array([r[2] for r in rows], np.float32)),
            Column("redshiftError", "E", array=np.array([r[3] for r in rows], np.float32)),
            Column("redshiftProba", "E", array=np.array([r[4] for r in rows], np.float32)),
            Column("subClass", "20A", array=[r[5] for r in rows]),
            Column("continuumFile", "50A", array=[r[6] for r in rows]),
            Column("lineCatalogRatioFile", "50A", array=[r[7] for r in rows]),
            Column("modelId", "I", array=np.array([r[8] for r in rows], np.int16)),
        ]
        hdus.append(BinTableHDU.from_columns(cand_cols, name=f"{obj}_CANDIDATES"))
        hdus.append(ImageHDU(data=np.array(models, np.float32).reshape(len(models), wave.size), name=f"{obj}_MODELS"))
        hdus.append(BinTableHDU.from_columns([Column("redshift", "E", array=_Z_GRID)], name=f"{obj}_REDSHIFT_GRID"))
        hdus.append(ImageHDU(data=np.array(pdfs, np.float32).reshape(n, _Z_GRID.size), name=f"{obj}_LN_PDF"))
        fmts = ["20A"] + ["E"] * 13
        hdus.append(BinTableHDU.from_columns(
            [Column("targetId", "I", array=np.array([r[0] for r in lines], np.int16))]
            + [Column(c, f, array=[r[k + 1] for r in lines] if f.endswith("A") else np.array([r[k + 1] for r in lines],
                                                                                              np.float32))
               for k, (c, f) in enumerate(zip(_LINE_COLUMNS, fmts))], name=f"{obj}_LINES"))
    star_rows = [(i, 0, float(t.z * 299792.458), 5.0, 0.9, "G2", "star_G2V.dat", i) for i, t in enumerate(ts)]
    hdus.append(BinTableHDU.from_columns([
        Column("targetId", "I", array=np.array([r[0] for r in star_rows], np.int16)),
        Column("cRank", "J", array=np.array([r[1] for r in star_rows], np.int32)),
        Column("velocity", "E", array=np.array([r[2] for r in star_rows], np.float32)),
        Column("velocityError", "E", array=np.array([r[3] for r in star_rows], np.float32)),
        Column("templateProba", "E", array=np.array([r[4] for r in star_rows], np.float32)),
        Column("subClass", "20A", array=[r[5] for r in star_rows]),
        Column("templateFile", "50A", array=[r[6] for r in star_rows]),
        Column("modelId", "I", array=np.array([r[7] for r in star_rows], np.int16)),
    ], name="STAR_CANDIDATES"))
    hdus.append(ImageHDU(data=np.zeros((n, wave.size), np.float32), name="STAR_MODELS"))
    hdus.append(BinTableHDU.from_columns([Column("velocity", "E", array=_V_GRID)], name="STAR_VELOCITY_GRID"))
    hdus.append(ImageHDU(data=np.array([_ln_pdf(_V_GRID, [r[2]], [20.0], [1.0]) for r in star_rows],
                                       np.float32).reshape(n, _V_GRID.size), name="STAR_LN_PDF"))
    return _atomic_write(HDUList(hdus), out / cozcandidates_filename(cat_id))


# ----------------------------------------------------------------------------------------------- survey


def _expected_reason(t: PfsTarget) -> str:
    if t.target_type == SKY:
        return "sky_fibre"
    if t.target_type == FLUXSTD:
        return "flux_standard"
    if t.target_type != SCIENCE:
        return "unassigned_fibre"
    if t.redshift_status != "ok":
        return "no_redshift"
    if t.spectype and t.spectype != "GALAXY":
        return "not_galaxy"
    return ""


def write_pfs_survey(out_dir: str | os.PathLike, n_objects: int = 24, seed: int = 7, *, n_files: int = 3,
                     n_pfs_objects: int = 2, n_sky: int = 2, n_fluxstd: int = 1, cat_ids: tuple = (1, 2),
                     n_bad: int = 0, special_cases: bool = True, fluxtable: bool = True) -> PfsSurvey:
    """Write a small mock PFS survey and return the truth for every spectrum.

    Layout: ``n_files`` multi-object files (the last one a ``pfsCalibrated-%06d.fits`` holding one visit's
    spectra of targets of every catId, the others ``pfsCoadd-%05d-%05d.fits`` of one catId each), each with its share of the
    ``n_objects`` galaxies plus ``n_sky`` sky fibres and ``n_fluxstd`` flux standards in shuffled rows;
    ``n_pfs_objects`` legacy ``pfsObject`` files (galaxies of ``cat_ids[0]``); one
    ``pfsCoZCandidates-%05d.fits`` per science catId; and ``n_bad`` corrupt pfsCoadd files (cycling
    through missing FLUX, missing TARGET, FLUX/TARGET row mismatch, truncated), whose galaxies are in no
    redshift file. With ``special_cases`` (and ≥ 6 galaxies in the multi-object files), one galaxy is
    absent from its redshift file, one has a failed galaxy fit (both → ``no_redshift``) and one is
    classified QSO (→ ``not_galaxy``). The pfsCalibrated file also holds single-visit spectra (noisier) of
    two galaxies of the first pfsCoadd, as a real visit file does: the same target twice, whose ``source_id``
    differ by the visit suffix (``-v%06d``).

    Parameters
    ----------
    out_dir : path-like
        Created; every file goes directly inside it.
    n_objects : int
        Galaxies (science targets) in the good files, pfsObject files included.
    seed : int
        Everything written is a deterministic function of the arguments.

    Returns
    -------
    PfsSurvey
    """
    import pyarrow as pa

    if n_files < 1 or n_objects < n_pfs_objects:
        raise ValueError("need n_files >= 1 and n_objects >= n_pfs_objects")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used: set = set()
    n_multi = n_objects - n_pfs_objects
    share = [n_multi // n_files + (1 if i < n_multi % n_files else 0) for i in range(n_files)]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9F5, 99]))
    files: list[tuple[str, str, list[PfsTarget]]] = []
    science: list[PfsTarget] = []
    for i in range(n_files):
        calibrated = n_files > 1 and i == n_files - 1
        planned = plan_pfs_targets(share[i], seed * 1000 + i, n_sky=n_sky, n_fluxstd=n_fluxstd,
                                   cat_id=cat_ids[i % len(cat_ids)], used_ids=used)
        if calibrated:  # a per-visit file holds targets of every catalogue, each seen once
            planned = [replace(t, cat_id=cat_ids[k % len(cat_ids)], n_visit=1) if t.target_type == SCIENCE
                       else replace(t, n_visit=1) for k, t in enumerate(planned)]
        science += [t for t in planned if t.target_type == SCIENCE]
        order = rng.permutation(len(planned))
        planned = [planned[k] for k in order]
        name = (f"pfsCalibrated-{120000 + i:06d}.fits" if calibrated
                else f"pfsCoadd-{cat_ids[i % len(cat_ids)]:05d}-{i:05d}.fits")
        files.append((name, "pfsCalibrated" if calibrated else "pfsCoadd", planned))
    visit_of = {name: 120000 + i for i, (name, kind, _) in enumerate(files) if kind == "pfsCalibrated"}
    if special_cases and len(science) >= 6:
        special = {science[0].obj_id: dict(redshift_status="absent"), science[2].obj_id: dict(redshift_status="failed"),
                   science[4].obj_id: dict(spectype="QSO")}
        files = [(name, kind, [replace(t, **special.get(t.obj_id, {})) for t in ts]) for name, kind, ts in files]
        science = [replace(t, **special.get(t.obj_id, {})) for t in science]
    if visit_of:  # single-visit spectra of coadd galaxies in the visit file: one visit's noise (n_visit times the variance)
        again = [replace(t, n_visit=1, noise_scale=t.noise_scale * t.n_visit, seed=t.seed + 7919)
                 for t in files[0][2] if t.target_type == SCIENCE and t.redshift_status == "ok"
                 and t.spectype == "GALAXY"][:2]
        files[-1] = (files[-1][0], files[-1][1], files[-1][2] + again)
    singles = plan_pfs_targets(n_pfs_objects, seed * 1000 + 500, cat_id=cat_ids[0], used_ids=used)
    science += singles

    paths, truth_rows, all_targets = [], [], []
    for name, kind, ts in files:
        paths.append(write_pfs_coadd(out / name, ts, kind=kind, fluxtable=fluxtable))
        suffix = f"-v{visit_of[name]:06d}" if name in visit_of else ""
        for row, t in enumerate(ts):
            truth_rows.append((t, name, row, kind, t.source_id + suffix))
    for t in singles:
        p = write_pfs_object(out, t, fluxtable=fluxtable)
        paths.append(p)
        truth_rows.append((t, p.name, 0, "pfsObject", t.source_id))
    redshift_paths = []
    for cid in sorted({t.cat_id for t in science}):
        redshift_paths.append(write_pfs_cozcandidates(out, cid, [t for t in science if t.cat_id == cid]))
    bad: dict[str, str] = {}
    defects = ["missing_flux", "missing_target", "row_mismatch", "truncated"]
    for k in range(n_bad):
        defect = defects[k % len(defects)]
        ts = plan_pfs_targets(3, seed * 1000 + 900 + k, n_sky=1, cat_id=90 + k, used_ids=used)
        name = f"pfsCoadd-{90 + k:05d}-{k:05d}.fits"
        write_pfs_coadd(out / name, ts, defect=defect, fluxtable=False)
        bad[name] = _COADD_DEFECTS[defect]

    cols: dict[str, list] = {c: [] for c in ("source_id", "source_file", "row_in_file", "kind", "cat_id", "obj_id",
                                             "tract", "patch", "ra", "dec", "target_type", "z", "spectype",
                                             "expected_reason", "w1_true", "w2_true", "w3_true", "w4_true")}
    for t, name, row, kind, sid in truth_rows:
        all_targets.append(t)
        for c, v in (("source_id", sid), ("source_file", name), ("row_in_file", row), ("kind", kind),
                     ("cat_id", t.cat_id), ("obj_id", t.obj_id), ("tract", t.tract), ("patch", t.patch),
                     ("ra", t.ra), ("dec", t.dec), ("target_type", t.target_type), ("z", t.z),
                     ("spectype", t.spectype), ("expected_reason", _expected_reason(t)), ("w1_true", t.w1_true),
                     ("w2_true", t.w2_true), ("w3_true", t.w3_true), ("w4_true", t.w4_true)):
            cols[c].append(v)
    types = {"row_in_file": pa.int32(), "cat_id": pa.int64(), "obj_id": pa.int64(), "tract": pa.int32(),
             "target_type": pa.int32()}
    truth = pa.table({c: pa.array(v, type=types.get(c)) for c, v in cols.items()})
    return PfsSurvey(paths=paths, redshift_paths=redshift_paths, truth=truth, bad=bad, targets=all_targets)
