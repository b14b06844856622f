"""The build of a table store's contents in a staging directory: layout, hit counts, shard tasks, completion; and the shard writer.

A build writes into `<out>.partial` (`staging.staged_output` prepares it and moves it
into place), in public steps that a distributed engine can run itself (docs/store.md):

    layout = create_layout(partial, plan, vocab, stats=stats, ...)   # metadata, vocab, empty arrays
    for layer_id, start, stop in hit_passes(layout): count_hits_range(...)   # with statistics
    for task in shard_tasks(layout): run_shard_task(task)          # any order, any machine
    mark_complete(partial)

`write_tables(..., executor=)` runs these steps, the one path of every build: in this
process (no executor), or with any `concurrent.futures.Executor` (thread, process, Ray:
tasks are picklable top-level calls). The shard writer, `write_shard`, writes one shard
file whole, one chunk in memory at a time, in exactly the bytes zarr-python would write
(tests/test_store.py compares them) at several times its rate. The initial values of
any chunk are a pure function of (seed, layer, chunk index), so shards are independent.
`complete: true` is the last thing written, so `TableStore.open` rejects an interrupted build.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .. import __version__
from ..defaults import DEFAULT_MEMORY_LIMIT
from ..errors import OutputError, StoreError, VocabMismatch
from ..execution.work import StageCounter, run_all
from ..hits import count_passes, hit_counts, orders_touching, per_order_sums
from ..int_rows import INT_LAYOUT
from ..kinds import Compressor, InitKind, ParallelKind, TableDtype
from ..ngrams import NgramStats
from ..plan import TablePlan, check_stats_cover
from ..vocab import CompressedVocab, LoadedTokenizer, vocab_arrays
from .format import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_COMPRESSOR,
    DEFAULT_INIT,
    DEFAULT_INIT_STD,
    DEFAULT_PARALLEL,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_2,
    FP8_LAYOUT,
    INIT_RNG,
    ROOT_ATTR,
    STATS_DIR,
    ceil_div,
    check_dtype_geometry,
    chunk_rows_for,
    hits_geometry,
    row_bytes,
    row_width,
    shard_blocks,
    shard_rows_for,
    storage_dtype,
    table_codecs,
)
from .layout import verify_layout, write_shard
from .output import check_free_space, storage_errors
from .tokenizer import TOKENIZER_ATTR, write_store_tokenizer

Progress = Callable[..., None]


@dataclass(frozen=True)
class ShardTask:
    """One shard of one layer's table to generate and write: a picklable unit of work."""

    path: str
    plan: TablePlan
    layer_id: int
    shard_index: int
    chunk_rows: int
    shard_rows: int
    init: str
    std: float
    compressor: str

    @property
    def nbytes(self) -> int:
        """Bytes of rows in this shard (before padding and compression)."""
        rows = self.plan.layer_rows(self.layer_id)
        return (min(rows, (self.shard_index + 1) * self.shard_rows) - self.shard_index * self.shard_rows) * row_bytes(self.plan)


def run_shard_task(task: ShardTask) -> int:
    """Generate and write one whole shard of a layer's table; returns its bytes of rows.

    A zeros table writes nothing: an absent shard reads as the fill value 0 (what zarr
    itself does for empty chunks).
    """
    if task.init == InitKind.ZEROS:
        return task.nbytes
    blocks = shard_blocks(task.plan, task.layer_id, task.shard_index, task.chunk_rows, task.shard_rows, task.init, task.std)
    return write_shard(Path(task.path), blocks, task.chunk_rows, task.shard_rows // task.chunk_rows, task.compressor)


# -- options ---------------------------------------------------------------------------
def check_write_options(
    *,
    init: str = DEFAULT_INIT,
    init_std: float = DEFAULT_INIT_STD,
    compressor: str = DEFAULT_COMPRESSOR,
    parallel: str = DEFAULT_PARALLEL,
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Raise `StoreError` for write options `write_tables` cannot use (cheap: call it first)."""
    InitKind.parse(init)
    Compressor.parse(compressor)
    ParallelKind.parse(parallel)
    if not (np.isfinite(init_std) and init_std >= 0):
        raise StoreError(f"--init-std must be a finite number >= 0, got {init_std}")
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


# -- lifecycle -------------------------------------------------------------------------
def planned_write_bytes(plan: TablePlan, init: str = DEFAULT_INIT) -> int:
    """Bytes of table rows a build of `plan` writes: `planned_bytes`, or 0 for `--init zeros` (no shard is written)."""
    return 0 if InitKind.parse(init) == InitKind.ZEROS else planned_bytes(plan)


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
    for name, data in vocab_arrays(vocab).items():
        arr = g.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(max(1, data.shape[0]),), fill_value=0)
        if data.size:
            arr[:] = data


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return _json_safe(obj.to_dict())
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, (int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _stats_in_store(stats: "NgramStats", partial: Path) -> "NgramStats":
    """The statistics as they will live in the store: copied in unless already there."""

    target = partial / STATS_DIR
    if Path(stats.root).resolve() == target.resolve():
        return stats
    if target.exists():
        raise OutputError(f"{str(target)!r} already exists and is not the statistics passed in; call prepare_partial to start afresh")
    shutil.copytree(stats.root, target)
    return NgramStats.open(target)


def planned_bytes(plan: TablePlan) -> int:
    """Bytes of table rows a build of `plan` writes (before compression: initial rows hardly compress)."""
    return sum(plan.layer_rows(layer_id) for layer_id in plan.layer_ids) * row_bytes(plan)


def check_stats_ids(stats: "NgramStats", plan: TablePlan) -> None:
    """`StoreError` when the statistics hold a compressed id the plan's vocabulary does not have (one streaming pass)."""
    for order in plan.orders:
        top = stats.max_id(order)
        if top is not None and top >= plan.compressed_vocab_size:
            raise StoreError(
                f"the n-gram statistics hold compressed id {top} but the plan's vocabulary has {plan.compressed_vocab_size} ids; "
                "the statistics were counted with another vocabulary: recount them with `engram build-table --force`"
            )


@dataclass(frozen=True)
class StoreLayout:
    """What `create_layout` made: the partial store's path, plan and geometry (picklable)."""

    path: str
    plan: TablePlan
    chunk_rows: int
    shard_rows: int
    init: str
    init_std: float
    compressor: str
    has_hits: bool
    hits_pass_rows: int


def create_layout(
    partial: str | os.PathLike,
    plan: TablePlan,
    vocab: "CompressedVocab",
    *,
    stats: "NgramStats | None",
    init: str = DEFAULT_INIT,
    init_std: float = DEFAULT_INIT_STD,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compressor: str = DEFAULT_COMPRESSOR,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    extra_attrs: dict | None = None,
    tokenizer: "LoadedTokenizer | None" = None,
    identity: dict | None = None,
) -> StoreLayout:
    """Step 1 of a build: in the empty directory `partial`, write the root metadata
    (`complete: false`), the vocabulary, the statistics (copied in) and every array's
    metadata, but no table data. With `tokenizer` (the one `vocab` was made from), its
    spec is recorded and its file copied in (`store.tokenizer`), with `identity`, the fast
    engine's identity check (`engines.IdentityCheck.to_dict()`). Returns the layout the other steps take.
    """

    partial = Path(partial)
    init = InitKind.parse(init)
    compressor = Compressor.parse(compressor)
    check_write_options(init=init, init_std=init_std, compressor=compressor, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    check_dtype_geometry(plan.head_dim, plan.dtype)
    if plan.compressed_vocab_size != vocab.compressed_size:
        raise VocabMismatch(f"the plan is for {plan.compressed_vocab_size} compressed ids but the vocabulary has {vocab.compressed_size}; plan with this vocabulary")
    if plan.vocab_fingerprint and plan.vocab_fingerprint != vocab.fingerprint:
        raise VocabMismatch(f"the plan was made for vocabulary {plan.vocab_fingerprint[:12]}, not {vocab.fingerprint[:12]}; plan with this vocabulary")
    if not partial.is_dir():
        raise OutputError(f"{str(partial)!r} is not a directory; call prepare_partial first")
    if (partial / "zarr.json").exists():
        raise OutputError(f"{str(partial)!r} already holds a store; call prepare_partial to start afresh")

    sdtype = storage_dtype(plan.dtype)
    width = row_width(plan.head_dim, plan.dtype)
    chunk_rows = chunk_rows_for(plan, chunk_bytes)
    shard_rows = shard_rows_for(plan, chunk_rows, shard_bytes)
    codecs = table_codecs(compressor, sdtype.itemsize)
    hits_chunk, hits_shard, pass_rows = hits_geometry(memory_limit)

    check_free_space(partial, planned_write_bytes(plan, init))
    if stats is not None:
        stats = _stats_in_store(stats, partial)
        check_stats_cover(plan, stats)
        check_stats_ids(stats, plan)

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
        "init": {"kind": init.value, "std": float(init_std), "seed": plan.seed, "chunk_rows": chunk_rows, "rng": INIT_RNG},
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
    if plan.dtype == TableDtype.FLOAT8_E4M3:
        attrs["row_width"] = width
        attrs["fp8"] = dict(FP8_LAYOUT)
    if TableDtype.parse(plan.dtype).integer:  # rows older readers cannot read: the second format
        attrs["format"] = FORMAT_2
        attrs["row_width"] = width
        attrs["int_rows"] = dict(INT_LAYOUT)
    if tokenizer is not None:
        attrs[TOKENIZER_ATTR] = write_store_tokenizer(partial, tokenizer, vocab, identity)
    root.attrs[ROOT_ATTR] = attrs
    _vocab_group(root, vocab)

    first_codecs = first_hits = None
    for layer_id in plan.layer_ids:
        rows = plan.layer_rows(layer_id)
        offsets = plan.row_offsets(layer_id)
        g = root.create_group(f"layer_{layer_id}", attributes={"layer_id": layer_id})
        table_attrs = {
            "layer_id": layer_id,
            "dtype": plan.dtype,
            "storage_dtype": sdtype.name,
            "row_offsets": offsets.tolist(),
            "primes": plan.head_primes(layer_id).tolist(),
            "heads": [{"order": n, "head": j} for n in plan.orders for j in range(plan.heads)],
            "chunk_rows": chunk_rows,
            "shard_rows": shard_rows,
        }
        if plan.dtype == TableDtype.FLOAT8_E4M3:
            table_attrs["fp8"] = dict(FP8_LAYOUT, head_dim=plan.head_dim)
        if TableDtype.parse(plan.dtype).integer:
            table_attrs["int_rows"] = dict(INT_LAYOUT, head_dim=plan.head_dim)
        table = g.create_array(
            "table",
            shape=(rows, width),
            dtype=sdtype,
            chunks=(chunk_rows, width),
            shards=(shard_rows, width),
            compressors=codecs,
            fill_value=0,
            dimension_names=("row", "col"),
            attributes=table_attrs,
        )
        first_codecs = first_codecs or table.metadata.to_dict()["codecs"]
        attrs["layers"][str(layer_id)] = {"rows": rows, "table": f"layer_{layer_id}/table", "hits": f"layer_{layer_id}/hits" if stats is not None else None}
        if stats is not None:
            hits = g.create_array(
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
            first_hits = first_hits or hits.metadata.to_dict()["codecs"]
    attrs["codecs"]["table"] = {"compressor": compressor.value, "checksum": "crc32c", "zarr": _json_safe(first_codecs)}
    if stats is not None:
        attrs["codecs"]["hits"] = {"compressor": "zstd", "checksum": "crc32c", "zarr": _json_safe(first_hits)}
    root.attrs[ROOT_ATTR] = attrs
    return StoreLayout(str(partial), plan, chunk_rows, shard_rows, init.value, float(init_std), compressor.value, stats is not None, pass_rows)


def shard_tasks(layout: StoreLayout) -> list[ShardTask]:
    """Step 3: every shard of every layer's table, as independent picklable tasks for `run_shard_task`."""
    plan = layout.plan
    tasks = []
    for layer_id in plan.layer_ids:
        table_dir = Path(layout.path) / f"layer_{layer_id}" / "table"
        for s in range(ceil_div(plan.layer_rows(layer_id), layout.shard_rows)):
            tasks.append(ShardTask(str(table_dir / "c" / str(s) / "0"), plan, layer_id, s, layout.chunk_rows, layout.shard_rows, layout.init, layout.init_std, layout.compressor))
    return tasks


def hit_passes(layout: StoreLayout) -> list[tuple[int, int, int]]:
    """Step 2 (stores with statistics): the (layer_id, start, stop) ranges to pass to `count_hits_range`."""
    return count_passes(layout.plan, layout.hits_pass_rows)


def count_hits_range(
    path: str | os.PathLike,
    plan: TablePlan,
    layer_id: int,
    start: int,
    stop: int,
    *,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    on_batch: Callable[[int], None] | None = None,
) -> dict[int, int]:
    """Count the hits of rows [start, stop) of a layer from the store's own statistics and write them.

    `start`/`stop` must be whole hits shards (as `hit_passes` gives them) so ranges can
    be written concurrently. Returns the sum of the range's hits per order, for
    `check_hit_totals`.
    """

    path = Path(path)
    stats = NgramStats.open(path / STATS_DIR)
    acc = hit_counts(plan, layer_id, stats, start, stop, memory_limit=memory_limit, on_batch=on_batch)
    zarr.open_array(str(path / f"layer_{layer_id}" / "hits"), mode="r+")[start:stop] = acc
    return per_order_sums(plan, layer_id, start, acc)


def check_hit_totals(plan: TablePlan, stats: "NgramStats", layer_id: int, per_order: dict[int, int]) -> None:
    """StoreError unless a layer's hits sum, per order, to windows x heads (the statistics are consistent)."""
    for order in plan.orders:
        expect = stats.total(order) * plan.heads
        if per_order.get(order, 0) != expect:
            raise StoreError(
                f"layer {layer_id} order {order}: hit counts sum to {per_order.get(order, 0)}, expected windows x heads = "
                f"{stats.total(order)} x {plan.heads}; the statistics are inconsistent: recount them with `engram build-table --force`"
            )


def mark_complete(partial: str | os.PathLike) -> None:
    """Last step: set `complete: true` in the root attributes, after `verify_layout` found every array and shard."""
    verify_layout(partial)
    root = zarr.open_group(str(partial), mode="r+", zarr_format=3)
    attrs = root.attrs.asdict()[ROOT_ATTR]
    attrs["complete"] = True
    root.attrs[ROOT_ATTR] = attrs


def _write_hits(layout: StoreLayout, memory_limit: int, progress: Progress | None, executor: Executor | None = None) -> None:
    """Count hits layer by layer, one row range (whole hits shards) at a time: in this process,
    or each range as a `count_hits_range` task on `executor`; then check each layer's totals."""

    plan = layout.plan
    stats = NgramStats.open(Path(layout.path) / STATS_DIR)
    passes = hit_passes(layout)
    if executor is None:
        total = sum(stats.distinct(order) for layer_id, start, stop in passes for order in orders_touching(plan, layer_id, start, stop))
        done = 0

        def on_batch(m: int) -> None:
            nonlocal done
            done += m
            _report(progress, "hit counts", done, total, "")

        _report(progress, "hit counts", 0, total, "")
        sums = [count_hits_range(layout.path, plan, lid, start, stop, memory_limit=memory_limit, on_batch=on_batch) for lid, start, stop in passes]
    else:
        counter = StageCounter(progress, "hit counts", float(len(passes)))
        calls = [(count_hits_range, (layout.path, plan, lid, start, stop), dict(memory_limit=memory_limit)) for lid, start, stop in passes]
        sums = run_all(executor, calls, lambda i, _: counter.add(1, f"layer {passes[i][0]} rows {passes[i][1]}:{passes[i][2]}"))
    for layer_id in plan.layer_ids:
        per_order = dict.fromkeys(plan.orders, 0)
        for (lid, _, _), got in zip(passes, sums):
            if lid == layer_id:
                for order, n in got.items():
                    per_order[int(order)] += n
        check_hit_totals(plan, stats, layer_id, per_order)


def run_shard_tasks(tasks: list[ShardTask], executor: Executor | None, workers: int, parallel: str, progress: Progress | None) -> None:
    """Run shard tasks on `executor` (or sequentially / on a pool of `workers` of kind `parallel`), reporting bytes."""
    total = sum(t.nbytes for t in tasks)
    done = 0
    _report(progress, "writing", 0, total, "")
    if executor is None and workers == 1:
        for t in tasks:
            done += run_shard_task(t)
            _report(progress, "writing", done, total, f"layer {t.layer_id} shard {t.shard_index}")
        return
    own = executor is None
    if own:
        if ParallelKind.parse(parallel) == ParallelKind.PROCESSES:
            # spawn, not fork: blosc's threads and zarr's event loop do not survive a fork.
            executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            executor = ThreadPoolExecutor(workers, thread_name_prefix="engram-shard")
    in_flight = 2 * workers
    try:
        pending = {}
        queue = list(reversed(tasks))
        while queue or pending:
            # At most 2 tasks per worker in flight: prompt cancellation on errors.
            while queue and len(pending) < in_flight:
                t = queue.pop()
                pending[executor.submit(run_shard_task, t)] = t
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                t = pending.pop(fut)
                done += fut.result()
                _report(progress, "writing", done, total, f"layer {t.layer_id} shard {t.shard_index}")
    except BaseException:
        for fut in pending:
            fut.cancel()
        if own:
            executor.shutdown(wait=True, cancel_futures=True)
        raise
    if own:
        executor.shutdown(wait=True)


def write_tables(
    partial: str | os.PathLike,
    plan: TablePlan,
    vocab: "CompressedVocab",
    *,
    stats: "NgramStats | None",
    init: str = DEFAULT_INIT,
    init_std: float = DEFAULT_INIT_STD,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    compressor: str = DEFAULT_COMPRESSOR,
    workers: int | None = None,
    parallel: str = DEFAULT_PARALLEL,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    extra_attrs: dict | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
    tokenizer: "LoadedTokenizer | None" = None,
    identity: dict | None = None,
) -> None:
    """Write every array of the store into `partial`; `complete: true` is written last.

    The steps of the module docstring, in order. Hit-count ranges and shard tasks run
    on `executor` when given (any concurrent.futures.Executor: thread, process, Ray...;
    not shut down here; `workers` then only bounds the shard tasks in flight, default
    one per CPU), else in this process: hits sequentially, shards sequentially (1
    worker) or on a pool of `workers` (capped by `memory_limit`) of kind `parallel`. progress(stage, done, total=None, detail="") is called with stage
    "hit counts" (n-grams streamed) and "writing" (table bytes written). An exception
    (from the progress callback too) stops the build and leaves `partial` incomplete.
    """
    check_write_options(init=init, init_std=init_std, compressor=compressor, parallel=parallel, workers=workers, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    with storage_errors(partial):
        _write_tables(partial, plan, vocab, stats, init, init_std, chunk_bytes, shard_bytes, compressor, workers, parallel, memory_limit, extra_attrs, progress, executor, tokenizer, identity)


def _write_tables(partial, plan, vocab, stats, init, init_std, chunk_bytes, shard_bytes, compressor, workers, parallel, memory_limit, extra_attrs, progress, executor, tokenizer=None, identity=None) -> None:
    layout = create_layout(
        partial, plan, vocab, stats=stats, init=init, init_std=init_std, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes,
        compressor=compressor, memory_limit=memory_limit, extra_attrs=extra_attrs, tokenizer=tokenizer, identity=identity,
    )
    if layout.has_hits:
        _write_hits(layout, memory_limit, progress, executor)
    if executor is None:
        n_workers = _resolve_workers(workers, layout.chunk_rows * row_bytes(plan), memory_limit)
    else:
        n_workers = workers or (os.cpu_count() or 1)
    run_shard_tasks(shard_tasks(layout), executor, n_workers, parallel, progress)
    mark_complete(partial)
