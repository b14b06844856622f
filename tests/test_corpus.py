"""Corpus reading, tokenization and the count_corpus pipeline."""

from __future__ import annotations

import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zstandard

from engram_cli.corpus import ContinuedText, CorpusSummary, corpus_files, iter_documents
from engram_cli.pipeline.count import count_corpus
from engram_cli.encode import encode_batch, encode_documents
from engram_cli.errors import CorpusError
from engram_cli.ngrams import order_file, token_columns
from engram_cli.vocab import compress_vocab, load_tokenizer

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


@pytest.fixture(scope="module")
def deepseek():
    tok = load_tokenizer()
    return tok, compress_vocab(tok)


def read_all(paths, **kw) -> tuple[list[str], CorpusSummary]:
    """The documents, each piece (`ContinuedText`) joined back onto its document."""
    summary = CorpusSummary()
    docs: list[str] = []
    for piece in iter_documents(paths, summary=summary, **kw):
        if isinstance(piece, ContinuedText):
            docs[-1] += piece
        else:
            docs.append(piece)
    return docs, summary


# -- reading ---------------------------------------------------------------------------------
def test_directory_order_is_sorted_and_skips_hidden(tmp_path):
    for rel in ["b/z.txt", "b/a.md", "a.rst", "c/d/e.py", ".git/config", "b/.hidden.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    files = corpus_files([tmp_path])
    assert [str(p.relative_to(tmp_path)) for p in files] == ["a.rst", "b/a.md", "b/z.txt", "c/d/e.py"]
    docs, summary = read_all([tmp_path])
    assert docs == ["a.rst", "b/a.md", "b/z.txt", "c/d/e.py"]
    assert (summary.files, summary.documents, summary.bytes) == (4, 4, sum(len(d) for d in docs))


def test_fixture_corpus_reads_as_one_document_per_file():
    docs, summary = read_all([FIXTURE])
    files = sorted(p for p in FIXTURE.rglob("*") if p.is_file())
    assert summary.documents == summary.files == len(files) >= 30
    assert summary.bytes == sum(p.stat().st_size for p in files)
    assert 2_000_000 <= summary.bytes <= 4_500_000
    assert summary.invalid_utf8 == summary.skipped_binary == 0
    assert sorted(docs) == sorted(p.read_text(encoding="utf-8") for p in files)


def test_jsonl_parquet_and_compressed_inputs(tmp_path):
    texts = [f"document {i}: caf\u00e9 \u2014 {'x' * (i % 7)}" for i in range(5000)]
    rows = [{"text": t, "id": i} for i, t in enumerate(texts)]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "a.jsonl").write_text(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "c.ndjson.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pl.DataFrame({"id": range(len(texts)), "text": texts}).write_parquet(tmp_path / "d.parquet", row_group_size=1000)
    (tmp_path / "e.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress((tmp_path / "d.parquet").read_bytes()))
    (tmp_path / "f.txt.gz").write_bytes(gzip.compress("plain gz".encode()))
    (tmp_path / "g.md.zst").write_bytes(zstandard.ZstdCompressor().compress("plain zst".encode()))
    docs, summary = read_all([tmp_path])
    assert docs == texts * 5 + ["plain gz", "plain zst"]
    assert summary.files == 7 and summary.documents == 5 * len(texts) + 2
    assert summary.bytes == 5 * sum(len(t.encode()) for t in texts) + len("plain gz") + len("plain zst")


def test_text_field_and_skipped_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "one"}\n{"text": "wrong field"}\nnot json\n\n{"body": 3}\n{"body": "two"}\n')
    docs, summary = read_all([path], text_field="body")
    assert docs == ["one", "two"]
    assert summary.skipped_other == {"JSON line without field 'body'": 1, "JSON line that does not parse": 1, "JSON line whose 'body' is not a string": 1}
    assert summary.skipped_examples["JSON line that does not parse"] == f"{path}:3"


def test_parquet_without_the_column_is_a_clear_error(tmp_path):
    pl.DataFrame({"content": ["a"]}).write_parquet(tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match=r"has no column 'text' \(columns: content\); pass --text-field"):
        read_all([tmp_path])


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    (tmp_path / "good.txt").write_text("fine \ufffd already here")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a\xff"}\n{"text": "lone \\ud800 surrogate"}\n{"text": "fine"}\n')
    docs, summary = read_all([tmp_path])
    assert docs[0] == "a\ufffd" and docs[1] == "lone \ufffd surrogate" and docs[2] == "fine"
    assert docs[3] == b"caf\xe9 ok \xff\xfe end".decode("utf-8", "replace")
    assert docs[4] == "fine \ufffd already here"
    assert summary.invalid_utf8 == 3  # two JSON lines and one file; a genuine U+FFFD is not counted


def test_binary_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "late-nul.txt").write_bytes(b"a" * 9000 + b"\x00")  # NUL past the sniffed 8 KiB: text
    (tmp_path / "text.txt").write_text("words")
    (tmp_path / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    docs, summary = read_all([tmp_path])
    assert docs == ["a" * 9000 + "\x00", "words"]
    assert summary.skipped_binary == 1 and summary.files == 2
    assert summary.skipped_other == {"corrupt or truncated compressed file": 1}


def test_missing_path_and_empty_corpus(tmp_path):
    with pytest.raises(CorpusError, match="does not exist; pass an existing file or directory") as e:
        read_all([tmp_path / "nope"])
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="has no files"):
        read_all([tmp_path / "empty"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.dat").write_bytes(b"\x00\x01")
    with pytest.raises(CorpusError, match="has no documents: 1 binary files skipped"):
        read_all([tmp_path / "bin"])
    (tmp_path / "j.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"JSON line without field 'text'.*--text-field"):
        read_all([tmp_path / "j.jsonl"])


def _earlier_store(path: Path) -> None:
    """An earlier build's output, as a real Zarr v3 group with parquet stats inside."""
    import zarr

    root = zarr.create_group(store=str(path), zarr_format=3)
    root.create_array("table_0", shape=(64, 4), chunks=(16, 4), dtype="float32")[:] = 1.0
    (path / "stats").mkdir()
    pl.DataFrame({"order": [2], "tok_0": [1], "tok_1": [2], "count": [3]}).write_parquet(path / "stats" / "order_2.parquet")
    (path / "stats" / "summary.json").write_text("{}")


def test_table_stores_in_the_corpus_are_pruned_and_counted(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("alpha")
    (corpus / "sub" / "b.txt").write_text("beta")
    _earlier_store(corpus / "tables.zarr")
    _earlier_store(corpus / "sub" / "other.zarr.old-123")  # a store moved aside by finalize
    (corpus / "tables.zarr.partial").mkdir()  # a build's (empty) staging directory
    (corpus / "run.partial" / "stats").mkdir(parents=True)  # `--out run` staging, stats only
    (corpus / "run.partial" / "stats" / "x.txt").write_text("not corpus")
    (corpus / "notes.partial").mkdir()  # just a name: no stats, no zarr.json -> corpus
    (corpus / "notes.partial" / "c.txt").write_text("gamma")
    (corpus / "v2").mkdir()
    (corpus / "v2" / ".zgroup").write_text('{"zarr_format": 2}')
    (corpus / "v2" / "0.0").write_text("chunk")

    want = {corpus / "a.txt", corpus / "notes.partial" / "c.txt", corpus / "sub" / "b.txt"}
    assert set(corpus_files([corpus])) == want
    docs, summary = read_all([corpus])
    assert sorted(docs) == ["alpha", "beta", "gamma"]
    pruned = {"tables.zarr", "tables.zarr.partial", "run.partial", "v2", "sub/other.zarr.old-123"}
    assert summary.skipped == len(pruned) and summary.files == 3
    (reason, n), = summary.skipped_other.items()
    assert n == len(pruned) and "Zarr" in reason
    assert Path(summary.skipped_examples[reason]).relative_to(corpus).as_posix() in pruned


def test_naming_a_table_store_as_corpus_is_an_error(tmp_path):
    _earlier_store(tmp_path / "tables.zarr")
    (tmp_path / "out.zarr.partial").mkdir()
    for path, what in [
        (tmp_path / "tables.zarr", "is a table store"),
        (tmp_path / "tables.zarr" / "stats", "lies inside the table store"),
        (tmp_path / "tables.zarr" / "stats" / "order_2.parquet", "lies inside the table store"),
        (tmp_path / "out.zarr.partial", "is a table store"),
    ]:
        with pytest.raises(CorpusError, match=f"{what}.*not a corpus") as e:
            corpus_files([path])
        assert "\n" not in str(e.value)


def test_count_corpus_next_to_an_earlier_store(deepseek, tmp_path):
    """`build-table . --force` in a directory holding tables.zarr: the store is not read."""
    tok, vocab = deepseek
    (tmp_path / "doc.txt").write_text("The quick brown fox jumps over the lazy dog. The quick brown fox.")
    _earlier_store(tmp_path / "tables.zarr")
    (tmp_path / "tables.zarr.partial").mkdir()  # what prepare_partial leaves before counting
    pad = int(vocab.lookup[2])
    summary, stats = count_corpus(
        [tmp_path], tokenizer=tok, vocab=vocab, max_ngram_size=3, pad_id=pad, out_dir=tmp_path / "tables.zarr.partial" / "stats",
    )
    doc = vocab.compress(tok.tokenizer.encode((tmp_path / "doc.txt").read_text(), add_special_tokens=False).ids).tolist()
    assert (summary.files, summary.documents, summary.tokens) == (1, 1, len(doc))
    for n in (2, 3):
        padded = [pad] * (n - 1) + doc
        want = Counter(tuple(padded[i : i + n]) for i in range(len(doc)))
        df = pl.read_parquet(order_file(stats.root, n))
        assert dict(zip(df.select(token_columns(n)).iter_rows(), df["count"].to_list())) == dict(want)


# -- tokenizing --------------------------------------------------------------------------------
def test_encode_documents_matches_encode(deepseek):
    tok, vocab = deepseek
    texts = [p.read_text() for p in sorted((FIXTURE / "debian-policy").glob("*.rst"))[:6]] + ["", "x"]
    want = [vocab.compress(tok.tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]
    for background in (True, False):
        got = list(encode_documents(iter(texts), tokenizer=tok, vocab=vocab, batch_size=3, background=background))
        assert len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want))
    special = encode_batch(["hello world"], tok, vocab, add_special_tokens=True)[0]
    assert np.array_equal(special, vocab.compress(tok.tokenizer.encode("hello world", add_special_tokens=True).ids))
    raw = encode_batch(["hello world"], tok, None)[0]
    assert raw.tolist() == tok.tokenizer.encode("hello world", add_special_tokens=False).ids


def test_background_errors_reach_the_consumer(deepseek):
    tok, vocab = deepseek

    def docs():
        yield "fine"
        raise CorpusError("boom")

    with pytest.raises(CorpusError, match="boom"):
        list(encode_documents(docs(), tokenizer=tok, vocab=vocab, batch_size=1))


# -- the pipeline --------------------------------------------------------------------------------
def test_count_corpus_matches_counter(deepseek, tmp_path):
    tok, vocab = deepseek
    corpus = tmp_path / "corpus"
    shutil.copytree(FIXTURE / "developers-reference", corpus / "dev")
    (corpus / "extra.jsonl.gz").write_bytes(gzip.compress(b'{"text": "Hello there."}\n{"text": ""}\n'))
    (corpus / "blob.bin").write_bytes(b"\x00" * 10)
    pad = int(vocab.lookup[2])
    events = Counter()
    summary, stats = count_corpus(
        [corpus], tokenizer=tok, vocab=vocab, max_ngram_size=4, pad_id=pad, out_dir=tmp_path / "stats",
        memory_limit=8 << 20, batch_size=4, progress=lambda stage, done, total=None, detail="": events.update([stage]),
    )
    texts = [p.read_text() for p in sorted((corpus / "dev").glob("*.rst"))] + ["Hello there.", ""]
    docs = [vocab.compress(tok.tokenizer.encode(t, add_special_tokens=False).ids).tolist() for t in texts]
    tokens = sum(map(len, docs))
    assert (summary.files, summary.documents, summary.skipped_binary, summary.tokens) == (len(texts) - 1, len(texts), 1, tokens)
    assert set(events) == {"reading", "tokenizing", "counting", "merging"}
    on_disk = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert on_disk == stats.summary and on_disk["corpus"] == summary.to_dict() and on_disk["documents"] == len(texts)
    for n in (2, 3, 4):
        want = Counter()
        for doc in docs:
            padded = [pad] * (n - 1) + doc
            want.update(tuple(padded[i : i + n]) for i in range(len(doc)))
        df = pl.read_parquet(order_file(stats.root, n))
        got = dict(zip(df.select(token_columns(n)).iter_rows(), df["count"].to_list()))
        assert got == dict(want), f"order {n} differs"
        assert stats.total(n) == tokens


def test_count_corpus_without_tokens_is_an_error(deepseek, tmp_path):
    tok, vocab = deepseek
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match=r"1 documents\) has no tokens"):
        count_corpus([tmp_path / "c"], tokenizer=tok, vocab=vocab, max_ngram_size=3, pad_id=2, out_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "summary.json").exists()
    with pytest.raises(CorpusError, match="does not exist"):
        count_corpus([tmp_path / "missing"], tokenizer=tok, vocab=vocab, max_ngram_size=3, pad_id=2, out_dir=tmp_path / "out")


def test_bom_is_stripped_before_counting(deepseek, tmp_path):
    """A UTF-8 BOM at the head of a text file is not text: same n-grams with and without it."""
    tok, vocab = deepseek
    text = (FIXTURE / "developers-reference" / "scope.rst").read_bytes()
    assert not text.startswith(b"\xef\xbb\xbf")
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain" / "a.txt").write_bytes(text)
    (tmp_path / "bom" / "a.txt").write_bytes(b"\xef\xbb\xbf" + text)
    pad = int(vocab.lookup[2])
    got = {}
    for name in ("plain", "bom"):
        summary, stats = count_corpus([tmp_path / name], tokenizer=tok, vocab=vocab, max_ngram_size=3, pad_id=pad, out_dir=tmp_path / f"{name}-stats")
        got[name] = (summary.bytes, summary.tokens, {n: pl.read_parquet(order_file(stats.root, n)) for n in (2, 3)})
    assert got["bom"][0] == got["plain"][0] == len(text)
    assert got["bom"][1] == got["plain"][1]
    for n in (2, 3):
        assert got["bom"][2][n].equals(got["plain"][2][n]), f"order {n} differs with a BOM"
    # The BOM would otherwise tokenize: the test can fail.
    assert len(tok.tokenizer.encode("\ufeff" + text.decode()[:50]).ids) != len(tok.tokenizer.encode(text.decode()[:50]).ids)
