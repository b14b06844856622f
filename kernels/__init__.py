"""Lookup kernels (installed as `engram_cli.kernels`), one stem per kernel:

- hash.py: row ids (torch reference, fast CPU path with division-free exact floor modulo)
- gather.py: row gather and FP8 dequantization into one output
- triton_lookup.py: the fused Triton kernel (imported lazily)
- offload.py: the prefetch pipeline (OffloadPrefetcher)
- cache.py: hot-row cache and bounded chunk cache
- lookup.py: EngramLookup, composing them; backend choice

`auto` is triton on CUDA, else cpu, quietly; naming `triton` where it cannot run raises
BackendError.
"""

from .gather import fp8_dequant_torch
from .hash import RowHasher
from .lookup import BACKENDS, EngramLookup, resolve_backend
from .offload import OffloadPrefetcher

__all__ = ["BACKENDS", "EngramLookup", "OffloadPrefetcher", "RowHasher", "fp8_dequant_torch", "resolve_backend"]
