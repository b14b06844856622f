"""The store is readable by tensorstore, with none of engram's code in the read path.

tensorstore is an independent Zarr v3 implementation (C++): every row and hit count
it reads must equal what zarr-python reads, for each dtype and compressor.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from oracles import STORE_SMALL as SMALL, STORE_VOCAB as VOCAB, count_windows, make_docs, small_plan

from engram_cli.ngrams import write_stats_from_arrays

from engram_cli.store import create_store

ts = pytest.importorskip("tensorstore")  # in the test extras: runs in CI


def ts_read(path):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, read=True).result().read().result()


@pytest.mark.parametrize("dtype, compressor", [("float32", "lz4"), ("float16", "zstd"), ("bfloat16", "none")])
def test_tensorstore_reads_what_zarr_reads(tmp_path, dtype, compressor):
    plan = small_plan(dtype)
    out = tmp_path / "t.zarr"
    create_store(out, plan, VOCAB, stats_root=write_stats_from_arrays(tmp_path / "stats", count_windows(make_docs(), 3)).root, compressor=compressor, **SMALL)
    group = zarr.open_group(str(out), mode="r")
    for layer in plan.layer_ids:
        for name in ("table", "hits"):
            ours = group[f"layer_{layer}/{name}"][:]
            theirs = ts_read(out / f"layer_{layer}" / name)
            assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
            np.testing.assert_array_equal(theirs, ours)
        assert ts_read(out / f"layer_{layer}" / "table").any()  # real rows, not fill values
    np.testing.assert_array_equal(ts_read(out / "vocab" / "lookup"), VOCAB.lookup)


@pytest.mark.parametrize("dtype, compressor", [("float32", "zstd"), ("bfloat16", "lz4"), ("float8_e4m3", "lz4"), ("float16", "none")])
def test_rows_rewritten_in_place_read_the_same_in_tensorstore(tmp_path, dtype, compressor):
    """write_rows / write_row_block rewrite shards with engram's own writer: zarr-python,
    tensorstore and TableStore must all read the new values."""
    from test_store_rw import GEOMETRY, plan32, random_storage

    from engram_cli.store import TableStore

    out = tmp_path / "t.zarr"
    create_store(out, plan32(dtype), VOCAB, compressor=compressor, **GEOMETRY)
    store = TableStore.open(out, mode="r+")
    rng = np.random.default_rng(7)
    n = store.plan.layer_rows(2)
    ids = rng.choice(n, 50, replace=False)
    values = random_storage(rng, dtype, 50)
    store.write_rows(2, ids, values, by="trained")
    block = random_storage(rng, dtype, 300)
    store.write_row_block(2, store.shard_rows - 100, block)
    ours = zarr.open_array(str(out / "layer_2" / "table"), mode="r")[:]
    expect_ids = ids[(ids < store.shard_rows - 100) | (ids >= store.shard_rows + 200)]
    np.testing.assert_array_equal(ours[store.shard_rows - 100 : store.shard_rows + 200], block)
    assert np.isin(expect_ids, ids).all() and expect_ids.size
    lookup = dict(zip(ids.tolist(), values))
    np.testing.assert_array_equal(ours[expect_ids], np.stack([lookup[i] for i in expect_ids.tolist()]))
    theirs = ts_read(out / "layer_2" / "table")
    assert theirs.dtype == ours.dtype and theirs.shape == ours.shape
    np.testing.assert_array_equal(theirs, ours)
    np.testing.assert_array_equal(TableStore.open(out).load_layer(2), ours)
