"""The fused Triton lookup kernel: compression, n-gram mix, floor modulo, offset, gather, FP8 dequant.

One program handles BLOCK positions of one head. Triton's `%` truncates toward zero,
so a negative remainder gets the prime added back (floor modulo, docs/spec.md "Hash").
Imported lazily by engram_cli.kernels.registry (triton is an optional extra); runs on CUDA, or on CPU tensors when
TRITON_INTERPRET=1 is set before triton is imported (how the tests run it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engram_cli.errors import BackendError
from engram_cli.fp8 import FP8_BLOCK, e4m3_to_float32_table
from engram_cli.kernels.triton_dequant import triton_gather_lookup


@triton.jit
def _engram_lookup_kernel(
    ids_ptr, lookup_ptr, mult_ptr, primes_ptr, offsets_ptr, order_ptr,
    rows_ptr, table_ptr, lut_ptr, out_ptr,
    n_pos, T, H, pad,
    MAX_N: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, ROW_W: tl.constexpr,
    GATHER: tl.constexpr, FP8: tl.constexpr, SCALES: tl.constexpr, DOWNCAST: tl.constexpr, BF16_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    live = pos < n_pos
    t = pos % T
    n = tl.load(order_ptr + h)
    p = tl.load(primes_ptr + h)
    off = tl.load(offsets_ptr + h)
    mix = tl.zeros([BLOCK], dtype=tl.int64)
    for k in tl.static_range(MAX_N):
        ok = live & (t >= k)
        raw = tl.load(ids_ptr + pos - k, mask=ok, other=0)
        x = tl.load(lookup_ptr + raw, mask=ok, other=0)
        x = tl.where(ok, x, pad).to(tl.int64)
        m = tl.load(mult_ptr + k)
        term = x * m
        mix = tl.where(k < n, mix ^ term, mix)
    r = mix % p
    r = tl.where(r < 0, r + p, r)
    row = r + off
    tl.store(rows_ptr + pos * H + h, row, mask=live)
    if GATHER:
        d = tl.arange(0, HEAD_DIM)
        src = table_ptr + row[:, None] * ROW_W + d[None, :]
        msk = live[:, None]
        if FP8:
            b = tl.load(src, mask=msk, other=0).to(tl.int32)
            v = tl.load(lut_ptr + b, mask=msk, other=0.0)
            sb = tl.load(table_ptr + row[:, None] * ROW_W + HEAD_DIM + d[None, :] // 32, mask=msk, other=0).to(tl.int32)
            sc = (sb << 23).to(tl.float32, bitcast=True)
            v = v * sc
        else:
            v = tl.load(src, mask=msk, other=0)
        dst = out_ptr + pos[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + d[None, :]
        if BF16_BITS:  # -> bfloat16 words, rounded to nearest even by hand (the interpreter truncates)
            u = v.to(tl.float32).to(tl.int32, bitcast=True)
            v = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int16)
        elif DOWNCAST:  # float32 -> float16
            v = v.to(tl.float32).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        else:
            v = v.to(out_ptr.dtype.element_ty)
        tl.store(dst, v, mask=msk)


def _launch(lk, ids: torch.Tensor, gather: bool, dtype=None):
    B, T = ids.shape
    H = len(lk.orders) * lk.K
    ids = ids.contiguous()
    rows = torch.empty((B, T, H), dtype=torch.int64, device=ids.device)
    fp8 = lk.fp8
    hd = lk.head_dim
    if gather:
        table = lk.table
        if table is None:
            raise BackendError("this EngramLookup has no table; pass table= or use EngramLookup.from_store")
        out_dtype = (dtype or torch.float32) if fp8 else (dtype or table.dtype)
        out = torch.empty((B, T, H * hd), dtype=out_dtype, device=ids.device)
        row_w = table.shape[1]
        if table.dtype == torch.bfloat16 and out_dtype != torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            table = table.float()  # the interpreter cannot widen bf16 in-kernel on every version (CUDA widens in-kernel)
        lut = torch.from_numpy(e4m3_to_float32_table()).to(ids.device)
    else:
        table, out, lut, row_w = rows, rows, rows, 1
    if gather and (hd & (hd - 1)):
        raise ValueError("the triton gather needs a power-of-two head_dim")
    # positions per program: small under the interpreter (each program is run in Python)
    downcast = bool(gather) and out.dtype in (torch.bfloat16, torch.float16) and (fp8 or table.dtype != out.dtype)
    BLOCK = 16 if os.environ.get("TRITON_INTERPRET") == "1" else (64 if gather else 256)
    grid = (triton.cdiv(B * T, BLOCK), H)
    _engram_lookup_kernel[grid](
        ids, lk.lookup_ids, lk.mult, lk.primes, lk.offsets, lk.head_order,
        rows, table, lut, out.view(torch.int16) if downcast and out.dtype == torch.bfloat16 else out,
        B * T, T, H, lk.plan.compressed_pad_id,
        MAX_N=lk.plan.max_ngram_size, BLOCK=BLOCK, HEAD_DIM=hd if gather else 1, ROW_W=row_w,
        GATHER=gather, FP8=fp8, SCALES=hd // FP8_BLOCK if fp8 else 0,
        DOWNCAST=downcast and out.dtype == torch.float16, BF16_BITS=downcast and out.dtype == torch.bfloat16,
    )
    return out if gather else rows


def triton_row_ids(lk, ids: torch.Tensor) -> torch.Tensor:
    return _launch(lk, ids, gather=False)


def triton_lookup(lk, ids: torch.Tensor, *, dtype=None) -> torch.Tensor:
    if lk.dtype_name.integer or getattr(lk, "kept", None) is not None:  # int8/int4 or pruned rows: kernels/triton_dequant.py
        if lk.table is None:
            raise BackendError("this EngramLookup has no table; pass table= or use EngramLookup.from_store")
        return triton_gather_lookup(lk, triton_row_ids(lk, ids), dtype=dtype)
    return _launch(lk, ids, gather=True, dtype=dtype)
