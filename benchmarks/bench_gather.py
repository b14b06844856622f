"""Row gather on CPU (kernels/gather.py) in GB/s of rows delivered vs a plain copy of the same bytes.

    python benchmarks/bench_gather.py [--tokens 32768] [--rows-per-head 200003] [--rounds 3]

Row ids of the reference plan's layer 1 shape (16 heads, head_dim 64) with `--rows-per-head`
rows per head, table float32 / bfloat16 / float8_e4m3 (random values). Baseline, side by
side: `dst.copy_(src)` of as many bytes as the gather writes (torch's multi-threaded
contiguous copy). Compared: gather_into (kernels/cpu.py's numba gather straight into the
output, both cores, prefetched; FP8: dequantized to float32 while gathered) and the torch
reference (`fast=False`: index_select(out=); FP8: gather of the packed rows + dequant).
ratio = copy time / gather time; `load_1min` is the load average after the round (2 cores:
above 2, other jobs share them).
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
from _lookup_inputs import store_like  # noqa: E402
from engram_cli.fp8 import quantize_fp8_rows  # noqa: E402
from engram_cli.kernels.cpu import threads  # noqa: E402
from engram_cli.kernels.gather import gather_into  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--rows-per-head", type=int, default=200_003)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    n_rows, hd = a.rows_per_head * a.heads, a.head_dim
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((n_rows, hd), dtype=np.float32))
    tables = {"float32": (store_like(x), False), "bfloat16": (store_like(x.to(torch.bfloat16)), False),  # memory as a store load gives
              "float8_e4m3": (store_like(torch.from_numpy(quantize_fp8_rows(x.numpy()))), True)}
    del x
    heads = torch.arange(a.heads) * a.rows_per_head
    rows = (torch.from_numpy(rng.integers(0, a.rows_per_head, size=(a.tokens, a.heads))) + heads).reshape(-1)
    out_rows = []
    for r in range(a.rounds):
        for name, (table, fp8) in tables.items():
            out = torch.empty((rows.numel(), hd), dtype=torch.float32 if fp8 else table.dtype)
            nbytes = out.numel() * out.element_size()
            src = torch.empty(nbytes, dtype=torch.uint8)
            src.fill_(1)
            dst = torch.empty_like(src)
            cp = measure(lambda: dst.copy_(src), repeat=5)["best_s"]
            g = measure(lambda: gather_into(table, rows, hd, fp8, out), repeat=5)["best_s"]
            ref = measure(lambda: gather_into(table, rows, hd, fp8, out, fast=False), repeat=3)["best_s"]
            out_rows.append({"case": "gather", "round": r, "dtype": name, "bytes": nbytes, "copy_GBps": nbytes / cp / 1e9,
                             "gather_GBps": nbytes / g / 1e9, "gather_vs_copy": cp / g, "torch_ref_vs_copy": cp / ref,
                             "threads": threads(), "load_1min": os.getloadavg()[0]})
    print_rows("row gather (CPU)", out_rows)
    record("gather", out_rows, tokens=a.tokens, rows_per_head=a.rows_per_head)


if __name__ == "__main__":
    main()
