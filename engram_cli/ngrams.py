"""`NgramStats`: exact n-gram counts over compressed ids, on disk as parquet.

Layout of a stats directory (inside a store it is `tables.zarr/stats/`):

    order_2.parquet   columns order (UInt8), tok_0 .. tok_{n-1} (UInt32), count (UInt64)
    order_3.parquet   one row per distinct n-gram; tok_0 is the oldest token of the
    ...               window, tok_{n-1} the token at the position (text order)
    summary.json      figures per order (see `NgramStats.summary`)

The windows counted are exactly the ones the model looks up: every position of every
document, left-padded with the compressed pad id (docs/spec.md, "Hash"), never
crossing a document boundary. So `sum(count)` of every order equals the token count.

Reading never loads a whole order: `iter_batches` streams (ids, counts) in slices.

Counting (`count_ngrams`) packs each n-gram into uint64 key columns (ceil(log2 C) bits
per id, see `KeyLayout`; all orders of a batch by shift-or in one pass, `_batch_keys`)
and counts every batch (at most `MAX_BATCH_TOKENS` tokens; a longer document is sliced,
each slice carrying the max-1 tokens before it as context, so the windows are
unchanged). An order that packs into one key word (orders 2..3 for DeepSeek) is counted
by sorting: numpy's sort and run lengths per batch, sorted runs merged in memory
(`_merge_runs`), already in text order at the end; wider orders by a polars group_by
per batch. Partials are spilled as sorted parquet runs when they outgrow the memory
limit; the final merge of spilled runs is a polars group_by per key range (row-group
statistics skip the rest), so memory stays bounded however many distinct n-grams
there are. When nothing was spilled, the orders are finished (merged, summarized,
written) side by side in threads. The summary figures come from `SummaryBuilder`,
fed range by range.

Merging (`merge_stats`): the statistics of corpus shards (e.g. one `count_shard` per
Ray task), in corpus order, merge into exactly the statistics of the whole corpus,
one tok_0 key range at a time, so memory stays bounded. A distributed build runs
`count_shard` per shard, then either one `merge_stats` or, partitioned by key,
one `merge_stats(parts, out_r, tok0_range=(lo_r, hi_r))` per partition r (each reads
only its key range of every shard: parquet row-group statistics skip the rest) and
`concat_stats` over the partitions in ascending order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl

from .defaults import DEFAULT_MEMORY_LIMIT
from .errors import StoreError

STATS_FORMAT = "engram-ngram-stats/1"
SUMMARY_FILE = "summary.json"


def order_file(root: Path, order: int) -> Path:
    return Path(root) / f"order_{order}.parquet"


def token_columns(order: int) -> list[str]:
    return [f"tok_{i}" for i in range(order)]


def _polars_path(path: Path) -> Path:
    """`path` for polars, which opens only UTF-8 paths: `StoreError` with the fix for any other."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(f"n-gram statistics file {str(path)!r}: its path is not valid UTF-8 and polars reads only UTF-8 paths; move or rename the store to a UTF-8 path") from None
    return path


def _check_summary(summary: dict, where: Path) -> None:
    """`StoreError` unless `summary` has `orders` (distinct ints >= 2) and per order an object with integer `distinct` and `windows` >= 0."""
    orders = summary.get("orders")
    per_order = summary.get("per_order")
    problem = None
    if not isinstance(orders, list) or not all(type(n) is int and n >= 2 for n in orders) or len(set(orders)) != len(orders):
        problem = f"'orders' is {orders!r}, not a list of distinct n-gram orders >= 2"
    elif not isinstance(per_order, dict):
        problem = f"'per_order' is a {type(per_order).__name__}, not an object"
    else:
        for n in orders:
            entry = per_order.get(str(n))
            if not isinstance(entry, dict) or any(type(entry.get(k)) is not int or entry[k] < 0 for k in ("distinct", "windows")):
                problem = f"'per_order' has no integer 'distinct' and 'windows' for order {n}"
                break
    if problem:
        raise StoreError(f"n-gram statistics summary {str(where)!r} is malformed ({problem}); rebuild with `engram build-table --force`")


# What polars raises on a damaged data page: its own errors, OSError, and (from a Rust
# panic in a decoder, e.g. "invalid num_bits") PanicException, a BaseException.
POLARS_READ_ERRORS = (Exception, pl.exceptions.PanicException)


def _read_errors(path: Path, batches: Iterable):
    """`batches`, with a failure to read a data page (polars raises several types) as one `StoreError`."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except POLARS_READ_ERRORS as e:
            raise StoreError(f"n-gram statistics file {str(path)!r} is corrupt ({type(e).__name__}); rebuild with `engram build-table --force`") from None
        yield batch


@dataclass(frozen=True)
class NgramStats:
    """A read handle on a stats directory (see the module docstring for the layout)."""

    root: Path
    summary: dict

    @classmethod
    def open(cls, root: str | Path) -> "NgramStats":
        """Open a stats directory; `StoreError` (one line, with the fix) unless it is readable as written.

        Checks, from metadata only: `summary.json` parses to the layout `_check_summary`
        describes, and every order file has a readable parquet footer with the columns
        and rows the summary says (`_check_order_file`). A corrupt data page behind a good
        footer is found when it is read (`iter_batches`, `max_id`), and so is a path that
        is not valid UTF-8 (polars reads no other).
        """
        root = Path(root)
        summary_path = root / SUMMARY_FILE
        if not summary_path.is_file():
            raise StoreError(f"no n-gram statistics at {str(root)!r} (missing {SUMMARY_FILE}); rebuild with `engram build-table`")
        try:
            summary = json.loads(summary_path.read_bytes())
        except (OSError, ValueError, RecursionError) as e:
            raise StoreError(f"n-gram statistics summary {str(summary_path)!r} is unreadable ({type(e).__name__}: {e}); rebuild with `engram build-table`") from None
        if not isinstance(summary, dict) or summary.get("format") != STATS_FORMAT:
            got = summary.get("format") if isinstance(summary, dict) else type(summary).__name__
            raise StoreError(f"{str(summary_path)!r} has format {got!r}, expected {STATS_FORMAT!r}; rebuild with `engram build-table`")
        _check_summary(summary, summary_path)
        stats = cls(root=root, summary=summary)
        for n in stats.orders:
            if not order_file(root, n).is_file():
                raise StoreError(f"n-gram statistics for order {n} are missing ({order_file(root, n)}); rebuild with `engram build-table`")
            stats._check_order_file(n)
        return stats

    def _check_order_file(self, order: int) -> None:
        """StoreError unless order_{n}.parquet has a readable footer, the columns and the rows the summary says.

        Reads the parquet footer only (`parquet_footer.read_footer`; a truncated, empty or
        overwritten file has none): the schema's column names and the row count.
        """
        from .parquet_footer import FooterError, read_footer

        path = order_file(self.root, order)
        want = [*token_columns(order), "count"]
        try:
            meta = read_footer(path)
            schema = [el[4].decode("utf-8") for el in meta[2][1:]]  # element 0 is the root
            rows = int(meta[3])
        except (OSError, FooterError, KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise StoreError(f"n-gram statistics file {str(path)!r} is truncated, empty or corrupt ({type(e).__name__}); rebuild with `engram build-table --force`") from None
        distinct = self.summary["per_order"][str(order)]["distinct"]
        if any(c not in schema for c in want) or rows != distinct:
            raise StoreError(f"n-gram statistics file {str(path)!r} does not match its summary (columns {schema}, {rows} rows, the summary says {distinct}); rebuild with `engram build-table --force`")

    def max_id(self, order: int) -> int | None:
        """The largest compressed id in one order's n-grams (None when there are none): one streaming pass."""
        cols = token_columns(order)
        frame = self.scan(order)  # StoreError for a path polars cannot open
        try:
            top = frame.select(pl.max_horizontal([pl.col(c).max() for c in cols])).collect().item()
        except POLARS_READ_ERRORS as e:  # a corrupt data page surfaces here, not at open
            raise StoreError(f"n-gram statistics file {str(order_file(self.root, order))!r} is corrupt ({type(e).__name__}); rebuild with `engram build-table --force`") from None
        return None if top is None else int(top)

    def recorded_max_id(self, order: int) -> int | None:
        """The largest compressed id of one order as its parquet footer records it (no data page read).

        From the row groups' max statistics of every token column (`parquet_footer`);
        None when the order holds no n-gram or a row group lacks the statistic (then
        only `max_id`'s streaming pass knows).
        """
        from .parquet_footer import FooterError, column_maxima

        path = order_file(self.root, order)
        try:
            tops = column_maxima(path, token_columns(order))
        except (OSError, FooterError) as e:
            raise StoreError(f"n-gram statistics file {str(path)!r} is truncated, empty or corrupt ({type(e).__name__}: {e}); rebuild with `engram build-table --force`") from None
        if any(v is None for v in tops.values()):
            return None
        return max(tops.values())

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.summary["orders"])

    def order_summary(self, order: int) -> dict:
        return self.summary["per_order"][str(order)]

    def distinct(self, order: int) -> int:
        return int(self.order_summary(order)["distinct"])

    def total(self, order: int) -> int:
        """Windows counted for this order (= tokens of the corpus)."""
        return int(self.order_summary(order)["windows"])

    def scan(self, order: int) -> pl.LazyFrame:
        return pl.scan_parquet(_polars_path(order_file(self.root, order)))

    def iter_batches(self, order: int, batch_rows: int = 1 << 21) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream one order as (ids (m, n) int64 in text order, counts (m,) int64) slices."""
        path = order_file(self.root, order)
        if order not in self.orders:
            raise StoreError(f"order {order} was not counted (orders: {list(self.orders)}); rebuild with a larger --max-ngram")
        cols = token_columns(order)
        if self.distinct(order) == 0:
            return
        # One streaming pass (collect_batches) instead of a fresh scan + slice per batch.
        for df in _read_errors(path, pl.scan_parquet(_polars_path(path)).select([*cols, "count"]).collect_batches(chunk_size=batch_rows)):
            for start in range(0, df.height, batch_rows):
                part = df.slice(start, batch_rows)
                ids = np.empty((part.height, order), dtype=np.int64)  # (m, n)
                for i, c in enumerate(cols):
                    ids[:, i] = part.get_column(c).to_numpy()
                yield ids, part.get_column("count").to_numpy().astype(np.int64)


# -- summary figures (shared by the streaming counter and the small-input writer) ----------
class SummaryBuilder:
    """Summary figures of one order, fed chunk by chunk: never holds the order in memory.

    Keeps the count-of-counts histogram (exact top-share figures: the k largest counts
    are read off it) and the running top-`top` n-grams, ordered by count descending and
    then by ids in text order.
    """

    def __init__(self, order: int, top: int = 20):
        self.order = order
        self.top = top
        self.windows = 0
        self.distinct = 0
        self.hist: dict[int, int] = {}  # count -> number of distinct n-grams with it
        self.top_ids = np.empty((0, order), dtype=np.int64)
        self.top_counts = np.empty(0, dtype=np.int64)

    def add(self, ids: np.ndarray | Callable[[np.ndarray], np.ndarray], counts: np.ndarray, *, ids_sorted: bool = False) -> None:
        """Add distinct n-grams `ids` (m, n) with `counts` (m,); `ids_sorted`: rows ascend.

        `ids` may also be a function from row indices to those rows' ids (k, n): only
        the few candidates for the top are ever looked at, so a caller holding packed
        keys need not unpack them all.
        """
        counts = np.asarray(counts, dtype=np.int64)
        m = int(counts.shape[0])
        if m == 0:
            return
        self.windows += int(counts.sum())
        self.distinct += m
        small = counts[counts < 1 << 16]
        chunk: dict[int, int] = {}
        if small.size:
            bc = np.bincount(small)
            nz = np.flatnonzero(bc)
            chunk.update(zip(nz.tolist(), bc[nz].tolist()))
        if small.size < m:
            values, freq = np.unique(counts[counts >= 1 << 16], return_counts=True)
            chunk.update(zip(values.tolist(), freq.tolist()))
        for value, f in chunk.items():
            self.hist[value] = self.hist.get(value, 0) + f
        # Candidates for the top: every count above the top-th largest (read off the
        # chunk's histogram), plus enough of the ties at it (the first ones in text
        # order when the rows are sorted).
        if m > self.top:
            seen = 0
            for threshold in sorted(chunk, reverse=True):
                seen += chunk[threshold]
                if seen >= self.top:
                    break
            above = np.flatnonzero(counts > threshold)
            ties = np.flatnonzero(counts == threshold)
            if ids_sorted:
                ties = ties[: self.top - above.size]
            cand = np.concatenate([above, ties])
        else:
            cand = np.arange(m)
        rows = ids(cand) if callable(ids) else np.asarray(ids)[cand]
        self._merge_top(np.asarray(rows).astype(np.int64).reshape(-1, self.order), counts[cand])

    def _merge_top(self, ids: np.ndarray, counts: np.ndarray) -> None:
        ids = np.concatenate([self.top_ids, ids])
        counts = np.concatenate([self.top_counts, counts])
        order = np.lexsort((*[ids[:, i] for i in reversed(range(self.order))], -counts))[: self.top]
        self.top_ids, self.top_counts = ids[order], counts[order]

    def top_sum(self, k: int) -> int:
        """Sum of the k largest counts, read off the histogram."""
        total = 0
        for value in sorted(self.hist, reverse=True):
            if k <= 0:
                break
            take = min(k, self.hist[value])
            total += take * value
            k -= take
        return total

    def result(self) -> dict:
        m = self.distinct

        def top_share(frac: float) -> float:
            k = int(np.ceil(frac * m)) if m else 0
            return float(self.top_sum(k) / self.windows) if self.windows else 0.0

        return {
            "windows": self.windows,
            "distinct": m,
            "singletons": self.hist.get(1, 0),
            "top1pct_share": top_share(0.01),
            "top10pct_share": top_share(0.10),
            "top": [{"ids": [int(v) for v in ids], "count": int(c)} for ids, c in zip(self.top_ids, self.top_counts)],
        }


def summarize_counts(ids: np.ndarray, counts: np.ndarray, top: int = 20) -> dict:
    """Summary figures of one order from its distinct n-grams held in memory."""
    counts = np.asarray(counts, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    order = ids.shape[1] if ids.ndim == 2 else (ids.size // counts.size if counts.size else 1)
    builder = SummaryBuilder(order, top)
    builder.add(ids.reshape(-1, order), counts)
    return builder.result()


def write_summary(root: Path, summary: dict) -> None:
    """Write a stats directory's summary.json atomically (temp file + rename)."""
    tmp = root / f".{SUMMARY_FILE}.partial"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, root / SUMMARY_FILE)


def _stats_summary(orders: list[int], summaries: dict[str, dict], extra: dict | None) -> dict:
    return {
        "format": STATS_FORMAT,
        "orders": orders,
        "tokens": summaries[str(orders[0])]["windows"] if orders else 0,
        "per_order": summaries,
        **(extra or {}),
    }


def _order_frame(order: int, ids: np.ndarray, counts: np.ndarray) -> pl.DataFrame:
    return _order_frame_columns(order, [ids[:, i] for i in range(order)], counts)


def _order_frame_columns(order: int, columns: list[np.ndarray], counts: np.ndarray) -> pl.DataFrame:
    """The frame of an order file from one id array per token column (uint32 ones are not copied)."""
    return pl.DataFrame(
        {
            "order": pl.Series("order", np.full(len(counts), order, dtype=np.uint8), dtype=pl.UInt8),
            **{c: pl.Series(c, col, dtype=pl.UInt32) for c, col in zip(token_columns(order), columns)},
            "count": pl.Series("count", counts, dtype=pl.UInt64),
        }
    )


def write_stats_from_arrays(root: str | Path, per_order: dict[int, tuple[np.ndarray, np.ndarray]], *, extra: dict | None = None) -> NgramStats:
    """Write a stats directory from in-memory distinct n-grams: {order: (ids (m, n), counts (m,))}.

    For fixtures and small inputs; `ids` rows must be distinct.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for order, (ids, counts) in sorted(per_order.items()):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1, order)
        counts = np.asarray(counts, dtype=np.int64)
        _order_frame(order, ids, counts).write_parquet(order_file(root, order), row_group_size=STATS_ROW_GROUP)
        summaries[str(order)] = summarize_counts(ids, counts)
    summary = _stats_summary(sorted(per_order), summaries, extra)
    write_summary(root, summary)
    return NgramStats(root=root, summary=summary)


# -- exact counting ---------------------------------------------------------------------
BYTES_PER_ROW_OVERHEAD = 6  # merge = concat copy + hash table + output: ~6x the raw row bytes
SORTED_BYTES_PER_ROW_OVERHEAD = 4  # sorted runs: run + concat copy + argsort index + gathered copy while merging
STATS_ROW_GROUP = 1 << 16  # rows per row group of every order file: its bytes depend on its rows only, not on how a merge split them
_RUN_ROW_GROUP = 1 << 16  # small row groups in spilled runs: min/max statistics prune key ranges
_SAMPLES_PER_RUN = 1024
MAX_BATCH_TOKENS = 1 << 22  # tokens counted per batch at most; longer documents are sliced


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


def _distinct_sorted(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys (L,) -> their distinct values and how often each occurs (uint64)."""
    if not keys.size:
        return keys, np.empty(0, dtype=np.uint64)
    first = np.empty(keys.size, dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    counts = np.diff(starts, append=keys.size).astype(np.uint64)
    return keys[starts], counts


def _merge_runs(runs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Runs of distinct sorted keys with counts -> one run (the counts of equal keys added).

    One stable argsort of the runs laid end to end (numpy's timsort merges the sorted
    runs it finds, O(L log k) for k runs), then the counts of equal neighbours summed.
    """
    if len(runs) == 1:
        return runs[0]
    keys = np.concatenate([k for k, _ in runs])
    counts = np.concatenate([c for _, c in runs])
    runs.clear()  # the caller's list: the runs are let go as soon as they are copied
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    counts = counts[order]
    del order
    if not keys.size:
        return keys, counts
    first = np.empty(keys.size, dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return keys[starts], np.add.reduceat(counts, starts)


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

    def add_batch(self, keys: list[np.ndarray]) -> None:
        if self.sorted:
            self._push(_distinct_sorted(np.sort(keys[0])))
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
        _order_frame_columns(self.layout.order, columns, counts).write_parquet(path, row_group_size=STATS_ROW_GROUP)


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
    # Memory plan: a batch holds ~(max_n + 2 + words) uint64 arrays of its tokens; each
    # order's merged partial gets an equal share of what is left.
    batch_tokens = int(max(1, min(MAX_BATCH_TOKENS, max(1 << 8, memory_limit // (48 * (max_ngram_size + 4))))))
    row_bytes = {n: 8 * (len(layouts[n].words) + 1) for n in orders}
    share = max(memory_limit - 8 * batch_tokens * (max_ngram_size + 4), memory_limit // 4) // len(orders)
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
    tokens = 0
    n_docs = 0
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
                for n in orders:
                    counters[n].add_batch(keys[n])
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
        for root in tmp_root:
            shutil.rmtree(root, ignore_errors=True)
    summary = _stats_summary(orders, summaries, {"documents": n_docs, **(extra or {})})
    write_summary(out_dir, summary)
    return NgramStats(root=out_dir, summary=summary)


# -- merging statistics (one NgramStats per corpus shard -> the corpus's) ------------------
_MERGE_SAMPLES_PER_PART = 4096


def _merge_bounds(files: list[Path], column: str, rows: int, range_rows: int) -> list[tuple[int | None, int | None]]:
    """tok_0 ranges [lo, hi) that each hold about `range_rows` input rows (sampled, streamed)."""
    n_ranges = max(1, -(-rows // max(1, range_rows)))
    if n_ranges == 1:
        return [(None, None)]
    samples, weights = [], []
    for f in files:
        height = pl.scan_parquet(f).select(pl.len()).collect().item()
        if not height:
            continue
        step = max(1, height // _MERGE_SAMPLES_PER_PART)
        col = pl.scan_parquet(f).select(pl.col(column).gather_every(step)).collect().get_column(column).to_numpy()
        samples.append(col.astype(np.int64))
        weights.append(np.full(col.size, float(step)))
    values = np.concatenate(samples)
    idx = np.argsort(values, kind="stable")
    values, cum = values[idx], np.cumsum(np.concatenate(weights)[idx])
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n_ranges) / n_ranges)
    splitters = sorted({int(values[min(c, len(values) - 1)]) for c in cuts} - {int(values[0])})
    edges = [None, *splitters, None]
    return list(zip(edges[:-1], edges[1:]))


def merge_stats(
    parts: Iterable[str | Path | NgramStats],
    out: str | Path,
    *,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    progress: Callable[..., None] | None = None,
    tok0_range: tuple[int, int] | None = None,
) -> NgramStats:
    """Merge the statistics of corpus shards into the statistics of their concatenation.

    `parts` are stats directories (or opened `NgramStats`) counted with the same
    vocabulary, pad id and orders, in corpus order (shard 0 first). The result in `out`
    is what `count_ngrams` / `count_corpus` over the concatenated corpus writes: the
    same parquet rows in the same order (sorted in text order, one row per distinct
    n-gram, counts summed) and the same summary figures (`documents`, `tokens`, the
    per-order figures, and `corpus` merged with `CorpusSummary.merge` when the parts
    carry one). Every order file has `STATS_ROW_GROUP`-row row groups, so its bytes
    depend on its rows only: byte-identical to the count's, however either was split.

    Memory stays bounded: each order is merged one tok_0 key range at a time (ranges
    chosen from a sample of the parts so each holds ~`memory_limit` worth of rows;
    parquet row-group statistics skip the rest), ranges are written as part files and
    streamed into the order's file. Nothing holds a whole order.

    `tok0_range=(lo, hi)`: merge only the n-grams whose oldest token `tok_0` lies in
    [lo, hi) (a radix partition: tok_0 is the key's most significant part), with the
    summary figures of that partition; `concat_stats` joins the partitions, in
    ascending ranges, into the whole. One reduce task per partition.
    """
    from .corpus import CorpusSummary  # corpus imports nothing from here; keep ngrams light

    stats = [p if isinstance(p, NgramStats) else NgramStats.open(p) for p in parts]
    if not stats:
        raise StoreError("merge_stats needs at least one statistics directory; pass the per-shard stats/ folders")
    orders = list(stats[0].orders)
    for s in stats[1:]:
        if list(s.orders) != orders:
            raise StoreError(f"statistics {s.root} count orders {list(s.orders)}, {stats[0].root} counts {orders}; merge statistics counted with the same --max-ngram")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for n in orders:
        files = [order_file(s.root, n) for s in stats]
        cols = token_columns(n)
        rows = sum(s.distinct(n) for s in stats)
        row_bytes = 8 * (n + 1)
        range_rows = max(1 << 6, memory_limit // (row_bytes * 2 * BYTES_PER_ROW_OVERHEAD))
        bounds = _merge_bounds(files, cols[0], rows, range_rows)
        if tok0_range is not None:
            lo0, hi0 = int(tok0_range[0]), int(tok0_range[1])
            inner = [b for b in dict.fromkeys([lo0, *(e for e, _ in bounds[1:] if lo0 < e < hi0), hi0])]
            bounds = list(zip(inner[:-1], inner[1:])) or [(lo0, hi0)]
        builder = SummaryBuilder(n)
        pieces = []
        tmp = Path(tempfile.mkdtemp(prefix=".engram-merge-", dir=out)) if len(bounds) > 1 else None
        try:
            for i, (lo, hi) in enumerate(bounds):
                cond = pl.lit(True)
                if lo is not None:
                    cond = cond & (pl.col(cols[0]) >= lo)
                if hi is not None:
                    cond = cond & (pl.col(cols[0]) < hi)
                frame = pl.scan_parquet(files).filter(cond).group_by(cols).agg(pl.col("count").sum()).sort(cols).collect()
                ids = np.stack([frame.get_column(c).to_numpy().astype(np.int64) for c in cols], axis=1) if frame.height else np.empty((0, n), np.int64)
                counts = frame.get_column("count").to_numpy().astype(np.int64)
                del frame
                builder.add(ids, counts, ids_sorted=True)
                piece = order_file(out, n) if tmp is None else tmp / f"part_{i:05d}.parquet"
                _order_frame(n, ids, counts).write_parquet(piece, row_group_size=STATS_ROW_GROUP)
                pieces.append(piece)
                if progress is not None:
                    progress("merging", i + 1, len(bounds), f"order {n}")
            if tmp is not None:
                pl.scan_parquet(pieces).sink_parquet(order_file(out, n), maintain_order=True, row_group_size=STATS_ROW_GROUP)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        summaries[str(n)] = builder.result()
    extra = {"documents": sum(int(s.summary.get("documents", 0)) for s in stats)}
    if tok0_range is not None:
        extra["tok0_range"] = [int(tok0_range[0]), int(tok0_range[1])]
    summary = _stats_summary(orders, summaries, extra)
    if all("corpus" in s.summary for s in stats):
        merged = CorpusSummary.from_dict(stats[0].summary["corpus"]).merge([CorpusSummary.from_dict(s.summary["corpus"]) for s in stats[1:]])
        summary["corpus"] = merged.to_dict()
    write_summary(out, summary)
    return NgramStats(root=out, summary=summary)


_write_summary = write_summary  # old private name


def concat_stats(partitions: Iterable[str | Path | NgramStats], out: str | Path) -> NgramStats:
    """Join key-range partitions (`merge_stats(..., tok0_range=...)`, ascending and
    disjoint) into one stats directory: rows streamed into each order's file in order,
    summary figures recomputed by streaming the rows again (`SummaryBuilder`).
    The files equal the unpartitioned merge's, byte for byte (`STATS_ROW_GROUP`).
    """
    parts = [p if isinstance(p, NgramStats) else NgramStats.open(p) for p in partitions]
    if not parts:
        raise StoreError("concat_stats needs at least one partition; pass the per-partition stats/ folders")
    ranges = [p.summary.get("tok0_range") for p in parts]
    if any(r is None for r in ranges) or any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        raise StoreError(f"concat_stats joins key-range partitions in ascending order; got ranges {ranges}")
    orders = list(parts[0].orders)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for n in orders:
        pl.scan_parquet([order_file(p.root, n) for p in parts]).sink_parquet(order_file(out, n), maintain_order=True, row_group_size=STATS_ROW_GROUP)
        builder = SummaryBuilder(n)
        for part in parts:
            for ids, counts in part.iter_batches(n):
                builder.add(ids, counts, ids_sorted=True)
        summaries[str(n)] = builder.result()
    extra = {"documents": parts[0].summary.get("documents", 0)}
    summary = _stats_summary(orders, summaries, extra)
    if "corpus" in parts[0].summary:
        summary["corpus"] = parts[0].summary["corpus"]
    write_summary(out, summary)
    return NgramStats(root=out, summary=summary)
