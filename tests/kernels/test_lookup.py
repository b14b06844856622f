"""EngramLookup parity: every backend against the numpy oracle (engram_cli.hashing) for
row ids, and against numpy indexing / engram_cli.fp8 for gathered, dequantized rows."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors: TRITON_INTERPRET must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402

import numpy as np
import pytest
import torch

from engram_cli.errors import BackendError, EngramError
from engram_cli.fp8 import dequantize_fp8_rows, quantize_fp8_rows
from engram_cli.hashing import position_row_ids
from engram_cli.kernels import EngramLookup, OffloadPrefetcher
from engram_cli.plan import make_plan
from engram_cli.store import bfloat16_bits_to_float32, to_storage

BACKENDS = ["torch", "cpu", "triton", "offload"]
SPEC_POS0 = [417694, 153810, 631746, 619567, 19819, 4616, 64500, 103595, 142458, 557886, 379397, 606178, 191641, 26676, 195389, 29662]
SPEC_POS2 = [11664, 151525, 496189, 480017, 619978, 64166, 315710, 315608, 38504, 114869, 163716, 394173, 83204, 529655, 423994, 53290]


def plan_for(vocab, *, max_n=3, heads=2, rows=(97, 131, 173), dim=64, dtype="float32", layers=(1,)):
    pad = int(vocab.compress([2])[0])
    return make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=pad, layer_ids=layers,
                     max_ngram_size=max_n, heads=heads, rows_per_head=rows[: max_n - 1], dim=dim, seed=3, dtype=dtype)


def edge_ids(vocab, B, T, seed=0):
    rng = np.random.default_rng(seed)
    V = vocab.vocab_size
    ids = rng.integers(0, V, size=(B, T))
    ids.flat[:: 3] = V - 1  # vocabulary edges
    ids.flat[1:: 5] = 0
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_vectors(backend, deepseek_vocab):
    pad = int(deepseek_vocab.compress([2])[0])
    plan = make_plan(compressed_vocab_size=deepseek_vocab.compressed_size, compressed_pad_id=pad)
    raw = [int(np.nonzero(deepseek_vocab.lookup == c)[0][0]) for c in (5, 17, 99)]
    lk = EngramLookup(plan, deepseek_vocab, 1, backend=backend)
    r = lk.row_ids(torch.tensor([raw])) - torch.from_numpy(plan.row_offsets(1))
    assert r[0, 0].tolist() == SPEC_POS0
    assert r[0, 2].tolist() == SPEC_POS2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_n,heads", [(2, 1), (3, 2), (4, 3), (3, 16)])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 2), (3, 5), (1, 9)])
def test_row_ids(backend, max_n, heads, B, T, deepseek_vocab):
    plan = plan_for(deepseek_vocab, max_n=max_n, heads=heads, dim=heads * 32)
    ids = edge_ids(deepseek_vocab, B, T, seed=B * 31 + T)
    want = position_row_ids(plan, 1, deepseek_vocab.compress(ids))
    got = EngramLookup(plan, deepseek_vocab, 1, backend=backend).row_ids(torch.from_numpy(ids))
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_mix_floor_modulo(backend, deepseek_vocab):
    """Reference multipliers never overflow; hand-set huge odd ones do, so mixes go negative
    and the hash must still be the floor modulo (Triton's `%` truncates)."""
    plan = plan_for(deepseek_vocab, max_n=4, heads=2, dim=64)
    big = (0x7FFF_FFFF_FFFF_FFC5, 0x5DEE_CE66_DD15_B3A1, 0x6A09_E667_F3BC_C909, 0x3C6E_F372_FE94_F82B)
    plan = dataclasses.replace(plan, multipliers={1: big})
    ids = edge_ids(deepseek_vocab, 2, 8, seed=7)
    c = deepseek_vocab.compress(ids)
    mixes = c[:, 1:] * np.int64(big[0]) ^ c[:, :-1] * np.int64(big[1])
    assert (mixes < 0).any() and (mixes > 0).any()
    got = EngramLookup(plan, deepseek_vocab, 1, backend=backend).row_ids(torch.from_numpy(ids))
    np.testing.assert_array_equal(got.numpy(), position_row_ids(plan, 1, c))


def v41_plan(vocab):
    pad = int(vocab.compress([2])[0])
    return make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=pad, layer_ids=(1,),
                     max_ngram_size=4, heads=8, rows_per_head=(16_000_000,) * 3, dim=1024)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_ids_v41_sizes(backend, deepseek_vocab):
    plan = v41_plan(deepseek_vocab)
    ids = edge_ids(deepseek_vocab, 2, 7, seed=9)
    got = EngramLookup(plan, deepseek_vocab, 1, backend=backend).row_ids(torch.from_numpy(ids))
    np.testing.assert_array_equal(got.numpy(), position_row_ids(plan, 1, deepseek_vocab.compress(ids)))
    assert int(got.max()) < plan.layer_rows(1)


def table_for(plan, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((plan.layer_rows(1), plan.head_dim)) * 3).astype(np.float32)
    if dtype == "float8_e4m3":
        packed = quantize_fp8_rows(x)
        return packed, dequantize_fp8_rows(packed, plan.head_dim)
    stored = to_storage(x, dtype)
    return stored, bfloat16_bits_to_float32(stored) if dtype == "bfloat16" else stored.astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3"])
@pytest.mark.parametrize("B,T,max_n", [(1, 1, 2), (2, 3, 4), (3, 5, 3)])
def test_rows(backend, dtype, B, T, max_n, deepseek_vocab):
    plan = plan_for(deepseek_vocab, max_n=max_n, heads=2, dim=64, dtype="float32" if dtype == "float8_e4m3" else dtype)
    stored, values = table_for(plan, dtype)
    ids = edge_ids(deepseek_vocab, B, T, seed=T)
    rows = position_row_ids(plan, 1, deepseek_vocab.compress(ids))
    want = values[rows].reshape(B, T, -1)
    got = EngramLookup(plan, deepseek_vocab, 1, stored, backend=backend)(torch.from_numpy(ids))
    assert got.shape == (B, T, (max_n - 1) * 2 * plan.head_dim)
    want_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float8_e4m3": torch.float32}[dtype]
    assert got.dtype == want_dtype
    np.testing.assert_array_equal(got.float().numpy(), want.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_to_bfloat16(backend, deepseek_vocab):
    plan = plan_for(deepseek_vocab)  # a uint8 table is packed FP8 rows
    stored, values = table_for(plan, "float8_e4m3", seed=4)
    ids = edge_ids(deepseek_vocab, 2, 4)
    want = torch.from_numpy(values[position_row_ids(plan, 1, deepseek_vocab.compress(ids))].reshape(2, 4, -1)).to(torch.bfloat16)
    got = EngramLookup(plan, deepseek_vocab, 1, stored, backend=backend)(torch.from_numpy(ids), dtype=torch.bfloat16)
    assert torch.equal(got, want)


def test_offload_prefetch_matches_direct(deepseek_vocab):
    plan = plan_for(deepseek_vocab, max_n=3, heads=2, dim=64)
    stored, _ = table_for(plan, "float32")
    batches = [torch.from_numpy(edge_ids(deepseek_vocab, 2, 6, seed=s)) for s in range(5)]
    ref = EngramLookup(plan, deepseek_vocab, 1, stored, backend="torch")
    off = EngramLookup(plan, deepseek_vocab, 1, stored, backend="offload")
    got = list(OffloadPrefetcher(off, batches, depth=2))
    assert len(got) == 5
    for g, b in zip(got, batches):
        assert torch.equal(g, ref(b))


def test_prefetch_error_reaches_consumer(deepseek_vocab):
    plan = plan_for(deepseek_vocab)
    off = EngramLookup(plan, deepseek_vocab, 1, backend="offload")  # no table
    with pytest.raises(BackendError):
        list(off.prefetcher([torch.zeros((1, 2), dtype=torch.int64)]))


def test_bad_backend_and_layer(deepseek_vocab):
    plan = plan_for(deepseek_vocab)
    with pytest.raises(BackendError, match="unknown backend"):
        EngramLookup(plan, deepseek_vocab, 1, backend="cuda-magic")
    with pytest.raises(EngramError, match="not in the plan"):
        EngramLookup(plan, deepseek_vocab, 5, backend="cpu")
    assert EngramLookup(plan, deepseek_vocab, 1).backend == "cpu"  # auto without CUDA


def test_triton_without_cuda_or_interpreter_is_a_backend_error(monkeypatch, deepseek_vocab):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="needs a CUDA device") as e:
        EngramLookup(plan_for(deepseek_vocab), deepseek_vocab, 1, backend="triton", device="cpu")
    assert "\n" not in str(e.value)
