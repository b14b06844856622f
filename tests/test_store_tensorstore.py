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
