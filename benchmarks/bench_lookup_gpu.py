"""Lookup kernels on a CUDA GPU: Triton parity, gather bandwidth against the device's copy bandwidth,
offload gather against pinned host-to-device copy bandwidth.

    python benchmarks/bench_lookup_gpu.py [OUT.jsonl] [--tokens 32768] [--rows-per-head 524287]

Runs only where CUDA is present (exits 0 with a message otherwise). Needs torch, triton and
numpy only: no tokenizer, zarr or polars (the plan comes from engram_cli.plan.make_plan, the
vocabulary is a seeded synthetic compression map of the DeepSeek tokenizer's sizes, which is
all EngramLookup reads from it: `vocab.lookup`). Results go to the path given, else
$OUT/bench_lookup_gpu.jsonl, else benchmarks/results.jsonl.

1. parity: triton vs torch on CUDA tensors, row ids and rows for float32, bfloat16 and
   float8_e4m3 tables (bfloat16 and float32 outputs for FP8): bit-exact (torch.equal), or exit 1.
2. device gather, rows delivered (B*T*H rows of the layer, bytes of the output):
   - triton: the fused kernel (hash + gather [+ dequant]) from raw ids;
   - torch_index_select: `table.index_select(0, rows)` with the row ids precomputed;
   - torch_lookup: the torch backend end to end (hash + index_select);
   against `dst.copy_(src)` of the same number of bytes on the device. Both move the same
   traffic (each byte read once and written once); GB/s below count the bytes delivered
   (written) once, so the copy's figure is half of the read+write HBM bandwidth.
   ratio = copy time / lookup time (goal >= 0.8 for triton).
3. offload: table in pinned host memory, `EngramLookup(backend="offload", device="cuda")`:
   its UVA path (the fused kernel on the device reading the pinned table), the same through
   `prefetcher()` (side stream), and the host path it falls back to (host hash + gather +
   non_blocking copy), vs a pinned host-to-device copy of the same stored bytes (goal
   >= 0.85 float32 / bfloat16, >= 0.7 FP8); bit-exact with the torch backend, or exit 1.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _import_kernels():
    try:
        import engram_cli.kernels as k
    except ImportError:  # a copied repository, not installed: kernels/ is engram_cli.kernels
        import engram_cli

        engram_cli.__path__.append(str(ROOT))
        import engram_cli.kernels as k
    return k


def synthetic_vocab(vocab_size=129_280, compressed_size=99_092, seed=0):
    rng = np.random.default_rng(seed)
    lookup = np.concatenate([np.arange(compressed_size), rng.integers(0, compressed_size, vocab_size - compressed_size)])
    return SimpleNamespace(lookup=rng.permutation(lookup).astype(np.int64), vocab_size=vocab_size, compressed_size=compressed_size)


def cuda_best(fn, repeat=10, warmup=2) -> float:
    """Best-of-`repeat` seconds of fn() on the current stream (CUDA events)."""
    if not torch.cuda.is_available():
        return wall_best(fn, repeat=1, warmup=0)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return best


def wall_best(fn, repeat=5, warmup=1) -> float:
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def make_table(rows, head_dim, dtype, seed=0, device="cpu"):
    """A random table in storage form. float32/bfloat16: normal values. float8_e4m3: the
    small parity tables are quantized by engram_cli.fp8; big ones (> 1 M rows) are random
    packed bytes made on `device` (value bytes never NaN, scale bytes 2^-7..2^6)."""
    from engram_cli.fp8 import FP8_BLOCK, quantize_fp8_rows

    g = torch.Generator(device=device).manual_seed(seed)
    if dtype == "float8_e4m3":
        if rows <= 1_000_000:
            x = torch.randn((rows, head_dim), generator=torch.Generator().manual_seed(seed)) * 3
            return torch.from_numpy(quantize_fp8_rows(x.numpy())).to(device)
        vals = torch.randint(0, 0x7E, (rows, head_dim), generator=g, device=device, dtype=torch.int32)
        vals |= torch.randint(0, 2, (rows, head_dim), generator=g, device=device, dtype=torch.int32) << 7
        scales = torch.randint(120, 134, (rows, head_dim // FP8_BLOCK), generator=g, device=device, dtype=torch.int32)
        return torch.cat([vals, scales], dim=1).to(torch.uint8)
    x = torch.randn((rows, head_dim), generator=g, device=device) * 3
    return x.to({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in argv  # CPU tensors, Triton interpreter, tiny sizes: checks this script, measures nothing
    argv = [a for a in argv if a != "--dry-run"]
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"
    opts = {"--tokens": 32768, "--rows-per-head": 524_287, "--heads": 8, "--head-dim": 64}
    out_path = None
    i = 0
    while i < len(argv):
        if argv[i] in opts:
            opts[argv[i]] = int(argv[i + 1])
            i += 2
        else:
            out_path = Path(argv[i])
            i += 1
    if dry:
        opts.update({"--tokens": 64, "--rows-per-head": 1009, "--heads": 2})
    elif not torch.cuda.is_available():
        print("bench_lookup_gpu: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    if out_path is None:
        out_path = Path(os.environ["OUT"]) / "bench_lookup_gpu.jsonl" if os.environ.get("OUT") else ROOT / "benchmarks" / "results.jsonl"

    k = _import_kernels()
    from engram_cli.plan import make_plan

    EngramLookup = k.EngramLookup
    dev = torch.device("cpu" if dry else "cuda")
    vocab = synthetic_vocab()
    K, hd = opts["--heads"], opts["--head-dim"]
    rph = opts["--rows-per-head"]
    results = []
    failures = 0

    def plan_for(dtype, rows=(rph, rph), max_n=3):
        return make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=int(vocab.lookup[2]), layer_ids=(1,),
                         max_ngram_size=max_n, heads=K, rows_per_head=rows, dim=K * hd, seed=3,
                         dtype="float32" if dtype == "float8_e4m3" else dtype)

    rng = np.random.default_rng(1)

    # 1. parity (small plan, odd shapes, vocabulary edges)
    for dtype in ("float32", "bfloat16", "float8_e4m3"):
        plan = plan_for(dtype, rows=(1009, 2003, 3001), max_n=4)
        table = make_table(plan.layer_rows(1), hd, dtype)
        ref = EngramLookup(plan, vocab, 1, table, backend="torch", device=dev)
        tri = EngramLookup(plan, vocab, 1, table, backend="triton", device=dev)
        for B, T in ((1, 1), (2, 3), (3, 257), (4, 1024)):
            ids = rng.integers(0, vocab.vocab_size, size=(B, T))
            ids.flat[::3] = vocab.vocab_size - 1
            ids.flat[1::5] = 0
            ids = torch.from_numpy(ids).to(dev)
            ok = torch.equal(tri.row_ids(ids), ref.row_ids(ids))
            outs = [None, torch.bfloat16] if dtype == "float8_e4m3" else [None]
            for od in outs:
                ok = ok and torch.equal(tri(ids, dtype=od), ref(ids, dtype=od))
            results.append({"case": "parity", "dtype": dtype, "B": B, "T": T, "bit_exact": bool(ok)})
            failures += not ok

    # 2. device gather vs device copy
    n_tok = opts["--tokens"]
    B, T = 8, n_tok // 8
    for dtype in ("float32", "bfloat16", "float8_e4m3"):
        plan = plan_for(dtype)
        table = make_table(plan.layer_rows(1), hd, dtype, device=dev)
        H = len(plan.orders) * K
        ids = torch.from_numpy(rng.integers(0, vocab.vocab_size, size=(B, T))).to(dev)
        tri = EngramLookup(plan, vocab, 1, table, backend="triton", device=dev)
        ref = EngramLookup(plan, vocab, 1, table, backend="torch", device=dev)
        rows = ref.row_ids(ids).reshape(-1)
        out_t = tri(ids)
        nbytes = out_t.numel() * out_t.element_size()
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        t_copy = cuda_best(lambda: dst.copy_(src))
        t_tri = cuda_best(lambda: tri(ids))
        t_tri_ids = cuda_best(lambda: tri.row_ids(ids))
        t_ref = cuda_best(lambda: ref(ids))
        t_sel = cuda_best(lambda: table.index_select(0, rows))
        sel_bytes = rows.numel() * table.shape[1] * table.element_size()  # stored bytes (FP8: packed, not dequantized)
        gbs = lambda b, t: b / t / 1e9  # noqa: E731
        results.append({"case": "device_gather", "dtype": dtype, "tokens": B * T, "heads": H, "head_dim": hd,
                        "table_rows": plan.layer_rows(1), "bytes_delivered": nbytes,
                        "copy_GBps": gbs(nbytes, t_copy), "copy_read_plus_write_GBps": gbs(2 * nbytes, t_copy),
                        "triton_GBps": gbs(nbytes, t_tri), "triton_vs_copy": t_copy / t_tri,
                        "triton_row_ids_ms": t_tri_ids * 1e3,
                        "torch_lookup_GBps": gbs(nbytes, t_ref), "torch_lookup_vs_copy": t_copy / t_ref,
                        "torch_index_select_GBps": gbs(sel_bytes, t_sel),
                        "torch_index_select_vs_copy": (t_copy * sel_bytes / nbytes) / t_sel})

    # 3. offload (pinned host table) vs pinned host-to-device copy: the UVA path (what the
    #    backend takes on CUDA), its side-stream prefetcher, and the host path (the fallback)
    from engram_cli.kernels import registry

    for dtype in ("float32", "bfloat16", "float8_e4m3"):
        plan = plan_for(dtype)
        table = make_table(plan.layer_rows(1), hd, dtype)
        off = EngramLookup(plan, vocab, 1, table, backend="offload", device=dev)
        ids = torch.from_numpy(rng.integers(0, vocab.vocab_size, size=(B, T)))
        ref = EngramLookup(plan, vocab, 1, table.to(dev), backend="torch", device=dev)
        uva = registry.offload_uva(off)
        ok = torch.equal(off(ids), ref(ids.to(dev)))
        failures += not ok
        o = off(ids)
        nbytes_dev = o.numel() * o.element_size()
        host_bytes = B * T * len(plan.orders) * K * table.shape[1] * table.element_size()  # what crosses PCIe
        src = torch.empty(host_bytes, dtype=torch.uint8)
        src = src.pin_memory() if dev.type == "cuda" else src
        dst = torch.empty(host_bytes, dtype=torch.uint8, device=dev)
        t_h2d = wall_best(lambda: dst.copy_(src, non_blocking=True))
        t_off = wall_best(lambda: off(ids))
        batches = [ids] * 8
        t_pf = wall_best(lambda: [None for _ in off.prefetcher(batches)], repeat=3) / len(batches)
        saved = registry.offload_uva
        registry.offload_uva = lambda lk: False  # the host path, for comparison
        try:
            t_host = wall_best(lambda: off(ids), repeat=3)
            ok_host = torch.equal(off(ids), ref(ids.to(dev)))
        finally:
            registry.offload_uva = saved
        failures += not ok_host
        results.append({"case": "offload", "dtype": dtype, "tokens": B * T, "uva_path": uva, "bit_exact": bool(ok and ok_host),
                        "host_bytes": host_bytes, "device_bytes": nbytes_dev,
                        "h2d_pinned_GBps": host_bytes / t_h2d / 1e9,
                        "offload_GBps": host_bytes / t_off / 1e9, "offload_vs_h2d": t_h2d / t_off,
                        "prefetched_GBps": host_bytes / t_pf / 1e9, "prefetched_vs_h2d": t_h2d / t_pf,
                        "host_path_GBps": host_bytes / t_host / 1e9, "host_path_vs_h2d": t_h2d / t_host})

    stamp = {"bench": "lookup_gpu", "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0), "torch": torch.__version__,
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version()}
    try:
        import triton

        stamp["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"lookup kernels on {stamp['device']} (torch {torch.__version__})")
    for r in results:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a") as f:
        for r in results:
            f.write(json.dumps({**stamp, **r}) + "\n")
    print(f"wrote {len(results)} rows to {out_path}")
    if failures:
        print(f"bench_lookup_gpu: {failures} parity checks FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
