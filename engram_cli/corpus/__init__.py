"""Corpus input: find the files, read their documents, plan map shards that read exactly like the whole.

    files     `corpus_files` (paths -> the files to read, in a deterministic order),
              format and compression by suffix, `table_store_reason`
    readers   ONE reader per format (plain text, JSON lines, parquet), each over a
              whole file or a byte/row range; `iter_documents` (a whole corpus);
              cutting long text into `ContinuedText` pieces at `safe_cut` points
    shards    planning only: `plan_shards`, `group_shards`, `check_unchanged`,
              `merge_summaries`; `iter_shard_documents` reads a shard's range
              through the readers
    summary   `CorpusSummary` (what reading found) and `empty_corpus_message`

The names below are the package's public API. Limits such as `readers.TEXT_PIECE_BYTES`
and `readers.MAX_JSON_LINE_BYTES` live in (and are patched on) `engram_cli.corpus.readers`.
"""

from engram_cli.corpus.files import corpus_files, table_store_reason
from engram_cli.corpus.readers import (
    ContinuedText,
    iter_documents,
    iter_pieces,
    read_file,
    safe_cut,
    split_text,
)
from engram_cli.corpus.shards import (
    DEFAULT_SHARD_BYTES,
    Shard,
    check_unchanged,
    group_shards,
    iter_shard_documents,
    merge_summaries,
    plan_shards,
)
from engram_cli.corpus.summary import CorpusSummary, empty_corpus_message

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "ContinuedText",
    "CorpusSummary",
    "Shard",
    "check_unchanged",
    "corpus_files",
    "empty_corpus_message",
    "group_shards",
    "iter_documents",
    "iter_pieces",
    "iter_shard_documents",
    "merge_summaries",
    "plan_shards",
    "read_file",
    "safe_cut",
    "split_text",
    "table_store_reason",
]
