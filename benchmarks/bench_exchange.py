"""Export and import of tables (engram_cli.exchange) against whole-layer baselines.

Providers, each in a child process (so peak memory is its own), best of --repeat:

- export, baseline: every layer loaded whole (`TableStore.load_layer`) then
  `safetensors.numpy.save_file` (what exchange.py did before it streamed) or
  `torch.save` of the same arrays;
- export, engram: `export_tables` in safetensors and reference (.pt) format, chunk by chunk;
- import, baseline: `safetensors.numpy.load_file` (whole file) then one
  `write_row_block` per layer into a hard-linked copy of the store;
- import, engram: `import_tables` (safetensors `get_slice`, one shard at a time).

Memory: the child samples its anonymous and file-backed resident memory (RssAnon,
RssFile in /proc/self/status) every 5 ms; peak anonymous memory net of the value after
imports is what a process really holds; file-backed memory is also given net (file-backed pages of a memory-mapped input are
page cache the kernel can drop).

    python benchmarks/bench_exchange.py --mib 512 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import print_rows, record  # noqa: E402

C = 1000


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Peak RssAnon / RssFile of this process, sampled every 5 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.stop = False

    def run(self):
        while not self.stop:
            self.anon = max(self.anon, status_kib("RssAnon"))
            self.file = max(self.file, status_kib("RssFile"))
            time.sleep(0.005)


def make_store(path: Path, mib: int, dtype: str) -> None:
    from engram_cli.plan import make_plan
    from engram_cli.store import create_store
    from engram_cli.vocab import CompressedVocab

    heads, head_dim = 8, 64
    item = {"float32": 4, "bfloat16": 2}[dtype]
    rows = mib * (1 << 20) // (head_dim * item)
    plan = make_plan(compressed_vocab_size=C, compressed_pad_id=2, layer_ids=(1, 3), heads=heads, dim=head_dim * heads,
                     rows_per_head=rows // (2 * 2 * heads), dtype=dtype)
    vocab = CompressedVocab(lookup=np.arange(C, dtype=np.int64), keys=tuple(str(i) for i in range(C)), raw_key=np.zeros(C, bool), tokenizer_sha256="0" * 64)
    create_store(path, plan, vocab, compressor="none", force=True)


def child(provider: str, store: str, file: str, out: str) -> dict:
    import torch

    from engram_cli.exchange import KEY, export_tables, import_tables
    from engram_cli.store import TableStore

    base, base_file = status_kib("RssAnon"), status_kib("RssFile")
    s = Sampler()
    s.start()
    t0 = time.perf_counter()
    if provider == "baseline export safetensors":
        from safetensors.numpy import save_file

        st = TableStore.open(store)
        save_file({KEY.format(l): st.load_layer(l) for l in st.layer_ids}, file)
    elif provider == "baseline export torch.save":
        st = TableStore.open(store)
        torch.save({KEY.format(l): torch.from_numpy(st.load_layer(l)) for l in st.layer_ids}, file)
    elif provider == "engram export safetensors":
        export_tables(store, file, "safetensors", force=True)
    elif provider == "engram export reference":
        export_tables(store, file, "reference", force=True)
    elif provider == "baseline import safetensors":
        from safetensors.numpy import load_file

        from engram_cli.train import save_trained_store

        tensors = load_file(file)
        save_trained_store(Path(store), Path(out), {})
        new = TableStore.open(out, mode="r+")
        for l in new.layer_ids:
            new.write_row_block(l, 0, tensors[KEY.format(l)], by="imported")
    elif provider in ("engram import safetensors", "engram import reference"):
        import_tables(file, store, out, force=True)
    else:
        raise SystemExit(f"unknown provider {provider}")
    seconds = time.perf_counter() - t0
    s.stop = True
    s.join()
    return {"seconds": seconds, "peak_anon_net_mib": (s.anon - base) / 1024, "peak_file_net_mib": (s.file - base_file) / 1024}


def run_child(provider: str, store: Path, file: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", provider, str(store), str(file), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=512, help="table bytes over both layers")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--child", nargs=4, metavar=("PROVIDER", "STORE", "FILE", "OUT"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    scratch = Path(tempfile.mkdtemp(dir=args.scratch, prefix="bench-exchange-"))
    try:
        store = scratch / "t.zarr"
        make_store(store, args.mib, args.dtype)
        st_file, pt_file = scratch / "t.safetensors", scratch / "t.pt"
        groups = [
            ("export", [("baseline export safetensors", st_file), ("engram export safetensors", st_file),
                        ("baseline export torch.save", pt_file), ("engram export reference", pt_file)]),
            ("import", [("baseline import safetensors", st_file), ("engram import safetensors", st_file), ("engram import reference", pt_file)]),
        ]
        rows = []
        for kind, providers in groups:
            results = {}
            for provider, f in providers:
                best = None
                for _ in range(args.repeat):
                    out = scratch / "new.zarr"
                    shutil.rmtree(out, ignore_errors=True)
                    r = run_child(provider, store, f, out)
                    best = r if best is None or r["seconds"] < best["seconds"] else best
                results[provider] = best
            baseline = results[providers[0][0]]
            for provider, _ in providers:
                r = results[provider]
                rows.append({"kind": kind, "provider": provider, "MiB": args.mib, "dtype": args.dtype, "seconds": r["seconds"],
                             "MBps": args.mib * (1 << 20) / r["seconds"] / 1e6, "speed_vs_baseline": baseline["seconds"] / r["seconds"],
                             "peak_anon_net_mib": r["peak_anon_net_mib"], "peak_file_net_mib": r["peak_file_net_mib"]})
        print_rows(f"exchange: {args.mib} MiB of {args.dtype} rows, 2 layers, best of {args.repeat}", rows)
        record("exchange", rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
