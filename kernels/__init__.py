"""Lookup kernels (installed as `engram_cli.kernels`), one stem per kernel:

- hash.py: row ids (torch reference, fast CPU path with division-free exact floor modulo)
- gather.py: row gather and FP8 dequantization into one output
- triton_lookup.py: the fused Triton kernel (imported lazily)
- offload.py: the prefetch pipeline (OffloadPrefetcher)
- cache.py: hot-row cache and bounded chunk cache
- registry.py: one implementation per engram_cli.kinds.Backend; available_backends(), resolve_backend()
- lookup.py: EngramLookup, composing them through the registry

`auto` is triton on CUDA, else cpu, quietly; naming `triton` where it cannot run raises
BackendError.
"""

from engram_cli.kernels.gather import fp8_dequant_torch
from engram_cli.kernels.hash import RowHasher
from engram_cli.kernels.lookup import EngramLookup
from engram_cli.kernels.offload import OffloadPrefetcher
from engram_cli.kernels.registry import REGISTRY, available_backends, resolve_backend

__all__ = ["REGISTRY", "EngramLookup", "OffloadPrefetcher", "RowHasher", "available_backends", "fp8_dequant_torch", "resolve_backend"]
