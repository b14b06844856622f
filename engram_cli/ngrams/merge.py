"""Merging n-gram statistics: the statistics of corpus shards, in corpus order -> exactly the whole corpus's.

`merge_stats` merges one tok_0 key range at a time, so memory stays bounded. A
distributed build counts each shard, then runs either one `merge_stats` or, partitioned
by key, one `merge_stats(parts, out_r, tok0_range=(lo_r, hi_r))` per partition r (each
reads only its key range of every shard: parquet row-group statistics skip the rest)
and `concat_stats` over the partitions in ascending order.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import polars as pl

from ..corpus import CorpusSummary
from ..defaults import DEFAULT_MEMORY_LIMIT
from ..errors import StoreError
from .count import BYTES_PER_ROW_OVERHEAD
from .stats import (
    STATS_ROW_GROUP,
    NgramStats,
    SummaryBuilder,
    order_file,
    order_frame,
    stats_summary,
    token_columns,
    write_summary,
)

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
                order_frame(n, ids, counts).write_parquet(piece, row_group_size=STATS_ROW_GROUP)
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
    summary = stats_summary(orders, summaries, extra)
    if all("corpus" in s.summary for s in stats):
        merged = CorpusSummary.from_dict(stats[0].summary["corpus"]).merge([CorpusSummary.from_dict(s.summary["corpus"]) for s in stats[1:]])
        summary["corpus"] = merged.to_dict()
    write_summary(out, summary)
    return NgramStats(root=out, summary=summary)




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
    summary = stats_summary(orders, summaries, extra)
    if "corpus" in parts[0].summary:
        summary["corpus"] = parts[0].summary["corpus"]
    write_summary(out, summary)
    return NgramStats(root=out, summary=summary)
