"""The store's files on disk: one Zarr shard file written whole (`write_shard`), and the check that every file of a layout is there (`verify_layout`).

Both the reader (rewriting a shard in place) and the writer (the build) use them; they
depend on neither.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from ..errors import StoreError
from ..kinds import InitKind
from ..ngrams import SUMMARY_FILE, order_file
from ..plan import TablePlan
from .format import ROOT_ATTR, STATS_DIR, ceil_div, chunk_encoder
from .output import shown

VOCAB_ARRAYS = ("lookup", "raw_key", "key_bytes", "key_offsets")  # the arrays of the `vocab/` group


# -- the shard writer ------------------------------------------------------------------
def _crc32c(data) -> bytes:
    return np.array([google_crc32c.value(data)], dtype="<u4").tobytes()


def write_shard(path: Path, blocks, chunk_rows: int, chunks_per_shard: int, compressor: str, *, fsync: bool = False) -> int:
    """Write one shard file of Zarr's `sharding_indexed` codec from its chunks, in order.

    Layout (the codec's spec, index at the end): each chunk's bytes (little-endian
    C-order rows, zero-padded to `chunk_rows`, then compressed) followed by their
    crc32c; then the index, (offset, nbytes) uint64 little-endian per chunk (2**64-1
    for an absent chunk), and the index's crc32c. One chunk is in memory at a time.
    `fsync=True` flushes the file to disk before returning. Returns the bytes of table
    data written (before padding and compression).
    """
    index = np.full((chunks_per_shard, 2), np.iinfo(np.uint64).max, dtype="<u8")
    encode = None
    offset = written = 0
    path = Path(path)
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
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return written


def verify_layout(path: str | os.PathLike) -> None:
    """`StoreError` unless every array, group and written shard of the store at `path` exists (before `complete`).

    Checks the `zarr.json` of the root, `vocab/` and its arrays, every layer's group,
    table and hits; every shard file of every table (unless the init is zeros, whose
    shards are absent by design); the statistics' summary and order files.
    """
    path = Path(path)
    missing: list[str] = []
    root = path / "zarr.json"
    if not root.is_file():
        raise StoreError(f"{shown(path)} has no zarr.json; it is not a store")
    attrs = zarr.open_group(str(path), mode="r", zarr_format=3).attrs.asdict().get(ROOT_ATTR) or {}
    plan = TablePlan.from_dict(attrs["plan"])
    need = ["vocab/zarr.json", *(f"vocab/{a}/zarr.json" for a in VOCAB_ARRAYS)]
    shard_rows = attrs.get("shard_rows")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise StoreError(f"store {shown(path)} records shard_rows {shard_rows!r}, not a positive integer; rebuild it with `engram build-table --force`")
    zeros = (attrs.get("init") or {}).get("kind") == InitKind.ZEROS
    kept = (attrs.get("pruned") or {}).get("kept_rows") or {}  # a pruned store: rows stored per layer (docs/spec.md "Pruned tables")
    absent: list[str] = []  # shard files, found in time proportional to the files that exist
    n_absent = 0
    for layer_id in plan.layer_ids:
        need += [f"layer_{layer_id}/zarr.json", f"layer_{layer_id}/table/zarr.json"]
        if attrs.get("has_hits"):
            need.append(f"layer_{layer_id}/hits/zarr.json")
        stored = plan.layer_rows(layer_id)
        if attrs.get("pruned"):
            need.append(f"layer_{layer_id}/kept/zarr.json")
            stored = kept.get(str(layer_id))
            if not isinstance(stored, int) or not 0 <= stored <= plan.layer_rows(layer_id):
                raise StoreError(f"store {shown(path)} records {stored!r} kept rows for layer {layer_id}, not a row count; rebuild it with `engram prune --force`")
        if not zeros:
            first, count = _missing_shards(path / f"layer_{layer_id}" / "table", ceil_div(stored, shard_rows))
            absent += [f"layer_{layer_id}/table/c/{s}/0" for s in first]
            n_absent += count
    if attrs.get("has_hits"):
        need += [f"{STATS_DIR}/{SUMMARY_FILE}", *(str(order_file(Path(STATS_DIR), n)) for n in plan.orders)]
    missing = [n for n in need if not (path / n).is_file()]
    total = len(missing) + n_absent
    missing = (missing + absent)[:3]
    if total:
        more = f" and {total - 3:,} more" if total > 3 else ""
        raise StoreError(f"store {shown(path)} lacks {', '.join(missing)}{more}; it is not complete: rebuild it with `engram build-table --force`")


def _missing_shards(table: Path, n_shards: int) -> tuple[list[int], int]:
    """(the first three absent shard indices, how many are absent) of a table of `n_shards` shards `c/<s>/0`.

    Lists the shard folders that exist, so the work is proportional to them, never to
    `n_shards` (a forged plan may claim 10**12 shards).
    """
    cdir = table / "c"
    try:
        names = os.listdir(cdir)
    except OSError:
        names = []
    have = {int(n) for n in names if n.isdigit() and int(n) < n_shards and (cdir / n / "0").is_file()}
    first, s = [], 0
    while len(first) < 3 and s < n_shards and len(first) < n_shards - len(have):
        if s not in have:
            first.append(s)
        s += 1
    return first, n_shards - len(have)
