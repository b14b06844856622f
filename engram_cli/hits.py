"""Hit counting: how many corpus windows hash to each row of a layer's table.

Beside the hashing it applies (`engram_cli.hashing.ngram_row_ids`): for every order n
and head j, every distinct n-gram with count c adds c to row `offset_j + hash_j(ngram)`.
Streams the n-gram statistics; holds one row range plus `HASH_IN_FLIGHT` batches (read
and hashed in `HASH_WORKERS` threads, accumulated in the caller's), so a layer of any
size is counted in passes of bounded memory (`count_passes`). A row range no larger
than `BINCOUNT_ROWS_PER_INDEX` x a batch is counted whole in the workers
(`_batch_hits`: per head, np.bincount, exact), each handing back its batch's hits.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from .defaults import DEFAULT_MEMORY_LIMIT
from .encode import map_in_threads
from .hashing import ngram_mix, ngram_row_ids
from .ngrams import NgramStats
from .plan import TablePlan

HASH_WORKERS = 2  # threads reading and hashing statistics batches (numpy and polars release the GIL)
HASH_IN_FLIGHT = 3  # batches held at once (the workers' and one read ahead): each gets 1/3 of the batch memory
BINCOUNT_ROWS_PER_INDEX = 4  # np.bincount when the accumulator has at most this many rows per index of the batch
EXACT_FLOAT_SUM = 1 << 53  # float64 sums of integers below this are exact


def _stats_batch_rows(order: int, heads: int, memory_limit: int) -> int:
    per_ngram = order * 12 + 16 + heads * 8 * 3  # polars columns, ids, counts, row ids, masks
    return int(min(1 << 21, max(1 << 12, (memory_limit // 4) // per_ngram)))


def _accumulate(acc: np.ndarray, index: np.ndarray, weights: np.ndarray) -> None:
    """acc[index] += weights (uint64, repeated indices summed), exactly; `weights` broadcasts against `index`.

    np.bincount is several times faster than np.add.at but costs O(len(acc)) per batch
    plus two accumulator-sized temporaries, and sums in float64: it is used (one call
    per head column) when the accumulator is no larger than `BINCOUNT_ROWS_PER_INDEX` x
    the batch's n-grams and one column's hits sum below 2**53 (every partial sum is then
    an exact integer); np.add.at (O(len(index)), no extra memory) otherwise.
    """
    if not index.size:
        return
    columns = index.reshape(index.shape[0], -1) if index.ndim else index.reshape(1, 1)  # (m, h): one bincount per head
    m = columns.shape[0]
    if acc.size <= BINCOUNT_ROWS_PER_INDEX * m and int(weights.max(initial=0)) * m < EXACT_FLOAT_SUM:
        weights = np.broadcast_to(weights, index.shape).reshape(columns.shape)
        shared = weights.strides[1] == 0  # counts broadcast over the heads: converted once
        as_float = weights[:, 0].astype(np.float64) if shared else None
        for j in range(columns.shape[1]):
            w = as_float if shared else weights[:, j].astype(np.float64)
            acc += np.bincount(columns[:, j], weights=w, minlength=acc.size).astype(np.uint64)
        return
    np.add.at(acc, index, weights.astype(np.uint64, copy=False))


def _batch_hits(batch, *, plan: "TablePlan", layer_id: int, order: int, heads: list[int], start: int, rows: int) -> tuple[np.ndarray, int]:
    """The hits one statistics batch adds to rows [start, start + rows): (rows,) uint64, and its n-grams.

    Head by head, the rows of `hashing.ngram_row_ids` (floor modulo by the head's
    prime, plus its row offset) counted by np.bincount in float64 where the batch's
    hits sum below 2**53 (exact), else np.add.at; no (m, K) array is made.
    """
    ids, counts = batch
    m = int(ids.shape[0])
    mix = ngram_mix(ids, plan.multipliers[layer_id][:order])
    primes, offsets = plan.order_primes(layer_id, order), plan.order_offsets(layer_id, order)
    part = np.zeros(rows, dtype=np.uint64)
    exact = int(counts.max(initial=0)) * m < EXACT_FLOAT_SUM
    weights = counts.astype(np.float64) if exact else counts.astype(np.uint64)
    for j in heads:
        r = mix % primes[j]
        r += offsets[j] - start
        w = weights
        if int(offsets[j]) < start or int(offsets[j] + primes[j]) > start + rows:  # the head straddles the range
            keep = (r >= 0) & (r < rows)
            r, w = r[keep], weights[keep]
        if exact:
            part += np.bincount(r, weights=w, minlength=rows).astype(np.uint64)
        else:
            np.add.at(part, r, w)
    return part, m


def hit_counts(
    plan: "TablePlan",
    layer_id: int,
    stats: "NgramStats",
    start: int = 0,
    stop: int | None = None,
    *,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Hits of rows [start, stop) of a layer: (stop - start,) uint64.

    `on_batch(m)` is called after each batch of m n-grams.
    """
    rows = plan.layer_rows(layer_id)
    stop = rows if stop is None else stop
    acc = np.zeros(stop - start, dtype=np.uint64)
    for order in orders_touching(plan, layer_id, start, stop):
        offsets = plan.row_offsets(layer_id)
        sizes = plan.head_primes(layer_id)
        first = (order - 2) * plan.heads
        heads = [j for j in range(plan.heads) if offsets[first + j] < stop and offsets[first + j] + sizes[first + j] > start]
        whole = all(offsets[first + j] >= start and offsets[first + j] + sizes[first + j] <= stop for j in heads)
        batch_rows = _stats_batch_rows(order, plan.heads, memory_limit // HASH_IN_FLIGHT)
        batches = stats.iter_batches(order, batch_rows=batch_rows)
        if acc.size <= BINCOUNT_ROWS_PER_INDEX * batch_rows:  # a small range: each worker counts its batch whole
            partial = functools.partial(_batch_hits, plan=plan, layer_id=layer_id, order=order, heads=heads, start=start, rows=acc.size)
            for part, m in map_in_threads(batches, partial, HASH_WORKERS, HASH_IN_FLIGHT - HASH_WORKERS):
                acc += part
                if on_batch is not None:
                    on_batch(m)
            continue

        def rows_of(batch, heads=heads):
            ids, counts = batch
            return ngram_row_ids(plan, layer_id, ids)[:, heads], counts, int(ids.shape[0])  # (m, h) rows of the heads here

        for row_ids, counts, m in map_in_threads(batches, rows_of, HASH_WORKERS, HASH_IN_FLIGHT - HASH_WORKERS):
            if whole:  # counts broadcast over the heads: no (m, h) copy of them
                if start:
                    row_ids -= start
                _accumulate(acc, row_ids, counts[:, None])
            else:
                keep = (row_ids >= start) & (row_ids < stop)
                _accumulate(acc, row_ids[keep] - start, np.broadcast_to(counts[:, None], row_ids.shape)[keep])
            if on_batch is not None:
                on_batch(m)
    return acc


def orders_touching(plan: "TablePlan", layer_id: int, start: int, stop: int) -> list[int]:
    """The n-gram orders with at least one head whose rows overlap [start, stop)."""
    offsets, sizes = plan.row_offsets(layer_id), plan.head_primes(layer_id)
    out = []
    for order in plan.orders:
        i = (order - 2) * plan.heads
        if any(offsets[i + j] < stop and offsets[i + j] + sizes[i + j] > start for j in range(plan.heads)):
            out.append(order)
    return out


def per_order_sums(plan: "TablePlan", layer_id: int, start: int, acc: np.ndarray) -> dict[int, int]:
    """Sum of the hits `acc` (rows [start, start + len(acc))) falling in each order's rows."""
    stop = start + len(acc)
    offsets = plan.row_offsets(layer_id)
    ends = offsets + plan.head_primes(layer_id)
    out = {}
    for order in plan.orders:
        i = (order - 2) * plan.heads
        lo, hi = max(start, int(offsets[i])), min(stop, int(ends[i + plan.heads - 1]))
        out[order] = int(acc[lo - start : hi - start].sum()) if lo < hi else 0
    return out


def count_passes(plan: "TablePlan", pass_rows: int) -> list[tuple[int, int, int]]:
    """(layer_id, start, stop) row ranges of at most `pass_rows` rows covering every layer."""
    return [
        (layer_id, start, min(plan.layer_rows(layer_id), start + pass_rows))
        for layer_id in plan.layer_ids
        for start in range(0, plan.layer_rows(layer_id), pass_rows)
    ]
