"""Exact n-gram counting: every count checked against a plain collections.Counter."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_cli.ngrams import (
    KeyLayout,
    NgramStats,
    count_ngrams,
    id_bits,
    concat_stats,
    merge_stats,
    order_file,
    summarize_counts,
    token_columns,
    write_stats_from_arrays,
)
from engram_cli.corpus import CorpusSummary
from engram_cli.errors import StoreError
from engram_cli.vocab import compress_vocab, load_tokenizer

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


# -- the independent route -------------------------------------------------------------
def counter_ngrams(docs: list[list[int]], n: int, pad: int) -> Counter:
    """Windows the model looks up, the obvious way: pad n-1 on the left of each document."""
    c: Counter = Counter()
    for doc in docs:
        padded = [pad] * (n - 1) + list(doc)
        for i in range(len(doc)):
            c[tuple(padded[i : i + n])] += 1
    return c


def read_counts(root: Path, n: int) -> Counter:
    df = pl.read_parquet(order_file(root, n))
    assert df.columns == ["order", *token_columns(n), "count"]
    assert df.schema["order"] == pl.UInt8 and df.schema["count"] == pl.UInt64
    assert all(df.schema[c] == pl.UInt32 for c in token_columns(n))
    assert (df["order"] == n).all()
    rows = zip(*[df[c].to_list() for c in token_columns(n)], df["count"].to_list())
    out = Counter()
    for *ids, count in rows:
        key = tuple(ids)
        assert key not in out, f"duplicate row {key}"
        out[key] = count
    return out


def expected_summary(c: Counter, top: int = 20) -> dict:
    counts = sorted(c.values(), reverse=True)
    total, m = sum(counts), len(counts)

    def share(frac):
        k = int(np.ceil(frac * m)) if m else 0
        return sum(counts[:k]) / total if total else 0.0

    best = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {
        "windows": total,
        "distinct": m,
        "singletons": sum(1 for v in counts if v == 1),
        "top1pct_share": share(0.01),
        "top10pct_share": share(0.10),
        "top": [{"ids": list(k), "count": v} for k, v in best],
    }


def check_stats(stats: NgramStats, docs: list[list[int]], max_n: int, pad: int) -> None:
    tokens = sum(len(d) for d in docs)
    assert stats.orders == tuple(range(2, max_n + 1))
    assert stats.summary["tokens"] == tokens
    assert stats.summary["documents"] == len(docs)
    for n in stats.orders:
        want = counter_ngrams(docs, n, pad)
        got = read_counts(stats.root, n)
        assert got == want, f"order {n}: {len(set(got) ^ set(want))} n-grams differ, e.g. {sorted(set(got) ^ set(want))[:3]}"
        summ = stats.order_summary(n)
        exp = expected_summary(want)
        assert summ["top1pct_share"] == pytest.approx(exp.pop("top1pct_share"), rel=1e-12)
        assert summ["top10pct_share"] == pytest.approx(exp.pop("top10pct_share"), rel=1e-12)
        assert {k: summ[k] for k in exp} == exp


# -- real text ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_docs():
    """The developers-reference part of the fixture corpus, DeepSeek tokenizer, compressed."""
    tok = load_tokenizer()
    vocab = compress_vocab(tok)
    docs = []
    for path in sorted((FIXTURE / "developers-reference").glob("*.rst")):
        ids = tok.tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
        docs.append(vocab.compress(ids))
    pad = int(vocab.lookup[2])
    return docs, pad, vocab.compressed_size


def test_fixture_counts_match_counter_orders_2_to_5(fixture_docs, tmp_path):
    docs, pad, C = fixture_docs
    assert id_bits(C) == 17  # DeepSeek: a trigram fits one uint64 key, 4- and 5-grams take two
    stats = count_ngrams(docs, max_ngram_size=5, pad_id=pad, vocab_size=C, out_dir=tmp_path)
    check_stats(stats, [d.tolist() for d in docs], 5, pad)
    assert NgramStats.open(tmp_path).summary == stats.summary


def test_spilling_gives_identical_files(fixture_docs, tmp_path):
    docs, pad, C = fixture_docs
    plain = count_ngrams(docs, max_ngram_size=4, pad_id=pad, vocab_size=C, out_dir=tmp_path / "plain")
    merges = []
    spill = tmp_path / "spill"
    spilled = count_ngrams(
        docs, max_ngram_size=4, pad_id=pad, vocab_size=C, out_dir=tmp_path / "small", memory_limit=1 << 20, spill_dir=spill,
        progress=lambda stage, done, total=None, detail="": merges.append((stage, done, total)) if stage == "merging" else None,
    )
    assert any(total and total > 1 for _, _, total in merges), "the tiny memory limit should have spilled and merged by range"
    for n in plain.orders:
        a, b = pl.read_parquet(order_file(plain.root, n)), pl.read_parquet(order_file(spilled.root, n))
        assert a.equals(b), f"order {n} differs after spilling"
    assert spilled.summary == plain.summary
    assert list(spill.iterdir()) == [], "spill files must be removed"
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == ["order_2.parquet", "order_3.parquet", "order_4.parquet", "summary.json"]


def test_output_sorted_in_text_order_and_iter_batches(fixture_docs, tmp_path):
    docs, pad, C = fixture_docs
    stats = count_ngrams(docs[:3], max_ngram_size=3, pad_id=pad, vocab_size=C, out_dir=tmp_path)
    df = pl.read_parquet(order_file(tmp_path, 3))
    assert df.select(token_columns(3)).equals(df.select(token_columns(3)).sort(token_columns(3)))
    parts = list(stats.iter_batches(3, batch_rows=1000))
    assert all(ids.shape[0] <= 1000 for ids, _ in parts)
    ids = np.concatenate([i for i, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    assert ids.shape == (stats.distinct(3), 3)
    assert np.array_equal(ids, df.select(token_columns(3)).to_numpy().astype(np.int64))
    assert np.array_equal(counts, df["count"].to_numpy().astype(np.int64))


# -- boundaries and padding --------------------------------------------------------------
def test_left_padding_and_document_boundaries(tmp_path):
    docs = [[5, 6, 7], [8], [], [5, 6]]
    stats = count_ngrams([np.array(d) for d in docs], max_ngram_size=3, pad_id=0, vocab_size=10, out_dir=tmp_path)
    got = read_counts(tmp_path, 3)
    assert got[(0, 0, 5)] == 2  # position 0 of both documents starting with 5
    assert got[(0, 5, 6)] == 2
    assert (7, 8, 0) not in got and (0, 7, 8) not in got and (6, 7, 8) not in got  # never across documents
    assert got[(0, 0, 8)] == 1
    check_stats(stats, docs, 3, 0)


@pytest.mark.parametrize("slice_tokens", [1000, 3])
def test_long_documents_are_sliced_with_exact_windows(tmp_path, monkeypatch, slice_tokens):
    """A document longer than a batch is counted in bounded slices, windows unchanged."""
    import engram_cli.ngrams.count as ngrams_mod

    monkeypatch.setattr(ngrams_mod, "MAX_BATCH_TOKENS", slice_tokens)
    batch_sizes = []
    real_add = ngrams_mod._OrderCounter.add_batch

    def add_batch(self, keys):
        batch_sizes.append(len(keys[0]))
        real_add(self, keys)

    monkeypatch.setattr(ngrams_mod._OrderCounter, "add_batch", add_batch)
    rng = np.random.default_rng(7)
    long = rng.integers(1, 6, size=3 * 1000 + 517).tolist()  # longer than 3 slices of 1000
    docs = [[3, 4], long, [1, 2, 3, 4, 5] * 50, long[:999], [2]]
    stats = count_ngrams([np.array(d) for d in docs], max_ngram_size=5, pad_id=0, vocab_size=6, out_dir=tmp_path)
    for n in range(2, 6):
        # Independent route: a Counter over each whole document, left-padded only at its start.
        assert read_counts(tmp_path, n) == counter_ngrams(docs, n, 0), f"order {n}"
    check_stats(stats, docs, 5, 0)
    assert max(batch_sizes) <= slice_tokens
    assert sum(batch_sizes) == 4 * sum(len(d) for d in docs)  # every window counted once per order


def test_write_stats_from_arrays_shares_the_summary(fixture_docs, tmp_path):
    docs, pad, C = fixture_docs
    stats = count_ngrams(docs[:4], max_ngram_size=3, pad_id=pad, vocab_size=C, out_dir=tmp_path / "a")
    per_order = {}
    for n in stats.orders:
        c = counter_ngrams([d.tolist() for d in docs[:4]], n, pad)
        per_order[n] = (np.array(list(c.keys())), np.array(list(c.values())))
    other = write_stats_from_arrays(tmp_path / "b", per_order)
    assert other.summary["per_order"] == stats.summary["per_order"]
    for n, (ids, counts) in per_order.items():
        assert summarize_counts(ids, counts) == stats.order_summary(n)


def test_key_layout_round_trip():
    rng = np.random.default_rng(1)
    for C, n in [(99092, 3), (99092, 4), (99092, 5), (2, 5), (2**32, 3), (300, 7)]:
        layout = KeyLayout(n, id_bits(C))
        toks = rng.integers(0, C, size=(50, n), dtype=np.int64)
        keys = layout.pack([toks[:, j].astype(np.uint64) for j in range(n)])
        assert len(keys) == -(-n // (64 // id_bits(C)))
        assert np.array_equal(layout.unpack(keys), toks)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="pad_id 10 is outside"):
        count_ngrams([np.array([1])], max_ngram_size=2, pad_id=10, vocab_size=10, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"got values in \[0, 12\]"):
        count_ngrams([np.array([0, 12])], max_ngram_size=2, pad_id=0, vocab_size=10, out_dir=tmp_path)
    with pytest.raises(ValueError, match="max_ngram_size must be >= 2"):
        count_ngrams([np.array([1])], max_ngram_size=1, pad_id=0, vocab_size=10, out_dir=tmp_path)


def test_no_tokens_writes_empty_orders(tmp_path):
    stats = count_ngrams([np.array([], dtype=np.int64)], max_ngram_size=3, pad_id=0, vocab_size=10, out_dir=tmp_path)
    assert stats.summary["tokens"] == 0 and stats.distinct(3) == 0
    assert pl.read_parquet(order_file(tmp_path, 3)).height == 0
    assert list(stats.iter_batches(3)) == []


# -- property ------------------------------------------------------------------------------
@st.composite
def corpora(draw):
    C = draw(st.sampled_from([1, 2, 3, 17, 300, 99092, 2**20 + 1, 2**32]))
    docs = draw(st.lists(st.lists(st.integers(0, C - 1), max_size=80), max_size=12))
    pad = draw(st.integers(0, C - 1))
    max_n = draw(st.integers(2, 5))
    small = draw(st.booleans())
    return C, docs, pad, max_n, small


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpora())
def test_random_documents_match_counter(case):
    C, docs, pad, max_n, small = case
    with tempfile.TemporaryDirectory() as tmp:
        stats = count_ngrams(
            (np.array(d, dtype=np.int64) for d in docs), max_ngram_size=max_n, pad_id=pad, vocab_size=C, out_dir=tmp,
            memory_limit=1 << 12 if small else 1 << 30,  # 4 KiB: batches of 256 tokens, spills of 64 rows
        )
        check_stats(stats, docs, max_n, pad)
        assert json.loads((Path(tmp) / "summary.json").read_text()) == stats.summary


# -- merging shard statistics ------------------------------------------------------------
@pytest.fixture(scope="module")
def whole_and_shards(tmp_path_factory):
    """The whole fixture corpus counted once, and in 3 shards (its file list split in 3)."""
    from engram_cli.pipeline.count import count_corpus, count_shard
    from engram_cli.corpus import corpus_files

    tok = load_tokenizer()
    vocab = compress_vocab(tok)
    pad = int(vocab.lookup[2])
    root = tmp_path_factory.mktemp("merge")
    files = corpus_files([FIXTURE])
    assert len(files) >= 3
    _, whole = count_corpus(files, tokenizer=tok, vocab=vocab, max_ngram_size=4, pad_id=pad, out_dir=root / "whole")
    cut = [0, len(files) // 3, 2 * len(files) // 3, len(files)]
    shards = [files[a:b] for a, b in zip(cut[:-1], cut[1:])]
    parts = [count_corpus(s, tokenizer=tok, vocab=vocab, max_ngram_size=4, pad_id=pad, out_dir=root / f"shard{i}")[1] for i, s in enumerate(shards)]
    # The distributed unit: plain, picklable arguments (tokenizer spec, vocab path).
    vocab_path = vocab.save(root / "vocab.npz")
    import pickle

    call = pickle.loads(pickle.dumps((count_shard, shards[1], "deepseek", vocab_path)))
    by_spec = call[0](call[1], tokenizer=call[2], vocab=call[3], max_ngram_size=4, pad_id=pad, out_dir=root / "shard1-by-spec")
    return root, whole, parts, by_spec


def test_count_shard_from_specs_equals_count_corpus(whole_and_shards):
    _, _, parts, by_spec = whole_and_shards
    assert by_spec.summary == parts[1].summary
    for n in by_spec.orders:
        assert order_file(by_spec.root, n).read_bytes() == order_file(parts[1].root, n).read_bytes()


def test_merged_shards_are_byte_identical_to_the_whole(whole_and_shards):
    """Byte for byte: parquet writing is deterministic for equal frames (same polars call,
    same row order, one row group), and the merge writes each order with the call a
    single in-memory count uses, so every file and summary.json must match exactly."""
    root, whole, parts, _ = whole_and_shards
    assert sum(p.summary["documents"] for p in parts) == whole.summary["documents"]
    assert all(p.summary["tokens"] < whole.summary["tokens"] for p in parts)  # the shards really split it
    merged = merge_stats(parts, root / "merged")
    for n in whole.orders:
        assert order_file(merged.root, n).read_bytes() == order_file(whole.root, n).read_bytes(), f"order {n}"
    assert (merged.root / "summary.json").read_text() == (whole.root / "summary.json").read_text()
    assert merged.summary == whole.summary


def test_merge_in_key_ranges_under_a_small_memory_limit(whole_and_shards):
    """Row for row: with a tiny memory limit the merge goes range by range and streams the
    ranges into one file (more row groups than a one-shot write, so the bytes differ);
    the rows, their order and the summary figures must not."""
    root, whole, parts, _ = whole_and_shards
    ranges = []
    merged = merge_stats(
        [p.root for p in reversed(parts[1:])] + [parts[0].root], root / "merged-small", memory_limit=1 << 20,
        progress=lambda stage, done, total=None, detail="": ranges.append(total),
    )
    assert max(ranges) > 1, "a 1 MiB limit must merge in several key ranges"
    for n in whole.orders:
        a, b = pl.read_parquet(order_file(whole.root, n)), pl.read_parquet(order_file(merged.root, n))
        assert a.equals(b), f"order {n} differs"
    drop = lambda s: {k: v for k, v in s.items() if k != "corpus"}  # noqa: E731 - shard order changes skipped_examples only
    assert drop(merged.summary) == drop(whole.summary)
    assert [f.name for f in sorted((root / "merged-small").iterdir())] == ["order_2.parquet", "order_3.parquet", "order_4.parquet", "summary.json"]


def test_merge_rejects_mismatched_orders(whole_and_shards, tmp_path):
    _, whole, _, _ = whole_and_shards
    other = write_stats_from_arrays(tmp_path / "o3", {2: (np.array([[1, 2]]), np.array([1])), 3: (np.array([[1, 2, 3]]), np.array([1]))})
    with pytest.raises(StoreError, match="same --max-ngram"):
        merge_stats([whole, other], tmp_path / "out")
    with pytest.raises(StoreError, match="at least one"):
        merge_stats([], tmp_path / "out")


def test_corpus_summary_merge_adds_up():
    a = CorpusSummary(files=2, documents=3, bytes=10, skipped_binary=1, tokens=7)
    a.skip("bad json", "a.jsonl")
    b = CorpusSummary(files=1, documents=1, bytes=5, invalid_utf8=1, tokens=4)
    b.skip("bad json", "b.jsonl")
    b.skip("no text", "b.jsonl")
    m = a.merge(b)
    assert (m.files, m.documents, m.bytes, m.skipped_binary, m.invalid_utf8, m.tokens) == (3, 4, 15, 1, 1, 11)
    assert m.skipped_other == {"bad json": 2, "no text": 1}
    assert m.skipped_examples == {"bad json": "a.jsonl", "no text": "b.jsonl"}
    assert a.merge([b, b]).documents == 5 and a.documents == 3  # a new summary; a untouched
    assert CorpusSummary.from_dict(m.to_dict()) == m


def test_key_range_partitions_concatenate_to_the_whole(whole_and_shards):
    """The distributed reduce: one merge per tok_0 range, then concat_stats. Row for row
    and figure for figure equal to the whole (concat streams the partitions into one
    file, so its row groups, and bytes, differ)."""
    root, whole, parts, _ = whole_and_shards
    C = 99_092  # DeepSeek's compressed vocabulary: tok_0 < C
    edges = [0, 300, 5_000, C]
    # a 1 MiB limit also splits the big partition into several key ranges inside it
    partitions = [merge_stats(parts, root / f"radix{i}", tok0_range=(lo, hi), memory_limit=1 << 20) for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]
    assert all(p.distinct(2) > 0 for p in partitions)  # every partition holds rows
    joined = concat_stats(partitions, root / "joined")
    for n in whole.orders:
        a, b = pl.read_parquet(order_file(whole.root, n)), pl.read_parquet(order_file(joined.root, n))
        assert a.equals(b), f"order {n} differs"
        assert sum(p.distinct(n) for p in partitions) == whole.distinct(n)
    assert joined.summary == whole.summary
    with pytest.raises(StoreError, match="ascending"):
        concat_stats(list(reversed(partitions)), root / "bad")
