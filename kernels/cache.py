"""Row caches for tables that do not sit on the device: a hot-row cache and a bounded chunk cache.

- `HotRowCache`: the `capacity` rows with the highest hit counts (the store's per-row
  hits array, or counts gathered online) held resident (on the device in production);
  hot rows are found by binary search in the sorted hot ids, so its memory is
  proportional to the cache, not the table. It counts hits per head column, hence per
  order (`hit_rates()`).
- `ChunkCache`: reads rows of a zarr table through an LRU of whole chunks
  (`chunk_rows` rows each, chunk-aligned reads), holding at most `max_resident_bytes`
  of chunks, so tables larger than RAM can be looked up with bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


def top_rows(hits, capacity: int, block_rows: int = 1 << 22) -> np.ndarray:
    """Sorted ids of the `capacity` rows with the most hits, reading `hits` block by block."""
    n = int(hits.shape[0])
    capacity = max(0, min(int(capacity), n))
    if capacity == 0:
        return np.zeros(0, dtype=np.int64)
    best_ids = np.zeros(0, dtype=np.int64)
    best_hits = np.zeros(0, dtype=np.uint64)
    for s in range(0, n, block_rows):
        h = np.asarray(hits[s : s + block_rows], dtype=np.uint64)
        ids = np.concatenate([best_ids, np.arange(s, s + h.shape[0], dtype=np.int64)])
        hh = np.concatenate([best_hits, h])
        if hh.shape[0] > capacity:
            keep = np.argpartition(-hh.astype(np.float64), capacity - 1)[:capacity]
            ids, hh = ids[keep], hh[keep]
        best_ids, best_hits = ids, hh
    return np.sort(best_ids)


class OrderMaskedHits:
    """A hits array read as zero outside the row ranges `keep` [(start, stop), ...]; sliced block by block."""

    def __init__(self, hits, keep):
        self.hits, self.keep = hits, list(keep)
        self.shape = tuple(hits.shape)

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.shape[0])
        out = np.zeros(max(0, stop - start), dtype=np.uint64)
        for a, b in self.keep:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                out[lo - start : hi - start] = np.asarray(self.hits[lo:hi], dtype=np.uint64)
        return out


class _SummedHits:
    """store hits + online counts, sliced block by block (what top_rows reads)."""

    def __init__(self, prior, online: torch.Tensor):
        self.prior, self.online = prior, online
        self.shape = tuple(prior.shape)

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.prior[sl], dtype=np.uint64) + self.online[sl].numpy().astype(np.uint64)


class HotRowCache:
    """Resident copies of the most-hit rows; everything else is read from `source`."""

    def __init__(self, source, hits, capacity: int, *, device=None, heads: int | None = None, refresh_every: int = 0, keep=None):
        self.keep = keep  # row ranges [(start, stop)] the cache may hold (None: all)
        self.source = source  # a torch table (host) or a ChunkCache
        self.prior, self.capacity, self.device = hits, int(capacity), device
        self.heads = heads
        self.hits = None
        self.total = None
        # online counts (refresh_every > 0): the rows looked up are counted (one uint32 per
        # table row, on the host) and every `refresh_every` gathers the cache is refilled
        # with the top rows of store hits + online counts, so it follows the text served.
        self.refresh_every = int(refresh_every)
        self.online = torch.zeros(int(hits.shape[0]), dtype=torch.int32) if self.refresh_every else None
        self.gathers = 0
        self._fill(hits)

    def _fill(self, hits) -> None:
        if self.keep is not None:
            hits = OrderMaskedHits(hits, self.keep)
        self.ids = torch.from_numpy(top_rows(hits, self.capacity))
        rows = read_rows(self.source, self.ids)
        self.rows = rows.to(self.device) if self.device is not None else rows

    def refresh(self) -> None:
        """Refill with the top rows of the store's hits plus the counts gathered online."""
        self._fill(_SummedHits(self.prior, self.online))

    def gather(self, flat_rows: torch.Tensor, columns: int) -> torch.Tensor:
        """Rows for `flat_rows` (N,) = (B*T*columns,), counting hits per column (head)."""
        flat = flat_rows.cpu()
        n = self.ids.shape[0]
        if n:
            slot = torch.searchsorted(self.ids, flat).clamp_(max=n - 1)
            hit = self.ids[slot] == flat
        else:
            slot = torch.zeros_like(flat)
            hit = torch.zeros(flat.shape, dtype=torch.bool)
        if self.online is not None:
            self.online.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.int32))
        per_col = hit.view(-1, columns).sum(0)
        self.hits = per_col if self.hits is None else self.hits + per_col
        self.total = (0 if self.total is None else self.total) + flat.shape[0] // columns
        miss = ~hit
        out = torch.empty((flat.shape[0],) + tuple(self.rows.shape[1:]), dtype=self.rows.dtype, device=self.rows.device)
        out[hit.to(out.device)] = self.rows[slot[hit].to(out.device)]
        if miss.any():
            out[miss.to(out.device)] = read_rows(self.source, flat[miss]).to(out.device, non_blocking=True)
        self.gathers += 1
        if self.refresh_every and self.gathers % self.refresh_every == 0:
            self.refresh()
        return out

    def hit_rates(self, orders, heads: int) -> dict:
        """Overall and per-order hit rates of the lookups so far."""
        if self.hits is None:
            return {"overall": 0.0, "per_order": {n: 0.0 for n in orders}}
        h = self.hits.double()
        per = {n: float(h[i * heads : (i + 1) * heads].sum() / (heads * self.total)) for i, n in enumerate(orders)}
        return {"overall": float(h.sum() / (h.numel() * self.total)), "per_order": per}


class ChunkCache:
    """Row reads from a zarr array through an LRU of whole chunks, bounded in bytes."""

    def __init__(self, array, chunk_rows: int, max_resident_bytes: int):
        self.array = array
        self.chunk_rows = int(chunk_rows)
        self.shape = tuple(array.shape)
        row_bytes = int(np.prod(self.shape[1:])) * np.dtype(array.dtype).itemsize
        self.chunk_bytes = self.chunk_rows * row_bytes
        self.max_chunks = max(1, int(max_resident_bytes) // self.chunk_bytes)
        self.chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.reads = 0
        self.peak_resident_bytes = 0

    @property
    def resident_bytes(self) -> int:
        return sum(c.nbytes for c in self.chunks.values())

    def _chunk(self, c: int) -> np.ndarray:
        a = self.chunks.get(c)
        if a is not None:
            self.chunks.move_to_end(c)
            return a
        s = c * self.chunk_rows
        a = np.asarray(self.array[s : min(self.shape[0], s + self.chunk_rows)])
        self.reads += 1
        self.chunks[c] = a
        while len(self.chunks) > self.max_chunks:
            self.chunks.popitem(last=False)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        return a

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (N,) -> (N, *row_shape), chunk by chunk (each needed chunk read once per call)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.shape[0],) + self.shape[1:], dtype=self.array.dtype)
        chunk = rows // self.chunk_rows
        order = np.argsort(chunk, kind="stable")
        cs = chunk[order]
        bounds = np.flatnonzero(np.diff(cs)) + 1
        for grp in np.split(order, bounds):
            if grp.size:
                c = int(chunk[grp[0]])
                out[grp] = self._chunk(c)[rows[grp] - c * self.chunk_rows]
        return out


def read_rows(source, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a torch table or a ChunkCache (bfloat16 words read as bfloat16), as a torch tensor."""
    if isinstance(source, ChunkCache):
        a = source.take(ids.cpu().numpy())
        if a.dtype == np.uint16:  # bfloat16 words
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return source.index_select(0, ids.to(source.device))
