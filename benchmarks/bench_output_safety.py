"""What the output safety of a build costs: a guarded `--force` replacement against a bare one.

Both sides, in this process, run alternately, best of --repeat after a warm-up, replace an existing store
of --mib MiB (one layer, shards of --shard-size, so --mib / --shard-size shard files):

- guarded: `create_store(force=True)`: `prepare_partial` (output checks, the build lock,
  leftovers settled, free space, the staging directory checked), `write_tables` (with
  `verify_layout` before `complete`), `finalize` (the old store aside, the new one moved
  in, `verify_layout` and `TableStore.open` at the final path, the old one deleted).
- bare: the same writes with none of the checks: mkdir, `create_layout`, the shard
  tasks, `complete` set, the old store renamed aside, the new one in, the old deleted.

Rows also give each guard alone (its share of the guarded time).

    python benchmarks/bench_output_safety.py --mib 128 --shard-size 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import print_rows, record  # noqa: E402
from bench_store import bench_plan, timed, tiny_vocab  # noqa: E402

from engram_cli.store import ROOT_ATTR, TableStore, create_layout, create_store, run_shard_tasks, shard_tasks  # noqa: E402
from engram_cli.store.output import check_output, lock_output, release_output, settle_leftovers  # noqa: E402
from engram_cli.store.writer import verify_layout  # noqa: E402

MiB = 1 << 20


def bare_replace(out: Path, plan, vocab, workers: int, **kw) -> None:
    """The writes of a build with no output check, lock or verification."""
    partial = out.with_name(out.name + ".partial")
    partial.mkdir()
    layout = create_layout(partial, plan, vocab, stats=None, **kw)
    run_shard_tasks(shard_tasks(layout), None, workers, "threads", None)
    root = zarr.open_group(str(partial), mode="r+", zarr_format=3)
    attrs = root.attrs.asdict()[ROOT_ATTR]
    attrs["complete"] = True
    root.attrs[ROOT_ATTR] = attrs
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(partial, out)
    shutil.rmtree(old)


def interleaved(a, b, repeat: int) -> tuple[dict, dict]:
    """Best-of-`repeat` wall times of `a()` and `b()`, run alternately (after one warm-up each), so
    page-cache write-back and a shared machine's load weigh on both sides alike."""
    times: tuple[list, list] = ([], [])
    for i in range(repeat + 1):
        for fn, acc in ((a, times[0]), (b, times[1])) if i % 2 else ((b, times[1]), (a, times[0])):
            t0 = time.perf_counter()
            fn()
            if i:
                acc.append(time.perf_counter() - t0)
    return tuple({"best_s": min(t), "times_s": t} for t in times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=128, help="table size")
    ap.add_argument("--shard-size", type=float, default=1.0, help="MiB per shard file")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()

    plan, vocab = bench_plan(args.mib, 64, "float32"), tiny_vocab()
    kw = dict(compressor="none", chunk_bytes=min(4 * MiB, int(args.shard_size * MiB)), shard_bytes=int(args.shard_size * MiB))
    scratch = Path(tempfile.mkdtemp(prefix="bench-outsafe-", dir=args.dir))
    try:
        guarded_out, bare_out = scratch / "guarded.zarr", scratch / "bare.zarr"
        for out in (guarded_out, bare_out):
            create_store(out, plan, vocab, force=True, workers=args.workers, **kw)
        shards = len(shard_tasks(create_layout_probe(scratch, plan, vocab, kw)))
        bare, guarded = interleaved(
            lambda: bare_replace(bare_out, plan, vocab, args.workers, **kw),
            lambda: create_store(guarded_out, plan, vocab, force=True, workers=args.workers, **kw),
            args.repeat,
        )
        verify = timed(lambda: verify_layout(guarded_out), lambda: None, args.repeat)
        opened = timed(lambda: TableStore.open(guarded_out), lambda: None, args.repeat)

        def checks_and_lock() -> None:
            check_output(guarded_out, True)
            lock_output(guarded_out)
            settle_leftovers(guarded_out)
            release_output(guarded_out)

        lock = timed(checks_and_lock, lambda: None, args.repeat)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = dict(mib=args.mib, shards=shards, workers=args.workers, cpus=os.cpu_count())
    g = guarded["best_s"]
    rows = [
        dict(base, provider="bare replace", best_s=bare["best_s"], ratio=1.0),
        dict(base, provider="guarded replace (create_store)", best_s=g, ratio=bare["best_s"] / g),
        dict(base, provider="verify_layout (runs twice per build)", best_s=verify["best_s"], share_of_guarded=verify["best_s"] / g),
        dict(base, provider="TableStore.open (runs twice per build)", best_s=opened["best_s"], share_of_guarded=opened["best_s"] / g),
        dict(base, provider="check_output + lock + settle + release", best_s=lock["best_s"], share_of_guarded=lock["best_s"] / g),
    ]
    print_rows(f"output safety: --force replacement of a {args.mib} MiB store, {shards} shards (ratio: bare time / guarded time)", rows)
    record("output_safety", rows)


def create_layout_probe(scratch: Path, plan, vocab, kw) -> object:
    """The layout of the benchmark's store (for its shard count), made in a throwaway folder."""
    probe = scratch / "probe"
    probe.mkdir()
    return create_layout(probe, plan, vocab, stats=None, **kw)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
