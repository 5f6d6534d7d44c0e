"""Survey readers: one module per survey, each turning files into a :class:`SpectrumBlock`.

A reader is registered with :func:`register_reader` and consists of

- ``identify(hdu_names) -> bool``: does this FITS file look like ours? (by content: EXTNAMEs)
- ``read(fits, path, options) -> SpectrumBlock``: read an opened ``fitsio.FITS``;
  ``options`` is a :class:`ReadOptions` (external redshifts, target selection).

Multi-object files (DESI, PFS) return every spectrum they hold; the ones that
the selection excludes (sky fibres, unassigned fibres, bad fibre status, redshift
warnings, non-galaxies) carry a reject reason in ``SpectrumBlock.reject_reason``,
so they reach the rejects table instead of disappearing.

Files that hold redshifts but no spectra (DESI ``redrock-*``/``zpix-*``, PFS
``pfsCoZCandidates``) are *auxiliary*: :func:`identify_survey` names them so that
ingest does not count them as inputs; a reader finds the one it needs beside the spectra or, when
it was given among the ingest inputs, by its file name there (:attr:`ReadOptions.redshift_files`).

:func:`read_spectra` opens a file once, picks the reader by content (highest
priority first) or by the ``survey`` argument, and raises
:class:`~catalogpred.errors.InputFileError` with a :class:`~catalogpred.errors.RejectReason`
for anything that cannot be read. Readers never import torch or Dask.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

from ..errors import InputFileError, RejectReason, is_transient
from ..spectra import Grid

__all__ = [
    "SpectrumBlock",
    "SelectionRejects",
    "ReadOptions",
    "Selection",
    "AUXILIARY",
    "Reader",
    "register_reader",
    "get_reader",
    "readers",
    "identify_survey",
    "survey_from_name",
    "read_spectra",
    "COMMON_META",
    "ColumnDoc",
    "column_docs",
]

#: metadata columns every reader provides (name -> numpy dtype kind), in this order.
COMMON_META = {
    "source_id": "U",  # unique across surveys, e.g. "sdss-0266-51602-0013"
    "survey": "U",  # "sdss", "desi", "pfs"
    "ra": "f8",  # deg, ICRS
    "dec": "f8",  # deg, ICRS
    "z": "f8",  # spectroscopic redshift
    "z_err": "f8",
    "zwarning": "i8",  # survey redshift warning bits (SDSS ZWARNING, DESI ZWARN); 0 = good
    "source_file": "U",  # base name of the file the spectrum came from
    "row_in_file": "i4",  # index of the spectrum inside that file
}


class SelectionRejects:
    """Per-spectrum reject reasons of a multi-object file: the first rule that hits a row wins.

    >>> r = SelectionRejects(3)
    >>> r.add(np.array([True, False, True]), RejectReason.SKY_FIBRE, lambda i: f"row {i}")
    >>> r.add(np.array([True, True, False]), RejectReason.NO_REDSHIFT, lambda i: "no z")
    >>> list(r.reason), list(r.detail)
    (['sky_fibre', 'no_redshift', 'sky_fibre'], ['row 0', 'no z', 'row 2'])
    """

    def __init__(self, n: int):
        self.reason = np.full(n, "", dtype=object)
        self.detail = np.full(n, "", dtype=object)

    def add(self, cond, why: RejectReason, text) -> None:
        """Reject rows where ``cond`` holds and no earlier rule did; ``text(i)`` gives the detail."""
        hit = np.asarray(cond, bool) & (self.reason == "")
        self.reason[hit] = why.value
        for i in np.flatnonzero(hit):
            self.detail[i] = text(i)

    def redshift_fit(self, selection: "Selection", zwarn=None, spectype=None, *, zwarn_name: str = "ZWARN",
                     class_name: str = "SPECTYPE") -> None:
        """The selection's rules on the redshift fit, the same for every survey: warning bits set (``zwarn``
        int [n], unless ``keep_zwarn``) and a class (``spectype`` str [n]) not in ``selection.spectypes``; an
        empty class (a user table without one) passes. ``zwarn_name``/``class_name``: the survey's column
        names, for the detail."""
        if zwarn is not None and not selection.keep_zwarn:
            zwarn = np.asarray(zwarn)
            self.add(zwarn != 0, RejectReason.ZWARN, lambda i: f"{zwarn_name} = {zwarn[i]}")
        if spectype is not None and selection.spectypes:
            cls = np.char.strip(np.asarray(spectype).astype(str))
            self.add((cls != "") & ~np.isin(cls, list(selection.spectypes)), RejectReason.NOT_GALAXY,
                     lambda i: f"{class_name} '{cls[i]}' not in {list(selection.spectypes)}")


#: prefix of identify_survey() results for files with redshifts but no spectra, e.g. "aux:desi-redshifts"
AUXILIARY = "aux:"


@dataclass(frozen=True)
class Selection:
    """Which spectra of multi-object files go on to prediction (the rest are rejects, with a reason).

    Recorded in the run manifest. Defaults keep science targets with a good galaxy redshift.
    """

    keep_sky: bool = False  #: sky fibres (DESI OBJTYPE SKY / TARGETID bit 59; PFS targetType SKY)
    keep_unassigned: bool = False  #: unassigned fibres (DESI negative TARGETID or blank OBJTYPE)
    keep_bad_fiberstatus: bool = False  #: DESI COADD_FIBERSTATUS != 0
    keep_zwarn: bool = False  #: DESI ZWARN != 0 (SDSS ZWARNING rows are kept and flagged in the catalog)
    spectypes: tuple = ("GALAXY",)  #: accepted classes (SDSS CLASS, DESI SPECTYPE, PFS); empty = any
    keep_fluxstd: bool = False  #: PFS flux standards

    def to_manifest(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ReadOptions:
    """Per-run reader options.

    Parameters
    ----------
    redshifts : str, optional
        Path of a redshift table (FITS/Parquet/CSV; see :mod:`catalogpred.redshifts`) that overrides
        the redshifts found next to the spectra.
    selection : Selection
    redshift_files : tuple of str
        Redshift-only files named among the ingest inputs (redrock, pfsCoZCandidates, specObj/spAll): a
        reader looks there, by the same file name, as well as beside the spectra (:func:`given_or_beside`).
    """

    redshifts: str | None = None
    selection: Selection = field(default_factory=Selection)
    redshift_files: tuple = ()


def _compression_variants(name: str) -> list[str]:
    """``name`` and its compressed or uncompressed twins (``x.fits``, ``x.fits.gz``, ``x.fits.fz``), ``name``
    first: a ``coadd-X.fits.gz`` may sit beside a ``redrock-X.fits`` and the other way round."""
    base = name
    for ext in (".gz", ".fz"):
        if base.lower().endswith(".fits" + ext):
            base = base[: -len(ext)]
    if not base.lower().endswith(".fits"):
        return [name]
    return list(dict.fromkeys([name, base, base + ".gz", base + ".fz"]))


def given_or_beside(names, directory: str, given=()) -> str | None:
    """The first of the file ``names`` (base names, in order of preference) in ``directory``, else among the
    ``given`` paths (:attr:`ReadOptions.redshift_files`), else None. A name also matches its gzip/fpack twin
    (``redrock-X.fits`` finds ``redrock-X.fits.gz``)."""
    by_name = {os.path.basename(str(p)): str(p) for p in given}
    for name in names:
        for variant in _compression_variants(name):
            beside = os.path.join(directory, variant)
            if os.path.exists(beside):
                return beside
    for name in names:
        for variant in _compression_variants(name):
            if variant in by_name:
                return by_name[variant]
    return None


@dataclass(frozen=True)
class SpectrumBlock:
    """Spectra of one file (or a batch of files) on a model grid, as read (not normalised).

    Parameters
    ----------
    survey : str
        The store group (survey) the spectra belong to: the reader's :attr:`Reader.group`.
    grid : Grid
        The wavelength grid the pixels are placed on.
    flux : float32 [n, n_pix]
        F_λ in 1e-17 erg/s/cm²/Å, observed frame (0 where not covered).
    ivar : float32 [n, n_pix]
        Inverse variance of ``flux`` (0 = no information).
    mask : uint8 [n, n_pix]
        :class:`~catalogpred.spectra.PixelMask` bits (``PIPELINE``, ``NO_COVERAGE``).
    meta : dict[str, numpy.ndarray]
        Per-spectrum columns of length n: :data:`COMMON_META` first, then survey-native ids.
    reject_reason, reject_detail : object [n], optional
        A :class:`~catalogpred.errors.RejectReason` value (``""`` = keep) and a readable detail,
        for spectra the reader's selection excludes.
    """

    survey: str
    grid: Grid
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    meta: dict = field(default_factory=dict)
    reject_reason: np.ndarray | None = None
    reject_detail: np.ndarray | None = None

    def __post_init__(self):
        n = self.flux.shape[0]
        shape = (n, self.grid.n_pix)
        for name in ("flux", "ivar", "mask"):
            arr = getattr(self, name)
            if arr.shape != shape:
                raise ValueError(f"SpectrumBlock.{name} has shape {arr.shape}, expected {shape}")
        missing = [c for c in COMMON_META if c not in self.meta]
        if missing:
            raise ValueError(f"SpectrumBlock.meta lacks {missing}")
        for k, v in self.meta.items():
            if len(v) != n:
                raise ValueError(f"SpectrumBlock.meta[{k!r}] has {len(v)} rows, expected {n}")
        if self.reject_reason is None:
            object.__setattr__(self, "reject_reason", np.full(n, "", dtype=object))
            object.__setattr__(self, "reject_detail", np.full(n, "", dtype=object))

    def __len__(self) -> int:
        return self.flux.shape[0]

    def slice(self, lo: int, hi: int) -> "SpectrumBlock":
        """Spectra ``lo..hi-1`` (a copy)."""
        return SpectrumBlock(survey=self.survey, grid=self.grid, flux=self.flux[lo:hi].copy(), ivar=self.ivar[lo:hi].copy(),
                             mask=self.mask[lo:hi].copy(), meta={k: v[lo:hi] for k, v in self.meta.items()},
                             reject_reason=self.reject_reason[lo:hi], reject_detail=self.reject_detail[lo:hi])

    @staticmethod
    def concat(blocks: list["SpectrumBlock"]) -> "SpectrumBlock":
        """Stack blocks of the same survey and grid (metadata columns must match)."""
        if not blocks:
            raise ValueError("concat needs at least one block")
        first = blocks[0]
        for b in blocks[1:]:
            if b.survey != first.survey or b.grid != first.grid or list(b.meta) != list(first.meta):
                raise ValueError("cannot concatenate blocks of different surveys, grids or columns")
        return SpectrumBlock(
            survey=first.survey,
            grid=first.grid,
            flux=np.concatenate([b.flux for b in blocks]),
            ivar=np.concatenate([b.ivar for b in blocks]),
            mask=np.concatenate([b.mask for b in blocks]),
            meta={k: np.concatenate([b.meta[k] for b in blocks]) for k in first.meta},
            reject_reason=np.concatenate([b.reject_reason for b in blocks]),
            reject_detail=np.concatenate([b.reject_detail for b in blocks]),
        )


class ColumnDoc(NamedTuple):
    """How a survey-native metadata column is described in the catalog (Parquet field metadata, FITS/VOTable
    exports, ``catalogpred info``)."""

    description: str
    unit: str = ""  #: astropy unit string; "" for dimensionless numbers, ids and text
    ucd: str = "meta"  #: IVOA UCD1+


@dataclass(frozen=True)
class Reader:
    """A registered survey reader (see module docstring)."""

    name: str
    identify: Callable[[set], bool]
    read: Callable[..., SpectrumBlock]  #: read(fits, path, options: ReadOptions)
    grid: Grid
    meta_columns: dict = field(default_factory=dict)  #: COMMON_META + native columns (name -> dtype code)
    priority: int = 0
    description: str = ""
    count: Callable[..., int] | None = None  #: count(fits) -> spectra in the file (None: one per file)
    #: identify_fits(fits) -> bool: a content check (headers, columns) made only when identify(hdu_names) is True
    identify_fits: Callable[..., bool] | None = None
    #: store group its spectra go to (default: ``name``). Readers of one survey's formats (SDSS spec-*.fits
    #: and spPlate) share a group, so their rows, ids and grid stay comparable.
    store_survey: str | None = None
    #: descriptions, units and UCDs of the native columns in ``meta_columns`` (name -> :class:`ColumnDoc`)
    column_docs: dict = field(default_factory=dict)
    #: how the survey names its files (``"spec-"``, ``"coadd-"``, ...): :func:`survey_from_name` files a file
    #: that cannot be read, and so not identified by content, in the group its name says
    name_prefixes: tuple = ()
    #: the id columns (:attr:`~catalogpred.redshifts.RedshiftTable.id_columns`) of a ``--redshifts`` table that
    #: this reader applies; a table keyed otherwise leaves its files' redshifts as they are
    redshift_ids: tuple = ()

    @property
    def group(self) -> str:
        """The store group (survey) this reader writes to."""
        return self.store_survey or self.name


_READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> None:
    """Add a reader to the registry (a later registration with the same name replaces it)."""
    _READERS[reader.name] = reader


def readers() -> list[Reader]:
    """Registered readers, highest priority first."""
    return sorted(_READERS.values(), key=lambda r: -r.priority)


def column_docs(groups=None) -> dict[str, ColumnDoc]:
    """Native column docs of the readers that write to store ``groups`` (default: every reader); where two
    surveys share a column name, the higher-priority reader's doc wins."""
    out: dict[str, ColumnDoc] = {}
    for r in readers():
        if groups is None or r.group in groups:
            for name, doc in r.column_docs.items():
                out.setdefault(name, doc)
    return out


def survey_from_name(path) -> str | None:
    """The store group a file's name says it belongs to (``spec-*.fits`` → ``sdss``, ``coadd-*``/``spectra-*``
    → ``desi``, ``pfsObject-*``/``pfsCoadd-*`` → ``pfs``), by the readers' :attr:`Reader.name_prefixes`; None
    for other names. Only for files that could not be identified by content (unreadable, truncated)."""
    base = os.path.basename(str(path)).lower()
    for reader in readers():
        if any(base.startswith(p.lower()) for p in reader.name_prefixes):
            return reader.group
    return None


def get_reader(name: str) -> Reader:
    try:
        return _READERS[name]
    except KeyError:
        raise InputFileError(
            f"unknown survey {name!r}; known: {', '.join(sorted(_READERS))} (or 'auto')",
            RejectReason.UNKNOWN_FORMAT,
        ) from None


#: FITS files are made of 2,880-byte blocks
FITS_BLOCK = 2880
_GZIP_MAGIC = b"\x1f\x8b"


def _fits_size(path: str, head: bytes) -> int | None:
    """Bytes of FITS data in ``path``: its size, or for a gzip file the size it decompresses to (cfitsio reads
    ``.gz`` itself and reports offsets in the decompressed file); None for other compression cfitsio reads
    (``.Z``, ``.zip``), whose size is not checked. Raises :class:`InputFileError` for a truncated or corrupt
    gzip stream."""
    if head.startswith(_GZIP_MAGIC):
        import gzip
        import zlib

        n = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    n += len(chunk)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise InputFileError(f"{os.path.basename(path)}: truncated or corrupt gzip file ({exc})",
                                 RejectReason.UNREADABLE_FILE) from exc
        return n
    if head.startswith(b"SIMPLE"):
        return os.path.getsize(path)
    return None


def _open_fits(path):
    """``(fitsio.FITS, {EXTNAME, ...})`` of a FITS file (also gzipped, ``.fits.gz``), after checking it is whole:
    a FITS file is a whole number of 2,880-byte blocks and ends where its last HDU ends. A download cut short
    fails that, even where cfitsio opens it (a cut inside the last header hides that HDU)."""
    import fitsio

    name = os.path.basename(str(path))
    try:
        with open(str(path), "rb") as f:
            head = f.read(FITS_BLOCK)
        size = _fits_size(str(path), head)
        fits = fitsio.FITS(str(path))
        hdu_names = {(h.get_extname() or "").upper() for h in fits}
        end = max(h.get_offsets()["data_end"] for h in fits)
    except InputFileError:
        raise
    except Exception as exc:  # fitsio raises OSError/ValueError/… for non-FITS and truncated files
        if is_transient(exc):  # the machine's error (EIO, out of memory): Dask retries the task
            raise
        raise InputFileError(
            f"{name}: not a readable FITS file ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'})",
            RejectReason.UNREADABLE_FILE,
        ) from exc
    what = "decompresses to" if head.startswith(_GZIP_MAGIC) else "has"
    problem = None
    if size is None:
        pass
    elif end > size:
        problem = f"its headers need {end:,d} bytes, the file {what} {size:,d}"
    elif size % FITS_BLOCK:
        problem = f"the file {what} {size:,d} bytes, not a multiple of {FITS_BLOCK:,d}"
    elif size > end and _starts_hdu(str(path), end, head):
        problem = f"an HDU header at byte {end:,d} is cut short (the file {what} {size:,d} bytes)"
    if problem:
        fits.close()
        raise InputFileError(f"{name}: truncated FITS file: {problem}", RejectReason.UNREADABLE_FILE)
    return fits, hdu_names


def _starts_hdu(path: str, offset: int, head: bytes) -> bool:
    """Whether the bytes at ``offset`` (past the last HDU cfitsio found) begin another extension's header: one
    whose header cfitsio could not read to its END card."""
    if head.startswith(_GZIP_MAGIC):
        import gzip

        with gzip.open(path, "rb") as f:
            f.seek(offset)
            return f.read(9) == b"XTENSION="
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(9) == b"XTENSION="


#: auxiliary (redshift-only) formats: name -> identify(hdu_names)
_AUXILIARY: dict[str, Callable[[set], bool]] = {}
#: optional content checks of auxiliary formats: name -> identify_fits(fits)
_AUXILIARY_FITS: dict[str, Callable[..., bool]] = {}


def register_auxiliary(name: str, identify: Callable[[set], bool],
                       identify_fits: Callable[..., bool] | None = None) -> None:
    """Register a redshift-only file format, reported by :func:`identify_survey` as ``"aux:<name>"``.

    ``identify_fits(fits)``, when given, is a content check made after ``identify(hdu_names)`` matched
    (for tables without a telling EXTNAME, e.g. SDSS ``specObj``/``spAll``).
    """
    _AUXILIARY[name] = identify
    if identify_fits is not None:
        _AUXILIARY_FITS[name] = identify_fits


def _content_check(check, fits) -> bool:
    if check is None or fits is None:
        return True
    try:
        return bool(check(fits))
    except Exception:  # noqa: BLE001 - a file that breaks a content check is not that format
        return False


def identify_survey(path: str | os.PathLike, with_count: bool = False):
    """Name of the reader that recognises ``path`` by its HDUs (``"aux:<name>"`` for redshift-only files).

    With ``with_count``, returns ``(name, n_spectra)`` (0 for auxiliary files).

    Raises
    ------
    InputFileError
        ``unreadable_file`` if the file is not FITS, ``unknown_format`` if no reader matches.
    """
    fits, hdu_names = _open_fits(path)
    with fits:
        name = _identify(path, hdu_names, fits)
        if not with_count:
            return name
        if name.startswith(AUXILIARY):
            return name, 0
        reader = _READERS[name]
        try:
            n = 1 if reader.count is None else int(reader.count(fits))
        except Exception as exc:
            raise InputFileError(f"{os.path.basename(str(path))}: cannot count spectra ({exc})",
                                 RejectReason.UNREADABLE_FILE) from exc
        return name, n


def _identify(path, hdu_names: set, fits=None) -> str:
    for reader in readers():
        if reader.identify(hdu_names) and _content_check(reader.identify_fits, fits):
            return reader.name
    for name, ident in _AUXILIARY.items():
        if ident(hdu_names) and _content_check(_AUXILIARY_FITS.get(name), fits):
            return AUXILIARY + name
    shown = ", ".join(sorted(h or "PRIMARY" for h in hdu_names))
    raise InputFileError(
        f"{os.path.basename(str(path))}: no reader matched (HDUs: {shown}); name the reader with --survey "
        f"(one of {', '.join(sorted(_READERS))})",
        RejectReason.UNKNOWN_FORMAT,
    )


def read_spectra(path: str | os.PathLike, survey: str = "auto", options: ReadOptions | None = None) -> SpectrumBlock:
    """Read one survey file into a :class:`SpectrumBlock` on the reader's grid.

    Parameters
    ----------
    path : path-like
        A survey file (e.g. SDSS ``spec-PLATE-MJD-FIBER.fits``).
    survey : str
        Reader name, or ``"auto"`` to identify the file by content.
    options : ReadOptions, optional
        External redshifts and target selection (default: :class:`ReadOptions()`).

    Raises
    ------
    InputFileError
        With ``.reason`` set to a :class:`~catalogpred.errors.RejectReason`.
    """
    fits, hdu_names = _open_fits(path)
    with fits:
        name = _identify(path, hdu_names, fits) if survey == "auto" else survey
        if name.startswith(AUXILIARY):
            raise InputFileError(f"{os.path.basename(str(path))}: a redshift file ({name[len(AUXILIARY):]}), "
                                 "not spectra", RejectReason.UNKNOWN_FORMAT)
        reader = get_reader(name)
        if survey != "auto" and not (reader.identify(hdu_names) and _content_check(reader.identify_fits, fits)):
            shown = ", ".join(sorted(h or "PRIMARY" for h in hdu_names))
            raise InputFileError(
                f"{os.path.basename(str(path))}: not a {name} file (HDUs: {shown})",
                RejectReason.MISSING_HDU,
            )
        try:
            return reader.read(fits, path, options or ReadOptions())
        except InputFileError:
            raise
        except Exception as exc:  # a truncated file often opens but fails on data access
            if is_transient(exc):
                raise
            raise InputFileError(
                f"{os.path.basename(str(path))}: failed to read {name} data ({type(exc).__name__}: {exc})",
                RejectReason.UNREADABLE_FILE,
            ) from exc


# registration of the built-in readers (module import registers them)
from . import desi, sdss, spplate  # noqa: E402,F401
from . import pfs  # noqa: E402,F401
