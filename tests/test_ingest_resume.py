"""Ingest never loses or doubles a spectrum: resume after failed tasks (also with more inputs than the first
run), errors of the machine (retried, not rejected), and a run stopped before its duplicate check.

Faults are injected into a real in-process Dask cluster (``processes=False``, so a patched function is the one
the workers call); the files are format-faithful mocks (:mod:`catalogpred.mock_survey`, :mod:`catalogpred.mock`).
"""
from __future__ import annotations

import errno
import glob
import logging
import os

import numpy as np
import pytest

from catalogpred import store
from catalogpred.errors import InputFileError, StoreError, is_transient
from catalogpred.mock import write_sdss_survey
from catalogpred.mock_survey import write_desi_survey
from catalogpred.pipeline import PipelineError, _FileRows, missing_ranges, plan_ranges, run_ingest
from catalogpred.pipeline import ingest as pipeline  # run_ingest looks its tasks up in this module
from catalogpred.surveys import get_reader

SHARD = 16  # 30-spectrum DESI files are split across shards


@pytest.fixture
def local():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c


@pytest.fixture(scope="module")
def desi_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("desi-resume")
    write_desi_survey(d / "a", 2, spectra_per_file=30, seed=3, resolution=False)
    write_desi_survey(d / "b", 1, spectra_per_file=10, seed=9, resolution=False, program="bright")
    return d


def _rows_per_file(st: str, survey: str) -> dict[str, list[int]]:
    m = store.read_meta(st, survey, columns=["source_path", "row_in_file"])
    out: dict[str, list[int]] = {}
    for p, r in zip(m.column("source_path").to_pylist(), m.column("row_in_file").to_pylist()):
        out.setdefault(os.path.basename(p), []).append(r)
    return {k: sorted(v) for k, v in out.items()}


def _coadds(d) -> dict[str, int]:
    import fitsio

    return {os.path.basename(f): fitsio.FITS(f)["FIBERMAP"].get_nrows()
            for f in glob.glob(str(d / "**" / "coadd-*.fits"), recursive=True)}


def test_missing_ranges_and_plan_ranges():
    assert missing_ranges(10, [0, 1, 2, 5, 9]) == [(3, 5), (6, 9)]
    assert missing_ranges(3, []) == [(0, 3)] and missing_ranges(3, [0, 1, 2]) == [] and missing_ranges(0, []) == []
    assert missing_ranges(4, [-1, 7, 1]) == [(0, 1), (2, 4)]
    shards = plan_ranges([("a", 3, 5), ("b", 0, 7), ("c", 10, 11)], 4)
    assert shards == [[("a", 3, 5), ("b", 0, 2)], [("b", 2, 6)], [("b", 6, 7), ("c", 10, 11)]]


def test_file_rows_name_what_is_missing_or_doubled():
    import pyarrow as pa

    meta = pa.table({"source_path": ["x", "x", "x", "y", "z", "x"], "row_in_file": [0, 2, 2, 0, 0, 3],
                     "source_id": ["x0", "x2", "x2", "file:y", "z0", "x3"]})
    have = _FileRows(meta)
    assert have.unreadable == {"y"}
    assert have.rows("x").tolist() == [0, 2, 2, 3] and have.rows("nope").tolist() == []
    msg = have.problems("x", 5)
    assert "missing spectra 1..1, 4..4" in msg and "stored twice 2" in msg
    assert have.problems("y", 1) == "" and have.problems("z", 1) == ""
    assert "beyond" in have.problems("z", 0)


def test_resume_with_more_inputs_stores_every_spectrum_once(desi_inputs, tmp_path, local, monkeypatch):
    """A failed shard, then a re-run whose input list gained a file (so shard boundaries move): every spectrum
    of every file is in the store exactly once, as in an uninterrupted ingest."""
    real = pipeline.ingest_shard

    def fails_on_shard_1(store_path, survey, shard, *a, **k):
        if shard == 1:
            raise MemoryError("injected: the worker ran out of memory")
        return real(store_path, survey, shard, *a, **k)

    st = str(tmp_path / "resumed.zarr")
    monkeypatch.setattr(pipeline, "ingest_shard", fails_on_shard_1)
    with pytest.raises(PipelineError, match="re-run the same command"):
        run_ingest([str(desi_inputs / "a")], st, client=local, shard_rows=SHARD, chunk_rows=8, progress=False)
    monkeypatch.setattr(pipeline, "ingest_shard", real)
    first = _rows_per_file(st, "desi")
    assert sum(map(len, first.values())) < 60  # the failed shard's spectra are not there yet
    # the directory gained a file; it sorts first, so every later piece starts elsewhere than last time
    extra = sorted(glob.glob(str(desi_inputs / "b" / "**" / "coadd-*.fits"), recursive=True))
    summary = run_ingest([*extra, str(desi_inputs / "a")], st, client=local, shard_rows=SHARD, chunk_rows=8,
                         progress=False)
    got = _rows_per_file(st, "desi")
    want = _coadds(desi_inputs)
    assert got == {f: list(range(n)) for f, n in want.items()}
    assert summary.rows == sum(want.values()) - sum(map(len, first.values()))
    clean = str(tmp_path / "clean.zarr")
    run_ingest([*extra, str(desi_inputs / "a")], clean, client=local, shard_rows=SHARD, chunk_rows=8, progress=False)
    cols = ["source_id", "status", "reject_reason"]
    a, b = store.read_meta(st, "desi", columns=cols), store.read_meta(clean, "desi", columns=cols)
    assert sorted(zip(*(a.column(c).to_pylist() for c in cols))) == sorted(zip(*(b.column(c).to_pylist() for c in cols)))


def test_errors_of_the_machine_are_retried_not_rejected(desi_inputs, tmp_path, local):
    """An I/O error (EIO) while reading one piece of a split file is retried by Dask; the file is not quarantined
    and no spectrum goes missing. A corrupt file (cfitsio's OSError has no errno) is still a reject."""
    assert is_transient(OSError(errno.EIO, "Input/output error")) and is_transient(MemoryError())
    assert not is_transient(OSError("FITSIO status = 107: tried to move past end of file"))
    assert not is_transient(StoreError("no store")) and not is_transient(ValueError("x"))
    desi = get_reader("desi")
    real_read, calls = desi.read, []

    def eio_once(fits, path, options):
        calls.append(path)
        if len(calls) == 2:  # the second piece read: a later piece of the first file
            raise OSError(errno.EIO, "Input/output error")
        return real_read(fits, path, options)

    object.__setattr__(desi, "read", eio_once)
    try:
        st = str(tmp_path / "eio.zarr")
        summary = run_ingest([str(desi_inputs / "a")], st, client=local, shard_rows=SHARD, chunk_rows=8,
                             progress=False)
    finally:
        object.__setattr__(desi, "read", real_read)
    assert len(calls) > 4  # 4 pieces, one of them read twice
    assert "unreadable_file" not in summary.reasons
    assert _rows_per_file(st, "desi") == {f: list(range(n)) for f, n in _coadds(desi_inputs / "a").items()}
    # a genuinely truncated file stays a reject (one row), split across shards or not
    f = sorted(glob.glob(str(desi_inputs / "a" / "**" / "coadd-*.fits"), recursive=True))[0]
    cut = tmp_path / "cut" / os.path.basename(f)
    cut.parent.mkdir()
    data = open(f, "rb").read()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputFileError):
        from catalogpred.surveys import read_spectra

        read_spectra(cut)


def test_duplicates_are_rejected_when_the_first_run_stopped_before_its_check(tmp_path, local, monkeypatch):
    """The duplicate check runs on every ingest: a run stopped after marking its shards done (before the check)
    leaves a duplicate that the re-run, with nothing left to read, still rejects."""
    survey = write_sdss_survey(tmp_path / "sdss", 6, seed=5, n_bad=7)  # n_bad=7 includes a copy of a good file
    assert "duplicate_id" in survey.bad.values()
    st = str(tmp_path / "dup.zarr")

    def stopped(*a, **k):
        raise KeyboardInterrupt("injected: the client stopped after marking the shards done")

    real = pipeline._reject_duplicates
    monkeypatch.setattr(pipeline, "_reject_duplicates", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_ingest([str(tmp_path / "sdss")], st, client=local, shard_rows=8, chunk_rows=8, progress=False)
    monkeypatch.setattr(pipeline, "_reject_duplicates", real)
    again = run_ingest([str(tmp_path / "sdss")], st, client=local, shard_rows=8, chunk_rows=8, progress=False)
    assert again.rows == 0 and again.reasons == {"duplicate_id": 1}
    m = store.read_meta(st, "sdss", columns=["source_id", "status"])
    ok = np.asarray(m.column("source_id").to_pylist(), object)[m.column("status").to_numpy() == store.RowStatus.OK]
    assert len(ok) == len(set(ok)) > 0


def test_a_lost_spectrum_fails_the_ingest_loudly(desi_inputs, tmp_path, local, monkeypatch, caplog):
    """If a shard ever came back without some spectra of its pieces, the per-file row check stops the run
    (it does not end with a silent gap); re-running the command ingests the missing spectra."""
    real = pipeline.ingest_shard

    def drops_a_piece(store_path, survey, shard, pieces, *a, **k):
        if shard == 1:  # 30-spectrum files in 16-row shards: shard 1 holds pieces of two files, and loses one
            assert len(pieces) > 1
            pieces = pieces[:-1]
        return real(store_path, survey, shard, pieces, *a, **k)

    st = str(tmp_path / "lost.zarr")
    monkeypatch.setattr(pipeline, "ingest_shard", drops_a_piece)
    inputs = [str(desi_inputs / "b"), str(desi_inputs / "a")]
    with pytest.raises(PipelineError, match="not stored exactly once.*missing spectra"):
        run_ingest(inputs, st, client=local, shard_rows=SHARD, chunk_rows=8, progress=False)
    assert sum(map(len, _rows_per_file(st, "desi").values())) < sum(_coadds(desi_inputs).values())
    monkeypatch.setattr(pipeline, "ingest_shard", real)
    with caplog.at_level(logging.INFO, logger="catalogpred.pipeline"):
        run_ingest(inputs, st, client=local, shard_rows=SHARD, chunk_rows=8, progress=False)
    assert "resuming" in caplog.text
    assert _rows_per_file(st, "desi") == {f: list(range(n)) for f, n in _coadds(desi_inputs).items()}


def test_an_undetectable_file_stays_one_reject_across_runs(tmp_path, local):
    """A file no reader identifies is quarantined in the run's main group; a later run whose main group differs
    does not quarantine it again in another group (one reject row per input file in the whole store)."""
    write_sdss_survey(tmp_path / "sdss", 2, seed=4)
    write_desi_survey(tmp_path / "desi", 3, spectra_per_file=8, seed=8, resolution=False)
    junk = tmp_path / "junk" / "notes.fits"
    junk.parent.mkdir()
    junk.write_bytes(b"SIMPLE  =                    T" + b" " * 2850)  # FITS-like, but no survey's HDUs
    st = str(tmp_path / "s.zarr")
    sdss_files = sorted(str(p) for p in (tmp_path / "sdss").rglob("spec-*.fits"))
    run_ingest([*sdss_files, str(junk)], st, client=local, progress=False)  # main group: sdss
    again = run_ingest([str(tmp_path / "desi"), str(junk)], st, client=local, progress=False)  # main group: desi
    assert again.skipped_files == 1
    rows = {g: store.read_meta(st, g, columns=["source_path"]).column("source_path").to_pylist()
            for g in store.list_surveys(st)}
    assert set(rows) == {"sdss", "desi"}
    assert sum(r.count(str(junk)) for r in rows.values()) == 1 and str(junk) in rows["sdss"]
