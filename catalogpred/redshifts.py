"""Redshift tables: DESI ``redrock-*`` / ``zpix-*``, PFS ``pfsCoZCandidates``-like tables, or a user table.

:func:`load_redshift_table` reads FITS, Parquet or CSV and normalises column names
(case-insensitive, ``camelCase`` and ``snake_case`` alike) to:

- ids: ``targetid`` (DESI) or ``cat_id`` + ``obj_id`` (PFS; ``catId``/``objId`` accepted), or
  ``plate`` + ``mjd`` + ``fiberid`` (SDSS ``specObj``/``spAll``; these also keep the columns in
  :data:`EXTRA_COLUMNS`, e.g. ``specobjid``, ``subclass``, ``plug_ra``/``plug_dec``, for :attr:`RedshiftTable.extra`);
  any table keeps redrock's ``deltachi2`` there too;
- ``z`` (also ``redshift``), ``z_err`` (``zerr``, ``redshift_error``), ``zwarn`` (``zwarning``),
  ``spectype`` (``class``).

Survey-wide ``zpix`` catalogs list some TARGETIDs more than once; when the table
has ``ZCAT_PRIMARY`` only the primary rows are kept. Otherwise a repeated id is an error.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np

from .errors import ConfigError

__all__ = ["RedshiftTable", "load_redshift_table", "normalise_name", "SDSS_ID_COLUMNS", "EXTRA_COLUMNS"]

#: id columns of SDSS object tables (specObj, spAll): one row per spectrum
SDSS_ID_COLUMNS = ("plate", "mjd", "fiberid")
#: further columns (normalised names) a table keeps in :attr:`RedshiftTable.extra` when present
EXTRA_COLUMNS = ("specobjid", "subclass", "plug_ra", "plug_dec", "ra", "dec", "sn_median_all", "run2d", "deltachi2")


def _pack_sdss(plate, mjd, fiberid) -> np.ndarray:
    """One int64 per (plate, mjd, fiberid): sortable, so lookups of millions of ids stay vectorised."""
    return ((np.asarray(plate, np.int64) * 100_000 + np.asarray(mjd, np.int64)) * 10_000
            + np.asarray(fiberid, np.int64))

_ALIASES = {
    "targetid": "targetid", "catid": "cat_id", "cat_id": "cat_id", "objid": "obj_id", "obj_id": "obj_id",
    "z": "z", "redshift": "z", "zerr": "z_err", "z_err": "z_err", "redshifterror": "z_err", "redshift_error": "z_err",
    "zwarn": "zwarn", "zwarning": "zwarn", "spectype": "spectype", "class": "spectype",
    "zcat_primary": "zcat_primary",
}


def normalise_name(name: str) -> str:
    """``catId`` → ``catid``, ``redshiftError`` → ``redshifterror``, ``Z_ERR`` → ``z_err``."""
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()
    return _ALIASES.get(snake, _ALIASES.get(snake.replace("_", ""), snake))


class RedshiftTable:
    """Redshifts keyed by survey id; :meth:`lookup` returns arrays aligned with the query ids."""

    def __init__(self, columns: dict, source: str):
        self.source = source
        if "z" not in columns:
            raise ConfigError(f"{source}: no redshift column (z, Z or redshift)")
        # (catId, objId) first: PFS tables may also carry targetId, a per-file row index, not an id
        if "cat_id" in columns and "obj_id" in columns:
            keys = [np.asarray(columns["cat_id"], dtype=np.int64), np.asarray(columns["obj_id"], dtype=np.int64)]
            self.id_columns = ("cat_id", "obj_id")
        elif "targetid" in columns:
            keys = [np.asarray(columns["targetid"], dtype=np.int64)]
            self.id_columns = ("targetid",)
        elif all(c in columns for c in SDSS_ID_COLUMNS):
            keys = [np.asarray(columns[c], dtype=np.int64) for c in SDSS_ID_COLUMNS]
            self.id_columns = SDSS_ID_COLUMNS
        else:
            raise ConfigError(f"{source}: no id columns (TARGETID, or catId/objId, cat_id/obj_id, "
                              "or PLATE/MJD/FIBERID)")
        n = len(columns["z"])
        keep = np.ones(n, bool)
        if "zcat_primary" in columns:
            keep = np.asarray(columns["zcat_primary"]).astype(bool)
        self._index = {}
        z = np.asarray(columns["z"], dtype=np.float64)
        zerr = np.asarray(columns.get("z_err", np.full(n, np.nan)), dtype=np.float64)
        zwarn = np.asarray(columns.get("zwarn", np.zeros(n)), dtype=np.int64)
        spectype = np.asarray(columns.get("spectype", np.full(n, "")), dtype=object)
        self._z, self._zerr, self._zwarn = z[keep], zerr[keep], zwarn[keep]
        self._spectype = np.array([str(s).strip() for s in spectype[keep]], dtype=object)
        #: kept columns of :data:`EXTRA_COLUMNS`, row-aligned with the table (index with :meth:`rows`)
        self.extra = {c: np.asarray(columns[c])[keep] for c in EXTRA_COLUMNS if c in columns}
        self._packed = None
        if self.id_columns == SDSS_ID_COLUMNS:
            packed = _pack_sdss(*[k[keep] for k in keys])
            self._order = np.argsort(packed, kind="stable")
            self._packed = packed[self._order]
            twice = np.flatnonzero(self._packed[1:] == self._packed[:-1])
            if len(twice):
                i = int(self._order[twice[0]])
                raise ConfigError(f"{source}: (plate, mjd, fiberid) {tuple(int(k[keep][i]) for k in keys)} appears twice")
            return
        ids = list(zip(*[k[keep] for k in keys])) if len(keys) > 1 else keys[0][keep].tolist()
        for i, key in enumerate(ids):
            if key in self._index:
                raise ConfigError(f"{source}: id {key} appears twice (for zpix catalogs keep ZCAT_PRIMARY rows)")
            self._index[key] = i

    def rows(self, *ids) -> np.ndarray:
        """int64 index into the table (and :attr:`extra`) of each queried id; -1 where absent."""
        if self._packed is not None:
            q = _pack_sdss(*ids)
            if len(self._packed) == 0:
                return np.full(q.shape, -1, np.int64)
            pos = np.minimum(np.searchsorted(self._packed, q), len(self._packed) - 1)
            return np.where(self._packed[pos] == q, self._order[pos], -1).astype(np.int64)
        keys = list(zip(*[np.asarray(i).tolist() for i in ids])) if len(ids) > 1 else np.asarray(ids[0]).tolist()
        return np.array([self._index.get(k, -1) for k in keys], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._z)

    def lookup(self, *ids) -> dict:
        """Arrays ``found`` (bool), ``z``, ``z_err``, ``zwarn``, ``spectype`` for the given id arrays."""
        idx = self.rows(*ids)
        found = idx >= 0
        j = np.where(found, idx, 0)
        if len(self._z) == 0:
            j = np.zeros(len(idx), np.int64)
            empty = {"z": np.full(len(idx), np.nan), "z_err": np.full(len(idx), np.nan),
                     "zwarn": np.zeros(len(idx), np.int64), "spectype": np.full(len(idx), "", dtype=object)}
            return {"found": found, **empty}
        return {"found": found, "z": np.where(found, self._z[j], np.nan), "z_err": np.where(found, self._zerr[j], np.nan),
                "zwarn": np.where(found, self._zwarn[j], 0), "spectype": np.where(found, self._spectype[j], "")}


def _read_columns(path: str, hdu: str | None) -> dict:
    ext = os.path.basename(path).lower()
    if ext.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        return {normalise_name(c): t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}
    if ext.endswith((".csv", ".txt", ".ecsv")):
        from astropy.table import Table

        t = Table.read(path, format="ascii.ecsv" if ext.endswith(".ecsv") else "ascii.csv")
        return {normalise_name(c): np.asarray(t[c]) for c in t.colnames}
    import fitsio

    with fitsio.FITS(path) as f:
        names = [(h.get_extname() or "").upper() for h in f]
        if hdu is None:
            hdu = next((h for h in ("REDSHIFTS", "ZCATALOG", "GALAXY_CANDIDATES") if h in names), None)
        if hdu is None:
            hdu = next(i for i, h in enumerate(f) if h.get_exttype() in ("BINARY_TBL", "ASCII_TBL"))
        dtype = f[hdu].get_rec_dtype()[0]
        # only the scalar columns RedshiftTable uses: a survey-wide specObj/spAll has ~200 columns and millions of rows
        used = set(_ALIASES.values()) | set(SDSS_ID_COLUMNS) | set(EXTRA_COLUMNS)
        wanted = [c for c in dtype.names if dtype[c].shape == () and normalise_name(c) in used]
        if not wanted:
            return {}
        data = f[hdu].read(columns=wanted)
    return {normalise_name(c): data[c] for c in data.dtype.names if data[c].ndim == 1}


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime: float, hdu: str | None) -> RedshiftTable:
    return RedshiftTable(_read_columns(path, hdu), source=os.path.basename(path))


def load_redshift_table(path: str | os.PathLike, hdu: str | None = None) -> RedshiftTable:
    """Read (once per process) a redshift table; see the module docstring for accepted columns."""
    path = os.path.abspath(str(path))
    if not os.path.exists(path):
        raise ConfigError(f"redshift table {path} does not exist")
    return _load(path, os.path.getmtime(path), hdu)
