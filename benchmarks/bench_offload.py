"""The offload prefetch pipeline (kernels/offload.py) on a simulated consumer.

    python benchmarks/bench_offload.py [--batches 40] [--batch 4] [--seq 1024] [--rounds 3]

A consumer that spends a fixed time per batch (sleeping, as a GPU-bound training step
leaves the host idle: 3x one lookup, at least 20 ms). Side by side: the consumer alone
over the same batches (baseline: the same sleeps, no lookups), lookups inline, and lookups
through `EngramLookup.prefetcher` (depth 2; the first batch's lookup is never hidden and is
counted). overhead = loop time / consumer-only time - 1 (goal <= 3%). Reference plan
shape with 200,003 rows per head, float32 table, backend offload (no CUDA here: the CPU is
the device).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _harness import measure, print_rows, record  # noqa: E402
from _lookup_inputs import reference_inputs  # noqa: E402
from engram_cli.kernels import EngramLookup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    _, vocab, plan, _ = reference_inputs(1, 1, rows_per_head=(200_003, 200_003))
    rng = np.random.default_rng(0)
    table = torch.randn(plan.layer_rows(1), plan.head_dim)
    off = EngramLookup(plan, vocab, 1, table, backend="offload")
    batches = [torch.from_numpy(rng.integers(0, vocab.vocab_size, size=(a.batch, a.seq))) for _ in range(a.batches)]
    t_look = measure(lambda: off(batches[0]), repeat=5)["best_s"]
    work = max(0.02, 3 * t_look)

    def consumer_only():
        for _ in batches:
            time.sleep(work)

    def inline():
        for b in batches:
            off(b)
            time.sleep(work)

    def prefetched():
        for _ in off.prefetcher(batches, depth=a.depth):
            time.sleep(work)

    rows = []
    for r in range(a.rounds):
        pure = measure(consumer_only, repeat=2)["best_s"]
        t_in = measure(inline, repeat=2)["best_s"]
        t_pf = measure(prefetched, repeat=2)["best_s"]
        rows.append({"case": "offload", "round": r, "batches": a.batches, "tokens_per_batch": a.batch * a.seq,
                     "lookup_ms": t_look * 1e3, "consumer_ms_per_batch": work * 1e3,
                     "inline_overhead": t_in / pure - 1, "prefetch_overhead": t_pf / pure - 1})
    print_rows("offload prefetch (CPU as the device)", rows)
    record("offload", rows, depth=a.depth)


if __name__ == "__main__":
    main()
