"""Table store write rate against writing the same bytes to a raw file.

Two comparisons, both in this process, best of --repeat after a warm-up:

- materialize: `write_tables` (tables only: no statistics) against a baseline that
  generates the same shards with the same `init_chunk` recipe, on the same number of
  threads, and `pwrite`s them into one raw file. Data generation is included in both.
- write-only: the chunks generated beforehand (excluded from both), then written by
  engram's shard writer (`write_shard`: codec + crc32c + shard index), by zarr-python's
  own `array[...] = ...` (for reference; its np.concatenate is timed too), or into a raw file.

Neither side calls fsync: both measure what reaches the page cache.

Then reads and in-place writes of the built store (`--read`, on by default):

- load_layer: `TableStore.load_layer` (shard by shard into one array) against plain
  zarr-python `arr[:]` of the same array.
- write_row_block / write_rows: a whole-layer `write_row_block` and `write_rows` of 1%
  of the rows scattered, against zarr-python writing the same values into the same
  store (`arr[:] = values`; for scattered rows read-modify-write of the array). engram fsyncs each
  rewritten shard (crash safety); zarr-python does not.

    python benchmarks/bench_store.py --mib 256 --compressors none,lz4,zstd --workers 1,2
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import peak_rss_bytes, print_rows, record  # noqa: E402

from engram_cli.plan import make_plan  # noqa: E402
from engram_cli.store import (  # noqa: E402
    shard_blocks,
    ceil_div,
    chunk_rows_for,
    partial_path,
    row_bytes,
    shard_rows_for,
    table_codecs,
    write_shard,
    write_tables,
)
from engram_cli.vocab import CompressedVocab  # noqa: E402

C = 1000


def bench_plan(mib: int, head_dim: int, dtype: str):
    heads = 8
    item = 4 if dtype == "float32" else 2
    rows = mib * (1 << 20) // (head_dim * item)
    return make_plan(compressed_vocab_size=C, compressed_pad_id=2, layer_ids=(1,), heads=heads, dim=head_dim * heads, rows_per_head=rows // (2 * heads), dtype=dtype)


def tiny_vocab() -> CompressedVocab:
    return CompressedVocab(lookup=np.arange(C, dtype=np.int64), keys=tuple(str(i) for i in range(C)), raw_key=np.zeros(C, bool), tokenizer_sha256="0" * 64)


def timed(fn, setup, repeat: int) -> dict:
    """Best-of-`repeat` wall time of `fn()` after one warm-up; `setup()` (untimed) before each call.

    (The harness's `measure` has no untimed setup; removing the previous output must
    not count against either side.)
    """
    times = []
    for i in range(repeat + 1):
        setup()
        t0 = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - t0)
    setup()
    return {"best_s": min(times), "times_s": times}


def raw_materialize(path: Path, plan, chunk_rows: int, shard_rows: int, workers: int) -> None:
    rows = plan.layer_rows(1)
    rb = row_bytes(plan)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        def task(s: int) -> None:
            offset = s * shard_rows * rb
            for block in shard_blocks(plan, 1, s, chunk_rows, shard_rows, "normal", 0.02):
                os.pwrite(fd, memoryview(block).cast("B"), offset)
                offset += block.nbytes

        shards = range(ceil_div(rows, shard_rows))
        if workers == 1:
            for s in shards:
                task(s)
        else:
            with ThreadPoolExecutor(workers) as ex:
                list(ex.map(task, shards))
    finally:
        os.close(fd)


def bench_read_write(scratch: Path, plan, vocab, chunk_bytes: int, shard_bytes: int, compressors, repeat: int) -> list[dict]:
    """load_layer vs zarr-python arr[:], and in-place writes vs zarr-python's own writes."""
    from engram_cli.store import TableStore, create_store

    rows_out = []
    nbytes = plan.total_bytes
    for comp in compressors:
        out = scratch / f"rw-{comp}.zarr"
        create_store(out, plan, vocab, compressor=comp, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, force=True)
        store = TableStore.open(out, mode="r+")
        arr = zarr.open_array(str(out / "layer_1" / "table"), mode="r+")
        zr = timed(lambda: arr[:], lambda: None, repeat)
        buf = np.empty(arr.shape, arr.dtype)
        ours = timed(lambda: store.load_layer(1, out=buf), lambda: None, repeat)
        fresh = timed(lambda: store.load_layer(1), lambda: None, repeat)
        base = dict(kind="read", workers=1, parallel="-", compressor=comp, disk_ratio=float("nan"))
        rows_out.append(dict(base, provider="zarr-python arr[:]", rate_MBps=nbytes / zr["best_s"] / 1e6, ratio=1.0))
        rows_out.append(dict(base, provider="engram load_layer(out=)", rate_MBps=nbytes / ours["best_s"] / 1e6, ratio=zr["best_s"] / ours["best_s"]))
        rows_out.append(dict(base, provider="engram load_layer", rate_MBps=nbytes / fresh["best_s"] / 1e6, ratio=zr["best_s"] / fresh["best_s"]))

        values = np.asarray(arr[:])
        zw = timed(lambda: arr.__setitem__(slice(None), values), lambda: None, repeat)
        ew = timed(lambda: store.write_row_block(1, 0, values, by="bench"), lambda: None, repeat)
        base = dict(kind="rewrite", workers=1, parallel="-", compressor=comp, disk_ratio=float("nan"))
        rows_out.append(dict(base, provider="zarr-python arr[:]=", rate_MBps=nbytes / zw["best_s"] / 1e6, ratio=1.0))
        rows_out.append(dict(base, provider="engram write_row_block", rate_MBps=nbytes / ew["best_s"] / 1e6, ratio=zw["best_s"] / ew["best_s"]))

        rng = np.random.default_rng(0)
        ids = np.sort(rng.choice(values.shape[0], values.shape[0] // 100, replace=False))
        vals = values[ids]
        def zarr_rows():  # plain zarr-python's way to scatter rows into a sharded array: read, modify, write
            whole = arr[:]
            whole[ids] = vals
            arr[:] = whole

        zs = timed(zarr_rows, lambda: None, repeat)
        es = timed(lambda: store.write_rows(1, ids, vals, by="bench"), lambda: None, repeat)
        rb = vals.nbytes
        base = dict(kind="write_rows 1%", workers=1, parallel="-", compressor=comp, disk_ratio=float("nan"))
        rows_out.append(dict(base, provider="zarr-python arr[:] then arr[:]=", rate_MBps=rb / zs["best_s"] / 1e6, ratio=1.0))
        rows_out.append(dict(base, provider="engram write_rows", rate_MBps=rb / es["best_s"] / 1e6, ratio=zs["best_s"] / es["best_s"]))
        del values, buf
    return rows_out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="table size in MiB")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk-mib", type=float, default=4)
    ap.add_argument("--shard-mib", type=float, default=128)
    ap.add_argument("--compressors", default="none,lz4,zstd")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--parallel", default="threads,processes")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--no-read", action="store_true", help="skip the read / in-place write rows")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    plan = bench_plan(args.mib, args.head_dim, args.dtype)
    vocab = tiny_vocab()
    nbytes = plan.total_bytes
    chunk_bytes, shard_bytes = int(args.chunk_mib * (1 << 20)), int(args.shard_mib * (1 << 20))
    chunk_rows = chunk_rows_for(plan, chunk_bytes)
    shard_rows = shard_rows_for(plan, chunk_rows, shard_bytes)
    workers_list = [int(w) for w in args.workers.split(",")]
    compressors = args.compressors.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    rows_out = []
    context = dict(mib=args.mib, head_dim=args.head_dim, dtype=args.dtype, chunk_rows=chunk_rows, shard_rows=shard_rows, bytes=nbytes)
    print(f"table {nbytes / 2**20:.0f} MiB, {plan.layer_rows(1)} rows x {plan.head_dim} {args.dtype}; chunk {chunk_rows} rows, shard {shard_rows} rows")
    try:
        # -- materialize (generation included in both) ---------------------------------
        raw_path, out = scratch / "raw.bin", scratch / "t.zarr"

        def clean():
            raw_path.unlink(missing_ok=True)
            shutil.rmtree(partial_path(out), ignore_errors=True)

        for workers in workers_list:
            raw = timed(lambda: raw_materialize(raw_path, plan, chunk_rows, shard_rows, workers), clean, args.repeat)
            raw_rate = nbytes / raw["best_s"]
            rows_out.append(dict(kind="materialize", provider="raw-file", workers=workers, parallel="threads", compressor="-", rate_MBps=raw_rate / 1e6, ratio=1.0, disk_ratio=1.0))
            for parallel in args.parallel.split(","):
                if workers == 1 and parallel == "processes":
                    continue
                for comp in compressors:
                    disk = []

                    def build():
                        partial = partial_path(out)
                        partial.mkdir()
                        write_tables(partial, plan, vocab, stats=None, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes, compressor=comp, workers=workers, parallel=parallel, memory_limit=8 << 30)
                        disk.append(sum(p.stat().st_size for p in (partial / "layer_1").rglob("*") if p.is_file()))

                    m = timed(build, clean, args.repeat)
                    rate = nbytes / m["best_s"]
                    rows_out.append(dict(kind="materialize", provider="engram", workers=workers, parallel=parallel, compressor=comp, rate_MBps=rate / 1e6, ratio=rate / raw_rate, disk_ratio=disk[-1] / nbytes))

        # -- write only (generation excluded from both) ----------------------------------
        n_shards = ceil_div(plan.layer_rows(1), shard_rows)
        shards = [list(shard_blocks(plan, 1, s, chunk_rows, shard_rows, "normal", 0.02)) for s in range(n_shards)]
        rb = row_bytes(plan)
        for workers in workers_list:
            def run(task):
                if workers == 1:
                    for s in range(n_shards):
                        task(s)
                else:
                    with ThreadPoolExecutor(workers) as ex:
                        list(ex.map(task, range(n_shards)))

            def raw_write():
                fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    def task(s):
                        offset = s * shard_rows * rb
                        for block in shards[s]:
                            os.pwrite(fd, memoryview(block).cast("B"), offset)
                            offset += block.nbytes

                    run(task)
                finally:
                    os.close(fd)

            raw = timed(raw_write, lambda: raw_path.unlink(missing_ok=True), args.repeat)
            raw_rate = nbytes / raw["best_s"]
            rows_out.append(dict(kind="write-only", provider="raw-file", workers=workers, parallel="threads", compressor="-", rate_MBps=raw_rate / 1e6, ratio=1.0, disk_ratio=1.0))
            for comp in compressors:
                holder = {}
                wdir = scratch / "w.zarr"

                def make_array():
                    shutil.rmtree(wdir, ignore_errors=True)
                    holder["arr"] = zarr.create_group(store=str(wdir)).create_array(
                        "t", shape=(plan.layer_rows(1), plan.head_dim), dtype=shards[0][0].dtype, chunks=(chunk_rows, plan.head_dim),
                        shards=(shard_rows, plan.head_dim), compressors=table_codecs(comp, shards[0][0].dtype.itemsize), fill_value=0,
                        config={"write_empty_chunks": True},
                    )

                def engram_write():
                    run(lambda s: write_shard(wdir / "t" / "c" / str(s) / "0", shards[s], chunk_rows, shard_rows // chunk_rows, comp))

                def zarr_write():
                    arr = holder["arr"]
                    run(lambda s: arr.__setitem__(slice(s * shard_rows, s * shard_rows + sum(b.shape[0] for b in shards[s])), np.concatenate(shards[s])))

                for provider, fn in (("engram", engram_write), ("zarr-python", zarr_write)):
                    m = timed(fn, make_array, args.repeat)
                    rate = nbytes / m["best_s"]
                    rows_out.append(dict(kind="write-only", provider=provider, workers=workers, parallel="threads", compressor=comp, rate_MBps=rate / 1e6, ratio=rate / raw_rate, disk_ratio=float("nan")))
        if not args.no_read:
            rows_out += bench_read_write(scratch, plan, vocab, chunk_bytes, shard_bytes, compressors, args.repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_rows("store write rate (ratio = against raw-file with the same workers and kind)", rows_out)
    print(f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    if not args.no_record:
        record("store", rows_out, **context)


if __name__ == "__main__":
    main()
