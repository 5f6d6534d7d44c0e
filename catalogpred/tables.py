"""Reading user tables (CSV, Parquet, FITS, VOTable) into Arrow: one function, used by training and redshift tables."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from .errors import ConfigError

__all__ = ["read_table_any"]


def read_table_any(path: str | os.PathLike, hdu=None) -> pa.Table:
    """A table file as an Arrow table, by extension: .parquet/.pq, .csv/.txt, .fits/.fit(.gz), .vot/.xml.

    Vector columns of FITS tables become fixed-size lists; units are dropped (callers know their columns).
    """
    path = str(path)
    low = path.lower()
    if not os.path.exists(path):
        raise ConfigError(f"table {path} does not exist")
    if low.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if low.endswith((".csv", ".txt")):
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path)
    if low.endswith((".fits", ".fit", ".fits.gz", ".vot", ".xml")):
        from astropy.table import Table

        t = Table.read(path, hdu=hdu) if hdu is not None else Table.read(path)
        cols = {}
        for name in t.colnames:
            v = np.asarray(t[name])
            if v.dtype.kind in "SU":
                cols[name] = pa.array(np.char.strip(v.astype(str)).tolist(), pa.string())
            elif v.ndim == 2:
                cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
            else:
                cols[name] = pa.array(v.astype(v.dtype.newbyteorder("=")))
        return pa.table(cols)
    raise ConfigError(f"{path}: unknown table format; use .csv, .parquet, .fits or .vot")
