"""Hot-row cache hit rates (kernels/cache.py) on held-out text, per order.

    python benchmarks/bench_cache.py [--rows-per-head 5003] [--heads 2]

A store is built (engram_cli.pipeline.build) from 3 of the 5 books of fixtures/corpus; the
other 2 books are the held-out text, looked up in batches of 16 x 256 tokens through
`EngramLookup.from_store(..., backend="offload")` with a hot cache of 1%, 5% and 10% of
the layer's rows, chosen by the store's hit counts:
- policy `layer`: the most-hit rows of the whole layer (every order competes);
- policy `bigram`: the capacity spent on bigram rows only (`use_hot_cache(orders=(2,))`);
- policy `bigram_online`: as `bigram`, plus counts gathered online from the rows looked up,
  the cache refilled every 4 lookups (`refresh_every=4`); hit rates count every lookup,
  the first ones (before any refill) included.
Plan: orders 2..4, `--heads` heads per order, `--rows-per-head` rows per head.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _harness import print_rows, record  # noqa: E402
from _lookup_inputs import reference_inputs  # noqa: E402
from engram_cli.pipeline.build import build_tables  # noqa: E402
from engram_cli.kernels import EngramLookup  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows-per-head", type=int, default=5003)
    ap.add_argument("--heads", type=int, default=2)
    a = ap.parse_args()
    rph = a.rows_per_head
    tok, vocab, plan, _ = reference_inputs(1, 1, layer_ids=(1,), max_ngram_size=4, heads=a.heads,
                                           rows_per_head=(rph, rph, rph), dim=a.heads * 16)
    books = sorted(p for p in CORPUS.iterdir() if p.is_dir())
    build = [p for b in books[:3] for p in sorted(b.rglob("*")) if p.is_file()]
    held = [p for b in books[3:] for p in sorted(b.rglob("*")) if p.is_file()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build_tables(build, Path(tmp) / "t", tokenizer=tok, vocab=vocab, plan=plan, chunk_bytes=256 * 1024)
        text = "\n".join(p.read_text(errors="replace") for p in held)
        hid = tok.tokenizer.encode(text, add_special_tokens=False).ids
        hid = torch.tensor(hid[: len(hid) // 256 * 256]).view(-1, 256)
        n_rows = plan.layer_rows(1)
        for policy, orders, refresh in (("layer", None, 0), ("bigram", (2,), 0), ("bigram_online", (2,), 4)):
            for frac in (0.01, 0.05, 0.10):
                lk = EngramLookup.from_store(Path(tmp) / "t", 1, backend="offload")
                lk.use_hot_cache(lk.store.hits(1), int(n_rows * frac), orders=orders, refresh_every=refresh)
                for i in range(0, hid.shape[0], 16):
                    lk(hid[i : i + 16])
                hr = lk.hit_rates()
                rows.append({"case": "hot_cache", "policy": policy, "capacity": frac, "rows_cached": int(n_rows * frac),
                             "held_out_tokens": hid.numel(), "overall": hr["overall"],
                             **{f"order{n}": v for n, v in hr["per_order"].items()}})
    print_rows("hot-row cache hit rates (held-out text)", rows)
    record("cache", rows, rows_per_head=rph, heads=a.heads, build_books=[b.name for b in books[:3]])


if __name__ == "__main__":
    main()
