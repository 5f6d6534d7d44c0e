"""SDSS spPlate reader: identification, ids and redshifts from specObj, pixel placement, rejects,
agreement with spec-file ingests, mixed ingests into one store group, and resume with split plates."""
from __future__ import annotations

import shutil

import fitsio
import numpy as np
import pytest

from catalogpred import store
from catalogpred.errors import InputFileError, RejectReason
from catalogpred.mock import render_sdss_spec, write_sdss_spec
from catalogpred.mock_survey import SPECOBJ_FILENAME, write_spplate_survey
from catalogpred.pipeline import run_ingest
from catalogpred.spectra import SDSS_GRID, PixelMask, loglam_to_sdss_index
from catalogpred.surveys import ReadOptions, Selection, get_reader, identify_survey, read_spectra

FIBERS = 48  # 2 sky, 1 unplugged, 45 galaxies per plate


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    d = tmp_path_factory.mktemp("spplate")
    s = write_spplate_survey(d / "plates", n_plates=2, fibers_per_plate=FIBERS, seed=11)
    spec_dir = d / "spec"
    plate0 = s.plates[0]
    for o in plate0.targets:  # the spec files of plate 0's galaxies
        write_sdss_spec(o, spec_dir)
    return s, spec_dir


def test_identify_by_content(survey, tmp_path):
    s, spec_dir = survey
    plate = s.plate_paths[0]
    assert identify_survey(plate, with_count=True) == ("sdss-plate", FIBERS)
    assert identify_survey(s.specobj_path) == "aux:sdss-objects"
    assert identify_survey(next(spec_dir.glob("spec-*.fits"))) == "sdss"
    renamed = tmp_path / "whatever.fits"
    shutil.copy(plate, renamed)
    assert identify_survey(renamed) == "sdss-plate"
    assert get_reader("sdss-plate").group == "sdss"
    # PLUGMAP alone (as in spFrame/spCFrame files) is not an spPlate: the primary must carry the log-λ grid
    frame = tmp_path / "spCFrame-b1-00012345.fits"
    with fitsio.FITS(str(frame), "rw", clobber=True) as f:
        f.write(np.zeros((4, 10), np.float32))
        f.write(np.zeros(4, dtype=[("FIBERID", "i4"), ("OBJTYPE", "S8")]), extname="PLUGMAP")
    with pytest.raises(InputFileError) as err:
        identify_survey(frame)
    assert err.value.reason == RejectReason.UNKNOWN_FORMAT
    with pytest.raises(InputFileError, match="not a sdss-plate file"):
        read_spectra(frame, "sdss-plate")


def test_ids_positions_redshifts_from_specobj(survey):
    s, _ = survey
    plan = s.plates[0]
    b = read_spectra(s.plate_paths[0])
    assert b.survey == "sdss" and b.grid == SDSS_GRID and len(b) == FIBERS
    assert list(b.meta) == list(get_reader("sdss").meta_columns)
    assert b.meta["row_in_file"].tolist() == list(range(FIBERS))
    assert b.meta["fiberid"].tolist() == list(range(1, FIBERS + 1))
    assert set(b.meta["source_file"]) == {f"spPlate-{plan.plate:04d}-{plan.mjd:05d}.fits"}
    for o in plan.targets:
        i = o.fiberid - 1
        assert b.meta["source_id"][i] == f"sdss-{o.plate:04d}-{o.mjd:05d}-{o.fiberid:04d}"
        assert b.meta["ra"][i] == o.ra and b.meta["dec"][i] == o.dec  # PLUG_RA/PLUG_DEC of the table
        assert b.meta["z"][i] == np.float32(o.z)  # Z is float32 in specObj
        assert b.meta["specobjid"][i] == o.specobjid
        assert b.meta["spec_class"][i] == "GALAXY"
        assert b.meta["plate"][i] == o.plate and b.meta["mjd"][i] == o.mjd
        assert b.reject_reason[i] == ""
    assert np.isfinite(b.meta["z_err"][[o.fiberid - 1 for o in plan.targets]]).all()


def test_pixels_go_to_the_sdss_grid_by_index(survey):
    s, _ = survey
    plan = s.plates[0]
    b = read_spectra(s.plate_paths[0])
    k0 = fitsio.read_header(str(s.plate_paths[0]), 0)["COEFF0"]
    npix = fitsio.FITS(str(s.plate_paths[0]))[0].get_dims()[1]
    first = int(round(k0 * 1e4)) - 35780
    covered = np.zeros(SDSS_GRID.n_pix, bool)
    covered[max(first, 0):min(first + npix, SDSS_GRID.n_pix)] = True
    for o in plan.targets[:5]:
        c = render_sdss_spec(o)["coadd"]
        idx = loglam_to_sdss_index(c["loglam"])
        keep = (idx >= 0) & (idx < SDSS_GRID.n_pix)
        i = o.fiberid - 1
        np.testing.assert_array_equal(b.flux[i, idx[keep]], c["flux"][keep])
        np.testing.assert_array_equal(b.ivar[i, idx[keep]], c["ivar"][keep])
        assert ((b.mask[i, idx[keep]] & PixelMask.PIPELINE) != 0).tolist() == (c["and_mask"][keep] != 0).tolist()
        assert ((b.mask[i] & PixelMask.NO_COVERAGE) != 0).tolist() == (~covered).tolist()


def test_sky_and_missing_redshift_rejects(survey, tmp_path):
    s, _ = survey
    plan = s.plates[0]
    b = read_spectra(s.plate_paths[0])
    sky = [f - 1 for f in plan.sky_fibers]
    na = [f - 1 for f in plan.na_fibers]
    assert set(b.reject_reason[sky]) == {RejectReason.SKY_FIBRE.value}
    assert set(b.reject_reason[na]) == {RejectReason.NO_REDSHIFT.value}
    assert all(SPECOBJ_FILENAME in d for d in b.reject_detail[na])
    assert (b.meta["zwarning"] != 0).any()  # kept (flagged in the catalog), not rejected
    assert int((b.reject_reason != "").sum()) == len(sky) + len(na)
    # keep_sky: the sky fibres are no longer excluded, but they have no specObj row
    kept = read_spectra(s.plate_paths[0], options=ReadOptions(selection=Selection(keep_sky=True)))
    assert set(kept.reject_reason[sky]) == {RejectReason.NO_REDSHIFT.value}
    # without a table beside the plate: every fibre is a no_redshift reject, unless --redshifts names one
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(s.plate_paths[0], lone)
    alone = read_spectra(lone / s.plate_paths[0].name)
    not_sky = np.setdiff1d(np.arange(FIBERS), sky)
    assert set(alone.reject_reason[not_sky]) == {RejectReason.NO_REDSHIFT.value}
    assert "--redshifts" in alone.reject_detail[not_sky[0]]
    given = read_spectra(lone / s.plate_paths[0].name, options=ReadOptions(redshifts=str(s.specobj_path)))
    assert given.reject_reason.tolist() == b.reject_reason.tolist()
    np.testing.assert_array_equal(given.meta["z"], b.meta["z"])


def test_spec_and_spplate_ingest_to_identical_rows_in_one_group(survey, tmp_path, client):
    """spec-*.fits and the spPlate of the same plate, in one ingest: one 'sdss' group, equal normalised flux."""
    s, spec_dir = survey
    st = str(tmp_path / "store.zarr")
    summary = run_ingest([str(spec_dir), str(s.plate_paths[0]), str(s.specobj_path)], st, client=client,
                         survey="auto", shard_rows=64, chunk_rows=32, progress=False)
    n_spec = len(s.plates[0].targets)
    assert store.list_surveys(st) == ["sdss"]
    assert summary.files == n_spec + 1 and summary.auxiliary_files == 1
    assert summary.rows == n_spec + FIBERS
    assert summary.reasons[RejectReason.DUPLICATE_ID.value] == n_spec  # the same ids from both formats
    meta = store.read_meta(st, "sdss").to_pandas()
    g, _ = store.open_survey(st, "sdss")
    flux, mask = g["flux"][:], g["mask"][:]
    from_plate = meta[meta.source_file.str.startswith("spPlate")].set_index("source_id")
    from_spec = meta[meta.source_file.str.startswith("spec-")].set_index("source_id")
    assert len(from_spec) == n_spec and set(from_spec.index) <= set(from_plate.index)
    for sid, row in from_spec.iterrows():
        prow = from_plate.loc[sid]
        assert prow.norm == row.norm and prow.z == row.z and prow.specobjid == row.specobjid
        assert prow.ra == row.ra and prow.dec == row.dec
        both = (mask[row.row] & PixelMask.NO_COVERAGE) == 0
        assert both.sum() > 3000
        np.testing.assert_array_equal(flux[row.row][both], flux[prow.row][both])
    # rejects by reason, all accounted for
    plate_rej = from_plate[from_plate.reject_reason.isin(["sky_fibre", "no_redshift"])]
    assert len(plate_rej) == len(s.plates[0].sky_fibers) + len(s.plates[0].na_fibers)


def test_explicit_reader_name_writes_to_the_sdss_group(survey, tmp_path, client):
    s, _ = survey
    st = str(tmp_path / "store.zarr")
    summary = run_ingest([str(s.plate_paths[1])], st, client=client, survey="sdss-plate", shard_rows=64,
                         chunk_rows=32, progress=False, options=ReadOptions(redshifts=str(s.specobj_path)))
    assert store.list_surveys(st) == ["sdss"] and summary.rows == FIBERS
    assert summary.ok == FIBERS - len(s.plates[1].sky_fibers) - len(s.plates[1].na_fibers)


def test_resume_with_plates_split_across_shards(survey, tmp_path, client):
    """shard_rows < fibres per plate splits plates into pieces; partial and interrupted runs resume without duplicates."""
    s, _ = survey
    st = str(tmp_path / "store.zarr")
    plates = [str(p) for p in s.plate_paths]
    kw = dict(client=client, shard_rows=32, chunk_rows=16, progress=False)
    first = run_ingest([plates[0], str(s.specobj_path)], st, **kw)
    assert first.rows == FIBERS and first.shards == 2  # 48 fibres -> pieces 0..32, 32..48
    # simulate a crash after the first shard of the second run: run, then forget its last shard
    second = run_ingest(plates + [str(s.specobj_path)], st, **kw)
    assert second.rows == FIBERS and second.skipped_files == 1
    import zarr

    done = zarr.open_group(st, mode="r+")["sdss"]["shard_done"]
    flags = done[:]
    last = int(np.flatnonzero(flags)[-1])
    flags[last] = 0
    done[:] = flags
    lost = store.read_meta(st, "sdss").num_rows
    third = run_ingest(plates + [str(s.specobj_path)], st, **kw)
    assert third.rows == 2 * FIBERS - lost
    meta = store.read_meta(st, "sdss", columns=["source_id", "row_in_file", "source_file", "status"])
    ids = meta.column("source_id").to_pylist()
    assert len(ids) == 2 * FIBERS and len(set(ids)) == 2 * FIBERS
    keys = list(zip(meta.column("source_file").to_pylist(), meta.column("row_in_file").to_pylist()))
    assert len(set(keys)) == 2 * FIBERS
    assert set(meta.column("status").to_pylist()) <= {store.RowStatus.OK, store.RowStatus.REJECTED}


def test_corrupt_plates_are_rejected_with_reasons(survey, tmp_path):
    s, _ = survey
    src = s.plate_paths[0]
    truncated = tmp_path / "spPlate-9999-55555.fits"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(InputFileError) as err:
        identify_survey(truncated)
    assert err.value.reason == RejectReason.UNREADABLE_FILE
    # a PLUGMAP that does not match the images
    short = tmp_path / "spPlate-9998-55555.fits"
    with fitsio.FITS(str(src)) as f, fitsio.FITS(str(short), "rw", clobber=True) as out:
        out.write(f[0].read(), header=f[0].read_header())
        for name in ("IVAR", "ANDMASK", "ORMASK", "WAVEDISP"):
            out.write(f[name].read(), extname=name)
        out.write(f["PLUGMAP"].read()[:-1], extname="PLUGMAP")
    with pytest.raises(InputFileError) as err:
        read_spectra(short, options=ReadOptions(redshifts=str(s.specobj_path)))
    assert err.value.reason == RejectReason.INCONSISTENT_FILE and "PLUGMAP" in str(err.value)
