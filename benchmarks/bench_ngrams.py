"""Exact n-gram counting: speed vs collections.Counter and np.unique, and bounded memory.

    python benchmarks/bench_ngrams.py [--copies 4] [--max-ngram 3] [--rss-tokens 33554432] [--rss-memory-limit 67108864]

Speed: the fixture corpus tokenized (DeepSeek tokenizer, compressed ids), repeated
`--copies` times, counted for orders 2..max by
  - collections.Counter over padded windows (the obvious reference),
  - one plain np.unique pass per order over packed keys (no padding, no document
    boundaries, nothing written: a floor for what sorting alone costs),
  - engram's count_ngrams (padding, boundaries, parquet output and summary included).
Figures: speed-ups of engram over each baseline (baseline time / engram time).

Merge: the same documents counted in `--shards` shards and merged (`merge_stats`,
and the key-partitioned reduce `merge_stats(tok0_range=...)` + `concat_stats`), as
ratios of the single count's time.

Memory: a child process counts `--rss-tokens` synthetic Zipf-distributed ids over
DeepSeek's compressed vocabulary (int64: 256 MiB for 32 Mi tokens, 4x the default
64 MiB limit), streamed as documents, with `--rss-memory-limit`; it reports its peak
RSS (VmHWM), also net of the RSS it had after imports. A second child counts a quarter
as many tokens: a bounded counter peaks at about the same RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _harness import measure, peak_rss_bytes, print_rows, record  # noqa: E402

from engram_cli.ngrams import concat_stats, count_ngrams, id_bits, merge_stats  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
DEEPSEEK_C = 99092


def fixture_ids() -> tuple[list[np.ndarray], int, int]:
    from engram_cli.vocab import compress_vocab, load_tokenizer

    tok = load_tokenizer()
    vocab = compress_vocab(tok)
    texts = [p.read_text(encoding="utf-8") for p in sorted(FIXTURE.rglob("*")) if p.is_file()]
    docs = [vocab.compress(e.ids) for e in tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    return docs, int(vocab.lookup[2]), vocab.compressed_size


def counter_count(docs: list[list[int]], max_n: int, pad: int) -> dict[int, Counter]:
    out = {}
    for n in range(2, max_n + 1):
        c: Counter = Counter()
        for doc in docs:
            padded = [pad] * (n - 1) + doc
            c.update(zip(*[padded[j : j + len(doc)] for j in range(n)]))
        out[n] = c
    return out


def unique_count(flat: np.ndarray, max_n: int, bits: int) -> list[int]:
    x = flat.astype(np.uint64)
    distinct = []
    for n in range(2, max_n + 1):
        if n * bits <= 64:
            key = x[: x.size - n + 1].copy()
            for j in range(1, n):
                key <<= np.uint64(bits)
                key |= x[j : x.size - n + 1 + j]
            distinct.append(np.unique(key).size)
        else:
            windows = np.lib.stride_tricks.sliding_window_view(flat, n)
            distinct.append(np.unique(windows, axis=0).shape[0])
    return distinct


def speed(args) -> list[dict]:
    docs, pad, C = fixture_ids()
    docs = docs * args.copies
    lists = [d.tolist() for d in docs]
    flat = np.concatenate(docs)
    tokens = int(flat.size)
    with tempfile.TemporaryDirectory() as tmp:

        def engram():
            count_ngrams(docs, max_ngram_size=args.max_ngram, pad_id=pad, vocab_size=C, out_dir=tmp)

        t_counter = measure(lambda: counter_count(lists, args.max_ngram, pad), repeat=args.repeat, warmup=0)
        t_unique = measure(lambda: unique_count(flat, args.max_ngram, id_bits(C)), repeat=args.repeat, warmup=0)
        t_engram = measure(engram, repeat=args.repeat)
    rows = []
    for provider, m in [("collections.Counter", t_counter), ("np.unique", t_unique), ("engram.count_ngrams", t_engram)]:
        rows.append(
            {
                "provider": provider,
                "tokens": tokens,
                "orders": f"2..{args.max_ngram}",
                "best_s": m["best_s"],
                "mtok_per_s": tokens / m["best_s"] / 1e6,
                "engram_speedup": m["best_s"] / t_engram["best_s"],
            }
        )
    return rows


def merging(args) -> list[dict]:
    """The shard path against the single count, same documents: count `--shards` shards
    then `merge_stats` (and the key-partitioned reduce: one merge per tok_0 range, then
    `concat_stats`), each as a ratio of the single `count_ngrams` run."""
    docs, pad, C = fixture_ids()
    docs = docs * args.copies
    tokens = int(sum(d.size for d in docs))
    cut = np.linspace(0, len(docs), args.shards + 1).astype(int)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kw = dict(max_ngram_size=args.max_ngram, pad_id=pad, vocab_size=C)
        t_single = measure(lambda: count_ngrams(docs, out_dir=root / "single", **kw), repeat=args.repeat)
        t_shards = measure(lambda: [count_ngrams(docs[a:b], out_dir=root / f"s{i}", **kw) for i, (a, b) in enumerate(zip(cut[:-1], cut[1:]))], repeat=args.repeat)
        parts = [root / f"s{i}" for i in range(args.shards)]
        t_merge = measure(lambda: merge_stats(parts, root / "merged"), repeat=args.repeat)
        edges = np.linspace(0, C, args.shards + 1).astype(int)

        def radix():
            outs = [merge_stats(parts, root / f"r{i}", tok0_range=(int(a), int(b))) for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
            concat_stats(outs, root / "joined")

        t_radix = measure(radix, repeat=args.repeat)
    rows = []
    for provider, m in [
        ("engram.count_ngrams (single)", t_single),
        (f"count_ngrams x{args.shards} shards", t_shards),
        ("merge_stats", t_merge),
        (f"merge_stats x{args.shards} tok0 ranges + concat_stats", t_radix),
    ]:
        rows.append({"provider": provider, "tokens": tokens, "best_s": m["best_s"], "ratio_vs_single": m["best_s"] / t_single["best_s"]})
    return rows


def proc_status_bytes(field: str) -> int | None:
    """VmHWM / VmRSS of this process from /proc (per address space: unlike getrusage's
    ru_maxrss, which Linux carries across fork+exec, it does not include the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_child(args) -> None:
    """Runs in the child: count synthetic ids under a memory limit, print JSON."""
    base = proc_status_bytes("VmRSS") or peak_rss_bytes()
    rng = np.random.default_rng(0)
    doc_len = 2048

    def documents():
        left = args.rss_tokens
        while left > 0:
            n = min(doc_len, left)
            yield (rng.zipf(1.15, size=n) - 1) % DEEPSEEK_C
            left -= n

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        stats = count_ngrams(documents(), max_ngram_size=args.max_ngram, pad_id=2, vocab_size=DEEPSEEK_C, out_dir=tmp, memory_limit=args.rss_memory_limit)
        elapsed = time.perf_counter() - t0
        distinct = {n: stats.distinct(n) for n in stats.orders}
    print(json.dumps({"base_rss": base, "peak_rss": proc_status_bytes("VmHWM") or peak_rss_bytes(), "seconds": elapsed, "distinct": distinct, "tokens": stats.summary["tokens"]}))


def memory(args) -> list[dict]:
    """The child at the full size and at a quarter of it: a bounded counter peaks alike."""
    return [memory_row(args, args.rss_tokens // 4), memory_row(args, args.rss_tokens)]


def memory_row(args, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", "--rss-tokens", str(tokens), "--rss-memory-limit", str(args.rss_memory_limit), "--max-ngram", str(args.max_ngram)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    input_bytes = tokens * 8
    return {
        "provider": "engram.count_ngrams",
        "tokens": out["tokens"],
        "input_mib": input_bytes / 2**20,
        "memory_limit_mib": args.rss_memory_limit / 2**20,
        "distinct": ",".join(f"{n}:{d}" for n, d in out["distinct"].items()),
        "seconds": out["seconds"],
        "peak_rss_mib": out["peak_rss"] / 2**20,
        "rss_after_imports_mib": out["base_rss"] / 2**20,
        "net_peak_mib": (out["peak_rss"] - out["base_rss"]) / 2**20,
        "net_peak_over_limit": (out["peak_rss"] - out["base_rss"]) / args.rss_memory_limit,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rss-tokens", type=int, default=32 << 20)
    ap.add_argument("--rss-memory-limit", type=int, default=64 << 20)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(args)
        return
    if not args.skip_speed:
        rows = speed(args)
        print_rows(f"bench_ngrams speed: fixture x{args.copies}, orders 2..{args.max_ngram}", rows)
        record("ngrams", rows, copies=args.copies, max_ngram=args.max_ngram)
    if not args.skip_merge:
        rows = merging(args)
        print_rows(f"bench_ngrams merge: fixture x{args.copies}, {args.shards} shards, orders 2..{args.max_ngram}", rows)
        record("ngrams_merge", rows, copies=args.copies, max_ngram=args.max_ngram, shards=args.shards)
    if not args.skip_memory:
        rows = memory(args)
        print_rows(f"bench_ngrams memory: {args.rss_tokens} synthetic tokens, limit {args.rss_memory_limit >> 20} MiB", rows)
        record("ngrams_rss", rows, max_ngram=args.max_ngram)


if __name__ == "__main__":
    main()
