"""Ingest on Dask: survey files → shards of the Zarr store, one task per shard (:func:`run_ingest`).

Files are identified by content and packed into shards (:func:`plan_pieces`); a resumed run ingests exactly
the spectra that no finished shard holds (:func:`missing_ranges`, :func:`plan_ranges`). Every run ends with the
duplicate-id check and a check that each input file's spectra are stored once each.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from .. import runlock, store
from ..cluster import check_workers, retire_unfit_workers, same_code, shared_path
from ..errors import ConfigError, RejectReason
from ..surveys import get_reader, readers, survey_from_name
from ..tasks import detect_survey, ingest_shard
from .runner import PipelineError, reasons_lines, run_bounded

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["FITS_PATTERNS", "expand_inputs", "run_ingest", "IngestSummary", "plan_pieces", "plan_ranges",
           "missing_ranges"]

log = logging.getLogger(__name__)

FITS_PATTERNS = ("*.fits", "*.fits.gz", "*.fit", "*.fits.fz")


def expand_inputs(inputs: list[str], _listed_in: str | None = None) -> list[str]:
    """Files, directories (searched recursively for FITS files), globs and ``@filelist.txt`` → sorted absolute paths.

    Relative paths in a file list are relative to the list's directory (as in most tools), not to the
    working directory.

    Raises
    ------
    ConfigError
        If an input matches nothing (naming the file list it came from).
    """
    out: list[str] = []
    where = f" (listed in {_listed_in})" if _listed_in else ""
    for item in inputs:
        item = str(item)
        if item.startswith("@"):
            if not os.path.isfile(item[1:]):
                raise ConfigError(f"file list {item[1:]}{where} does not exist (@FILE names a text file of paths, "
                                  "one per line)")
            base = os.path.dirname(os.path.abspath(item[1:]))
            lines = [ln.strip() for ln in Path(item[1:]).read_text().splitlines()]
            out += expand_inputs([(ln[0] + os.path.join(base, ln[1:])) if ln.startswith("@") else os.path.join(base, ln)
                                  for ln in lines if ln and not ln.startswith("#")], _listed_in=item[1:])
        elif os.path.isdir(item):
            found = [p for pat in FITS_PATTERNS for p in glob.glob(os.path.join(item, "**", pat), recursive=True)]
            if not found:
                raise ConfigError(f"directory {item}{where} holds no FITS files ({', '.join(FITS_PATTERNS)})")
            out += found
        elif os.path.exists(item):
            out.append(item)
        else:
            found = glob.glob(item, recursive=True)
            if not found:
                raise ConfigError(f"input {item!r}{where} matches no file")
            out += found
    return sorted(dict.fromkeys(os.path.abspath(p) for p in out))



@dataclass
class IngestSummary:
    store: str
    files: int = 0
    auxiliary_files: int = 0
    skipped_files: int = 0
    rows: int = 0
    ok: int = 0
    shards: int = 0
    by_survey: dict = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    #: rejects the store already held for the inputs' spectra that this run skipped (``--strict`` counts them)
    earlier_reasons: Counter = field(default_factory=Counter)
    #: inputs skipped because the store holds them only as an ``unreadable_file`` reject
    quarantined_files: int = 0
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        """Rejected spectra of the given inputs: this run's, and those the store holds for the inputs it skipped
        (a re-run of an ingest that had rejects still has them: ``--strict`` fails the same way)."""
        return sum(self.reasons.values()) + sum(self.earlier_reasons.values())

    def table(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        lines = [f"ingest summary: {self.store}",
                 f"  input files      {self.files:>9,d}   (already in the store, skipped: {self.skipped_files:,d}; "
                 f"redshift-only files used: {self.auxiliary_files:,d})",
                 f"  spectra          {self.rows:>9,d}   ok {self.ok:,d}, rejected {sum(self.reasons.values()):,d}"
                 + (f" (and {sum(self.earlier_reasons.values()):,d} rejects of skipped inputs already in the store)"
                    if self.earlier_reasons else ""),
                 f"  shards written   {self.shards:>9,d}",
                 f"  time             {self.seconds:>9.1f} s ({rate:,.0f} spectra/s)"]
        for s, d in self.by_survey.items():
            lines.append(f"  survey {s:<9} {d['rows']:>9,d} spectra in {d['shards']} shards")
        return "\n".join(lines + reasons_lines(self.reasons))


def plan_pieces(files: list[tuple[str, int]], shard_rows: int) -> list[list[tuple[str, int, int]]]:
    """Pack ``(path, n_spectra)`` into shards of at most ``shard_rows`` spectra.

    Returns one list of ``(path, lo, hi)`` pieces per shard; a file larger than a shard is
    split across consecutive shards. Pure function (tested directly).
    """
    return plan_ranges([(path, 0, max(1, int(n))) for path, n in files], shard_rows)


def plan_ranges(ranges: list[tuple[str, int, int]], shard_rows: int) -> list[list[tuple[str, int, int]]]:
    """Pack row ranges ``(path, lo, hi)`` (spectra ``lo..hi-1`` of a file) into shards of at most ``shard_rows``
    spectra, splitting a range across consecutive shards where it does not fit. Pure function."""
    shards: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = shard_rows
    for path, lo, hi in ranges:
        while lo < hi:
            take = min(room, hi - lo)
            current.append((path, lo, lo + take))
            lo += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], shard_rows
    if current:
        shards.append(current)
    return shards


def missing_ranges(n: int, have) -> list[tuple[int, int]]:
    """The runs ``(lo, hi)`` of spectra ``0..n-1`` of a file that are not among the row numbers ``have``."""
    missing = np.ones(max(int(n), 0), bool)
    have = np.asarray(have, np.int64)
    missing[have[(have >= 0) & (have < len(missing))]] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], missing.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


class _FileRows:
    """The store rows of each input file of a group: ``rows(path)`` (``row_in_file`` values, one per store row,
    sorted) and ``unreadable`` (files quarantined whole, source_id ``file:<name>``). From :func:`store.read_meta`
    columns ``source_path, row_in_file, source_id``."""

    def __init__(self, meta: pa.Table):
        import pyarrow.compute as pc

        paths = meta.column("source_path").combine_chunks().dictionary_encode()
        self._index = {p: i for i, p in enumerate(paths.dictionary.to_pylist())}
        codes = paths.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        rows = meta.column("row_in_file").to_numpy().astype(np.int64)
        order = np.lexsort((rows, codes))
        self._codes, self._rows = codes[order], rows[order]
        whole = pc.starts_with(meta.column("source_id"), "file:").to_numpy(zero_copy_only=False)
        self.unreadable = {paths.dictionary[int(c)].as_py() for c in np.unique(codes[whole])}

    def rows(self, path: str) -> np.ndarray:
        i = self._index.get(path)
        if i is None:
            return np.zeros(0, np.int64)
        lo, hi = np.searchsorted(self._codes, [i, i + 1])
        return self._rows[lo:hi]

    def problems(self, path: str, n: int) -> str:
        """What is wrong with the rows of a file of ``n`` spectra ("" if each spectrum is there once, or the file
        is one unreadable-file row)."""
        rows = self.rows(path)
        if path in self.unreadable:
            return "" if len(rows) == 1 else f"an unreadable-file reject and {len(rows) - 1} more rows"
        dup = np.unique(rows[1:][np.diff(rows) == 0])
        gaps = missing_ranges(n, rows)
        extra = rows[(rows < 0) | (rows >= n)]
        out = []
        if gaps:
            out.append("missing spectra " + ", ".join(f"{a}..{b - 1}" for a, b in gaps[:3]))
        if len(dup):
            out.append("spectra stored twice " + ", ".join(map(str, dup[:5].tolist())))
        if len(extra):
            out.append(f"{len(extra)} rows beyond the file's {n} spectra")
        return "; ".join(out)


def run_ingest(inputs: list[str], store_path: str, *, client, survey: str = "auto", shard_rows: int = 4096,
               chunk_rows: int = 256, progress: bool | None = None, options=None) -> IngestSummary:
    """Ingest survey files into the Zarr store at ``store_path`` (created if needed, resumed if partial).

    Parameters
    ----------
    inputs : list of str
        Files, directories, globs, ``@filelist.txt``.
    survey : str
        A reader name, or ``"auto"`` to identify every file by content. Redshift-only files
        (DESI ``redrock-*``, SDSS ``specObj``/``spAll``) are recognised either way and used by the
        readers, not ingested. Files go to their reader's store group (:attr:`Reader.group`), so
        SDSS ``spec-*`` and ``spPlate-*`` files land in one ``sdss`` group.
    shard_rows, chunk_rows : int
        Rows per shard (= per ingest task and per prediction block) and per compressed chunk.
    options : ReadOptions, optional
        External redshift table and target selection for multi-object surveys.

    Raises
    ------
    BusyError
        If another ingest is writing the store (:mod:`catalogpred.runlock`): one ingest at a time per store.
    """
    store_path = shared_path(store_path)  # workers get absolute paths (their cwd differs)
    with runlock.write_lock(store_path, "ingest"):
        return _ingest(inputs, store_path, client=client, survey=survey, shard_rows=shard_rows, chunk_rows=chunk_rows,
                       progress=progress, options=options)


def _ingest(inputs: list[str], store_path: str, *, client, survey: str, shard_rows: int, chunk_rows: int,
            progress: bool | None, options) -> IngestSummary:
    """:func:`run_ingest` with the store's lock held."""
    from ..surveys import ReadOptions

    options = options or ReadOptions()
    t0 = time.perf_counter()
    paths = expand_inputs(inputs)
    shared = paths[:1] + [store_path]  # what every worker must see, at the same paths
    checked = check_workers(client, shared)
    summary = IngestSummary(store=str(store_path))
    file_rejects: dict[str, str] = {}
    try:
        detected = client.gather(client.map(same_code(detect_survey), paths, key="detect_survey", pure=False,
                                            batch_size=256, retries=2))
    except (OSError, MemoryError) as exc:  # the machine's errors (EIO, ...), raised after Dask's retries
        raise PipelineError(f"reading the inputs failed ({type(exc).__name__}: {exc}); nothing was ingested, "
                            "re-run the same command") from exc
    by_survey: dict[str, list[tuple[str, int]]] = {}  # store group -> files
    reader_of: dict[str, str] = {}  # path -> reader name, where it differs from its group's name
    group_reader: dict[str, str] = {}  # store group -> a reader writing to it (grid, columns)
    redshift_files = []
    # every input already in the store, in whichever group: a path never sits in two groups
    stored = store.stored_inputs(store_path)
    elsewhere: dict[str, list[str]] = {}  # group -> inputs it holds that this run would file in another group
    quarantined = []  # inputs the store holds only as an unreadable_file reject
    for path, name, n, rej in detected:
        if name is not None and name.startswith("aux:"):
            summary.auxiliary_files += 1
            redshift_files.append(path)
            continue
        summary.files += 1
        if path in stored and stored[path][1]:
            quarantined.append((path, name is not None))
        if survey != "auto":
            name = survey
        elif name is None:
            file_rejects[path] = rej
            continue
        group = get_reader(name).group  # e.g. spPlate files ("sdss-plate") go to the "sdss" group
        if path in stored and stored[path][0] != group:  # e.g. quarantined under another group by an older ingest
            elsewhere.setdefault(stored[path][0], []).append(path)
            continue
        by_survey.setdefault(group, []).append((path, n))
        group_reader.setdefault(group, name)
        if name != group:
            reader_of[path] = name
    if summary.files == 0:
        raise ConfigError(f"no spectra among the inputs: {summary.auxiliary_files} redshift-only file(s) "
                          "(redrock, specObj/spAll, ...); give the spectra files too")
    fits_named = [p for p in file_rejects if os.path.basename(p).lower().endswith((".fits", ".fit", ".fits.gz", ".fz"))]
    if not by_survey and not fits_named and not elsewhere:  # no input is even named like FITS: say so rather than
        example = next(iter(file_rejects.values())).split("\t", 1)[-1]  # make a store of rejects (broken FITS files are)
        raise ConfigError(f"none of the {summary.files} input file(s) is a spectra file of a known survey (SDSS spec/"
                          f"spPlate, DESI, PFS; e.g. {example}); nothing was ingested (`catalogpred ingest ... "
                          "--dry-run` says what each input is)")
    if redshift_files:  # the readers look among them as well as beside the spectra
        options = dataclasses.replace(options, redshift_files=tuple(redshift_files))
    if file_rejects:
        # a file that cannot be read is quarantined (one reject row) in the group its name says (spec-* → sdss,
        # coadd-* → desi, ...), else the main survey's group, so the accounting still holds; one quarantined by an
        # earlier ingest into this store stays in the group that holds its reject row
        main = (max(by_survey, key=lambda s: len(by_survey[s])) if by_survey
                else max(Counter(g for g, _ in stored.values()).items(), key=lambda kv: kv[1])[0] if stored else "sdss")
        for p in file_rejects:
            group = stored[p][0] if p in stored else survey_from_name(p) or main
            by_survey.setdefault(group, []).append((p, 1))
    if quarantined:
        readable = sum(ok for _, ok in quarantined)
        log.warning("%d input file(s) are in %s only as unreadable_file rejects and were skipped (e.g. %s)%s; "
                    "if repaired, ingest them into a new store", len(quarantined), store_path,
                    os.path.basename(quarantined[0][0]), f", {readable} of them readable now" if readable else "")
        summary.quarantined_files = len(quarantined)
    table_ids = _redshift_table_ids(options.redshifts)

    for name in sorted(set(by_survey) | set(elsewhere)):
        files = by_survey.get(name, [])
        if name in elsewhere:  # inputs in the store under this group that this run would file elsewhere: skipped
            summary.skipped_files += len(elsewhere[name])
            summary.earlier_reasons.update(_stored_rejects(store_path, name, elsewhere[name]))
            if not files:
                continue
        reader = get_reader(group_reader.get(name, name))
        # the redshift table this group's readers use (a table keyed by another survey's ids is not theirs)
        redshifts = options.redshifts if table_ids is not None and table_ids in _redshift_ids(name) else None
        if options.redshifts and redshifts is None and name in group_reader:
            log.warning("--redshifts %s is keyed by %s, which the %s readers do not use: its %d files keep their own "
                        "redshifts", os.path.basename(options.redshifts), ", ".join(table_ids), name, len(files))
        if os.path.exists(store_path) and name in store.list_surveys(store_path):
            _, layout = store.open_survey(store_path, name)  # an existing group keeps its own layout
            if (layout.shard_rows, layout.chunk_rows) != (shard_rows, chunk_rows):
                log.info("%s/%s exists: appending with its shard_rows=%d, chunk_rows=%d", store_path, name,
                         layout.shard_rows, layout.chunk_rows)
        else:
            layout = store.SurveyLayout(survey=name, grid=reader.grid, meta_columns=reader.meta_columns,
                                        shard_rows=shard_rows, chunk_rows=min(chunk_rows, shard_rows))
            store.create_survey(store_path, layout)
        pieces = plan_pieces(files, layout.shard_rows)
        if len(store.done_shards(store_path, name)):
            # resume: ingest exactly the spectra of each file that no finished shard holds (a file quarantined
            # whole, source_id "file:<name>", is done), whatever the shard boundaries were last time
            have = _FileRows(store.read_meta(store_path, name, columns=["source_path", "row_in_file", "source_id"]))
            ranges = [(p, lo, hi) for p, n in files if p not in have.unreadable
                      for lo, hi in missing_ranges(int(n), have.rows(p))]
            skipped = len({p for p, _ in files} - {p for p, _, _ in ranges})
            summary.skipped_files += skipped
            earlier = _earlier_options(store_path, name)
            if skipped and earlier != [(redshifts, options.selection.to_manifest())]:
                log.warning("%d of these files are already in %s/%s and were skipped: their spectra keep the "
                            "redshifts and selection of their first ingest (%s), not this run's (%s); ingest them "
                            "into a new store to apply those", skipped, store_path, name,
                            "; ".join(_describe_options(*o) for o in earlier) or "not recorded",
                            _describe_options(redshifts, options.selection.to_manifest()))
            n_all, n_todo = sum(int(n) for _, n in files), sum(hi - lo for _, lo, hi in ranges)
            log.info("resuming %s/%s: %d of the inputs' %d spectra already ingested", store_path, name,
                     n_all - n_todo, n_all)
            pieces = plan_ranges(ranges, layout.shard_rows)
        results, errors, shards = {}, {}, []
        if pieces:
            shards = store.allocate_shards(store_path, name, len(pieces))
            keys = [f"ingest-{name}-{s:06d}-{os.urandom(4).hex()}" for s in shards]
            key_to_shard = dict(zip(keys, shards))
            group_options = options if redshifts == options.redshifts else dataclasses.replace(options, redshifts=None)
            args = [(str(store_path), name, s, b, {p: file_rejects[p] for p, _, _ in b if p in file_rejects},
                     group_options, {p: reader_of[p] for p, _, _ in b if p in reader_of} or None)
                    for s, b in zip(shards, pieces)]
            finished: list[int] = []

            def visible(key, result, name=name) -> str | None:
                """None if the shard's data are there as this client sees the store (its worker shares it)."""
                shard = key_to_shard[key]
                if not result.get("n_rows"):  # nothing to write
                    return None
                return None if store.shard_written(store_path, name, shard) else \
                    f"shard {shard} of {store_path}/{name} is not there"

            try:
                results, errors = run_bounded(
                    client, ingest_shard, args, {}, desc=f"ingest {name}", keys=keys, progress=progress,
                    on_done=lambda k, r: finished.append(key_to_shard[k]), verify=visible, checked_workers=checked,
                    on_new_workers=lambda addrs: retire_unfit_workers(client, addrs, shared))
            finally:  # what finished is kept, also when the run stops
                store.mark_shards_done(store_path, name, finished)
        # duplicates and the per-file row check run on every ingest, a resumed one included (a run stopped
        # after marking its shards done still gets them)
        meta = store.read_meta(store_path, name, columns=["source_id", "status", "source_path", "row_in_file",
                                                          "reject_reason"])
        summary.earlier_reasons.update(_earlier_rejects(meta, [p for p, _ in files], shards, layout.shard_rows))
        n_dup = _reject_duplicates(store_path, name, meta)
        if errors:
            raise PipelineError(f"{len(errors)} ingest tasks failed (e.g. {next(iter(errors.values()))}); "
                                "re-run the same command to resume")
        lengths = {p: k for r in results.values() for p, k in r.get("lengths", {}).items()}
        _check_file_rows(store_path, name, _FileRows(meta), [(p, lengths.get(p, n)) for p, n in files])
        for r in results.values():
            summary.rows += r["n_rows"]
            summary.ok += r["n_ok"]
            summary.reasons.update(r["reasons"])
        summary.shards += len(results)
        if n_dup:
            summary.ok -= n_dup
            summary.reasons[RejectReason.DUPLICATE_ID.value] += n_dup
        if not pieces:
            continue
        d = summary.by_survey.setdefault(name, {"rows": 0, "shards": 0})
        d["rows"] += sum(r["n_rows"] for r in results.values())
        d["shards"] += len(results)
        reasons = Counter()
        for r in results.values():
            reasons.update(r["reasons"])
        store.record_ingest(store_path, name, {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "catalogpred": __version__,
            "files": len({p for b in pieces for p, _, _ in b}), "rows": d["rows"], "shards": len(results),
            "redshifts": redshifts, "selection": options.selection.to_manifest(),
            "rejects_by_reason": dict(reasons) | ({"duplicate_id": n_dup} if n_dup else {}),
        })
    summary.seconds = time.perf_counter() - t0
    return summary


def _stored_rejects(store_path, group: str, paths) -> Counter:
    """Rejects (by reason) the store's ``group`` holds for the input files ``paths``."""
    meta = store.read_meta(store_path, group, ["source_path", "status", "reject_reason"])
    return _earlier_rejects(meta, paths, [], 1)


def _earlier_rejects(meta, paths, new_shards, shard_rows: int) -> Counter:
    """Rejects (by reason) among ``meta``'s rows of the files ``paths`` outside this run's ``new_shards``: what
    the store held for the inputs before this run."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not paths or not meta.num_rows:
        return Counter()
    rejected = (meta.column("status").to_numpy() == store.RowStatus.REJECTED)
    rejected &= pc.is_in(meta.column("source_path"), value_set=pa.array(list(paths), pa.string())).to_numpy(
        zero_copy_only=False)
    if len(new_shards):
        rejected &= ~np.isin(meta.column("row").to_numpy() // shard_rows, np.asarray(new_shards, np.int64))
    return Counter(meta.column("reject_reason").filter(pa.array(rejected)).to_pylist())


def _redshift_table_ids(path) -> tuple | None:
    """The id columns of the ``--redshifts`` table (None without one), read as the workers read it (cached)."""
    if not path:
        return None
    from ..redshifts import load_redshift_table

    return load_redshift_table(path).id_columns


def _redshift_ids(group: str) -> set:
    """The id columns of the redshift tables that the readers writing to store ``group`` use."""
    return {ids for r in readers() if r.group == group for ids in r.redshift_ids}


def _earlier_options(store_path, group: str) -> list[tuple]:
    """The distinct ``(redshifts, selection)`` of the ingest runs recorded for a store group, in order."""
    runs = store.ingest_history(store_path, group)
    out = []
    for run in runs:
        o = (run.get("redshifts"), run.get("selection"))
        if o not in out:
            out.append(o)
    return out


def _describe_options(redshifts, selection: dict) -> str:
    from ..surveys import Selection

    changed = [f"{k}={v}" for k, v in (selection or {}).items() if v != Selection().to_manifest().get(k)]
    return ", ".join([f"--redshifts {os.path.basename(redshifts)}" if redshifts else "no --redshifts"]
                     + (changed or ["default selection"]))


def _check_file_rows(store_path: str, survey: str, have: _FileRows, files: list[tuple[str, int]]) -> None:
    """Every spectrum of every input file is in the store once (or the file is one unreadable-file reject).

    ``files``: ``(path, n_spectra)``. Raises :class:`PipelineError` naming the files whose rows are missing or
    doubled: an ingest never ends with a spectrum lost or stored twice without saying so.
    """
    bad = [(p, msg) for p, n in files if (msg := have.problems(p, int(n)))]
    if bad:
        shown = "; ".join(f"{os.path.basename(p)}: {msg}" for p, msg in bad[:3])
        raise PipelineError(f"{store_path}/{survey}: {len(bad)} input files are not stored exactly once per spectrum "
                            f"({shown}). Missing spectra are ingested by re-running the same command; spectra stored "
                            "twice need a new store")


def _reject_duplicates(store_path: str, survey: str, meta=None) -> int:
    """Mark later occurrences of an already ingested source_id as REJECTED (duplicate_id); returns the count.
    ``meta``: :func:`store.read_meta` with ``source_id, status, source_path`` (read when not given)."""
    if meta is None:
        meta = store.read_meta(store_path, survey, columns=["source_id", "status", "source_path"])
    ok = meta.column("status").to_numpy() == store.RowStatus.OK
    ids = np.asarray(meta.column("source_id").to_pylist(), dtype=object)[ok]
    rows = meta.column("row").to_numpy()[ok]
    paths = np.asarray(meta.column("source_path").to_pylist(), dtype=object)[ok]
    if len(ids) == 0:
        return 0
    _, first_idx, inverse = np.unique(ids.astype(str), return_index=True, return_inverse=True)
    dup = np.flatnonzero(first_idx[inverse] != np.arange(len(ids)))
    if len(dup):
        details = [f"{ids[i]} already ingested from {os.path.basename(str(paths[first_idx[inverse[i]]]))}" for i in dup]
        store.set_rejected(store_path, survey, rows[dup], RejectReason.DUPLICATE_ID.value, details)
        log.warning("%d duplicate source_id values in %s/%s rejected (first occurrence kept)", len(dup), store_path, survey)
    return int(len(dup))

