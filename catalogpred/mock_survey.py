"""Survey-scale mock files: SDSS ``spPlate`` + ``specObj`` and DESI healpix ``coadd`` + ``redrock``.

Built on :mod:`catalogpred.mock`: the same planned galaxies (:func:`~catalogpred.mock.plan_sdss_survey`)
and the same physics (:func:`~catalogpred.mock.render_sdss_spec` for SDSS, the galaxy model behind it
for DESI), so the IR photometry of :func:`~catalogpred.mock.photometry_table` applies unchanged.
Every file says ``ORIGIN = 'catalogpred.mock'``: nothing here is survey data.

SDSS (:func:`write_spplate_survey`)
-----------------------------------
``spPlate-PPPP-MMMMM.fits`` per plate, laid out as the SDSS (DR8+) datamodel says:

===  ==========  ===========================================================================
HDU  EXTNAME     content
===  ==========  ===========================================================================
0    (primary)   flux, float32 [n_fiber, n_pix], 1e-17 erg/s/cm²/Å; ``COEFF0``/``COEFF1`` log-λ grid,
                 ``PLATEID``, ``MJD``, ``TILEID``, exposure keys (as a spec file's header, less fibre keys)
1    IVAR        float32 inverse variance (0 = no data)
2    ANDMASK     int32 SPPIXMASK bits
3    ORMASK      int32
4    WAVEDISP    float32, pixels
5    PLUGMAP     table, one row per fibre: OBJID, HOLETYPE, RA, DEC, MAG, XFOCAL, YFOCAL,
                 SPECTROGRAPHID, FIBERID, THROUGHPUT, PRIMTARGET, SECTARGET, OBJTYPE
6    SKY         float32 sky model
===  ==========  ===========================================================================

A target fibre holds *exactly* the pixels of the ``spec-PPPP-MMMMM-FFFF.fits`` file that
:func:`catalogpred.mock.write_sdss_spec` writes for the same object (same noise, masks and
coverage; outside its coverage ivar is 0 and ANDMASK says NODATA), so both ingest to identical
normalised spectra. Each plate also has sky fibres (``OBJTYPE 'SKY'``) and a few unplugged
fibres (``OBJTYPE 'NA'``), and one ``specObj-mock.fits`` table (the columns of the spec files'
``SPECOBJ`` HDU, one row per target, a single unnamed table HDU like ``specObj-dr17.fits``)
lists the objects: sky and unplugged fibres have no row.

DESI (:func:`write_desi_survey`)
--------------------------------
``healpix/SURVEY/PROGRAM/HPX//100/HPX/coadd-SURVEY-PROGRAM-HPX.fits`` with the HDUs of the real
fuji/iron healpix coadds (``FIBERMAP``, ``EXP_FIBERMAP``, ``B/R/Z_WAVELENGTH`` (f8, Å),
``_FLUX``/``_IVAR`` (f4), ``_MASK`` (uint32, BZERO), ``_RESOLUTION`` (f4 [n, 11, n_wave]),
``SCORES``; primary header SPGRP, SPGRPVAL, HPXPIXEL, HPXNSIDE, HPXNEST, SURVEY, PROGRAM) on the arm
grids 3600–5800 Å (2751 px), 5760–7620 Å (2326 px), 7520–9824 Å (2881 px) at 0.8 Å, and the
matching ``redrock-SURVEY-PROGRAM-HPX.fits`` (``REDSHIFTS`` with TARGETID, Z, ZERR, ZWARN, CHI2,
COEFF, FITMETHOD, NPIXELS, SPECTYPE, SUBTYPE, NCOEFF, DELTACHI2; ``FIBERMAP``, ``EXP_FIBERMAP``,
``TSNR2``). Each file has a few sky fibres (OBJTYPE SKY, TARGETID bit 59), unassigned fibres
(negative TARGETID, blank OBJTYPE), bad-fibre-status targets, ZWARN ≠ 0 fits and stars.

Both writers take a ``mapper`` (e.g. ``ProcessPoolExecutor(2).map``) to write files in parallel;
output is deterministic given the seed.
"""
from __future__ import annotations

import functools
import math
import os
import pathlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np

from .errors import RejectReason
from .mock import (
    ANDMASK_BITS,
    MockObject,
    _primary_cards,
    _rest_model,
    _sky_templates,
    _SKY_LINES,
    _K_LO,
    plan_sdss_survey,
    render_sdss_spec,
)

__all__ = [
    "PlatePlan",
    "SpPlateSurvey",
    "plan_spplate_survey",
    "write_spplate",
    "write_spplate_survey",
    "spplate_filename",
    "SPECOBJ_FILENAME",
    "DesiFilePlan",
    "DesiSurvey",
    "plan_desi_survey",
    "write_desi_file",
    "write_desi_survey",
    "DESI_ARMS",
]

#: name of the object table :func:`write_spplate_survey` writes (found by the spPlate reader as ``specObj*.fits``)
SPECOBJ_FILENAME = "specObj-mock.fits"
_NODATA = np.int32(1 << ANDMASK_BITS["NODATA"])
_ORIGIN = {"name": "ORIGIN", "value": "catalogpred.mock", "comment": "SYNTHETIC data, not survey data"}


def spplate_filename(plate: int, mjd: int) -> str:
    """``spPlate-PPPP-MMMMM.fits``, zero-padded as SDSS does."""
    return f"spPlate-{plate:04d}-{mjd:05d}.fits"


# ----------------------------------------------------------------------------------------- SDSS spPlate


@dataclass(frozen=True)
class PlatePlan:
    """One planned plate: its targets (as :class:`~catalogpred.mock.MockObject`) and the other fibres.

    ``k0`` is the global log-λ index of pixel 0 (``COEFF0 = k0/1e4``), ``n_pix`` the image width.
    """

    plate: int
    mjd: int
    n_fibers: int
    k0: int
    n_pix: int
    targets: tuple  #: MockObject per target fibre, by fibre
    sky_fibers: tuple  #: fibre numbers of sky fibres
    na_fibers: tuple  #: fibre numbers of unplugged fibres (no spectrum, no specObj row)
    seed: int

    @property
    def filename(self) -> str:
        return spplate_filename(self.plate, self.mjd)


@dataclass
class SpPlateSurvey:
    """What :func:`write_spplate_survey` wrote.

    Attributes
    ----------
    plate_paths : list of pathlib.Path
    specobj_path : pathlib.Path
        The object table (one row per target; PLATE, MJD, FIBERID, Z, …).
    plates : list of PlatePlan
    objects : list of MockObject
        Every target (these have specObj rows); :func:`catalogpred.mock.write_sdss_spec` writes
        the matching spec file of any of them.
    expected_rejects : dict of str to str
        ``source_id`` of every sky and unplugged fibre → the reject reason a reader gives it.
    """

    plate_paths: list[pathlib.Path]
    specobj_path: pathlib.Path
    plates: list[PlatePlan]
    objects: list[MockObject]
    expected_rejects: dict[str, str] = field(default_factory=dict)

    @property
    def n_spectra(self) -> int:
        """Fibres on all plates (= spectra an ingest counts)."""
        return sum(p.n_fibers for p in self.plates)


def plan_spplate_survey(n_plates: int, fibers_per_plate: int = 640, seed: int = 42) -> list[PlatePlan]:
    """Plan ``n_plates`` plates of ``fibers_per_plate`` fibres (legacy up to 640, BOSS up to 1000).

    Per plate 5 % of the fibres are sky fibres and 1.25 % unplugged (at least one each); the rest
    are galaxies planned by :func:`catalogpred.mock.plan_sdss_survey` (same seed, same physics).
    """
    if n_plates < 1:
        raise ValueError(f"n_plates must be >= 1, got {n_plates}")
    if not 4 <= fibers_per_plate <= 1000:
        raise ValueError(f"fibers_per_plate must be 4..1000 (SDSS legacy plates have 640, BOSS 1000), "
                         f"got {fibers_per_plate}")
    n_sky = max(1, round(fibers_per_plate * 32 / 640))
    n_na = max(1, round(fibers_per_plate * 8 / 640))
    n_targets = fibers_per_plate - n_sky - n_na
    boss = fibers_per_plate > 640
    objs = plan_sdss_survey(n_plates * n_targets, seed=seed, n_plates=n_plates, boss_fraction=1.0 if boss else 0.0)
    by_plate: dict[tuple[int, int], list[MockObject]] = {}
    for o in objs:
        by_plate.setdefault((o.plate, o.mjd), []).append(o)
    plans = []
    for i, ((plate, mjd), targets) in enumerate(sorted(by_plate.items())):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 21, i]))
        fibres = rng.permutation(np.arange(1, fibers_per_plate + 1))
        tfib = np.sort(fibres[:len(targets)])
        rest = fibres[len(targets):]
        targets = tuple(replace(o, fiberid=int(f)) for o, f in zip(targets, tfib))
        k0 = targets[0].coeff0_k
        n_pix = max(o.end_k for o in targets) - k0 + 1 + int(rng.integers(0, 8))
        plans.append(PlatePlan(plate=plate, mjd=mjd, n_fibers=fibers_per_plate, k0=k0, n_pix=n_pix, targets=targets,
                               sky_fibers=tuple(sorted(int(f) for f in rest[:n_sky])),
                               na_fibers=tuple(sorted(int(f) for f in rest[n_sky:])),
                               seed=int(rng.integers(0, 2**62))))
    return plans


_PLUGMAP_DTYPE = [
    ("OBJID", ">i4", (5,)), ("HOLETYPE", "S8"), ("RA", ">f8"), ("DEC", ">f8"), ("MAG", ">f4", (5,)),
    ("STARTTIME", ">i4"), ("ENDTIME", ">i4"), ("XFOCAL", ">f8"), ("YFOCAL", ">f8"), ("SPECTROGRAPHID", ">i4"),
    ("FIBERID", ">i4"), ("THROUGHPUT", ">i4"), ("PRIMTARGET", ">i4"), ("SECTARGET", ">i4"), ("OBJTYPE", "S16"),
]


def _plate_cards(plan: PlatePlan, rng: np.random.Generator) -> list[dict]:
    """A spec file's primary header for the plate, less its fibre keys, with the plate's grid."""
    drop = {"PLUG_RA", "PLUG_DEC", "SPEC_ID", "FIBERID", "FBADPIX"}
    cards = [c for c in _primary_cards(plan.targets[0], rng, fbadpix=0.0) if c["name"] not in drop | {"ORIGIN"}]
    for c in cards:
        if c["name"] == "COEFF0":
            c["value"] = round(plan.k0 / 1e4, 4)
    cards += [{"name": "NFIBER", "value": plan.n_fibers, "comment": "Number of fibers on the plate"}, _ORIGIN]
    return cards


def write_spplate(plan: PlatePlan, out_dir: str | os.PathLike) -> tuple[str, np.ndarray]:
    """Write one ``spPlate`` file; returns its path and the specObj rows of its targets.

    Deterministic given ``plan``; a pure module-level function (picklable for process pools).
    """
    import fitsio

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, 5]))
    n, npx, k0 = plan.n_fibers, plan.n_pix, plan.k0
    flux = np.zeros((n, npx), np.float32)
    ivar = np.zeros((n, npx), np.float32)
    andmask = np.full((n, npx), _NODATA, np.int32)
    ormask = np.full((n, npx), _NODATA, np.int32)
    wdisp = np.zeros((n, npx), np.float32)
    sky = np.zeros((n, npx), np.float32)
    plug = np.zeros(n, dtype=_PLUGMAP_DTYPE)
    plug["FIBERID"] = np.arange(1, n + 1)
    plug["HOLETYPE"] = "OBJECT"
    plug["SPECTROGRAPHID"] = np.where(plug["FIBERID"] <= (n + 1) // 2, 1, 2)
    plug["THROUGHPUT"] = 1
    rows = []
    for obj in plan.targets:
        r = render_sdss_spec(obj)
        c = r["coadd"]
        i, sl = obj.fiberid - 1, slice(obj.start_k - k0, obj.end_k - k0 + 1)
        flux[i, sl], ivar[i, sl] = c["flux"], c["ivar"]
        andmask[i, sl], ormask[i, sl] = c["and_mask"], c["or_mask"]
        wdisp[i, sl], sky[i, sl] = c["wdisp"], c["sky"]
        row = r["specobj"]
        rows.append(row)
        p = plug[i]
        p["RA"], p["DEC"], p["OBJTYPE"] = obj.ra, obj.dec, "GALAXY"
        p["PRIMTARGET"] = 64
        sf = np.clip(row["SPECTROFLUX"][0], 1e-3, None)
        p["MAG"] = np.round(22.5 - 2.5 * np.log10(sf), 3)
        p["OBJID"] = [obj.plate % 8000, 40, (obj.fiberid % 6) + 1, 100 + obj.plate % 300, obj.fiberid]
    # sky fibres: sky-subtracted noise; unplugged fibres stay flux 0, ivar 0, NODATA
    t0 = plan.targets[0]
    cont_t, lines_t, thru_t = _sky_templates(t0.flavour)
    sl_t = slice(k0 - _K_LO, k0 - _K_LO + npx)
    sky_cont, sky_lines, thru = cont_t[sl_t] * t0.sky_scale, lines_t[sl_t] * t0.sky_scale, thru_t[sl_t]
    for f in plan.sky_fibers:
        i = f - 1
        var = t0.noise_scale * (0.03 * (sky_cont + sky_lines) * thru + 0.1 * thru**2)
        flux[i] = np.sqrt(var) * rng.standard_normal(npx) + 0.015 * sky_lines * rng.standard_normal(npx)
        ivar[i] = 1.0 / var
        bright = sky_lines > 2.5 * sky_cont + 15.0
        andmask[i] = np.where(bright, np.int32(1 << ANDMASK_BITS["BRIGHTSKY"]), 0)
        ormask[i] = andmask[i]
        wdisp[i] = np.linspace(1.25, 0.9, npx)
        sky[i] = sky_cont + sky_lines
    r_plate = 1.49 * np.sqrt(rng.random(n))
    th = rng.uniform(0, 2 * np.pi, n)
    for f in plan.sky_fibers + plan.na_fibers:
        i = f - 1
        dec = float(np.clip(t0.plate_dec + r_plate[i] * np.sin(th[i]), -89.9, 89.9))
        plug[i]["RA"] = np.mod(t0.plate_ra + r_plate[i] * np.cos(th[i]) / np.cos(np.radians(dec)), 360.0)
        plug[i]["DEC"] = dec
        plug[i]["OBJTYPE"] = "SKY" if f in plan.sky_fibers else "NA"
        plug[i]["MAG"] = 25.0
        plug[i]["OBJID"] = -1
    # focal-plane position (≈ 217.7 mm per degree, tangent plane)
    dra = (((plug["RA"] - t0.plate_ra + 180.0) % 360.0) - 180.0) * np.cos(np.radians(t0.plate_dec))
    plug["XFOCAL"] = np.round(217.7358 * dra, 4)
    plug["YFOCAL"] = np.round(217.7358 * (plug["DEC"] - t0.plate_dec), 4)

    path = out / plan.filename
    tmp = path.with_name(path.name + ".part")
    with fitsio.FITS(str(tmp), "rw", clobber=True) as fh:
        fh.write(flux, header=_plate_cards(plan, rng))
        fh.write(ivar, extname="IVAR")
        fh.write(andmask, extname="ANDMASK")
        fh.write(ormask, extname="ORMASK")
        fh.write(wdisp, extname="WAVEDISP")
        fh.write(plug, extname="PLUGMAP")
        fh.write(sky, extname="SKY")
    os.replace(tmp, path)
    return str(path), np.concatenate(rows) if rows else np.zeros(0)


def _write_specobj(path: pathlib.Path, rows: np.ndarray) -> None:
    import fitsio

    rows = rows[np.lexsort((rows["FIBERID"], rows["MJD"], rows["PLATE"]))]
    tmp = path.with_name(path.name + ".part")
    with fitsio.FITS(str(tmp), "rw", clobber=True) as fh:
        fh.write(None, header=[_ORIGIN])
        fh.write(rows)  # a single unnamed table HDU, as specObj-dr17.fits
    os.replace(tmp, path)


def write_spplate_survey(out_dir: str | os.PathLike, n_plates: int, fibers_per_plate: int = 640, seed: int = 42,
                         mapper: Callable[..., Iterable[Any]] = map) -> SpPlateSurvey:
    """Write ``n_plates`` mock ``spPlate`` files and their ``specObj-mock.fits`` into ``out_dir``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Output folder (created).
    n_plates : int
    fibers_per_plate : int
        640 (legacy plates), up to 1000 (BOSS). Fewer make small test plates.
    seed : int
    mapper : callable
        ``mapper(fn, plans)`` running ``fn`` on every :class:`PlatePlan`, e.g. builtin ``map`` or
        ``ProcessPoolExecutor(2).map`` (a plate of 640 fibres takes ≈3 s to render).

    Returns
    -------
    SpPlateSurvey

    Examples
    --------
    >>> import tempfile
    >>> s = write_spplate_survey(tempfile.mkdtemp(), n_plates=1, fibers_per_plate=16, seed=1)
    >>> s.n_spectra, len(s.objects), sorted(set(s.expected_rejects.values()))
    (16, 14, ['no_redshift', 'sky_fibre'])
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_spplate_survey(n_plates, fibers_per_plate, seed)
    results = list(mapper(functools.partial(write_spplate, out_dir=str(out)), plans))
    specobj_path = out / SPECOBJ_FILENAME
    _write_specobj(specobj_path, np.concatenate([r for _, r in results]))
    expected = {}
    for p in plans:
        for f in p.sky_fibers:
            expected[f"sdss-{p.plate:04d}-{p.mjd:05d}-{f:04d}"] = RejectReason.SKY_FIBRE.value
        for f in p.na_fibers:
            expected[f"sdss-{p.plate:04d}-{p.mjd:05d}-{f:04d}"] = RejectReason.NO_REDSHIFT.value
    return SpPlateSurvey(plate_paths=[pathlib.Path(p) for p, _ in results], specobj_path=specobj_path, plates=plans,
                         objects=[o for p in plans for o in p.targets], expected_rejects=expected)


# ----------------------------------------------------------------------------------------- DESI healpix

#: DESI camera arms: name -> (first λ Å, number of pixels); all at 0.8 Å
DESI_ARMS = {"B": (3600.0, 2751), "R": (5760.0, 2326), "Z": (7520.0, 2881)}
_DESI_STEP = 0.8
_NSIDE = 64
_RESOLUTION_NDIAG = 11
#: fractions of a file's fibres with each role (the rest are good galaxies)
_DESI_ROLES = {"sky": 0.03, "unassigned": 0.01, "bad_fiberstatus": 0.01, "zwarn": 0.02, "star": 0.01, "qso": 0.01}
_ROLE_REASON = {
    "sky": RejectReason.SKY_FIBRE.value, "unassigned": RejectReason.UNASSIGNED_FIBRE.value,
    "bad_fiberstatus": RejectReason.BAD_FIBERSTATUS.value, "zwarn": RejectReason.ZWARN.value,
    "star": RejectReason.NOT_GALAXY.value, "qso": RejectReason.NOT_GALAXY.value,
}


@dataclass(frozen=True)
class DesiFilePlan:
    """One planned healpix coadd: its pixel, and per fibre a role and (for targets) a planned galaxy."""

    survey: str
    program: str
    healpix: int
    objects: tuple  #: MockObject per fibre (physics and noise seed; SDSS ids unused)
    roles: tuple  #: "galaxy", "sky", "unassigned", "bad_fiberstatus", "zwarn", "star" or "qso" per fibre
    targetids: tuple
    ra: tuple
    dec: tuple
    seed: int
    resolution: bool = True

    @property
    def stem(self) -> str:
        return f"{self.survey}-{self.program}-{self.healpix}"

    @property
    def folder(self) -> str:
        """``healpix/SURVEY/PROGRAM/HPX//100/HPX`` as in the DESI spectro redux tree."""
        return os.path.join("healpix", self.survey, self.program, str(self.healpix // 100), str(self.healpix))


@dataclass
class DesiSurvey:
    """What :func:`write_desi_survey` wrote: coadd and redrock paths, plans and the expected rejects."""

    coadd_paths: list[pathlib.Path]
    redrock_paths: list[pathlib.Path]
    files: list[DesiFilePlan]
    expected_rejects: dict[str, str] = field(default_factory=dict)  #: source_id -> reject reason

    @property
    def n_spectra(self) -> int:
        return sum(len(f.roles) for f in self.files)


def _targets_in_pixel(rng: np.random.Generator, hpx: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random positions (deg) inside HEALPix pixel ``hpx`` (nside 64, nested)."""
    import astropy.units as u
    from cdshealpix.nested import healpix_to_lonlat, lonlat_to_healpix

    depth = int(math.log2(_NSIDE))
    lon, lat = healpix_to_lonlat(np.array([hpx], np.uint64), depth)
    ra0, dec0 = float(lon.to_value(u.deg)[0]), float(lat.to_value(u.deg)[0])
    ra_out, dec_out = np.zeros(0), np.zeros(0)
    while len(ra_out) < n:
        dec = np.clip(dec0 + rng.uniform(-0.7, 0.7, 4 * n), -89.9, 89.9)
        ra = np.mod(ra0 + rng.uniform(-0.7, 0.7, 4 * n) / np.cos(np.radians(dec)), 360.0)
        inside = lonlat_to_healpix(ra * u.deg, dec * u.deg, depth).astype(np.int64) == hpx
        ra_out, dec_out = np.concatenate([ra_out, ra[inside]]), np.concatenate([dec_out, dec[inside]])
    return np.round(ra_out[:n], 8), np.round(dec_out[:n], 8)


def plan_desi_survey(n_files: int, spectra_per_file: int = 500, seed: int = 42, survey: str = "main",
                     program: str = "dark", resolution: bool = True) -> list[DesiFilePlan]:
    """Plan ``n_files`` healpix coadds of ``spectra_per_file`` fibres each (deterministic)."""
    import astropy.units as u
    from cdshealpix.nested import lonlat_to_healpix

    if n_files < 1 or spectra_per_file < 8:
        raise ValueError(f"need n_files >= 1 and spectra_per_file >= 8, got {n_files}, {spectra_per_file}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31]))
    objs = plan_sdss_survey(n_files * spectra_per_file, seed=seed + 7919)
    order = rng.permutation(len(objs))
    depth = int(math.log2(_NSIDE))
    pixels: list[int] = []
    while len(pixels) < n_files:
        ra = rng.uniform(0, 360)
        dec = float(np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-10)), np.sin(np.radians(70))))))
        hpx = int(lonlat_to_healpix(np.array([ra]) * u.deg, np.array([dec]) * u.deg, depth)[0])
        if hpx not in pixels:
            pixels.append(hpx)
    plans = []
    for i, hpx in enumerate(pixels):
        frng = np.random.default_rng(np.random.SeedSequence([int(seed), 32, i]))
        n = spectra_per_file
        roles = np.full(n, "galaxy", dtype=object)
        k = 0
        for role, frac in _DESI_ROLES.items():
            m = max(1, round(frac * n))
            roles[k:k + m] = role
            k += m
        roles = roles[frng.permutation(n)]
        ra, dec = _targets_in_pixel(frng, hpx, n)
        release, brickid = 9010, 300_000 + 7 * i  # DR9 south; a brick per file keeps TARGETIDs unique
        objid = np.arange(n, dtype=np.int64) + 1
        tid = (np.int64(release) << 42) | (np.int64(brickid) << 22) | objid
        tid = np.where(roles == "sky", tid | (np.int64(1) << 59), tid)
        tid = np.where(roles == "unassigned", -(1_000_000 + 5000 * i + objid), tid)
        chosen = [objs[j] for j in order[i * n:(i + 1) * n]]
        plans.append(DesiFilePlan(survey=survey, program=program, healpix=hpx, objects=tuple(chosen),
                                  roles=tuple(roles), targetids=tuple(int(t) for t in tid), ra=tuple(ra.tolist()),
                                  dec=tuple(dec.tolist()), seed=int(frng.integers(0, 2**62)), resolution=resolution))
    return plans


@functools.lru_cache(maxsize=1)
def _desi_sky() -> tuple[np.ndarray, np.ndarray]:
    """(continuum, lines) of the night sky on the DESI grid, 1e-17 erg/s/cm²/Å (sky_scale 1)."""
    from .spectra import DESI_GRID

    lam = DESI_GRID.wave
    cont = 3.8 + 2.2 * (lam - 3800.0) / 5400.0 + 1.5 * np.exp(-0.5 * ((lam - 5900.0) / 700.0) ** 2)
    lines = np.zeros_like(lam)
    for c, a in _SKY_LINES:
        lo, hi = np.searchsorted(lam, [c - 5.0, c + 5.0])
        lines[lo:hi] += a * np.exp(-0.5 * ((lam[lo:hi] - c) / 0.8) ** 2)
    return cont, lines


def _arm_throughput(wave: np.ndarray) -> np.ndarray:
    """Variance multiplier of one arm: rises steeply towards both ends (dichroic edges)."""
    lo, hi = wave[0], wave[-1]
    return 1.0 + 4.0 * np.exp(-(wave - lo) / 60.0) + 4.0 * np.exp((wave - hi) / 60.0)


def _resolution(n_wave: int) -> np.ndarray:
    """float32 [11, n_wave]: Gaussian resolution-matrix diagonals (σ ≈ 1 px), as DESI stores them."""
    d = np.arange(_RESOLUTION_NDIAG) - _RESOLUTION_NDIAG // 2
    sig = np.linspace(1.1, 0.9, n_wave)
    r = np.exp(-0.5 * (d[:, None] / sig[None, :]) ** 2)
    return (r / r.sum(0, keepdims=True)).astype(np.float32)


_FIBERMAP_COLUMNS = [
    ("TARGETID", ">i8"), ("COADD_FIBERSTATUS", ">i4"), ("TARGET_RA", ">f8"), ("TARGET_DEC", ">f8"), ("PMRA", ">f4"),
    ("PMDEC", ">f4"), ("REF_EPOCH", ">f4"), ("FA_TARGET", ">i8"), ("FA_TYPE", "u1"), ("OBJTYPE", "S3"),
    ("SUBPRIORITY", ">f8"), ("OBSCONDITIONS", ">i4"), ("RELEASE", ">i2"), ("BRICKNAME", "S8"), ("BRICKID", ">i4"),
    ("BRICK_OBJID", ">i4"), ("MORPHTYPE", "S4"), ("EBV", ">f4"), ("FLUX_G", ">f4"), ("FLUX_R", ">f4"),
    ("FLUX_Z", ">f4"), ("FLUX_W1", ">f4"), ("FLUX_W2", ">f4"), ("FLUX_IVAR_G", ">f4"), ("FLUX_IVAR_R", ">f4"),
    ("FLUX_IVAR_Z", ">f4"), ("FLUX_IVAR_W1", ">f4"), ("FLUX_IVAR_W2", ">f4"), ("FIBERFLUX_G", ">f4"),
    ("FIBERFLUX_R", ">f4"), ("FIBERFLUX_Z", ">f4"), ("FIBERTOTFLUX_G", ">f4"), ("FIBERTOTFLUX_R", ">f4"),
    ("FIBERTOTFLUX_Z", ">f4"), ("MASKBITS", ">i2"), ("SERSIC", ">f4"), ("SHAPE_R", ">f4"), ("SHAPE_E1", ">f4"),
    ("SHAPE_E2", ">f4"), ("REF_ID", ">i8"), ("REF_CAT", "S2"), ("GAIA_PHOT_G_MEAN_MAG", ">f4"),
    ("GAIA_PHOT_BP_MEAN_MAG", ">f4"), ("GAIA_PHOT_RP_MEAN_MAG", ">f4"), ("PARALLAX", ">f4"), ("PHOTSYS", "S1"),
    ("PRIORITY_INIT", ">i8"), ("NUMOBS_INIT", ">i8"),
    None,  # survey target-bit columns go here (SVn_* for sv surveys, then the main ones)
    ("DESI_TARGET", ">i8"), ("BGS_TARGET", ">i8"), ("MWS_TARGET", ">i8"),
    ("PLATE_RA", ">f8"), ("PLATE_DEC", ">f8"), ("COADD_NUMEXP", ">i2"), ("COADD_EXPTIME", ">f4"),
    ("COADD_NUMNIGHT", ">i2"), ("COADD_NUMTILE", ">i2"), ("MEAN_DELTA_X", ">f4"), ("RMS_DELTA_X", ">f4"),
    ("MEAN_DELTA_Y", ">f4"), ("RMS_DELTA_Y", ">f4"), ("MEAN_FIBER_RA", ">f8"), ("STD_FIBER_RA", ">f4"),
    ("MEAN_FIBER_DEC", ">f8"), ("STD_FIBER_DEC", ">f4"), ("MEAN_PSF_TO_FIBER_SPECFLUX", ">f4"),
]
_EXP_FIBERMAP_COLUMNS = [
    ("TARGETID", ">i8"), ("PRIORITY", ">i4"), ("SUBPRIORITY", ">f8"), ("NIGHT", ">i4"), ("EXPID", ">i4"),
    ("MJD", ">f8"), ("TILEID", ">i4"), ("EXPTIME", ">f8"), ("PETAL_LOC", ">i2"), ("DEVICE_LOC", ">i4"),
    ("LOCATION", ">i8"), ("FIBER", ">i4"), ("FIBERSTATUS", ">i4"), ("FIBERASSIGN_X", ">f4"),
    ("FIBERASSIGN_Y", ">f4"), ("LAMBDA_REF", ">f4"), ("PLATE_RA", ">f8"), ("PLATE_DEC", ">f8"), ("NUM_ITER", ">i8"),
    ("FIBER_X", ">f8"), ("FIBER_Y", ">f8"), ("DELTA_X", ">f8"), ("DELTA_Y", ">f8"), ("FIBER_RA", ">f8"),
    ("FIBER_DEC", ">f8"), ("PSF_TO_FIBER_SPECFLUX", ">f8"),
]
_TSNR2_NAMES = ("GPBDARK", "ELG", "GPBBRIGHT", "LYA", "BGS", "GPBBACKUP", "QSO", "LRG")
_REDSHIFTS_DTYPE = [
    ("TARGETID", ">i8"), ("Z", ">f8"), ("ZERR", ">f8"), ("ZWARN", ">i8"), ("CHI2", ">f8"), ("COEFF", ">f8", (10,)),
    ("FITMETHOD", "S4"), ("NPIXELS", ">i8"), ("SPECTYPE", "S6"), ("SUBTYPE", "S20"), ("NCOEFF", ">i8"),
    ("DELTACHI2", ">f8"),
]


def _fibermap_dtype(survey: str) -> list:
    """FIBERMAP columns of a healpix coadd: fuji sv3 (SV3_* then main target bits) or iron main."""
    sv = survey.startswith("sv")
    out = []
    for c in _FIBERMAP_COLUMNS:
        if c is None:
            if sv:
                p = survey.upper()
                out += [(f"{p}_{t}_TARGET", ">i8") for t in ("DESI", "BGS", "MWS", "SCND")]
            continue
        out.append(c)
        if c[0] == "MWS_TARGET" and not sv:
            out.append(("SCND_TARGET", ">i8"))
    return out


def _nanomaggies(mag_ab):
    return 10.0 ** ((22.5 - np.asarray(mag_ab, np.float64)) / 2.5)


def _primary_header(plan: DesiFilePlan, extra: list | None = None) -> list[dict]:
    cards = [
        ("SPGRP", "healpix", ""), ("SPGRPVAL", plan.healpix, ""), ("HPXPIXEL", plan.healpix, ""),
        ("HPXNSIDE", _NSIDE, ""), ("HPXNEST", True, ""), ("SURVEY", plan.survey, ""), ("PROGRAM", plan.program, ""),
    ]
    deps = [("python", "3.11"), ("numpy", np.__version__), ("desispec", "mock"), ("SPECPROD", "mock")]
    for i, (k, v) in enumerate(deps):
        cards += [(f"DEPNAM{i:02d}", k, ""), (f"DEPVER{i:02d}", v, "")]
    cards += extra or []
    return [{"name": k, "value": v, **({"comment": c} if c else {})} for k, v, c in cards] + [_ORIGIN]


def write_desi_file(plan: DesiFilePlan, out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write one mock ``coadd-*.fits`` and its ``redrock-*.fits``; returns both paths.

    Deterministic given ``plan``; a pure module-level function (picklable for process pools).
    """
    import fitsio

    from .spectra import DESI_GRID

    folder = pathlib.Path(out_dir) / plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, 1]))
    n = len(plan.roles)
    roles = np.array(plan.roles, dtype=object)
    tid = np.array(plan.targetids, np.int64)
    lam = DESI_GRID.wave
    wdisp = 0.77 / (lam * np.log(10.0) * 1e-4)  # σ ≈ 0.77 Å in SDSS pixel units, as _rest_model wants
    is_target = (roles != "sky") & (roles != "unassigned")
    model = np.zeros((n, lam.size))
    for i in np.flatnonzero(is_target):
        model[i] = _rest_model(plan.objects[i], lam, wdisp)
    cont, lines = _desi_sky()
    noise_scale = np.array([o.noise_scale for o in plan.objects])
    sky_scale = np.array([o.sky_scale for o in plan.objects])

    arms = {}
    for arm, (w0, nw) in DESI_ARMS.items():
        wave = w0 + _DESI_STEP * np.arange(nw)
        j0 = int(round((w0 - DESI_GRID.start) / DESI_GRID.step))
        sl = slice(j0, j0 + nw)
        thru = _arm_throughput(wave)
        sky = sky_scale[:, None] * (cont[sl] + lines[sl])[None, :]
        var = noise_scale[:, None] * (0.03 * (np.clip(model[:, sl], 0, None) + sky) * thru + 0.05 * thru**2)
        flux = model[:, sl] + np.sqrt(var) * rng.standard_normal((n, nw))
        ivar = 1.0 / var
        mask = np.zeros((n, nw), np.uint32)
        cosmic = rng.random((n, nw)) < 0.002
        mask[cosmic] |= np.uint32(1 << 2)  # COSMIC
        bright = (sky_scale[:, None] * lines[sl][None, :]) > 60.0
        mask[bright & (rng.random((n, nw)) < 0.3)] |= np.uint32(1 << 5)  # BRIGHTSKY
        ivar[mask != 0] = 0.0
        unassigned = roles == "unassigned"
        if unassigned.any():  # stuck / unassigned positioners: flux of blank sky, often no data
            dead = unassigned & (rng.random(n) < 0.5)
            mask[dead] |= np.uint32(1 << 8)  # NODATA
            ivar[dead] = 0.0
            flux[dead] = 0.0
        arms[arm] = {"wave": wave, "flux": flux.astype(np.float32), "ivar": ivar.astype(np.float32), "mask": mask}

    # FIBERMAP
    fm = np.zeros(n, dtype=_fibermap_dtype(plan.survey))
    fm["TARGETID"] = tid
    fm["TARGET_RA"], fm["TARGET_DEC"] = plan.ra, plan.dec
    fm["COADD_FIBERSTATUS"] = np.where(roles == "bad_fiberstatus", 8, 0)  # BROKENFIBER
    fm["COADD_FIBERSTATUS"] = np.where(roles == "unassigned", 2 ** 9, fm["COADD_FIBERSTATUS"])  # UNASSIGNED
    fm["OBJTYPE"] = np.where(roles == "sky", "SKY", np.where(roles == "unassigned", "", "TGT"))
    fm["REF_EPOCH"] = 2015.5
    fm["FA_TARGET"] = np.where(roles == "sky", 1 << 32, 1 << 1)
    fm["FA_TYPE"] = np.where(roles == "sky", 4, 1)
    fm["SUBPRIORITY"] = rng.random(n)
    fm["OBSCONDITIONS"] = np.where(roles == "unassigned", 0, 1)
    fm["RELEASE"] = np.where(tid > 0, (tid >> 42) & 0xFFFF, 0)
    fm["BRICKID"] = np.where(tid > 0, (tid >> 22) & 0xFFFFF, 0)
    fm["BRICK_OBJID"] = np.where(tid > 0, tid & 0x3FFFFF, 0)
    fm["BRICKNAME"] = np.where(tid > 0, "1234p012", "")
    fm["MORPHTYPE"] = np.where(is_target, "SER", "")
    fm["EBV"] = np.round(rng.uniform(0.01, 0.08, n), 4)
    w1 = np.array([o.w1_true for o in plan.objects]) + 2.699  # Vega -> AB
    w2 = np.array([o.w2_true for o in plan.objects]) + 3.339
    r_ab = 22.5 - 2.5 * np.log10(np.clip(np.median(model[:, 3000:4000], axis=1), 1e-3, None) * 3.0)
    fm["FLUX_W1"] = np.where(is_target, _nanomaggies(w1), 0)
    fm["FLUX_W2"] = np.where(is_target, _nanomaggies(w2), 0)
    fm["FLUX_IVAR_W1"] = np.where(is_target, 1.0 / (0.05 * fm["FLUX_W1"] + 2.0) ** 2, 0)
    fm["FLUX_IVAR_W2"] = np.where(is_target, 1.0 / (0.08 * fm["FLUX_W2"] + 5.0) ** 2, 0)
    for band, off in (("G", 0.8), ("R", 0.0), ("Z", -0.6)):
        f = np.where(is_target, _nanomaggies(r_ab + off), 0)
        fm[f"FLUX_{band}"], fm[f"FLUX_IVAR_{band}"] = f, np.where(is_target, 1.0 / (0.02 * f + 0.05) ** 2, 0)
        fm[f"FIBERFLUX_{band}"] = 0.4 * f
        fm[f"FIBERTOTFLUX_{band}"] = 0.42 * f
    fm["SERSIC"] = np.where(is_target, 1.0, 0)
    fm["SHAPE_R"] = np.where(is_target, np.round(rng.uniform(0.5, 3.0, n), 3), 0)
    fm["PHOTSYS"] = np.where(tid > 0, "S", "")
    fm["PRIORITY_INIT"] = np.where(is_target, 3200, 0)
    fm["NUMOBS_INIT"] = np.where(is_target, 1, 0)
    tcol = f"{plan.survey.upper()}_DESI_TARGET" if plan.survey.startswith("sv") else "DESI_TARGET"
    fm[tcol] = np.where(roles == "sky", 1 << 32, np.where(is_target, 1 << 0, 0))  # SKY / LRG bits
    fm["PLATE_RA"], fm["PLATE_DEC"] = fm["TARGET_RA"], fm["TARGET_DEC"]
    nexp = rng.integers(1, 4, n)
    fm["COADD_NUMEXP"] = nexp
    fm["COADD_EXPTIME"] = np.round(nexp * rng.uniform(800, 1100, n), 2)
    fm["COADD_NUMNIGHT"] = 1
    fm["COADD_NUMTILE"] = 1
    fm["MEAN_FIBER_RA"], fm["MEAN_FIBER_DEC"] = fm["TARGET_RA"], fm["TARGET_DEC"]
    fm["MEAN_PSF_TO_FIBER_SPECFLUX"] = np.round(rng.uniform(0.6, 0.8, n), 4)

    # EXP_FIBERMAP: one row per target and exposure
    rows = np.repeat(np.arange(n), nexp)
    ef = np.zeros(len(rows), dtype=_EXP_FIBERMAP_COLUMNS)
    ef["TARGETID"] = tid[rows]
    ef["PRIORITY"] = 3200
    ef["SUBPRIORITY"] = fm["SUBPRIORITY"][rows]
    ef["NIGHT"] = 20220101 + (plan.healpix % 28)
    ef["EXPID"] = 100000 + (plan.healpix % 1000) * 10 + np.concatenate([np.arange(k) for k in nexp])
    ef["MJD"] = 59580.3 + (plan.healpix % 28)
    ef["TILEID"] = 1000 + plan.healpix % 9000
    ef["EXPTIME"] = 900.0
    fiber = rng.permutation(5000)[:n]
    ef["PETAL_LOC"] = (fiber // 500)[rows]
    ef["DEVICE_LOC"] = (fiber % 500)[rows]
    ef["LOCATION"] = (1000 * (fiber // 500) + fiber % 500)[rows]
    ef["FIBER"] = fiber[rows]
    ef["FIBERSTATUS"] = fm["COADD_FIBERSTATUS"][rows]
    ef["LAMBDA_REF"] = 5400.0
    ef["PLATE_RA"], ef["PLATE_DEC"] = fm["TARGET_RA"][rows], fm["TARGET_DEC"][rows]
    ef["NUM_ITER"] = 2
    ef["FIBER_RA"], ef["FIBER_DEC"] = fm["TARGET_RA"][rows], fm["TARGET_DEC"][rows]
    ef["PSF_TO_FIBER_SPECFLUX"] = fm["MEAN_PSF_TO_FIBER_SPECFLUX"][rows]

    # SCORES (coadd) / TSNR2 (redrock)
    scores_dt = [("TARGETID", ">i8")]
    for arm in DESI_ARMS:
        scores_dt += [(f"INTEG_COADD_FLUX_{arm}", ">f4"), (f"MEDIAN_COADD_FLUX_{arm}", ">f4"),
                      (f"MEDIAN_COADD_SNR_{arm}", ">f4")]
    for arm in DESI_ARMS:
        scores_dt += [(f"TSNR2_{t}_{arm}", ">f4") for t in _TSNR2_NAMES]
    scores_dt += [(f"TSNR2_{t}", ">f4") for t in _TSNR2_NAMES]
    scores = np.zeros(n, dtype=scores_dt)
    scores["TARGETID"] = tid
    for arm, a in arms.items():
        scores[f"INTEG_COADD_FLUX_{arm}"] = a["flux"].sum(1) * _DESI_STEP
        scores[f"MEDIAN_COADD_FLUX_{arm}"] = np.median(a["flux"], axis=1)
        scores[f"MEDIAN_COADD_SNR_{arm}"] = np.median(a["flux"] * np.sqrt(a["ivar"]), axis=1)
        for t in _TSNR2_NAMES:
            scores[f"TSNR2_{t}_{arm}"] = np.where(is_target, 30.0 / noise_scale, 0)
    for t in _TSNR2_NAMES:
        scores[f"TSNR2_{t}"] = sum(scores[f"TSNR2_{t}_{a}"] for a in DESI_ARMS)
    tsnr2_dt = [("TARGETID", ">i8")] + [(f"TSNR2_{t}_{a}", ">f4") for a in DESI_ARMS for t in sorted(_TSNR2_NAMES)]
    tsnr2_dt += [(f"TSNR2_{t}", ">f4") for t in sorted(_TSNR2_NAMES)]
    tsnr2 = np.zeros(n, dtype=tsnr2_dt)
    for name in tsnr2.dtype.names:
        tsnr2[name] = scores[name]

    # REDSHIFTS (row-matched to FIBERMAP)
    z_true = np.array([o.z for o in plan.objects])
    zs = np.zeros(n, dtype=_REDSHIFTS_DTYPE)
    zs["TARGETID"] = tid
    zs["Z"] = np.where(is_target, z_true + rng.normal(0, 2e-5, n), rng.uniform(-0.002, 1.5, n))
    zs["Z"] = np.where(roles == "star", rng.normal(0, 1e-4, n), zs["Z"])
    zs["ZERR"] = np.abs(rng.normal(2e-5, 5e-6, n)) + 5e-6
    zs["ZWARN"] = np.where(roles == "zwarn", 4, 0)  # SMALL_DELTA_CHI2
    zs["ZWARN"] = np.where(roles == "sky", 1 | 4, zs["ZWARN"])  # SKY | SMALL_DELTA_CHI2
    zs["ZWARN"] = np.where(roles == "unassigned", 512 | 4, zs["ZWARN"])  # NODATA | SMALL_DELTA_CHI2
    zs["CHI2"] = np.round(rng.uniform(0.9, 1.2, n) * 7700, 2)
    zs["COEFF"][:, :3] = rng.normal(0, 1, (n, 3))
    zs["FITMETHOD"] = "PCA"
    zs["NPIXELS"] = 7700
    zs["SPECTYPE"] = np.where(roles == "star", "STAR", np.where(roles == "qso", "QSO", "GALAXY"))
    zs["SPECTYPE"] = np.where(np.isin(roles, ["sky", "unassigned"]), "QSO", zs["SPECTYPE"])
    zs["SUBTYPE"] = np.where(roles == "star", "K", "")
    zs["NCOEFF"] = np.where(roles == "star", 5, 10)
    zs["DELTACHI2"] = np.where(np.isin(roles, ["zwarn", "sky", "unassigned"]), rng.uniform(0.5, 8.0, n),
                               rng.uniform(60.0, 5000.0, n))

    coadd = folder / f"coadd-{plan.stem}.fits"
    redrock = folder / f"redrock-{plan.stem}.fits"
    tmp = coadd.with_name(coadd.name + ".part")
    with fitsio.FITS(str(tmp), "rw", clobber=True) as fh:
        fh.write(None, header=_primary_header(plan, [("FIBERMIN", int(fiber.min()), "")]))
        fh.write(fm, extname="FIBERMAP")
        fh.write(ef, extname="EXP_FIBERMAP")
        for arm, a in arms.items():
            fh.write(a["wave"], extname=f"{arm}_WAVELENGTH", header=[{"name": "BUNIT", "value": "Angstrom"}])
            fh.write(a["flux"], extname=f"{arm}_FLUX",
                     header=[{"name": "BUNIT", "value": "10**-17 erg/(s cm2 Angstrom)"}])
            fh.write(a["ivar"], extname=f"{arm}_IVAR",
                     header=[{"name": "BUNIT", "value": "10**+34 (s2 cm4 Angstrom2) / erg2"}])
            fh.write(a["mask"], extname=f"{arm}_MASK")  # uint32: fitsio writes BZERO = 2**31, as fuji
            if plan.resolution:
                res = np.ascontiguousarray(np.broadcast_to(_resolution(len(a["wave"])), (n, _RESOLUTION_NDIAG,
                                                                                        len(a["wave"]))))
                fh.write(res, extname=f"{arm}_RESOLUTION")
        fh.write(scores, extname="SCORES")
    os.replace(tmp, coadd)
    tmp = redrock.with_name(redrock.name + ".part")
    with fitsio.FITS(str(tmp), "rw", clobber=True) as fh:
        fh.write(None, header=_primary_header(plan, [("RRVER", "0.20.2", "Redrock version")]))
        fh.write(zs, extname="REDSHIFTS")
        fh.write(fm, extname="FIBERMAP")
        fh.write(ef, extname="EXP_FIBERMAP")
        fh.write(tsnr2, extname="TSNR2")
    os.replace(tmp, redrock)
    return str(coadd), str(redrock)


def write_desi_survey(out_dir: str | os.PathLike, n_files: int, spectra_per_file: int = 500, seed: int = 42, *,
                      survey: str = "main", program: str = "dark", resolution: bool = True,
                      mapper: Callable[..., Iterable[Any]] = map) -> DesiSurvey:
    """Write ``n_files`` mock DESI healpix coadds (+ redrock files) under ``out_dir/healpix/…``.

    Parameters
    ----------
    out_dir : str or os.PathLike
    n_files, spectra_per_file : int
        Files and fibres per file (≥ 8: every file has each kind of reject).
    seed : int
    survey, program : str
        Header SURVEY/PROGRAM and file names (``coadd-main-dark-HPX.fits``).
    resolution : bool
        Write the ``X_RESOLUTION`` HDUs (44 bytes per pixel: they make up ~75 % of a real coadd;
        readers here never read them).
    mapper : callable
        ``mapper(fn, plans)``, e.g. ``ProcessPoolExecutor(2).map``.

    Returns
    -------
    DesiSurvey
        Paths, plans and ``expected_rejects`` (source_id → reason) for sky, unassigned,
        bad-fibre-status, ZWARN and non-galaxy fibres.
    """
    plans = plan_desi_survey(n_files, spectra_per_file, seed, survey=survey, program=program, resolution=resolution)
    results = list(mapper(functools.partial(write_desi_file, out_dir=str(out_dir)), plans))
    expected = {}
    for p in plans:
        for t, role in zip(p.targetids, p.roles):
            if role != "galaxy":
                expected[f"desi-{p.survey}-{p.program}-{t}"] = _ROLE_REASON[role]
    return DesiSurvey(coadd_paths=[pathlib.Path(c) for c, _ in results],
                      redrock_paths=[pathlib.Path(r) for _, r in results], files=plans, expected_rejects=expected)
