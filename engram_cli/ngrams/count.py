"""Exact n-gram counting (`count_ngrams`): compressed id sequences -> `NgramStats`, in bounded memory.

Counting packs each n-gram into uint64 key columns (ceil(log2 C) bits per id, see
`KeyLayout`; all orders of a batch by shift-or in one pass, `_batch_keys`) and counts
every batch (at most `MAX_BATCH_TOKENS` tokens; a longer document is sliced, each slice
carrying the max-1 tokens before it as context, so the windows are unchanged). An order
that packs into one key word (orders 2..3 for DeepSeek) is counted by sorting: a sort
(polars') and run lengths per batch, sorted runs merged in memory (`_merge_runs`),
already in text order at the end; wider orders by a polars group_by per batch. The
one-word orders are one chain: only the largest is sorted, each order below is the
distinct keys above it with their oldest id masked off, re-sorted (`_project`: the
same windows, far fewer keys). A batch is counted in threads (the chain in
`COUNT_SPLIT` parts, each wider order apart) while the caller's thread packs the next
one, so tokenizing, packing and counting overlap on every core. Partials are spilled
as sorted parquet runs when they outgrow the memory limit; the final merge of spilled
runs is a polars group_by per key range (row-group statistics skip the rest), so memory
stays bounded however many distinct n-grams there are. When nothing was spilled, the
orders are finished (merged, summarized, written) side by side in threads.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl

from ..defaults import DEFAULT_MEMORY_LIMIT
from .stats import (
    STATS_ROW_GROUP,
    NgramStats,
    SummaryBuilder,
    order_file,
    order_frame_columns,
    stats_summary,
    write_summary,
)

# -- exact counting ---------------------------------------------------------------------
BYTES_PER_ROW_OVERHEAD = 6  # merge = concat copy + hash table + output: ~6x the raw row bytes
SORTED_BYTES_PER_ROW_OVERHEAD = 4  # sorted runs: run + concat copy + argsort index + gathered copy while merging
_RUN_ROW_GROUP = 1 << 16  # small row groups in spilled runs: min/max statistics prune key ranges
_SAMPLES_PER_RUN = 1024
MAX_BATCH_TOKENS = 1 << 22  # tokens counted per batch at most; longer documents are sliced
BATCHES_IN_FLIGHT = 2  # one batch counted (in the order threads) while the next is packed
COUNT_SPLIT = 2  # the one-word orders of a batch are counted in this many parts, one thread each (numpy's sort is single-threaded)
COUNT_SPLIT_MIN = 1 << 16  # ... for batches of at least this many windows


class ContinuedIds(np.ndarray):
    """Ids that continue the previous document (a piece of it read and tokenized apart).

    `count_ngrams` counts them as the same document: their windows reach back into
    the pieces before (the same carried context as a sliced long document), and no
    left padding or document boundary comes before them. Make one with
    `ids.view(ContinuedIds)`.
    """


def id_bits(vocab_size: int) -> int:
    """Bits per packed compressed id: ceil(log2(C)), at least 1 (17 for DeepSeek's C = 99092)."""
    return max(1, (int(vocab_size) - 1).bit_length())


@dataclass(frozen=True)
class KeyLayout:
    """How an order's n-grams pack into uint64 key columns k0, k1, ...

    `64 // bits` ids per word, tok_0 in the most significant bits of k0: sorting by
    (k0, k1, ...) sorts the n-grams in text order (tok_0, tok_1, ...).
    """

    order: int
    bits: int

    @property
    def per_word(self) -> int:
        return 64 // self.bits

    @property
    def words(self) -> list[tuple[int, int]]:
        """Token index range [start, stop) held by each key column."""
        return [(a, min(self.order, a + self.per_word)) for a in range(0, self.order, self.per_word)]

    @property
    def key_columns(self) -> list[str]:
        return [f"k{i}" for i in range(len(self.words))]

    def pack(self, tokens: list[np.ndarray]) -> list[np.ndarray]:
        """tokens[j]: (L,) uint64 ids of tok_j -> one (L,) uint64 array per key column."""
        bits = np.uint64(self.bits)
        keys = []
        for a, b in self.words:
            key = tokens[a].copy()
            for j in range(a + 1, b):
                key <<= bits
                key |= tokens[j]
            keys.append(key)
        return keys

    def unpack_columns(self, keys: list[np.ndarray]) -> list[np.ndarray]:
        """Key columns -> one (m,) uint32 id array per token, tok_0 first (ids fit: bits <= 32)."""
        mask = np.uint64((1 << self.bits) - 1)
        out = []
        for key, (a, b) in zip(keys, self.words):
            key = np.asarray(key, dtype=np.uint64)
            for j in range(a, b):
                shift = self.bits * (b - 1 - j)
                col = key >> np.uint64(shift) if shift else key
                out.append((col & mask).astype(np.uint32) if j > a else col.astype(np.uint32))
        return out

    def unpack(self, keys: list[np.ndarray]) -> np.ndarray:
        """Key columns -> (m, n) int64 ids in text order."""
        m = len(keys[0]) if keys else 0
        ids = np.empty((m, self.order), dtype=np.int64)
        mask = np.uint64((1 << self.bits) - 1)
        for key, (a, b) in zip(keys, self.words):
            key = np.asarray(key, dtype=np.uint64)
            for j in range(a, b):
                ids[:, j] = (key >> np.uint64(self.bits * (b - 1 - j))) & mask
        return ids


def _sort(keys: np.ndarray) -> np.ndarray:
    """`keys` (uint64) in ascending order, by polars' sort: about half the CPU time of np.sort on packed n-gram keys."""
    return pl.Series(values=keys, dtype=pl.UInt64).sort().to_numpy()


def _run_starts(keys: np.ndarray) -> np.ndarray:
    """Sorted keys (L,), L > 0 -> the index where each run of equal keys starts."""
    first = np.empty(keys.size, dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return np.flatnonzero(first)


def _distinct_sorted(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys (L,) -> their distinct values and how often each occurs (uint64)."""
    if not keys.size:
        return keys, np.empty(0, dtype=np.uint64)
    starts = _run_starts(keys)
    counts = np.diff(starts, append=keys.size).astype(np.uint64)
    return keys[starts], counts


def _sum_sorted(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys with counts -> the distinct keys and each one's summed count."""
    if not keys.size:
        return keys, counts
    starts = _run_starts(keys)
    return keys[starts], np.add.reduceat(counts, starts)


def _merge_runs(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Runs of distinct sorted keys with counts -> one run (the counts of equal keys added).

    The runs laid end to end and sorted by key, counts alongside (polars' sort of the
    two columns: about half the CPU time of numpy's stable argsort and two gathers),
    then the counts of equal neighbours summed.
    """
    if len(runs) == 1:
        return runs[0]
    frame = pl.DataFrame({"k": np.concatenate([k for k, _ in runs]), "c": np.concatenate([c for _, c in runs])})
    runs.clear()  # the caller's list: the runs are let go as soon as they are copied
    frame = frame.sort("k")
    keys, counts = frame.get_column("k").to_numpy(), frame.get_column("c").to_numpy()
    del frame
    return _sum_sorted(keys, counts)


def _project(run: tuple[np.ndarray, np.ndarray], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A sorted run of order n+1 -> the sorted run of order n over the same windows.

    The order-n window ending at a position is the low n*`bits` bits of the
    order-(n+1) key ending there (one packed word, the newest id lowest), so the
    distinct keys masked, sorted and their counts added are exactly the run that
    sorting the order-n keys of the batch gives, from the (fewer) distinct keys.
    """
    keys, counts = run
    low = keys & np.uint64((1 << bits) - 1)
    count_bits = int(counts.max(initial=0)).bit_length()
    if bits + count_bits <= 64:  # key and count packed in one word: one plain sort, no argsort and gathers
        low <<= np.uint64(count_bits)
        low |= counts
        packed = _sort(low)
        counts = packed & np.uint64((1 << count_bits) - 1)
        low = packed >> np.uint64(count_bits)
        del packed
    else:
        order = np.argsort(low)
        low = low[order]
        counts = counts[order]
        del order
    return _sum_sorted(low, counts)


MAX_SORTED_RUNS = 16  # runs held before they are merged into one


class _OrderCounter:
    """Distinct keys and counts of one order: merged in memory, spilled as sorted runs.

    An order whose n-grams pack into one key word (orders 2..3 of the DeepSeek
    vocabulary: 17 bits per id) is counted by sorting: each batch's keys are sorted
    (numpy's vectorised sort) and run-length counted into a sorted run; up to
    `MAX_SORTED_RUNS` runs are held and merged in one pass (`_merge_runs`), and the
    merged run is already in text order (no sort at the end). Wider keys use a polars
    group_by per batch and merge partials by concatenation.
    """

    def __init__(self, layout: KeyLayout, budget_rows: int, merge_rows: int, spill_dir: Callable[[], Path], range_rows: int | None = None):
        self.layout = layout
        self.keys = layout.key_columns
        self.budget_rows = budget_rows
        self.range_rows = range_rows or budget_rows  # rows per final-merge range: orders merge one at a time
        self.merge_rows = merge_rows
        self.spill_dir = spill_dir
        self.sorted = len(layout.words) == 1
        self.mem: list[tuple[np.ndarray, np.ndarray]] = []  # sorted runs (keys, counts), sizes descending
        self.mem_rows = 0
        self.acc: pl.DataFrame | None = None
        self.pending: list[pl.DataFrame] = []
        self.pending_rows = 0
        self.runs: list[Path] = []
        self.run_rows = 0
        self.samples: list[tuple[np.ndarray, float]] = []  # (sampled k0 of a run, rows each stands for)
        self.above: _OrderCounter | None = None  # the sorted order n+1 counted from the same batches just before this one
        self.keep_run = False  # hold the last batch's run for the order below (`project_below`)
        self._thread = threading.local()  # .run: that run; a batch's chain runs in one thread, halves of a batch in two
        self._lock = threading.Lock()  # the runs held: two halves of a batch are pushed from two threads

    def project_below(self, above: "_OrderCounter") -> None:
        """Count this (sorted) order from the distinct keys of `above` (order + 1), batch by batch (`_project`)."""
        self.above = above
        above.keep_run = True

    def add_batch(self, keys: list[np.ndarray]) -> None:
        if self.sorted:
            above = getattr(self.above._thread, "run", None) if self.above is not None else None
            if above is not None:  # the same batch's windows, one order up: project its distinct keys
                self.above._thread.run = None
                run = _project(above, self.layout.order * self.layout.bits)
                if int(run[1].sum()) != keys[0].size:
                    raise AssertionError(f"order {self.layout.order}: the projected run counts {int(run[1].sum())} windows, the batch has {keys[0].size}")
            else:
                run = _distinct_sorted(_sort(keys[0]))
            if self.keep_run:
                self._thread.run = run
            with self._lock:
                self._push(run)
            return
        frame = pl.DataFrame({name: key for name, key in zip(self.keys, keys)})
        part = frame.lazy().group_by(self.keys).agg(pl.len().cast(pl.UInt64).alias("count")).collect()
        self.pending.append(part)
        self.pending_rows += part.height
        acc_rows = self.acc.height if self.acc is not None else 0
        if self.pending_rows >= max(acc_rows, self.merge_rows):
            self._merge()
            if self.acc.height > self.budget_rows:
                self._spill()

    def _push(self, run: tuple[np.ndarray, np.ndarray]) -> None:
        self.mem.append(run)
        self.mem_rows += run[0].size
        if len(self.mem) >= MAX_SORTED_RUNS or self.mem_rows > self.budget_rows:
            runs, self.mem = self.mem, []
            self.mem = [_merge_runs(runs)]
            self.mem_rows = self.mem[0][0].size
            if self.mem_rows > self.budget_rows // 2:  # little room left for new runs: spill
                self._spill()

    def _collapsed(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The sorted runs in memory merged into one (None when there are none), and let go."""
        runs, self.mem, self.mem_rows = self.mem, [], 0
        return _merge_runs(runs) if runs else None

    def _merge(self) -> None:
        frames = ([self.acc] if self.acc is not None else []) + self.pending
        self.pending, self.pending_rows = [], 0
        if not frames:
            return
        if len(frames) == 1:
            self.acc = frames[0]
            return
        self.acc = pl.concat(frames).lazy().group_by(self.keys).agg(pl.col("count").sum()).collect()

    def _spill(self) -> None:
        if self.sorted:
            keys, counts = self._collapsed()
            run = pl.DataFrame({self.keys[0]: keys, "count": counts})  # already sorted
            del keys, counts
        else:
            run = self.acc.sort(self.keys)
            self.acc = None
        path = self.spill_dir() / f"run_{self.layout.order}_{len(self.runs)}.parquet"
        run.write_parquet(path, compression="lz4", row_group_size=_RUN_ROW_GROUP, statistics=True)
        k0 = run.get_column(self.keys[0]).to_numpy()
        step = max(1, run.height // _SAMPLES_PER_RUN)
        self.samples.append((k0[::step].copy(), float(step)))
        self.runs.append(path)
        self.run_rows += run.height

    def has_runs(self) -> bool:
        return bool(self.runs)

    def finish(self, out: Path, builder: SummaryBuilder, progress, parts_dir: Callable[[], Path]) -> None:
        """Write the order's distinct n-grams, sorted in text order, to `out`."""
        order = self.layout.order
        if self.sorted and not self.runs:
            run = self._collapsed()
            keys, counts = run if run is not None else (np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64))
            self._write_keys([keys], counts, out, builder)
            if progress is not None:
                progress("merging", 1, 1, f"order {order}")
            return
        self._merge()
        if not self.runs:
            frame = self.acc.sort(self.keys) if self.acc is not None else pl.DataFrame(schema={k: pl.UInt64 for k in [*self.keys, "count"]})
            self.acc = None
            self._write_range(frame, out, builder)
            if progress is not None:
                progress("merging", 1, 1, f"order {order}")
            return
        if self.mem_rows or (self.acc is not None and self.acc.height):
            self._spill()
        self.acc = None
        bounds = self._range_bounds()
        k0 = pl.col(self.keys[0])
        parts = []
        for i, (lo, hi) in enumerate(bounds):
            cond = pl.lit(True)
            if lo is not None:
                cond = cond & (k0 >= pl.lit(lo, dtype=pl.UInt64))
            if hi is not None:
                cond = cond & (k0 < pl.lit(hi, dtype=pl.UInt64))
            frame = (
                pl.scan_parquet(self.runs).filter(cond).group_by(self.keys).agg(pl.col("count").sum()).sort(self.keys).collect()
            )
            part = out if len(bounds) == 1 else parts_dir() / f"part_{order}_{i:05d}.parquet"
            self._write_range(frame, part, builder)
            parts.append(part)
            if progress is not None:
                progress("merging", i + 1, len(bounds), f"order {order}")
        if len(bounds) > 1:
            pl.scan_parquet(parts).sink_parquet(out, maintain_order=True, row_group_size=STATS_ROW_GROUP)
            for part in parts:
                part.unlink()
        for run in self.runs:
            run.unlink(missing_ok=True)

    def _range_bounds(self) -> list[tuple[int | None, int | None]]:
        """k0 ranges [lo, hi) that each hold at most ~budget_rows run rows."""
        n_ranges = max(1, -(-self.run_rows // max(1, self.range_rows)))
        if n_ranges == 1:
            return [(None, None)]
        values = np.concatenate([s for s, _ in self.samples])
        weights = np.concatenate([np.full(len(s), w) for s, w in self.samples])
        idx = np.argsort(values, kind="stable")
        values, cum = values[idx], np.cumsum(weights[idx])
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_ranges) / n_ranges)
        splitters = sorted({int(values[min(c, len(values) - 1)]) for c in cuts} - {int(values[0])})
        edges = [None, *splitters, None]
        return list(zip(edges[:-1], edges[1:]))

    def _write_range(self, frame: pl.DataFrame, path: Path, builder: SummaryBuilder) -> None:
        self._write_keys([frame.get_column(k).to_numpy() for k in self.keys], frame.get_column("count").to_numpy(), path, builder)

    def _write_keys(self, keys: list[np.ndarray], counts: np.ndarray, path: Path, builder: SummaryBuilder) -> None:
        """Sorted distinct keys and their counts -> the order file at `path` (and the summary figures)."""
        columns = self.layout.unpack_columns(keys)  # tok_0 .. tok_{n-1}, uint32

        def rows(index: np.ndarray) -> np.ndarray:
            return np.stack([c[index] for c in columns], axis=1) if index.size else np.empty((0, self.layout.order), dtype=np.int64)

        builder.add(rows, counts, ids_sorted=True)
        order_frame_columns(self.layout.order, columns, counts).write_parquet(path, row_group_size=STATS_ROW_GROUP)




def _batch_keys(pieces: list[np.ndarray], ctx: list[int], ctx_len: int, pad_id: int, vocab_size: int, layouts: dict[int, KeyLayout]) -> dict[int, list[np.ndarray]]:
    """The packed windows of one batch, per order: {n: key columns (one per word)}.

    `pieces[i]` holds `ctx[i]` context ids (read, not counted) and then counted ids; a
    piece with fewer than `ctx_len` = max_n - 1 context ids starts its document. Each
    piece is laid out behind `ctx_len - ctx[i]` pad ids, so every counted id has
    `ctx_len` ids before it (context or left padding: docs/spec.md, "Hash"), and the
    window of order n ending at each position packs by shift-or over the whole batch
    (`KeyLayout.pack` in one pass: w ids per word from the (w-1)-id words). The
    windows ending at the pads and the context are dropped.
    """
    pad = np.array([pad_id] * ctx_len, dtype=np.int64)
    parts = []
    for piece, c in zip(pieces, ctx):
        if c < ctx_len:
            parts.append(pad[: ctx_len - c])
        parts.append(np.asarray(piece, dtype=np.int64))
    ext = np.concatenate(parts) if len(parts) > 1 else parts[0]
    lo, hi = int(ext.min()), int(ext.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"compressed ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]; compress the ids with the same vocabulary")
    ext = ext.view(np.uint64)
    counted = np.ones(ext.size, dtype=bool)  # ids whose windows are counted
    lengths = np.fromiter((p.size + ctx_len - c for p, c in zip(pieces, ctx)), dtype=np.int64, count=len(pieces))
    heads = np.cumsum(lengths) - lengths  # where each piece's pads + context begin
    counted[(heads[:, None] + np.arange(ctx_len)).ravel()] = False
    widest = max(b - a for layout in layouts.values() for a, b in layout.words)
    bits = np.uint64(next(iter(layouts.values())).bits)
    words = [ext]  # words[w-1][i]: ids ext[i .. i+w-1] packed, the first in the high bits
    for w in range(2, widest + 1):
        words.append((words[-1][:-1] << bits) | ext[w - 1 :])
    out = {}
    for n, layout in layouts.items():
        span = ext.size - n + 1  # windows of order n over ext, by start index
        keep = counted[n - 1 :]  # ... and whether the id each ends at is counted
        out[n] = [words[b - a - 1][a : a + span][keep] for a, b in layout.words]
    return out


def _add_batches(counters: list["_OrderCounter"], keys: list[list[np.ndarray]]) -> None:
    """One batch into each counter, in order (a chain: each may project the run of the one before)."""
    for counter, k in zip(counters, keys):
        counter.add_batch(k)


def count_ngrams(
    documents: Iterable[np.ndarray],
    *,
    max_ngram_size: int,
    pad_id: int,
    vocab_size: int,
    out_dir: str | Path,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    spill_dir: str | Path | None = None,
    progress: Callable[..., None] | None = None,
    extra: dict | None = None,
) -> NgramStats:
    """Count every n-gram window (orders 2..max_ngram_size) of `documents` exactly.

    `documents` yields one array of compressed ids per document (values in
    [0, vocab_size)); `pad_id` is the compressed pad id. Each position of each document
    is one window per order, left-padded with `pad_id` and never crossing into another
    document, so every order's counts sum to the token count. Partial counts are
    merged in memory and spilled as sorted parquet runs under `spill_dir` (default:
    inside `out_dir`) once they would pass `memory_limit` bytes; the final merge runs
    key range by key range. Writes `order_{n}.parquet` and `summary.json` to `out_dir`
    (with `documents` and the `extra` entries) and returns the opened `NgramStats`.
    """
    if max_ngram_size < 2:
        raise ValueError(f"max_ngram_size must be >= 2, got {max_ngram_size}")
    if not 1 <= vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the compressed vocabulary [0, {vocab_size}); pass the compressed pad id")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    orders = list(range(2, max_ngram_size + 1))
    bits = id_bits(vocab_size)
    layouts = {n: KeyLayout(n, bits) for n in orders}
    # Memory plan: a batch holds ~(max_n + 2 + words) uint64 arrays of its tokens, and
    # two batches are alive at once (one counted in the order threads while the next is
    # packed); each order's merged partial gets an equal share of what is left.
    batch_tokens = int(max(1, min(MAX_BATCH_TOKENS, max(1 << 8, memory_limit // (BATCHES_IN_FLIGHT * 48 * (max_ngram_size + 4))))))
    row_bytes = {n: 8 * (len(layouts[n].words) + 1) for n in orders}
    share = max(memory_limit - BATCHES_IN_FLIGHT * 8 * batch_tokens * (max_ngram_size + 4), memory_limit // 4) // len(orders)
    budget_rows = {n: max(1 << 6, share // (row_bytes[n] * (SORTED_BYTES_PER_ROW_OVERHEAD if len(layouts[n].words) == 1 else BYTES_PER_ROW_OVERHEAD))) for n in orders}

    tmp_root: list[Path] = []

    def spill_root() -> Path:
        if not tmp_root:
            base = Path(spill_dir) if spill_dir is not None else out_dir
            base.mkdir(parents=True, exist_ok=True)
            tmp_root.append(Path(tempfile.mkdtemp(prefix=".engram-spill-", dir=base)))
        return tmp_root[0]

    # The final merge holds one range of one order at a time, but as keys, ids (m, n)
    # and an output frame: about twice the per-row cost of the counting phase.
    range_rows = {n: max(1 << 6, memory_limit // (row_bytes[n] * 2 * BYTES_PER_ROW_OVERHEAD)) for n in orders}
    counters = {n: _OrderCounter(layouts[n], budget_rows[n], batch_tokens, spill_root, range_rows[n]) for n in orders}
    # The one-word orders form one chain, counted top down in one task per batch: the
    # largest is sorted, each one below is projected from the distinct keys above it
    # (`_project`). Every wider order is a task of its own.
    sorted_orders = [n for n in reversed(orders) if counters[n].sorted]
    for upper, lower in zip(sorted_orders, sorted_orders[1:]):
        counters[lower].project_below(counters[upper])
    chains = ([sorted_orders] if sorted_orders else []) + [[n] for n in reversed(orders) if not counters[n].sorted]
    tokens = 0
    n_docs = 0
    # One thread per order counts a batch (numpy's sort and merges release the GIL) while
    # this thread packs the next one: `in_flight` holds the batch being counted.
    pool = ThreadPoolExecutor(max_workers=len(chains) - 1 + COUNT_SPLIT, thread_name_prefix="engram-count")
    in_flight: list = []

    def settle() -> None:
        """Wait for the batch being counted (its errors raise here)."""
        done, in_flight[:] = list(in_flight), []
        for future in done:
            future.result()

    try:
        # A batch holds pieces of documents, at most `batch_tokens` counted tokens in
        # all: a document longer than what is left of the batch is sliced, and each
        # piece after the first carries the max-1 tokens before it as context (read
        # for the windows, not counted), so the windows are exactly those of the whole
        # document, with left padding only at its true start.
        ctx_len = max_ngram_size - 1
        buf: list[np.ndarray] = []  # context + counted tokens of each piece
        buf_ctx: list[int] = []  # context tokens at the head of each piece
        buf_tokens = 0  # counted tokens in the batch

        def flush() -> None:
            nonlocal buf, buf_ctx, buf_tokens
            if buf_tokens:
                keys = _batch_keys(buf, buf_ctx, ctx_len, pad_id, vocab_size, layouts)
                settle()
                for chain in chains:
                    ks = [keys[n] for n in chain]
                    size = ks[0][0].size
                    parts = COUNT_SPLIT if counters[chain[0]].sorted and size >= COUNT_SPLIT_MIN else 1
                    cuts = [size * i // parts for i in range(parts + 1)]  # windows align across orders: one per counted id
                    in_flight.extend(pool.submit(_add_batches, [counters[n] for n in chain], [[k[0][a:b]] if len(k) == 1 else k for k in ks])
                                     for a, b in zip(cuts, cuts[1:]))
                del keys
            buf, buf_ctx, buf_tokens = [], [], 0

        prev = np.empty(0, dtype=np.int64)  # the last piece counted (its tail is the next piece's context)
        doc_tokens = 0  # tokens of the current document before this piece
        for doc in documents:
            continued = isinstance(doc, ContinuedIds) and n_docs > 0
            doc = np.asarray(doc).reshape(-1)
            if not continued:
                n_docs += 1
                doc_tokens = 0
            if not doc.size:
                continue
            # `ext` is the piece behind the context carried from the pieces before it
            # (all of the document before it when that is shorter than the context).
            carry = prev[-ctx_len:] if continued and doc_tokens else prev[:0]
            ext = np.concatenate([carry.astype(doc.dtype, copy=False), doc]) if carry.size else doc
            start = carry.size
            while start < ext.size:
                stop = min(ext.size, start + batch_tokens - buf_tokens)
                head = max(0, start - ctx_len)
                buf.append(ext[head:stop])
                buf_ctx.append(start - head)
                buf_tokens += stop - start
                tokens += stop - start
                start = stop
                if buf_tokens >= batch_tokens:
                    flush()
                    if progress is not None:
                        progress("counting", tokens, None, f"{n_docs} documents")
            doc_tokens += doc.size
            prev = ext
        flush()
        settle()
        if progress is not None:
            progress("counting", tokens, None, f"{n_docs} documents")

        builders = {n: SummaryBuilder(n) for n in orders}
        if len(orders) > 1 and not any(c.runs for c in counters.values()):
            # Everything is in memory (each order within its share of the limit): the
            # orders are merged and written side by side, one thread each (numpy and
            # polars release the GIL), so the tail after the last batch is the
            # slowest order's, not the sum. Progress is reported from this thread.
            with ThreadPoolExecutor(max_workers=len(orders), thread_name_prefix="engram-finish") as pool:
                futures = {n: pool.submit(counters[n].finish, order_file(out_dir, n), builders[n], None, spill_root) for n in orders}
                for n in orders:
                    futures[n].result()
                    if progress is not None:
                        progress("merging", 1, 1, f"order {n}")
        else:  # spilled runs are merged one order (and one key range) at a time: bounded memory
            for n in orders:
                counters[n].finish(order_file(out_dir, n), builders[n], progress, spill_root)
        summaries = {}
        for n in orders:
            summaries[str(n)] = builders[n].result()
            if builders[n].windows != tokens:
                raise AssertionError(f"order {n} counted {builders[n].windows} windows for {tokens} tokens")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no order thread still writes a spill when it is removed
        for root in tmp_root:
            shutil.rmtree(root, ignore_errors=True)
    summary = stats_summary(orders, summaries, {"documents": n_docs, **(extra or {})})
    write_summary(out_dir, summary)
    return NgramStats(root=out_dir, summary=summary)


