"""EngramLookup: raw token ids -> hashed row ids -> gathered (and dequantized) table rows.

Backends (see docs/kernels.md):
- `torch`: the plain reference, int64 torch ops per order and head, exactly docs/spec.md "Hash".
- `cpu`: the fast CPU path, one vectorized int64 pass over all heads at once.
- `triton`: one fused kernel (compression lookup, n-gram mix, floor modulo, offset,
  gather, FP8 dequant); CUDA in production, CPU tensors under TRITON_INTERPRET=1.
- `offload`: the table in host memory (pinned under CUDA), the next batch's rows
  gathered on a background thread (`OffloadPrefetcher`).

Storage forms: float32 / float16 tensors as is, bfloat16 as uint16 words (or a torch
bfloat16 tensor), float8_e4m3 as uint8 packed rows (head_dim values + head_dim // 32
ue8m0 scale bytes, engram_cli/fp8.py). FP8 rows are dequantized to float32 by default
(`dtype=torch.bfloat16` rounds that float32 result once).
"""

from __future__ import annotations

import threading
import queue

import numpy as np
import torch

from ..errors import BackendError, PlanError
from ..fp8 import FP8_BLOCK, e4m3_to_float32_table

BACKENDS = ("auto", "torch", "cpu", "triton", "offload")


def _as_tensor(table, dtype_name: str) -> torch.Tensor:
    if isinstance(table, np.ndarray):
        if table.dtype == np.uint16 and dtype_name == "bfloat16":
            return torch.from_numpy(table.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(table))
    t = table
    if t.dtype == torch.uint16 and dtype_name == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.contiguous()


def _table_dtype(plan, table) -> str:
    """The logical dtype: the plan's; a bare uint8 table (head_dim + head_dim//32 wide, e.g.
    one built by hand in a test) is read as packed FP8 rows."""
    if table is not None and str(getattr(table, "dtype", "")).endswith("uint8"):
        return "float8_e4m3"
    return plan.dtype


def fp8_dequant_torch(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Packed uint8 rows (..., head_dim + head_dim//32) -> float32 (..., head_dim), bit-exact."""
    lut = torch.from_numpy(e4m3_to_float32_table()).to(packed.device)
    vals = lut[packed[..., :head_dim].long()]
    sc = (packed[..., head_dim:].to(torch.int32) << 23).view(torch.float32)
    return (vals.view(*vals.shape[:-1], head_dim // FP8_BLOCK, FP8_BLOCK) * sc[..., None]).reshape(vals.shape)


def resolve_backend(backend: str, device) -> str:
    """`auto` -> triton on CUDA else cpu; `triton` where it cannot run -> BackendError."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "auto":
        return "triton" if dev.type == "cuda" and _triton_usable(dev) else "cpu"
    if backend == "triton" and not _triton_usable(dev):
        raise BackendError("the triton backend needs a CUDA device or TRITON_INTERPRET=1 set before start; use --backend cpu")
    return backend


def _triton_usable(dev: torch.device) -> bool:
    import os

    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class EngramLookup:
    """Row ids and rows of one layer's Engram table for raw tokenizer ids (B, T)."""

    def __init__(self, plan, vocab, layer_id: int, table=None, *, backend: str = "auto", device=None):
        if layer_id not in plan.layer_ids:
            raise PlanError(f"layer {layer_id} is not in the plan's layers {list(plan.layer_ids)}; pick one of them")
        self.plan, self.vocab, self.layer_id = plan, vocab, int(layer_id)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = resolve_backend(backend, self.device)
        self.dtype_name = _table_dtype(plan, table)
        self.head_dim = plan.head_dim
        self.orders = plan.orders
        self.K = plan.heads
        self.lookup_ids = torch.from_numpy(np.asarray(vocab.lookup, dtype=np.int64)).to(self.device)
        mult = [int(m) for m in plan.multipliers[self.layer_id]]
        self.mult = torch.tensor(mult, dtype=torch.int64, device=self.device)
        self.primes = torch.from_numpy(np.asarray(plan.head_primes(self.layer_id), dtype=np.int64)).to(self.device)
        self.offsets = torch.from_numpy(np.asarray(plan.row_offsets(self.layer_id), dtype=np.int64)).to(self.device)
        # per head: its order (n) -> the cpu path mixes once per order, the triton kernel per head
        self.head_order = torch.tensor([n for n in self.orders for _ in range(self.K)], dtype=torch.int64, device=self.device)
        self.table = None
        if table is not None:
            t = _as_tensor(table, self.dtype_name)
            if self.backend == "offload":
                if self.device.type == "cuda":
                    t = t.pin_memory()
            else:
                t = t.to(self.device)
            self.table = t
        self.stats = {"lookups": 0}
        self.hot = None

    def use_hot_cache(self, hits, capacity: int) -> "EngramLookup":
        """Keep the `capacity` most-hit rows resident on the device; misses read from the table."""
        from .cache import HotRowCache

        self.hot = HotRowCache(self.table, hits, capacity, device=self.device)
        return self

    def hit_rates(self) -> dict:
        """Hot-cache hit rates so far, overall and per order (empty without a cache)."""
        return self.hot.hit_rates(self.orders, self.K) if self.hot is not None else {}

    @classmethod
    def from_store(cls, store_or_path, layer_id: int, *, backend: str = "auto", device=None, cache_rows=None, max_resident_bytes=None):
        """Open a store (or take an open one) and load the layer's rows in storage form.

        cache_rows: keep that many most-hit rows (store.hits) resident (hot-row cache).
        max_resident_bytes: do not load the layer; read rows through a bounded LRU chunk
        cache instead (tables larger than RAM; backends torch/cpu/offload).
        """
        from ..store import TableStore
        from .cache import ChunkCache

        store = store_or_path if hasattr(store_or_path, "table") else TableStore.open(store_or_path)
        if max_resident_bytes is not None:
            if backend == "triton":
                raise BackendError("the triton backend needs the table on the device; drop max_resident_bytes or use backend offload")
            lk = cls(store.plan, store.vocab, layer_id, None, backend=backend, device=device)
            lk.table = ChunkCache(store.table(layer_id), store.chunk_rows, max_resident_bytes)
        else:
            lk = cls(store.plan, store.vocab, layer_id, store.load_layer(layer_id), backend=backend, device=device)
        lk.store = store
        if cache_rows:
            lk.use_hot_cache(store.hits(layer_id), int(cache_rows))
        return lk

    # ---------------------------------------------------------------- row ids
    def row_ids(self, token_ids) -> torch.Tensor:
        """Raw tokenizer ids (B, T) -> int64 (B, T, orders*K) rows of the layer's table."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64, device=self.device)
        if ids.ndim == 1:
            ids = ids[None]
        if self.backend == "triton":
            from .triton_lookup import triton_row_ids

            return triton_row_ids(self, ids)
        if self.backend == "torch":
            return self._row_ids_reference(ids)
        return self._row_ids_fast(ids)

    def _shifts(self, x: torch.Tensor) -> list[torch.Tensor]:
        pad = self.plan.compressed_pad_id
        T = x.shape[1]
        out = [x]
        for k in range(1, self.plan.max_ngram_size):
            s = torch.full_like(x, pad)
            if k < T:
                s[:, k:] = x[:, : T - k]
            out.append(s)
        return out

    def _row_ids_reference(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.lookup_ids[ids]
        shifts = self._shifts(x)
        cols, h = [], 0
        for n in self.orders:
            mix = shifts[0] * self.mult[0]
            for k in range(1, n):
                mix = torch.bitwise_xor(mix, shifts[k] * self.mult[k])
            for _ in range(self.K):
                r = torch.remainder(mix, self.primes[h])  # floor modulo (torch.remainder)
                cols.append(r + self.offsets[h])
                h += 1
        return torch.stack(cols, dim=2)

    def _row_ids_fast(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.lookup_ids[ids]
        B, T = x.shape
        pad = self.plan.compressed_pad_id
        N = self.plan.max_ngram_size
        xp = torch.full((B, T + N - 1), pad, dtype=torch.int64, device=x.device)
        xp[:, N - 1 :] = x
        # prod[k] = shift_k * mult[k]; mixes built incrementally across orders
        mixes = []
        mix = x * self.mult[0]
        for k in range(1, N):
            mix = mix ^ (xp[:, N - 1 - k : N - 1 - k + T] * self.mult[k])
            if k + 1 in self.orders:
                mixes.append(mix)
        m = torch.stack(mixes, dim=2).repeat_interleave(self.K, dim=2)  # (B, T, H)
        r = torch.remainder(m, self.primes)
        return r.add_(self.offsets)

    # ---------------------------------------------------------------- rows
    def gather(self, rows: torch.Tensor, *, dtype=None) -> torch.Tensor:
        """Row ids (B, T, H) -> rows (B, T, H*head_dim)."""
        if self.table is None:
            raise BackendError("this EngramLookup has no table; pass table= or use EngramLookup.from_store")
        B, T, H = rows.shape
        flat = rows.reshape(-1)
        if self.hot is not None:
            g = self.hot.gather(flat, H)
        else:
            from .cache import _gather

            g = _gather(self.table, flat)
        if self.dtype_name == "float8_e4m3":
            g = fp8_dequant_torch(g, self.head_dim)
            if dtype is not None:
                g = g.to(dtype)
        elif dtype is not None:
            g = g.to(dtype)
        return g.reshape(B, T, H * self.head_dim).to(self.device, non_blocking=True)

    def __call__(self, token_ids, *, dtype=None) -> torch.Tensor:
        """Raw ids (B, T) -> rows (B, T, orders*K*head_dim): table dtype, FP8 -> float32 (or `dtype`)."""
        if self.backend == "triton":
            from .triton_lookup import triton_lookup

            ids = torch.as_tensor(token_ids, dtype=torch.int64, device=self.device)
            return triton_lookup(self, ids if ids.ndim == 2 else ids[None], dtype=dtype)
        self.stats["lookups"] += 1
        return self.gather(self.row_ids(token_ids), dtype=dtype)

    def prefetcher(self, batches, *, depth: int = 2):
        """Iterate rows of `batches` with batch i+1 hashed and gathered on a background thread."""
        return OffloadPrefetcher(self, batches, depth=depth)


class OffloadPrefetcher:
    """Background thread computing row ids + gather for the next batches while one is consumed."""

    _END = object()

    def __init__(self, lookup: EngramLookup, batches, *, depth: int = 2, dtype=None):
        self.lookup, self.q = lookup, queue.Queue(maxsize=max(1, depth))
        self.dtype = dtype
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(iter(batches),), daemon=True)
        self.thread.start()

    def _run(self, it):
        try:
            for b in it:
                self.q.put(self.lookup(b, dtype=self.dtype))
        except BaseException as e:  # handed to the consumer
            self.error = e
        self.q.put(self._END)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item
