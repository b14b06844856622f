"""`TableStore`: the handle on a complete table store, for reading (mode "r") and updating rows in place ("r+").

Reads: `load_layer` (a layer or a row range as one contiguous array, shard by shard,
optionally into a caller's buffer), `iter_row_blocks` (bounded-memory streaming),
`read_rows` (gather). Writes (mode "r+"): `write_rows` / `write_row_block` rewrite each
affected shard whole into a temporary file beside it, fsync it and rename it over the
old one, so a crash leaves every shard old or new, never torn; the root attributes
record every modification. One writer per store at a time (no lock is taken). Arrays come back in the STORAGE representation unless a
method says otherwise: float32, float16, bfloat16 as uint16 words, float8_e4m3 as
packed uint8 rows (docs/store.md).
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer

from ..aligned import aligned_empty
from ..errors import PlanError, StoreError
from ..fp8 import FP8RowError, fp8_rows_problem
from ..int_rows import IntRowError, int_rows_problem
from ..kinds import TableDtype
from ..ngrams import SUMMARY_FILE, NgramStats
from ..plan import TablePlan
from ..vocab import CompressedVocab, key_offsets_problem, vocab_array_problem
from .format import (
    FORMATS,
    ROOT_ATTR,
    STATS_DIR,
    ceil_div,
    chunk_row_range,
    from_storage,
    init_chunk,
    partial_path,
    row_bytes,
    row_width,
    storage_dtype,
    to_storage,
)
from .layout import verify_layout, write_shard
from .output import leftover_hint, leftover_notice

MODES = ("r", "r+")
TMP_PREFIX = "."  # temporary shard files are hidden: ".{name}.{token}.tmp" beside the shard
TMP_SUFFIX = ".tmp"


def _open_error(path: Path, what: str) -> StoreError:
    return StoreError(f"{str(path)!r} is not an engram table store ({what}); build one with `engram build-table`")


def _inconsistent(path: Path, field: str, what: str) -> StoreError:
    return StoreError(f"table store {str(path)!r} is inconsistent: its plan's {field} {what}; rebuild it with `engram build-table --force`")


def _rebuild(path: Path, what: str) -> StoreError:
    return StoreError(f"table store {str(path)!r} {what}; rebuild it with `engram build-table --force`")


# What zarr and its codecs raise on a chunk that does not decode: crc32c mismatch (ValueError),
# zstd/blosc errors (RuntimeError, ValueError), a frame larger than its chunk (codecs.ChunkSizeError).
CHUNK_ERRORS = (ValueError, RuntimeError, EOFError)


class CheckedArray:
    """A table or hits array whose reads turn a chunk that does not decode into one StoreError naming it.

    Everything but the reads (`[...]`, `get_*_selection`) is the zarr array's own
    (`shape`, `chunks`, `metadata`, ...). On a failed read the chunks the selection
    touches are read one by one (rows only: the first axis) to name the first bad one,
    its rows and its shard file.
    """

    _READS = ("get_basic_selection", "get_orthogonal_selection", "get_coordinate_selection", "get_block_selection", "get_mask_selection")

    def __init__(self, arr: zarr.Array, store_path: Path, layer_id: int, name: str):
        self._arr, self._path, self._layer, self._name = arr, store_path, layer_id, name

    def __getattr__(self, attr):
        value = getattr(self._arr, attr)
        if attr in self._READS:
            return lambda selection, *a, **k: self._read(value, selection, *a, **k)
        return value

    def __getitem__(self, selection):
        return self._read(self._arr.__getitem__, selection)

    def __len__(self) -> int:
        return len(self._arr)

    def __repr__(self) -> str:
        return f"CheckedArray({self._arr!r})"

    def _read(self, fn, selection, *a, **k):
        try:
            return fn(selection, *a, **k)
        except CHUNK_ERRORS as e:
            found = self._corrupt(selection, e)
            if found is None:  # every chunk of the selection reads: not a chunk's fault
                raise
            raise found from None

    def _rows_of(self, selection) -> np.ndarray | range | None:
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        n = int(self._arr.shape[0])
        if isinstance(first, slice):
            return range(*first.indices(n))
        if isinstance(first, (int, np.integer)):
            return range(int(first), int(first) + 1)
        try:
            rows = np.asarray(first, dtype=np.int64).ravel()
        except (TypeError, ValueError):
            return None
        return rows[(rows >= 0) & (rows < n)]

    def _corrupt(self, selection, e: BaseException) -> StoreError | None:
        """The StoreError naming the first chunk of `selection` that does not decode; None when they all do."""
        why = "crc32c checksum mismatch" if "checksum" in str(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        what = f"layer {self._layer} of {str(self._path)!r} has a corrupt {'hits ' if self._name == 'hits' else ''}chunk"
        rows = self._rows_of(selection)
        step = int(self._arr.chunks[0])
        shard = int(self._arr.shards[0]) if getattr(self._arr, "shards", None) else step
        chunks = sorted({int(r) // step for r in rows}) if rows is not None and len(rows) else []
        if isinstance(rows, range) and len(rows):
            chunks = range(rows.start // step, (rows.stop - 1) // step + 1)
        for c in chunks:
            a, b = c * step, min(int(self._arr.shape[0]), (c + 1) * step)
            try:
                self._arr[a:b]
            except CHUNK_ERRORS:
                key = self._arr.metadata.encode_chunk_key((a // shard,) + (0,) * (self._arr.ndim - 1))
                return StoreError(f"{what} {c} (rows {a}..{b}, file layer_{self._layer}/{self._name}/{key}: {why}); "
                                  "rebuild the store or restore it from a copy (`engram inspect --verify` checks every chunk)")
        if rows is not None:
            return None
        return StoreError(f"{what} ({why}); rebuild the store or restore it from a copy (`engram inspect --verify` finds it)")


class TableStore:
    """A handle on a complete table store (layout: docs/store.md); `open` it, do not construct it."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict, mode: str = "r"):
        self.path = path
        self.group = group
        self._attrs = attrs
        self._plan: TablePlan | None = None
        self.mode = mode

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "TableStore":
        """Open a complete store for reading ("r") or in-place row updates ("r+").

        Checks what readers rely on: the `complete` flag, the format, the plan (its own
        consistency: `plan.check_plan_consistent`), every array, group, shard and
        statistics file on disk (`_check_files`), for every layer a table of shape
        (plan.layer_rows(layer), stored row width) in the storage dtype (and hits of
        shape (rows,) when the store has them), and the plan against the vocabulary's and
        the statistics' metadata (`_check_consistent`). Anything else is a one-line
        StoreError with the fix (docs/store.md, "Inputs that are refused").
        """
        path = Path(path)
        if mode not in MODES:
            raise StoreError(f"table store mode must be one of {', '.join(MODES)}, got {mode!r}")

        if not path.exists():
            if leftover_hint(path):
                raise StoreError(f"table store {str(path)!r} does not exist; {leftover_hint(path)}")
            partial = partial_path(path)
            hint = f" (an interrupted build left {str(partial)!r}; rerun `engram build-table` with --force)" if partial.exists() else ""
            raise StoreError(f"table store {str(path)!r} does not exist{hint}; build it with `engram build-table`")
        leftover_notice(path)
        if not (path / "zarr.json").is_file():
            raise _open_error(path, "no zarr.json: not a Zarr v3 group")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as e:  # zarr raises many types for unreadable metadata
            raise _open_error(path, f"unreadable Zarr metadata: {type(e).__name__}") from None
        attrs = group.attrs.asdict().get(ROOT_ATTR)
        if not isinstance(attrs, dict):
            raise _open_error(path, f"the root group has no {ROOT_ATTR!r} attributes")
        if attrs.get("format") not in FORMATS:
            raise StoreError(f"{str(path)!r} has store format {attrs.get('format')!r}, this engram reads {' or '.join(map(repr, FORMATS))}; rebuild it with `engram build-table --force`")
        if attrs.get("complete") is not True:
            raise StoreError(f"table store {str(path)!r} is incomplete (its build was interrupted); rebuild it with `engram build-table --force`")
        store = cls(path, group, attrs, mode)
        try:
            store.plan  # noqa: B018 - validates the stored plan's fingerprint
            for key in ("dtype", "storage_dtype", "chunk_rows", "shard_rows", "init", "codecs"):
                attrs[key]  # noqa: B018
            store.storage_dtype  # noqa: B018
        except PlanError as e:
            raise StoreError(f"{str(path)!r}: {e}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise _open_error(path, f"malformed {ROOT_ATTR!r} attributes: {type(e).__name__} {e}") from None
        store._check_files()
        store._check_layout()
        store._check_consistent()
        return store

    def _check_files(self) -> None:
        """Every array, group and shard the store's attributes promise is on disk (`writer.verify_layout`).

        A missing `zarr.json` of any array (table, hits, vocab/*), a missing shard, or
        missing statistics files: one StoreError naming the first few.
        """

        verify_layout(self.path)

    def _check_consistent(self) -> None:
        """The plan agrees with the vocabulary's and the statistics' own metadata (no data read).

        The plan's own fields were checked by `TablePlan.from_dict` (`check_plan_consistent`).
        Here: the stored vocabulary's `compressed_size` equals the plan's
        `compressed_vocab_size`, and the plan's tokenizer `pad_id` is below the
        vocabulary's `vocab_size`; every compressed id the statistics hold (their parquet
        footers' max statistics, `NgramStats.recorded_max_id`) is below
        `compressed_vocab_size`. Files without the statistic are checked by the build's
        streaming pass only (`writer.check_stats_ids`).
        """

        plan = self.plan
        try:
            meta = self.group["vocab"].attrs.asdict()
        except KeyError:
            meta = {}
        size, csize = meta.get("vocab_size"), meta.get("compressed_size")
        if isinstance(csize, int) and csize != plan.compressed_vocab_size:
            raise _inconsistent(self.path, "compressed_vocab_size", f"is {plan.compressed_vocab_size}, its vocabulary has {csize} compressed ids")
        if isinstance(size, int) and not 0 <= plan.pad_id < size:
            raise _inconsistent(self.path, "pad_id", f"{plan.pad_id} is not a tokenizer id: its vocabulary has {size} ids")
        root = self.path / STATS_DIR
        if not (root / SUMMARY_FILE).is_file():
            return
        stats = NgramStats.open(root)
        for order in stats.orders:
            top = stats.recorded_max_id(order)
            if top is not None and top >= plan.compressed_vocab_size:
                raise _inconsistent(
                    self.path, "compressed_vocab_size",
                    f"is {plan.compressed_vocab_size}, smaller than compressed id {top} in the order-{order} statistics (counted with another vocabulary)",
                )

    def _check_layout(self) -> None:
        plan, sdtype = self.plan, self.storage_dtype
        width = row_width(plan.head_dim, self.dtype)
        for layer_id in plan.layer_ids:
            arr = self.table(layer_id)
            want = (self.stored_rows(layer_id), width)
            if tuple(arr.shape) != want or arr.dtype != sdtype:
                raise _rebuild(self.path, f"has layer_{layer_id}/table of shape {tuple(arr.shape)} {arr.dtype}, its plan needs {want} {sdtype}")
            if self.has_hits:
                hits = self.hits(layer_id)
                if tuple(hits.shape) != (plan.layer_rows(layer_id),):
                    raise _rebuild(self.path, f"has layer_{layer_id}/hits of shape {tuple(hits.shape)}, its plan needs ({plan.layer_rows(layer_id)},)")

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
        """The logical row dtype: float32, float16, bfloat16 or float8_e4m3."""
        return self._attrs["dtype"]

    @property
    def storage_dtype(self) -> np.dtype:
        """The numpy dtype of the stored arrays (bfloat16 -> uint16, float8_e4m3 -> uint8)."""
        return storage_dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.plan.head_dim

    @property
    def stored_row_width(self) -> int:
        """Stored elements per row: head_dim, or head_dim + head_dim // 32 bytes for float8_e4m3."""
        return row_width(self.plan.head_dim, self.dtype)

    def row_width(self, layer_id: int) -> int:
        """Stored elements per row of a layer's table (the same for every layer)."""
        self._layer_group(layer_id)
        return self.stored_row_width

    # -- pruned tables (docs/spec.md "Pruned tables") -----------------------------------
    @property
    def pruned(self) -> dict | None:
        """The kept-row record of a pruned store ({"kept_rows": {layer: rows}, "fallback", "by", ...}), None otherwise."""
        p = self._attrs.get("pruned")
        return p if isinstance(p, dict) else None

    def stored_rows(self, layer_id: int) -> int:
        """Rows the layer's table array holds: the plan's rows, or a pruned store's kept rows."""
        if self.pruned is None:
            return self.plan.layer_rows(layer_id)
        n = (self.pruned.get("kept_rows") or {}).get(str(layer_id))
        if not isinstance(n, int) or not 0 <= n <= self.plan.layer_rows(layer_id):
            raise _rebuild(self.path, f"records {n!r} kept rows for layer {layer_id}, not a row count")
        return n

    def kept_rows(self, layer_id: int) -> np.ndarray | None:
        """A pruned store's kept rows of a layer: sorted global row ids (int64, one per stored row); None when not pruned.

        Stored row i of the table is global row kept[i]; any other row reads as zeros.
        Checked on read: strictly increasing, within the layer, one per stored row.
        """
        if self.pruned is None:
            return None
        cache = self.__dict__.setdefault("_kept", {})
        if layer_id not in cache:
            try:
                kept = np.asarray(self._layer_group(layer_id)["kept"][:], dtype=np.int64)
            except KeyError:
                raise _rebuild(self.path, f"lacks layer_{layer_id}/kept") from None
            n = self.plan.layer_rows(layer_id)
            if kept.shape != (self.stored_rows(layer_id),) or (kept.size and (kept[0] < 0 or kept[-1] >= n or (np.diff(kept) <= 0).any())):
                raise _rebuild(self.path, f"has a layer_{layer_id}/kept map that is not {self.stored_rows(layer_id)} increasing row ids below {n}")
            cache[layer_id] = kept
        return cache[layer_id]

    @property
    def chunk_rows(self) -> int:
        return int(self._attrs["chunk_rows"])

    @property
    def shard_rows(self) -> int:
        return int(self._attrs["shard_rows"])

    @property
    def compressor(self) -> str:
        return self._attrs["codecs"]["table"]["compressor"]

    @property
    def has_hits(self) -> bool:
        return bool(self._attrs.get("has_hits"))

    @property
    def modified(self) -> list[dict]:
        """Records of in-place modifications, oldest first: {"by", "at", "layers", "rows", "complete"}."""
        return list(self._attrs.get("modified") or [])

    @property
    def stats(self) -> "NgramStats":

        root = self.path / STATS_DIR
        if not (root / SUMMARY_FILE).is_file():
            raise StoreError(f"table store {str(self.path)!r} holds no n-gram statistics (built without a corpus); rebuild it with `engram build-table CORPUS`")
        return NgramStats.open(root, verify=True)  # each order file checked against its build-time checksum before its first read

    @property
    def vocab(self) -> "CompressedVocab":
        """The compressed vocabulary stored in `vocab/`, checked against its fingerprint."""

        try:
            g = self.group["vocab"]
            meta = g.attrs.asdict()
            key_bytes = np.asarray(g["key_bytes"][:], dtype=np.uint8).tobytes()
            offsets = np.asarray(g["key_offsets"][:], dtype=np.int64)
            self._check_vocab_arrays(offsets, len(key_bytes))
            keys = tuple(key_bytes[offsets[i] : offsets[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(offsets) - 1))
            vocab = CompressedVocab(
                lookup=np.asarray(g["lookup"][:], dtype=np.int64),
                keys=keys,
                raw_key=np.asarray(g["raw_key"][:], dtype=bool),
                tokenizer_sha256=meta["tokenizer_sha256"],
                normalizer=meta["normalizer"],
                normalizer_version=meta["normalizer_version"],
            )
        except StoreError:
            raise
        except Exception as e:  # a corrupt chunk: zarr and its codecs raise ValueError, RuntimeError, zstd/blosc errors...
            raise StoreError(f"table store {str(self.path)!r} has a missing or corrupt vocabulary ({type(e).__name__}: {e}); rebuild it with `engram build-table --force`") from None
        if vocab.fingerprint != meta.get("fingerprint") or (self.plan.vocab_fingerprint and vocab.fingerprint != self.plan.vocab_fingerprint):
            raise StoreError(f"table store {str(self.path)!r}: the stored vocabulary does not match its fingerprint; rebuild it with `engram build-table --force`")
        self._check_vocab_arrays(None, 0, vocab)
        return vocab

    def _check_vocab_arrays(self, offsets, key_bytes: int, vocab: "CompressedVocab | None" = None) -> None:
        """StoreError when the stored key offsets or lookup are out of range (`vocab.key_offsets_problem`, `vocab.vocab_array_problem`)."""

        problem = vocab_array_problem(vocab.lookup, vocab.raw_key, vocab.compressed_size) if vocab is not None else key_offsets_problem(offsets, key_bytes)
        if problem:
            raise StoreError(f"table store {str(self.path)!r} has a corrupt vocabulary: {problem}; rebuild it with `engram build-table --force`")

    # -- arrays --------------------------------------------------------------------
    def _layer_group(self, layer_id: int) -> zarr.Group:
        if layer_id not in self.plan.primes:
            raise StoreError(f"layer {layer_id} is not in table store {str(self.path)!r} (layers: {list(self.layer_ids)})")
        try:
            return self.group[f"layer_{layer_id}"]
        except KeyError:
            raise _rebuild(self.path, f"lacks group layer_{layer_id}") from None

    def table(self, layer_id: int) -> CheckedArray:
        """The layer's table as a zarr array: (layer_rows, stored row width), storage dtype.

        Reads of a chunk that does not decode raise one StoreError naming it (`CheckedArray`).
        """
        try:
            return CheckedArray(self._layer_group(layer_id)["table"], self.path, layer_id, "table")
        except KeyError:
            raise _rebuild(self.path, f"lacks layer_{layer_id}/table") from None

    def hits(self, layer_id: int) -> zarr.Array:
        """The layer's hit counts: (layer_rows,) uint64."""
        if not self.has_hits:
            raise StoreError(f"table store {str(self.path)!r} has no hit counts (built without a corpus); rebuild it with `engram build-table CORPUS`")
        try:
            return CheckedArray(self._layer_group(layer_id)["hits"], self.path, layer_id, "hits")
        except KeyError:
            raise _rebuild(self.path, f"lacks layer_{layer_id}/hits") from None

    def _checksum_error(self, layer_id: int, e: ValueError) -> StoreError:
        if "checksum" not in str(e):
            raise e
        return StoreError(f"layer {layer_id} of {str(self.path)!r} has a corrupt chunk (crc32c mismatch); rebuild the store or restore it from a copy")

    def _read_range(self, arr: zarr.Array, layer_id: int, start: int, stop: int, out: np.ndarray) -> None:
        """arr[start:stop] decoded straight into `out` (C-contiguous, exact shape)."""
        try:
            arr.get_basic_selection((slice(start, stop), slice(None)), out=NDBuffer.from_numpy_array(out))
        except ValueError as e:  # zarr's crc32c codec raises ValueError on a mismatch
            raise self._checksum_error(layer_id, e) from None

    def _row_range(self, layer_id: int, rows) -> tuple[int, int]:
        n = self.stored_rows(layer_id)
        if rows is None:
            return 0, n
        try:
            start, stop = (int(rows[0]), int(rows[1]))
        except (TypeError, ValueError, IndexError):
            raise StoreError(f"rows must be a (start, stop) pair, got {rows!r}") from None
        if not 0 <= start <= stop <= n:
            raise StoreError(f"rows ({start}, {stop}) are out of range for layer {layer_id} ({n} rows)")
        return start, stop

    def load_layer(self, layer_id: int, *, rows: tuple[int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """A layer's table, or rows [start, stop) of it, as one C-contiguous numpy array.

        The STORAGE representation: float32 -> float32, float16 -> float16, bfloat16 ->
        uint16 words (torch: `torch.from_numpy(a).view(torch.bfloat16)`), float8_e4m3 ->
        uint8 packed rows of width head_dim + head_dim // 32 (engram_cli/fp8.py). Read
        shard by shard, each decoded straight into the result: never two copies. `out=`
        (shape (stop - start, row width), storage dtype, C-contiguous, e.g. a pinned
        torch tensor's `.numpy()`) is filled and returned.
        """
        arr = self.table(layer_id)
        start, stop = self._row_range(layer_id, rows)
        shape = (stop - start, self.stored_row_width)
        if out is None:
            out = aligned_empty(shape, self.storage_dtype)  # rows on cache-line boundaries (engram_cli/aligned.py)
        elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != self.storage_dtype or not out.flags.c_contiguous or not out.flags.writeable:
            got = f"{getattr(out, 'shape', '?')} {getattr(out, 'dtype', type(out).__name__)}"
            raise StoreError(f"out= must be a writable C-contiguous numpy array of shape {shape} and dtype {self.storage_dtype}, got {got}")
        step = self.shard_rows
        pos = start
        while pos < stop:
            end = min(stop, (pos // step + 1) * step)
            self._read_range(arr, layer_id, pos, end, out[pos - start : end - start])
            pos = end
        return out

    def iter_row_blocks(self, layer_id: int, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, rows[start:start + block_rows]) over a layer, in order, storage dtype.

        Holds one block at a time (plus the decoder's chunk); the last block is short.
        """
        if int(block_rows) < 1:
            raise StoreError(f"block_rows must be at least 1, got {block_rows}")
        n = self.stored_rows(layer_id)
        self.table(layer_id)
        for start in range(0, n, int(block_rows)):
            yield start, self.load_layer(layer_id, rows=(start, min(n, start + int(block_rows))))

    def read_rows(self, layer_id: int, row_ids, *, as_stored: bool = False) -> np.ndarray:
        """Gather rows: row_ids of any shape -> row_ids.shape + (width,).

        float32/float16 tables come back as stored; bfloat16 and float8_e4m3 tables as
        float32 (exact: the dequantized value), or as stored with `as_stored=True`. Each
        chunk touched is read once. Row ids are the plan's: in a pruned store a dropped row
        reads as +0.0 (stored form: a zero row encoded in the store's dtype).
        """
        arr = self.table(layer_id)
        ids = np.asarray(row_ids, dtype=np.int64)
        rows = self.plan.layer_rows(layer_id)
        if ids.size and (ids.min() < 0 or ids.max() >= rows):
            bad = ids[(ids < 0) | (ids >= rows)][0]
            raise StoreError(f"row {int(bad)} is out of range for layer {layer_id} ({rows} rows)")
        uniq, inverse = np.unique(ids.ravel(), return_inverse=True)
        kept = self.kept_rows(layer_id)
        if kept is not None:  # stored rows of the kept ids; the dropped ones read as zero bytes
            pos = np.minimum(np.searchsorted(kept, uniq), max(kept.size - 1, 0))
            hit = kept[pos] == uniq if kept.size else np.zeros(uniq.shape, dtype=bool)
            got = np.empty((uniq.size, arr.shape[1]), dtype=arr.dtype)
            got[:] = to_storage(np.zeros((1, self.head_dim), np.float32), self.dtype)  # the stored form of a zero row
            if hit.any():
                got[hit] = np.asarray(arr.get_orthogonal_selection((pos[hit], slice(None))))
            out = got[inverse].reshape(*ids.shape, arr.shape[1])
            return out if as_stored else from_storage(out, self.dtype)
        try:
            got = arr.get_orthogonal_selection((uniq, slice(None))) if uniq.size else np.empty((0, arr.shape[1]), arr.dtype)
        except ValueError as e:
            raise self._checksum_error(layer_id, e) from None
        out = np.asarray(got)[inverse].reshape(*ids.shape, arr.shape[1])
        return out if as_stored else from_storage(out, self.dtype)

    def regenerate_chunk(self, layer_id: int, chunk_index: int) -> np.ndarray:
        """The initial values of one chunk, recomputed (storage dtype, like `table()[...]`)."""
        init = self._attrs["init"]
        return init_chunk(self.plan, layer_id, chunk_index, self.chunk_rows, init["kind"], init["std"])

    def chunk_rows_range(self, layer_id: int, chunk_index: int) -> tuple[int, int]:
        return chunk_row_range(self.plan, layer_id, chunk_index, self.chunk_rows)

    # -- writing in place ("r+") ---------------------------------------------------------
    def _as_storage(self, values, n: int, layer_id: int, row_of=lambda i: i) -> np.ndarray:
        """`values` for n rows in the storage representation (float32 values are converted).

        FP8 stores refuse a row that is not finite or carries a scale byte 0 or 255
        (`fp8.fp8_rows_problem`): one StoreError naming the layer and the row
        (`row_of(i)`: the table row of values[i]).
        """
        values = np.asarray(values)
        width, sdtype = self.stored_row_width, self.storage_dtype
        try:
            if values.dtype == sdtype and values.shape == (n, width):
                out = np.ascontiguousarray(values)
                if self.dtype == TableDtype.FLOAT8_E4M3 and n:
                    problem = fp8_rows_problem(out, self.head_dim)
                    if problem is not None:
                        raise problem
                if TableDtype.parse(self.dtype).integer and n:
                    problem = int_rows_problem(out, self.head_dim, self.dtype)
                    if problem is not None:
                        raise problem
                return out
            if values.dtype == np.float32 and values.shape == (n, self.head_dim):
                return np.ascontiguousarray(to_storage(values, self.dtype))
        except (FP8RowError, IntRowError) as e:
            raise StoreError(f"layer {layer_id} row {row_of(e.row)} of the rows written to {str(self.path)!r} {e.what}; nothing was written") from None
        raise StoreError(
            f"values must be ({n}, {width}) {sdtype} (the stored form of {self.dtype}) or ({n}, {self.head_dim}) float32, "
            f"got {values.shape} {values.dtype}"
        )

    def _check_writable(self, layer_id: int) -> zarr.Array:
        if self.mode != "r+":
            raise StoreError(f"table store {str(self.path)!r} is open read-only; open it with TableStore.open(path, mode='r+') to write rows")
        if self.pruned is not None:
            raise StoreError(f"table store {str(self.path)!r} is pruned (it holds only its kept rows); write rows to the store it was pruned from")
        return self.table(layer_id)

    def write_rows(self, layer_id: int, row_ids, values, *, by: str = "write_rows") -> None:
        """Overwrite rows `row_ids` (1-D) of a layer with `values` (one row each; the last wins on repeats).

        `values`: (n, row width) in the storage representation, or (n, head_dim) float32
        converted with the store's dtype (e.g. quantized to fp8 row by row). Every
        affected shard is rewritten whole and atomically (see the module docstring);
        `by` names the writer in the modification record (e.g. "trained").
        """
        arr = self._check_writable(layer_id)
        ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        vals = self._as_storage(values, ids.size, layer_id, lambda i: int(ids[i]))
        n = arr.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad = ids[(ids < 0) | (ids >= n)][0]
            raise StoreError(f"row {int(bad)} is out of range for layer {layer_id} ({n} rows)")
        if not ids.size:
            return
        order = np.argsort(ids, kind="stable")
        ids, vals = ids[order], vals[order]
        last = np.ones(ids.size, dtype=bool)
        last[:-1] = ids[1:] != ids[:-1]  # the last of each run of equal ids wins
        ids, vals = ids[last], vals[last]

        def patch(c0: int, c1: int, block: np.ndarray | None) -> np.ndarray | None:
            i, j = np.searchsorted(ids, [c0, c1])
            if block is None:  # asked whether the chunk is wholly overwritten
                return np.empty((c1 - c0, vals.shape[1]), vals.dtype) if j - i == c1 - c0 else None
            block[ids[i:j] - c0] = vals[i:j]
            return block

        shards = np.unique(ids // self.shard_rows)
        self._modify(layer_id, [int(s) for s in shards], patch, by, int(ids.size))

    def write_row_block(self, layer_id: int, start: int, values, *, by: str = "write_rows") -> None:
        """Overwrite the contiguous rows [start, start + len(values)) of a layer (see `write_rows`)."""
        arr = self._check_writable(layer_id)
        values = np.asarray(values)
        m = values.shape[0] if values.ndim == 2 else -1
        vals = self._as_storage(values, m, layer_id, lambda i: int(start) + i)
        start, n = int(start), arr.shape[0]
        if not 0 <= start <= start + m <= n:
            raise StoreError(f"rows [{start}, {start + m}) are out of range for layer {layer_id} ({n} rows)")
        if not m:
            return
        stop = start + m

        def patch(c0: int, c1: int, block: np.ndarray | None) -> np.ndarray | None:
            lo, hi = max(c0, start), min(c1, stop)
            if block is None:
                return np.empty((c1 - c0, vals.shape[1]), vals.dtype) if lo == c0 and hi == c1 else None
            if lo < hi:  # chunks of an affected shard outside the block are copied as they are
                block[lo - c0 : hi - c0] = vals[lo - start : hi - start]
            return block

        shards = range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1)
        self._modify(layer_id, list(shards), patch, by, m)

    def _modify(self, layer_id: int, shards: list[int], patch, by: str, n_rows: int) -> None:
        """Record the modification, rewrite `shards` through `patch`, mark the record complete."""
        record = {"by": str(by), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "layers": [int(layer_id)], "rows": n_rows, "complete": False}
        self._attrs.setdefault("modified", []).append(record)
        self._save_attrs()
        for s in shards:
            self._rewrite_shard(layer_id, s, patch)
        record["complete"] = True
        self._save_attrs()

    def _save_attrs(self) -> None:
        self.group.attrs[ROOT_ATTR] = self._attrs

    def shard_path(self, layer_id: int, shard_index: int) -> Path:
        """The file of shard `shard_index` of a layer's table ("layer_{id}/table/c/{s}/0")."""
        key = self.table(layer_id).metadata.encode_chunk_key((shard_index, 0))
        return self.path / f"layer_{layer_id}" / "table" / key

    def _rewrite_shard(self, layer_id: int, s: int, patch) -> None:
        """Write shard `s` anew (old chunks, patched) to a temp file, fsync, rename it over the old one."""

        arr = self.table(layer_id)
        n, cr, sr = arr.shape[0], self.chunk_rows, self.shard_rows
        s0, s1 = s * sr, min(n, (s + 1) * sr)

        def blocks():
            for c0 in range(s0, s1, cr):
                c1 = min(s1, c0 + cr)
                block = patch(c0, c1, None)  # a fresh buffer when the chunk is wholly overwritten
                if block is None:
                    block = np.empty((c1 - c0, arr.shape[1]), dtype=arr.dtype)
                    self._read_range(arr, layer_id, c0, c1, block)
                yield patch(c0, c1, block)

        path = self.shard_path(layer_id, s)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
        try:
            write_shard(tmp, blocks(), cr, sr // cr, self.compressor, fsync=True)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    # -- summary -------------------------------------------------------------------
    def summary(self) -> dict:
        """A JSON-safe summary (keys documented in docs/build-table.md)."""
        plan = self.plan
        layers = []
        for layer_id in plan.layer_ids:
            rows = self.stored_rows(layer_id)
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
        out = {
            "path": str(self.path),
            "format": self._attrs["format"],
            "toolkit_version": self._attrs.get("toolkit_version"),
            "created": self._attrs.get("created"),
            "plan_fingerprint": plan.fingerprint,
            "dtype": self.dtype,
            "storage_dtype": self._attrs["storage_dtype"],
            "compressor": self.compressor,
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
        if self.pruned is not None:  # layers' rows and bytes above are the kept rows (docs/spec.md "Pruned tables")
            out["pruned"] = dict(self.pruned)
        return out

    def __repr__(self) -> str:
        return f"TableStore({str(self.path)!r}, layers={list(self.layer_ids)}, dtype={self.dtype}, mode={self.mode!r})"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


