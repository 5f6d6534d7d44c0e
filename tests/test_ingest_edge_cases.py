"""Ingest edge cases on the real SDSS and DESI files (../shared/realdata): gzipped inputs, truncated files,
where unreadable files are filed, repaired files, re-ingest warnings, --strict on re-runs, interrupted runs,
--redshifts for SDSS spec files and DELTACHI2 from a --redshifts redrock table, and message texts."""
from __future__ import annotations

import gzip
import logging
import shutil

import numpy as np
import pytest

from catalogpred import store
from catalogpred.errors import ConfigError, InputFileError, RejectReason
from catalogpred.pipeline import expand_inputs, run_ingest
from catalogpred.surveys import ReadOptions, identify_survey, read_spectra

from conftest import DESI_DIR

SPEC = "spec-0266-51602-0013.fits"
COADD = "coadd-4-80613-thru20210324.fits"  # with redrock-4-80613-thru20210324.fits beside it
REDROCK = "redrock-4-80613-thru20210324.fits"


@pytest.fixture
def local():
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c


@pytest.fixture
def desi_pair(desi_files):
    return DESI_DIR / COADD, DESI_DIR / REDROCK


def _gzip(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst


def _groups(st) -> dict[str, list[str]]:
    return {g: store.read_meta(st, g, columns=["source_path"]).column("source_path").to_pylist()
            for g in store.list_surveys(st)}


# 1. gzipped FITS files

def test_gzipped_files_read_like_the_plain_ones(sdss_files, desi_pair, tmp_path):
    spec = next(p for p in sdss_files if p.name == SPEC)
    gz = _gzip(spec, tmp_path / "gz" / (SPEC + ".gz"))
    assert identify_survey(gz, with_count=True) == ("sdss", 1)
    a, b = read_spectra(spec), read_spectra(gz)
    assert np.array_equal(a.flux, b.flux) and a.meta["source_id"][0] == b.meta["source_id"][0]
    # a gzipped DESI coadd finds its redrock beside it, gzipped or not
    coadd, redrock = desi_pair
    plain = read_spectra(coadd)
    for rr_name in (REDROCK, REDROCK + ".gz"):
        d = tmp_path / rr_name.replace(".", "_")
        _gzip(coadd, d / (COADD + ".gz"))
        (shutil.copy(redrock, d / rr_name) if not rr_name.endswith(".gz") else _gzip(redrock, d / rr_name))
        got = read_spectra(d / (COADD + ".gz"))
        assert np.array_equal(got.meta["z"], plain.meta["z"], equal_nan=True)
        assert list(got.reject_reason) == list(plain.reject_reason)


def test_gzipped_inputs_are_ingested(sdss_files, desi_pair, tmp_path, local):
    spec = next(p for p in sdss_files if p.name == SPEC)
    _gzip(spec, tmp_path / "in" / (SPEC + ".gz"))
    _gzip(desi_pair[0], tmp_path / "in" / (COADD + ".gz"))
    _gzip(desi_pair[1], tmp_path / "in" / (REDROCK + ".gz"))
    st = str(tmp_path / "gz.zarr")
    summary = run_ingest([str(tmp_path / "in")], st, client=local, progress=False)
    assert "unreadable_file" not in summary.reasons and "no_redshift" not in summary.reasons
    assert summary.files == 2 and summary.auxiliary_files == 1
    assert set(_groups(st)) == {"sdss", "desi"}


# 2. truncated files

def test_truncation_is_caught_wherever_the_file_is_cut(sdss_files, tmp_path):
    data = next(p for p in sdss_files if p.name == SPEC).read_bytes()
    # HDUs of this file: PRIMARY 0, COADD 11520, SPECOBJ 138240, SPZLINE 164160 (end 172800)
    cuts = {"in the last header, on a block": 164160 + 2880, "in the last header": 164160 + 1000,
            "in the SPECOBJ header": 138240 + 5000, "in the SPECOBJ header, on a block": 138240 + 2 * 2880,
            "in COADD's data": 100_000}
    for what, n in cuts.items():
        for gz in (False, True):
            p = tmp_path / f"{n}-{gz}" / (SPEC + (".gz" if gz else ""))
            p.parent.mkdir()
            p.write_bytes(gzip.compress(data[:n]) if gz else data[:n])
            with pytest.raises(InputFileError, match="truncated FITS file") as exc:
                read_spectra(p)
            assert exc.value.reason is RejectReason.UNREADABLE_FILE, what
    cut_gzip = tmp_path / "cutgz" / (SPEC + ".gz")
    cut_gzip.parent.mkdir()
    cut_gzip.write_bytes(gzip.compress(data)[:40_000])
    with pytest.raises(InputFileError, match="truncated or corrupt gzip") as exc:
        identify_survey(cut_gzip)
    assert exc.value.reason is RejectReason.UNREADABLE_FILE


# 3. where an unreadable file is filed

def test_an_unreadable_file_goes_to_the_group_its_name_says(desi_pair, sdss_files, tmp_path, local):
    from catalogpred.surveys import survey_from_name

    assert [survey_from_name(n) for n in ("spec-1-2-3.fits", "coadd-x.fits.gz", "spectra-x.fits",
                                          "pfsObject-x.fits", "spPlate-1-2.fits", "notes.fits")] == \
        ["sdss", "desi", "desi", "pfs", "sdss", None]
    broken = tmp_path / "in" / COADD
    broken.parent.mkdir()
    broken.write_bytes(desi_pair[0].read_bytes()[:300_000])
    st = str(tmp_path / "only-desi.zarr")
    summary = run_ingest([str(broken)], st, client=local, progress=False)
    assert summary.reasons == {"unreadable_file": 1}
    assert _groups(st) == {"desi": [str(broken)]}
    # beside SDSS files (the larger group) it still goes to desi
    st2 = str(tmp_path / "mixed.zarr")
    run_ingest([*map(str, sdss_files[:3]), str(broken)], st2, client=local, progress=False)
    assert _groups(st2)["desi"] == [str(broken)] and str(broken) not in _groups(st2)["sdss"]


# 4. a file repaired after a failed download

def test_a_repaired_file_is_never_counted_twice(desi_pair, sdss_files, tmp_path, local, caplog):
    d = tmp_path / "in"
    d.mkdir()
    coadd = d / COADD
    coadd.write_bytes(desi_pair[0].read_bytes()[:300_000])
    shutil.copy(desi_pair[1], d / REDROCK)
    spec = d / SPEC
    spec.write_bytes(next(p for p in sdss_files if p.name == SPEC).read_bytes()[:50_000])
    st = str(tmp_path / "r.zarr")
    # an older store: the broken coadd quarantined under sdss (as ingest did before files were filed by name)
    run_ingest([str(spec), str(coadd)], st, client=local, survey="sdss", progress=False)
    assert sorted(_groups(st)["sdss"]) == sorted([str(spec), str(coadd)])
    shutil.copy(desi_pair[0], coadd)  # repaired
    shutil.copy(next(p for p in sdss_files if p.name == SPEC), spec)
    with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline"):
        again = run_ingest([str(d)], st, client=local, progress=False)
    assert "2 input file(s) are in" in caplog.text and "only as unreadable_file rejects" in caplog.text
    assert "if repaired, ingest them into a new store" in caplog.text
    assert again.rows == 0 and again.skipped_files == 2 and again.quarantined_files == 2
    groups = _groups(st)
    assert sum(g.count(str(coadd)) for g in groups.values()) == 1  # never in two groups


# 5. the re-ingest warning compares with the store's history

def test_reingest_warning_compares_with_the_recorded_options(desi_pair, tmp_path, local, caplog):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(desi_pair[0], d / COADD)
    rr = str(desi_pair[1])
    st = str(tmp_path / "w.zarr")
    opts = ReadOptions(redshifts=rr)
    run_ingest([str(d / COADD)], st, client=local, progress=False, options=opts)

    def warned(options):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline"):
            s = run_ingest([str(d / COADD)], st, client=local, progress=False, options=options)
        assert s.skipped_files == 1
        return "were skipped" in caplog.text

    assert not warned(opts)  # the same --redshifts as the first run
    assert warned(ReadOptions())  # the first run used --redshifts, this one does not
    st2 = str(tmp_path / "w2.zarr")
    run_ingest([str(d / COADD)], st2, client=local, progress=False)
    st = st2
    assert not warned(ReadOptions()) and warned(opts)


# 6. --strict counts the store's rejects of skipped inputs

def test_rejects_of_skipped_inputs_still_count(desi_pair, tmp_path, local):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(desi_pair[0], d / COADD)
    shutil.copy(desi_pair[1], d / REDROCK)
    (d / "spec-0001-50000-0001.fits").write_bytes(b"not fits at all")
    st = str(tmp_path / "s.zarr")
    first = run_ingest([str(d)], st, client=local, progress=False)
    assert first.rejected > 0
    again = run_ingest([str(d)], st, client=local, progress=False)
    assert again.rows == 0 and again.rejected == first.rejected
    assert again.earlier_reasons == first.reasons
    assert "rejects of skipped inputs already in the store" in again.table()


# 7. an interrupted ingest's shards are reused

def test_shards_left_by_an_interrupted_ingest_are_filled(sdss_files, tmp_path, local):
    st = str(tmp_path / "i.zarr")
    run_ingest([str(p) for p in sdss_files[:4]], st, client=local, shard_rows=2, chunk_rows=2, progress=False)
    assert store.allocate_shards(st, "sdss", 3) == [2, 3, 4]  # what a run stopped before its tasks finished leaves
    info = store.format_store_info(store.store_info(st))
    assert "3 more left empty by an interrupted ingest" in info and "re-run ingest" not in info
    summary = run_ingest([str(p) for p in sdss_files], st, client=local, shard_rows=2, chunk_rows=2, progress=False)
    assert summary.rows == 10
    s = store.store_info(st)["surveys"]["sdss"]
    assert s["shards"] == s["shards_done"] == 7
    assert "left empty" not in store.format_store_info(store.store_info(st))
    paths = _groups(st)["sdss"]
    assert sorted(paths) == sorted(map(str, sdss_files))


# 8. --redshifts for SDSS spec files

def test_sdss_redshifts_table_is_applied_or_said_to_be_unused(sdss_files, desi_pair, tmp_path, local, caplog):
    spec = next(p for p in sdss_files if p.name == SPEC)
    table = tmp_path / "specobj.csv"
    table.write_text("plate,mjd,fiberid,z,z_err,zwarning,class\n266,51602,13,0.25,0.001,0,GALAXY\n")
    got = read_spectra(spec, options=ReadOptions(redshifts=str(table)))
    assert got.meta["z"][0] == 0.25 and got.meta["z_err"][0] == 0.001 and got.reject_reason[0] == ""
    other = next(p for p in sdss_files if p.name != SPEC)
    miss = read_spectra(other, options=ReadOptions(redshifts=str(table)))
    assert miss.reject_reason[0] == "no_redshift" and "not in specobj.csv" in miss.reject_detail[0]
    # a DESI-keyed table leaves SDSS spec files their own redshifts; ingest says so and does not record it
    own = read_spectra(spec)
    kept = read_spectra(spec, options=ReadOptions(redshifts=str(desi_pair[1])))
    assert kept.meta["z"][0] == own.meta["z"][0] and kept.reject_reason[0] == ""
    st = str(tmp_path / "z.zarr")
    with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline"):
        run_ingest([str(spec)], st, client=local, progress=False, options=ReadOptions(redshifts=str(desi_pair[1])))
    assert "which the sdss readers do not use" in caplog.text
    assert store.ingest_history(st, "sdss")[-1]["redshifts"] is None


# 9. DELTACHI2 from a --redshifts redrock table

def test_deltachi2_from_a_redshifts_table(desi_pair, tmp_path):
    d = tmp_path / "alone"
    d.mkdir()
    shutil.copy(desi_pair[0], d / COADD)  # no redrock beside it
    beside = read_spectra(desi_pair[0])
    given = read_spectra(d / COADD, options=ReadOptions(redshifts=str(desi_pair[1])))
    assert np.isfinite(beside.meta["deltachi2"]).any()
    assert np.array_equal(given.meta["deltachi2"], beside.meta["deltachi2"], equal_nan=True)


# 10. messages and @lists

def test_messages_and_file_lists(sdss_files, tmp_path, monkeypatch):
    from catalogpred.spectra import SDSS_GRID, check_spectra

    n = SDSS_GRID.n_pix
    flux = np.ones((1, n), np.float32)
    _, _, _, _, reasons, details = check_spectra(flux, flux, np.zeros((1, n), np.uint8), SDSS_GRID.wave,
                                                 np.array([-0.5]))
    assert reasons[0] is RejectReason.BAD_REDSHIFT and details[0] == "z = -0.5"
    import fitsio

    odd = tmp_path / "odd.fits"
    with fitsio.FITS(str(odd), "rw", clobber=True) as f:  # a whole FITS file that no reader claims
        f.write(np.zeros(3, np.float32))
    with pytest.raises(InputFileError, match="name the reader with --survey") as exc:
        identify_survey(odd)
    assert "survey=" not in str(exc.value)
    # @list: relative paths are relative to the list's directory; a missing one names the list
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(sdss_files[0], tmp_path / sdss_files[0].name)
    (lists / "files.txt").write_text(f"# one file\n../{sdss_files[0].name}\n")
    monkeypatch.chdir("/")  # not the list's directory
    assert expand_inputs([f"@{lists / 'files.txt'}"]) == [str(tmp_path / sdss_files[0].name)]
    (lists / "bad.txt").write_text("nope.fits\n")
    with pytest.raises(ConfigError, match=r"bad\.txt.*nope\.fits|nope\.fits.*bad\.txt"):
        expand_inputs([f"@{lists / 'bad.txt'}"])
