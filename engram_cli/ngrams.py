"""`NgramStats`: exact n-gram counts over compressed ids, on disk as parquet.

Layout of a stats directory (inside a store it is `tables.zarr/stats/`):

    order_2.parquet   columns order (UInt8), tok_0 .. tok_{n-1} (UInt32), count (UInt64)
    order_3.parquet   one row per distinct n-gram; tok_0 is the oldest token of the
    ...               window, tok_{n-1} the token at the position (text order)
    summary.json      figures per order (see `NgramStats.summary`)

The windows counted are exactly the ones the model looks up: every position of every
document, left-padded with the compressed pad id (shared/SPEC.md section 3), never
crossing a document boundary. So `sum(count)` of every order equals the token count.

Reading never loads a whole order: `iter_batches` streams (ids, counts) in slices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl

from .errors import StoreError

STATS_FORMAT = "engram-ngram-stats/1"
SUMMARY_FILE = "summary.json"


def order_file(root: Path, order: int) -> Path:
    return Path(root) / f"order_{order}.parquet"


def token_columns(order: int) -> list[str]:
    return [f"tok_{i}" for i in range(order)]


@dataclass(frozen=True)
class NgramStats:
    """A read handle on a stats directory (see the module docstring for the layout)."""

    root: Path
    summary: dict

    @classmethod
    def open(cls, root: str | Path) -> "NgramStats":
        root = Path(root)
        summary_path = root / SUMMARY_FILE
        if not summary_path.is_file():
            raise StoreError(f"no n-gram statistics at {str(root)!r} (missing {SUMMARY_FILE}); rebuild with `engram build-table`")
        try:
            summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"n-gram statistics summary {str(summary_path)!r} is unreadable ({e}); rebuild with `engram build-table`") from None
        if summary.get("format") != STATS_FORMAT:
            raise StoreError(f"{str(summary_path)!r} has format {summary.get('format')!r}, expected {STATS_FORMAT!r}; rebuild with `engram build-table`")
        stats = cls(root=root, summary=summary)
        for n in stats.orders:
            if not order_file(root, n).is_file():
                raise StoreError(f"n-gram statistics for order {n} are missing ({order_file(root, n)}); rebuild with `engram build-table`")
        return stats

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
        return pl.scan_parquet(order_file(self.root, order))

    def iter_batches(self, order: int, batch_rows: int = 1 << 21) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream one order as (ids (m, n) int64 in text order, counts (m,) int64) slices."""
        path = order_file(self.root, order)
        if order not in self.orders:
            raise StoreError(f"order {order} was not counted (orders: {list(self.orders)}); rebuild with a larger --max-ngram")
        cols = token_columns(order)
        total = self.distinct(order)
        for start in range(0, total, batch_rows):
            df = pl.scan_parquet(path).slice(start, batch_rows).select([*cols, "count"]).collect()
            ids = np.column_stack([df[c].to_numpy().astype(np.int64) for c in cols])
            yield ids, df["count"].to_numpy().astype(np.int64)


def summarize_counts(ids: np.ndarray, counts: np.ndarray, top: int = 20) -> dict:
    """Summary figures of one order from its distinct n-grams held in memory.

    (Small inputs only: the streaming counter computes the same figures without
    holding an order in memory.)
    """
    counts = np.asarray(counts, dtype=np.int64)
    m = int(counts.shape[0])
    desc = np.sort(counts)[::-1]
    total = int(desc.sum())

    def top_share(frac: float) -> float:
        k = int(np.ceil(frac * m)) if m else 0
        return float(desc[:k].sum() / total) if total else 0.0

    order_idx = np.lexsort((*[ids[:, i] for i in reversed(range(ids.shape[1]))], -counts))[:top] if m else []
    return {
        "windows": total,
        "distinct": m,
        "singletons": int((counts == 1).sum()),
        "top1pct_share": top_share(0.01),
        "top10pct_share": top_share(0.10),
        "top": [{"ids": [int(v) for v in ids[i]], "count": int(counts[i])} for i in order_idx],
    }


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
        frame = pl.DataFrame(
            {
                "order": pl.Series([order] * len(counts), dtype=pl.UInt8),
                **{c: pl.Series(ids[:, i], dtype=pl.UInt32) for i, c in enumerate(token_columns(order))},
                "count": pl.Series(counts, dtype=pl.UInt64),
            }
        )
        frame.write_parquet(order_file(root, order))
        summaries[str(order)] = summarize_counts(ids, counts)
    orders = sorted(per_order)
    summary = {
        "format": STATS_FORMAT,
        "orders": orders,
        "tokens": summaries[str(orders[0])]["windows"] if orders else 0,
        "per_order": summaries,
        **(extra or {}),
    }
    (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return NgramStats(root=root, summary=summary)
