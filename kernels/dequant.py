"""int8/int4 row dequantization and the kept-row remap of pruned tables (torch), for every lookup backend.

- `int_dequant_torch(packed, head_dim, kind, out=)`: packed int8/int4 rows (engram_cli/int_rows.py,
  docs/spec.md "Integer rows") -> float32, `float32(q) * bitcast_f32(uint32(scale_word) << 16)`,
  bit-identical to `engram_cli.int_rows.dequantize_int_rows` (tests/kernels/test_dequant.py).
- `int_dequant_into(g, head_dim, kind, out)`: the same into an output of any dtype (float32
  first, rounded once, as the FP8 path does).
- `remap_rows(kept, rows)`: global row ids -> rows of a pruned table (the sorted kept ids,
  docs/spec.md "Pruned tables"): the index in `kept`, -1 for a dropped row (read as zeros).
- `zero_dropped(out, dropped)`: zero the output rows of dropped lookups.
"""

from __future__ import annotations

import torch

from engram_cli.int_rows import INT_BLOCK, value_bytes


def int_scales(packed: torch.Tensor, head_dim: int, kind: str) -> torch.Tensor:
    """The bfloat16 scale words of packed rows as float32 (..., head_dim // 32)."""
    vb = value_bytes(head_dim, kind)
    lo = packed[..., vb::2].to(torch.int32)
    hi = packed[..., vb + 1 :: 2].to(torch.int32)
    return ((lo | (hi << 8)) << 16).view(torch.float32)


def int_values(packed: torch.Tensor, head_dim: int, kind: str) -> torch.Tensor:
    """The integer values of packed rows as float32 (..., head_dim) (exact: |q| <= 128)."""
    vb = value_bytes(head_dim, kind)
    v = packed[..., :vb]
    if kind == "int8":
        return v.view(torch.int8).to(torch.float32)
    q = torch.empty((*v.shape[:-1], head_dim), dtype=torch.float32, device=v.device)
    q[..., 0::2] = (v & 0x0F).to(torch.float32) - 8
    q[..., 1::2] = (v >> 4).to(torch.float32) - 8
    return q


def int_dequant_torch(packed: torch.Tensor, head_dim: int, kind: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed uint8 rows (N, width) -> float32 (N, head_dim), bit-exact, into `out` when given."""
    packed = packed.reshape(-1, packed.shape[-1])
    n = packed.shape[0]
    q = int_values(packed, head_dim, kind).view(n, head_dim // INT_BLOCK, INT_BLOCK)
    q.mul_(int_scales(packed, head_dim, kind)[..., None])
    q = q.view(n, head_dim)
    if out is None:
        return q
    return out.copy_(q)


def int_dequant_into(g: torch.Tensor, head_dim: int, kind: str, out: torch.Tensor) -> torch.Tensor:
    """Storage-form int rows `g` (N, width) -> `out` (N, head_dim) of any dtype (float32 first, rounded once)."""
    return out.copy_(int_dequant_torch(g, head_dim, kind))


def remap_rows(kept: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of the pruned table, dropped mask) for global row ids `rows` (N,); a dropped row maps to 0 (read, then zeroed)."""
    kept = kept.to(rows.device)
    if kept.numel() == 0:
        return torch.zeros_like(rows), torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    pos = torch.searchsorted(kept, rows).clamp_(max=kept.numel() - 1)
    hit = kept[pos] == rows
    return torch.where(hit, pos, torch.zeros_like(pos)), ~hit


def zero_dropped(out: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """`out` (N, head_dim) with the rows of dropped lookups set to +0.0."""
    if bool(dropped.any()):
        out[dropped.to(out.device)] = 0
    return out
