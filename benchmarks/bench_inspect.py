"""`engram inspect`'s hit scan and `--verify` against the whole-array route, time and peak memory.

A store is built from the fixture corpus (the reference plan's rows per head, so
hits arrays of the reference size, with narrow float16 rows to keep the tables small).
Side by side in this process, best of --repeat after a warm-up:

- hit scan: `inspect.hit_profiles` (hits streamed chunk by chunk into a count-of-counts)
  against the baseline that reads each layer's hits whole with zarr-python and sorts
  each order's slice (`np.sort`, then the top 1%/10% shares).
- verify: `inspect.verify_store` (every chunk decoded, crc32c checked, one at a time)
  against zarr-python reading every array whole (`arr[:]`, which also checks crc32c).

Peak memory is tracemalloc's peak (numpy registers its buffers), per call.

    python benchmarks/bench_inspect.py --rows-per-head 646400 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import measure, print_rows, record  # noqa: E402

from engram_cli.inspect import hit_profiles, verify_store  # noqa: E402
from engram_cli.store import TableStore  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


def peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def whole_hits(store: TableStore) -> list:
    out = []
    for layer in store.layer_ids:
        h = np.asarray(zarr.open_array(str(store.path / f"layer_{layer}" / "hits"), mode="r")[:])
        pos = 0
        for n in store.plan.orders:
            rows = int(sum(store.plan.primes[layer][n - 2]))
            desc = np.sort(h[pos : pos + rows])[::-1]
            total = float(desc.sum())
            out.append([float(desc[: max(1, int(np.ceil(f * rows)))].sum()) / total for f in (0.01, 0.1)])
            pos += rows
    return out


def whole_verify(store: TableStore) -> None:
    for layer in store.layer_ids:
        for name in ("table", "hits"):
            zarr.open_array(str(store.path / f"layer_{layer}" / name), mode="r")[:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows-per-head", type=int, default=646400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from typer.testing import CliRunner

    from engram_cli.cli import app

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "tables.zarr"
        res = CliRunner().invoke(app, ["build-table", str(FIXTURES), "-o", str(out), "--rows-per-head", str(args.rows_per_head), "--dim", "16", "--heads", "8", "--dtype", "float16", "--json"])
        assert res.exit_code == 0, res.output
        store = TableStore.open(out)
        ours = [[p.top_share(0.01), p.top_share(0.1)] for p in hit_profiles(store)]
        assert np.allclose(ours, whole_hits(store)), "the streamed shares differ from the whole-array route"
        rows = []
        for what, engram_fn, base_fn in (("hit scan", lambda: hit_profiles(store), lambda: whole_hits(store)), ("verify", lambda: verify_store(store), lambda: whole_verify(store))):
            t_e, t_b = measure(engram_fn, repeat=args.repeat), measure(base_fn, repeat=args.repeat)
            m_e, m_b = peak(engram_fn), peak(base_fn)
            rows.append({
                "what": what, "total_rows": store.plan.total_rows, "engram_s": t_e["best_s"], "baseline_s": t_b["best_s"],
                "time_ratio": t_e["best_s"] / t_b["best_s"], "engram_peak_bytes": m_e, "baseline_peak_bytes": m_b, "memory_ratio": m_e / m_b,
            })
        print_rows("inspect: engram (streamed) vs whole arrays (zarr-python + numpy)", rows)
        if not args.no_record:
            record("inspect", rows, rows_per_head=args.rows_per_head)


if __name__ == "__main__":
    main()
