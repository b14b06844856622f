"""`NgramStats`: exact n-gram counts over compressed ids, on disk as parquet (format, read handle, summary).

Layout of a stats directory (inside a store it is `tables.zarr/stats/`):

    order_2.parquet   columns order (UInt8), tok_0 .. tok_{n-1} (UInt32), count (UInt64)
    order_3.parquet   one row per distinct n-gram; tok_0 is the oldest token of the
    ...               window, tok_{n-1} the token at the position (text order)
    summary.json      figures per order (see `NgramStats.summary`)

The windows counted are exactly the ones the model looks up: every position of every
document, left-padded with the compressed pad id (docs/spec.md, "Hash"), never
crossing a document boundary. So `sum(count)` of every order equals the token count.

Reading never loads a whole order: `iter_batches` streams (ids, counts) in slices.
The summary figures come from `SummaryBuilder`, fed range by range.

Parquet data pages carry no checksum, so `write_summary` records each order file's size
and XXH3-128 in `summary.json` (`checksums`), and a handle opened with `verify=True`
(every reader of a store's statistics: `TableStore.stats`) hashes an order file once,
before its first read, refusing a file that changed since the build with one line naming
it. The cost is one extra sequential read of each order file a reader uses (XXH3 runs
at several GB/s); the build's own readers do not verify.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl
import xxhash

from ..errors import StoreError
from .parquet_footer import FooterError, column_maxima, read_footer

STATS_FORMAT = "engram-ngram-stats/1"
SUMMARY_FILE = "summary.json"
STATS_ROW_GROUP = 1 << 16  # rows per row group of every order file: its bytes depend on its rows only, not on how a merge split them


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
    verify: bool = False  # check each order file against the summary's checksum before its first read
    _verified: set = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def open(cls, root: str | Path, *, verify: bool = False) -> "NgramStats":
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
        checksums = summary.get("checksums")
        if checksums is not None and not isinstance(checksums, dict):
            raise StoreError(f"n-gram statistics summary {str(summary_path)!r} is malformed (checksums is {type(checksums).__name__}); rebuild with `engram build-table --force`")
        stats = cls(root=root, summary=summary, verify=verify)
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

    def check_file(self, order: int) -> None:
        """With `verify`: `StoreError` naming the order file unless its size and XXH3-128 are those the summary recorded (once per handle)."""
        if not self.verify or order in self._verified:
            return
        path = order_file(self.root, order)
        want = (self.summary.get("checksums") or {}).get(path.name)
        if want is not None:  # a store built before checksums has none to compare
            got = file_checksum(path)
            want = want if isinstance(want, dict) else {}
            if got != {"bytes": want.get("bytes"), "xxh3_128": want.get("xxh3_128")}:
                raise StoreError(f"n-gram statistics file {str(path)!r} is corrupt: its bytes differ from those recorded when the store was built "
                                 f"(xxh3-128 {got['xxh3_128'][:16]}, {got['bytes']} bytes; recorded {str(want.get('xxh3_128'))[:16]}, {want.get('bytes')} bytes); "
                                 "rebuild with `engram build-table --force`")
        self._verified.add(order)

    def scan(self, order: int) -> pl.LazyFrame:
        self.check_file(order)
        return pl.scan_parquet(_polars_path(order_file(self.root, order)))

    def iter_batches(self, order: int, batch_rows: int = 1 << 21) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream one order as (ids (m, n) int64 in text order, counts (m,) int64) slices."""
        path = order_file(self.root, order)
        if order not in self.orders:
            raise StoreError(f"order {order} was not counted (orders: {list(self.orders)}); rebuild with a larger --max-ngram")
        cols = token_columns(order)
        if self.distinct(order) == 0:
            return
        self.check_file(order)
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


CHECKSUM_PIECE = 4 << 20


def file_checksum(path: Path) -> dict:
    """{"bytes", "xxh3_128"} of a file, read in pieces (`StoreError` when it cannot be read)."""
    h, n = xxhash.xxh3_128(), 0
    try:
        with open(path, "rb") as f:
            while piece := f.read(CHECKSUM_PIECE):
                h.update(piece)
                n += len(piece)
    except OSError as e:
        raise StoreError(f"n-gram statistics file {str(path)!r} cannot be read ({e.strerror}); rebuild with `engram build-table --force`") from None
    return {"bytes": n, "xxh3_128": h.hexdigest()}


def write_summary(root: Path, summary: dict) -> None:
    """Write a stats directory's summary.json atomically (temp file + rename).

    Sets `summary["checksums"]` (in place, so the caller's handle matches the file): the
    size and XXH3-128 of each order file it lists, as they are now.
    """
    files = [order_file(root, int(n)) for n in summary.get("orders", ())]
    summary.pop("checksums", None)  # always the last key, whatever the caller's dict held
    summary["checksums"] = {f.name: file_checksum(f) for f in files if f.is_file()}
    tmp = root / f".{SUMMARY_FILE}.partial"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, root / SUMMARY_FILE)


def stats_summary(orders: list[int], summaries: dict[str, dict], extra: dict | None) -> dict:
    return {
        "format": STATS_FORMAT,
        "orders": orders,
        "tokens": summaries[str(orders[0])]["windows"] if orders else 0,
        "per_order": summaries,
        **(extra or {}),
    }


def order_frame(order: int, ids: np.ndarray, counts: np.ndarray) -> pl.DataFrame:
    return order_frame_columns(order, [ids[:, i] for i in range(order)], counts)


def order_frame_columns(order: int, columns: list[np.ndarray], counts: np.ndarray) -> pl.DataFrame:
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
        order_frame(order, ids, counts).write_parquet(order_file(root, order), row_group_size=STATS_ROW_GROUP)
        summaries[str(order)] = summarize_counts(ids, counts)
    summary = stats_summary(sorted(per_order), summaries, extra)
    write_summary(root, summary)
    return NgramStats(root=root, summary=summary)


