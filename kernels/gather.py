"""Row gather and FP8 dequantization: row ids -> rows, written straight into one output.

- `gather_rows(table, rows, out)`: rows of a (rows, width) table into the caller's buffer
  (no stack / cat / reshape copies): on the CPU kernels/cpu.py's numba gather (both
  cores, software prefetch), elsewhere `index_select(out=)`, the reference.
- `fp8_dequant_torch(packed, head_dim, out=)`: packed float8_e4m3 rows (head_dim e4m3 value
  bytes, then head_dim // 32 ue8m0 scale bytes; docs/spec.md "FP8 rows") -> float32,
  bit-identical to engram_cli/fp8.py: float32(e4m3 byte) * 2^(scale byte - 127). The
  value bytes are converted by torch's float8_e4m3fn dtype (checked equal, all 256 bytes,
  to engram_cli.fp8.e4m3_to_float32_table in tests/kernels/test_gather.py), the scale is
  the float32 with the scale byte as its exponent field (`byte << 23`).
- `fp8_dequant_reference`: the plain reference (a 256-entry float32 table indexed by byte).
- `gather_into(...)`: what EngramLookup calls: gather (+ dequant) into an output of the
  requested dtype; on the CPU FP8 rows are dequantized to float32 while gathered
  (kernels/cpu.py); bfloat16 output of an FP8 table rounds the float32 result once.
"""

from __future__ import annotations

import torch

from engram_cli.fp8 import FP8_BLOCK, e4m3_to_float32_table
from engram_cli.kernels.cpu import gather_fp8_into, gather_rows_into

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


def _host_bytes(t: torch.Tensor):
    """A contiguous CPU tensor (N, W) as a numpy uint8 (N, W * itemsize) view (bfloat16 included), else None."""
    if t.device.type != "cpu" or t.ndim != 2 or not t.is_contiguous():
        return None
    return t.view(torch.uint8).numpy()


def gather_rows(table: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None, *, fast: bool = True) -> torch.Tensor:
    """table (R, W) rows at `rows` (N,) -> (N, W), written into `out` when given.

    On the CPU (`fast`): the numba gather of kernels/cpu.py (both cores, prefetched);
    elsewhere, for tensors it cannot view as rows of bytes, or with fast=False (the torch
    backend), `index_select`: the reference."""
    rows = rows.to(table.device)
    if out is None:
        out = torch.empty((rows.shape[0],) + tuple(table.shape[1:]), dtype=table.dtype, device=table.device)
    src, dst = (_host_bytes(table), _host_bytes(out)) if fast else (None, None)
    if src is not None and dst is not None and out.dtype == table.dtype and dst.shape == (rows.shape[0], src.shape[1]):
        gather_rows_into(src, rows.contiguous().numpy(), dst)
        return out
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


def gather_into(table: torch.Tensor, rows: torch.Tensor, head_dim: int, fp8: bool, out: torch.Tensor, *, fast: bool = True) -> torch.Tensor:
    """Rows `rows` (N,) of `table` into `out` (N, head_dim) of any dtype; no intermediate when
    the table's dtype is the output's, or for FP8 rows into float32 on the CPU (dequantized
    while gathered, kernels/cpu.py). fast=False: the torch reference ops only (the torch
    backend). Other storage kinds add their branch here."""
    if fast and fp8 and out.dtype == torch.float32:
        src, dst = _host_bytes(table), (out.numpy() if out.device.type == "cpu" and out.is_contiguous() else None)
        if src is not None and dst is not None and dst.shape == (rows.shape[0], head_dim) and src.shape[1] == head_dim + head_dim // FP8_BLOCK:
            gather_fp8_into(src, rows.to(table.device).contiguous().numpy(), head_dim, dst)
            return out
    if not fp8 and out.dtype == table.dtype and out.device == table.device:
        return gather_rows(table, rows, out=out, fast=fast)
    return dequant_into(gather_rows(table, rows, fast=fast), head_dim, fp8, out)
