"""TableStore bulk reads (load_layer, iter_row_blocks), in-place writes (write_rows,
write_row_block), their crash safety, float8_e4m3 tables, and the build's public steps.

Independent routes: every read is compared with zarr-python's own read of the same
array; expected contents after a write are computed here by plain numpy assignment
(last write wins, in a Python loop); the fp8 initialization against the documented
recipe written out with numpy and quantized by engram_cli.fp8.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zarr
from test_store import PAD, VOCAB, C, count_windows, make_docs, recipe, torch_bf16_words

from engram_cli.errors import PlanError, StoreError
from engram_cli.fp8 import dequantize_fp8_rows, quantize_fp8_rows
from engram_cli.ngrams import NgramStats, write_stats_from_arrays
from engram_cli.plan import make_plan
from engram_cli.store import (
    TableStore,
    check_hit_totals,
    count_hits_range,
    create_layout,
    create_store,
    finalize,
    hit_passes,
    mark_complete,
    prepare_partial,
    run_shard_task,
    shard_tasks,
    write_tables,
)
from engram_cli.store import writer as writer_module
from engram_cli.store.writer import _resolve_workers

DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3"]
CHUNK_BYTES = 8 * 1024
SHARD_BYTES = 3 * CHUNK_BYTES  # 3 chunks per shard: writes cross shard and chunk borders
GEOMETRY = dict(chunk_bytes=CHUNK_BYTES, shard_bytes=SHARD_BYTES)
WIDTH = {"float32": 32, "float16": 32, "bfloat16": 32, "float8_e4m3": 33}
STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float8_e4m3": np.uint8}


def plan32(dtype: str, layer_ids=(2,)):
    """head_dim 32 (fp8 needs a multiple of 32), ~2,000 rows per layer."""
    return make_plan(
        compressed_vocab_size=C, compressed_pad_id=PAD, rows_per_head=250, heads=4, dim=128, layer_ids=layer_ids,
        dtype=dtype, tokenizer_sha256=VOCAB.tokenizer_sha256, vocab_fingerprint=VOCAB.fingerprint,
    )


def zarr_read(store: TableStore, layer_id: int) -> np.ndarray:
    return zarr.open_array(str(store.path / f"layer_{layer_id}" / "table"), mode="r")[:]


def random_storage(rng, dtype: str, n: int) -> np.ndarray:
    """n rows of random values in the storage representation (fp8 by quantizing float32)."""
    x = (rng.standard_normal((n, 32)) * 0.5).astype(np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        return torch_bf16_words(x)
    return quantize_fp8_rows(x)


def table_files(path, layer_id):
    root = path / f"layer_{layer_id}" / "table"
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=DTYPES)
def built(request, tmp_path_factory):
    dtype = request.param
    out = tmp_path_factory.mktemp(f"rw-{dtype}") / "t.zarr"
    create_store(out, plan32(dtype, layer_ids=(2, 5)), VOCAB, workers=1, **GEOMETRY)
    return dtype, out


# -- reads -------------------------------------------------------------------------------
def test_load_layer_equals_zarr_read(built):
    dtype, out = built
    store = TableStore.open(out)
    assert store.storage_dtype == np.dtype(STORED[dtype]) and store.row_width(2) == WIDTH[dtype] == store.stored_row_width
    assert store.shard_rows < store.plan.layer_rows(2) // 2  # several shards
    for layer_id in store.layer_ids:
        expect = zarr_read(store, layer_id)
        got = store.load_layer(layer_id)
        assert got.dtype == expect.dtype and got.shape == expect.shape == (store.plan.layer_rows(layer_id), WIDTH[dtype])
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, expect)
        assert got.any()
        n, sr = expect.shape[0], store.shard_rows
        for a, b in [(0, 0), (0, 1), (sr - 1, sr + 1), (5, 2 * sr + 7), (n - 3, n), (0, n)]:
            np.testing.assert_array_equal(store.load_layer(layer_id, rows=(a, b)), expect[a:b])
        # out=: a caller's buffer (here a torch tensor's numpy view) is filled and returned
        buf = torch.empty((sr + 2 - 3, WIDTH[dtype]), dtype=torch.from_numpy(expect[:1]).dtype)
        ret = store.load_layer(layer_id, rows=(3, sr + 2), out=buf.numpy())
        assert np.shares_memory(ret, buf.numpy())
        np.testing.assert_array_equal(buf.numpy(), expect[3 : sr + 2])
        blocks = list(store.iter_row_blocks(layer_id, 333))
        assert [s for s, _ in blocks] == list(range(0, n, 333)) and all(b.shape[0] <= 333 for _, b in blocks)
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), expect)


def test_load_layer_rejects_bad_arguments(built):
    dtype, out = built
    store = TableStore.open(out)
    n = store.plan.layer_rows(2)
    for rows in [(5, 3), (-1, 2), (0, n + 1), "abc"]:
        with pytest.raises(StoreError, match="rows"):
            store.load_layer(2, rows=rows)
    for bad in [np.empty((n, WIDTH[dtype]), np.float64), np.empty((n - 1, WIDTH[dtype]), STORED[dtype]), np.empty((WIDTH[dtype], n), STORED[dtype]).T]:
        with pytest.raises(StoreError, match="out="):
            store.load_layer(2, out=bad)
    with pytest.raises(StoreError, match="block_rows"):
        next(store.iter_row_blocks(2, 0))


def test_fp8_init_is_the_quantized_float32_recipe(tmp_path):
    plan = plan32("float8_e4m3")
    store = create_store(tmp_path / "t.zarr", plan, VOCAB, **GEOMETRY)
    stored = zarr_read(store, 2)
    cr = store.chunk_rows
    assert store.attrs["row_width"] == 33 and store.attrs["storage_dtype"] == "uint8"
    for c in range(-(-stored.shape[0] // cr)):
        rows = stored[c * cr : (c + 1) * cr]
        x = recipe(plan.seed, 2, c, rows.shape[0], 32)
        np.testing.assert_array_equal(rows, quantize_fp8_rows(x))
        # and the dequantized rows are the recipe within e4m3's precision (3 mantissa bits)
        back = dequantize_fp8_rows(rows, 32)
        amax = np.abs(x).max(axis=1, keepdims=True)
        assert np.all(np.abs(back - x) <= np.maximum(np.abs(x) / 16, amax / 448 / 2**6))
    np.testing.assert_array_equal(store.read_rows(2, [0, 7]), dequantize_fp8_rows(stored[[0, 7]], 32))


def test_fp8_needs_a_head_width_multiple_of_32(tmp_path):
    with pytest.raises(PlanError, match="multiple of 32"):
        make_plan(compressed_vocab_size=C, compressed_pad_id=PAD, rows_per_head=250, heads=4, dim=64, layer_ids=(2,), dtype="float8_e4m3")
    # a plan made elsewhere (e.g. restored from a dict) is checked again before anything is written
    plan = plan32("float16")
    object.__setattr__(plan, "dtype", "float8_e4m3")  # bypass make_plan's own check
    object.__setattr__(plan, "dim", 64)
    partial = prepare_partial(tmp_path / "t.zarr", False)
    with pytest.raises(PlanError, match="multiple of 32"):
        create_layout(partial, plan, VOCAB, stats=None, **GEOMETRY)
    assert not (partial / "zarr.json").exists()


# -- writes ------------------------------------------------------------------------------
def fresh_copy(out, tmp_path):
    import shutil

    dst = tmp_path / "copy.zarr"
    shutil.copytree(out, dst)
    return dst


def test_write_rows_round_trip(built, tmp_path):
    dtype, out = built
    path = fresh_copy(out, tmp_path)
    store = TableStore.open(path, mode="r+")
    before = zarr_read(store, 2)
    other = zarr_read(store, 5)
    rng = np.random.default_rng(1)
    n, sr = before.shape[0], store.shard_rows
    assert n > 2 * sr
    ids = np.concatenate([rng.integers(0, sr, 40), [sr - 1, n - 1, 3, 3, 3], rng.integers(n - 20, n, 25)])
    middle = {k: v for k, v in table_files(path, 2).items() if k.parts[:2] == ("c", "1")}  # shard 1: no row written
    values = random_storage(rng, dtype, ids.size)
    store.write_rows(2, ids, values, by="trained")
    expect = before.copy()
    for i, row in zip(ids.tolist(), values):  # last write wins
        expect[i] = row
    for reader in (TableStore.open(path), store):
        np.testing.assert_array_equal(reader.load_layer(2), expect)
    np.testing.assert_array_equal(zarr_read(store, 2), expect)
    np.testing.assert_array_equal(zarr_read(store, 5), other)  # the other layer untouched
    assert middle and all(table_files(path, 2)[k] == v for k, v in middle.items())  # untouched shards keep their bytes
    rec = TableStore.open(path).modified
    assert rec[-1]["by"] == "trained" and rec[-1]["layers"] == [2] and rec[-1]["complete"] is True and rec[-1]["rows"] == len(set(ids.tolist()))
    assert not list(path.rglob("*.tmp"))


def test_write_rows_accepts_float32_and_converts(built, tmp_path):
    dtype, out = built
    store = TableStore.open(fresh_copy(out, tmp_path), mode="r+")
    x = (np.random.default_rng(2).standard_normal((3, 32)) * 3).astype(np.float32)
    store.write_rows(5, [10, 11, 700], x)
    got = store.load_layer(5)[[10, 11, 700]]
    independent = {"float32": lambda: x, "float16": lambda: x.astype(np.float16), "bfloat16": lambda: torch_bf16_words(x), "float8_e4m3": lambda: quantize_fp8_rows(x)}[dtype]()
    np.testing.assert_array_equal(got, independent)
    with pytest.raises(StoreError, match="values must be"):
        store.write_rows(5, [1, 2], x)  # 3 rows for 2 ids
    with pytest.raises(StoreError, match="out of range"):
        store.write_rows(5, [store.plan.layer_rows(5)], x[:1])


def test_write_row_block_round_trip(built, tmp_path):
    dtype, out = built
    path = fresh_copy(out, tmp_path)
    store = TableStore.open(path, mode="r+")
    before = zarr_read(store, 2)
    sr, cr = store.shard_rows, store.chunk_rows
    rng = np.random.default_rng(3)
    expect = before.copy()
    for start, m in [(cr - 5, 2 * sr + 3), (0, cr), (before.shape[0] - 9, 9)]:  # partial chunks, whole chunks, the end
        values = random_storage(rng, dtype, m)
        store.write_row_block(2, start, values)
        expect[start : start + m] = values
    np.testing.assert_array_equal(TableStore.open(path).load_layer(2), expect)
    np.testing.assert_array_equal(zarr_read(store, 2), expect)
    assert [r["by"] for r in store.modified] == ["write_rows"] * 3
    with pytest.raises(StoreError, match="out of range"):
        store.write_row_block(2, before.shape[0] - 1, random_storage(rng, dtype, 2))


def test_read_only_store_refuses_writes(built):
    dtype, out = built
    store = TableStore.open(out)
    with pytest.raises(StoreError, match="read-only"):
        store.write_rows(2, [0], random_storage(np.random.default_rng(0), dtype, 1))
    with pytest.raises(StoreError, match="read-only"):
        store.write_row_block(2, 0, random_storage(np.random.default_rng(0), dtype, 1))
    with pytest.raises(StoreError, match="mode"):
        TableStore.open(out, mode="w")


def test_write_rows_into_a_zeros_table(tmp_path):
    store = create_store(tmp_path / "t.zarr", plan32("bfloat16"), VOCAB, init="zeros", **GEOMETRY)
    assert not (tmp_path / "t.zarr" / "layer_2" / "table" / "c").exists()  # no shard written yet
    store = TableStore.open(tmp_path / "t.zarr", mode="r+")
    x = random_storage(np.random.default_rng(4), "bfloat16", 2)
    store.write_rows(2, [5, store.shard_rows * 2 + 1], x)
    expect = np.zeros((store.plan.layer_rows(2), 32), np.uint16)
    expect[[5, store.shard_rows * 2 + 1]] = x
    np.testing.assert_array_equal(zarr_read(store, 2), expect)


def test_crash_between_temp_file_and_rename_leaves_the_old_shard(tmp_path, monkeypatch):
    store = create_store(tmp_path / "t.zarr", plan32("float32"), VOCAB, **GEOMETRY)
    path = store.path
    before_bytes = table_files(path, 2)
    before = zarr_read(store, 2)
    store = TableStore.open(path, mode="r+")

    real_replace, renames = os.replace, []

    def crash(src, dst, *args, **kwargs):
        if str(src).endswith(".tmp"):  # the shard's rename (zarr renames its own metadata files too)
            renames.append(src)
            assert os.path.getsize(src) > 0  # the new shard was written in full before
            raise OSError("simulated crash before the rename")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        store.write_rows(2, [1, store.shard_rows + 1], np.ones((2, 32), np.float32))
    monkeypatch.undo()
    assert len(renames) == 1
    assert table_files(path, 2) == before_bytes  # every shard old, byte for byte; no temp file left
    reopened = TableStore.open(path)
    np.testing.assert_array_equal(reopened.load_layer(2), before)  # zarr's crc32c codec checks every chunk
    assert reopened.modified[-1]["complete"] is False  # the interrupted modification is on record

    # A hard crash (kill -9) leaves the temp file behind: it is never read as data.
    leftover = path / "layer_2" / "table" / "c" / "0" / ".0.deadbeef.tmp"
    leftover.write_bytes(b"\0" * 100)
    np.testing.assert_array_equal(TableStore.open(path).load_layer(2), before)
    np.testing.assert_array_equal(zarr_read(reopened, 2), before)
    TableStore.open(path, mode="r+").write_rows(2, [1], np.ones((1, 32), np.float32))
    after = zarr_read(reopened, 2)
    assert np.all(after[1] == 1) and np.array_equal(after[2:], before[2:])


def test_open_checks_the_table_shape(tmp_path):
    import json

    store = create_store(tmp_path / "t.zarr", plan32("float16"), VOCAB, **GEOMETRY)
    meta_path = store.path / "layer_2" / "table" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] -= 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="shape") as e:
        TableStore.open(store.path)
    assert "\n" not in str(e.value)


# -- the build as steps, and executors --------------------------------------------------------
def test_resolve_workers_is_capped_by_memory():
    mib = 1 << 20
    assert _resolve_workers(8, 4 * mib, 1 << 40) == 8
    assert _resolve_workers(8, 4 * mib, 32 * mib) == 2  # a task holds ~4 chunks
    assert _resolve_workers(8, 4 * mib, 1 * mib) == 1
    assert _resolve_workers(None, 4 * mib, 16 * mib) == 1


def test_write_tables_pool_respects_the_memory_cap(tmp_path, monkeypatch):
    sizes = []
    real = writer_module.ThreadPoolExecutor

    def recording(max_workers, **kwargs):
        sizes.append(max_workers)
        return real(max_workers, **kwargs)

    monkeypatch.setattr(writer_module, "ThreadPoolExecutor", recording)
    plan = plan32("float32")
    for limit in (1 << 40, 8 * CHUNK_BYTES):
        partial = prepare_partial(tmp_path / f"t{limit}.zarr", False)
        write_tables(partial, plan, VOCAB, stats=None, workers=6, memory_limit=limit, **GEOMETRY)
    assert sizes == [6, 2]


def test_public_steps_and_a_process_executor_write_the_same_bytes(tmp_path):
    docs = make_docs(5)
    stats = write_stats_from_arrays(tmp_path / "stats", count_windows(docs, 3))
    plan = plan32("float8_e4m3", layer_ids=(2, 5))
    ref = create_store(tmp_path / "ref.zarr", plan, VOCAB, stats_root=stats.root, workers=1, **GEOMETRY)

    # the steps by hand, shard tasks pickled and run in reverse order
    partial = prepare_partial(tmp_path / "steps.zarr", False)
    layout = create_layout(partial, plan, VOCAB, stats=NgramStats.open(stats.root), memory_limit=1 << 16, **GEOMETRY)
    sums = {}
    for layer_id, start, stop in hit_passes(layout):
        for order, n in count_hits_range(partial, plan, layer_id, start, stop).items():
            sums.setdefault(layer_id, dict.fromkeys(plan.orders, 0))[order] += n
    for layer_id in plan.layer_ids:
        check_hit_totals(plan, stats, layer_id, sums[layer_id])
    tasks = shard_tasks(layout)
    assert len(tasks) > 4
    for task in reversed(tasks):
        run_shard_task(pickle.loads(pickle.dumps(task)))
    with pytest.raises(StoreError, match="incomplete"):
        TableStore.open(partial)
    mark_complete(partial)
    steps = finalize(partial, tmp_path / "steps.zarr", False)

    # write_tables on a caller's process pool
    partial = prepare_partial(tmp_path / "pool.zarr", False)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        write_tables(partial, plan, VOCAB, stats=NgramStats.open(stats.root), executor=ex, **GEOMETRY)
        ex.submit(int, 1).result()  # write_tables leaves a caller's executor running
    pool = finalize(partial, tmp_path / "pool.zarr", False)

    for other in (steps, pool):
        for layer_id in plan.layer_ids:
            assert table_files(other.path, layer_id) == table_files(ref.path, layer_id)
            np.testing.assert_array_equal(other.hits(layer_id)[:], ref.hits(layer_id)[:])


def test_thread_executor_matches_default(tmp_path):
    plan = plan32("bfloat16")
    ref = create_store(tmp_path / "a.zarr", plan, VOCAB, **GEOMETRY)
    with ThreadPoolExecutor(3) as ex:
        got = create_store(tmp_path / "b.zarr", plan, VOCAB, executor=ex, **GEOMETRY)
    assert table_files(got.path, 2) == table_files(ref.path, 2)


def test_vocab_array_form_is_shared_by_npz_and_store(tmp_path):
    """One function (vocab_arrays) writes the keys for both containers; a lone surrogate
    (a byte-level key that is not valid UTF-8 text) survives both."""
    from engram_cli.vocab import CompressedVocab, vocab_arrays

    keys = tuple(VOCAB.keys[:-1]) + ("\ud800 lone",)
    vocab = CompressedVocab(lookup=VOCAB.lookup, keys=keys, raw_key=VOCAB.raw_key, tokenizer_sha256=VOCAB.tokenizer_sha256)
    plan = make_plan(compressed_vocab_size=C, compressed_pad_id=PAD, rows_per_head=250, heads=4, dim=128, layer_ids=(2,), tokenizer_sha256=vocab.tokenizer_sha256, vocab_fingerprint=vocab.fingerprint)
    store = create_store(tmp_path / "t.zarr", plan, vocab, init="zeros", **GEOMETRY)
    from_npz = CompressedVocab.load(vocab.save(tmp_path / "v.npz"))
    from_store = store.vocab
    assert from_npz.keys == from_store.keys == keys and from_store.fingerprint == vocab.fingerprint
    g = zarr.open_group(str(store.path / "vocab"), mode="r")
    with np.load(tmp_path / "v.npz") as z:
        for name, npz_name in (("lookup", "lookup"), ("raw_key", "raw_key"), ("key_bytes", "keys_utf8"), ("key_offsets", "keys_offsets")):
            np.testing.assert_array_equal(g[name][:], z[npz_name])
            np.testing.assert_array_equal(g[name][:], vocab_arrays(vocab)[name])
    assert "\ud800 lone".encode("utf-8", "surrogatepass") in g["key_bytes"][:].tobytes()
