"""The Zarr store: shard-aligned writes, padding, metadata round trip, and ingest planning."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from catalogpred import store
from catalogpred.errors import StoreError
from catalogpred.pipeline import plan_pieces
from catalogpred.spectra import SDSS_GRID
from catalogpred.surveys import COMMON_META, column_docs, get_reader, readers


def _layout(**kw):
    r = get_reader("sdss")
    return store.SurveyLayout(survey="sdss", grid=SDSS_GRID, meta_columns=r.meta_columns, **kw)


def _meta(n, start=0):
    r = get_reader("sdss")
    out = {}
    for name, code in {**r.meta_columns, **store.STORE_META}.items():
        if code == "U":
            out[name] = np.array([f"{name}-{start + i}" for i in range(n)], dtype=object)
        else:
            out[name] = np.arange(start, start + n).astype(code)
    out["status"] = np.full(n, store.RowStatus.OK, np.uint8)
    return out


def test_write_read_shards(tmp_path):
    st = str(tmp_path / "s.zarr")
    store.create_survey(st, _layout(shard_rows=8, chunk_rows=4))
    assert store.allocate_shards(st, "sdss", 2) == [0, 1]
    rng = np.random.default_rng(0)
    flux = rng.normal(size=(5, SDSS_GRID.n_pix)).astype(np.float32)
    assert not store.shard_written(st, "sdss", 1)
    store.write_shard(st, "sdss", 1, flux, flux, np.zeros(flux.shape, np.uint8), _meta(5))
    # what ingest's client checks of a finished task: shard 1's data are on disk, shard 0's are not
    assert store.shard_written(st, "sdss", 1) and not store.shard_written(st, "sdss", 0)
    # a shard is invisible until marked done
    assert store.read_meta(st, "sdss").num_rows == 0
    store.mark_shards_done(st, "sdss", [1])
    meta = store.read_meta(st, "sdss")
    assert meta.num_rows == 5 and meta.column("row").to_pylist() == [8, 9, 10, 11, 12]
    assert meta.column("source_id").to_pylist()[2] == "source_id-2"
    np.testing.assert_array_equal(store.read_flux(st, "sdss", np.array([9, 11])), flux[[1, 3]])
    # padding rows are EMPTY and come back only on request
    assert store.read_meta(st, "sdss", include_empty=True).num_rows == 8
    with pytest.raises(StoreError, match="not allocated"):
        store.write_shard(st, "sdss", 5, flux, flux, np.zeros(flux.shape, np.uint8), _meta(5))
    with pytest.raises(StoreError, match="more than shard_rows"):
        store.write_shard(st, "sdss", 0, np.zeros((9, SDSS_GRID.n_pix), np.float32), np.zeros((9, SDSS_GRID.n_pix), np.float32),
                          np.zeros((9, SDSS_GRID.n_pix), np.uint8), _meta(9))


def test_store_is_sharded_and_compressed(tmp_path):
    import zarr

    st = str(tmp_path / "s.zarr")
    store.create_survey(st, _layout(shard_rows=8, chunk_rows=4))
    store.allocate_shards(st, "sdss", 1)
    a = zarr.open_array(st + "/sdss/flux")
    assert a.shards == (8, SDSS_GRID.n_pix) and a.chunks == (4, SDSS_GRID.n_pix)
    assert "blosc" in str(a.compressors).lower()


def test_missing_store_error(tmp_path):
    with pytest.raises(StoreError, match="catalogpred ingest"):
        store.list_surveys(tmp_path / "nope.zarr")


def test_plan_pieces_packs_and_splits():
    files = [("a", 1), ("b", 1), ("big", 7), ("c", 2)]
    shards = plan_pieces(files, 4)
    assert shards == [[("a", 0, 1), ("b", 0, 1), ("big", 0, 2)], [("big", 2, 6)], [("big", 6, 7), ("c", 0, 2)]]
    assert sum(hi - lo for s in shards for _, lo, hi in s) == 11
    assert all(sum(hi - lo for _, lo, hi in s) <= 4 for s in shards)


@pytest.mark.parametrize("engine", ["tensorstore", "zarr"])
def test_read_shard_follows_a_growing_and_a_recreated_store(tmp_path, engine):
    """read_shard keeps its arrays open per process: new shards, unfinished shards and a store recreated
    at the same path with another layout must still read right, with either read engine."""
    import functools
    import shutil

    if engine == "tensorstore":
        pytest.importorskip("tensorstore")
    read_shard = functools.partial(store.read_shard, engine=engine)

    st = str(tmp_path / "s.zarr")
    rng = np.random.default_rng(1)

    def put(shard, n, done=True):
        flux = rng.normal(size=(n, SDSS_GRID.n_pix)).astype(np.float32)
        store.write_shard(st, "sdss", shard, flux, flux, np.zeros(flux.shape, np.uint8), _meta(n, start=100 * shard))
        if done:
            store.mark_shards_done(st, "sdss", [shard])
        return flux

    store.create_survey(st, _layout(shard_rows=8, chunk_rows=4))
    store.allocate_shards(st, "sdss", 1)
    a = put(0, 5)
    meta, flux = read_shard(st, "sdss", 0)
    assert meta.num_rows == 5 and meta.column("source_id")[0].as_py() == "source_id-0"
    np.testing.assert_array_equal(flux, a)
    with pytest.raises(StoreError, match="no shard 1"):
        read_shard(st, "sdss", 1)
    store.allocate_shards(st, "sdss", 2)  # resizes every array
    b = put(1, 8)
    put(2, 3, done=False)
    meta, flux = read_shard(st, "sdss", 1)
    assert meta.column("row").to_pylist() == list(range(8, 16))
    assert meta.column("source_id")[0].as_py() == "source_id-100"
    np.testing.assert_array_equal(flux, b)
    with pytest.raises(StoreError, match="not finished"):
        read_shard(st, "sdss", 2)
    shutil.rmtree(st)  # the same path, another layout
    store.create_survey(st, _layout(shard_rows=4, chunk_rows=2))
    store.allocate_shards(st, "sdss", 1)
    c = put(0, 4)
    meta, flux = read_shard(st, "sdss", 0)
    assert meta.num_rows == 4 and meta.column("row").to_pylist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(flux, c)


def test_read_engines_return_the_same_shard(tmp_path):
    """TensorStore (numeric arrays) and zarr-python read a shard with REJECTED rows, EMPTY padding, NaN
    metadata and non-finite flux to the same Arrow table and the same flux array."""
    pytest.importorskip("tensorstore")
    st = str(tmp_path / "s.zarr")
    store.create_survey(st, _layout(shard_rows=16, chunk_rows=4))
    store.allocate_shards(st, "sdss", 2)
    rng = np.random.default_rng(3)
    flux = rng.normal(size=(11, SDSS_GRID.n_pix)).astype(np.float32)
    flux[2, :7] = np.nan
    flux[4] = np.inf
    meta = _meta(11, start=16)
    meta["status"][[1, 6]] = store.RowStatus.REJECTED
    meta["reject_reason"][[1, 6]] = "bad_redshift"
    meta["z"] = meta["z"].astype(float)
    meta["z"][3] = np.nan
    meta["source_id"][5] = "ünïcødé-∑"
    store.write_shard(st, "sdss", 1, flux, flux, np.zeros(flux.shape, np.uint8), meta)
    store.mark_shards_done(st, "sdss", [1])
    m_ts, f_ts = store.read_shard(st, "sdss", 1, engine="tensorstore")
    m_z, f_z = store.read_shard(st, "sdss", 1, engine="zarr")
    assert m_ts.schema == m_z.schema and m_ts.num_rows == 11  # padding rows dropped, rejected rows kept
    for name in m_ts.column_names:  # (Table.equals counts NaN as unequal)
        np.testing.assert_array_equal(m_ts[name].to_numpy(zero_copy_only=False), m_z[name].to_numpy(zero_copy_only=False))
    assert m_ts.column("source_id")[5].as_py() == "ünïcødé-∑"
    assert np.isnan(m_ts.column("z")[3].as_py())
    np.testing.assert_array_equal(f_ts, f_z)  # NaN and inf compare equal position by position
    np.testing.assert_array_equal(f_ts, flux[np.flatnonzero(meta["status"] == store.RowStatus.OK)])
    assert f_ts.dtype == np.float32 and f_ts.flags.writeable
    assert store.resolve_read_engine("auto", st) == "tensorstore"
    assert store.resolve_read_engine("auto", "s3://bucket/s.zarr") == "zarr"  # not a local directory
    with pytest.raises(ValueError, match="read engine"):
        store.read_shard(st, "sdss", 1, engine="h5py")


def test_string_columns_read_from_their_chunk_files_as_zarr_reads_them(tmp_path):
    """With the tensorstore engine the string columns are read from their chunk files with zarr-python's own
    codecs (_StringChunks), not through its event loop: the same values as zarr-python for zarr's default
    codecs (vlen-utf8 + zstd), for vlen-utf8 alone, and for a missing chunk (zarr reads its fill value); a
    string array with other codecs (gzip) is
    left to zarr-python."""
    pytest.importorskip("tensorstore")
    import zarr
    from zarr.codecs import GzipCodec

    st = str(tmp_path / "s.zarr")
    store.create_survey(st, _layout(shard_rows=8, chunk_rows=4))
    store.allocate_shards(st, "sdss", 2)
    flux = np.ones((6, SDSS_GRID.n_pix), np.float32)
    for shard in (0, 1):
        meta = _meta(6, start=8 * shard)
        meta["reject_reason"][:] = ""
        meta["source_file"][2] = "spec-0266-51602-0003.fits ✓"
        store.write_shard(st, "sdss", shard, flux, flux, np.zeros(flux.shape, np.uint8), meta)
    store.mark_shards_done(st, "sdss", [0, 1])
    base = f"{st}/sdss/meta"
    Path(base, "reject_reason", "c", "0").unlink()  # as if never written: zarr reads the fill value
    for name, compressors in (("subclass", None), ("run2d", [GzipCodec(level=1)])):
        old = zarr.open_array(f"{base}/{name}")[:]
        z = zarr.create_array(f"{base}/{name}", shape=old.shape, dtype=str, chunks=(8,), compressors=compressors,
                              fill_value="", overwrite=True)
        z[:] = old
    _, _, arrays = store._shard_arrays(st, "sdss", "tensorstore")
    fast = {p for p, a in arrays.items() if isinstance(a, store._StringChunks)}
    assert {"meta/source_id", "meta/source_file", "meta/reject_reason", "meta/subclass"} <= fast
    assert "meta/run2d" not in fast and "meta/ra" not in fast
    for shard in (0, 1):
        m_ts, _ = store.read_shard(st, "sdss", shard, engine="tensorstore")
        m_z, _ = store.read_shard(st, "sdss", shard, engine="zarr")
        assert m_ts.equals(m_z) and m_ts.num_rows == 6
        assert m_ts.column("reject_reason").to_pylist() == [""] * 6
        assert m_ts.column("source_file")[2].as_py() == "spec-0266-51602-0003.fits ✓"
        assert m_ts.column("subclass").to_pylist() == [f"subclass-{8 * shard + i}" for i in range(6)]
        assert m_ts.schema.field("run2d").type == pa.string() == m_ts.schema.field("subclass").type


def test_tensorstore_failure_says_to_use_zarr(tmp_path):
    """A store array that zarr-python reads but TensorStore cannot (here a numcodecs zlib codec): the
    tensorstore engine fails with a StoreError that names the way out, and the zarr engine reads it."""
    pytest.importorskip("tensorstore")
    import zarr
    from zarr.codecs.numcodecs import Zlib

    st = str(tmp_path / "s.zarr")
    store.create_survey(st, _layout(shard_rows=8, chunk_rows=4))
    store.allocate_shards(st, "sdss", 1)
    flux = np.ones((5, SDSS_GRID.n_pix), np.float32)
    store.write_shard(st, "sdss", 0, flux, flux, np.zeros(flux.shape, np.uint8), _meta(5))
    store.mark_shards_done(st, "sdss", [0])
    ra = zarr.open_array(f"{st}/sdss/meta/ra")[:]
    with pytest.warns(UserWarning, match="not in the Zarr version 3 specification"):
        z = zarr.create_array(f"{st}/sdss/meta/ra", shape=ra.shape, dtype=ra.dtype, chunks=(8,),
                              compressors=[Zlib(level=1)], overwrite=True)
    z[:] = ra
    with pytest.raises(StoreError, match="--read-engine zarr"):
        store.read_shard(st, "sdss", 0, engine="tensorstore")
    meta, got = store.read_shard(st, "sdss", 0, engine="zarr")
    np.testing.assert_array_equal(meta.column("ra").to_numpy(), ra[:5])
    np.testing.assert_array_equal(got, flux)


def test_every_reader_documents_its_native_columns():
    """Each survey-native column reaches the catalog with a description (and its unit where it has one)."""
    for r in readers():
        native = set(r.meta_columns) - set(COMMON_META)
        assert native and native <= set(r.column_docs), (r.name, native - set(r.column_docs))
        assert all(doc.description and not doc.description.startswith("Survey column") for doc in r.column_docs.values())
    docs = column_docs(["desi"])
    assert docs["flux_w1"].unit == "nanomaggy" and "AB" in docs["flux_w1"].description
    assert "plate" not in docs and column_docs(["sdss"])["specobjid"].ucd == "meta.id"
