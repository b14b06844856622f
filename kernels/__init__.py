"""Lookup kernels (installed as `engram_cli.kernels`): backend choice and EngramLookup.

`auto` is triton on CUDA, else cpu, quietly; naming `triton` where it cannot run raises
BackendError. Triton is imported lazily (engram_cli.kernels.triton_lookup).
"""

from .lookup import BACKENDS, EngramLookup, OffloadPrefetcher, fp8_dequant_torch, resolve_backend

__all__ = ["BACKENDS", "EngramLookup", "OffloadPrefetcher", "fp8_dequant_torch", "resolve_backend"]
