"""DESI reader on the 7 real files: arm merge against an independent computation, selection, redshifts, end to end."""
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from catalogpred.errors import InputFileError, RejectReason
from catalogpred.pipeline import run_ingest, run_predict
from catalogpred.spectra import DESI_GRID, PixelMask
from catalogpred.surveys import ReadOptions, Selection, identify_survey, read_spectra

pytestmark = pytest.mark.realdata


def _independent_merge(path, row):
    """Per-pixel reference: dict keyed by rounded wavelength, astropy I/O, plain Python sums."""
    acc = {}
    with fits.open(path) as h:
        for arm in "BRZ":
            wave = h[f"{arm}_WAVELENGTH"].data
            flux, ivar, mask = h[f"{arm}_FLUX"].data[row], h[f"{arm}_IVAR"].data[row], h[f"{arm}_MASK"].data[row]
            for w, f, iv, m in zip(wave, flux, ivar, mask):
                key = round(float(w), 3)
                a = acc.setdefault(key, [0.0, 0.0, 0.0, 0.0, 0])
                good = float(iv) if m == 0 else 0.0
                a[0] += good
                a[1] += good * float(f)
                a[2] += float(iv)
                a[3] += float(iv) * float(f)
                a[4] |= int(m)
    out = {}
    for key, (sw, swf, sa, saf, m) in acc.items():
        flux = swf / sw if sw > 0 else (saf / sa if sa > 0 else 0.0)
        out[key] = (flux, sw, 0 if sw > 0 else m)
    return out


@pytest.mark.parametrize("name", ["coadd-4-80613-thru20210324.fits", "coadd-sv3-dark-26065.fits",
                                  "coadd-5-169-thru20210419.fits", "spectra-sv3-dark-26065.fits"])
def test_arm_merge_matches_independent_computation(desi_files, name):
    path = next(p for p in desi_files if p.name == name)
    block = read_spectra(path)
    assert block.survey == "desi" and block.grid is DESI_GRID
    n = len(block)
    for row in range(n):
        ref = _independent_merge(path, row)
        # overlap pixels (B/R 5760-5800 Å, R/Z 7520-7620 Å) and plain ones
        for lam in (3700.0, 5760.8, 5780.0, 5800.0, 6500.0, 7520.0, 7560.0, 7620.0, 9000.0):
            i = int(round((lam - 3600) / 0.8))
            f, iv, m = ref[round(DESI_GRID.wave[i], 3)]
            assert block.flux[row, i] == pytest.approx(f, rel=1e-5, abs=1e-6)
            assert block.ivar[row, i] == pytest.approx(iv, rel=1e-5, abs=1e-9)
            assert bool(block.mask[row, i] & PixelMask.PIPELINE) == (m != 0)
    assert not (block.mask & PixelMask.NO_COVERAGE).any()  # B+R+Z cover the whole DESI grid


def test_identify_counts_and_auxiliary(desi_files):
    got = {p.name: identify_survey(p, with_count=True) for p in desi_files}
    assert got["coadd-5-169-thru20210419.fits"] == ("desi", 5)
    assert got["redrock-4-80613-thru20210324.fits"] == ("aux:desi-redshifts", 0)


def test_ids_redshifts_and_selection(desi_files):
    coadd = next(p for p in desi_files if p.name == "coadd-4-80613-thru20210324.fits")
    b = read_spectra(coadd)
    rr = Table.read(coadd.with_name("redrock-4-80613-thru20210324.fits"), hdu="REDSHIFTS")
    assert b.meta["targetid"][0] == rr["TARGETID"][0] and b.meta["z"][0] == pytest.approx(rr["Z"][0])
    assert b.meta["source_id"][0] == "desi-cumulative-80613-20210324-39633345008634465"
    fm = Table.read(coadd, hdu="FIBERMAP")
    assert b.meta["ra"][0] == fm["TARGET_RA"][0] and b.meta["flux_w1"][0] == pytest.approx(fm["FLUX_W1"][0])
    assert b.reject_reason[0] == ""
    sv3 = read_spectra(next(p for p in desi_files if p.name == "coadd-sv3-dark-26065.fits"))
    assert list(sv3.reject_reason) == ["unassigned_fibre", "unassigned_fibre", "no_redshift", "sky_fibre", "no_redshift"]
    assert sv3.meta["desi_survey"][0] == "sv3" and sv3.meta["healpix"][0] == 26065
    kept = read_spectra(next(p for p in desi_files if p.name == "coadd-sv3-dark-26065.fits"),
                        options=ReadOptions(selection=Selection(keep_sky=True, keep_unassigned=True,
                                                                     keep_bad_fiberstatus=True)))
    assert list(kept.reject_reason) == ["no_redshift"] * 5
    # per-exposure spectra files name the column FIBERSTATUS, and the reject detail says so
    spectra = read_spectra(next(p for p in desi_files if p.name == "spectra-sv3-dark-26065.fits"))
    assert [d for r, d in zip(spectra.reject_reason, spectra.reject_detail) if r == "bad_fiberstatus"] == ["FIBERSTATUS = 512"]


def test_user_redshift_table(desi_files, tmp_path):
    tbl = Table({"TARGETID": [39627866878511337, 39627866878514741], "Z": [0.1, 0.2], "ZERR": [1e-4, 1e-4],
                 "ZWARN": [0, 4], "SPECTYPE": ["GALAXY", "GALAXY"]})
    tbl.write(tmp_path / "zpix.fits")
    b = read_spectra(next(p for p in desi_files if p.name == "coadd-sv3-dark-26065.fits"),
                     options=ReadOptions(redshifts=str(tmp_path / "zpix.fits")))
    assert b.meta["z"][2] == pytest.approx(0.1) and b.reject_reason[2] == ""
    assert b.reject_reason[4] == "zwarn"
    tbl.write(tmp_path / "z.csv", format="ascii.csv")
    b2 = read_spectra(next(p for p in desi_files if p.name == "coadd-sv3-dark-26065.fits"),
                      options=ReadOptions(redshifts=str(tmp_path / "z.csv")))
    assert b2.meta["z"][2] == pytest.approx(0.1)


def test_corrupt_desi_files(desi_files, tmp_path):
    src = next(p for p in desi_files if p.name == "coadd-5-169-thru20210419.fits")
    with fits.open(src) as h:
        fits.HDUList([x for x in h if x.name != "R_FLUX"]).writeto(tmp_path / "coadd-noarm.fits")
        hh = fits.HDUList([x.copy() for x in h])
        hh["FIBERMAP"] = fits.BinTableHDU(Table.read(src, hdu="FIBERMAP")[:3], name="FIBERMAP")
        hh.writeto(tmp_path / "coadd-short.fits")
    (tmp_path / "coadd-trunc.fits").write_bytes(src.read_bytes()[:300_000])
    cases = {"coadd-noarm.fits": RejectReason.MISSING_HDU, "coadd-short.fits": RejectReason.INCONSISTENT_FILE,
             "coadd-trunc.fits": RejectReason.UNREADABLE_FILE}
    for name, reason in cases.items():
        with pytest.raises(InputFileError) as err:
            read_spectra(tmp_path / name)
        assert err.value.reason is reason, (name, err.value)


def test_unreadable_file_split_across_shards_is_one_reject(desi_files, tmp_path):
    """A multi-object file split across shards (ingest reads it in pieces) that cannot be read: the piece that
    starts at spectrum 0 holds the file's one reject row, the other pieces add none."""
    from catalogpred import store
    from catalogpred.surveys import get_reader
    from catalogpred.tasks import ingest_shard

    src = next(p for p in desi_files if p.name == "coadd-5-169-thru20210419.fits")
    bad = tmp_path / "coadd-missing-arm.fits"
    with fits.open(src) as h:  # found and counted as DESI, but no R_FLUX to read
        fits.HDUList([x for x in h if x.name != "R_FLUX"]).writeto(bad)
    st = str(tmp_path / "s.zarr")
    store.create_survey(st, store.SurveyLayout(survey="desi", grid=DESI_GRID, meta_columns=get_reader("desi").meta_columns,
                                               shard_rows=4, chunk_rows=4))
    shards = store.allocate_shards(st, "desi", 3)
    done = [ingest_shard(st, "desi", s, [(str(bad), 4 * k, 4 * k + 4)]) for k, s in enumerate(shards)]
    assert [d["n_rows"] for d in done] == [1, 0, 0]
    store.mark_shards_done(st, "desi", shards)
    meta = store.read_meta(st, "desi").to_pandas()
    assert len(meta) == 1 and meta.reject_reason.tolist() == ["missing_hdu"] and meta.row_in_file.tolist() == [0]


def test_reingest_skips_unreadable_split_file_and_warns_about_new_options(desi_files, tmp_path, client, caplog):
    """Resume: an unreadable file read in pieces is done once its one reject row is in; a second ingest with
    --redshifts skips files already in the store, and says that their rows keep the first ingest's redshifts."""
    import logging

    src = next(p for p in desi_files if p.name == "coadd-5-169-thru20210419.fits")
    bad = tmp_path / "coadd-missing-arm.fits"
    with fits.open(src) as h:
        fits.HDUList([x for x in h if x.name != "R_FLUX"]).writeto(bad)
    st = str(tmp_path / "s.zarr")
    first = run_ingest([str(bad)], st, client=client, shard_rows=4, chunk_rows=4, progress=False)
    assert first.rows == 1 and first.reasons == {"missing_hdu": 1}
    zt = tmp_path / "z.csv"
    zt.write_text("TARGETID,Z\n1,0.1\n")
    with caplog.at_level(logging.WARNING, logger="catalogpred.pipeline"):
        again = run_ingest([str(bad)], st, client=client, shard_rows=4, chunk_rows=4, progress=False,
                           options=ReadOptions(redshifts=str(zt)))
    assert again.rows == 0 and again.skipped_files == 1 and again.shards == 0
    assert "keep the redshifts and selection of their first ingest" in caplog.text


def test_redrock_given_among_the_inputs_is_used(desi_files, tmp_path, client):
    """A redrock file named among the ingest inputs gives its coadd's redshifts by file name, wherever it lies;
    without it the spectra are no_redshift rejects."""
    from catalogpred import store

    name = "coadd-4-80613-thru20210324.fits"
    (tmp_path / "spectra").mkdir()
    (tmp_path / "z").mkdir()
    shutil.copy(next(p for p in desi_files if p.name == name), tmp_path / "spectra" / name)
    rr = next(p for p in desi_files if p.name == name.replace("coadd-", "redrock-"))
    shutil.copy(rr, tmp_path / "z" / rr.name)
    alone = run_ingest([str(tmp_path / "spectra")], str(tmp_path / "a.zarr"), client=client, progress=False)
    given = run_ingest([str(tmp_path / "spectra"), str(tmp_path / "z" / rr.name)], str(tmp_path / "b.zarr"),
                       client=client, progress=False)
    assert alone.reasons == {"no_redshift": alone.rows} and given.auxiliary_files == 1
    assert given.ok == 1 and not given.reasons
    z = store.read_meta(str(tmp_path / "b.zarr"), "desi", ["z"]).column("z").to_pylist()
    assert z == pytest.approx(Table.read(rr, hdu="REDSHIFTS")["Z"][:1].tolist())


def test_all_desi_files_end_to_end(desi_files, tmp_path, client, desi_bundle, sdss_files, random_bundle):
    """All 7 files (+ the SDSS ones in the same store): rows + rejects = input spectra for each survey."""
    inp = tmp_path / "in"
    inp.mkdir()
    for p in desi_files + sdss_files:
        shutil.copy(p, inp / p.name)
    st = str(tmp_path / "s.zarr")
    ing = run_ingest([str(inp)], st, client=client, shard_rows=8, chunk_rows=4, progress=False)
    assert ing.auxiliary_files == 2 and ing.files == 5 + 14
    assert ing.by_survey["desi"]["rows"] == 1 + 5 + 1 + 5 + 5 and ing.by_survey["sdss"]["rows"] == 14
    pred = run_predict(st, [str(random_bundle), str(desi_bundle)], str(tmp_path / "cat"), client=client, progress=False)
    import pandas as pd

    # nullable ints: SDSS rows have no targetid, and float64 would round 17-digit TARGETIDs
    t = pq.ParquetDataset(tmp_path / "cat" / "dataset").read().to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    rej = pq.read_table(tmp_path / "cat" / "rejects.parquet").to_pandas()
    for survey, n_in in (("desi", 17), ("sdss", 14)):
        assert (t.survey == survey).sum() + (rej.survey == survey).sum() == n_in
    desi = t[t.survey == "desi"].set_index("targetid")
    assert set(desi.index) == {39633345008634465, 39089837499744649}
    assert desi.loc[39089837499744649, "desi_survey"] == "special"
    assert set(t.model_id[t.survey == "desi"]) == {"test-desi-0+" + t.model_id[t.survey == "desi"].iloc[0].split("+")[1]}
    assert set(rej.reason[rej.survey == "desi"]) == {"unassigned_fibre", "sky_fibre", "no_redshift", "bad_fiberstatus"}
    assert pred.rows == len(t) and t.source_id.is_unique
    # both surveys' native columns carry their own descriptions and units into the catalog schema
    schema = pq.read_schema(tmp_path / "cat" / "dataset" / "_common_metadata")
    meta = {f.name: f.metadata for f in schema}
    assert meta["flux_w1"][b"unit"] == b"nanomaggy" and b"unWISE" in meta["flux_w1"][b"description"]
    assert meta["specobjid"][b"description"].startswith(b"SDSS SPECOBJID")
