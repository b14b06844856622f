"""EngramLookup: raw token ids -> hashed row ids -> gathered (and dequantized) table rows.

Composes the kernels, one stem each: kernels/hash.py (row ids: torch reference, fast
CPU), kernels/gather.py (gather + FP8 dequant into one output), kernels/triton_lookup.py
(the fused Triton kernel), kernels/offload.py (the prefetch pipeline), kernels/cache.py
(hot-row cache, bounded chunk cache).

Backends (see docs/kernels.md; one implementation each in kernels/registry.py):
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

import numpy as np
import torch

from engram_cli.errors import BackendError, PlanError
from engram_cli.hashing import check_token_ids
from engram_cli.kernels.cache import ChunkCache, HotRowCache, read_rows
from engram_cli.kernels.dequant import int_dequant_into, remap_rows, zero_dropped
from engram_cli.kernels.gather import dequant_into, gather_into, gather_rows, output_dtype
from engram_cli.kernels.hash import RowHasher
from engram_cli.kernels.offload import OffloadPrefetcher
from engram_cli.kernels.registry import REGISTRY, resolve_backend
from engram_cli.kinds import Backend, TableDtype


def _as_tensor(table, dtype: TableDtype) -> torch.Tensor:
    if isinstance(table, np.ndarray):
        if table.dtype == np.uint16 and dtype == TableDtype.BFLOAT16:
            return torch.from_numpy(table.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(table))
    t = table
    if t.dtype == torch.uint16 and dtype == TableDtype.BFLOAT16:
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.contiguous()


def _table_dtype(plan, table) -> TableDtype:
    """The logical dtype: the plan's; a bare uint8 table (head_dim + head_dim//32 wide, e.g.
    one built by hand in a test) is read as packed FP8 rows."""
    if table is not None and str(getattr(table, "dtype", "")).endswith("uint8"):
        return TableDtype.parse(plan.dtype) if TableDtype.parse(plan.dtype).integer else TableDtype.FLOAT8_E4M3
    return TableDtype.parse(plan.dtype)


class EngramLookup:
    """Row ids and rows of one layer's Engram table for raw tokenizer ids (B, T)."""

    def __init__(self, plan, vocab, layer_id: int, table=None, *, backend: Backend | str = Backend.AUTO, device=None, kept=None):
        if layer_id not in plan.layer_ids:
            raise PlanError(f"layer {layer_id} is not in the plan's layers {list(plan.layer_ids)}; pick one of them")
        self.plan, self.vocab, self.layer_id = plan, vocab, int(layer_id)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.backend = resolve_backend(backend, self.device)
        self.impl = REGISTRY[self.backend]
        self.dtype_name = _table_dtype(plan, table)
        self.head_dim = plan.head_dim
        self.orders = plan.orders
        self.K = plan.heads
        # offload: the table stays in host memory, so rows are hashed and gathered there
        self.host = self.impl.host
        lookup = vocab.lookup if hasattr(vocab, "lookup") else vocab
        self.hasher = RowHasher(plan, lookup, self.layer_id, "cpu" if self.host else self.device)
        h = self.hasher  # the Triton kernel reads these
        self.lookup_ids, self.mult, self.primes, self.offsets, self.head_order = h.lookup_ids, h.mult, h.primes, h.offsets, h.head_order
        self.table = None
        if table is not None:
            t = _as_tensor(table, self.dtype_name)
            if self.host:
                if self.device.type == "cuda":
                    t = t.pin_memory()
            else:
                t = t.to(self.device)
            self.table = t
        self.stats = {"lookups": 0}
        self.hot = None
        # a pruned table (docs/spec.md "Pruned tables"): `table` holds the rows `kept` (sorted
        # global row ids) only; a lookup of any other row reads zeros
        self.kept = None if kept is None else torch.as_tensor(kept, dtype=torch.int64).to("cpu" if self.host else self.device)
        self._device_hasher = None

    def device_hasher(self) -> RowHasher:
        """The hash constants on this lookup's device (the offload backend hashes on the host,
        except on its UVA path, where the kernel runs on the device)."""
        if self.hasher.device == self.device:
            return self.hasher
        if self._device_hasher is None:
            self._device_hasher = RowHasher(self.plan, self.hasher.host["lookup"], self.layer_id, self.device)
        return self._device_hasher

    @property
    def fp8(self) -> bool:
        return self.dtype_name.fp8

    def use_hot_cache(self, hits, capacity: int, *, orders=None, refresh_every: int = 0) -> "EngramLookup":
        """Keep the `capacity` most-hit rows resident on the device; misses read from the table.

        orders: spend the capacity on rows of these n-gram orders only (e.g. (2,): bigram
        rows, the most reused); default: the most-hit rows of the whole layer.
        refresh_every: count the rows looked up online and refill the cache every that many
        lookups from store hits + online counts (0: static, store hits only).
        """
        keep = None
        if orders is not None:
            n_rows = self.plan.layer_rows(self.layer_id)
            starts = [int(self.plan.order_offsets(self.layer_id, n)[0]) for n in self.orders] + [n_rows]
            keep = [(starts[i], starts[i + 1]) for i, n in enumerate(self.orders) if n in set(orders)]
        if self.kept is not None:  # a pruned table: hits and ranges of the kept rows, in its own row numbers
            kept = self.kept.cpu().numpy()
            hits = np.asarray(hits.get_orthogonal_selection(kept) if hasattr(hits, "get_orthogonal_selection") else np.asarray(hits)[kept])
            keep = None if keep is None else [tuple(int(v) for v in np.searchsorted(kept, r)) for r in keep]
        self.hot = HotRowCache(self.table, hits, capacity, device=self.device, refresh_every=refresh_every, keep=keep)
        return self

    def hit_rates(self) -> dict:
        """Hot-cache hit rates so far, overall and per order (empty without a cache)."""
        return self.hot.hit_rates(self.orders, self.K) if self.hot is not None else {}

    @classmethod
    def from_store(cls, store_or_path, layer_id: int, *, backend: Backend | str = Backend.AUTO, device=None, cache_rows=None, max_resident_bytes=None):
        """Open a store (or take an open one) and load the layer's rows in storage form.

        cache_rows: keep that many most-hit rows (store.hits) resident (hot-row cache).
        max_resident_bytes: do not load the layer; read rows through a bounded LRU chunk
        cache instead (tables larger than RAM; backends torch/cpu/offload).
        """
        # imported here: the store reader needs zarr, and the kernels run (and are tested) on
        # machines with only torch, triton and numpy (tests/kernels/conftest.py)
        from engram_cli.store import TableStore

        store = store_or_path if hasattr(store_or_path, "table") else TableStore.open(store_or_path)
        if max_resident_bytes is not None:
            named = Backend.parse(backend)
            if REGISTRY[resolve_backend(named, device) if named is Backend.AUTO else named].resident_only:
                raise BackendError("the triton backend needs the table on the device; drop max_resident_bytes or use backend offload")
            lk = cls(store.plan, store.vocab, layer_id, None, backend=backend, device=device, kept=store.kept_rows(layer_id))
            lk.table = ChunkCache(store.table(layer_id), store.chunk_rows, max_resident_bytes)
        else:
            lk = cls(store.plan, store.vocab, layer_id, store.load_layer(layer_id), backend=backend, device=device, kept=store.kept_rows(layer_id))
        lk.store = store
        if cache_rows:
            lk.use_hot_cache(store.hits(layer_id), int(cache_rows))
        return lk

    # ---------------------------------------------------------------- row ids
    def _ids(self, token_ids, device) -> torch.Tensor:
        """Raw ids as int64 (B, T) on `device`, checked where they are given (docs/spec.md, "Ids
        outside the vocabulary"): an id >= the vocabulary size is a TokenIdError before any
        kernel runs (ids already on a GPU cost one reduction and a scalar read there)."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64)
        if ids.numel():
            check_token_ids(int(ids.max()), self.hasher.vocab_size)
        ids = ids.to(device)
        return ids[None] if ids.ndim == 1 else ids

    def row_ids(self, token_ids) -> torch.Tensor:
        """Raw tokenizer ids (B, T) -> int64 (B, T, orders*K) rows of the layer's table."""
        return self.impl.row_ids(self, self._ids(token_ids, self.hasher.device)).to(self.device)

    # ---------------------------------------------------------------- rows
    def gather(self, rows: torch.Tensor, *, dtype=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row ids (B, T, H) -> rows (B, T, H*head_dim), on this lookup's device.

        out: a (B, T, H*head_dim) tensor of the output dtype to write into (reused across
        calls it saves the page faults of a fresh output: see docs/kernels.md).
        """
        if self.table is None:
            raise BackendError("this EngramLookup has no table; pass table= or use EngramLookup.from_store")
        B, T, H = rows.shape
        flat = rows.reshape(-1)
        dropped = None
        if self.kept is not None:  # a pruned table: its own row numbers, dropped rows zeroed below
            flat, dropped = remap_rows(self.kept, flat.to(self.kept.device))
        if self.dtype_name.packed:
            table_dtype = torch.uint8
        elif isinstance(self.table, torch.Tensor):
            table_dtype = self.table.dtype
        else:  # ChunkCache: the rows' torch dtype (bfloat16 stored as uint16 words, read as bfloat16)
            table_dtype = self.dtype_name.torch_dtype
        odt = output_dtype(table_dtype, self.dtype_name.packed, dtype)
        on_host = self.host or self.hot is not None or not isinstance(self.table, torch.Tensor)
        where = torch.device("cpu") if on_host and self.hot is None else self.device
        pin = where.type == "cpu" and self.device.type == "cuda"
        shape = (B, T, H * self.head_dim)
        final = None  # a caller's `out` that the rows are copied into at the end
        if out is None or out.device != where or out.shape != shape or out.dtype != odt or not out.is_contiguous():
            final, out = out, torch.empty(shape, dtype=odt, device=where, pin_memory=pin)
        flat_out = out.view(B * T * H, self.head_dim)
        if self.dtype_name.integer:  # int8/int4 rows (kernels/dequant.py)
            if self.hot is not None:
                g = self.hot.gather(flat, H)
            else:
                g = gather_rows(self.table, flat) if isinstance(self.table, torch.Tensor) else read_rows(self.table, flat)
            int_dequant_into(g, self.head_dim, self.dtype_name.value, flat_out)
        elif self.hot is not None:
            dequant_into(self.hot.gather(flat, H), self.head_dim, self.fp8, flat_out)
        elif isinstance(self.table, torch.Tensor):
            gather_into(self.table, flat, self.head_dim, self.fp8, flat_out, fast=not self.impl.reference)
        else:
            dequant_into(read_rows(self.table, flat), self.head_dim, self.fp8, flat_out)
        if dropped is not None:
            zero_dropped(flat_out, dropped)
        if final is not None:  # an `out` on the device: the host rows copied into it
            return final.copy_(out, non_blocking=True)
        return out.to(self.device, non_blocking=True)

    def __call__(self, token_ids, *, dtype=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Raw ids (B, T) -> rows (B, T, orders*K*head_dim): table dtype, FP8 -> float32 (or `dtype`).

        out: write the rows into this tensor (backends torch/cpu/offload; see `gather`)."""
        self.stats["lookups"] += 1
        return self.impl.lookup(self, self._ids(token_ids, self.hasher.device), dtype, out)

    def prefetcher(self, batches, *, depth: int = 2, dtype=None):
        """Iterate rows of `batches` with the next `depth` hashed and gathered on a background thread."""
        return OffloadPrefetcher(self, batches, depth=depth, dtype=dtype)
