"""Shared defaults: the file names and limits every stage and command agrees on.

The CLI reads its defaults from here instead of restating them, so `engram
compress-vocab`, `build-table`, `collisions`, `train` and `eval` chain in a fresh
directory with no flags.
"""

from __future__ import annotations

GiB = 1 << 30

# Default file names, relative to the working directory.
DEFAULT_VOCAB = "vocab.npz"  # written by `engram compress-vocab`, read by `build-table`
DEFAULT_STORE = "tables.zarr"  # written by `build-table`, read by `collisions`, `inspect`, `train`
DEFAULT_TEXT_FIELD = "text"  # the text field of .jsonl records and .parquet rows
DEFAULT_CHECKPOINT = "model.ckpt"  # written by `train`, read by `eval`
TRAINED_STORE_SUFFIX = ".tables.zarr"  # model.ckpt -> model.tables.zarr (the trained rows)

# Memory a build may use for its own buffers (counting runs, hit-count passes, chunk
# buffers). 2 GiB fits a laptop beside a browser; a server passes more with --memory-limit.
DEFAULT_MEMORY_LIMIT = 2 * GiB
