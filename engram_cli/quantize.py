"""Smaller table stores: `quantize_store` (rows re-stored as another dtype) and `prune_store` (only the kept rows stored).

Both write a new store beside the source through `store.staged_output`: the source's
files (vocabulary, statistics, hit counts, tokenizer) hard-linked in, each layer's table
written anew shard by shard (one chunk in memory at a time), the root attributes updated
(dtype, plan with that dtype, geometry, the `derived` record) and `complete` last. The
plan's addresses never change (`same_addresses`: a checkpoint's plan fingerprint matches
a quantized or pruned copy of its store). docs/quantize.md has the formats, their error
bounds and the gate figures; docs/spec.md "Integer rows" and "Pruned tables" the contract.

- quantize: rows are decoded to float32 (exact) and encoded in the new dtype; a value that
  is not finite is refused, naming the layer and row (`StoreError`), before anything is
  moved into place. Rows already in the target dtype are copied byte for byte.
- prune: each layer keeps its rows with the highest score (`--keep-top F`: ceil(F x rows),
  ties to the lower row id; `--min-hits N`: every row with at least N hits). Scores:
  training-split hits (`NAME.train-stats`, written by `engram train`), else the
  store's own hit counts (the whole corpus, held-out text included), or the change of a
  row in training (L2 norm of trained - initial; `by="change"`). The pruned store holds the
  kept rows in row order and the map of their row ids (`layer_{id}/kept`); a lookup of a
  dropped row reads zeros (the Engram branch then adds nothing for that head).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from engram_cli.errors import StoreError
from engram_cli.int_rows import INT_LAYOUT
from engram_cli.kinds import TableDtype
from engram_cli.store import (
    ROOT_ATTR,
    TableStore,
    check_dtype_geometry,
    chunk_rows_for,
    from_storage,
    link_store,
    mark_complete,
    row_width,
    shard_rows_for,
    staged_output,
    storage_dtype,
    table_codecs,
    to_storage,
    write_shard,
)
from engram_cli.store.format import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_2,
    FP8_LAYOUT,
)

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3", "e4m3": "float8_e4m3"}
PRUNE_BY = ("hits", "change")
FALLBACK = "zeros"
KEPT_CHUNK = 1 << 20  # kept-map chunk (int64 row ids)


def parse_dtype(name: str) -> TableDtype:
    """A table dtype by its name or a short alias (bf16, fp16, fp32, fp8)."""
    return TableDtype.parse(DTYPE_ALIASES.get(str(name).strip().lower(), str(name).strip().lower()))


def same_addresses(plan, fingerprint: str) -> bool:
    """True when `plan` equals the plan of `fingerprint` but perhaps for its dtype (the same rows at the same addresses)."""
    return any(replace(plan, dtype=d.value).fingerprint == fingerprint for d in TableDtype)


# -- the kept set ----------------------------------------------------------------------------
def keep_count(rows: int, keep_top: float) -> int:
    """Rows a layer of `rows` keeps with `--keep-top keep_top`: ceil(F x rows), at most rows."""
    if not (0 < keep_top <= 1):
        raise StoreError(f"--keep-top must be a fraction in (0, 1], got {keep_top}")
    return min(rows, math.ceil(keep_top * rows))


def kept_from_scores(scores: np.ndarray, *, keep_top: float | None = None, min_hits: float | None = None) -> np.ndarray:
    """Sorted row ids kept: the top ceil(F x rows) scores (ties to the lower row id), or every row scoring >= min_hits."""
    if (keep_top is None) == (min_hits is None):
        raise StoreError("pass exactly one of --keep-top F and --min-hits N")
    if min_hits is not None:
        return np.flatnonzero(scores >= min_hits).astype(np.int64)
    k = keep_count(scores.size, keep_top)
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def training_hits(train_stats: dict, layer_id: int, rows: int) -> np.ndarray:
    """Training-split hits per row of a layer (float64 (rows,)), from the `arrays` of `train_stats.load_stats`."""
    key = f"rows_{layer_id}"
    if key not in train_stats:
        raise StoreError(f"the training statistics hold no row hits for layer {layer_id}; re-run `engram train`")
    out = np.zeros(rows, dtype=np.float64)
    out[np.asarray(train_stats[key], dtype=np.int64)] = np.asarray(train_stats[f"hits_{layer_id}"], dtype=np.float64)
    return out


def store_hits(store: TableStore, layer_id: int) -> np.ndarray:
    if not store.has_hits:
        raise StoreError(f"table store {str(store.path)!r} has no hit counts; pass --train-stats NAME.train-stats or --by change")
    return np.asarray(store.hits(layer_id)[:], dtype=np.float64)


def row_change(store: TableStore, initial: TableStore, layer_id: int, block_rows: int = 1 << 16) -> np.ndarray:
    """L2 norm of (row - initial row) per row of a layer, float64 (rows,), read block by block."""
    if initial.plan.layer_rows(layer_id) != store.plan.layer_rows(layer_id) or not same_addresses(store.plan, initial.plan.fingerprint):
        raise StoreError(f"the initial store {str(initial.path)!r} has another plan than {str(store.path)!r}; pass the store training started from")
    n = store.plan.layer_rows(layer_id)
    out = np.zeros(n, dtype=np.float64)
    for a in range(0, n, block_rows):
        ids = np.arange(a, min(n, a + block_rows))
        d = store.read_rows(layer_id, ids).astype(np.float64) - initial.read_rows(layer_id, ids).astype(np.float64)
        out[a : a + ids.size] = np.sqrt((d * d).sum(1))
    return out


def kept_rows(store: TableStore, *, keep_top=None, min_hits=None, by: str = "hits", train_stats: dict | None = None,
              initial: TableStore | None = None) -> dict[int, np.ndarray]:
    """layer -> sorted kept row ids, by training hits (`train_stats`, else the store's hits) or by row change (`initial`)."""
    if by not in PRUNE_BY:
        raise StoreError(f"unknown --by {by!r}; choose one of {', '.join(PRUNE_BY)}")
    if by == "change" and min_hits is not None:
        raise StoreError("--min-hits needs --by hits; with --by change pass --keep-top F")
    if by == "change" and initial is None:
        raise StoreError("--by change needs the store training started from: pass --initial TABLES.zarr")
    out = {}
    for l in store.plan.layer_ids:
        n = store.plan.layer_rows(l)
        if by == "change":
            scores = row_change(store, initial, l)
        else:
            scores = training_hits(train_stats, l, n) if train_stats is not None else store_hits(store, l)
        out[l] = kept_from_scores(scores, keep_top=keep_top, min_hits=min_hits)
    return out


# -- writing a derived store -----------------------------------------------------------------
def _finite_or_refuse(x: np.ndarray, layer_id: int, row_ids: np.ndarray, src: Path) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise StoreError(f"layer {layer_id} row {int(row_ids[r])} of {str(src)!r} holds {float(x[r, c])} at column {c}; "
                         "tables must hold finite values (a NaN or inf spoils its whole 32-value block); nothing was written")


def _blocks(src: TableStore, layer_id: int, dtype: TableDtype, ids: np.ndarray | None, start: int, stop: int, chunk_rows: int):
    """The output rows [start, stop) of a layer, chunk by chunk, in the storage form of `dtype`."""
    for a in range(start, stop, chunk_rows):
        b = min(stop, a + chunk_rows)
        rows = ids[a:b] if ids is not None else np.arange(a, b, dtype=np.int64)
        if src.kept_rows(layer_id) is None and ids is None:
            stored = src.load_layer(layer_id, rows=(a, b))
        else:
            stored = src.read_rows(layer_id, rows, as_stored=True)
        x = np.asarray(from_storage(stored, src.dtype), dtype=np.float32)
        _finite_or_refuse(x, layer_id, rows, src.path)
        yield stored if dtype == src.dtype else np.ascontiguousarray(to_storage(x, dtype))


def _table_attrs(old: dict, dtype: TableDtype, head_dim: int, chunk_rows: int, shard_rows: int) -> dict:
    attrs = {k: v for k, v in old.items() if k not in ("fp8", "int_rows")}
    attrs.update(dtype=dtype.value, storage_dtype=storage_dtype(dtype).name, chunk_rows=chunk_rows, shard_rows=shard_rows)
    if dtype.fp8:
        attrs["fp8"] = dict(FP8_LAYOUT, head_dim=head_dim)
    if dtype.integer:
        attrs["int_rows"] = dict(INT_LAYOUT, head_dim=head_dim)
    return attrs


def write_derived(src_path, out, *, dtype: TableDtype | str | None = None, kept: dict[int, np.ndarray] | None = None,
                  derived: dict | None = None, force: bool = False, progress=None) -> TableStore:
    """A copy of the store at `src_path` at `out`: rows in `dtype` (default: the source's), only the `kept` rows (layer -> sorted ids) when given.

    A pruned source stays pruned (its kept rows, unless `kept` narrows them). Returns the new store.
    """
    src = TableStore.open(src_path)
    dtype = TableDtype.parse(dtype or src.dtype)
    plan = replace(src.plan, dtype=dtype.value)
    check_dtype_geometry(plan.head_dim, dtype)
    if kept is None and src.pruned is not None:
        kept = {l: src.kept_rows(l) for l in plan.layer_ids}
    old_attrs = src.attrs
    chunk_rows = chunk_rows_for(plan, int(old_attrs.get("chunk_bytes") or DEFAULT_CHUNK_BYTES))
    shard_rows = shard_rows_for(plan, chunk_rows, int(old_attrs.get("shard_bytes") or DEFAULT_SHARD_BYTES))
    width, sdtype = row_width(plan.head_dim, dtype), storage_dtype(dtype)
    stored = {l: (kept[l].size if kept is not None else plan.layer_rows(l)) for l in plan.layer_ids}
    need = sum(stored.values()) * width * sdtype.itemsize
    with staged_output(out, force, inputs=(src.path,), need=need) as staging:
        partial = staging.partial
        link_store(src.path, partial)
        root = zarr.open_group(str(partial), mode="r+", zarr_format=3)
        attrs = dict(root.attrs.asdict()[ROOT_ATTR])
        attrs["complete"] = False
        root.attrs[ROOT_ATTR] = attrs
        codecs, done = None, 0
        for l in plan.layer_ids:
            g = root[f"layer_{l}"]
            old_table = dict(g["table"].attrs.asdict())
            for name in ("table", "kept"):
                if name in g:
                    shutil.rmtree(partial / f"layer_{l}" / name)  # hard links: the source's files stay
            table = zarr.create_array(
                store=str(partial / f"layer_{l}" / "table"), shape=(stored[l], width), dtype=sdtype, chunks=(chunk_rows, width),
                shards=(shard_rows, width), compressors=table_codecs(src.compressor, sdtype.itemsize), fill_value=0,
                dimension_names=("row", "col"), attributes=_table_attrs(old_table, dtype, plan.head_dim, chunk_rows, shard_rows), zarr_format=3,
            )
            codecs = codecs or table.metadata.to_dict()["codecs"]
            ids = kept[l] if kept is not None else None
            for s in range(-(-stored[l] // shard_rows)):
                done += (min(stored[l], (s + 1) * shard_rows) - s * shard_rows) * width * sdtype.itemsize
                a, b = s * shard_rows, min(stored[l], (s + 1) * shard_rows)
                key = table.metadata.encode_chunk_key((s, 0))
                write_shard(partial / f"layer_{l}" / "table" / key, _blocks(src, l, dtype, ids, a, b, chunk_rows), chunk_rows, shard_rows // chunk_rows, src.compressor)
                if progress is not None:
                    progress("writing", done, need, f"layer {l} shard {s}")
            if ids is not None:
                k = zarr.create_array(store=str(partial / f"layer_{l}" / "kept"), shape=(ids.size,), dtype="int64",
                                      chunks=(max(1, min(ids.size, KEPT_CHUNK)),), compressors=[ZstdCodec(level=1), Crc32cCodec()],
                                      fill_value=-1, dimension_names=("kept",), zarr_format=3,
                                      attributes={"layer_id": l, "meaning": "global row id of each stored row, increasing; other rows read as zeros"})
                if ids.size:
                    k[:] = ids
        attrs.update(plan=plan.to_dict(), dtype=dtype.value, storage_dtype=sdtype.name, chunk_rows=chunk_rows, shard_rows=shard_rows,
                     chunk_bytes=chunk_rows * width * sdtype.itemsize, shard_bytes=shard_rows * width * sdtype.itemsize)
        attrs["codecs"] = dict(attrs["codecs"], table=dict(attrs["codecs"]["table"], zarr=codecs if codecs is not None else attrs["codecs"]["table"]["zarr"]))
        for key in ("row_width", "fp8", "int_rows", "pruned"):
            attrs.pop(key, None)
        if dtype.fp8 or dtype.integer:
            attrs["row_width"] = width
            attrs["fp8" if dtype.fp8 else "int_rows"] = dict(FP8_LAYOUT if dtype.fp8 else INT_LAYOUT)
        if kept is not None:
            attrs["pruned"] = {"kept_rows": {str(l): int(stored[l]) for l in plan.layer_ids}, "fallback": FALLBACK,
                               "rows": {str(l): plan.layer_rows(l) for l in plan.layer_ids}, **((derived or {}).get("prune") or {})}
        attrs["format"] = FORMAT_2 if (dtype.integer or kept is not None) else FORMAT
        attrs["derived"] = {"from": str(Path(src.path).resolve()), "from_dtype": src.dtype, "from_plan_fingerprint": src.plan.fingerprint,
                            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **{k: v for k, v in (derived or {}).items() if k != "prune"}}
        root.attrs[ROOT_ATTR] = attrs
        mark_complete(partial)
    return staging.store


def quantize_store(src, out, dtype, *, force: bool = False, progress=None) -> TableStore:
    """The store at `src` with its rows re-stored as `dtype` (bfloat16, float16, float32, float8_e4m3, int8, int4) at `out`."""
    dtype = parse_dtype(dtype)
    return write_derived(src, out, dtype=dtype, derived={"by": "quantize", "dtype": dtype.value}, force=force, progress=progress)


def prune_store(src, out, *, keep_top: float | None = None, min_hits: float | None = None, by: str = "hits", train_stats: dict | None = None,
                initial=None, dtype=None, force: bool = False, progress=None) -> TableStore:
    """The store at `src` keeping only the rows `kept_rows` picks (each layer), at `out`; dropped rows read as zeros."""
    store = TableStore.open(src)
    init = TableStore.open(initial) if initial is not None else None
    kept = kept_rows(store, keep_top=keep_top, min_hits=min_hits, by=by, train_stats=train_stats, initial=init)
    source = "change" if by == "change" else ("training-split hits" if train_stats is not None else "store hits")
    record = {"by": "prune", "prune": {"kept_by": source, "keep_top": keep_top, "min_hits": min_hits}}
    return write_derived(src, out, dtype=parse_dtype(dtype) if dtype else None, kept=kept, derived=record, force=force, progress=progress)


# -- sizes -----------------------------------------------------------------------------------
def store_size(store: TableStore) -> dict:
    """Rows and bytes a store's tables take: stored rows, bytes per stored row (+ 8 for a kept-map entry), table bytes, bytes on disk."""
    plan = store.plan
    stored = sum(store.stored_rows(l) for l in plan.layer_ids)
    per_row = store.stored_row_width * store.storage_dtype.itemsize
    kept_bytes = 8 * stored if store.pruned is not None else 0
    tables = [store.path / f"layer_{l}" / name for l in plan.layer_ids for name in ("table", "kept")]
    disk = sum(f.stat().st_size for t in tables if t.exists() for f in t.rglob("*") if f.is_file())
    return {"path": str(store.path), "dtype": store.dtype, "rows": plan.total_rows, "rows_stored": stored, "bytes_per_row": per_row,
            "bytes_per_logical_row": (stored * per_row + kept_bytes) / max(plan.total_rows, 1),
            "table_bytes": stored * per_row + kept_bytes, "table_bytes_on_disk": disk, "pruned": store.pruned is not None}


def derived_report(src, new: TableStore) -> dict:
    """What `engram quantize` / `engram prune` print: the source's and the new store's sizes."""
    a, b = store_size(TableStore.open(src)), store_size(new)
    return {"source": a, "output": b, "table_bytes_ratio": b["table_bytes"] / max(a["table_bytes"], 1), "derived": new.attrs.get("derived"),
            "pruned": new.pruned}
