"""Rows (kernels/gather.py and the Triton kernel): every backend and storage dtype against numpy
indexing of the table's values, FP8 dequantization against engram_cli/fp8.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _common import BACKENDS, DEVICE, DTYPES, edge_ids, plan_for, table_for
from engram_cli.fp8 import dequantize_fp8_rows, e4m3_to_float32_table, quantize_fp8_rows
from engram_cli.hashing import position_row_ids
from engram_cli.kernels import EngramLookup
from engram_cli.kernels.gather import fp8_dequant_reference, fp8_dequant_torch

OUT_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float8_e4m3": torch.float32, "int8": torch.float32, "int4": torch.float32}


@pytest.mark.parametrize("B,T,max_n,heads", [(1, 1, 2, 1), (2, 3, 4, 2), (3, 5, 3, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup(backend, dtype, B, T, max_n, heads, deepseek_vocab):
    plan = plan_for(deepseek_vocab, max_n=max_n, heads=heads, dim=heads * 64, dtype="float32" if dtype == "float8_e4m3" else dtype)
    stored, values = table_for(plan, dtype)
    ids = edge_ids(deepseek_vocab, B, T, seed=T)
    want = values[position_row_ids(plan, 1, deepseek_vocab.compress(ids))].reshape(B, T, -1)
    got = EngramLookup(plan, deepseek_vocab, 1, stored, backend=backend, device=DEVICE)(torch.from_numpy(ids).to(DEVICE))
    assert got.shape == (B, T, (max_n - 1) * heads * plan.head_dim)
    assert got.dtype == OUT_DTYPE[dtype] and got.device.type == torch.device(DEVICE).type
    np.testing.assert_array_equal(got.float().cpu().numpy(), want.astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lookup_to_bfloat16(backend, dtype, deepseek_vocab):
    """dtype=torch.bfloat16: the float32 row rounded once (FP8: the dequantized float32)."""
    plan = plan_for(deepseek_vocab, dtype="float32" if dtype == "float8_e4m3" else dtype)
    stored, values = table_for(plan, dtype, seed=4)
    ids = edge_ids(deepseek_vocab, 2, 4)
    want = torch.from_numpy(values[position_row_ids(plan, 1, deepseek_vocab.compress(ids))].reshape(2, 4, -1)).to(torch.bfloat16)
    got = EngramLookup(plan, deepseek_vocab, 1, stored, backend=backend, device=DEVICE)(torch.from_numpy(ids).to(DEVICE), dtype=torch.bfloat16)
    assert torch.equal(got.cpu(), want)


def test_e4m3_native_conversion_matches_fp8_table():
    """gather.py converts value bytes with torch's float8_e4m3fn: equal to engram_cli.fp8's table on all 256 bytes."""
    native = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(native, e4m3_to_float32_table())


@pytest.mark.parametrize("head_dim", [32, 64, 96])
def test_fp8_dequant_paths_agree(head_dim):
    rng = np.random.default_rng(head_dim)
    x = (rng.standard_normal((300, head_dim)) * rng.choice([1e-3, 1.0, 300.0], size=(300, 1))).astype(np.float32)
    packed = quantize_fp8_rows(x)
    want = dequantize_fp8_rows(packed, head_dim)
    t = torch.from_numpy(packed)
    np.testing.assert_array_equal(fp8_dequant_torch(t, head_dim).numpy(), want)
    np.testing.assert_array_equal(fp8_dequant_reference(t, head_dim).numpy(), want)
    out = torch.empty((300, head_dim))
    assert fp8_dequant_torch(t, head_dim, out=out) is out


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "offload"])
def test_lookup_into_out(backend, dtype, deepseek_vocab):
    """`out=`: the rows are written into the caller's tensor (reused across calls)."""
    plan = plan_for(deepseek_vocab, heads=2, dim=128)
    stored, _ = table_for(plan, dtype)
    lk = EngramLookup(plan, deepseek_vocab, 1, stored, backend=backend, device=DEVICE)
    out = torch.empty((2, 7, 2 * 2 * 64), dtype=torch.float32, device=DEVICE)
    for seed in (1, 2):
        ids = torch.from_numpy(edge_ids(deepseek_vocab, 2, 7, seed=seed)).to(DEVICE)
        got = lk(ids, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(out, EngramLookup(plan, deepseek_vocab, 1, stored, backend="torch", device=DEVICE)(ids))


@pytest.mark.parametrize("n", [1, 5, 40_000])  # 40,000 rows: over the kernels' parallel threshold (both cores)
@pytest.mark.parametrize("dtype,width", [(torch.float32, 64), (torch.float32, 3), (torch.float16, 96), (torch.bfloat16, 64),
                                         (torch.bfloat16, 33), (torch.uint8, 66)])
def test_cpu_gather_matches_index_select(dtype, width, n):
    """kernels/cpu.py's gather (gather_rows on the CPU) against index_select, the torch reference: bit for bit."""
    from engram_cli.kernels.gather import gather_rows

    g = torch.Generator().manual_seed(width)
    table = torch.randint(0, 256, (1009, width * (1 if dtype == torch.uint8 else torch.finfo(dtype).bits // 8)), generator=g,
                          dtype=torch.uint8).view(dtype)
    rows = torch.randint(0, 1009, (n,), generator=g)
    rows[:3] = torch.tensor([0, 1008, 0])[: min(3, n)]
    want = table.index_select(0, rows)
    out = torch.full_like(want, 7) if dtype == torch.uint8 else torch.empty_like(want)
    assert gather_rows(table, rows, out=out) is out
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(gather_rows(table, rows, fast=False).view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(IndexError):
        gather_rows(table, torch.tensor([0, 1009]), out=torch.empty((2, table.shape[1]), dtype=dtype))


@pytest.mark.parametrize("n", [7, 40_000])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_cpu_fp8_gather_matches_reference(head_dim, n):
    """FP8 rows dequantized while gathered (kernels/cpu.py) == fp8_dequant_torch of index_select, bit for bit."""
    from engram_cli.kernels.gather import gather_into

    rng = np.random.default_rng(head_dim)
    x = (rng.standard_normal((500, head_dim)) * rng.choice([1e-3, 1.0, 300.0], size=(500, 1))).astype(np.float32)
    packed = torch.from_numpy(quantize_fp8_rows(x))
    rows = torch.from_numpy(rng.integers(0, 500, n))
    want = fp8_dequant_torch(packed.index_select(0, rows), head_dim)
    out = torch.empty((n, head_dim))
    assert gather_into(packed, rows, head_dim, True, out) is out
    assert torch.equal(out, want)
    ref = torch.empty((n, head_dim))
    assert torch.equal(gather_into(packed, rows, head_dim, True, ref, fast=False), want)


@pytest.mark.parametrize("table_offset,out_offset", [(0, 0), (16, 0), (0, 16), (48, 8)])
@pytest.mark.parametrize("width_bytes", [128, 256, 192])
def test_cpu_gather_any_alignment(width_bytes, table_offset, out_offset):
    """The gather reads tables and writes outputs at any byte offset from a cache line: whole
    64-byte-aligned output rows take the non-temporal stores, others the byte loop; both agree
    with index_select bit for bit, on both cores (40,000 rows)."""
    from engram_cli.aligned import aligned_empty
    from engram_cli.kernels.gather import gather_rows

    rng = np.random.default_rng(width_bytes + table_offset)
    n_rows, n = 3001, 40_000
    raw = aligned_empty(n_rows * width_bytes + 64, np.uint8)
    table = torch.from_numpy(raw[table_offset: table_offset + n_rows * width_bytes].reshape(n_rows, width_bytes))
    table.copy_(torch.from_numpy(rng.integers(0, 256, size=(n_rows, width_bytes), dtype=np.uint8)))
    rows = torch.from_numpy(rng.integers(0, n_rows, size=n))
    out_raw = aligned_empty(n * width_bytes + 64, np.uint8)
    out = torch.from_numpy(out_raw[out_offset: out_offset + n * width_bytes].reshape(n, width_bytes))
    assert gather_rows(table, rows, out=out) is out
    assert torch.equal(out, table.index_select(0, rows))


@pytest.mark.parametrize("shape,dtype", [((3, 5), np.float32), ((0, 66), np.uint8), ((7,), np.uint16), ((1000, 128), np.float16)])
def test_aligned_empty(shape, dtype):
    """Page-aligned, C-contiguous, writable, of the asked shape and dtype."""
    from engram_cli.aligned import ALIGN, aligned_empty

    a = aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.size == 0 or a.ctypes.data % ALIGN == 0
    a[...] = 1
    assert (a == 1).all()


@pytest.mark.parametrize("n_threads_rows", [1, 40_000])  # the serial and the parallel build
def test_cpu_fp8_gather_every_byte_under_every_scale(n_threads_rows):
    """The CPU gather decodes e4m3 with vector integer ops (kernels/cpu.py `_dequant_fp8_lanes`): every value
    byte (NaN, -0.0, subnormals included) under every scale byte (0 and 255 included) equals the torch
    reference's table-and-multiply, bit for bit."""
    from engram_cli.kernels.gather import gather_into

    head_dim = 64
    blocks = [(v0, s) for s in range(256) for v0 in range(0, 256, 32)]  # 2,048 blocks of 32 values: 65,536 pairs
    packed = np.zeros((len(blocks) // 2, head_dim + 2), dtype=np.uint8)
    for k, (v0, s) in enumerate(blocks):
        row, half = divmod(k, 2)
        packed[row, half * 32:(half + 1) * 32] = np.arange(v0, v0 + 32, dtype=np.uint8)
        packed[row, head_dim + half] = s
    table = torch.from_numpy(packed)
    rows = torch.arange(n_threads_rows) % table.shape[0]
    out = torch.empty((rows.numel(), head_dim))
    assert gather_into(table, rows, head_dim, True, out) is out
    want = fp8_dequant_torch(table.index_select(0, rows), head_dim)
    assert torch.equal(out.view(torch.int32), want.view(torch.int32))
