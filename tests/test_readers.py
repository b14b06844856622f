"""One reader per format: a file read in shards (byte or row ranges) reads exactly like the file read whole.

Same documents (pieces and their `ContinuedText` cuts included), same `CorpusSummary`
once the shards' summaries are merged in order, and byte-identical n-gram statistics
once the shards' counts are merged (`ngrams.merge_stats`). The files carry what made
the two paths drift before they shared one reader: JSON lines over the (scaled-down)
line cap, lines nested deeper than the parser's recursion limit, invalid UTF-8, a
byte-order mark, blank lines, records without the text field, texts long enough to be
cut into pieces, a final line without a newline, and a NUL byte past the first 4 KiB.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest

from engram_cli.pipeline.count import count_corpus
from engram_cli.corpus import (
    ContinuedText,
    CorpusSummary,
    iter_documents,
    read_file,
    readers,
)
from engram_cli.corpus import shards as shards_mod
from engram_cli.corpus.shards import (
    group_shards,
    iter_shard_documents,
    merge_summaries,
    plan_shards,
)
from engram_cli.encode import encode_documents
from engram_cli.ngrams import (
    NgramStats,
    count_ngrams,
    merge_stats,
    order_file,
    write_summary,
)
from engram_cli.vocab import compress_vocab

LINE_CAP = 1 << 18  # MAX_JSON_LINE_BYTES scaled down: the nested line fits under it, the over-long one not
PIECE = 1000  # TEXT_PIECE_BYTES scaled down: the long texts are cut into several pieces
NESTED = b"[" * 100_000 + b"]" * 100_000  # 200 KB, deeper than any interpreter's parser limit
WORDS = "the of and a to in is that for it as was with be by on not he this are or his".split()


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    monkeypatch.setattr(readers, "MAX_JSON_LINE_BYTES", LINE_CAP)
    monkeypatch.setattr(readers, "TEXT_PIECE_BYTES", PIECE)
    monkeypatch.setattr(shards_mod, "PARQUET_MIN_ROWS", 5)


def prose(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def tricky_lines(rng: random.Random) -> list[bytes]:
    """One of each kind of JSON line that once read differently in a shard, twice over."""
    lines = [b"\xef\xbb\xbf" + json.dumps({"text": "first, after a byte-order mark"}).encode()]
    for i in range(2):
        lines += [
            json.dumps({"text": prose(rng, 8), "i": i}).encode(),
            json.dumps({"text": "Ωμέγα, 東京, naïve " + prose(rng, 5)}, ensure_ascii=False).encode(),
            b"",
            b"  \t ",
            json.dumps({"text": "x " * (LINE_CAP // 2 + 1000)}).encode(),  # valid JSON, over the cap
            NESTED,
            b'{"text": "bad \xff\xfe byte ' + prose(rng, 4).encode() + b'"}',
            json.dumps({"other": prose(rng, 4)}).encode(),
            json.dumps({"text": 5}).encode(),
            b"{not json",
            json.dumps({"text": prose(rng, 900)}).encode(),  # ~4 KB: cut into pieces
            b'{"text": "lone \\ud800 surrogate"}',
            json.dumps({"text": prose(rng, 12)}).encode(),
        ]
    return lines


FINAL = {
    "doc": json.dumps({"text": "the last line, with no newline after it"}).encode(),
    "overlong": json.dumps({"text": "y " * (LINE_CAP // 2 + 10)}).encode(),
    "nested": NESTED,
    "blank": b"   ",
}


def write_tricky_jsonl(path: Path, final: str = "doc", seed: int = 0) -> Path:
    path.write_bytes(b"\n".join(tricky_lines(random.Random(seed))) + b"\n" + FINAL[final])
    return path


def write_parquet(path: Path, rows: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    texts = []
    for i in range(rows):
        texts.append(None if i % 9 == 4 else prose(rng, 900 if i % 7 == 3 else rng.randint(0, 15)))
    pl.DataFrame({"text": texts, "n": list(range(rows))}).write_parquet(path, row_group_size=8)
    return path


def tagged(docs) -> list[tuple[bool, str]]:
    """Documents with their cuts: (continues the previous document, text)."""
    return [(isinstance(d, ContinuedText), str(d)) for d in docs]


def whole(paths):
    summary = CorpusSummary()
    docs = tagged(iter_documents(paths, summary=summary))
    return docs, summary


def sharded(paths, shard_bytes):
    first = CorpusSummary()
    planned = plan_shards(paths, shard_bytes=shard_bytes, summary=first)
    docs, parts = [], []
    for shard in planned:
        s = CorpusSummary()
        docs += tagged(iter_shard_documents(shard, summary=s))
        parts.append(s)
    return planned, docs, merge_summaries(first, parts)


# -- JSON lines ---------------------------------------------------------------------------------
@pytest.mark.parametrize("final", sorted(FINAL))
@pytest.mark.parametrize("shard_bytes", [1, 300, 5_000, 150_000, 1 << 30])
def test_jsonl_shards_read_like_the_whole(tmp_path, final, shard_bytes):
    path = write_tricky_jsonl(tmp_path / "t.jsonl", final)
    docs, summary = whole([path])
    planned, sdocs, ssum = sharded([path], shard_bytes)
    if shard_bytes < 1 << 30:
        assert len(planned) > 2 and {s.kind for s in planned} == {"lines"}
    assert sdocs == docs
    assert ssum.to_dict() == summary.to_dict()
    # what the file holds was really met, by both paths
    assert summary.skipped_other[f"JSON line longer than {LINE_CAP} bytes"] == 2 + (final == "overlong")
    assert summary.skipped_other["JSON line nested too deeply"] == 2 + (final == "nested")
    assert summary.invalid_utf8 == 4  # two \xff lines, two lone surrogates
    assert sum(c for c, _ in docs) >= 2  # the long texts were cut into pieces
    assert docs[0] == (False, "first, after a byte-order mark")
    assert summary.documents == 13 + (final == "doc")


def test_jsonl_byte_ranges_cut_anywhere_read_like_the_whole(tmp_path):
    """Ranges cut at arbitrary bytes (mid-line, inside the BOM, inside the nested line): each owns the lines that begin in it."""
    path = write_tricky_jsonl(tmp_path / "t.jsonl")
    docs, summary = whole([path])
    size = path.stat().st_size
    rng = random.Random(3)
    for trial in range(6):
        cuts = sorted({0, size, 1, 2, *(rng.randrange(1, size) for _ in range(3 + 4 * trial))})
        got, parts = [], []
        for a, b in zip(cuts, cuts[1:]):
            s = CorpusSummary()
            got += tagged(read_file(path, summary=s, start=a, stop=b))
            parts.append(s)
        assert got == docs, cuts
        assert CorpusSummary().merge(parts).to_dict() == summary.to_dict(), cuts
    for start in (size - 1, size, size + 5):  # a range at or past the end owns no line
        s = CorpusSummary()
        assert list(read_file(path, summary=s, start=start)) == [] and s == CorpusSummary()


def test_overlong_line_yields_the_same_documents_either_way(tmp_path):
    """The issue's example: with the cap scaled down, one path yielded 2 documents and the other 3."""
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "z " * LINE_CAP, "three"]) + "\n")
    docs, summary = whole([path])
    _, sdocs, ssum = sharded([path], 1)
    assert [d for _, d in docs] == ["one", "three"] == [d for _, d in sdocs]
    assert ssum.to_dict() == summary.to_dict()


def test_nul_byte_past_the_first_block_is_binary_either_way(tmp_path):
    """Binary means a NUL in the first 8 KiB, for every reader (not what one buffered peek returns, often 4 KiB)."""
    lines = [json.dumps({"text": prose(random.Random(i), 6)}) for i in range(400)]
    data = bytearray(("\n".join(lines) + "\n").encode())
    data[6000] = 0
    path = tmp_path / "nul.jsonl"
    path.write_bytes(bytes(data))
    summary = CorpusSummary()
    assert list(readers.read_file(path, summary=summary)) == []
    assert summary.skipped_binary == 1 and summary.files == 0
    _, sdocs, ssum = sharded([path], 1 << 30)
    assert sdocs == [] and ssum.to_dict() == summary.to_dict()


# -- parquet ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard_bytes", [1, 2_000, 20_000, 1 << 30])
def test_parquet_row_shards_read_like_the_whole(tmp_path, shard_bytes):
    path = write_parquet(tmp_path / "p.parquet")
    docs, summary = whole([path])
    planned, sdocs, ssum = sharded([path], shard_bytes)
    if shard_bytes < 20_000:
        assert [s.kind for s in planned].count("rows") > 2
    assert sdocs == docs
    assert ssum.to_dict() == summary.to_dict()
    assert summary.skipped_other  # null rows were there to be counted
    assert sum(c for c, _ in docs) >= 2  # long cells were cut into pieces


def test_parquet_row_ranges_cut_anywhere_read_like_the_whole(tmp_path):
    path = write_parquet(tmp_path / "p.parquet")
    docs, summary = whole([path])
    for cuts in ([0, 1, 60], [0, 7, 8, 9, 33, 59, 60], [0, 30, None]):
        got, parts = [], []
        for a, b in zip(cuts, cuts[1:]):
            s = CorpusSummary()
            got += tagged(read_file(path, summary=s, start=a, stop=b))
            parts.append(s)
        assert got == docs, cuts
        assert CorpusSummary().merge(parts).to_dict() == summary.to_dict(), cuts


# -- end to end: counted in shards, merged ------------------------------------------------------------
def count_pieces(pieces, out: Path, tok, vocab, pad: int) -> NgramStats:
    """A map task's count: the pieces' documents tokenized and counted, the corpus figures in summary.json."""
    summary = CorpusSummary()
    docs = (d for piece in pieces for d in iter_shard_documents(piece, summary=summary))
    ids = encode_documents(docs, tokenizer=tok, vocab=vocab)
    stats = count_ngrams(ids, max_ngram_size=3, pad_id=pad, vocab_size=vocab.compressed_size, out_dir=out)
    summary.tokens = int(stats.summary["tokens"])
    write_summary(out, {**stats.summary, "corpus": summary.to_dict()})
    return NgramStats.open(out)


def test_sharded_count_merges_byte_identical_to_the_whole(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_tricky_jsonl(corpus / "a.jsonl", "overlong")
    write_parquet(corpus / "b.parquet", rows=40, seed=1)
    write_tricky_jsonl(corpus / "c.ndjson", "nested", seed=2)
    (corpus / "d.txt").write_text(prose(random.Random(4), 700))  # plain text: one whole shard
    vocab = compress_vocab(tiny_tokenizer)
    pad = int(vocab.lookup[2])
    _, want = count_corpus([corpus], tokenizer=tiny_tokenizer, vocab=vocab, max_ngram_size=3, pad_id=pad, out_dir=tmp_path / "whole")
    first = CorpusSummary()
    planned = plan_shards([corpus], shard_bytes=2_000, summary=first)
    assert {s.kind for s in planned} == {"lines", "rows", "file"} and len(planned) > 8
    assert first == CorpusSummary()
    groups = group_shards(planned, 2_000)
    parts = [count_pieces(g, tmp_path / f"part{i}", tiny_tokenizer, vocab, pad) for i, g in enumerate(groups)]
    got = merge_stats(parts, tmp_path / "merged")
    assert got.orders == want.orders
    for n in want.orders:
        assert order_file(got.root, n).read_bytes() == order_file(want.root, n).read_bytes(), f"order {n}"
    assert (got.root / "summary.json").read_text() == (want.root / "summary.json").read_text()
