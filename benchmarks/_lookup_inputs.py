"""Inputs shared by the lookup-kernel benchmarks: the DeepSeek vocabulary, the reference plan, raw ids, tables."""

from __future__ import annotations

import numpy as np
import torch

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
    """`t` copied into numpy-allocated memory, as `TableStore.load_layer` tables are: numpy backs
    large arrays with transparent huge pages (madvise), torch's allocator does not, and a random
    row gather over 4 KiB pages spends a TLB miss per row (about 15-20% of its time here)."""
    words = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    a = np.empty(tuple(t.shape), dtype=words.numpy().dtype)
    a[...] = words.numpy()
    out = torch.from_numpy(a)
    return out.view(torch.bfloat16) if t.dtype == torch.bfloat16 else out
