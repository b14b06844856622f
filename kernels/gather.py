"""Row gather and FP8 dequantization: row ids -> rows, written straight into one output.

- `gather_rows(table, rows, out)`: `index_select(out=)` of a (rows, width) table into the
  caller's buffer (no stack / cat / reshape copies).
- `fp8_dequant_torch(packed, head_dim, out=)`: packed float8_e4m3 rows (head_dim e4m3 value
  bytes, then head_dim // 32 ue8m0 scale bytes; docs/spec.md "FP8 rows") -> float32,
  bit-identical to engram_cli/fp8.py: float32(e4m3 byte) * 2^(scale byte - 127). The
  value bytes are converted by torch's float8_e4m3fn dtype (checked equal, all 256 bytes,
  to engram_cli.fp8.e4m3_to_float32_table in tests/kernels/test_gather.py), the scale is
  the float32 with the scale byte as its exponent field (`byte << 23`).
- `fp8_dequant_reference`: the plain reference (a 256-entry float32 table indexed by byte).
- `gather_into(...)`: what EngramLookup calls: gather (+ dequant) into an output of the
  requested dtype; bfloat16 output of an FP8 table rounds the float32 result once.
"""

from __future__ import annotations

import torch

from engram_cli.fp8 import FP8_BLOCK, e4m3_to_float32_table

_LUTS: dict = {}


def e4m3_lut(device) -> torch.Tensor:
    """engram_cli.fp8's 256-entry e4m3 -> float32 table on `device` (cached)."""
    dev = torch.device(device)
    lut = _LUTS.get(dev)
    if lut is None:
        lut = _LUTS[dev] = torch.from_numpy(e4m3_to_float32_table()).to(dev)
    return lut


def fp8_scales(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The ue8m0 scale bytes of packed rows as float32 (..., head_dim // 32)."""
    return (packed[..., head_dim:].to(torch.int32) << 23).view(torch.float32)


def fp8_dequant_reference(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Packed uint8 rows (..., head_dim + head_dim//32) -> float32 (..., head_dim) by table lookup."""
    vals = e4m3_lut(packed.device)[packed[..., :head_dim].long()]
    sc = fp8_scales(packed, head_dim)
    return (vals.view(*vals.shape[:-1], head_dim // FP8_BLOCK, FP8_BLOCK) * sc[..., None]).reshape(vals.shape)


def fp8_dequant_torch(packed: torch.Tensor, head_dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed uint8 rows (N, head_dim + head_dim//32) -> float32 (N, head_dim), bit-exact, into `out`."""
    packed = packed.reshape(-1, packed.shape[-1])
    n = packed.shape[0]
    if out is None:
        out = torch.empty((n, head_dim), dtype=torch.float32, device=packed.device)
    out.copy_(packed[:, :head_dim].view(torch.float8_e4m3fn))
    out.view(n, head_dim // FP8_BLOCK, FP8_BLOCK).mul_(fp8_scales(packed, head_dim)[..., None])
    return out


def gather_rows(table: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """table (R, W) rows at `rows` (N,) -> (N, W), written into `out` when given."""
    rows = rows.to(table.device)
    if out is None:
        return table.index_select(0, rows)
    return torch.index_select(table, 0, rows, out=out)


def output_dtype(table_dtype: torch.dtype, fp8: bool, dtype=None) -> torch.dtype:
    """Rows come out in the table's dtype; FP8 tables as float32; `dtype` overrides both."""
    if dtype is not None:
        return dtype
    return torch.float32 if fp8 else table_dtype


def dequant_into(g: torch.Tensor, head_dim: int, fp8: bool, out: torch.Tensor) -> torch.Tensor:
    """Storage-form rows `g` (N, W) -> `out` (N, head_dim): dequantized (FP8) and/or cast."""
    if fp8:
        if out.dtype == torch.float32:
            return fp8_dequant_torch(g, head_dim, out=out)
        return out.copy_(fp8_dequant_torch(g, head_dim))  # float32 first, rounded once
    return out.copy_(g)


def gather_into(table: torch.Tensor, rows: torch.Tensor, head_dim: int, fp8: bool, out: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (N,) of `table` into `out` (N, head_dim) of any dtype; no intermediate when
    the table's dtype is the output's."""
    if not fp8 and out.dtype == table.dtype and out.device == table.device:
        return gather_rows(table, rows, out=out)
    return dequant_into(gather_rows(table, rows), head_dim, fp8, out)
