"""Bounded memory on any input (issue 8, item 3) and the input checks of item 4.

Long documents are read and tokenized in pieces (`corpus.iter_pieces`, `ContinuedText`)
and counted as one document (`ngrams.ContinuedIds`). The expected figures here come
from an independent route: the whole text tokenized in one call and counted as one
array by `count_ngrams`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_cli.corpus import readers as corpus_mod
from engram_cli.pipeline.count import count_corpus
from engram_cli.corpus import ContinuedText, CorpusSummary, corpus_files, iter_documents, iter_pieces, safe_cut, split_text
from engram_cli.errors import CorpusError, VocabMismatch
from engram_cli.ngrams import ContinuedIds, count_ngrams, order_file, token_columns
from engram_cli.vocab import check_vocab_file_size

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
ENGRAM = [sys.executable, "-m", "engram_cli.cli"]


@pytest.fixture(scope="module")
def deepseek(deepseek_tokenizer, deepseek_vocab):
    return deepseek_tokenizer, deepseek_vocab  # the session's (conftest.py): loaded and compressed once


def fixture_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(FIXTURE.rglob("*")) if p.is_file()]


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def ids_of(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def frames(stats_root: Path, orders) -> dict[int, pl.DataFrame]:
    return {n: pl.read_parquet(order_file(stats_root, n)).sort(token_columns(n)) for n in orders}


# -- cutting -----------------------------------------------------------------------------------
@pytest.mark.parametrize("piece_bytes", [257, 4096])
def test_pieces_tokenize_like_the_whole_text(deepseek, piece_bytes):
    tok, _ = deepseek
    texts = fixture_texts()[:6]
    texts = texts + [one_line(t) for t in texts] + ["x  y\n\n  z\t\u00a0w " * 300, "12345 67890 " * 200 + "caf\u00e9 \u4e2d\u6587 \U0001f600 " * 100]
    for text in texts:
        data = text.encode()
        pieces = list(iter_pieces([data[i : i + 1000] for i in range(0, len(data), 1000)], piece_bytes))
        assert b"".join(pieces) == data
        assert all(len(p) <= piece_bytes for p in pieces)
        if len(data) > 2 * piece_bytes:
            assert len(pieces) >= 2
        whole = ids_of(tok, [text])[0]
        pieced = [i for ids in ids_of(tok, [p.decode() for p in pieces]) for i in ids]
        assert pieced == whole


_TRICKY = [" ", "  ", "\n", "\r\n", "\n\n", "\t", "\u00a0", "\u3000", "a", "Word", "caf\u00e9", "e\u0301", "123", "4567", ".", "!!", "(x", "'s", "-", "\u4e2d\u6587", "\u3042", "\U0001f600", "\u0416\u0438", "_", "\\n"]


def rule_cuts(text: str) -> list[int]:
    """Character offsets where the cut rule of `corpus.safe_cut` holds, restated on characters."""
    return [i for i in range(1, len(text)) if (text[i] == " " and not text[i - 1].isspace()) or (text[i - 1] == "\n" and not text[i].isspace())]


@given(parts=st.lists(st.sampled_from(_TRICKY), min_size=1, max_size=200), piece_bytes=st.integers(8, 64))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_cuts_by_the_rule_never_change_the_tokens(deepseek, parts, piece_bytes):
    tok, _ = deepseek
    text = "".join(parts)
    cuts = rule_cuts(text)
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]  # cut at every such point at once
    assert [i for ids in ids_of(tok, pieces) for i in ids] == ids_of(tok, [text])[0]
    data = text.encode()
    got = list(iter_pieces([data], piece_bytes))
    assert b"".join(got) == data and all(len(g) <= piece_bytes for g in got)
    safe_at = {len(text[:c].encode()) for c in cuts}
    offsets = list(itertools.accumulate(len(g) for g in got))[:-1]
    starts = [0, *offsets]
    for start, end in zip(starts, offsets):  # a fallback cut only where the piece's window had no rule cut
        window = {c for c in safe_at if start < c <= start + piece_bytes}
        assert end in safe_at or not window


def test_text_without_a_safe_cut_is_cut_at_a_character_boundary():
    text = "\u4e2d\u6587" * 5000  # CJK with no space or newline: no pre-token boundary to find
    assert safe_cut(text.encode()) is None
    pieces = list(split_text(text, 1000))
    assert len(pieces) > 10 and all(len(p.encode()) <= 1000 for p in pieces)
    assert "".join(pieces) == text
    assert not isinstance(pieces[0], ContinuedText) and all(isinstance(p, ContinuedText) for p in pieces[1:])


# -- counting pieces as one document ----------------------------------------------------------------
def whole_stats(tok, vocab, texts: list[str], out: Path, max_n: int, pad: int):
    docs = [vocab.compress(np.asarray(ids, dtype=np.int64)) for ids in ids_of(tok, texts)]
    return count_ngrams(docs, max_ngram_size=max_n, pad_id=pad, vocab_size=vocab.compressed_size, out_dir=out)


def test_one_line_file_read_in_pieces_counts_like_the_whole_document(deepseek, tmp_path, monkeypatch):
    tok, vocab = deepseek
    pad = int(vocab.lookup[2])
    texts = fixture_texts()
    big = one_line(" ".join(texts[:8]))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a-one-line.txt").write_text(big)
    (corpus / "b.txt").write_text(texts[9])  # a second document: no window crosses into it
    monkeypatch.setattr(corpus_mod, "TEXT_PIECE_BYTES", 5000)
    summary = CorpusSummary()
    pieces = list(iter_documents([corpus], summary=summary))
    assert sum(isinstance(p, ContinuedText) for p in pieces) > 20
    assert summary.documents == 2 and summary.bytes == len(big.encode()) + len(texts[9].encode())

    got_summary, got = count_corpus([corpus], tokenizer=tok, vocab=vocab, max_ngram_size=4, pad_id=pad, out_dir=tmp_path / "got", memory_limit=8 << 20)
    want = whole_stats(tok, vocab, [big, texts[9]], tmp_path / "want", 4, pad)
    assert got_summary.documents == 2 and got.summary["documents"] == 2
    assert got.summary["tokens"] == want.summary["tokens"] == got_summary.tokens
    for n in (2, 3, 4):
        assert got.order_summary(n) == want.order_summary(n)
    gf, wf = frames(got.root, (2, 3, 4)), frames(want.root, (2, 3, 4))
    for n in (2, 3, 4):
        assert gf[n].equals(wf[n])


def test_continued_ids_carry_context_across_tiny_pieces(tmp_path):
    rng = np.random.default_rng(0)
    doc = rng.integers(0, 50, size=5000)
    cuts = np.sort(rng.choice(np.arange(1, doc.size), size=400, replace=False))  # pieces of 1 token included
    parts = np.split(doc, cuts)
    pieces = [parts[0]] + [p.view(ContinuedIds) for p in parts[1:]] + [doc[:7]]
    got = count_ngrams(pieces, max_ngram_size=5, pad_id=3, vocab_size=50, out_dir=tmp_path / "got", memory_limit=1 << 20)
    want = count_ngrams([doc, doc[:7]], max_ngram_size=5, pad_id=3, vocab_size=50, out_dir=tmp_path / "want")
    assert got.summary["documents"] == want.summary["documents"] == 2
    for n in range(2, 6):
        assert frames(got.root, [n])[n].equals(frames(want.root, [n])[n])


def counter_windows(docs: list[np.ndarray], n: int, pad: int) -> dict[tuple[int, ...], int]:
    """Every window of order n, the obvious way: n-1 pads on the left of each document, a Python Counter."""
    from collections import Counter

    c: Counter = Counter()
    for doc in docs:
        padded = [pad] * (n - 1) + doc.tolist()
        c.update(tuple(padded[i : i + n]) for i in range(doc.size))
    return c


def test_sorted_runs_merge_and_spill_to_the_exact_counts(tmp_path, monkeypatch):
    """One-word orders are counted by sorting: per-batch sorted runs, merged in memory
    (`_merge_runs`) and spilled to disk under a small limit. Tiny batches, at most 3
    runs held and a 1 MiB limit make every path run; the counts must equal a Counter's."""
    import engram_cli.ngrams.count as ngrams_mod

    merges = []
    real_merge = ngrams_mod._merge_runs
    monkeypatch.setattr(ngrams_mod, "_merge_runs", lambda runs: merges.append(len(runs)) or real_merge(runs))
    monkeypatch.setattr(ngrams_mod, "MAX_BATCH_TOKENS", 700)
    monkeypatch.setattr(ngrams_mod, "MAX_SORTED_RUNS", 3)
    rng = np.random.default_rng(11)
    vocab_size, pad = 5000, 4999  # 13 bits an id: orders 2..4 pack into one word, order 5 takes two
    docs = [np.minimum(rng.zipf(1.3, size=int(rng.integers(0, 3000))), vocab_size - 1) - 1 for _ in range(60)]
    ranges = []
    got = count_ngrams(
        docs, max_ngram_size=5, pad_id=pad, vocab_size=vocab_size, out_dir=tmp_path / "got", memory_limit=1 << 20,
        progress=lambda stage, done, total=None, detail="": ranges.append(total) if stage == "merging" else None,
    )
    assert len(merges) > 10 and max(merges) >= 3, "runs should have been merged in memory"
    assert max(ranges) > 1, "the 1 MiB limit should have spilled runs and merged them by key range"
    assert list((tmp_path / "got").glob(".engram-spill-*")) == []
    tokens = sum(d.size for d in docs)
    for n in range(2, 6):
        want = counter_windows(docs, n, pad)
        frame = pl.read_parquet(order_file(got.root, n))
        cols = token_columns(n)
        assert frame.equals(frame.sort(cols)), f"order {n} is not in text order"
        assert dict(zip(frame.select(cols).iter_rows(), frame.get_column("count").to_list())) == want, f"order {n}"
        assert got.order_summary(n)["windows"] == tokens and got.order_summary(n)["distinct"] == len(want)
        assert got.order_summary(n)["singletons"] == sum(1 for c in want.values() if c == 1)


# -- JSON lines ---------------------------------------------------------------------------------
def test_jsonl_long_text_is_split_and_counted_whole(deepseek, tmp_path, monkeypatch):
    tok, vocab = deepseek
    pad = int(vocab.lookup[2])
    text = fixture_texts()[3]
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short one"}) + "\n")
    monkeypatch.setattr(corpus_mod, "TEXT_PIECE_BYTES", 3000)
    summary, got = count_corpus([tmp_path / "c.jsonl"], tokenizer=tok, vocab=vocab, max_ngram_size=3, pad_id=pad, out_dir=tmp_path / "got")
    want = whole_stats(tok, vocab, [text, "short one"], tmp_path / "want", 3, pad)
    assert summary.documents == 2
    for n in (2, 3):
        assert frames(got.root, [n])[n].equals(frames(want.root, [n])[n])


def test_overlong_and_deeply_nested_json_lines_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "MAX_JSON_LINE_BYTES", 1000)
    lines = [
        json.dumps({"text": "first"}),
        json.dumps({"text": "x " * 5000}),  # 10 kB: longer than the limit, read past in blocks
        "[" * 450 + "]" * 450,  # 900 bytes, nested 450 deep
        "[" * 1500 + "]" * 1500,  # too long: skipped for its length before it is parsed
        json.dumps({"text": "last"}),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)  # the parser's depth limit, so 450 levels fail like 10**6 would
    try:
        summary = CorpusSummary()
        docs = list(iter_documents([tmp_path / "c.jsonl"], summary=summary))
    finally:
        sys.setrecursionlimit(limit)
    assert docs == ["first", "last"]
    assert summary.skipped_other == {"JSON line longer than 1000 bytes": 2, "JSON line nested too deeply": 1}
    assert summary.skipped_examples["JSON line nested too deeply"].endswith("c.jsonl:3")
    assert summary.skipped_examples["JSON line longer than 1000 bytes"].endswith("c.jsonl:2")


def test_deeply_nested_json_line_at_the_default_limits(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n' + "[" * 1_000_000 + "]" * 1_000_000 + "\n" + '{"text": "after"}\n')
    summary = CorpusSummary()
    assert list(iter_documents([tmp_path / "c.jsonl"], summary=summary)) == ["ok", "after"]
    assert summary.skipped_other == {"JSON line nested too deeply": 1}


# -- FIFOs and devices ------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_or_device_as_corpus_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        if not path.exists():
            continue
        with pytest.raises(CorpusError, match="not a regular file or directory"):
            corpus_files([path])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("text")
    os.mkfifo(tmp_path / "d" / "b.txt")  # inside a directory: left out, as before
    assert corpus_files([tmp_path / "d"]) == [tmp_path / "d" / "a.txt"]
    r = subprocess.run([*ENGRAM, "build-table", str(fifo), "-o", str(tmp_path / "t.zarr")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "not a regular file" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.zarr").exists()


# -- --vocab size, from the .npy headers ------------------------------------------------------------
def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_vocab_that_would_decompress_to_600m_entries_is_refused_from_its_headers(deepseek, tmp_path):
    tok, vocab = deepseek
    good = vocab.save(tmp_path / "good.npz")
    check_vocab_file_size(good, tok.vocab_size)  # the real one passes
    bomb = tmp_path / "bomb.npz"
    zeros = np.zeros(1 << 20, dtype=np.int64).tobytes()
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            if info.filename != "lookup.npy":
                z.writestr(info.filename, src.read(info.filename))
        with z.open("lookup.npy", "w", force_zip64=True) as f:  # 600 M entries declared; 64 MiB of them stored
            f.write(npy_header((600_000_000,), "<i8"))
            for _ in range(8):
                f.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(VocabMismatch, match=rf"shape \(600000000,\).*has {tok.vocab_size} ids"):
        check_vocab_file_size(bomb, tok.vocab_size)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world")
    code = (
        "import resource, subprocess, sys; "
        f"r = subprocess.run({[*ENGRAM, 'build-table', str(corpus), '--vocab', str(bomb), '-o', str(tmp_path / 't.zarr')]!r}, capture_output=True, text=True); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr, file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, maxrss_kib = map(int, r.stdout.split())
    assert rc == 2, r.stderr
    assert "lookup array of shape (600000000,)" in r.stderr and "Traceback" not in r.stderr
    assert maxrss_kib < 1_500_000  # inflating the array alone would take 4.8 GB
    assert not (tmp_path / "t.zarr").exists()


# -- a 100 MB one-line document: RSS bound and exact counts --------------------------------------------
def test_build_on_a_100mb_one_line_file_has_bounded_rss_and_exact_counts(deepseek, tmp_path):
    """`engram build-table` on one 100+ MB line of real text, in a subprocess.

    The file is a unit U of real text (the fixtures on one line) repeated R times,
    joined by spaces. Expected counts, by an independent route: tokenizing U and
    U + " " + U whole gives the counts C(1) and C(2); since the tokens of every
    repeat after the first are the same and longer than the n-gram context,
    C(R) = C(1) + (R - 1) * (C(2) - C(1)).
    """
    tok, vocab = deepseek
    pad = int(vocab.lookup[2])
    unit = one_line(" ".join(fixture_texts()))
    repeats = -(-100_000_000 // (len(unit.encode()) + 1))
    path = tmp_path / "one-line.txt"
    with open(path, "w", encoding="utf-8") as f:
        f.write(unit)
        for _ in range(repeats - 1):
            f.write(" " + unit)
    size = path.stat().st_size
    assert size >= 100_000_000
    out = tmp_path / "t.zarr"
    limit = 1 << 30  # batches big enough to keep the tokenizer threads busy (the test stays fast)
    cmd = [*ENGRAM, "build-table", str(path), "-o", str(out), "--max-ngram", "2", "--layers", "1", "--heads", "2", "--dim", "8", "--rows-per-head", "1009", "--memory-limit", str(limit), "--json"]
    code = (
        "import resource, subprocess, sys; "
        f"r = subprocess.run({cmd!r}, capture_output=True, text=True); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stdout); print(r.stderr[-2000:], file=sys.stderr)"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    finally:
        path.unlink()
    head, _, report = r.stdout.partition("\n")
    rc, maxrss_kib = map(int, head.split())
    assert rc == 0, r.stderr
    # The whole document held and tokenized at once took ~110 bytes per input byte (11 GB here).
    assert maxrss_kib * 1024 < limit + (768 << 20), (maxrss_kib, r.stderr)

    c1 = whole_stats(tok, vocab, [unit], tmp_path / "c1", 2, pad)
    c2 = whole_stats(tok, vocab, [unit + " " + unit], tmp_path / "c2", 2, pad)
    cols = token_columns(2)
    f1, f2 = frames(c1.root, [2])[2], frames(c2.root, [2])[2]
    per_repeat = f2.join(f1, on=["order", *cols], how="left").select("order", *cols, (pl.col("count") - pl.col("count_right").fill_null(0)).alias("d"))
    want = (
        per_repeat.join(f1, on=["order", *cols], how="full", coalesce=True)
        .select("order", *cols, (pl.col("count").fill_null(0) + (repeats - 1) * pl.col("d").fill_null(0)).cast(pl.UInt64).alias("count"))
        .filter(pl.col("count") > 0)
        .sort(cols)
    )
    got = frames(out / "stats", [2])[2]
    assert got.equals(want)
    stats = json.loads((out / "stats" / "summary.json").read_text())
    assert stats["documents"] == 1 and stats["corpus"]["bytes"] == size
    assert stats["tokens"] == c1.summary["tokens"] + (repeats - 1) * (c2.summary["tokens"] - c1.summary["tokens"])
