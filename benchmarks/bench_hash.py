"""Row ids on CPU (kernels/hash.py, kernels/cpu.py): the fused kernel vs the numpy reference hash, identical output.

    python benchmarks/bench_hash.py [--batch 8] [--seq 4096] [--rounds 3]

Baseline: engram_cli.hashing.position_row_ids on compressed ids (what the builder uses),
plus the vocabulary compression it needs (`vocab.compress`), i.e. raw ids -> row ids as the
lookup does. Compared: RowHasher.fast (backend cpu: the fused numba kernel, `threads`
threads) and RowHasher.reference (backend torch). `output_fill_ms` is the time to merely
write the output (int64 ids, `out.fill_`): no path can beat it, so numpy / fill is the
ceiling of the ratio on this machine. Each round measures all side by side (best of 7);
`load_1min` is the machine's load average when the round ended (2 cores: above 2, other
jobs share them and the figures are low).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _harness import measure, print_rows, record  # noqa: E402
from _lookup_inputs import reference_inputs  # noqa: E402
from engram_cli.hashing import position_row_ids  # noqa: E402
from engram_cli.kernels.cpu import threads  # noqa: E402
from engram_cli.kernels.hash import RowHasher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    _, vocab, plan, ids = reference_inputs(a.batch, a.seq)
    h = RowHasher(plan, vocab.lookup, 1, "cpu")
    want = position_row_ids(plan, 1, vocab.compress(ids.numpy()))
    assert np.array_equal(h.fast(ids).numpy(), want) and np.array_equal(h.reference(ids).numpy(), want)
    out = torch.empty(want.shape, dtype=torch.int64)
    rows = []
    for r in range(a.rounds):
        ref = measure(lambda: position_row_ids(plan, 1, vocab.compress(ids.numpy())), repeat=7)["best_s"]
        fast = measure(lambda: h.fast(ids, out=out), repeat=7)["best_s"]
        tref = measure(lambda: h.reference(ids), repeat=7)["best_s"]
        fill = measure(lambda: out.fill_(1), repeat=7)["best_s"]  # writing the output alone: a ceiling for any path
        rows.append({"case": "hash", "round": r, "tokens": ids.numel(), "heads": h.heads, "numpy_ref_ms": ref * 1e3,
                     "torch_ref_ms": tref * 1e3, "cpu_fast_ms": fast * 1e3, "fast_vs_numpy": ref / fast,
                     "output_fill_ms": fill * 1e3, "ceiling_vs_numpy": ref / fill,
                     "torch_vs_numpy": ref / tref, "threads": threads(), "load_1min": os.getloadavg()[0]})
    print_rows("row ids (CPU)", rows)
    record("hash", rows, batch=a.batch, seq=a.seq)


if __name__ == "__main__":
    main()
