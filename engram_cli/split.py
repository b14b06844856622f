"""The held-out split: which text is held out, the record a checkpoint pins, and its re-derivation at eval.

Two ways to hold text out (`engram train --split`):

- `document` (the default): whole documents, by a hash of "file path relative to the
  corpus root:document index within the file", so adding, removing or renaming another
  file never moves a document between the splits;
- `segment`: segments of SEGMENT_TOKENS tokens, by a hash of "document index:segment
  index" (the document's index in the whole corpus), the split of checkpoints made
  before the record existed: a corpus of a few long documents still gets a held-out share.

Training records what it held out (`split_record`): each held-out document (or segment)
by file, document index and segment, with a digest of its token ids, and a sha256 of
the whole held-out token stream. Eval (`pinned_heldout`) reads and tokenizes only those
documents, and refuses (`SplitError`) when one is gone or its text changed.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import closing
from pathlib import Path

import numpy as np
import xxhash

from engram_cli.corpus import (
    CorpusSummary,
    corpus_files,
    empty_corpus_message,
    read_file,
)
from engram_cli.corpus.readers import TEXT_PIECE_BYTES
from engram_cli.encode import encode_documents
from engram_cli.errors import CorpusError, SplitError
from engram_cli.ngrams import ContinuedIds
from engram_cli.pipeline.count import identity_check_for

HELDOUT_SHARE = 0.1
SEGMENT_TOKENS = 2048  # `--split segment`: the held-out unit (a few long documents still split)
MAX_TRAIN_TOKENS = 4_000_000  # training reads at most this many tokens (a TB corpus is sampled, never loaded)
MAX_HELDOUT_TOKENS = 200_000
SPLIT_BATCH_CHARS = 1 << 20  # characters per tokenizer batch (a few batches are encoded ahead)
SPLITS = ("document", "segment")
RECORD_VERSION = 1


def is_heldout(doc_key: str, share: float = HELDOUT_SHARE, seed: int = 0) -> bool:
    """Deterministic held-out membership by a hash of the document key."""
    return xxhash.xxh64_intdigest(doc_key.encode(), seed=seed) % 10_000 < int(share * 10_000)


def ids_digest(ids: np.ndarray) -> str:
    """sha256 (hex) of token ids as little-endian int64."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def corpus_root(corpus) -> Path:
    """The folder document paths are relative to: the corpus folder, or a corpus file's folder."""
    p = Path(corpus).resolve()
    return p if p.is_dir() else p.parent


def keyed_documents(corpus, keys: list):
    """Yield the corpus' documents in reading order, appending (relative path, index in file) to `keys` for each."""
    root, summary, n = corpus_root(corpus), CorpusSummary(), 0
    files = corpus_files([corpus], summary)
    for path in files:
        rel = Path(os.path.relpath(Path(path).resolve(), root)).as_posix()
        for j, text in enumerate(read_file(Path(path), summary=summary)):
            keys.append((rel, j))
            n += 1
            yield text
    if n == 0:
        raise CorpusError(empty_corpus_message(files, summary))


def _encode(texts, tokenizer):
    return encode_documents(texts, tokenizer=tokenizer, vocab=None, batch_chars=SPLIT_BATCH_CHARS, add_special_tokens=True,
                            check=identity_check_for(tokenizer))


def read_split(corpus, tokenizer, *, share: float = HELDOUT_SHARE, max_train: int = MAX_TRAIN_TOKENS, max_heldout: int = MAX_HELDOUT_TOKENS,
               progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout) streams by the segment rule, without entries: --corpus text (share 1.0), checkpoints without a record."""
    train, held, _ = split_corpus(corpus, tokenizer, split="legacy", share=share, max_train=max_train, max_heldout=max_heldout, progress=progress)
    return train, held


def split_corpus(corpus, tokenizer, *, split: str = "document", share: float = HELDOUT_SHARE, max_train: int = MAX_TRAIN_TOKENS,
               max_heldout: int = MAX_HELDOUT_TOKENS, progress=None):
    """Tokenize documents in order into (train, heldout) int64 streams, each capped, and the held-out entries.

    `split`: "document", "segment" (see the module docstring) or "legacy" (the segment
    rule; `read_split`). Reading stops
    once both streams are full. Texts are encoded in batches by the tokenizer's engine
    (`encode.encode_documents`, special tokens added); with a fast engine a sample is
    checked against the reference (`engines.IdentityCheck`). Entries: one dict per held-out
    document or segment, in stream order: `file`, `document`, `segment` (null for a
    whole document), `tokens`, `sha256` (of its ids).
    """
    train, held, entries = [], [], []
    n_train = n_held = 0
    keys: list = []
    with closing(_encode(keyed_documents(corpus, keys), tokenizer)) as texts:  # stops the encoding threads when both streams are full
        n_docs = 0  # documents as build-table counts them (a file of text, a record); long ones are read as several pieces
        for i, ids in enumerate(texts):
            if n_held >= max_heldout and n_train >= max_train:
                break
            n_docs += not isinstance(ids, ContinuedIds)
            ids = np.asarray(ids, dtype=np.int64)
            rel, j = keys[i]
            if split == "document":
                pieces = [(None, ids, is_heldout(f"{rel}:{j}", share))]
            else:
                pieces = [(s // SEGMENT_TOKENS, ids[s : s + SEGMENT_TOKENS], is_heldout(f"{i}:{s // SEGMENT_TOKENS}", share))
                          for s in range(0, len(ids), SEGMENT_TOKENS)]
            for seg, piece, out in pieces:
                if out:
                    if n_held < max_heldout:
                        held.append(piece)
                        n_held += len(piece)
                        if split != "legacy":
                            entries.append({"file": rel, "document": j, "segment": seg, "tokens": int(len(piece)), "sha256": ids_digest(piece)})
                elif n_train < max_train:
                    train.append(piece)
                    n_train += len(piece)
            if progress is not None:
                progress("tokenize", n_train + n_held, None, f"{n_docs} documents" + (f", read as {i + 1} pieces of up to {TEXT_PIECE_BYTES >> 10} KiB" if i + 1 != n_docs else ""))
    cat = lambda xs, cap: np.concatenate(xs)[:cap] if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(train, max_train), cat(held, max_heldout), entries


def split_record(corpus, split: str, share: float, held: np.ndarray, entries: list) -> dict:
    """The checkpoint's `heldout` dict: the rule, and the pinned list and digest of what it held out."""
    key = "file:document index" if split == "document" else "document index:segment index"
    rec = {"share": share, "split": split, "key": key, "hash": "xxh64 % 10000 < share*10000", "corpus": str(Path(corpus).resolve()),
           "max_heldout_tokens": MAX_HELDOUT_TOKENS, "version": RECORD_VERSION, "documents": entries,
           "tokens": int(len(held)), "sha256": ids_digest(held)}
    if split == "segment":
        rec["segment_tokens"] = SEGMENT_TOKENS
    return rec


def _name(e: dict) -> str:
    return f"{e['file']} document {e['document']}" + ("" if e.get("segment") is None else f" segment {e['segment']}")


def pinned_heldout(record: dict, tokenizer, corpus=None, max_tokens: int | None = None, progress=None) -> np.ndarray:
    """The held-out ids the record lists, read and tokenized from those documents only; `SplitError` when they changed.

    A file added to or removed from the corpus is fine as long as every held-out
    document is still there with the same token ids.
    """
    root = corpus_root(corpus or record["corpus"])
    entries = record["documents"]
    files = list(dict.fromkeys(e["file"] for e in entries))
    for f in files:
        if not (root / f).is_file():
            first = next(e for e in entries if e["file"] == f)
            raise SplitError(f"held-out {_name(first)} is gone from {str(root)!r}: the checkpoint's held-out split cannot be rebuilt; "
                             "restore the file or score other text with --corpus")
    wanted = {}
    for e in entries:
        wanted.setdefault((e["file"], e["document"]), None)

    def texts():
        summary = CorpusSummary()
        for f in files:
            need = sorted(j for (g, j) in wanted if g == f)
            got = seen = 0
            for j, text in enumerate(read_file(root / f, summary=summary)):
                seen = j + 1
                if j == need[got]:
                    yield text
                    got += 1
                    if got == len(need):
                        break
            if got < len(need):
                e = next(e for e in entries if e["file"] == f and e["document"] == need[got])
                raise SplitError(f"held-out {_name(e)} is gone (the file now has {seen} documents): "
                                 "the corpus changed since training; restore it or score other text with --corpus")

    order = sorted(wanted, key=lambda k: (files.index(k[0]), k[1]))  # the order texts() yields them
    docs = {}
    with closing(_encode(texts(), tokenizer)) as enc:
        for k, ids in zip(order, enc):
            docs[k] = np.asarray(ids, dtype=np.int64)
            if progress is not None:
                progress("tokenize held-out", len(docs), len(order), "")
    held = []
    for e in entries:
        ids = docs[(e["file"], e["document"])]
        piece = ids if e.get("segment") is None else ids[e["segment"] * SEGMENT_TOKENS : (e["segment"] + 1) * SEGMENT_TOKENS]
        if ids_digest(piece) != e["sha256"]:
            raise SplitError(f"held-out {_name(e)} changed since training ({len(piece)} tokens now, {e['tokens']} then; token digest differs): "
                             "eval on it would score different text; restore it or score other text with --corpus")
        held.append(piece)
    stream = np.concatenate(held)[: record["tokens"]] if held else np.zeros(0, np.int64)
    if ids_digest(stream) != record["sha256"]:
        raise SplitError(f"the held-out token ids of {str(root)!r} no longer match the checkpoint's digest {record['sha256'][:12]}; "
                         "the held-out documents changed since training; restore them or score other text with --corpus")
    return stream if max_tokens is None else stream[:max_tokens]
