"""PFS reader: multi-object ``pfsCoadd`` / ``pfsCalibrated`` and legacy single-object ``pfsObject`` files.

Format (FORMATS.md, ``../shared/realdata/pfs/PROVENANCE.md``; PFS datamodel, DAMD_VER=1):

- ``pfsCoadd``/``pfsCalibrated`` (same layout): ``TARGET`` (targetId, catId, tract, patch, objId, ra,
  dec, targetType), ``OBSERVATIONS``, ``WAVELENGTH`` (nm; one shared row, or a ``value`` table
  when spectra differ), ``FLUX`` [nobj, nwave] (F_ν, nJy), ``MASK`` (CompImageHDU, planes declared
  as ``MP_<NAME> = bit`` keywords), ``COVAR`` (table; ``row_0`` = variance in nJy²), ….
- ``pfsObject``: ``FLUX`` [nwave] with a linear wavelength WCS (``CTYPE1 = 'WAVE'``, ``CUNIT1``
  nm — Å and m are accepted too), ``MASK``, ``COVAR`` (image 3 × nwave), and the ids as
  ``TARGET`` header keywords (CATID, TRACT, PATCH, OBJID, RA, DEC, TARGETTYPE).

Every spectrum is put on :data:`~catalogpred.spectra.DESI_GRID` so the DESI encoder can serve
(MODEL.md; until a PFS encoder exists, PFS predictions come from a DESI-trained encoder):

1. nm → Å; F_ν [nJy] → F_λ [1e-17 erg/s/cm²/Å] per pixel with
   :func:`~catalogpred.spectra.fnu_njy_to_flam17` (ivar = 1/COVAR row_0, scaled by the inverse square;
   rows 1 and 2, the covariances with the next two pixels, enter the resampled variance off the DESI pixels).
2. Pixels with a *bad* mask bit, NaN/inf flux, or variance ≤ 0 / non-finite get ivar 0 (NaN flux
   on NO_DATA pixels is masked data, not corruption). Bad = every bit except the informational
   planes :data:`INFO_PLANES` (DETECTED, DETECTED_NEGATIVE, OVERLAP, FIBERTRACE, REFLINE), read
   from the ``MP_*`` keywords (MASK header, else METADATA YAML, else FLUX/primary header), never
   hard-coded; bits no keyword declares count as bad.
3. :func:`~catalogpred.spectra.resample_flux_conserving` onto the DESI grid. Output pixels outside
   the PFS range (3600–3700 Å for the 370–1270 nm grid) get ``NO_COVERAGE``; covered pixels without
   any good input get ``PIPELINE`` (both with ivar 0). The pfsCoadd grid (0.8 Å from 3700 Å) is
   pixel-aligned with DESI's, so there the resampling keeps each pixel's value, also for drp_stella's
   float32 wavelengths (edges within :data:`_SNAP_TOL` of a pixel snap together). PFS light beyond the
   DESI grid's red end (9824 Å: 982–1270 nm, most of the near-IR arm) is not used.

Redshifts: from a user table (``ReadOptions.redshifts``; columns ``catId``/``objId`` or
``cat_id``/``obj_id`` and ``z``, or a ``pfsCoZCandidates`` file) when it is keyed by (catId, objId),
which then is the only source; otherwise from ``pfsCoZCandidates-%05d.fits`` (per catId, also
spelled ``pfsCoZcandidates``) next to the spectrum: the GALAXY candidate with the lowest ``cRank``
(ties: highest ``redshiftProba``), linked to TARGET by targetId, with ``galaxyZWarning`` as
``zwarning`` and the CLASSIFICATION ``class`` as ``spectype``.

Selection (:class:`~catalogpred.surveys.Selection`): SKY → ``sky_fibre``, FLUXSTD → ``flux_standard``,
other non-science types (UNASSIGNED, ENGINEERING, SUNSS) → ``unassigned_fibre``, no redshift →
``no_redshift``, a class not in ``Selection.spectypes`` → ``not_galaxy``. PFS redshift warnings
(drp_1d ZLWarning flags) do not reject.

Ids: ``source_id = "pfs-%05d-%016x" % (catId, objId)`` (as in PFS file names), unique across surveys, for
coadds (pfsCoadd, pfsObject). A ``pfsCalibrated-*`` file holds single-visit spectra, so its rows get the visit
appended, ``"-v%06d"`` (the target's one OBSERVATIONS visit, else the visit in the file name), as DESI
per-exposure rows get ``-e{expid}``: a target's coadd and its single-visit spectra stay separate rows, and the
coadd keeps the plain id whichever file is ingested first.
"""
from __future__ import annotations

import functools
import logging
import os
import re

import numpy as np

from ..errors import ConfigError, InputFileError, RejectReason
from ..redshifts import RedshiftTable, load_redshift_table
from ..spectra import DESI_GRID, PixelMask, fnu_njy_to_flam17, resample_flux_conserving
from . import (COMMON_META, ColumnDoc, ReadOptions, Reader, SelectionRejects, SpectrumBlock, given_or_beside,
               register_auxiliary, register_reader)

__all__ = ["identify", "identify_redshifts", "read", "count", "PFS_META", "PFS_DOCS", "INFO_PLANES", "mask_planes",
           "bad_mask_bits", "load_cozcandidates", "find_cozcandidates", "wcs_wavelength_angstrom"]

log = logging.getLogger(__name__)

#: survey-native columns added to :data:`~catalogpred.surveys.COMMON_META`.
PFS_META = {
    "cat_id": "i8",  # catId: catalogue of the objId
    "obj_id": "i8",  # objId (64-bit, e.g. HSC object id)
    "tract": "i4",
    "patch": "U",  # "m,n"
    "target_type": "i4",  # 1 SCIENCE, 2 SKY, 3 FLUXSTD, 4 UNASSIGNED, 5 ENGINEERING, ...
    "n_visit": "i4",  # distinct visits in the coadd (OBSERVATIONS; an arm's rows share their visit)
    "spectype": "U",  # redshift-fit class (GALAXY, QSO, STAR); "" if unknown
}

#: catalog descriptions of :data:`PFS_META`.
PFS_DOCS = {
    "cat_id": ColumnDoc("PFS catId: the catalogue that obj_id belongs to", "", "meta.id"),
    "obj_id": ColumnDoc("PFS objId in that catalogue (64-bit, e.g. an HSC object id)", "", "meta.id"),
    "tract": ColumnDoc("Sky tract of the target", "", "meta.id.part"),
    "patch": ColumnDoc("Sky patch in the tract ('m,n')", "", "meta.id.part"),
    "target_type": ColumnDoc("PFS TargetType (1 SCIENCE, 2 SKY, 3 FLUXSTD, 4 UNASSIGNED, 5 ENGINEERING, ...)", "",
                             "meta.code"),
    "n_visit": ColumnDoc("Distinct visits in the coadd (OBSERVATIONS.visit, as the datamodel counts nVisit); "
                         "1 for the single-visit spectra of pfsCalibrated files", "",
                         "meta.number"),
    "spectype": ColumnDoc("Redshift-fit spectral class (GALAXY, QSO, STAR); empty when unknown", "", "src.class"),
}

#: datamodel TargetType values.
TARGET_TYPE_NAMES = {1: "SCIENCE", 2: "SKY", 3: "FLUXSTD", 4: "UNASSIGNED", 5: "ENGINEERING",
                     6: "SUNSS_IMAGING", 7: "SUNSS_DIFFUSE"}
SCIENCE, SKY, FLUXSTD = 1, 2, 3

#: mask planes that describe good data (everything else is bad).
INFO_PLANES = frozenset({"DETECTED", "DETECTED_NEGATIVE", "OVERLAP", "FIBERTRACE", "REFLINE"})

#: HDUs that only PFS spectrum files have together; a file with ≥ 4 of them (and COVAR or
#: OBSERVATIONS) is claimed, so a PFS file missing FLUX or TARGET is reported as missing_hdu.
_PFS_HDUS = frozenset({"TARGET", "TARGETFLUX", "OBSERVATIONS", "WAVELENGTH", "FLUX", "MASK", "SKY", "COVAR",
                       "COVAR2", "METADATA", "FLUXTABLE", "FLUX_TABLE", "NOTES"})
_REDSHIFT_HDUS = ("GALAXY_CANDIDATES",)
_UNIT_TO_ANGSTROM = {"nm": 10.0, "angstrom": 1.0, "a": 1.0, "aa": 1.0, "m": 1e10, "um": 1e4, "micron": 1e4,
                     "cm": 1e8}
#: a ``pfsCalibrated`` file (``pfsCalibrated-%06d.fits``, or a butler name such as ``pfsCalibrated-PFS-123456-...``):
#: single-visit spectra of every target of one visit; the first number in the name is the visit when the
#: OBSERVATIONS HDU does not give a target's own
_CALIBRATED_NAME = re.compile(r"^pfsCalibrated\D*?0*(\d+)", re.I)
_OBJECT_NAME = re.compile(r"^pfsObject-(\d{5})-(\d{5})-(.*)-([0-9a-f]{16})-(\d{3})-0x([0-9a-f]{16})\.fits", re.I)
_CHUNK = 256  # spectra resampled at once (bounds memory for 2394-fibre files)
#: how far (in DESI pixels, 0.8 Å) a PFS pixel edge may sit from a DESI edge and still count as the same edge.
#: drp_stella's WavelengthArray is float32: its 0.08 nm grid is off the exact one by up to 5.9e-4 Å = 7.4e-4 px,
#: and with the resampler's default 1e-6 every DESI pixel kept a sliver of its neighbour, so a masked pixel took
#: its neighbour's flux at full weight. Snapping moves a bin edge by at most 0.0016 Å (flux conserved to 2e-3
#: of a pixel over the nominal bins).
_SNAP_TOL = 2e-3
_UINT64 = (1 << 64) - 1


def identify(hdu_names: set) -> bool:
    """PFS spectra: TARGET + FLUX + OBSERVATIONS (pfsCoadd/pfsCalibrated/pfsObject), or most of their HDUs."""
    if any(h in hdu_names for h in _REDSHIFT_HDUS):
        return False
    found = _PFS_HDUS & hdu_names
    return len(found) >= 4 and ("COVAR" in found or "OBSERVATIONS" in found) and ("FLUX" in found or "TARGET" in found)


def identify_redshifts(hdu_names: set) -> bool:
    """pfsCoZCandidates (drp_1dpipe): GALAXY_CANDIDATES with TARGET or CLASSIFICATION, no spectra."""
    return "GALAXY_CANDIDATES" in hdu_names and ("TARGET" in hdu_names or "CLASSIFICATION" in hdu_names)


def _hdu_names(fits) -> set:
    return {(h.get_extname() or "").upper() for h in fits}


def count(fits) -> int:
    """Spectra in the file: TARGET rows (FLUX rows if TARGET is missing); 1 for pfsObject. Never raises."""
    try:
        names = _hdu_names(fits)
        image = "FLUX" in names and fits["FLUX"].get_exttype() == "IMAGE_HDU"
        dims = list(fits["FLUX"].get_dims()) if image else []
        if "WAVELENGTH" not in names and image and len(dims) == 1:
            return 1  # pfsObject
        if "TARGET" in names:
            return max(1, int(fits["TARGET"].get_nrows()))
        if image and len(dims) == 2:
            return max(1, int(dims[0]))
        if "FLUX" in names and not image:
            return max(1, int(fits["FLUX"].get_nrows()))
    except Exception:  # noqa: BLE001 - read() reports what is wrong
        pass
    return 1


# ----------------------------------------------------------------------------------------------- masks


def mask_planes(*headers) -> dict:
    """Mask plane name -> bit from ``MP_<NAME>`` keywords (also ``HIERARCH MP_<NAME>``), first header that has any."""
    for header in headers:
        if header is None:
            continue
        planes = {}
        for key in header.keys() if hasattr(header, "keys") else header:
            k = str(key).upper()
            if k.startswith("HIERARCH "):
                k = k[len("HIERARCH "):]
            if k.startswith("MP_"):
                try:
                    planes[k[3:]] = int(header[key])
                except (TypeError, ValueError):
                    continue
        if planes:
            return planes
    return {}


def bad_mask_bits(planes: dict) -> np.int64:
    """Bits that make a pixel bad: every bit (0..62) except those of :data:`INFO_PLANES`.

    An ``np.int64``, so ``mask & bad_mask_bits(planes)`` works on int32 masks too (it upcasts).
    """
    info = 0
    for name, bit in planes.items():
        if name in INFO_PLANES and 0 <= bit < 63:
            info |= 1 << bit
    return np.int64(((1 << 63) - 1) & ~info)


# ----------------------------------------------------------------------------------------------- redshifts


def _text(values) -> np.ndarray:
    out = []
    for v in values:
        if isinstance(v, bytes):
            v = v.decode("ascii", "replace")
        elif isinstance(v, np.ndarray):  # var-length char arrays read as arrays of characters
            v = "".join(x.decode() if isinstance(x, bytes) else str(x) for x in v.ravel())
        out.append(str(v).strip())
    return np.array(out, dtype=object)


def _cols(data) -> dict:
    return {c.lower(): c for c in (data.dtype.names or ())}


@functools.lru_cache(maxsize=32)
def _load_coz(path: str, mtime: float) -> RedshiftTable:
    import fitsio

    name = os.path.basename(path)
    with fitsio.FITS(path) as f:
        names = _hdu_names(f)
        if "TARGET" not in names or "GALAXY_CANDIDATES" not in names:
            raise ConfigError(f"{name}: a pfsCoZCandidates file needs TARGET and GALAXY_CANDIDATES HDUs")
        tgt = f["TARGET"].read()
        tc = _cols(tgt)
        if not {"targetid", "catid", "objid"} <= set(tc):
            raise ConfigError(f"{name}: TARGET lacks targetId/catId/objId")
        cand = f["GALAXY_CANDIDATES"].read() if f["GALAXY_CANDIDATES"].get_nrows() else None
        warn = f["WARNINGS"].read() if "WARNINGS" in names and f["WARNINGS"].get_nrows() else None
        err = f["ERRORS"].read() if "ERRORS" in names and f["ERRORS"].get_nrows() else None
        cls = f["CLASSIFICATION"].read() if "CLASSIFICATION" in names and f["CLASSIFICATION"].get_nrows() else None
    tid = np.asarray(tgt[tc["targetid"]], np.int64)
    n = len(tid)
    row_of = {int(t): i for i, t in enumerate(tid)}
    z = np.full(n, np.nan)
    zerr = np.full(n, np.nan)
    best = np.full(n, np.inf)
    best_p = np.full(n, -np.inf)
    if cand is not None:
        cc = _cols(cand)
        ctid = np.asarray(cand[cc["targetid"]], np.int64)
        rank = np.asarray(cand[cc["crank"]], np.float64) if "crank" in cc else np.zeros(len(cand))
        proba = np.asarray(cand[cc["redshiftproba"]], np.float64) if "redshiftproba" in cc else np.zeros(len(cand))
        zc = np.asarray(cand[cc.get("redshift", cc.get("z"))], np.float64)
        err_col = cc.get("redshifterror", cc.get("redshiferror"))  # older drp_1dpipe spelled it redshifError
        ze = np.asarray(cand[err_col], np.float64) if err_col else np.full(len(cand), np.nan)
        for k in range(len(cand)):
            i = row_of.get(int(ctid[k]))
            if i is None or not np.isfinite(zc[k]):
                continue
            if (rank[k], -proba[k]) < (best[i], -best_p[i]):
                best[i], best_p[i], z[i], zerr[i] = rank[k], proba[k], zc[k], ze[k]

    def per_target(table, column, default, dtype):
        out = np.full(n, default, dtype=dtype)
        if table is not None:
            c = _cols(table)
            if column in c and "targetid" in c:
                vals = table[c[column]] if dtype is not object else _text(table[c[column]])
                for t, v in zip(np.asarray(table[c["targetid"]], np.int64), vals):
                    if int(t) in row_of:
                        out[row_of[int(t)]] = v
        return out

    zwarn = per_target(warn, "galaxyzwarning", 0, np.int64)
    zerror = per_target(err, "galaxyzerror", 0, np.int64)
    spectype = per_target(cls, "class", "", object)
    ok = np.isfinite(z) & (zerror == 0)
    columns = {"cat_id": np.asarray(tgt[tc["catid"]], np.int64)[ok],
               "obj_id": np.asarray(tgt[tc["objid"]], np.int64)[ok],
               "z": z[ok], "z_err": zerr[ok], "zwarn": zwarn[ok], "spectype": spectype[ok]}
    return RedshiftTable(columns, source=name)


def load_cozcandidates(path: str | os.PathLike) -> RedshiftTable:
    """Best GALAXY redshift per (catId, objId) of a ``pfsCoZCandidates`` file (cached per process).

    The best candidate has the lowest ``cRank`` (ties: highest ``redshiftProba``). Targets whose galaxy
    solver reports an error (ERRORS.galaxyZError ≠ 0) or that have no GALAXY candidate are left out.
    ``zwarn`` is WARNINGS.galaxyZWarning and ``spectype`` the CLASSIFICATION class.

    Raises
    ------
    ConfigError
        If the file lacks TARGET/GALAXY_CANDIDATES or repeats a (catId, objId).
    """
    path = os.path.abspath(str(path))
    return _load_coz(path, os.path.getmtime(path))


def find_cozcandidates(directory: str, cat_id: int, given=()) -> str | None:
    """``pfsCoZCandidates-%05d.fits`` (or drp_1dpipe's ``pfsCoZcandidates-…``) for ``cat_id`` in ``directory``,
    else among the redshift files ``given`` as ingest inputs."""
    return given_or_beside([f"{stem}-{int(cat_id):05d}.fits" for stem in ("pfsCoZCandidates", "pfsCoZcandidates")],
                           directory, given)


def _is_coz_file(path: str) -> bool:
    if not str(path).lower().endswith((".fits", ".fit", ".fits.gz", ".fits.fz")):
        return False
    import fitsio

    try:
        with fitsio.FITS(str(path)) as f:
            return identify_redshifts(_hdu_names(f))
    except Exception:  # noqa: BLE001 - not FITS: let load_redshift_table report it
        return False


@functools.lru_cache(maxsize=8)
def _user_table(path: str, mtime: float) -> RedshiftTable:
    return load_cozcandidates(path) if _is_coz_file(path) else load_redshift_table(path)


def _redshifts(path: str, options: ReadOptions, cat_id: np.ndarray, obj_id: np.ndarray) -> dict:
    """found, z, z_err, zwarn, spectype and a miss detail per spectrum."""
    n = len(cat_id)
    out = {"found": np.zeros(n, bool), "z": np.full(n, np.nan), "z_err": np.full(n, np.nan),
           "zwarn": np.zeros(n, np.int64), "spectype": np.full(n, "", dtype=object),
           "detail": np.full(n, "", dtype=object)}
    if options.redshifts:
        upath = os.path.abspath(str(options.redshifts))
        if not os.path.exists(upath):
            raise ConfigError(f"redshift table {upath} does not exist")
        table = _user_table(upath, os.path.getmtime(upath))
        if table.id_columns == ("cat_id", "obj_id"):
            got = table.lookup(cat_id, obj_id)
            for k in ("found", "z", "z_err", "spectype"):
                out[k] = np.asarray(got[k], dtype=out[k].dtype)
            out["zwarn"] = np.asarray(got["zwarn"], np.int64)
            out["detail"][:] = f"(catId, objId) not in {table.source}"
            return out
        log.debug("%s is keyed by %s, not (catId, objId): PFS redshifts come from pfsCoZCandidates files",
                  table.source, table.id_columns)
    directory = os.path.dirname(os.path.abspath(str(path)))
    for cid in np.unique(cat_id):
        sel = cat_id == cid
        zpath = find_cozcandidates(directory, int(cid), options.redshift_files)
        if zpath is None:
            out["detail"][sel] = (f"no pfsCoZCandidates-{int(cid):05d}.fits beside the file or among the inputs, "
                                  "and no --redshifts table")
            continue
        try:
            table = load_cozcandidates(zpath)
        except (ConfigError, OSError, ValueError) as exc:
            out["detail"][sel] = f"cannot use {os.path.basename(zpath)}: {exc}"
            continue
        got = table.lookup(cat_id[sel], obj_id[sel])
        for k in ("found", "z", "z_err", "spectype"):
            out[k][sel] = got[k]
        out["zwarn"][sel] = np.asarray(got["zwarn"], np.int64)
        out["detail"][sel] = f"no GALAXY redshift for this objId in {os.path.basename(zpath)}"
    return out


# ----------------------------------------------------------------------------------------------- reading


def _mask_bits_int64(mask) -> np.ndarray:
    """A MASK array as int64 bit planes: an int32 MASK (the datamodel's) with bit 31 set is negative, and a plain
    cast would sign-extend it into bits 32-63, which :func:`bad_mask_bits` counts as bad."""
    m = np.asarray(mask)
    return m.astype(np.int64) & 0xFFFFFFFF if m.dtype.itemsize <= 4 else m.astype(np.int64)


def _distinct_visits(fits) -> int:
    """Distinct ``visit`` values of a single-object file's OBSERVATIONS (its rows, without a visit column)."""
    h = fits["OBSERVATIONS"]
    col = next((c for c in h.get_colnames() if c.lower() == "visit"), None)
    return int(len(np.unique(h.read(columns=[col])[col]))) if col and h.get_nrows() else int(h.get_nrows())


def wcs_wavelength_angstrom(header, n: int, name: str = "") -> np.ndarray:
    """Vacuum λ (Å) of the n pixels of a linear ``WAVE`` WCS: ``CRVAL1 + (p − CRPIX1)·CDELT1`` in CUNIT1.

    The PFS datamodel (``WavelengthArray``) writes ``CRVAL1`` = the middle wavelength and ``CRPIX1 = n/2 + 1.5``,
    and reads its array back with astropy's 0-based ``pixel_to_world(1.0 .. n)``: array element i sits at
    FITS pixel p = i + 2, and λ runs from its minimum to its maximum. A header with that ``CRPIX1`` is read
    the datamodel's way (else the files it wrote would be read 1 pixel too blue); any other by the FITS
    standard, p = i + 1.
    """
    keys = {str(k).upper(): k for k in header.keys()}
    missing = [k for k in ("CRVAL1", "CRPIX1") if k not in keys] + ([] if ("CDELT1" in keys or "CD1_1" in keys)
                                                                    else ["CDELT1"])
    if missing:
        raise InputFileError(f"{name}: no WAVELENGTH HDU and no wavelength WCS in the FLUX header (missing {missing})",
                             RejectReason.MISSING_HDU)
    ctype = str(header[keys["CTYPE1"]]).strip().upper() if "CTYPE1" in keys else "WAVE"
    if not ctype.startswith("WAVE"):
        raise InputFileError(f"{name}: FLUX CTYPE1 = {ctype!r}, expected a linear WAVE axis",
                             RejectReason.UNKNOWN_FORMAT)
    unit = str(header[keys["CUNIT1"]]).strip() if "CUNIT1" in keys else "nm"
    scale = _UNIT_TO_ANGSTROM.get(unit.lower())
    if scale is None:
        raise InputFileError(f"{name}: FLUX CUNIT1 = {unit!r}; expected nm, Angstrom or m", RejectReason.UNKNOWN_FORMAT)
    cdelt = float(header[keys["CDELT1"]] if "CDELT1" in keys else header[keys["CD1_1"]])
    crpix = float(header[keys["CRPIX1"]])
    first = 2 if abs(crpix - (0.5 * n + 1.5)) < 1e-9 else 1  # the datamodel's own convention (above)
    p = np.arange(first, n + first, dtype=np.float64)
    return (float(header[keys["CRVAL1"]]) + (p - crpix) * cdelt) * scale


def _component(fits, hdu: str, n_rows: int | None, name: str) -> list | np.ndarray:
    """FLUX/MASK/SKY/WAVELENGTH: an image [n, nwave] (or [nwave]) or a ``value`` table of per-row arrays."""
    h = fits[hdu]
    if h.get_exttype() == "IMAGE_HDU":
        return h.read()
    data = h.read(vstorage="object")
    c = _cols(data)
    if "value" not in c:
        raise InputFileError(f"{name}: {hdu} is a table without a 'value' column", RejectReason.UNREADABLE_FILE)
    return [np.asarray(v) for v in data[c["value"]]]


def _covariance(fits, name: str, off_diagonal: bool = False) -> tuple[list, list | None]:
    """COVAR per spectrum: the variance (row 0: the table's ``row_0`` column, or the image's first row), and
    with ``off_diagonal`` the covariances with the next pixels (rows 1 and 2, as float [2, nwave]; None when
    the file has none). nJy²."""
    h = fits["COVAR"]
    if h.get_exttype() == "IMAGE_HDU":
        c = h.read()
        if c.ndim == 2:  # pfsObject [3, nwave]
            c = c[None]
        if c.ndim != 3 or c.shape[1] < 1:  # [nobj, 3, nwave]
            raise InputFileError(f"{name}: COVAR image has shape {c.shape}", RejectReason.INCONSISTENT_FILE)
        return list(c[:, 0, :]), (list(c[:, 1:3, :]) if off_diagonal and c.shape[1] > 1 else None)
    names = h.get_colnames()
    if "row_0" not in names:
        raise InputFileError(f"{name}: COVAR table has no row_0 (variance) column", RejectReason.MISSING_HDU)
    lags = [c for c in ("row_1", "row_2") if c in names] if off_diagonal else []
    data = h.read(columns=["row_0", *lags], vstorage="object")
    var = [np.asarray(v) for v in data["row_0"]]
    if not lags:
        return var, None
    return var, [np.stack([np.asarray(data[c][i]) for c in lags]) for i in range(len(var))]


def _aligned_with_desi(wave_nm) -> bool:
    """True when every pixel of ``wave_nm`` is one DESI-grid pixel (0.8 Å steps on DESI's pixel centres, as
    pfsCoadd's 0.08 nm grid from 370 nm): resampling then maps pixel to pixel, and neighbour covariances
    cannot change any pixel's variance."""
    w = np.asarray(wave_nm, np.float64) * 10.0
    if w.size < 2 or DESI_GRID.kind != "linear":
        return False
    k = (w - DESI_GRID.start) / DESI_GRID.step
    return bool(np.all(np.abs(k - np.round(k)) < _SNAP_TOL) and np.all(np.diff(np.round(k)) == 1))


def _rows(x) -> list:
    if isinstance(x, np.ndarray):
        return list(x[None, :] if x.ndim == 1 else x)
    return list(x)


def _to_desi(waves: list, fluxes: list, variances: list, masks: list, bad_bits: int, covariances: list | None = None):
    """nm/nJy arrays per spectrum → flux, ivar (1e-17 erg/s/cm²/Å) and PixelMask on the DESI grid.

    ``covariances`` (optional, per spectrum float [K, nwave] nJy², COVAR rows 1..K) enter the resampled variance
    (:func:`~catalogpred.spectra.resample_flux_conserving`'s ``covar``)."""
    n = len(fluxes)
    out_flux = np.zeros((n, DESI_GRID.n_pix), np.float32)
    out_ivar = np.zeros((n, DESI_GRID.n_pix), np.float32)
    out_mask = np.zeros((n, DESI_GRID.n_pix), np.uint8)
    groups: dict = {}
    for i, w in enumerate(waves):  # spectra sharing one wavelength array are resampled together
        groups.setdefault(id(w), []).append(i)
    for idx in groups.values():
        wave_aa = np.asarray(waves[idx[0]], np.float64) * 10.0
        factor = fnu_njy_to_flam17(np.ones(1), wave_aa)  # [nwave]
        for lo in range(0, len(idx), _CHUNK):
            rows = idx[lo:lo + _CHUNK]
            flux = np.stack([np.asarray(fluxes[i], np.float64) for i in rows])
            var = np.stack([np.asarray(variances[i], np.float64) for i in rows])
            mask = np.stack([_mask_bits_int64(masks[i]) for i in rows])
            with np.errstate(divide="ignore", invalid="ignore"):
                good = ((mask & bad_bits) == 0) & np.isfinite(flux) & np.isfinite(var) & (var > 0)
                ivar = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0) / factor**2
            flam = np.where(good, flux, 0.0) * factor
            covar = None
            if covariances is not None:  # Cov(F_λi, F_λi+L) = Cov(F_νi, F_νi+L) · factor_i · factor_i+L
                c = np.stack([np.asarray(covariances[i], np.float64) for i in rows])
                covar = np.zeros_like(c)
                for lag in range(1, c.shape[1] + 1):
                    covar[:, lag - 1, :-lag] = c[:, lag - 1, :-lag] * factor[:-lag] * factor[lag:]
            f_out, iv_out, covered = resample_flux_conserving(wave_aa, flam, ivar, DESI_GRID.wave, covar=covar,
                                                              snap_tol=_SNAP_TOL)
            m = np.where(covered, 0, int(PixelMask.NO_COVERAGE)).astype(np.uint8)[None, :]
            m = m | np.where(covered[None, :] & (iv_out <= 0), int(PixelMask.PIPELINE), 0).astype(np.uint8)
            out_flux[rows], out_ivar[rows], out_mask[rows] = f_out, iv_out, m
    return out_flux, out_ivar, out_mask


def _read_multi(fits, name: str, names: set) -> dict:
    """pfsCoadd / pfsCalibrated: per-spectrum arrays and TARGET columns."""
    for h in ("TARGET", "FLUX", "COVAR"):
        if h not in names:
            raise InputFileError(f"{name}: no {h} HDU (a pfsCoadd/pfsCalibrated file needs TARGET, WAVELENGTH, FLUX, "
                                 "MASK, COVAR)", RejectReason.MISSING_HDU)
    target = fits["TARGET"].read()
    tc = _cols(target)
    missing = [c for c in ("catid", "objid") if c not in tc]
    if missing:
        raise InputFileError(f"{name}: TARGET lacks columns {missing}", RejectReason.MISSING_HDU)
    n = len(target)
    flux = _rows(_component(fits, "FLUX", n, name))
    mask = _rows(_component(fits, "MASK", n, name)) if "MASK" in names else [np.zeros(len(f), np.int64) for f in flux]
    wave = _rows(_component(fits, "WAVELENGTH", n, name))
    if len(wave) == 1 and n > 1:
        wave = wave * n
    grids = {id(w): w for w in wave}.values()  # one shared grid, or one per spectrum
    var, covar = _covariance(fits, name, off_diagonal=not all(_aligned_with_desi(w) for w in grids))
    shapes = {"FLUX": len(flux), "MASK": len(mask), "COVAR": len(var), "WAVELENGTH": len(wave)}
    if any(v != n for v in shapes.values()):
        raise InputFileError(f"{name}: TARGET has {n} rows but " + ", ".join(f"{k} {v}" for k, v in shapes.items()),
                             RejectReason.INCONSISTENT_FILE)
    for i in range(n):
        lens = {len(wave[i]), len(flux[i]), len(var[i]), len(mask[i])} | ({covar[i].shape[-1]} if covar else set())
        if len(lens) != 1:
            raise InputFileError(f"{name}: spectrum {i} has WAVELENGTH/FLUX/COVAR/MASK lengths "
                                 f"{len(wave[i])}/{len(flux[i])}/{len(var[i])}/{len(mask[i])}",
                                 RejectReason.INCONSISTENT_FILE)
    headers = [fits["MASK"].read_header() if "MASK" in names else None]
    if "METADATA" in names and fits["METADATA"].get_nrows():
        headers.append(_metadata_header(fits, name))
    headers += [fits["FLUX"].read_header(), fits[0].read_header()]
    n_visit = np.zeros(n, np.int32)
    one_visit = np.full(n, -1, np.int64)  # the target's visit where its OBSERVATIONS rows name only one
    if "OBSERVATIONS" in names and "targetid" in tc:
        obs = fits["OBSERVATIONS"].read(columns=[c for c in fits["OBSERVATIONS"].get_colnames()
                                                 if c.lower() in ("targetid", "visit")])
        if len(obs):
            oc = {c.lower(): c for c in obs.dtype.names}
            tid_obs = np.asarray(obs[oc["targetid"]], np.int64)
            visit = np.asarray(obs[oc["visit"]], np.int64) if "visit" in oc else np.arange(len(obs))
            pairs = np.unique(np.stack([tid_obs, visit], 1), axis=0)  # a visit counts once per target
            counts = dict(zip(*np.unique(pairs[:, 0], return_counts=True)))
            n_visit = np.array([counts.get(int(t), 0) for t in target[tc["targetid"]]], np.int32)
            if "visit" in oc:
                last = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
                one_visit = np.array([last[int(t)] if counts.get(int(t), 0) == 1 else -1
                                      for t in target[tc["targetid"]]], np.int64)

    def col(c, default, dtype):
        return np.asarray(target[tc[c]], dtype) if c in tc else np.full(n, default, dtype)

    return {"n": n, "wave": wave, "flux": flux, "var": var, "covar": covar, "mask": mask, "planes": mask_planes(*headers),
            "cat_id": col("catid", -1, np.int64), "obj_id": col("objid", -1, np.int64),
            "tract": col("tract", -1, np.int32), "patch": _text(target[tc["patch"]]) if "patch" in tc else
            np.full(n, "", dtype=object), "ra": col("ra", np.nan, np.float64), "dec": col("dec", np.nan, np.float64),
            "target_type": col("targettype", SCIENCE, np.int32), "n_visit": n_visit, "visit": one_visit}


def _metadata_header(fits, name: str) -> dict | None:
    """MP_ keys of METADATA row 0 (YAML), or None."""
    try:
        import yaml

        md = fits["METADATA"].read(rows=[0])
        c = _cols(md)
        text = _text(md[c["metadata"]])[0] if "metadata" in c else ""
        d = yaml.safe_load(text) if text else None
        return d if isinstance(d, dict) else None
    except Exception:  # noqa: BLE001 - the MASK header is the primary source; this is a fallback
        log.debug("%s: METADATA is not YAML", name)
        return None


def _read_object(fits, name: str, names: set) -> dict:
    """Legacy pfsObject: one spectrum, wavelength from the FLUX WCS (or a WAVELENGTH image in nm, which the
    datamodel writes instead of a WCS for a wavelength that is not a uniform WavelengthArray), ids from TARGET
    header keywords."""
    flux = np.asarray(fits["FLUX"].read(), np.float64).ravel()
    fhdr = fits["FLUX"].read_header()
    if "WAVELENGTH" in names:
        wave_aa = np.asarray(fits["WAVELENGTH"].read(), np.float64).ravel() * 10.0
        if wave_aa.size != flux.size:
            raise InputFileError(f"{name}: WAVELENGTH has {wave_aa.size} values, FLUX {flux.size}",
                                 RejectReason.INCONSISTENT_FILE)
    else:
        wave_aa = wcs_wavelength_angstrom(fhdr, flux.size, name)
    if "COVAR" not in names:
        raise InputFileError(f"{name}: no COVAR HDU (variance)", RejectReason.MISSING_HDU)
    var, covar = _covariance(fits, name, off_diagonal=not _aligned_with_desi(wave_aa / 10.0))
    mask = np.asarray(fits["MASK"].read(), np.int64).ravel() if "MASK" in names else np.zeros(flux.size, np.int64)
    if len(var[0]) != flux.size or mask.size != flux.size or (covar and covar[0].shape[-1] != flux.size):
        raise InputFileError(f"{name}: FLUX has {flux.size} pixels, COVAR {len(var[0])}, MASK {mask.size}",
                             RejectReason.INCONSISTENT_FILE)
    thdr = fits["TARGET"].read_header() if "TARGET" in names else {}
    tkeys = {str(k).upper().replace("HIERARCH ", ""): k for k in (thdr.keys() if thdr else [])}

    def key(k, default=None):
        return thdr[tkeys[k]] if k in tkeys else default

    m = _OBJECT_NAME.match(name)
    cat_id, obj_id = key("CATID"), key("OBJID")
    if (cat_id is None or obj_id is None) and m:
        cat_id, obj_id = int(m.group(1)), int(m.group(4), 16)
    if cat_id is None or obj_id is None:
        raise InputFileError(f"{name}: no TARGET header keywords CATID/OBJID and no pfsObject file name to take "
                             "them from", RejectReason.MISSING_HDU)
    obj_id = int(obj_id)
    if obj_id > (1 << 63) - 1:  # a %016x id above int64: two's complement
        obj_id -= 1 << 64
    n_visit = _distinct_visits(fits) if "OBSERVATIONS" in names else (int(m.group(5)) if m else 0)
    headers = [fits["MASK"].read_header() if "MASK" in names else None, fhdr, fits[0].read_header()]
    patch = key("PATCH", m.group(3) if m else "")
    return {"n": 1, "wave": [wave_aa / 10.0], "flux": [flux], "var": var, "covar": covar,
            "mask": [mask],
            "planes": mask_planes(*headers),
            "cat_id": np.array([int(cat_id)], np.int64), "obj_id": np.array([obj_id], np.int64),
            "tract": np.array([int(key("TRACT", m.group(2) if m else -1))], np.int32),
            "patch": np.array([str(patch).strip()], dtype=object),
            "ra": np.array([float(key("RA", np.nan))]), "dec": np.array([float(key("DEC", np.nan))]),
            "target_type": np.array([int(key("TARGETTYPE", SCIENCE))], np.int32),
            "n_visit": np.array([n_visit], np.int32)}


def read(fits, path, options: ReadOptions | None = None) -> SpectrumBlock:
    """Read an opened PFS file into a :class:`SpectrumBlock` on the DESI grid (see the module docstring).

    Raises
    ------
    InputFileError
        ``missing_hdu`` (no FLUX/TARGET/COVAR, no wavelength), ``inconsistent_file`` (FLUX rows ≠
        TARGET rows, lengths that disagree), ``unknown_format`` (a non-wavelength WCS).
    """
    options = options or ReadOptions()
    sel = options.selection
    name = os.path.basename(str(path))
    names = _hdu_names(fits)
    if "FLUX" not in names:
        raise InputFileError(f"{name}: no FLUX HDU (PFS spectra need FLUX, TARGET and COVAR)", RejectReason.MISSING_HDU)
    flux_hdu = fits["FLUX"]
    # one spectrum (pfsObject): a 1-D FLUX image, its wavelength in a WCS or a WAVELENGTH image of its own
    single = flux_hdu.get_exttype() == "IMAGE_HDU" and len(flux_hdu.get_dims()) == 1
    if not single and "WAVELENGTH" not in names:
        raise InputFileError(f"{name}: no WAVELENGTH HDU (pfsCoadd/pfsCalibrated)", RejectReason.MISSING_HDU)
    if not single and "TARGET" not in names:
        raise InputFileError(f"{name}: no TARGET HDU, so no ids or positions", RejectReason.MISSING_HDU)
    d = _read_object(fits, name, names) if single else _read_multi(fits, name, names)
    n = d["n"]
    flux, ivar, mask = _to_desi(d["wave"], d["flux"], d["var"], d["mask"], bad_mask_bits(d["planes"]), d["covar"])

    cat_id, obj_id, ttype = d["cat_id"], d["obj_id"], d["target_type"]
    zs = _redshifts(str(path), options, cat_id, obj_id)
    rejects = SelectionRejects(n)
    reject = rejects.add

    tname = [TARGET_TYPE_NAMES.get(int(t), str(int(t))) for t in ttype]
    if not sel.keep_sky:
        reject(ttype == SKY, RejectReason.SKY_FIBRE, lambda i: "targetType SKY")
    if not sel.keep_fluxstd:
        reject(ttype == FLUXSTD, RejectReason.FLUX_STANDARD, lambda i: "targetType FLUXSTD")
    if not sel.keep_unassigned:
        reject(~np.isin(ttype, [SCIENCE, SKY, FLUXSTD]), RejectReason.UNASSIGNED_FIBRE,
               lambda i: f"targetType {tname[i]} ({int(ttype[i])})")
    reject(~zs["found"], RejectReason.NO_REDSHIFT,
           lambda i: f"catId {int(cat_id[i])} objId {int(obj_id[i]) & _UINT64:016x}: {zs['detail'][i]}")
    rejects.redshift_fit(sel, spectype=zs["spectype"], class_name="class")

    meta = {
        "source_id": _source_ids(name, cat_id, obj_id, d.get("visit")),
        "survey": np.full(n, "pfs", dtype=object),
        "ra": np.asarray(d["ra"], np.float64),
        "dec": np.asarray(d["dec"], np.float64),
        "z": np.asarray(zs["z"], np.float64),
        "z_err": np.asarray(zs["z_err"], np.float64),
        "zwarning": np.asarray(zs["zwarn"], np.int64),
        "source_file": np.full(n, name, dtype=object),
        "row_in_file": np.arange(n, dtype=np.int32),
        "cat_id": cat_id,
        "obj_id": obj_id,
        "tract": np.asarray(d["tract"], np.int32),
        "patch": np.asarray(d["patch"], dtype=object),
        "target_type": np.asarray(ttype, np.int32),
        "n_visit": np.asarray(d["n_visit"], np.int32),
        "spectype": np.asarray(zs["spectype"], dtype=object),
    }
    assert list(meta) == list({**COMMON_META, **PFS_META})
    return SpectrumBlock(survey="pfs", grid=DESI_GRID, flux=flux, ivar=ivar, mask=mask, meta=meta,
                         reject_reason=rejects.reason, reject_detail=rejects.detail)


def _source_ids(name: str, cat_id, obj_id, visit) -> np.ndarray:
    """``pfs-%05d-%016x`` per spectrum, with ``-v%06d`` (visit) for the single-visit spectra of a ``pfsCalibrated``
    file (named ``pfsCalibrated-<visit>``): the target's own OBSERVATIONS visit, else the file name's. A per-visit
    file under another name reads as a coadd, so a clash with the coadd is a ``duplicate_id`` reject."""
    ids = [f"pfs-{int(c):05d}-{int(o) & _UINT64:016x}" for c, o in zip(cat_id, obj_id)]
    m = _CALIBRATED_NAME.match(name)
    if m:
        visits = np.full(len(ids), -1, np.int64) if visit is None else np.asarray(visit, np.int64)
        visits = np.where(visits >= 0, visits, int(m.group(1)))
        ids = [f"{i}-v{int(v):06d}" for i, v in zip(ids, visits)]
    return np.array(ids, dtype=object)


register_reader(Reader(name="pfs", identify=identify, read=read, grid=DESI_GRID, priority=15,
                       meta_columns={**COMMON_META, **PFS_META}, count=count, column_docs=PFS_DOCS,
                       description="PFS pfsCoadd/pfsCalibrated (multi-object) and pfsObject, on the DESI grid",
                       name_prefixes=("pfsCoadd-", "pfsCalibrated-", "pfsObject-"), redshift_ids=(("cat_id", "obj_id"),)))
register_auxiliary("pfs-redshifts", identify_redshifts)
