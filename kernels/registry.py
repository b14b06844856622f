"""The lookup backends: one implementation per `Backend`, which of them can run here, and `auto`'s choice.

`REGISTRY` maps each backend (engram_cli.kinds.Backend, all but `auto`) to a
`BackendImpl`: how it turns raw ids into row ids and rows (functions of an
`EngramLookup`), and what it needs (the table in host memory; the whole table on the
device; a device it can run on). `available_backends(device)` is derived from it, so a
new backend is one entry here.

- `torch`: the plain reference, int64 torch ops per order and head (`RowHasher.reference`),
  rows by `index_select`.
- `cpu`: the fast CPU path: kernels/cpu.py's fused numba hash (`RowHasher.fast`) and gather.
- `triton`: the fused kernel (kernels/triton_lookup.py); CUDA, or CPU tensors under
  TRITON_INTERPRET=1. Imported on first use: triton is an optional extra, and importing
  it before TRITON_INTERPRET=1 is set would fix the process to compiled mode.
- `offload`: the table in host memory (pinned under CUDA). On CUDA with triton (`offload_uva`):
  the fused kernel on the device reads the pinned table directly (UVA) and
  `EngramLookup.prefetcher` runs the next batches on a side stream; elsewhere (the
  fallback) rows are hashed and gathered on the host (`RowHasher.fast`, kernels/cpu.py),
  copied, and the prefetcher overlaps the next batches on a thread.

`auto` is triton on CUDA, else cpu, quietly; naming a backend that cannot run here raises
BackendError.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from engram_cli.errors import BackendError
from engram_cli.kinds import Backend


def _always(dev: torch.device) -> bool:
    return True


def _triton_usable(dev: torch.device) -> bool:
    """CUDA, or CPU tensors with TRITON_INTERPRET=1. Checked before importing triton: triton
    imported without the interpreter flag cannot interpret kernels later in the process."""
    if not (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return importlib.util.find_spec("triton") is not None


def _reference_row_ids(lk, ids: torch.Tensor) -> torch.Tensor:
    return lk.hasher.reference(ids)


def _fast_row_ids(lk, ids: torch.Tensor) -> torch.Tensor:
    return lk.hasher.fast(ids)


def _gather_lookup(lk, ids: torch.Tensor, dtype, out) -> torch.Tensor:
    """Row ids by the backend's hasher, then `EngramLookup.gather` (hot cache, chunk cache, dequant)."""
    return lk.gather(lk.impl.row_ids(lk, ids), dtype=dtype, out=out)


def _triton_row_ids(lk, ids: torch.Tensor) -> torch.Tensor:
    from engram_cli.kernels.triton_lookup import triton_row_ids  # lazy: see the module docstring

    return triton_row_ids(lk, ids)


def _triton_lookup(lk, ids: torch.Tensor, dtype, out) -> torch.Tensor:
    from engram_cli.kernels.triton_lookup import triton_lookup  # lazy: see the module docstring

    return triton_lookup(lk, ids, dtype=dtype, out=out)


def offload_uva(lk) -> bool:
    """Whether the offload backend takes its UVA path: the fused Triton kernel on a CUDA device
    reading the whole table from pinned host memory (no host gather, no staging copy). Else
    (no CUDA or triton, a chunk cache, a hot-row cache, a head_dim Triton cannot tile, int8/int4
    or pruned rows) the host path: hashed and gathered on the host, then copied."""
    t = lk.table
    return (lk.device.type == "cuda" and isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_pinned()
            and lk.hot is None and not lk.dtype_name.integer and getattr(lk, "kept", None) is None
            and not (lk.head_dim & (lk.head_dim - 1)) and _triton_usable(lk.device))


def _offload_row_ids(lk, ids: torch.Tensor) -> torch.Tensor:
    if offload_uva(lk):
        from engram_cli.kernels.triton_lookup import uva_row_ids  # lazy: see the module docstring

        return uva_row_ids(lk, ids.to(lk.device, non_blocking=True))
    return lk.hasher.fast(ids)


def _offload_lookup(lk, ids: torch.Tensor, dtype, out) -> torch.Tensor:
    if offload_uva(lk):
        from engram_cli.kernels.triton_lookup import uva_lookup  # lazy: see the module docstring

        return uva_lookup(lk, ids.to(lk.device, non_blocking=True), dtype=dtype, out=out)
    return _gather_lookup(lk, ids, dtype, out)


@dataclass(frozen=True)
class BackendImpl:
    """One backend: functions of an `EngramLookup` `lk` and raw ids (B, T) on `lk.hasher.device`."""

    row_ids: Callable  # (lk, ids) -> int64 row ids (B, T, orders*K)
    lookup: Callable  # (lk, ids, dtype, out) -> rows (B, T, orders*K*head_dim)
    host: bool = False  # the table stays in host memory: rows are hashed and gathered there
    resident_only: bool = False  # needs the whole table on the device (no bounded chunk cache)
    usable: Callable[[torch.device], bool] = _always
    unusable: str = ""  # the BackendError when it cannot run on a device
    reference: bool = False  # gathers with the torch reference ops only (index_select), not kernels/cpu.py


REGISTRY: dict[Backend, BackendImpl] = {
    Backend.TORCH: BackendImpl(_reference_row_ids, _gather_lookup, reference=True),
    Backend.CPU: BackendImpl(_fast_row_ids, _gather_lookup),
    Backend.TRITON: BackendImpl(_triton_row_ids, _triton_lookup, resident_only=True, usable=_triton_usable,
                                unusable="the triton backend needs a CUDA device or TRITON_INTERPRET=1 set before start; use --backend cpu"),
    Backend.OFFLOAD: BackendImpl(_offload_row_ids, _offload_lookup, host=True),
}


def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def resolve_backend(backend: Backend | str, device) -> Backend:
    """`auto` -> triton on CUDA else cpu; a backend that cannot run on `device` -> BackendError."""
    backend = Backend.parse(backend)
    dev = _device(device)
    if backend is Backend.AUTO:
        return Backend.TRITON if dev.type == "cuda" and REGISTRY[Backend.TRITON].usable(dev) else Backend.CPU
    impl = REGISTRY[backend]
    if not impl.usable(dev):
        raise BackendError(impl.unusable)
    return backend


def available_backends(device) -> list[Backend]:
    """The backends that can run on `device`, in registry order (triton only on CUDA or under TRITON_INTERPRET=1)."""
    dev = _device(device)
    return [b for b, impl in REGISTRY.items() if impl.usable(dev)]
