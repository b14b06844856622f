"""The hash state of one (layer, order): its distinct n-grams hashed into every head's buckets.

`load_order_keys` streams an order's n-grams once and keeps, per distinct n-gram, its
count (int64) and either its 64-bit mix (int64, `reference` family: docs/spec.md,
"Hash") or one XXH3_64 digest per head (uint64, `xxh3` family, seeded per head by
`xxh3_seed`); `OrderKeys.buckets` reduces them modulo a head's prime (uint32 per
n-gram; int64 only for a prime above 2^32). The n-gram ids themselves are never held.

Also here: exact duplicate detection over such keys and bucket tuples (`duplicated`,
`duplicated_rows`, `collide_mask`), which every figure of the audit builds on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import repeat
from typing import Callable, Sequence

import numpy as np

from ..hashing import ngram_mix, xxh3_digests, xxh3_seed
from ..kinds import HashFamily
from ..ngrams import NgramStats
from ..plan import TablePlan

Progress = Callable[..., None]

SMALL_SET = 4096  # candidate sets this small get the exact pairwise comparison
BATCH_ROWS = 1 << 21
BUCKET_CHUNK = 1 << 20  # rows reduced per step when computing one head's buckets


def bucket_dtype(p: int) -> np.dtype:
    """Buckets of a head with prime p are stored as uint32 (every p <= 2^32), else int64."""
    return np.dtype(np.uint32) if int(p) <= (1 << 32) else np.dtype(np.int64)


def count_dtype(k: int) -> np.dtype:
    """The smallest unsigned dtype that holds 0..k (head counters)."""
    return np.dtype(np.uint8) if k < (1 << 8) else np.dtype(np.uint16) if k < (1 << 16) else np.dtype(np.int64)


def no_progress(*_args, **_kwargs) -> None:
    """The progress callback of a caller that shows none."""


# -- exact duplicate detection -----------------------------------------------------
_FILTER_MULTS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


def duplicated(key: np.ndarray) -> np.ndarray:
    """Exact mask of the entries of an int64/uint64 array whose value occurs more than once.

    A few rounds of multiply-shift hashing into ~2n bins drop entries whose hash bin is
    alone (an equal value always shares the bin, so no duplicate is lost); the survivors
    are sorted and compared exactly.
    """
    key = np.asarray(key)
    n = key.size
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    k = key.astype(np.uint64, copy=False) if key.dtype != np.int64 else key.view(np.uint64)
    lo, hi = int(k.min()), int(k.max())
    if hi - lo < max(1 << 22, 2 * n):  # small range: count directly
        kk = (k - np.uint64(lo)).view(np.int64)
        return (np.bincount(kk, minlength=hi - lo + 1) > 1)[kk]
    idx = None
    for mult in _FILTER_MULTS:
        size = k.size
        if size <= SMALL_SET:
            break
        bits = int(min(23, max(10, math.ceil(math.log2(size)) + 1)))
        h = ((k * np.uint64(mult)) >> np.uint64(64 - bits)).view(np.int64)
        keep = (np.bincount(h, minlength=1 << bits) > 1)[h]
        k = k[keep]
        idx = np.flatnonzero(keep) if idx is None else idx[keep]
        if k.size > 0.7 * size:  # the filter stopped paying off
            break
    if idx is None:
        idx = np.arange(n)
    order = np.argsort(k, kind="stable")
    ks = k[order]
    same = ks[1:] == ks[:-1]
    dup = np.zeros(ks.size, dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    out[idx[order[dup]]] = True
    return out


def duplicated_rows(cols: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """Exact mask of rows (one value per column, column c in [0, sizes[c])) equal to another row."""
    n = cols[0].size
    if math.prod(int(s) for s in sizes) < (1 << 63):  # pack exactly into one int64
        key = np.asarray(cols[0], dtype=np.int64).copy()
        for c, s in zip(cols[1:], sizes[1:]):
            key *= np.int64(s)
            key += np.asarray(c, dtype=np.int64)
        return duplicated(key)
    # hash-combine as a filter (equal rows give equal hashes), then compare exactly
    h = np.zeros(n, dtype=np.uint64)
    for c, mult in zip(cols, repeat(np.uint64(_FILTER_MULTS[0]))):
        h ^= np.asarray(c).astype(np.uint64)
        h *= mult
        h ^= h >> np.uint64(29)
    cand = np.flatnonzero(duplicated(h))
    out = np.zeros(n, dtype=bool)
    if cand.size:
        sub = np.stack([np.asarray(c)[cand] for c in cols], axis=1)
        _, inverse, counts = np.unique(sub, axis=0, return_inverse=True, return_counts=True)
        out[cand[counts[inverse.ravel()] > 1]] = True
    return out


def collide_mask(buckets: np.ndarray, p: int) -> np.ndarray:
    """Which n-grams share their bucket (values in [0, p)) with another n-gram."""
    if p <= max(1 << 22, 4 * buckets.size):
        return (np.bincount(buckets, minlength=p) > 1)[buckets]
    return duplicated(buckets)


# -- per (layer, order) hashing state ------------------------------------------------
@dataclass
class OrderKeys:
    """The hash state of one order in one layer: what every head's bucket is derived from."""

    family: str
    layer_id: int
    order: int
    counts: np.ndarray  # (m,) int64
    mix: np.ndarray | None = None  # (m,) int64, reference family
    digests: np.ndarray | None = None  # (m, H) uint64, xxh3 family (head j in column j)
    _mix_dup: np.ndarray | None = None

    @property
    def m(self) -> int:
        return int(self.counts.size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def buckets(self, head: int, p: int) -> np.ndarray:
        """Bucket in [0, p) of every n-gram for head `head` with table size p.

        uint32 (4 bytes per n-gram) when p <= 2^32, which every plan prime is in practice;
        int64 otherwise. Computed in chunks, so no full-length int64 temporary is made.
        """
        p = int(p)
        out = np.empty(self.m, dtype=bucket_dtype(p))
        for start in range(0, self.m, BUCKET_CHUNK):
            end = start + BUCKET_CHUNK
            if self.family == HashFamily.REFERENCE:
                out[start:end] = self.mix[start:end] % np.int64(p)
            else:
                out[start:end] = self.digests[start:end, head] % np.uint64(p)
        return out

    def mix_duplicated(self) -> np.ndarray | None:
        """Reference only: which n-grams' 64-bit mix equals another n-gram's."""
        if self.mix is None:
            return None
        if self._mix_dup is None:
            self._mix_dup = duplicated(self.mix)
        return self._mix_dup


def load_order_keys(plan: TablePlan, stats: NgramStats, layer_id: int, order: int, family: str, *, heads: int, progress: Progress = no_progress, batch_rows: int = BATCH_ROWS) -> OrderKeys:
    """Stream one order's distinct n-grams once and keep only what the hash needs."""
    total = stats.distinct(order)
    counts, parts = [], []
    seeds = [xxh3_seed(plan.seed, layer_id, order, j) for j in range(heads)]
    mult = plan.multipliers[layer_id][:order]
    done = 0
    stage, detail = "hash n-grams", f"{family} layer {layer_id} order {order}"
    progress(stage, 0, total, detail)
    for ids, cnt in stats.iter_batches(order, batch_rows):
        counts.append(cnt)
        parts.append(ngram_mix(ids, mult) if family == HashFamily.REFERENCE else xxh3_digests(ids, seeds))
        done += cnt.size
        progress(stage, done, total, detail)
    counts_arr = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    if family == HashFamily.REFERENCE:
        return OrderKeys(family, layer_id, order, counts_arr, mix=np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return OrderKeys(family, layer_id, order, counts_arr, digests=np.concatenate(parts) if parts else np.zeros((0, heads), np.uint64))
