"""Inputs shared by the lookup-kernel benchmarks: the DeepSeek vocabulary, the reference plan, raw ids, tables."""

from __future__ import annotations

import numpy as np
import torch

from engram_cli.aligned import aligned_empty
from engram_cli.plan import make_plan
from engram_cli.vocab import load_or_compress_vocab, load_tokenizer


def reference_inputs(batch: int, seq: int, seed: int = 0, **plan_overrides):
    """(tokenizer, vocab, plan, ids): the reference plan (or with overrides) and random raw ids (batch, seq)."""
    tok = load_tokenizer()
    vocab = load_or_compress_vocab(tok)
    pad = int(vocab.compress([2])[0])
    plan = make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=pad, **plan_overrides)
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, vocab.vocab_size, size=(batch, seq)))
    return tok, vocab, plan, ids


def store_like(t: torch.Tensor) -> torch.Tensor:
    """`t` copied into memory allocated as `TableStore.load_layer` allocates tables
    (engram_cli/aligned.py: page-aligned, and backed by numpy with transparent huge pages,
    which torch's allocator is not: a random row gather over 4 KiB pages spends a TLB miss
    per row, about 15-20% of its time here)."""
    words = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    a = aligned_empty(tuple(t.shape), words.numpy().dtype)
    a[...] = words.numpy()
    out = torch.from_numpy(a)
    return out.view(torch.bfloat16) if t.dtype == torch.bfloat16 else out
