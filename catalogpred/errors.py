"""Exception hierarchy and reject reasons shared by every stage.

Errors say what went wrong, where, and how to fix it. Each exception has a
built-in base as well, so ``except ValueError`` or ``except OSError`` keep
working for callers that do not know catalogpred.

A *bad spectrum* becomes a row in the rejects table (:class:`RejectReason`),
a *bad file* becomes a quarantine record (also in the rejects table, with
``row_in_file = -1``), and only a *bad run* (wrong arguments, unreadable
store, incompatible model) raises.
"""
from __future__ import annotations

import enum

__all__ = [
    "CatalogpredError",
    "InputFileError",
    "StoreError",
    "BundleError",
    "CatalogError",
    "ConfigError",
    "WorkerCodeError",
    "RejectReason",
    "is_transient",
]


class CatalogpredError(Exception):
    """Root of every error raised on purpose by catalogpred."""


class InputFileError(CatalogpredError, ValueError):
    """A survey file cannot be read: not FITS, truncated, missing HDUs, unknown format."""

    def __init__(self, message: str, reason: "RejectReason"):
        super().__init__(message)
        self.reason = reason


class StoreError(CatalogpredError, OSError):
    """The Zarr spectra store is missing, incompatible or inconsistent."""


class BundleError(CatalogpredError, ValueError):
    """A model bundle is missing, malformed, or does not fit the store's grid."""


class CatalogError(CatalogpredError, OSError):
    """The output catalog is missing, inconsistent, or would be clobbered."""


class ConfigError(CatalogpredError, ValueError):
    """Arguments or configuration values that cannot work together."""


class WorkerCodeError(ConfigError):
    """A task reached a Dask worker that runs other catalogpred code than the client that submitted it, and did
    not run there. ``worker`` is that worker's address (None outside a worker)."""

    def __init__(self, message: str, worker: str | None = None):
        super().__init__(message)
        self.worker = worker

    def __reduce__(self):  # pickled from the worker to the client with its address
        return type(self), (str(self), self.worker)


def is_transient(exc: BaseException) -> bool:
    """True for errors of the machine rather than the file: out of memory, or an operating-system I/O error
    (``OSError`` with an ``errno``: EIO, ESTALE, a vanished network mount, ...). Readers re-raise these, so Dask
    retries the task and a run whose retries fail stops and resumes on re-run, instead of rejecting a good
    file. A corrupt or truncated FITS file raises ``OSError`` without an errno (cfitsio's status) and is a reject.
    """
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, CatalogpredError) and exc.errno is not None


class RejectReason(str, enum.Enum):
    """Why an input spectrum (or a whole file) is not in the catalog.

    The value is what the ``reason`` column of the rejects table holds.
    """

    #: the file is not FITS, is truncated, or fails to decode
    UNREADABLE_FILE = "unreadable_file"
    #: FITS, but a required HDU (e.g. SDSS ``COADD``, ``SPECOBJ``/``SPALL``) is missing
    MISSING_HDU = "missing_hdu"
    #: the HDUs contradict each other (e.g. FIBERMAP rows != flux rows)
    INCONSISTENT_FILE = "inconsistent_file"
    #: FITS, but no survey reader recognises its HDUs
    UNKNOWN_FORMAT = "unknown_format"
    #: flux or ivar holds NaN or inf on pixels with ivar > 0
    NONFINITE_FLUX = "nonfinite_flux"
    #: no pixel with ivar > 0 (after the pipeline mask)
    NO_VALID_PIXELS = "no_valid_pixels"
    #: redshift missing or not finite
    BAD_REDSHIFT = "bad_redshift"
    #: no good pixel in the rest-frame normalisation window (5300-5850 Å)
    NORM_WINDOW_EMPTY = "norm_window_empty"
    #: the normalisation median is <= 0 or not finite
    BAD_NORM = "bad_norm"
    #: no redshift for the spectrum (no matching redshift file or table row)
    NO_REDSHIFT = "no_redshift"
    #: a sky fibre (excluded by the selection)
    SKY_FIBRE = "sky_fibre"
    #: an unassigned fibre (DESI negative TARGETID / blank OBJTYPE)
    UNASSIGNED_FIBRE = "unassigned_fibre"
    #: a flux-standard star (PFS FLUXSTD), excluded by the selection
    FLUX_STANDARD = "flux_standard"
    #: fibre status non-zero (DESI COADD_FIBERSTATUS)
    BAD_FIBERSTATUS = "bad_fiberstatus"
    #: the redshift fit has warning bits set (DESI ZWARN)
    ZWARN = "zwarn"
    #: the redshift fit's class is not an accepted SPECTYPE (default: GALAXY only)
    NOT_GALAXY = "not_galaxy"
    #: RA/Dec missing, not finite, or |Dec| > 90 deg: the spectrum has no place on the sky (no HEALPix leaf)
    BAD_POSITION = "bad_position"
    #: the source_id was already ingested (first occurrence kept)
    DUPLICATE_ID = "duplicate_id"
    #: a prediction block failed on every retry; the error text is in ``detail``
    PREDICT_ERROR = "predict_error"
    #: the model returned NaN/inf for this spectrum
    NONFINITE_PREDICTION = "nonfinite_prediction"

    def __str__(self) -> str:  # so f-strings show the value, not RejectReason.X
        return self.value
