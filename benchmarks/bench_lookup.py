"""CPU lookup end to end (EngramLookup, backend cpu): raw ids -> rows, in GB/s of rows delivered vs a plain copy.

    python benchmarks/bench_lookup.py [--batch 8] [--seq 4096] [--rows-per-head 200003] [--rounds 3]

The reference plan's layer 1 shape (orders 2..3, 8 heads each, head_dim 64) with
`--rows-per-head` rows per head, float32 and bfloat16 tables in numpy-allocated memory (as
a store load gives: transparent huge pages; `_lookup_inputs.store_like`). Baseline, side by side:
`dst.copy_(src)` of the same number of bytes as the lookup returns, into a reused `dst`;
the lookup likewise writes into a reused output (`lk(ids, out=out)`); `fresh_output_*`
is the same lookup allocating its output each call (134 MB of new pages: page faults
included). Also reported: the share of the lookup spent hashing (row ids alone), the
kernels' threads and the load average after the round (2 cores: above 2, other jobs share
them and the ratios are low). Per-kernel benchmarks:
bench_hash.py (row ids), bench_gather.py (gather + FP8 dequant), bench_offload.py
(prefetch on a simulated consumer), bench_cache.py (hot-row cache hit rates),
bench_lookup_gpu.py (CUDA).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _harness import measure, print_rows, record  # noqa: E402
from _lookup_inputs import reference_inputs, store_like  # noqa: E402
from engram_cli.kernels import EngramLookup  # noqa: E402
from engram_cli.kernels.cpu import threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rows-per-head", type=int, default=200_003)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rph = a.rows_per_head
    _, vocab, plan, ids = reference_inputs(a.batch, a.seq, rows_per_head=(rph, rph))
    x = torch.randn(plan.layer_rows(1), plan.head_dim)
    tables = {"float32": store_like(x), "bfloat16": store_like(x.to(torch.bfloat16))}  # memory as a store load gives
    del x
    rows = []
    for r in range(a.rounds):
        for name, table in tables.items():
            lk = EngramLookup(plan, vocab, 1, table, backend="cpu")
            out = lk(ids)
            nbytes = out.numel() * out.element_size()
            src = torch.ones(nbytes, dtype=torch.uint8)
            dst = torch.empty_like(src)
            cp = measure(lambda: dst.copy_(src), repeat=5)["best_s"]
            look = measure(lambda: lk(ids, out=out), repeat=5)["best_s"]
            fresh = measure(lambda: lk(ids), repeat=5)["best_s"]
            hsh = measure(lambda: lk.row_ids(ids), repeat=5)["best_s"]
            rows.append({"case": "lookup", "round": r, "dtype": name, "tokens": ids.numel(), "bytes": nbytes,
                         "copy_GBps": nbytes / cp / 1e9, "lookup_GBps": nbytes / look / 1e9, "lookup_vs_copy": cp / look,
                         "fresh_output_GBps": nbytes / fresh / 1e9, "fresh_output_vs_copy": cp / fresh,
                         "hash_share": hsh / look, "threads": threads(), "load_1min": os.getloadavg()[0]})
    print_rows("CPU lookup, rows delivered vs copy", rows)
    record("lookup", rows, batch=a.batch, seq=a.seq, rows_per_head=rph)


if __name__ == "__main__":
    main()
