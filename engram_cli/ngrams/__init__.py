"""Exact n-gram statistics: the on-disk format and read handle (`stats`), counting (`count`),
merging shard statistics (`merge`) and the parquet footer reader (`parquet_footer`).

`NgramStats` is the value that passes between stages; `count_ngrams` makes one from
compressed id sequences, `merge_stats` / `concat_stats` join the statistics of corpus
shards into exactly the whole corpus's.
"""

from .count import (
    BYTES_PER_ROW_OVERHEAD,
    ContinuedIds,
    KeyLayout,
    count_ngrams,
    id_bits,
)
from .merge import concat_stats, merge_stats
from .stats import (
    STATS_FORMAT,
    SUMMARY_FILE,
    NgramStats,
    SummaryBuilder,
    order_file,
    summarize_counts,
    token_columns,
    write_stats_from_arrays,
    write_summary,
)

__all__ = [
    "BYTES_PER_ROW_OVERHEAD", "STATS_FORMAT", "SUMMARY_FILE", "ContinuedIds", "KeyLayout", "NgramStats", "SummaryBuilder", "concat_stats",
    "count_ngrams", "id_bits", "merge_stats", "order_file", "summarize_counts", "token_columns",
    "write_stats_from_arrays", "write_summary",
]
