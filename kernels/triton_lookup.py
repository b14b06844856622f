"""The fused Triton lookup kernel: compression, n-gram mix, floor modulo, offset, gather, FP8 dequant.

One program handles BLOCK positions of one order: the order's mix is computed once, then
its K heads in turn (several rows per program: BLOCK x K), each head's rows read as
[BLOCK, head_dim] tiles (contiguous, aligned rows: vectorized loads) and FP8 dequantized
in registers. Negative ids pass through compression (docs/spec.md "Ids outside the
vocabulary"). Triton's `%` truncates toward zero, so a negative remainder gets the prime
added back (floor modulo, docs/spec.md "Hash"). The table may be a pinned host tensor:
the kernel then reads its rows over the bus by unified addressing (UVA), which is the
`offload` backend on CUDA (`uva_lookup`).
Imported lazily by engram_cli.kernels.registry (triton is an optional extra); runs on CUDA, or on CPU tensors when
TRITON_INTERPRET=1 is set before triton is imported (how the tests run it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engram_cli.errors import BackendError
from engram_cli.kernels.gather import e4m3_lut
from engram_cli.kernels.triton_dequant import triton_gather_lookup


@triton.jit
def _engram_lookup_kernel(
    ids_ptr, lookup_ptr, mult_ptr, primes_ptr, offsets_ptr,
    rows_ptr, table_ptr, lut_ptr, out_ptr,
    n_pos, T, pad,
    MAX_N: tl.constexpr, K: tl.constexpr, H: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    ROW_W: tl.constexpr, GATHER: tl.constexpr, FP8: tl.constexpr, DOWNCAST: tl.constexpr, BF16_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    o = tl.program_id(1)  # the order index: order n = o + 2, heads o*K .. o*K + K-1
    pos = pid * BLOCK + tl.arange(0, BLOCK)
    live = pos < n_pos
    t = pos % T
    # the order's mix, once for its K heads
    mix = tl.zeros([BLOCK], dtype=tl.int64)
    for k in tl.static_range(MAX_N):
        ok = live & (t >= k)
        raw = tl.load(ids_ptr + pos - k, mask=ok, other=0)
        x = tl.load(lookup_ptr + raw, mask=ok & (raw >= 0), other=0)  # negative ids pass through
        x = tl.where(raw >= 0, x, raw)
        x = tl.where(ok, x, pad).to(tl.int64)
        m = tl.load(mult_ptr + k)
        mix = tl.where(k < o + 2, mix ^ (x * m), mix)
    d = tl.arange(0, HEAD_DIM)
    msk = live[:, None]
    for j in tl.static_range(K):  # several rows per program: BLOCK positions x K heads
        h = o * K + j
        p = tl.load(primes_ptr + h)
        r = mix % p
        r = tl.where(r < 0, r + p, r)  # Triton's % truncates: floor modulo
        row = r + tl.load(offsets_ptr + h)
        tl.store(rows_ptr + pos * H + h, row, mask=live)
        if GATHER:
            base = table_ptr + row[:, None] * ROW_W
            if FP8:  # value bytes -> float32 by the 256-entry table, times the block's ue8m0 scale
                b = tl.load(base + d[None, :], mask=msk, other=0).to(tl.int32)
                v = tl.load(lut_ptr + b, mask=msk, other=0.0)
                sb = tl.load(base + HEAD_DIM + d[None, :] // 32, mask=msk, other=0).to(tl.int32)
                v = v * (sb << 23).to(tl.float32, bitcast=True)
            else:
                v = tl.load(base + d[None, :], mask=msk, other=0)
            dst = out_ptr + pos[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + d[None, :]
            if BF16_BITS:  # -> bfloat16 words, rounded to nearest even by hand (the interpreter truncates)
                u = v.to(tl.float32).to(tl.int32, bitcast=True)
                v = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).to(tl.int16)
            elif DOWNCAST:  # float32 -> float16
                v = v.to(tl.float32).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            else:
                v = v.to(out_ptr.dtype.element_ty)
            tl.store(dst, v, mask=msk)


def _launch(lk, h, ids: torch.Tensor, gather: bool, dtype=None, table=None, out=None):
    """Run the kernel with hash constants `h` (a RowHasher on the ids' device); `table` (default
    lk.table) may be a pinned host tensor: the kernel then reads it over the bus (UVA, the
    offload backend on CUDA). `out`: a (B, T, H*head_dim) tensor of the output dtype to fill."""
    B, T = ids.shape
    H = len(lk.orders) * lk.K
    ids = ids.contiguous()
    rows = torch.empty((B, T, H), dtype=torch.int64, device=ids.device)
    fp8 = lk.fp8
    hd = lk.head_dim
    if gather:
        table = lk.table if table is None else table
        if table is None:
            raise BackendError("this EngramLookup has no table; pass table= or use EngramLookup.from_store")
        out_dtype = (dtype or torch.float32) if fp8 else (dtype or table.dtype)
        shape = (B, T, H * hd)
        if out is not None and (out.dtype != out_dtype or out.device != ids.device or out.shape != shape or not out.is_contiguous()):
            return out.copy_(_launch(lk, h, ids, gather, dtype, table))  # a caller's `out` of another form: filled from a fresh one
        if out is None:
            out = torch.empty(shape, dtype=out_dtype, device=ids.device)
        row_w = table.shape[1]
        if table.dtype == torch.bfloat16 and out_dtype != torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            table = table.float()  # the interpreter cannot widen bf16 in-kernel on every version (CUDA widens in-kernel)
        lut = e4m3_lut(ids.device)
    else:
        table, out, lut, row_w = rows, rows, rows, 1
    if gather and (hd & (hd - 1)):
        raise ValueError("the triton gather needs a power-of-two head_dim")
    downcast = bool(gather) and out.dtype in (torch.bfloat16, torch.float16) and (fp8 or table.dtype != out.dtype)
    # positions per program (x K heads): small under the interpreter (each program is run in Python)
    BLOCK = 16 if os.environ.get("TRITON_INTERPRET") == "1" else (32 if gather else 256)
    grid = (triton.cdiv(B * T, BLOCK), len(lk.orders))
    _engram_lookup_kernel[grid](
        ids, h.lookup_ids, h.mult, h.primes, h.offsets,
        rows, table, lut, out.view(torch.int16) if downcast and out.dtype == torch.bfloat16 else out,
        B * T, T, lk.plan.compressed_pad_id,
        MAX_N=lk.plan.max_ngram_size, K=lk.K, H=H, BLOCK=BLOCK, HEAD_DIM=hd if gather else 1, ROW_W=row_w,
        GATHER=gather, FP8=fp8,
        DOWNCAST=downcast and out.dtype == torch.float16, BF16_BITS=downcast and out.dtype == torch.bfloat16,
    )
    return out if gather else rows


def triton_row_ids(lk, ids: torch.Tensor) -> torch.Tensor:
    return _launch(lk, lk.hasher, ids, gather=False)


def triton_lookup(lk, ids: torch.Tensor, *, dtype=None, out=None) -> torch.Tensor:
    if lk.dtype_name.integer or getattr(lk, "kept", None) is not None:  # int8/int4 or pruned rows: kernels/triton_dequant.py
        if lk.table is None:
            raise BackendError("this EngramLookup has no table; pass table= or use EngramLookup.from_store")
        rows = triton_gather_lookup(lk, triton_row_ids(lk, ids), dtype=dtype)
        return rows if out is None else out.copy_(rows)
    return _launch(lk, lk.hasher, ids, gather=True, dtype=dtype, out=out)


def uva_row_ids(lk, ids: torch.Tensor) -> torch.Tensor:
    """Row ids on the device of the offload backend's UVA path (`lk.device_hasher`)."""
    return _launch(lk, lk.device_hasher(), ids, gather=False)


def uva_lookup(lk, ids: torch.Tensor, *, dtype=None, out=None) -> torch.Tensor:
    """The offload backend on CUDA: the fused kernel on the device reading the pinned host table (UVA)."""
    return _launch(lk, lk.device_hasher(), ids, gather=True, dtype=dtype, out=out)
