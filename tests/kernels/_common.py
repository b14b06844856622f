"""Shared helpers of the kernel tests: the device they run on, small plans, edge ids, tables."""

from __future__ import annotations

import numpy as np
import torch

from engram_cli.fp8 import dequantize_fp8_rows, quantize_fp8_rows
from engram_cli.int_rows import dequantize_int_rows, quantize_int_rows
from engram_cli.kernels.registry import REGISTRY
from engram_cli.kinds import TableDtype
from engram_cli.plan import make_plan

# CUDA where present (Triton compiled for the GPU), else CPU (Triton under TRITON_INTERPRET=1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b.value for b in REGISTRY]  # every backend; the tests skip triton where it cannot run
DTYPES = [d.value for d in TableDtype]


def plan_for(vocab, *, max_n=3, heads=2, rows=(97, 131, 173), dim=64, dtype="float32", layers=(1,)):
    pad = int(vocab.compress([2])[0])
    return make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=pad, layer_ids=layers,
                     max_ngram_size=max_n, heads=heads, rows_per_head=rows[: max_n - 1], dim=dim, seed=3, dtype=dtype)


def edge_ids(vocab, B, T, seed=0):
    """Random raw ids with the vocabulary's edges (0 and V-1) mixed in."""
    rng = np.random.default_rng(seed)
    V = vocab.vocab_size
    ids = rng.integers(0, V, size=(B, T))
    ids.flat[::3] = V - 1
    ids.flat[1::5] = 0
    return ids


def table_for(plan, dtype, seed=0):
    """(stored, float32 values): a random table in storage form and what its rows mean."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((plan.layer_rows(1), plan.head_dim)) * 3).astype(np.float32)
    if dtype == "float8_e4m3":
        packed = quantize_fp8_rows(x)
        return packed, dequantize_fp8_rows(packed, plan.head_dim)
    if dtype in ("int8", "int4"):  # packed int rows, one bfloat16 scale per 32 values (engram_cli/int_rows.py)
        packed = quantize_int_rows(x, dtype)
        return packed, dequantize_int_rows(packed, dtype, plan.head_dim)
    if dtype == "bfloat16":
        t = torch.from_numpy(x).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16), t.float().numpy()
    stored = x.astype(dtype)
    return stored, stored.astype(np.float32)
