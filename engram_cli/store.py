"""`TableStore`: the Zarr v3 store of a plan's tables (`tables.zarr`).

One Zarr v3 group that plain zarr-python (or tensorstore) opens without this module:

    tables.zarr/
      zarr.json            root group; attributes["engram"] describe everything (`complete` last)
      vocab/               the compressed vocabulary, enough to hash tokens from the store alone
        lookup (V,) int64, raw_key (V,) bool, key_bytes (B,) uint8, key_offsets (C+1,) int64
      layer_{id}/
        table (rows, head_dim)   float32 | float16 | uint16 (= bfloat16 words); sharded
        hits  (rows,) uint64     windows of the corpus that hash to each row (with statistics)
      stats/               NgramStats parquet files (not Zarr; zarr-python skips it)

docs/build-table.md lists every attribute. The design target is DeepSeek's scale
(~768M rows, ~200 GB): nothing holds a whole table in memory. zarr-python creates the
arrays and their metadata; the table shards themselves are written by `write_shard`,
each whole by one task, one chunk in memory at a time, in exactly the bytes zarr-python
would write (tests/test_store.py compares them) at several times its rate. The initial
values of any chunk are a pure function of (seed, layer, chunk index), so any chunk can
be regenerated alone and shards are written in parallel.

A build writes into `<out>.partial` (`prepare_partial`, `write_tables`) and renames it
(`finalize`); `complete: true` is the last thing written, so `TableStore.open` rejects
an interrupted build.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import OutputError, PlanError, StoreError, VocabMismatch
from .hashing import ngram_row_ids
from .plan import TablePlan

if TYPE_CHECKING:
    from .ngrams import NgramStats
    from .vocab import CompressedVocab

FORMAT = "engram-tables/1"
ROOT_ATTR = "engram"
STATS_DIR = "stats"
PARTIAL_SUFFIX = ".partial"

MiB = 1 << 20
GiB = 1 << 30
# 4 MiB chunks: large enough that per-chunk overhead (index entry, checksum, codec
# call) is noise, small enough that a reader gathering a few rows decodes little.
DEFAULT_CHUNK_BYTES = 4 * MiB
# 128 MiB shards: a 200 GB table is ~1,600 files, not millions. A shard is the unit of
# work (one task writes it whole, chunk by chunk); a task holds only ~2 chunks in memory.
DEFAULT_SHARD_BYTES = 128 * MiB
DEFAULT_MEMORY_LIMIT = 2 * GiB
# Measured (benchmarks/bench_store.py, docs/benchmarks.md): freshly initialized rows
# hardly compress (float32: zstd-1 to 0.92x, blosc-lz4 + bit shuffle to 0.88x), but
# trained and 16-bit tables do, and zeros chunks vanish. blosc-lz4 is the cheap codec:
# the generate-and-write rate stays at 0.73x of a raw file write (zstd-1: 0.59x).
# `--compressor none` keeps only the crc32c checksum, for the last 20% of write rate.
DEFAULT_COMPRESSOR = "lz4"
COMPRESSORS = ("none", "lz4", "zstd")
LZ4_LEVEL = 1  # blosc-lz4 with bit shuffle; see table_codecs
DEFAULT_PARALLEL = "threads"
PARALLEL_KINDS = ("threads", "processes")
INIT_KINDS = ("normal", "zeros")
DEFAULT_INIT_STD = 0.02
# hits: 4 MiB uint64 chunks; counts are mostly zero on big tables, so zstd pays here.
HITS_CHUNK_ROWS = 1 << 19
HITS_CHUNKS_PER_SHARD = 32

STORAGE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}

INIT_RNG = (
    "rows = min(chunk_rows, layer_rows - chunk_index * chunk_rows); "
    "x = numpy.random.default_rng(numpy.random.SeedSequence([seed, layer_id, chunk_index]))"
    ".standard_normal((rows, head_dim), dtype=numpy.float32); x *= numpy.float32(std); "
    "then cast to the storage dtype: float32 as is, float16 by numpy astype "
    "(round to nearest even), bfloat16 as the upper 16 bits of the float32 word rounded "
    "to nearest even (stored as uint16). init 'zeros': all zero."
)

Progress = Callable[..., None]


# -- dtypes ------------------------------------------------------------------------
def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a table of logical `dtype` is stored as (bfloat16 -> uint16 words)."""
    try:
        return np.dtype(STORAGE_DTYPES[dtype])
    except KeyError:
        raise PlanError(f"table dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}") from None


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
    """float32 values -> the stored representation of logical `dtype`."""
    if dtype == "float32":
        return np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return np.asarray(x).astype(np.float16)
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(x)
    storage_dtype(dtype)  # raises PlanError
    raise AssertionError(dtype)


def from_storage(words: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values -> numpy values: float32/float16 as stored, bfloat16 as float32."""
    return bfloat16_bits_to_float32(words) if dtype == "bfloat16" else np.asarray(words)


# -- geometry ----------------------------------------------------------------------
def row_bytes(plan: TablePlan) -> int:
    return plan.head_dim * storage_dtype(plan.dtype).itemsize


def chunk_rows_for(plan: TablePlan, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: as many whole rows as fit in `chunk_bytes` (at least 1)."""
    if chunk_bytes < 1:
        raise StoreError(f"chunk size must be positive, got {chunk_bytes} bytes; pass e.g. --chunk-size 4MiB")
    return max(1, int(chunk_bytes) // row_bytes(plan))


def shard_rows_for(plan: TablePlan, chunk_rows: int, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """Rows per shard: a whole number of chunks, about `shard_bytes` (at least one chunk)."""
    if shard_bytes < 1:
        raise StoreError(f"shard size must be positive, got {shard_bytes} bytes; pass e.g. --shard-size 128MiB")
    return chunk_rows * max(1, int(shard_bytes) // (chunk_rows * row_bytes(plan)))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def table_codecs(compressor: str, itemsize: int) -> list:
    """The inner-chunk bytes->bytes codecs: an optional compressor, then crc32c."""
    if compressor == "none":
        return [Crc32cCodec()]
    if compressor == "zstd":
        return [ZstdCodec(level=1), Crc32cCodec()]
    if compressor == "lz4":
        # Bit shuffle groups the sign/exponent bits, the only compressible part of
        # random floats: measured on normal(0, 0.02) float32 chunks, clevel 1 with
        # bitshuffle ran 3.5 GB/s to 0.88x, byte shuffle at clevel 5 2.0 GB/s to 0.94x.
        # Inside zarr's codec threads blosc runs single-threaded.
        return [BloscCodec(cname="lz4", clevel=LZ4_LEVEL, shuffle="bitshuffle", typesize=itemsize), Crc32cCodec()]
    raise StoreError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")


# -- initialization ----------------------------------------------------------------
def chunk_row_range(plan: TablePlan, layer_id: int, chunk_index: int, chunk_rows: int) -> tuple[int, int]:
    rows = plan.layer_rows(layer_id)
    n_chunks = ceil_div(rows, chunk_rows)
    if not 0 <= chunk_index < n_chunks:
        raise StoreError(f"chunk {chunk_index} is out of range: layer {layer_id} has {n_chunks} chunks of {chunk_rows} rows")
    start = chunk_index * chunk_rows
    return start, min(rows, start + chunk_rows)


def init_chunk(
    plan: TablePlan, layer_id: int, chunk_index: int, chunk_rows: int, init: str = "normal", std: float = DEFAULT_INIT_STD
) -> np.ndarray:
    """The initial rows of one chunk, in the storage dtype: (rows in chunk, head_dim).

    A pure function of (plan.seed, layer_id, chunk_index, chunk_rows, init, std); the
    recipe is `INIT_RNG` (also stored in the root attributes).
    """
    if layer_id not in plan.primes:
        raise StoreError(f"layer {layer_id} is not in the plan (layers: {list(plan.layer_ids)})")
    start, stop = chunk_row_range(plan, layer_id, chunk_index, chunk_rows)
    shape = (stop - start, plan.head_dim)
    if init == "zeros":
        return np.zeros(shape, dtype=storage_dtype(plan.dtype))
    if init != "normal":
        raise StoreError(f"unknown init {init!r}; choose one of {', '.join(INIT_KINDS)}")
    if plan.seed < 0:
        raise PlanError(f"seed must be >= 0 to initialize tables, got {plan.seed}")
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, layer_id, chunk_index]))
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= np.float32(std)
    return to_storage(x, plan.dtype)


def _shard_blocks(plan: TablePlan, layer_id: int, shard_index: int, chunk_rows: int, shard_rows: int, init: str, std: float):
    """The initial chunks of one shard, in order (the last chunk of a layer is short)."""
    rows = plan.layer_rows(layer_id)
    first = shard_index * shard_rows // chunk_rows
    last = ceil_div(min(rows, (shard_index + 1) * shard_rows), chunk_rows)
    return (init_chunk(plan, layer_id, c, chunk_rows, init, std) for c in range(first, last))


def chunk_encoder(compressor: str, itemsize: int) -> Callable[[np.ndarray], object] | None:
    """The bytes->bytes compressor of one chunk (None for "none"), as `table_codecs` configures it.

    Equal, byte for byte, to zarr's ZstdCodec / BloscCodec (tests/test_store.py checks).
    """
    if compressor == "none":
        return None
    if compressor == "zstd":
        return Zstd(level=1, checksum=False).encode
    if compressor == "lz4":
        return Blosc(cname="lz4", clevel=LZ4_LEVEL, shuffle=Blosc.BITSHUFFLE, blocksize=0, typesize=itemsize).encode
    raise StoreError(f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")


def _crc32c(data) -> bytes:
    return np.array([google_crc32c.value(data)], dtype="<u4").tobytes()


def write_shard(path: Path, blocks, chunk_rows: int, chunks_per_shard: int, compressor: str) -> int:
    """Write one shard file of Zarr's `sharding_indexed` codec from its chunks, in order.

    Layout (the codec's spec, index at the end): each chunk's bytes (little-endian
    C-order rows, zero-padded to `chunk_rows`, then compressed) followed by their
    crc32c; then the index, (offset, nbytes) uint64 little-endian per chunk (2**64-1
    for an absent chunk), and the index's crc32c. One chunk is in memory at a time.
    Returns the bytes of table data written (before padding and compression).
    """
    index = np.full((chunks_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
    encode = None
    offset = written = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for i, block in enumerate(blocks):
            written += block.nbytes
            if block.shape[0] < chunk_rows:
                padded = np.zeros((chunk_rows, *block.shape[1:]), dtype=block.dtype)
                padded[: block.shape[0]] = block
                block = padded
            if encode is None:
                encode = chunk_encoder(compressor, block.dtype.itemsize) or (lambda raw: raw)
            raw = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
            data = encode(raw)
            f.write(data)
            f.write(_crc32c(data))
            n = memoryview(data).nbytes + 4
            index[i] = (offset, n)
            offset += n
        body = index.tobytes()
        f.write(body)
        f.write(_crc32c(body))
    return written


def _write_shard_task(path: str, plan: TablePlan, layer_id: int, shard_index: int, chunk_rows: int, shard_rows: int, init: str, std: float, compressor: str) -> int:
    """Generate and write one whole shard of a layer's table; returns its bytes of rows.

    A zeros table writes nothing: an absent shard reads as the fill value 0 (what zarr
    itself does for empty chunks).
    """
    rows = plan.layer_rows(layer_id)
    nbytes = (min(rows, (shard_index + 1) * shard_rows) - shard_index * shard_rows) * row_bytes(plan)
    if init == "zeros":
        return nbytes
    blocks = _shard_blocks(plan, layer_id, shard_index, chunk_rows, shard_rows, init, std)
    return write_shard(Path(path), blocks, chunk_rows, shard_rows // chunk_rows, compressor)


# -- hit counts ----------------------------------------------------------------------
def _stats_batch_rows(order: int, heads: int, memory_limit: int) -> int:
    per_ngram = order * 12 + 16 + heads * 8 * 3  # polars columns, ids, counts, row ids, masks
    return int(min(1 << 21, max(1 << 12, (memory_limit // 4) // per_ngram)))


def _accumulate(acc: np.ndarray, index: np.ndarray, weights: np.ndarray) -> None:
    """acc[index] += weights (uint64, repeated indices summed), exactly.

    np.add.at costs O(len(index)) and no extra memory; np.bincount would cost
    O(len(acc)) per batch plus two accumulator-sized temporaries.
    """
    np.add.at(acc, index, weights.astype(np.uint64, copy=False))


def hit_counts(
    plan: TablePlan,
    layer_id: int,
    stats: "NgramStats",
    start: int = 0,
    stop: int | None = None,
    *,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Hits of rows [start, stop) of a layer: (stop - start,) uint64.

    For every order n and head j, every distinct n-gram with count c adds c to row
    `offset_j + hash_j(ngram)`. Streams the statistics; holds the range plus one batch.
    `on_batch(m)` is called after each batch of m n-grams.
    """
    rows = plan.layer_rows(layer_id)
    stop = rows if stop is None else stop
    acc = np.zeros(stop - start, dtype=np.uint64)
    offsets = plan.row_offsets(layer_id)
    sizes = plan.head_primes(layer_id)
    for order in plan.orders:
        first = (order - 2) * plan.heads
        heads = [j for j in range(plan.heads) if offsets[first + j] < stop and offsets[first + j] + sizes[first + j] > start]
        if not heads:
            continue
        whole = all(offsets[first + j] >= start and offsets[first + j] + sizes[first + j] <= stop for j in heads)
        for ids, counts in stats.iter_batches(order, batch_rows=_stats_batch_rows(order, plan.heads, memory_limit)):
            row_ids = ngram_row_ids(plan, layer_id, ids)[:, heads]  # (m, h)
            weights = np.broadcast_to(counts[:, None], row_ids.shape)
            if whole:
                _accumulate(acc, (row_ids - start).ravel(), weights.ravel())
            else:
                keep = (row_ids >= start) & (row_ids < stop)
                _accumulate(acc, row_ids[keep] - start, weights[keep])
            if on_batch is not None:
                on_batch(int(ids.shape[0]))
    return acc


def _hits_geometry(memory_limit: int) -> tuple[int, int, int]:
    """(chunk rows, shard rows, rows per counting pass) of the hits arrays under `memory_limit`."""
    budget_rows = max(1024, (memory_limit // 2) // 8)  # the accumulator takes half the limit
    chunk = HITS_CHUNK_ROWS
    while chunk > 1024 and chunk > budget_rows:
        chunk //= 2
    shard = chunk * max(1, min(HITS_CHUNKS_PER_SHARD, budget_rows // chunk))
    pass_rows = shard * max(1, budget_rows // shard)
    return chunk, shard, pass_rows


# -- the store ---------------------------------------------------------------------
def _open_error(path: Path, what: str) -> StoreError:
    return StoreError(f"{str(path)!r} is not an engram table store ({what}); build one with `engram build-table`")


class TableStore:
    """A read handle on a complete table store (see the module docstring for the layout)."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict):
        self.path = path
        self.group = group
        self._attrs = attrs
        self._plan: TablePlan | None = None

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "TableStore":
        """Open a complete store; StoreError (one line, with the fix) for anything else."""
        path = Path(path)
        if not path.exists():
            partial = partial_path(path)
            hint = f" (an interrupted build left {str(partial)!r}; rerun `engram build-table` with --force)" if partial.exists() else ""
            raise StoreError(f"table store {str(path)!r} does not exist{hint}; build it with `engram build-table`")
        if not (path / "zarr.json").is_file():
            raise _open_error(path, "no zarr.json: not a Zarr v3 group")
        try:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
        except Exception as e:  # zarr raises many types for unreadable metadata
            raise _open_error(path, f"unreadable Zarr metadata: {type(e).__name__}") from None
        attrs = group.attrs.asdict().get(ROOT_ATTR)
        if not isinstance(attrs, dict):
            raise _open_error(path, f"the root group has no {ROOT_ATTR!r} attributes")
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{str(path)!r} has store format {attrs.get('format')!r}, this engram reads {FORMAT!r}; rebuild it with `engram build-table --force`")
        if attrs.get("complete") is not True:
            raise StoreError(f"table store {str(path)!r} is incomplete (its build was interrupted); rebuild it with `engram build-table --force`")
        store = cls(path, group, attrs)
        try:
            store.plan  # noqa: B018 - validates the stored plan's fingerprint
            for key in ("dtype", "storage_dtype", "chunk_rows", "shard_rows", "init", "codecs"):
                attrs[key]  # noqa: B018
        except PlanError as e:
            raise StoreError(f"{str(path)!r}: {e}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise _open_error(path, f"malformed {ROOT_ATTR!r} attributes: {type(e).__name__} {e}") from None
        return store

    # -- metadata ------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The root group's "engram" attributes (docs/build-table.md)."""
        return self._attrs

    @property
    def plan(self) -> TablePlan:
        if self._plan is None:
            self._plan = TablePlan.from_dict(self._attrs["plan"])
        return self._plan

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.plan.layer_ids

    @property
    def dtype(self) -> str:
        return self._attrs["dtype"]

    @property
    def chunk_rows(self) -> int:
        return int(self._attrs["chunk_rows"])

    @property
    def shard_rows(self) -> int:
        return int(self._attrs["shard_rows"])

    @property
    def has_hits(self) -> bool:
        return bool(self._attrs.get("has_hits"))

    @property
    def stats(self) -> "NgramStats":
        from .ngrams import SUMMARY_FILE, NgramStats

        root = self.path / STATS_DIR
        if not (root / SUMMARY_FILE).is_file():
            raise StoreError(f"table store {str(self.path)!r} holds no n-gram statistics (built without a corpus); rebuild it with `engram build-table CORPUS`")
        return NgramStats.open(root)

    @property
    def vocab(self) -> "CompressedVocab":
        """The compressed vocabulary stored in `vocab/`, checked against its fingerprint."""
        from .vocab import CompressedVocab

        try:
            g = self.group["vocab"]
            meta = g.attrs.asdict()
            key_bytes = np.asarray(g["key_bytes"][:], dtype=np.uint8).tobytes()
            offsets = np.asarray(g["key_offsets"][:], dtype=np.int64)
            keys = tuple(key_bytes[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1))
            vocab = CompressedVocab(
                lookup=np.asarray(g["lookup"][:], dtype=np.int64),
                keys=keys,
                raw_key=np.asarray(g["raw_key"][:], dtype=bool),
                tokenizer_sha256=meta["tokenizer_sha256"],
                normalizer=meta["normalizer"],
                normalizer_version=meta["normalizer_version"],
            )
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            raise StoreError(f"table store {str(self.path)!r} has a missing or corrupt vocabulary ({type(e).__name__}: {e}); rebuild it with `engram build-table --force`") from None
        if vocab.fingerprint != meta.get("fingerprint") or (self.plan.vocab_fingerprint and vocab.fingerprint != self.plan.vocab_fingerprint):
            raise StoreError(f"table store {str(self.path)!r}: the stored vocabulary does not match its fingerprint; rebuild it with `engram build-table --force`")
        return vocab

    # -- arrays --------------------------------------------------------------------
    def _layer_group(self, layer_id: int) -> zarr.Group:
        if layer_id not in self.plan.primes:
            raise StoreError(f"layer {layer_id} is not in table store {str(self.path)!r} (layers: {list(self.layer_ids)})")
        try:
            return self.group[f"layer_{layer_id}"]
        except KeyError:
            raise StoreError(f"table store {str(self.path)!r} lacks group layer_{layer_id}; rebuild it with `engram build-table --force`") from None

    def table(self, layer_id: int) -> zarr.Array:
        """The layer's table: (layer_rows, head_dim), storage dtype (bfloat16 as uint16)."""
        try:
            return self._layer_group(layer_id)["table"]
        except KeyError:
            raise StoreError(f"table store {str(self.path)!r} lacks layer_{layer_id}/table; rebuild it with `engram build-table --force`") from None

    def hits(self, layer_id: int) -> zarr.Array:
        """The layer's hit counts: (layer_rows,) uint64."""
        if not self.has_hits:
            raise StoreError(f"table store {str(self.path)!r} has no hit counts (built without a corpus); rebuild it with `engram build-table CORPUS`")
        try:
            return self._layer_group(layer_id)["hits"]
        except KeyError:
            raise StoreError(f"table store {str(self.path)!r} lacks layer_{layer_id}/hits; rebuild it with `engram build-table --force`") from None

    def read_rows(self, layer_id: int, row_ids, *, as_stored: bool = False) -> np.ndarray:
        """Gather rows: row_ids of any shape -> row_ids.shape + (head_dim,).

        float32/float16 tables come back as stored; bfloat16 tables as float32 (exact),
        or as their uint16 words with `as_stored=True`. Each chunk touched is read once.
        """
        arr = self.table(layer_id)
        ids = np.asarray(row_ids, dtype=np.int64)
        rows = arr.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= rows):
            bad = ids[(ids < 0) | (ids >= rows)][0]
            raise StoreError(f"row {int(bad)} is out of range for layer {layer_id} ({rows} rows)")
        uniq, inverse = np.unique(ids.ravel(), return_inverse=True)
        try:
            got = arr.get_orthogonal_selection((uniq, slice(None))) if uniq.size else np.empty((0, arr.shape[1]), arr.dtype)
        except ValueError as e:  # zarr's crc32c codec raises ValueError on a mismatch
            if "checksum" not in str(e):
                raise
            raise StoreError(f"layer {layer_id} of {str(self.path)!r} has a corrupt chunk (crc32c mismatch); rebuild the store or restore it from a copy") from None
        out = np.asarray(got)[inverse].reshape(*ids.shape, arr.shape[1])
        return out if as_stored else from_storage(out, self.dtype)

    def regenerate_chunk(self, layer_id: int, chunk_index: int) -> np.ndarray:
        """The initial values of one chunk, recomputed (storage dtype, like `table()[...]`)."""
        init = self._attrs["init"]
        return init_chunk(self.plan, layer_id, chunk_index, self.chunk_rows, init["kind"], init["std"])

    def chunk_rows_range(self, layer_id: int, chunk_index: int) -> tuple[int, int]:
        return chunk_row_range(self.plan, layer_id, chunk_index, self.chunk_rows)

    # -- summary -------------------------------------------------------------------
    def summary(self) -> dict:
        """A JSON-safe summary (keys documented in docs/build-table.md)."""
        plan = self.plan
        layers = []
        for layer_id in plan.layer_ids:
            rows = plan.layer_rows(layer_id)
            ldir = self.path / f"layer_{layer_id}" / "table"
            layers.append(
                {
                    "layer_id": layer_id,
                    "rows": rows,
                    "head_dim": plan.head_dim,
                    "bytes": rows * row_bytes(plan),
                    "chunks": ceil_div(rows, self.chunk_rows),
                    "shards": ceil_div(rows, self.shard_rows),
                    "bytes_on_disk": _disk_bytes(ldir),
                }
            )
        return {
            "path": str(self.path),
            "format": self._attrs["format"],
            "toolkit_version": self._attrs.get("toolkit_version"),
            "created": self._attrs.get("created"),
            "plan_fingerprint": plan.fingerprint,
            "dtype": self.dtype,
            "storage_dtype": self._attrs["storage_dtype"],
            "compressor": self._attrs["codecs"]["table"]["compressor"],
            "checksum": "crc32c",
            "chunk_rows": self.chunk_rows,
            "shard_rows": self.shard_rows,
            "init": dict(self._attrs["init"]),
            "layers": layers,
            "total_rows": plan.total_rows,
            "total_bytes": sum(layer["bytes"] for layer in layers),
            "bytes_on_disk": _disk_bytes(self.path),
            "has_hits": self.has_hits,
            "has_stats": (self.path / STATS_DIR).is_dir(),
        }

    def __repr__(self) -> str:
        return f"TableStore({str(self.path)!r}, layers={list(self.layer_ids)}, dtype={self.dtype})"


def _disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


# -- building ------------------------------------------------------------------------
def partial_path(out: str | os.PathLike) -> Path:
    """Where a build of `out` writes until it is complete: `<out>.partial`."""
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def check_output(out: str | os.PathLike, force: bool) -> Path:
    """Raise `OutputError` unless a store may be written at `out` (cheap: call it first)."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"{str(out)!r} already exists; pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {str(out)!r}: directory {str(parent)!r} does not exist; create it first")
    return out


def prepare_partial(out: str | os.PathLike, force: bool) -> Path:
    """Check `out` may be written, remove a stale partial, create an empty one; return it."""
    out = check_output(out, force)
    partial = partial_path(out)
    try:
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial)
        elif partial.exists() or partial.is_symlink():
            partial.unlink()
        partial.mkdir()
    except OSError as e:
        raise OutputError(f"cannot create {str(partial)!r}: {e.strerror}; choose a writable --out") from None
    return partial


def finalize(partial: str | os.PathLike, out: str | os.PathLike, force: bool) -> TableStore:
    """Move a complete partial store to `out` (replacing an existing one only with force).

    The old store is renamed aside before the new one moves in and deleted after, so
    at every moment one of them is on disk.
    """
    partial, out = Path(partial), Path(out)
    TableStore.open(partial)  # refuses an incomplete build
    old = None
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"{str(out)!r} already exists; pass --force to replace it")
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(partial, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)
        raise OutputError(f"cannot move {str(partial)!r} to {str(out)!r}: {e.strerror}") from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return TableStore.open(out)


def _vocab_group(root: zarr.Group, vocab: "CompressedVocab") -> None:
    g = root.create_group("vocab", attributes={
        "format": "engram-compressed-vocab/1",
        "tokenizer_sha256": vocab.tokenizer_sha256,
        "normalizer": vocab.normalizer,
        "normalizer_version": vocab.normalizer_version,
        "vocab_size": vocab.vocab_size,
        "compressed_size": vocab.compressed_size,
        "fingerprint": vocab.fingerprint,
        "keys": "key_bytes[key_offsets[c]:key_offsets[c+1]] is the UTF-8 key of compressed id c",
    })
    encoded = [k.encode("utf-8") for k in vocab.keys]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    key_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    for name, data in (
        ("lookup", np.asarray(vocab.lookup, dtype=np.int64)),
        ("raw_key", np.asarray(vocab.raw_key, dtype=bool)),
        ("key_bytes", key_bytes),
        ("key_offsets", offsets),
    ):
        arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(max(1, data.shape[0]),), fill_value=0)
        if data.size:
            arr[:] = data


def check_write_options(
    *,
    init: str = "normal",
    init_std: float = DEFAULT_INIT_STD,
    compressor: str = DEFAULT_COMPRESSOR,
    parallel: str = DEFAULT_PARALLEL,
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Raise `StoreError` for write options `write_tables` cannot use (cheap: call it first)."""
    if init not in INIT_KINDS:
        raise StoreError(f"unknown --init {init!r}; choose one of {', '.join(INIT_KINDS)}")
    if not (np.isfinite(init_std) and init_std >= 0):
        raise StoreError(f"--init-std must be a finite number >= 0, got {init_std}")
    if compressor not in COMPRESSORS:
        raise StoreError(f"unknown --compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}")
    if parallel not in PARALLEL_KINDS:
        raise StoreError(f"unknown parallel mode {parallel!r}; choose one of {', '.join(PARALLEL_KINDS)}")
    if workers is not None and workers < 1:
        raise StoreError(f"--workers must be at least 1, got {workers}")
    if chunk_bytes < 1 or shard_bytes < 1:
        raise StoreError(f"--chunk-size and --shard-size must be positive, got {chunk_bytes} and {shard_bytes} bytes")


def _resolve_workers(workers: int | None, chunk_bytes: int, memory_limit: int) -> int:
    """Workers to use (`workers` was checked by `check_write_options`), capped by memory."""
    by_memory = max(1, memory_limit // (4 * max(1, chunk_bytes)))  # a task holds ~2-3 chunks
    want = (os.cpu_count() or 1) if workers is None else workers
    return int(min(want, by_memory))


def _report(progress: Progress | None, stage: str, done, total=None, detail: str = "") -> None:
    if progress is not None:
        progress(stage, done, total, detail)


def write_tables(
    partial: str | os.PathLike,
    plan: TablePlan,
    vocab: "CompressedVocab",
    *,
    stats: "NgramStats | None",
    init: str = "normal",
    init_std: float = DEFAULT_INIT_STD,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compressor: str = DEFAULT_COMPRESSOR,
    workers: int | None = None,
    parallel: str = DEFAULT_PARALLEL,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    extra_attrs: dict | None = None,
    progress: Progress | None = None,
) -> None:
    """Write every array of the store into `partial`; `complete: true` is written last.

    progress(stage, done, total=None, detail="") is called with stage "hit counts"
    (n-grams streamed) and "writing" (table bytes written). An exception (from the
    progress callback too) stops the build and leaves `partial` incomplete.
    """
    from . import __version__

    partial = Path(partial)
    check_write_options(init=init, init_std=init_std, compressor=compressor, parallel=parallel, workers=workers, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    if plan.compressed_vocab_size != vocab.compressed_size:
        raise VocabMismatch(f"the plan is for {plan.compressed_vocab_size} compressed ids but the vocabulary has {vocab.compressed_size}; plan with this vocabulary")
    if plan.vocab_fingerprint and plan.vocab_fingerprint != vocab.fingerprint:
        raise VocabMismatch(f"the plan was made for vocabulary {plan.vocab_fingerprint[:12]}, not {vocab.fingerprint[:12]}; plan with this vocabulary")
    if not partial.is_dir():
        raise OutputError(f"{str(partial)!r} is not a directory; call prepare_partial first")
    if (partial / "zarr.json").exists():
        raise OutputError(f"{str(partial)!r} already holds a store; call prepare_partial to start afresh")

    sdtype = storage_dtype(plan.dtype)
    chunk_rows = chunk_rows_for(plan, chunk_bytes)
    shard_rows = shard_rows_for(plan, chunk_rows, shard_bytes)
    codecs = table_codecs(compressor, sdtype.itemsize)
    hits_chunk, hits_shard, pass_rows = _hits_geometry(memory_limit)
    n_workers = _resolve_workers(workers, chunk_rows * row_bytes(plan), memory_limit)

    if stats is not None:
        stats = _stats_in_store(stats, partial)
        missing = [n for n in plan.orders if n not in stats.orders]
        if missing:
            raise StoreError(f"the n-gram statistics cover orders {list(stats.orders)} but the plan needs {list(plan.orders)}; recount with --max-ngram {plan.max_ngram_size}")

    root = zarr.create_group(store=str(partial), zarr_format=3, overwrite=False)
    attrs = {
        "format": FORMAT,
        "complete": False,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "toolkit_version": __version__,
        "zarr_version": zarr.__version__,
        "numpy_version": np.__version__,
        "plan": plan.to_dict(),
        "tokenizer_sha256": vocab.tokenizer_sha256,
        "vocab_fingerprint": vocab.fingerprint,
        "hash_family": plan.hash_family,
        "dtype": plan.dtype,
        "storage_dtype": sdtype.name,
        "init": {"kind": init, "std": float(init_std), "seed": plan.seed, "chunk_rows": chunk_rows, "rng": INIT_RNG},
        "chunk_rows": chunk_rows,
        "shard_rows": shard_rows,
        "chunk_bytes": chunk_rows * row_bytes(plan),
        "shard_bytes": shard_rows * row_bytes(plan),
        "codecs": {},
        "layers": {},
        "has_hits": stats is not None,
        "stats": STATS_DIR if stats is not None else None,
        "extra": dict(extra_attrs or {}),
    }
    root.attrs[ROOT_ATTR] = attrs
    _vocab_group(root, vocab)

    tables: dict[int, zarr.Array] = {}
    hits_arrays: dict[int, zarr.Array] = {}
    for layer_id in plan.layer_ids:
        rows = plan.layer_rows(layer_id)
        offsets = plan.row_offsets(layer_id)
        g = root.create_group(f"layer_{layer_id}", attributes={"layer_id": layer_id})
        tables[layer_id] = g.create_array(
            "table",
            shape=(rows, plan.head_dim),
            dtype=sdtype,
            chunks=(chunk_rows, plan.head_dim),
            shards=(shard_rows, plan.head_dim),
            compressors=codecs,
            fill_value=0,
            dimension_names=("row", "col"),
            attributes={
                "layer_id": layer_id,
                "dtype": plan.dtype,
                "storage_dtype": sdtype.name,
                "row_offsets": offsets.tolist(),
                "primes": plan.head_primes(layer_id).tolist(),
                "heads": [{"order": n, "head": j} for n in plan.orders for j in range(plan.heads)],
                "chunk_rows": chunk_rows,
                "shard_rows": shard_rows,
            },
        )
        attrs["layers"][str(layer_id)] = {"rows": rows, "table": f"layer_{layer_id}/table", "hits": f"layer_{layer_id}/hits" if stats is not None else None}
        if stats is not None:
            hits_arrays[layer_id] = g.create_array(
                "hits",
                shape=(rows,),
                dtype="uint64",
                chunks=(hits_chunk,),
                shards=(hits_shard,),
                compressors=[ZstdCodec(level=1), Crc32cCodec()],
                fill_value=0,
                dimension_names=("row",),
                attributes={"layer_id": layer_id, "meaning": "sum of n-gram counts over the windows that hash to each row, all orders and heads"},
            )
    first = tables[plan.layer_ids[0]].metadata.to_dict()["codecs"]
    attrs["codecs"]["table"] = {"compressor": compressor, "checksum": "crc32c", "zarr": _json_safe(first)}
    if stats is not None:
        attrs["codecs"]["hits"] = {"compressor": "zstd", "checksum": "crc32c", "zarr": _json_safe(hits_arrays[plan.layer_ids[0]].metadata.to_dict()["codecs"])}
    root.attrs[ROOT_ATTR] = attrs

    if stats is not None:
        _write_hits(plan, stats, hits_arrays, pass_rows, memory_limit, progress)

    _write_all_tables(partial, plan, tables, chunk_rows, shard_rows, init, float(init_std), compressor, n_workers, parallel, progress)

    attrs["complete"] = True
    root.attrs[ROOT_ATTR] = attrs


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return _json_safe(obj.to_dict())
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _stats_in_store(stats: "NgramStats", partial: Path) -> "NgramStats":
    """The statistics as they will live in the store: copied in unless already there."""
    from .ngrams import NgramStats

    target = partial / STATS_DIR
    if Path(stats.root).resolve() == target.resolve():
        return stats
    if target.exists():
        raise OutputError(f"{str(target)!r} already exists and is not the statistics passed in; call prepare_partial to start afresh")
    shutil.copytree(stats.root, target)
    return NgramStats.open(target)


def _write_hits(plan: TablePlan, stats: "NgramStats", arrays: dict[int, zarr.Array], pass_rows: int, memory_limit: int, progress: Progress | None) -> None:
    """Count hits layer by layer, one row range (whole hits shards) at a time."""
    plan_passes = []
    for layer_id in plan.layer_ids:
        rows = plan.layer_rows(layer_id)
        for start in range(0, rows, pass_rows):
            plan_passes.append((layer_id, start, min(rows, start + pass_rows)))
    total = 0
    for layer_id, start, stop in plan_passes:
        offsets, sizes = plan.row_offsets(layer_id), plan.head_primes(layer_id)
        for order in plan.orders:
            i = (order - 2) * plan.heads
            if any(offsets[i + j] < stop and offsets[i + j] + sizes[i + j] > start for j in range(plan.heads)):
                total += stats.distinct(order)
    done = 0

    def on_batch(m: int) -> None:
        nonlocal done
        done += m
        _report(progress, "hit counts", done, total, "")

    _report(progress, "hit counts", 0, total, "")
    for layer_id in plan.layer_ids:
        per_order = dict.fromkeys(plan.orders, 0)
        for lid, start, stop in plan_passes:
            if lid != layer_id:
                continue
            acc = hit_counts(plan, layer_id, stats, start, stop, memory_limit=memory_limit, on_batch=on_batch)
            offsets = plan.row_offsets(layer_id)
            ends = offsets + plan.head_primes(layer_id)
            for order in plan.orders:
                i = (order - 2) * plan.heads
                lo, hi = max(start, int(offsets[i])), min(stop, int(ends[i + plan.heads - 1]))
                if lo < hi:
                    per_order[order] += int(acc[lo - start : hi - start].sum())
            arrays[layer_id][start:stop] = acc
            del acc
        for order in plan.orders:
            expect = stats.total(order) * plan.heads
            if per_order[order] != expect:
                raise StoreError(
                    f"layer {layer_id} order {order}: hit counts sum to {per_order[order]}, expected windows x heads = "
                    f"{stats.total(order)} x {plan.heads}; the statistics are inconsistent: recount them with `engram build-table --force`"
                )


def _write_all_tables(
    partial: Path,
    plan: TablePlan,
    tables: dict[int, zarr.Array],
    chunk_rows: int,
    shard_rows: int,
    init: str,
    std: float,
    compressor: str,
    workers: int,
    parallel: str,
    progress: Progress | None,
) -> None:
    """Write every shard of every layer, whole, `workers` at a time."""
    tasks = []
    for layer_id in plan.layer_ids:
        table_dir = partial / f"layer_{layer_id}" / "table"
        for s in range(ceil_div(plan.layer_rows(layer_id), shard_rows)):
            key = tables[layer_id].metadata.encode_chunk_key((s, 0))  # "c/{s}/0"
            tasks.append((layer_id, s, str(table_dir / key)))
    total = plan.total_rows * row_bytes(plan)
    done = 0
    _report(progress, "writing", 0, total, "")

    def args(layer_id, s, path):
        return (path, plan, layer_id, s, chunk_rows, shard_rows, init, std, compressor)

    if workers == 1:
        for layer_id, s, path in tasks:
            done += _write_shard_task(*args(layer_id, s, path))
            _report(progress, "writing", done, total, f"layer {layer_id} shard {s}")
        return
    if parallel == "processes":
        # spawn, not fork: blosc's threads and zarr's event loop do not survive a fork.
        executor: Executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    else:
        executor = ThreadPoolExecutor(workers, thread_name_prefix="engram-shard")
    try:
        pending = {}
        queue = list(reversed(tasks))
        while queue or pending:
            # At most 2 tasks per worker in flight: prompt cancellation on errors.
            while queue and len(pending) < 2 * workers:
                layer_id, s, path = queue.pop()
                pending[executor.submit(_write_shard_task, *args(layer_id, s, path))] = (layer_id, s)
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                layer_id, s = pending.pop(fut)
                done += fut.result()
                _report(progress, "writing", done, total, f"layer {layer_id} shard {s}")
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    executor.shutdown(wait=True)


def create_store(
    out: str | os.PathLike,
    plan: TablePlan,
    vocab: "CompressedVocab",
    *,
    stats_root: str | os.PathLike | None = None,
    force: bool = False,
    **write_kwargs,
) -> TableStore:
    """prepare_partial + write_tables (statistics copied from `stats_root`) + finalize.

    On failure the incomplete `<out>.partial` stays for inspection; the next build
    removes it.
    """
    from .ngrams import NgramStats

    stats = NgramStats.open(stats_root) if stats_root is not None else None
    partial = prepare_partial(out, force)
    write_tables(partial, plan, vocab, stats=stats, **write_kwargs)
    return finalize(partial, out, force)


__all__ = [
    "FORMAT",
    "TableStore",
    "bfloat16_bits_to_float32",
    "create_store",
    "finalize",
    "float32_to_bfloat16_bits",
    "hit_counts",
    "init_chunk",
    "partial_path",
    "prepare_partial",
    "write_shard",
    "write_tables",
]
