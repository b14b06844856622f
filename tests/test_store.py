"""TableStore: layout read back with plain zarr, hit counts, init recipe, atomicity, errors.

Independent routes: hit counts are checked against the reference-layout hash of the
original token sequences (`position_row_ids`), never against the stats-based path;
initial values against the documented recipe written out here with numpy and torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from engram_cli.errors import OutputError, StoreError
from engram_cli.hashing import position_row_ids
from engram_cli.ngrams import write_stats_from_arrays
from engram_cli.plan import TablePlan
from engram_cli.store import (
    FORMAT,
    TableStore,
    create_store,
    finalize,
    hit_counts,
    init_chunk,
    partial_path,
    prepare_partial,
    write_tables,
)

from oracles import STORE_C as C, STORE_CHUNK_BYTES as CHUNK_BYTES, STORE_PAD as PAD, STORE_SHARD_BYTES as SHARD_BYTES, STORE_SMALL as SMALL, STORE_V as V, STORE_VOCAB as VOCAB  # noqa: F401
from oracles import count_windows, make_docs, make_vocab, small_plan  # noqa: F401

def reference_hits(plan: TablePlan, layer_id: int, docs) -> np.ndarray:
    """Hits by the reference layout: every position's row id of every head, counted."""
    hits = np.zeros(plan.layer_rows(layer_id), dtype=np.uint64)
    for doc in docs:
        rows = position_row_ids(plan, layer_id, doc[None, :])  # (1, T, heads)
        np.add.at(hits, rows.ravel(), 1)
    return hits


def recipe(seed: int, layer_id: int, chunk_index: int, rows: int, head_dim: int, std: float = 0.02) -> np.ndarray:
    """The documented init recipe, float32 before the storage cast."""
    x = np.random.default_rng(np.random.SeedSequence([seed, layer_id, chunk_index])).standard_normal((rows, head_dim), dtype=np.float32)
    return x * np.float32(std)


def torch_bf16_words(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.fixture(scope="module")
def docs():
    return make_docs()


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("stats") / "stats"
    write_stats_from_arrays(root, count_windows(docs, 3))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, stats_dir):
    out = tmp_path_factory.mktemp("store") / "tables.zarr"
    calls = []
    store = create_store(
        out, small_plan(), VOCAB, stats_root=stats_dir, workers=2, extra_attrs={"corpus": "unit"}, progress=lambda *a: calls.append(a), **SMALL
    )
    return out, store, calls


# -- layout, read with plain zarr-python -------------------------------------------
def test_plain_zarr_layout(built):
    out, store, _ = built
    plan = small_plan()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that it skips stats/ when listing
        group = zarr.open_group(str(out), mode="r")
        names = set(group.keys())
    assert names == {"vocab", "layer_1", "layer_4"}
    attrs = group.attrs["engram"]
    assert attrs["format"] == FORMAT and attrs["complete"] is True
    assert attrs["extra"] == {"corpus": "unit"}
    assert attrs["vocab_fingerprint"] == VOCAB.fingerprint and attrs["tokenizer_sha256"] == VOCAB.tokenizer_sha256
    assert attrs["dtype"] == "float32" and attrs["storage_dtype"] == "float32"
    assert attrs["init"]["kind"] == "normal" and attrs["init"]["seed"] == plan.seed
    assert TablePlan.from_dict(attrs["plan"]) == plan
    assert attrs["plan"]["multipliers_str"]["1"] == [str(m) for m in plan.multipliers[1]]
    row_bytes = plan.head_dim * 4
    assert attrs["chunk_rows"] == CHUNK_BYTES // row_bytes
    assert attrs["shard_rows"] == 4 * attrs["chunk_rows"]
    for layer_id in plan.layer_ids:
        table = group[f"layer_{layer_id}/table"]
        assert table.shape == (plan.layer_rows(layer_id), plan.head_dim)
        assert table.dtype == np.float32
        assert table.chunks == (attrs["chunk_rows"], plan.head_dim)
        assert table.shards == (attrs["shard_rows"], plan.head_dim)
        (sharding,) = table.metadata.codecs
        assert isinstance(sharding, ShardingCodec)
        assert any(isinstance(c, Crc32cCodec) for c in sharding.codecs)
        assert any(isinstance(c, Crc32cCodec) for c in sharding.index_codecs)
        assert table.attrs["layer_id"] == layer_id
        assert table.attrs["row_offsets"] == np.concatenate([[0], np.cumsum(plan.head_primes(layer_id))[:-1]]).tolist()
        assert table.attrs["primes"] == [p for order in plan.primes[layer_id] for p in order]
        hits = group[f"layer_{layer_id}/hits"]
        assert hits.shape == (plan.layer_rows(layer_id),) and hits.dtype == np.uint64
        # one file per shard, no more
        shard_files = [p for p in (out / f"layer_{layer_id}" / "table" / "c").rglob("*") if p.is_file()]
        assert len(shard_files) == -(-plan.layer_rows(layer_id) // attrs["shard_rows"])


def test_vocab_round_trip(built):
    out, store, _ = built
    vocab = store.vocab
    assert np.array_equal(vocab.lookup, VOCAB.lookup)
    assert vocab.keys == VOCAB.keys
    assert np.array_equal(vocab.raw_key, VOCAB.raw_key)
    assert vocab.fingerprint == VOCAB.fingerprint
    # readable without engram: offsets slice UTF-8 bytes
    g = zarr.open_group(str(out / "vocab"), mode="r")
    kb, off = g["key_bytes"][:].tobytes(), g["key_offsets"][:]
    assert kb[off[7] : off[8]].decode("utf-8") == VOCAB.keys[7]


def test_stats_live_in_store(built, stats_dir):
    out, store, _ = built
    assert (out / "stats" / "summary.json").is_file()
    assert store.stats.summary == json.loads((stats_dir / "summary.json").read_text())


def test_progress_reports_both_stages(built):
    _, store, calls = built
    stages = {c[0] for c in calls}
    assert stages == {"hit counts", "writing"}
    writing = [c for c in calls if c[0] == "writing"]
    assert writing[-1][1] == writing[-1][2] == small_plan().total_bytes


# -- hit counts ------------------------------------------------------------------------
def test_hits_match_reference_hash_of_sequences(built, docs):
    _, store, _ = built
    plan = store.plan
    tokens = sum(len(d) for d in docs)
    for layer_id in plan.layer_ids:
        stored = zarr.open_array(str(store.path / f"layer_{layer_id}" / "hits"), mode="r")[:]
        assert np.array_equal(stored, reference_hits(plan, layer_id, docs))
        offsets = plan.row_offsets(layer_id).tolist() + [plan.layer_rows(layer_id)]
        for n in plan.orders:
            lo, hi = offsets[(n - 2) * plan.heads], offsets[(n - 1) * plan.heads]
            assert int(stored[lo:hi].sum()) == tokens * plan.heads


def test_hits_in_many_passes_equal_one_pass(built, tmp_path, docs):
    _, store, _ = built
    plan = store.plan
    one = hit_counts(plan, 1, store.stats)
    # a 64 KiB memory limit: tiny batches and many row ranges
    pieces = [hit_counts(plan, 1, store.stats, a, min(a + 3001, plan.layer_rows(1)), memory_limit=64 * 1024) for a in range(0, plan.layer_rows(1), 3001)]
    assert np.array_equal(np.concatenate(pieces), one)
    # and the whole build under a tiny limit (several hits shards and passes)
    small = create_store(tmp_path / "t.zarr", plan, VOCAB, stats_root=store.path / "stats", memory_limit=256 * 1024, **SMALL)
    assert small.hits(1).shards[0] < plan.layer_rows(1)
    assert np.array_equal(small.hits(4)[:], reference_hits(plan, 4, docs))


# -- initialization ----------------------------------------------------------------
def test_stored_chunks_follow_the_recipe_and_regenerate(built):
    out, store, _ = built
    plan = store.plan
    chunk_rows = store.chunk_rows
    for layer_id in plan.layer_ids:
        table = zarr.open_array(str(out / f"layer_{layer_id}" / "table"), mode="r")
        n_chunks = -(-table.shape[0] // chunk_rows)
        for c in (0, 1, 5, n_chunks - 1):  # the last chunk is short
            a, b = c * chunk_rows, min(table.shape[0], (c + 1) * chunk_rows)
            stored = table[a:b]
            assert store.regenerate_chunk(layer_id, c).tobytes() == stored.tobytes()
            assert np.array_equal(stored, recipe(plan.seed, layer_id, c, b - a, plan.head_dim))
            assert np.array_equal(init_chunk(plan, layer_id, c, chunk_rows, "normal", 0.02), stored)
    assert np.array_equal(init_chunk(plan, 1, 0, chunk_rows, "normal", 0.5), recipe(plan.seed, 1, 0, chunk_rows, plan.head_dim, 0.5))
    assert not np.any(init_chunk(plan, 1, 0, chunk_rows, "zeros"))
    # layers and chunks differ
    assert not np.array_equal(store.regenerate_chunk(1, 0), store.regenerate_chunk(4, 0)[: store.chunk_rows])
    assert not np.array_equal(store.regenerate_chunk(1, 0), store.regenerate_chunk(1, 1))
    with pytest.raises(StoreError, match="out of range"):
        store.regenerate_chunk(1, n_chunks + 10)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage(tmp_path, dtype):
    plan = small_plan(dtype, layer_ids=(2,))
    store = create_store(tmp_path / "t.zarr", plan, VOCAB, **SMALL)
    table = zarr.open_array(str(tmp_path / "t.zarr" / "layer_2" / "table"), mode="r")
    attrs = zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs["engram"]
    assert attrs["dtype"] == dtype and table.attrs["dtype"] == dtype
    assert store.chunk_rows == CHUNK_BYTES // (plan.head_dim * 2)
    c, rows = 3, store.chunk_rows
    x = recipe(plan.seed, 2, c, rows, plan.head_dim)
    stored = table[c * rows : (c + 1) * rows]
    if dtype == "float16":
        assert table.dtype == np.float16 and attrs["storage_dtype"] == "float16"
        assert np.array_equal(stored, x.astype(np.float16))
        assert store.read_rows(2, [c * rows]).dtype == np.float16
    else:
        assert table.dtype == np.uint16 and attrs["storage_dtype"] == "uint16"
        assert np.array_equal(stored, torch_bf16_words(x))
        got = store.read_rows(2, np.arange(c * rows, (c + 1) * rows))
        want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, want)
        assert np.array_equal(store.read_rows(2, [c * rows], as_stored=True)[0], stored[0])
    assert store.regenerate_chunk(2, c).tobytes() == stored.tobytes()


def test_bfloat16_rounding_matches_torch_on_edge_values():
    from engram_cli.store import float32_to_bfloat16_bits

    specials = np.array([0.0, -0.0, 1.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, 1.00390625, 1.01171875], dtype=np.float32)
    rand = np.random.default_rng(1).standard_normal(100_000).astype(np.float32) * np.float32(1e3)
    ties = (np.arange(1 << 16, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly half-way
    for x in (specials, rand, ties):
        got, want = float32_to_bfloat16_bits(x), torch_bf16_words(x)
        nan = np.isnan(x)
        assert np.array_equal(got[~nan], want[~nan])
        assert np.all(np.isnan(torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).float().numpy()[nan]))


def test_read_rows_gathers(built):
    out, store, _ = built
    table = zarr.open_array(str(out / "layer_4" / "table"), mode="r")[:]
    ids = np.array([[0, 5, 5], [table.shape[0] - 1, 1234, 0]])
    got = store.read_rows(4, ids)
    assert got.shape == (2, 3, store.plan.head_dim)
    assert np.array_equal(got, table[ids])
    with pytest.raises(StoreError, match="out of range"):
        store.read_rows(4, [table.shape[0]])
    with pytest.raises(StoreError, match="not in table store"):
        store.read_rows(2, [0])


@pytest.mark.parametrize("compressor", ["zstd", "lz4"])
def test_compressors(tmp_path, compressor):
    plan = small_plan(layer_ids=(3,))
    store = create_store(tmp_path / "t.zarr", plan, VOCAB, compressor=compressor, **SMALL)
    table = zarr.open_array(str(tmp_path / "t.zarr" / "layer_3" / "table"), mode="r")
    inner = table.metadata.codecs[0].codecs
    assert any(isinstance(c, ZstdCodec if compressor == "zstd" else BloscCodec) for c in inner)
    assert isinstance(inner[-1], Crc32cCodec)
    assert store.summary()["compressor"] == compressor
    assert table[:256].tobytes() == store.regenerate_chunk(3, 0).tobytes()


def test_processes_write_the_same_bytes_as_threads(tmp_path):
    plan = small_plan(layer_ids=(1,))
    a = create_store(tmp_path / "a.zarr", plan, VOCAB, workers=2, parallel="processes", **SMALL)
    b = create_store(tmp_path / "b.zarr", plan, VOCAB, workers=1, **SMALL)
    files_a = sorted(p.relative_to(a.path) for p in (a.path / "layer_1" / "table" / "c").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.path) for p in (b.path / "layer_1" / "table" / "c").rglob("*") if p.is_file())
    assert files_a == files_b and files_a
    for rel in files_a:
        assert (a.path / rel).read_bytes() == (b.path / rel).read_bytes()


def test_zeros_init_and_no_stats(tmp_path):
    plan = small_plan(layer_ids=(1,))
    store = create_store(tmp_path / "t.zarr", plan, VOCAB, init="zeros", **SMALL)
    assert not np.any(store.table(1)[:])
    assert store.summary()["layers"][0]["bytes_on_disk"] < 4096  # nothing but metadata
    with pytest.raises(StoreError, match="no hit counts"):
        store.hits(1)
    with pytest.raises(StoreError, match="no n-gram statistics"):
        store.stats


def test_summary_is_json_safe(built):
    out, store, _ = built
    s = json.loads(json.dumps(store.summary()))
    plan = small_plan()
    assert [layer["rows"] for layer in s["layers"]] == [plan.layer_rows(x) for x in plan.layer_ids]
    assert s["total_bytes"] == plan.total_bytes
    assert s["layers"][0]["shards"] == -(-plan.layer_rows(1) // store.shard_rows)
    if store.attrs["codecs"]["table"]["compressor"] == "none":
        assert s["bytes_on_disk"] >= s["total_bytes"]
    else:  # compressed: compare with the files on disk, counted here independently
        assert s["bytes_on_disk"] == sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    assert s["has_hits"] and s["has_stats"]


# -- atomicity ------------------------------------------------------------------------
def test_existing_output_without_force(built, tmp_path):
    out = tmp_path / "t.zarr"
    create_store(out, small_plan(layer_ids=(1,)), VOCAB, **SMALL)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="--force"):
        create_store(out, small_plan(layer_ids=(2,)), VOCAB, **SMALL)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not partial_path(out).exists()
    replaced = create_store(out, small_plan(layer_ids=(2,)), VOCAB, force=True, **SMALL)
    assert replaced.layer_ids == (2,) and TableStore.open(out).layer_ids == (2,)
    assert not partial_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t.zarr"]


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_build_never_looks_complete(tmp_path, workers, stats_dir):
    out = tmp_path / "t.zarr"

    def progress(stage, done, total=None, detail=""):
        if stage == "writing" and done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_store(out, small_plan(), VOCAB, stats_root=stats_dir, workers=workers, progress=progress, **SMALL)
    assert not out.exists()
    with pytest.raises(StoreError, match="does not exist"):
        TableStore.open(out)
    with pytest.raises(StoreError, match="incomplete"):
        TableStore.open(partial_path(out))
    with pytest.raises(StoreError, match="incomplete"):
        finalize(partial_path(out), out, force=True)
    # the next build removes the stale partial
    partial = prepare_partial(out, force=False)
    assert partial.is_dir() and not any(partial.iterdir())


def test_write_tables_into_prepared_partial_with_stats_inside(tmp_path, docs):
    out = tmp_path / "t.zarr"
    partial = prepare_partial(out, force=False)
    from engram_cli.ngrams import NgramStats

    stats = write_stats_from_arrays(partial / "stats", count_windows(docs, 3))
    write_tables(partial, small_plan(layer_ids=(1,)), VOCAB, stats=NgramStats.open(partial / "stats"), **SMALL)
    store = finalize(partial, out, force=False)
    assert store.stats.summary == stats.summary
    assert np.array_equal(store.hits(1)[:], reference_hits(store.plan, 1, docs))


# -- corrupt stores -------------------------------------------------------------------
def _copy(built, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "copy.zarr"
    shutil.copytree(built[0], dst)
    return dst


def test_open_rejects_corrupt_stores(built, tmp_path):
    path = _copy(built, tmp_path)
    root_json = path / "zarr.json"
    meta = json.loads(root_json.read_text())

    with pytest.raises(StoreError, match="not an engram table store"):
        TableStore.open(path / "layer_1")  # a group, but no engram attributes
    with pytest.raises(StoreError, match="not a Zarr v3 group"):
        TableStore.open(path / "stats")

    def rewrite(attrs):
        root_json.write_text(json.dumps({**meta, "attributes": attrs}))

    rewrite({"engram": "garbage"})
    with pytest.raises(StoreError, match="no 'engram' attributes"):
        TableStore.open(path)
    rewrite({"engram": {**meta["attributes"]["engram"], "format": "engram-tables/99"}})
    with pytest.raises(StoreError, match="engram-tables/99"):
        TableStore.open(path)
    rewrite({"engram": {**meta["attributes"]["engram"], "complete": False}})
    with pytest.raises(StoreError, match="incomplete"):
        TableStore.open(path)
    tampered = json.loads(json.dumps(meta["attributes"]["engram"]))
    tampered["plan"]["primes"]["1"][0][0] += 2
    rewrite({"engram": tampered})
    with pytest.raises(StoreError, match="fingerprint"):
        TableStore.open(path)
    del tampered["plan"]
    rewrite({"engram": tampered})
    with pytest.raises(StoreError, match="malformed"):
        TableStore.open(path)
    root_json.write_text("{ not json")
    with pytest.raises(StoreError, match="unreadable Zarr metadata"):
        TableStore.open(path)
    root_json.unlink()
    with pytest.raises(StoreError, match="no zarr.json"):
        TableStore.open(path)


def test_corrupt_vocab_is_caught(built, tmp_path):
    path = _copy(built, tmp_path)
    lookup = zarr.open_array(str(path / "vocab" / "lookup"), mode="r+")
    lookup[3] = 999
    with pytest.raises(StoreError, match="fingerprint"):
        TableStore.open(path).vocab


def test_corrupt_chunk_fails_its_checksum(built, tmp_path):
    path = _copy(built, tmp_path)
    shard = path / "layer_1" / "table" / "c" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = TableStore.open(path)
    with pytest.raises(Exception, match="checksum"):
        store.table(1)[:10]


@pytest.mark.parametrize(
    "compressor, dtype, shard_chunks",
    [("none", "float32", 6), ("zstd", "float32", 6), ("lz4", "float32", 6), ("none", "bfloat16", 7), ("lz4", "float16", 5), ("none", "float32", 1000)],
)
def test_shards_are_byte_identical_to_zarrs_own_writer(tmp_path, compressor, dtype, shard_chunks):
    """Our direct shard writer against zarr-python writing the same values into an array
    with the same metadata: a short last chunk, a partial last shard, and (1000 chunks)
    a shard larger than the table whose trailing chunks are absent."""
    plan = small_plan(dtype, layer_ids=(3,))
    # shard of 6 chunks: the layer's last shard is partial, its last chunk short
    store = create_store(tmp_path / "t.zarr", plan, VOCAB, compressor=compressor, chunk_bytes=CHUNK_BYTES, shard_bytes=shard_chunks * CHUNK_BYTES)
    assert plan.layer_rows(3) % store.chunk_rows  # the last chunk is short
    ours = zarr.open_array(str(tmp_path / "t.zarr" / "layer_3" / "table"), mode="r")
    values = ours[:]
    meta = ours.metadata.to_dict()
    meta.pop("attributes", None)
    theirs = zarr.create_array(store=str(tmp_path / "zarr-wrote"), **{
        "shape": meta["shape"], "dtype": ours.dtype, "chunks": ours.chunks, "shards": ours.shards,
        "compressors": list(ours.compressors), "fill_value": 0, "config": {"write_empty_chunks": True},
    })
    assert theirs.metadata.to_dict()["codecs"] == meta["codecs"]
    theirs[:] = values
    ours_files = sorted(p.relative_to(tmp_path / "t.zarr" / "layer_3" / "table") for p in (tmp_path / "t.zarr" / "layer_3" / "table" / "c").rglob("*") if p.is_file())
    theirs_files = sorted(p.relative_to(tmp_path / "zarr-wrote") for p in (tmp_path / "zarr-wrote" / "c").rglob("*") if p.is_file())
    assert ours_files == theirs_files and len(ours_files) == -(-values.shape[0] // store.shard_rows)
    for rel in ours_files:
        assert (tmp_path / "t.zarr" / "layer_3" / "table" / rel).read_bytes() == (tmp_path / "zarr-wrote" / rel).read_bytes(), rel


def test_corrupt_chunk_is_a_store_error(tmp_path, stats_dir):
    out = tmp_path / "t.zarr"
    store = create_store(out, small_plan(), VOCAB, stats_root=stats_dir, compressor="none", **SMALL)
    shard = sorted(p for p in (out / "layer_1" / "table" / "c").rglob("*") if p.is_file())[0]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # one flipped bit pattern inside the first chunk's payload
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt chunk"):
        TableStore.open(out).read_rows(1, np.array([0, 1]))
    assert store.read_rows(1, np.array([store.chunk_rows])).shape == (1, small_plan().head_dim)  # other chunks still read


def test_load_layer_is_page_aligned(built):
    """Tables come back on a page boundary (engram_cli/aligned.py): the CPU gather's rows start on cache lines."""
    from engram_cli.aligned import ALIGN

    store = built[1]
    for layer in store.layer_ids:
        table = store.load_layer(layer)
        assert table.ctypes.data % ALIGN == 0 and table.flags.c_contiguous
        np.testing.assert_array_equal(table[3:9], store.load_layer(layer, rows=(3, 9)))
