"""The Triton gather for int8/int4 rows and pruned tables: row ids (from the fused kernel) -> rows, dequantized.

Not fused with the hash (two launches: `triton_lookup.triton_row_ids`, then this gather):
a pruned table's row ids are first mapped to its own rows (`dequant.remap_rows`, -1 for a
dropped row, which reads as +0.0). Kinds: 0 plain rows (copied as raw bits: float32,
float16, bfloat16 words), 1 float8_e4m3 (docs/spec.md "FP8 rows"), 2 int8 and 3 int4
(docs/spec.md "Integer rows"); packed kinds come out as float32, the dequantization of
engram_cli.fp8 / engram_cli.int_rows bit for bit. Imported by kernels/triton_lookup.py
(triton is an optional extra); CUDA, or CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engram_cli.fp8 import e4m3_to_float32_table
from engram_cli.int_rows import value_bytes
from engram_cli.kernels.dequant import remap_rows

KINDS = {"float8_e4m3": 1, "int8": 2, "int4": 3}
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # plain rows copied as raw words of their width


@triton.jit
def _gather_dequant_kernel(rows_ptr, table_ptr, lut_ptr, out_ptr, n,
                           HEAD_DIM: tl.constexpr, ROW_W: tl.constexpr, VB: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    live = idx < n
    row = tl.load(rows_ptr + idx, mask=live, other=-1)
    ok = live & (row >= 0)
    row = tl.where(ok, row, 0)
    d = tl.arange(0, HEAD_DIM)
    msk = ok[:, None]
    base = table_ptr + row[:, None] * ROW_W
    if KIND == 0:
        v = tl.load(base + d[None, :], mask=msk, other=0)
    else:
        if KIND == 1:
            b = tl.load(base + d[None, :], mask=msk, other=0).to(tl.int32)
            q = tl.load(lut_ptr + b, mask=msk, other=0.0)
            sb = tl.load(base + HEAD_DIM + d[None, :] // 32, mask=msk, other=0).to(tl.int32)
            sc = (sb << 23).to(tl.float32, bitcast=True)
        else:
            if KIND == 2:
                b = tl.load(base + d[None, :], mask=msk, other=0).to(tl.int32)
                q = tl.where(b > 127, b - 256, b).to(tl.float32)
            else:
                b = tl.load(base + d[None, :] // 2, mask=msk, other=0).to(tl.int32)
                nib = tl.where(d[None, :] % 2 == 0, b & 15, b >> 4)
                q = (nib - 8).to(tl.float32)
            lo = tl.load(base + VB + 2 * (d[None, :] // 32), mask=msk, other=0).to(tl.int32)
            hi = tl.load(base + VB + 2 * (d[None, :] // 32) + 1, mask=msk, other=0).to(tl.int32)
            sc = ((lo | (hi << 8)) << 16).to(tl.float32, bitcast=True)
        v = tl.where(msk, q * sc, 0.0)
    tl.store(out_ptr + idx[:, None] * HEAD_DIM + d[None, :], v, mask=live[:, None])


def triton_gather_lookup(lk, rows: torch.Tensor, dtype=None) -> torch.Tensor:
    """Global row ids (B, T, H) of `lk`'s layer -> rows (B, T, H*head_dim): packed tables as float32 (or `dtype`), plain ones in their dtype."""
    table = lk.table
    B, T, H = rows.shape
    hd = lk.head_dim
    flat = rows.reshape(-1)
    if lk.kept is not None:
        flat, dropped = remap_rows(lk.kept, flat)
        flat = torch.where(dropped, torch.full_like(flat, -1), flat)
    flat = flat.contiguous()
    n = flat.numel()
    kind = KINDS.get(lk.dtype_name.value, 0)
    if kind:
        src, out = table, torch.empty((n, hd), dtype=torch.float32, device=table.device)
        lut = torch.from_numpy(e4m3_to_float32_table()).to(table.device)
    else:
        raw = _RAW[table.element_size()]
        src, lut = table.view(raw), flat
        out = torch.empty((n, hd), dtype=raw, device=table.device)
    BLOCK = 16 if os.environ.get("TRITON_INTERPRET") == "1" else 64
    _gather_dequant_kernel[(triton.cdiv(n, BLOCK),)](
        flat, src, lut, out, n, HEAD_DIM=hd, ROW_W=int(table.shape[1]),
        VB=value_bytes(hd, lk.dtype_name.value) if kind >= 2 else 0, KIND=kind, BLOCK=BLOCK,
    )
    if not kind:
        out = out.view(table.dtype)
    out = out.view(B, T, H * hd)
    return out if dtype is None or out.dtype == dtype else out.to(dtype)
