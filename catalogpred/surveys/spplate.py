"""SDSS ``spPlate-PLATE-MJD.fits`` reader: a whole plate (640 or 1000 fibres) as images.

Format (SDSS datamodel, FORMATS.md):

- HDU 0: flux, float32 [n_fiber, n_pix], 1e-17 erg/s/cm²/Å; header ``COEFF0`` (log10 Å of pixel 0)
  and ``COEFF1`` (1e-4 dex per pixel), ``PLATEID``, ``MJD``.
- HDU 1 ``IVAR``, HDU 2 ``ANDMASK``, HDU 3 ``ORMASK``, HDU 4 ``WAVEDISP`` (same shape),
  HDU 5 ``PLUGMAP`` (one row per fibre: ``FIBERID``, ``OBJTYPE``, ``RA``, ``DEC``, …), HDU 6 ``SKY``.
  DR8+ files name HDUs 1–6; older ones may leave 1–4 unnamed, so those are found by EXTNAME
  when present and by position otherwise.

Every fibre shares the plate's log-λ grid, so pixel ``i`` goes to
:data:`~catalogpred.spectra.SDSS_GRID` index ``round(COEFF0·1e4) + i − 35780`` with no
interpolation: exactly where the same pixel of the ``spec-*.fits`` file lands.

The object list (redshifts, ``SPECOBJID``, classes) is *not* in the spPlate: it comes from a
``specObj``/``spAll`` table (keyed by PLATE, MJD, FIBERID), given as ``ReadOptions.redshifts`` or
found next to the file (``specObj*.fits`` / ``spAll*.fits`` in its folder or the folder above).
Such tables are registered as auxiliary files, so ``catalogpred ingest`` uses them and does not
count them as inputs.

Rows go to the ``sdss`` store group with the SDSS reader's columns and ids
(``sdss-PPPP-MMMMM-FFFF``), so spectra ingested from spPlate and from spec files are the same
rows of the same survey. Sky fibres (PLUGMAP ``OBJTYPE = 'SKY'``) are rejects
(``sky_fibre``) unless ``Selection.keep_sky``; fibres absent from the object table are rejects
(``no_redshift``). Like the spec-file reader, a CLASS not in ``Selection.spectypes`` (default
GALAXY) is a ``not_galaxy`` reject; ZWARNING != 0 is kept and flagged downstream.
"""
from __future__ import annotations

import fnmatch
import functools
import glob
import os

import numpy as np

from ..errors import ConfigError, InputFileError, RejectReason
from ..redshifts import SDSS_ID_COLUMNS, load_redshift_table
from ..spectra import SDSS_GRID, SDSS_INDEX0, PixelMask
from . import (COMMON_META, ReadOptions, Reader, SelectionRejects, SpectrumBlock, register_auxiliary,
               register_reader)
from .sdss import SDSS_DOCS, SDSS_META

__all__ = ["identify", "identify_fits", "read", "count", "find_object_table", "identify_object_table",
           "IMAGE_HDUS", "OBJECT_TABLE_PATTERNS"]

#: image HDUs after the primary (flux): EXTNAME -> position in the datamodel
IMAGE_HDUS = {"IVAR": 1, "ANDMASK": 2, "ORMASK": 3, "WAVEDISP": 4}
#: names of the object tables searched next to an spPlate file (its folder, then the folder above)
OBJECT_TABLE_PATTERNS = ("specObj*.fits", "spAll*.fits", "specObj*.fits.gz", "spAll*.fits.gz")
_OBJECT_COLUMNS = {"PLATE", "MJD", "FIBERID", "Z"}


def identify(hdu_names: set) -> bool:
    """spPlate candidates: a PLUGMAP HDU and none of the spec/DESI HDUs (the header check is :func:`identify_fits`)."""
    return "PLUGMAP" in hdu_names and "COADD" not in hdu_names and "FIBERMAP" not in hdu_names


def identify_fits(fits) -> bool:
    """A 2-D primary image with a log-λ ``COEFF0`` (spFrame/spCFrame have PLUGMAP but no common grid)."""
    hdr = fits[0].read_header()
    return int(hdr.get("NAXIS", 0)) == 2 and "COEFF0" in hdr and "COEFF1" in hdr


def count(fits) -> int:
    """Fibres on the plate (rows of the primary image)."""
    return int(fits[0].get_dims()[0])


def identify_object_table(fits) -> bool:
    """specObj/spAll: the first extension is a table with PLATE, MJD, FIBERID and Z, and there are no spectra."""
    if len(fits) < 2 or fits[1].get_exttype() != "BINARY_TBL":
        return False
    return _OBJECT_COLUMNS <= {c.upper() for c in fits[1].get_colnames()}


def _object_table_names(hdu_names: set) -> bool:
    # specObj-dr17 / spAll-v5_13_2 have a single unnamed (or SPECOBJ-less) table extension
    return not (hdu_names & {"COADD", "SPECOBJ", "SPALL", "PLUGMAP", "FIBERMAP", "REDSHIFTS", "ZCATALOG"})


@functools.lru_cache(maxsize=64)
def _find_object_table(folder: str) -> str | None:
    for d in (folder, os.path.dirname(folder)):
        for pattern in OBJECT_TABLE_PATTERNS:
            found = sorted(glob.glob(os.path.join(d, pattern)))
            if found:
                return found[0]
    return None


def find_object_table(path: str | os.PathLike, given=()) -> str | None:
    """The ``specObj*``/``spAll*`` table next to an spPlate file (its folder, then the one above), else the first
    such table among the redshift files ``given`` as ingest inputs, or None."""
    beside = _find_object_table(os.path.dirname(os.path.abspath(str(path))))
    if beside is not None:
        return beside
    tables = [str(p) for p in given if any(fnmatch.fnmatch(os.path.basename(str(p)), pat) for pat in OBJECT_TABLE_PATTERNS)]
    return sorted(tables)[0] if tables else None


def _hdu(fits, names: set, extname: str):
    return fits[extname] if extname in names else fits[IMAGE_HDUS[extname]]


def _text(values) -> np.ndarray:
    """Stripped strings (object array) from a FITS string column (str, bytes or numbers)."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "ascii", "replace")
    elif values.dtype.kind != "U":
        values = values.astype(str)
    return np.char.strip(values).astype(object)


def read(fits, path, options: ReadOptions | None = None) -> SpectrumBlock:
    """Read an opened spPlate file into an n_fiber-row :class:`SpectrumBlock` on the SDSS grid.

    Raises
    ------
    InputFileError
        ``missing_hdu`` without PLUGMAP or an image HDU; ``inconsistent_file`` if the images,
        the PLUGMAP and the grid keywords disagree. (Without an object table every fibre is a
        ``no_redshift`` reject.)
    """
    options = options or ReadOptions()
    name = os.path.basename(str(path))
    names = {(h.get_extname() or "").upper() for h in fits}
    if "PLUGMAP" not in names:
        raise InputFileError(f"{name}: no PLUGMAP HDU (an spPlate needs it for fibre ids and positions)",
                             RejectReason.MISSING_HDU)
    if len(fits) < 6:
        raise InputFileError(f"{name}: {len(fits)} HDUs; an spPlate has flux, IVAR, ANDMASK, ORMASK, WAVEDISP, "
                             "PLUGMAP (0..5)", RejectReason.MISSING_HDU)
    hdr = fits[0].read_header()
    coeff0, coeff1 = hdr.get("COEFF0"), hdr.get("COEFF1")
    if coeff0 is None or coeff1 is None or abs(float(coeff1) - 1e-4) > 1e-9:
        raise InputFileError(f"{name}: COEFF0/COEFF1 = {coeff0}/{coeff1}; the SDSS grid needs COEFF1 = 1e-4 dex",
                             RejectReason.INCONSISTENT_FILE)
    flux = fits[0].read()
    ivar = _hdu(fits, names, "IVAR").read()
    andmask = _hdu(fits, names, "ANDMASK").read()
    plug = fits["PLUGMAP"].read(columns=[c for c in fits["PLUGMAP"].get_colnames()
                                         if c.upper() in ("FIBERID", "OBJTYPE", "RA", "DEC")])
    n, n_in = flux.shape if flux.ndim == 2 else (0, 0)
    if flux.ndim != 2 or ivar.shape != flux.shape or andmask.shape != flux.shape or len(plug) != n:
        raise InputFileError(f"{name}: flux {flux.shape}, IVAR {ivar.shape}, ANDMASK {andmask.shape} and "
                             f"PLUGMAP ({len(plug)} rows) disagree", RejectReason.INCONSISTENT_FILE)
    pcols = {c.upper(): c for c in plug.dtype.names}

    # pixels onto the SDSS grid by integer log-λ index (no interpolation)
    n_pix = SDSS_GRID.n_pix
    k0 = int(round(float(coeff0) * 1e4)) - SDSS_INDEX0
    src_lo, src_hi = max(0, -k0), min(n_in, n_pix - k0)
    out = np.zeros((n, n_pix), np.float32)
    out_ivar = np.zeros((n, n_pix), np.float32)
    mask = np.full((n, n_pix), int(PixelMask.NO_COVERAGE), np.uint8)
    if src_hi > src_lo:
        dst = slice(k0 + src_lo, k0 + src_hi)
        out[:, dst] = flux[:, src_lo:src_hi]
        out_ivar[:, dst] = ivar[:, src_lo:src_hi]
        mask[:, dst] = (andmask[:, src_lo:src_hi] != 0).view(np.uint8) * np.uint8(PixelMask.PIPELINE)

    plate = int(hdr.get("PLATEID", hdr.get("PLATE", -1)))
    mjd = int(hdr.get("MJD", -1))
    fiberid = (np.asarray(plug[pcols["FIBERID"]], np.int32) if "FIBERID" in pcols
               else np.arange(1, n + 1, dtype=np.int32))
    objtype = _text(plug[pcols["OBJTYPE"]]) if "OBJTYPE" in pcols else np.full(n, "", dtype=object)

    # the object table: redshifts and ids (without one, every fibre is a no_redshift reject)
    table_path = options.redshifts or find_object_table(path, options.redshift_files)
    if table_path is not None:
        table = load_redshift_table(table_path)
        if table.id_columns != SDSS_ID_COLUMNS:
            raise ConfigError(f"{os.path.basename(str(table_path))}: needs PLATE, MJD and FIBERID columns to give "
                              f"redshifts to spPlate files (it is keyed by {', '.join(table.id_columns)})")
        rows = table.rows(np.full(n, plate), np.full(n, mjd), fiberid)
        got = table.lookup(np.full(n, plate), np.full(n, mjd), fiberid)
    else:
        table = None
        rows = np.full(n, -1, np.int64)
        got = {"z": np.full(n, np.nan), "z_err": np.full(n, np.nan), "zwarn": np.zeros(n, np.int64),
               "spectype": np.full(n, "", dtype=object)}
    found = rows >= 0
    j = np.where(found, rows, 0)

    def extra(col, fill, dtype=None):
        if table is None or col not in table.extra or len(table) == 0:
            return None
        v = table.extra[col][j]
        if dtype is not None:
            v = np.where(found, v.astype(dtype), fill)
        return v

    ra = np.asarray(plug[pcols["RA"]], np.float64) if "RA" in pcols else np.full(n, np.nan)
    dec = np.asarray(plug[pcols["DEC"]], np.float64) if "DEC" in pcols else np.full(n, np.nan)
    for col_ra, col_dec in (("plug_ra", "plug_dec"), ("ra", "dec")):
        t_ra, t_dec = extra(col_ra, np.nan, np.float64), extra(col_dec, np.nan, np.float64)
        if t_ra is not None and t_dec is not None:
            ra, dec = np.where(found, t_ra, ra), np.where(found, t_dec, dec)
            break

    def strings(col):
        v = extra(col, "")
        return np.where(found, _text(v), "").astype(object) if v is not None else np.full(n, "", dtype=object)

    sn = extra("sn_median_all", np.nan, np.float32)
    run2d = strings("run2d")
    if not run2d.any() and hdr.get("RUN2D"):
        run2d = np.full(n, str(hdr["RUN2D"]).strip(), dtype=object)

    rejects = SelectionRejects(n)
    if not options.selection.keep_sky:
        rejects.add(objtype == "SKY", RejectReason.SKY_FIBRE, lambda i: "PLUGMAP OBJTYPE 'SKY'")
    if table_path is None:
        missing = (f"no specObj/spAll table: pass --redshifts specObj-dr17.fits or put one "
                   f"({', '.join(OBJECT_TABLE_PATTERNS[:2])}) beside the spPlate files")
        rejects.add(~found, RejectReason.NO_REDSHIFT, lambda i: missing)
    else:
        src = os.path.basename(str(table_path))
        rejects.add(~found, RejectReason.NO_REDSHIFT,
                    lambda i: f"plate {plate} MJD {mjd} fibre {fiberid[i]} (OBJTYPE '{objtype[i]}') not in {src}")
    rejects.redshift_fit(options.selection, spectype=got["spectype"], class_name="CLASS")  # ZWARNING: flagged
    reason, detail = rejects.reason, rejects.detail

    meta = {
        "source_id": np.array([f"sdss-{plate:04d}-{mjd:05d}-{f:04d}" for f in fiberid.tolist()], dtype=object),
        "survey": np.full(n, "sdss", dtype=object),
        "ra": ra,
        "dec": dec,
        "z": np.asarray(got["z"], np.float64),
        "z_err": np.asarray(got["z_err"], np.float64),
        "zwarning": np.asarray(got["zwarn"], np.int64),
        "source_file": np.full(n, name, dtype=object),
        "row_in_file": np.arange(n, dtype=np.int32),
        "plate": np.full(n, plate, np.int32),
        "mjd": np.full(n, mjd, np.int32),
        "fiberid": fiberid,
        "catalogid": np.full(n, "", dtype=object),
        "specobjid": strings("specobjid"),
        "spec_class": np.asarray(got["spectype"], dtype=object),
        "subclass": strings("subclass"),
        "sn_median_all": sn if sn is not None else np.full(n, np.nan, np.float32),
        "run2d": run2d,
    }
    assert list(meta) == list({**COMMON_META, **SDSS_META})
    return SpectrumBlock(survey="sdss", grid=SDSS_GRID, flux=out, ivar=out_ivar, mask=mask, meta=meta,
                         reject_reason=reason, reject_detail=detail)


register_reader(Reader(name="sdss-plate", identify=identify, identify_fits=identify_fits, read=read,
                       grid=SDSS_GRID, priority=15, meta_columns={**COMMON_META, **SDSS_META}, count=count,
                       column_docs=SDSS_DOCS,
                       store_survey="sdss",
                       description="SDSS spPlate-*.fits (whole plates) + specObj/spAll object table",
                       name_prefixes=("spPlate-",), redshift_ids=(SDSS_ID_COLUMNS,)))
register_auxiliary("sdss-objects", _object_table_names, identify_object_table)
