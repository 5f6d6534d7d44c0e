"""The Zarr store: shard-aligned writes, padding, metadata round trip, and ingest planning."""
import numpy as np
import pytest

from catalogpred import store
from catalogpred.errors import StoreError
from catalogpred.pipeline import plan_pieces
from catalogpred.spectra import SDSS_GRID
from catalogpred.surveys import get_reader


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
    store.write_shard(st, "sdss", 1, flux, flux, np.zeros(flux.shape, np.uint8), _meta(5))
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
