"""The on-disk format of a table store: option defaults, dtypes, chunk/shard geometry, codecs, the init recipe.

Everything here is a pure function of its arguments (no I/O): the reader, the writer
and the CLI agree on the format by importing it from this one module. The option
kinds (`TableDtype`, `InitKind`, `Compressor`, `ParallelKind`) live in engram_cli.kinds
and are parsed there (`Kind.parse`); the defaults are here. docs/store.md describes the
layout; docs/spec.md ("Rows", "FP8 rows") the row contents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ..defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_STORE, GiB  # noqa: F401 - re-exported for the store's users
from ..errors import PlanError, StoreError
from ..fp8 import (
    FP8_BLOCK,
    check_fp8_head_dim,
    dequantize_fp8_rows,
    fp8_row_bytes,
    quantize_fp8_rows,
)
from ..int_rows import (
    check_int_head_dim,
    dequantize_int_rows,
    int_row_bytes,
    quantize_int_rows,
)
from ..kinds import Compressor, InitKind, ParallelKind, TableDtype

FORMAT = "engram-tables/1"
# A store that only this version reads (int8/int4 rows, or a kept-row map: docs/spec.md
# "Pruned tables") records FORMAT_2, so an older engram refuses it by its format line
# instead of misreading it; every other store stays FORMAT, byte for byte.
FORMAT_2 = "engram-tables/2"
FORMATS = (FORMAT, FORMAT_2)
ROOT_ATTR = "engram"
STATS_DIR = "stats"
PARTIAL_SUFFIX = ".partial"

MiB = 1 << 20


DEFAULT_DTYPE = TableDtype.FLOAT32
DEFAULT_INIT = InitKind.NORMAL
DEFAULT_INIT_STD = 0.02
# Measured (benchmarks/bench_store.py, docs/benchmarks.md): freshly initialized rows
# hardly compress (float32: zstd-1 to 0.92x, blosc-lz4 + bit shuffle to 0.88x), but
# trained and 16-bit tables do, and zeros chunks vanish. blosc-lz4 is the cheap codec:
# the generate-and-write rate stays at 0.73x of a raw file write (zstd-1: 0.59x).
# `--compressor none` keeps only the crc32c checksum, for the last 20% of write rate.
DEFAULT_COMPRESSOR = Compressor.LZ4
DEFAULT_PARALLEL = ParallelKind.THREADS
LZ4_LEVEL = 1  # blosc-lz4 with bit shuffle; see table_codecs

# 4 MiB chunks: large enough that per-chunk overhead (index entry, checksum, codec
# call) is noise, small enough that a reader gathering a few rows decodes little.
DEFAULT_CHUNK_BYTES = 4 * MiB
# 128 MiB shards: a 200 GB table is ~1,600 files, not millions. A shard is the unit of
# work (one task writes it whole, chunk by chunk); a task holds only ~2 chunks in memory.
DEFAULT_SHARD_BYTES = 128 * MiB
# hits: 4 MiB uint64 chunks; counts are mostly zero on big tables, so zstd pays here.
HITS_CHUNK_ROWS = 1 << 19
HITS_CHUNKS_PER_SHARD = 32

INIT_RNG = (
    "rows = min(chunk_rows, layer_rows - chunk_index * chunk_rows); "
    "x = numpy.random.default_rng(numpy.random.SeedSequence([seed, layer_id, chunk_index]))"
    ".standard_normal((rows, head_dim), dtype=numpy.float32); x *= numpy.float32(std); "
    "then cast to the storage dtype: float32 as is, float16 by numpy astype "
    "(round to nearest even), bfloat16 as the upper 16 bits of the float32 word rounded "
    "to nearest even (stored as uint16), float8_e4m3 by engram_cli.fp8.quantize_fp8_rows "
    "(per row, one ue8m0 scale per 32 values; packed uint8 rows). init 'zeros': all zero."
)


# -- dtypes ------------------------------------------------------------------------
def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a table of logical `dtype` is stored as (bfloat16 -> uint16 words, float8_e4m3 -> uint8)."""
    return TableDtype.parse(dtype).storage_dtype


def row_width(head_dim: int, dtype: str) -> int:
    """Stored elements per row: head_dim, or head_dim + head_dim // 32 bytes for float8_e4m3 (int8/int4: `int_row_bytes`)."""
    dtype = TableDtype.parse(dtype)
    if dtype.integer:
        return int_row_bytes(head_dim, dtype.value)
    return fp8_row_bytes(head_dim) if dtype.fp8 else int(head_dim)


def check_dtype_geometry(head_dim: int, dtype: str) -> None:
    """PlanError when rows of `head_dim` cannot be stored as `dtype` (float8_e4m3: a multiple of 32)."""
    if TableDtype.parse(dtype).fp8:
        check_fp8_head_dim(head_dim)
    if TableDtype.parse(dtype).integer:
        check_int_head_dim(head_dim, dtype)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 as uint16 words, round to nearest even (NaN stays a quiet NaN).

    The same rounding as torch's `tensor.to(torch.bfloat16)`.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(words: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 words -> float32 (exact)."""
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (n, head_dim) -> the stored representation of logical `dtype`."""
    if dtype == TableDtype.FLOAT32:
        return np.asarray(x, dtype=np.float32)
    if dtype == TableDtype.FLOAT16:
        return np.asarray(x).astype(np.float16)
    if dtype == TableDtype.BFLOAT16:
        return float32_to_bfloat16_bits(x)
    if dtype == TableDtype.FLOAT8_E4M3:
        x = np.asarray(x, dtype=np.float32)
        return quantize_fp8_rows(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], fp8_row_bytes(x.shape[-1]))
    if dtype in (TableDtype.INT8, TableDtype.INT4):
        x = np.asarray(x, dtype=np.float32)
        kind = TableDtype.parse(dtype).value
        return quantize_int_rows(x.reshape(-1, x.shape[-1]), kind).reshape(*x.shape[:-1], int_row_bytes(x.shape[-1], kind))
    TableDtype.parse(dtype)  # raises PlanError
    raise AssertionError(dtype)


def from_storage(words: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> numpy values: float32/float16 as stored, bfloat16, float8_e4m3, int8 and int4 as float32."""
    if dtype == TableDtype.BFLOAT16:
        return bfloat16_bits_to_float32(words)
    if dtype == TableDtype.FLOAT8_E4M3:
        return dequantize_fp8_rows(words)
    if dtype in (TableDtype.INT8, TableDtype.INT4):
        return dequantize_int_rows(words, TableDtype.parse(dtype).value)
    return np.asarray(words)


# -- geometry ----------------------------------------------------------------------
def row_bytes(plan) -> int:
    """Stored bytes per row of `plan`'s tables."""
    return row_width(plan.head_dim, plan.dtype) * storage_dtype(plan.dtype).itemsize


def chunk_rows_for(plan, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: as many whole rows as fit in `chunk_bytes` (at least 1)."""
    if chunk_bytes < 1:
        raise StoreError(f"chunk size must be positive, got {chunk_bytes} bytes; pass e.g. --chunk-size 4MiB")
    return max(1, int(chunk_bytes) // row_bytes(plan))


def shard_rows_for(plan, chunk_rows: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Rows per shard: a whole number of chunks, about `shard_bytes` (at least one chunk)."""
    if shard_bytes < 1:
        raise StoreError(f"shard size must be positive, got {shard_bytes} bytes; pass e.g. --shard-size 128MiB")
    return chunk_rows * max(1, int(shard_bytes) // (chunk_rows * row_bytes(plan)))


def partial_path(out) -> "Path":  # noqa: F821 (imported inside)
    """Where a build of `out` writes until it is complete: `<out>.partial`."""

    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def chunk_row_range(plan, layer_id: int, chunk_index: int, chunk_rows: int) -> tuple[int, int]:
    """Rows [start, stop) of chunk `chunk_index` of a layer's table."""
    rows = plan.layer_rows(layer_id)
    n_chunks = ceil_div(rows, chunk_rows)
    if not 0 <= chunk_index < n_chunks:
        raise StoreError(f"chunk {chunk_index} is out of range: layer {layer_id} has {n_chunks} chunks of {chunk_rows} rows")
    start = chunk_index * chunk_rows
    return start, min(rows, start + chunk_rows)


def hits_geometry(memory_limit: int) -> tuple[int, int, int]:
    """(chunk rows, shard rows, rows per counting pass) of the hits arrays under `memory_limit`."""
    budget_rows = max(1024, (memory_limit // 2) // 8)  # the accumulator takes half the limit
    chunk = HITS_CHUNK_ROWS
    while chunk > 1024 and chunk > budget_rows:
        chunk //= 2
    shard = chunk * max(1, min(HITS_CHUNKS_PER_SHARD, budget_rows // chunk))
    pass_rows = shard * max(1, budget_rows // shard)
    return chunk, shard, pass_rows


# -- codecs ------------------------------------------------------------------------
def table_codecs(compressor: str, itemsize: int) -> list:
    """The inner-chunk bytes->bytes zarr codecs: an optional compressor, then crc32c."""

    compressor = Compressor.parse(compressor)
    if compressor == Compressor.NONE:
        return [Crc32cCodec()]
    if compressor == Compressor.ZSTD:
        return [ZstdCodec(level=1), Crc32cCodec()]
    # Bit shuffle groups the sign/exponent bits, the only compressible part of
    # random floats: measured on normal(0, 0.02) float32 chunks, clevel 1 with
    # bitshuffle ran 3.5 GB/s to 0.88x, byte shuffle at clevel 5 2.0 GB/s to 0.94x.
    # Inside zarr's codec threads blosc runs single-threaded.
    return [BloscCodec(cname="lz4", clevel=LZ4_LEVEL, shuffle="bitshuffle", typesize=itemsize), Crc32cCodec()]


def chunk_encoder(compressor: str, itemsize: int) -> Callable[[np.ndarray], object] | None:
    """The bytes->bytes compressor of one chunk (None for "none"), as `table_codecs` configures it.

    Equal, byte for byte, to zarr's ZstdCodec / BloscCodec (tests/test_store.py checks).
    """

    compressor = Compressor.parse(compressor)
    if compressor == Compressor.NONE:
        return None
    if compressor == Compressor.ZSTD:
        return Zstd(level=1, checksum=False).encode
    return Blosc(cname="lz4", clevel=LZ4_LEVEL, shuffle=Blosc.BITSHUFFLE, blocksize=0, typesize=itemsize).encode


# -- initialization ----------------------------------------------------------------
def init_chunk(plan, layer_id: int, chunk_index: int, chunk_rows: int, init: str = "normal", std: float = DEFAULT_INIT_STD) -> np.ndarray:
    """The initial rows of one chunk, in the storage dtype: (rows in chunk, row width).

    A pure function of (plan.seed, layer_id, chunk_index, chunk_rows, init, std); the
    recipe is `INIT_RNG` (also stored in the root attributes). float8_e4m3 chunks are
    the float32 recipe of the same chunk, quantized row by row.
    """
    if layer_id not in plan.primes:
        raise StoreError(f"layer {layer_id} is not in the plan (layers: {list(plan.layer_ids)})")
    init = InitKind.parse(init)
    start, stop = chunk_row_range(plan, layer_id, chunk_index, chunk_rows)
    shape = (stop - start, plan.head_dim)
    if init == InitKind.ZEROS:
        return np.zeros((stop - start, row_width(plan.head_dim, plan.dtype)), dtype=storage_dtype(plan.dtype))
    if plan.seed < 0:
        raise PlanError(f"seed must be >= 0 to initialize tables, got {plan.seed}")
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, layer_id, chunk_index]))
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(std)
    return to_storage(x, plan.dtype)


def shard_blocks(plan, layer_id: int, shard_index: int, chunk_rows: int, shard_rows: int, init: str, std: float):
    """The initial chunks of one shard, in order (the last chunk of a layer is short)."""
    rows = plan.layer_rows(layer_id)
    first = shard_index * shard_rows // chunk_rows
    last = ceil_div(min(rows, (shard_index + 1) * shard_rows), chunk_rows)
    return (init_chunk(plan, layer_id, c, chunk_rows, init, std) for c in range(first, last))



FP8_LAYOUT = {
    "block": FP8_BLOCK,
    "row": "[e4m3 value bytes (head_dim) | ue8m0 scale bytes (head_dim // 32)]",
    "dequantize": "float32(e4m3 byte) * bitcast_f32(uint32(scale_byte) << 23)",
}
