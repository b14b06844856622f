"""`engram inspect`: what a table store holds, how it was built, how its rows are used,
and whether every chunk still verifies. Built on the public `TableStore` reader.

Nothing here holds a whole table or hits array in memory: hits are streamed one
chunk at a time into a count-of-counts histogram (how many rows were hit exactly c
times), from which the hit shares and the rank/frequency curve follow exactly; the
verification reads one chunk at a time. The `--json` schema is docs/inspect.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .audit import save_figure
from .audit.saturation import saturation_verdict
from .errors import EngramError, StoreError
from .pipeline.report import plan_report
from .store import TableStore
from .ngrams.stats import order_file
from .store.format import ceil_div, row_bytes
from .store.layout import VOCAB_ARRAYS
from .store.tokenizer import TOKENIZER_ATTR
from .vocab import TOKENIZER_ENGINE

REPORT_FORMAT = "engram-inspect/1"
TOP_SHARES = (0.01, 0.10)
Progress = Callable[..., None]


def _noop(*_args, **_kwargs) -> None:
    return None


# -- hits ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HitProfile:
    """How the rows of one (layer, order) were hit: `values[i]` hits on `rows[i]` rows.

    `values` is ascending and includes 0 (rows never hit) when there are such rows.
    """

    layer_id: int
    order: int
    start: int  # first row of the order's heads in the layer's table
    stop: int
    values: np.ndarray  # (d,) uint64, distinct hit counts, ascending
    rows: np.ndarray  # (d,) int64, how many rows have that count

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    @property
    def total_hits(self) -> int:
        return int((self.values.astype(object) * self.rows.astype(object)).sum()) if self.values.size else 0

    @property
    def rows_hit(self) -> int:
        return int(self.rows[self.values > 0].sum())

    def top_share(self, fraction: float) -> float:
        """Share of all hits that land on the most-hit `fraction` of the rows (at least one row)."""
        total = self.total_hits
        if total == 0:
            return 0.0
        k = max(1, int(np.ceil(fraction * self.n_rows)))
        got = 0
        for v, r in zip(self.values[::-1].tolist(), self.rows[::-1].tolist()):
            take = min(k, r)
            got += int(v) * take
            k -= take
            if k == 0:
                break
        return got / total

    def rank_frequency(self) -> tuple[np.ndarray, np.ndarray]:
        """(rank, hits) corner points of the rank/frequency curve over the rows hit (rank 1 = most hit)."""
        nz = self.values > 0
        v, r = self.values[nz][::-1], self.rows[nz][::-1]
        last = np.cumsum(r)
        first = last - r + 1
        ranks = np.stack([first, last], axis=1).ravel()
        return ranks, np.repeat(v, 2)

    def to_dict(self) -> dict:
        hit = self.rows_hit
        return {
            "layer_id": self.layer_id,
            "order": self.order,
            "rows": self.n_rows,
            "rows_hit": hit,
            "rows_never_hit": self.n_rows - hit,
            "hit_share_of_rows": hit / self.n_rows if self.n_rows else 0.0,
            "hits": self.total_hits,
            "max_hits": int(self.values[-1]) if self.values.size else 0,
            "top1pct_share": self.top_share(TOP_SHARES[0]),
            "top10pct_share": self.top_share(TOP_SHARES[1]),
        }


def order_row_ranges(store: TableStore, layer_id: int) -> list[tuple[int, int, int]]:
    """(order, start, stop): the rows of each order's heads in a layer (order-major)."""
    plan = store.plan
    out, pos = [], 0
    for n in plan.orders:
        rows = int(sum(plan.primes[layer_id][n - 2]))
        out.append((n, pos, pos + rows))
        pos += rows
    return out


def _hits_block_rows(arr) -> int:
    return int(arr.chunks[0])  # the inner (sharded) chunk: <= 4 MiB of uint64


def _merge(acc: dict, block: np.ndarray) -> None:
    v, c = np.unique(block, return_counts=True)
    for value, count in zip(v.tolist(), c.tolist()):
        acc[value] = acc.get(value, 0) + count


def hit_profiles(store: TableStore, *, progress: Progress = _noop) -> list[HitProfile]:
    """Per layer and order, the count-of-counts of the store's hits, streamed chunk by chunk."""
    if not store.has_hits:
        return []
    profiles = []
    total = store.plan.total_rows
    done = 0
    progress("read hits", 0, total, "")
    for layer_id in store.layer_ids:
        arr = store.hits(layer_id)
        step = _hits_block_rows(arr)
        for order, start, stop in order_row_ranges(store, layer_id):
            acc: dict[int, int] = {}
            for a in range(start, stop, step):
                b = min(stop, a + step)
                _merge(acc, _read_hits(store, arr, layer_id, a, b))
                done += b - a
                progress("read hits", done, total, f"layer {layer_id} order {order}")
            keys = sorted(acc)
            profiles.append(HitProfile(layer_id, order, start, stop, np.array(keys, dtype=np.uint64), np.array([acc[k] for k in keys], dtype=np.int64)))
    return profiles


def _read_hits(store: TableStore, arr, layer_id: int, a: int, b: int) -> np.ndarray:
    try:
        return np.asarray(arr[a:b])
    except ValueError as e:  # zarr's crc32c codec raises ValueError on a mismatch
        if "checksum" not in str(e):
            raise
        raise StoreError(f"layer {layer_id} of {str(store.path)!r} has a corrupt hits chunk (crc32c mismatch); run `engram inspect --verify` and rebuild the store") from None


# -- the report ----------------------------------------------------------------------
def tokenizer_report(spec) -> dict | None:
    """The store's tokenizer record (`store.tokenizer`) as inspect shows it: spec, sha256, the engine that encoded
    the corpus, its version and its identity check against the reference (null for the reference itself,
    and for stores built before engines were recorded); None for a store without the record."""
    if not isinstance(spec, dict):
        return None
    return {
        "spec": spec.get("spec"),
        "sha256": spec.get("sha256"),
        "engine": spec.get("engine", TOKENIZER_ENGINE),
        "engine_version": spec.get("engine_version"),
        "identity": spec.get("identity"),
    }


def disk_split(path) -> tuple[int, int]:
    """(bytes of files written for this store alone, bytes of files hard-linked with another store) under `path`.

    `engram train` links the initial store's files into its output and rewrites the
    shards that hold trained rows: the first figure is what training added on disk.
    """
    new = linked = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(root, name))
            if st.st_nlink > 1:
                linked += st.st_size
            else:
                new += st.st_size
    return new, linked


def modification_operations(records: list[dict]) -> list[dict]:
    """The modification records grouped by operation: a run of records written `by` the same
    operation (an import or a training run writes one record per layer or shard) is one
    operation, with its rows and writes summed, its layers joined and its first and last times."""
    ops: list[dict] = []
    for r in records:
        by = r.get("by")
        if ops and ops[-1]["by"] == by:
            op = ops[-1]
        else:
            op = {"by": by, "first_at": r.get("at"), "last_at": r.get("at"), "rows": 0, "layers": [], "writes": 0, "complete": True}
            ops.append(op)
        op["rows"] += int(r.get("rows", 0))
        op["writes"] += 1
        op["last_at"] = r.get("at")
        op["layers"] += [int(x) for x in r.get("layers") or [] if int(x) not in op["layers"]]
        op["complete"] = op["complete"] and bool(r.get("complete"))
    return ops


def pruned_report(store: TableStore) -> dict | None:
    """A pruned store's kept rows per layer (docs/spec.md "Pruned tables"), with how they were chosen; None when not pruned."""
    p = store.pruned
    if p is None:
        return None
    layers = [{"layer_id": l, "kept_rows": store.stored_rows(l), "rows": store.plan.layer_rows(l),
               "kept_share": store.stored_rows(l) / max(1, store.plan.layer_rows(l))} for l in store.layer_ids]
    return {"layers": layers, "fallback": p.get("fallback"), **{k: p[k] for k in ("kept_by", "keep_top", "min_hits") if k in p}}


def inspect_store(store: TableStore, profiles: list[HitProfile] | None = None) -> dict:
    """The JSON-safe report of docs/inspect.md (`profiles` from `hit_profiles`)."""

    summary = store.summary()
    attrs = store.attrs
    extra = attrs.get("extra") or {}
    modified = store.modified
    plan = store.plan
    hits_bytes = plan.total_rows * 8 if store.has_hits else 0
    stats = _opened_stats(store)  # None when built without a corpus: no counts, no verdict
    return {
        "format": REPORT_FORMAT,
        "path": str(store.path),
        "store_format": summary["format"],
        "plan": plan_report(plan),
        "layers": [{k: layer[k] for k in ("layer_id", "rows", "bytes", "bytes_on_disk", "chunks", "shards")} for layer in summary["layers"]],
        "dtype": store.dtype,
        "storage_dtype": summary["storage_dtype"],
        "row_bytes": row_bytes(plan),
        "compressor": summary["compressor"],
        "checksum": "crc32c",
        "chunk_rows": store.chunk_rows,
        "shard_rows": store.shard_rows,
        "size": {
            "in_memory": summary["total_bytes"],
            "hits_in_memory": hits_bytes,
            "on_disk": summary["bytes_on_disk"],
        },
        "built": {
            "engram_version": attrs.get("toolkit_version"),
            "created": attrs.get("created"),
            "zarr_version": attrs.get("zarr_version"),
            "init": {k: v for k, v in dict(attrs.get("init") or {}).items() if k != "rng"},
            "corpus": extra.get("corpus"),
            "tokens": (extra.get("stats") or {}).get("tokens"),
            "documents": (extra.get("stats") or {}).get("documents"),
            "tokenizer": tokenizer_report(attrs.get(TOKENIZER_ATTR)),
        },
        "modified": {"since_build": bool(modified), "records": modified, "operations": modification_operations(modified)},
        "derived": attrs.get("derived") if isinstance(attrs.get("derived"), dict) else None,
        "pruned": pruned_report(store),
        "saturation": saturation_verdict(plan, {n: stats.distinct(n) for n in plan.orders}) if stats is not None else None,
        "has_hits": store.has_hits,
        "hits": [p.to_dict() for p in profiles or []],
        "verify": None,
    }


# -- verification --------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkRef:
    """One chunk of one array: `array` is "table" or "hits"."""

    layer_id: int
    array: str
    index: int
    start: int
    stop: int

    def shard_file(self, store: TableStore) -> Path:
        """The file holding this chunk (a kept-row map is one array read whole: its first file)."""
        if self.array == "table":
            arr, shard_rows = store.table(self.layer_id), store.shard_rows
        elif self.array == "hits":
            arr = store.hits(self.layer_id)
            shard_rows = int(arr.shards[0])
        else:
            arr, shard_rows = store.group[f"layer_{self.layer_id}"][self.array], max(1, self.stop)
        key = arr.metadata.encode_chunk_key((self.start // shard_rows,) + (0,) * (arr.ndim - 1))
        return store.path / f"layer_{self.layer_id}" / self.array / key


def iter_chunks(store: TableStore) -> Iterator[ChunkRef]:
    """Every chunk of every table (its stored rows: a pruned store's kept ones), every kept-row
    map (one read each), and every hits array, in layer and row order."""
    for layer_id in store.layer_ids:
        stored = store.stored_rows(layer_id)
        for c in range(ceil_div(stored, store.chunk_rows)):
            yield ChunkRef(layer_id, "table", c, c * store.chunk_rows, min(stored, (c + 1) * store.chunk_rows))
        if store.pruned is not None:
            yield ChunkRef(layer_id, "kept", 0, 0, stored)
        if store.has_hits:
            rows = store.plan.layer_rows(layer_id)
            step = _hits_block_rows(store.hits(layer_id))
            for c in range(ceil_div(rows, step)):
                yield ChunkRef(layer_id, "hits", c, c * step, min(rows, (c + 1) * step))


def _vocab_chunks(store: TableStore) -> Iterator[tuple[str, object, int, int, int]]:
    """(name, array, chunk index, start, stop) of every chunk of the vocabulary's arrays."""
    group = store.group["vocab"]
    for name in VOCAB_ARRAYS:
        arr = group[name]
        step = max(1, int(arr.chunks[0]))
        for c in range(ceil_div(int(arr.shape[0]), step)):
            yield name, arr, c, c * step, min(int(arr.shape[0]), (c + 1) * step)


def _verify_vocab(store: TableStore) -> tuple[int, int, dict | None]:
    """(chunks read, bytes read, first bad or None) of the vocabulary: every chunk decoded, then the
    whole checked against its fingerprint (its arrays carry no crc32c: the fingerprint is their checksum)."""
    checked = read = 0
    for name, arr, c, a, b in _vocab_chunks(store):
        try:
            read += np.asarray(arr[a:b]).nbytes
        except Exception as e:  # noqa: BLE001 - a corrupt chunk: zstd, numcodecs and zarr raise many types
            key = arr.metadata.encode_chunk_key((c,))
            return checked, read, {"layer_id": None, "array": f"vocab/{name}", "chunk": c, "rows": [a, b],
                                   "shard_file": f"vocab/{name}/{key}", "error": f"{type(e).__name__}: {e}"}
        checked += 1
    try:
        store.vocab  # noqa: B018 - decodes every array and checks the fingerprint
    except StoreError as e:
        rows = int(store.group["vocab"]["lookup"].shape[0])
        return checked - 1, read, {"layer_id": None, "array": "vocab", "chunk": 0, "rows": [0, rows], "shard_file": "vocab", "error": str(e)}
    return checked, read, None


def count_chunks(store: TableStore, stats=None) -> int:
    """What `verify_store` reads: vocabulary chunks, table / kept-map / hits chunks, and the order
    files of `stats` (the store's opened n-gram statistics, None for none)."""
    files = len(stats.orders) if stats is not None else 0
    return sum(1 for _ in _vocab_chunks(store)) + sum(1 for _ in iter_chunks(store)) + files


def _opened_stats(store: TableStore):
    """The store's n-gram statistics, opened once (None for a store built without a corpus)."""
    try:
        return store.stats
    except StoreError:
        return None


def verify_store(store: TableStore, *, progress: Progress = _noop) -> dict:
    """Read and decode every chunk; each one's crc32c is checked by the reader's codec.

    The vocabulary first (its arrays decoded chunk by chunk, then checked against its
    fingerprint: they carry no crc32c), then every table chunk (a pruned store's stored
    rows), kept-row map and hits chunk, then each n-gram statistics file against the size
    and XXH3-128 its summary recorded at the build (parquet pages carry no checksum).

    Stops at the first chunk that fails and returns {"ok", "chunks", "checked",
    "bytes_read", "first_bad", "stats_files"}; `first_bad` names the layer, array, chunk
    index, rows and shard file. One chunk is in memory at a time.
    """
    stats = _opened_stats(store)
    orders = list(stats.orders) if stats is not None else []
    total = count_chunks(store, stats)

    def result(checked: int, read: int, bad: dict | None, why: str = "corrupt chunk found") -> dict:
        if bad is not None:
            progress("verify chunks", checked, total, why)
        return {"ok": bad is None, "chunks": total, "checked": checked, "bytes_read": read, "first_bad": bad, "stats_files": len(orders)}

    progress("verify chunks", 0, total, "")
    checked, read, bad = _verify_vocab(store)
    if bad is not None:
        return result(checked, read, bad)
    for ref in iter_chunks(store):
        try:
            if ref.array == "table":
                block = store.load_layer(ref.layer_id, rows=(ref.start, ref.stop))
            elif ref.array == "kept":
                block = store.kept_rows(ref.layer_id)  # decoded (crc32c) and checked: increasing row ids of the layer
            else:
                block = _read_hits(store, store.hits(ref.layer_id), ref.layer_id, ref.start, ref.stop)
        except (StoreError, ValueError) as e:
            return result(checked, read, {
                "layer_id": ref.layer_id,
                "array": ref.array,
                "chunk": ref.index,
                "rows": [ref.start, ref.stop],
                "shard_file": os.path.relpath(ref.shard_file(store), store.path),
                "error": str(e) if isinstance(e, EngramError) else f"{type(e).__name__}: {e}",
            })
        checked += 1
        read += block.nbytes
        progress("verify chunks", checked, total, f"layer {ref.layer_id} {ref.array}")
    for order in orders:
        path = order_file(stats.root, order)
        try:
            stats.check_file(order)  # size and XXH3-128 against those summary.json recorded at the build
        except StoreError as e:
            return result(checked, read, {"layer_id": None, "array": f"stats/{path.name}", "chunk": 0, "rows": [0, 0],
                                          "shard_file": os.path.relpath(path, store.path), "error": str(e)}, "corrupt statistics file found")
        checked += 1
        read += path.stat().st_size
        progress("verify chunks", checked, total, f"statistics order {order}")
    return result(checked, read, None)


# -- plot ----------------------------------------------------------------------------
def plot_hit_ranks(profiles: list[HitProfile], path) -> None:
    """Log-log rank/frequency of row hits, one curve per layer and order (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in profiles:
        ranks, hits = p.rank_frequency()
        if ranks.size:
            ax.plot(ranks, hits, label=f"layer {p.layer_id} order {p.order} ({p.rows_hit:,} of {p.n_rows:,} rows hit)", linewidth=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("row rank (1 = most hit)")
    ax.set_ylabel("hits (corpus windows)")
    ax.set_title("Row hits: rank / frequency")
    ax.grid(True, which="both", alpha=0.3)
    if profiles:
        ax.legend(fontsize=8)
    save_figure(fig, path)
