"""The Zarr v3 store of a plan's tables (`tables.zarr`): format, `TableStore` (read, r+) and the build's steps.

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

Modules: `format` (option defaults, dtypes, geometry, codecs, the init recipe), `layout`
(one shard file written whole, `verify_layout`), `table_store` (`TableStore`: open, load,
stream, gather, rewrite rows in place), `writer` (the build's public steps), `staging` (the one staged-output context: lock,
`<out>.partial`, finalize), `output` (output safety: checks, the lock, leftovers), `tokenizer`
(the tokenizer spec a store carries: `load_store_tokenizer`); hit counting lives in `engram_cli.hits`. docs/store.md
is the API with examples; docs/build-table.md lists every attribute. The design target
is DeepSeek's scale (~768M rows, ~200 GB): nothing holds a whole table in memory.

The option kinds (dtype, init, compressor) live in `engram_cli.kinds`.
"""

from . import codecs as _codecs  # noqa: F401 - registers the bounded zstd/blosc decoders with zarr (store/codecs.py)
from ..hits import hit_counts
from .format import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_COMPRESSOR,
    DEFAULT_DTYPE,
    DEFAULT_INIT,
    DEFAULT_INIT_STD,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_PARALLEL,
    DEFAULT_SHARD_BYTES,
    DEFAULT_STORE,
    FORMAT,
    INIT_RNG,
    PARTIAL_SUFFIX,
    ROOT_ATTR,
    STATS_DIR,
    bfloat16_bits_to_float32,
    ceil_div,
    check_dtype_geometry,
    chunk_encoder,
    chunk_row_range,
    chunk_rows_for,
    float32_to_bfloat16_bits,
    from_storage,
    hits_geometry,
    init_chunk,
    partial_path,
    row_bytes,
    row_width,
    shard_blocks,
    shard_rows_for,
    storage_dtype,
    table_codecs,
    to_storage,
)
from .layout import VOCAB_ARRAYS, verify_layout, write_shard
from .output import check_output
from .staging import (
    Staging,
    create_store,
    finalize,
    link_store,
    prepare_partial,
    staged_file,
    staged_output,
)
from .table_store import TableStore
from .tokenizer import load_store_tokenizer
from .writer import (
    ShardTask,
    StoreLayout,
    check_hit_totals,
    check_write_options,
    count_hits_range,
    create_layout,
    hit_passes,
    mark_complete,
    planned_write_bytes,
    run_shard_task,
    run_shard_tasks,
    shard_tasks,
    write_tables,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES", "DEFAULT_COMPRESSOR", "DEFAULT_DTYPE", "DEFAULT_INIT", "DEFAULT_INIT_STD", "DEFAULT_MEMORY_LIMIT",
    "DEFAULT_PARALLEL", "DEFAULT_SHARD_BYTES", "DEFAULT_STORE", "FORMAT", "INIT_RNG", "PARTIAL_SUFFIX", "ROOT_ATTR", "STATS_DIR",
    "VOCAB_ARRAYS", "ShardTask", "Staging", "StoreLayout", "TableStore", "bfloat16_bits_to_float32", "ceil_div",
    "check_dtype_geometry", "check_hit_totals", "check_output", "check_write_options", "chunk_encoder", "chunk_row_range",
    "chunk_rows_for", "count_hits_range", "create_layout", "create_store", "finalize", "float32_to_bfloat16_bits",
    "from_storage", "hit_counts", "hit_passes", "hits_geometry", "init_chunk", "link_store", "load_store_tokenizer",
    "mark_complete", "partial_path", "planned_write_bytes", "prepare_partial", "row_bytes", "row_width", "run_shard_task",
    "run_shard_tasks", "shard_blocks", "shard_rows_for", "shard_tasks", "staged_file", "staged_output", "storage_dtype",
    "table_codecs", "to_storage", "verify_layout", "write_shard", "write_tables",
]
