"""catalogpred: survey-scale WISE W1–W4 predictions from optical galaxy spectra.

Data flow (one module or subpackage per stage)::

    surveys/ (readers) → spectra (science helpers) → store (Zarr) → model/ (encoder + IR head)
        → pipeline (Dask) → catalog (HATS Parquet) → query

Quick start::

    catalogpred demo                      # mock SDSS, DESI and PFS surveys, end to end, into demo-output/
    catalogpred ingest spec-*.fits --store store.zarr
    catalogpred predict --store store.zarr --model model/ --catalog catalog/
    catalogpred query catalog/ --cone 150.0 2.0 60
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open_catalog"]


def open_catalog(path):
    """Open a catalogpred catalog lazily (see :func:`catalogpred.query.open_catalog`)."""
    from .query import open_catalog as _open

    return _open(path)
