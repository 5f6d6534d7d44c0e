"""SDSS ``spec-*.fits`` reader: legacy SDSS-I/II (lite and full), BOSS, eBOSS and SDSS-V.

Format (FORMATS.md): HDU ``COADD`` holds one row per pixel (``flux``, ``loglam``,
``ivar``, ``and_mask``; upper-case names in DR18+), HDU ``SPECOBJ`` (legacy) or
``SPALL`` (BOSS and later) one row of object data. SDSS pixels sit on a global
log-λ grid with 1e-4 dex steps, so each pixel goes to
:data:`~catalogpred.spectra.SDSS_GRID` by integer index, with no interpolation.
Pixels outside the grid (BOSS reaches 3600–10400 Å) are dropped.

Redshifts: the file's own (SPECOBJ/SPALL), or those of a ``--redshifts`` specObj/spAll table keyed by PLATE,
MJD, FIBERID (``ReadOptions.redshifts``; a table keyed otherwise is for other surveys and is not used here).

Selection (:class:`~catalogpred.surveys.Selection`, as for DESI and PFS): a ``CLASS`` not in
``spectypes`` (default GALAXY: QSOs and stars are ``not_galaxy`` rejects). ``ZWARNING`` != 0 is not
a reject: the row is kept and flagged (``CatalogFlag.ZWARNING``), as SDSS catalogs carry it.

Ids: ``source_id = "sdss-PPPP-MMMMM-FFFF"`` (zero-padded as in the file name;
SDSS-V uses FIELD and CATALOGID: ``"sdss-FFFFF-MMMMM-CATALOGID"``). ``specobjid``
is kept as a string: it is a 22-char string in legacy files, int64 in BOSS v5_11
and uint64 (via TZERO) in v5_13, so no integer type holds all of them.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InputFileError, RejectReason
from ..redshifts import SDSS_ID_COLUMNS, load_redshift_table
from ..spectra import SDSS_GRID, PixelMask, loglam_to_sdss_index
from . import COMMON_META, ColumnDoc, ReadOptions, Reader, SelectionRejects, SpectrumBlock, register_reader

__all__ = ["identify", "read", "SDSS_META", "SDSS_DOCS"]

#: survey-native columns added to :data:`~catalogpred.surveys.COMMON_META`.
SDSS_META = {
    "plate": "i4",  # PLATE (legacy/BOSS) or FIELD (SDSS-V)
    "mjd": "i4",
    "fiberid": "i4",  # -1 when absent (SDSS-V)
    "catalogid": "U",  # SDSS-V CATALOGID as string ("" before SDSS-V)
    "specobjid": "U",
    "spec_class": "U",  # CLASS: GALAXY, QSO, STAR
    "subclass": "U",
    "sn_median_all": "f4",
    "run2d": "U",
}

#: catalog descriptions of :data:`SDSS_META` (also used by the spPlate reader).
SDSS_DOCS = {
    "plate": ColumnDoc("SDSS plate (or SDSS-V field)", "", "meta.id.part"),
    "mjd": ColumnDoc("MJD of the (last) observation", "", "time.epoch"),
    "fiberid": ColumnDoc("SDSS fibre number", "", "meta.id.part"),
    "catalogid": ColumnDoc("SDSS-V CATALOGID", "", "meta.id"),
    "specobjid": ColumnDoc("SDSS SPECOBJID, as a string (uint64 does not fit int64)", "", "meta.id"),
    "spec_class": ColumnDoc("Pipeline spectral class (GALAXY, QSO, STAR)", "", "src.class"),
    "subclass": ColumnDoc("Pipeline spectral subclass", "", "src.class"),
    "sn_median_all": ColumnDoc("Pipeline median S/N per pixel", "", "stat.snr"),
    "run2d": ColumnDoc("Spectroscopic reduction version", "", "meta.version"),
}

_OBJECT_HDUS = ("SPECOBJ", "SPALL")


def identify(hdu_names: set) -> bool:
    """True for files that carry SDSS coadd or spectro-object HDUs."""
    return "COADD" in hdu_names or any(h in hdu_names for h in _OBJECT_HDUS)


def _col(row, names, default=None):
    for n in names:
        if n in row.dtype.names:
            return row[n][0]
    return default


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()


def _apply_redshift_table(table_path: str, meta: dict, rejects: SelectionRejects, has_plate: bool) -> None:
    """A ``--redshifts`` table keyed by PLATE, MJD, FIBERID (specObj/spAll) replaces the file's own Z, Z_ERR,
    ZWARNING and CLASS; a spectrum it lacks is a ``no_redshift`` reject, as for spPlate and DESI files. A table
    keyed otherwise (DESI TARGETID, PFS catId/objId) is for other surveys' files: the file keeps its own
    redshift (ingest says so and does not record the table for the sdss group)."""
    table = load_redshift_table(table_path)
    if table.id_columns != SDSS_ID_COLUMNS:
        return
    plate, mjd, fiber = (meta[c] for c in ("plate", "mjd", "fiberid"))
    if not has_plate or fiber[0] < 0:  # SDSS-V (FIELD, CATALOGID): no (plate, mjd, fiberid) key
        rejects.add([True], RejectReason.NO_REDSHIFT,
                    lambda i: f"--redshifts {os.path.basename(table_path)} is keyed by PLATE, MJD, FIBERID, which "
                              "this SDSS-V file (FIELD, CATALOGID) does not have")
        return
    got = table.lookup(plate, mjd, fiber)
    if not got["found"][0]:
        rejects.add([True], RejectReason.NO_REDSHIFT, lambda i: f"plate {plate[0]} MJD {mjd[0]} fibre {fiber[0]} "
                                                                f"not in {os.path.basename(table_path)}")
        return
    meta["z"], meta["z_err"] = np.asarray(got["z"], np.float64), np.asarray(got["z_err"], np.float64)
    meta["zwarning"] = np.asarray(got["zwarn"], np.int64)
    if str(got["spectype"][0]):
        meta["spec_class"] = np.array([str(got["spectype"][0])])


def read(fits, path, options=None) -> SpectrumBlock:
    """Read an opened SDSS spec file into a one-row :class:`SpectrumBlock` on the SDSS grid.

    Flux is F_λ in 1e-17 erg/s/cm²/Å (the files' ``BUNIT``); the mask carries
    ``PIPELINE`` where ``and_mask != 0`` and ``NO_COVERAGE`` outside the file's range.
    """
    name = os.path.basename(str(path))
    hdu_names = {(h.get_extname() or "").upper() for h in fits}
    if "COADD" not in hdu_names:
        raise InputFileError(f"{name}: no COADD HDU (an SDSS spec file needs COADD + SPECOBJ/SPALL)",
                             RejectReason.MISSING_HDU)
    obj_hdu = next((h for h in _OBJECT_HDUS if h in hdu_names), None)
    if obj_hdu is None:
        raise InputFileError(f"{name}: no SPECOBJ or SPALL HDU, so no redshift or ids", RejectReason.MISSING_HDU)

    coadd = fits["COADD"].read(columns=["flux", "loglam", "ivar", "and_mask"])
    coadd.dtype.names = [c.lower() for c in coadd.dtype.names]  # DR18+ (SDSS-V) files spell them FLUX, LOGLAM, ...
    obj_cols = {c.upper() for c in fits[obj_hdu].get_colnames()}
    wanted = [c for c in ("PLATE", "FIELD", "MJD", "FIBERID", "CATALOGID", "PLUG_RA", "PLUG_DEC", "RA", "DEC",
                          "Z", "Z_ERR", "ZWARNING", "CLASS", "SUBCLASS", "SPECOBJID", "SN_MEDIAN_ALL", "RUN2D")
              if c in obj_cols]
    missing = [c for c in ("MJD", "Z") if c not in obj_cols]
    if missing:
        raise InputFileError(f"{name}: {obj_hdu} lacks required columns {missing}", RejectReason.MISSING_HDU)
    obj = fits[obj_hdu].read(columns=wanted, rows=[0])
    obj.dtype.names = [c.upper() for c in obj.dtype.names]  # fitsio keeps the file's spelling; _col asks upper case

    n_pix = SDSS_GRID.n_pix
    flux = np.zeros((1, n_pix), np.float32)
    ivar = np.zeros((1, n_pix), np.float32)
    mask = np.full((1, n_pix), int(PixelMask.NO_COVERAGE), np.uint8)
    idx = loglam_to_sdss_index(coadd["loglam"])
    keep = (idx >= 0) & (idx < n_pix)
    idx = idx[keep]
    flux[0, idx] = coadd["flux"][keep]
    ivar[0, idx] = coadd["ivar"][keep]
    mask[0, idx] = np.where(coadd["and_mask"][keep] != 0, int(PixelMask.PIPELINE), 0)

    plate = int(_col(obj, ("PLATE", "FIELD"), -1))
    mjd = int(_col(obj, ("MJD",)))
    fiber = int(_col(obj, ("FIBERID",), -1))
    catalogid = _text(_col(obj, ("CATALOGID",), ""))
    if "PLATE" in obj.dtype.names and fiber >= 0:
        source_id = f"sdss-{plate:04d}-{mjd:05d}-{fiber:04d}"
    elif catalogid:
        source_id = f"sdss-{plate:05d}-{mjd:05d}-{catalogid}"
    else:
        raise InputFileError(f"{name}: {obj_hdu} has neither PLATE/FIBERID nor FIELD/CATALOGID", RejectReason.MISSING_HDU)

    ra = _col(obj, ("PLUG_RA", "RA"))
    dec = _col(obj, ("PLUG_DEC", "DEC"))
    if ra is None or dec is None:
        hdr = fits[0].read_header()
        ra, dec = hdr.get("PLUG_RA", np.nan), hdr.get("PLUG_DEC", np.nan)
    specobjid = _col(obj, ("SPECOBJID",), "")
    meta = {
        "source_id": np.array([source_id]),
        "survey": np.array(["sdss"]),
        "ra": np.array([float(ra)]),
        "dec": np.array([float(dec)]),
        "z": np.array([float(_col(obj, ("Z",)))]),
        "z_err": np.array([float(_col(obj, ("Z_ERR",), np.nan))]),
        "zwarning": np.array([int(_col(obj, ("ZWARNING",), 0))], np.int64),
        "source_file": np.array([name]),
        "row_in_file": np.array([0], np.int32),
        "plate": np.array([plate], np.int32),
        "mjd": np.array([mjd], np.int32),
        "fiberid": np.array([fiber], np.int32),
        "catalogid": np.array([catalogid]),
        "specobjid": np.array([_text(specobjid)]),
        "spec_class": np.array([_text(_col(obj, ("CLASS",), ""))]),
        "subclass": np.array([_text(_col(obj, ("SUBCLASS",), ""))]),
        "sn_median_all": np.array([float(_col(obj, ("SN_MEDIAN_ALL",), np.nan))], np.float32),
        "run2d": np.array([_text(_col(obj, ("RUN2D",), ""))]),
    }
    assert list(meta)[: len(COMMON_META)] == list(COMMON_META)
    options = options or ReadOptions()
    rejects = SelectionRejects(1)
    if options.redshifts:
        _apply_redshift_table(options.redshifts, meta, rejects, "PLATE" in obj.dtype.names)
    # ZWARNING != 0 stays in the catalog, flagged (CatalogFlag.ZWARNING): only the class is selected
    rejects.redshift_fit(options.selection, spectype=meta["spec_class"], class_name="CLASS")
    return SpectrumBlock(survey="sdss", grid=SDSS_GRID, flux=flux, ivar=ivar, mask=mask, meta=meta,
                         reject_reason=rejects.reason, reject_detail=rejects.detail)


register_reader(Reader(name="sdss", identify=identify, read=read, grid=SDSS_GRID, priority=10,
                       meta_columns={**COMMON_META, **SDSS_META}, column_docs=SDSS_DOCS,
                       description="SDSS spec-*.fits (legacy, BOSS, eBOSS, SDSS-V)",
                       name_prefixes=("spec-",), redshift_ids=(SDSS_ID_COLUMNS,)))
