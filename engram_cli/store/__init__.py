"""The Zarr v3 store of a plan's tables (`tables.zarr`): format, reader (`TableStore`) and writer (the build).

One Zarr v3 group that plain zarr-python (or tensorstore) opens without this package:

    tables.zarr/
      zarr.json            root group; attributes["engram"] describe everything (`complete` last)
      vocab/               the compressed vocabulary, enough to hash tokens from the store alone
        lookup (V,) int64, raw_key (V,) bool, key_bytes (B,) uint8, key_offsets (C+1,) int64
      layer_{id}/
        table (rows, width)  float32 | float16 | uint16 (= bfloat16 words) | uint8 (= fp8 rows,
                             width head_dim + head_dim // 32); sharded, crc32c per chunk
        hits  (rows,) uint64 windows of the corpus that hash to each row (with statistics)
      stats/               NgramStats parquet files (not Zarr; zarr-python skips it)
      tokenizer/tokenizer.json  the build's --tokenizer file, copied (absent for `deepseek`); spec in attributes["engram"]["tokenizer"]

Modules: `format` (option defaults, dtypes, geometry, codecs, the init recipe), `reader`
(`TableStore`: open, load, stream, gather, rewrite rows in place), `writer` (the build's
public steps and the shard writer), `staging` (the one staged-output context: lock,
`<out>.partial`, finalize), `output` (output safety: checks, the lock, leftovers), `tokenizer`
(the tokenizer spec a store carries: `load_store_tokenizer`); hit counting lives in `engram_cli.hits`. docs/store.md
is the API with examples; docs/build-table.md lists every attribute. The design target
is DeepSeek's scale (~768M rows, ~200 GB): nothing holds a whole table in memory.

Names are loaded on first use, so `from engram_cli.store.format import DEFAULT_DTYPE` (the
CLI's option defaults) does not import zarr; the option kinds live in engram_cli.kinds.
"""

from __future__ import annotations

import importlib

_FORMAT = (
    "DEFAULT_CHUNK_BYTES", "DEFAULT_COMPRESSOR", "DEFAULT_DTYPE", "DEFAULT_INIT", "DEFAULT_INIT_STD",
    "DEFAULT_MEMORY_LIMIT", "DEFAULT_PARALLEL", "DEFAULT_SHARD_BYTES", "DEFAULT_STORE", "FORMAT", "INIT_RNG",
    "PARTIAL_SUFFIX", "ROOT_ATTR", "STATS_DIR", "_shard_blocks", "bfloat16_bits_to_float32", "ceil_div", "check_dtype_geometry",
    "chunk_encoder", "chunk_row_range", "chunk_rows_for", "float32_to_bfloat16_bits", "from_storage", "hits_geometry",
    "init_chunk", "partial_path", "row_bytes", "row_width", "shard_blocks", "shard_rows_for",
    "storage_dtype", "table_codecs", "to_storage",
)
_READER = ("TableStore",)
_WRITER = (
    "ShardTask", "StoreLayout", "_resolve_workers", "check_hit_totals", "check_write_options",
    "count_hits_range", "create_layout", "hit_passes", "mark_complete", "planned_write_bytes",
    "run_shard_task", "run_shard_tasks", "shard_tasks", "write_shard", "write_tables",
)
_STAGING = ("Staging", "create_store", "finalize", "link_store", "prepare_partial", "staged_file", "staged_output")
_OUTPUT = ("check_output",)
_HITS = ("hit_counts",)
_WHERE = {
    **dict.fromkeys(_FORMAT, ".format"), **dict.fromkeys(_READER, ".reader"), **dict.fromkeys(_WRITER, ".writer"),
    **dict.fromkeys(_STAGING, ".staging"), **dict.fromkeys(_OUTPUT, ".output"), **dict.fromkeys(_HITS, "..hits"),
}


def __getattr__(name: str):
    if name in ("format", "output", "reader", "staging", "writer"):
        return importlib.import_module(f".{name}", __name__)
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


__all__ = [n for n in _WHERE if not n.startswith("_")]
