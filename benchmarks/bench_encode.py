"""End-to-end corpus throughput (read + tokenize + compress + count) vs bare tokenization.

    python benchmarks/bench_encode.py [--copies 5] [--max-ngram 3] [--repeat 2]

The corpus is fixtures/corpus copied `--copies` times into a temporary directory
(5 copies: ~10 MB of real English text). Baseline: one `tokenizer.encode_batch` call
over the same texts, already in memory (and `encode_batch_fast`, which engram uses).
Figures: throughput ratio engram / baseline in wall time (goal >= 0.8: counting must
hide behind tokenization) and in process CPU time (robust to a busy machine). Runs
are interleaved, best of `--repeat` rounds.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import measure, print_rows, record  # noqa: E402

from engram_cli.pipeline.count import count_corpus  # noqa: E402
from engram_cli.vocab import compress_vocab, load_tokenizer  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory-limit", type=int, default=2 << 30)
    args = ap.parse_args(argv)

    tok = load_tokenizer()
    vocab = compress_vocab(tok)
    pad = int(vocab.lookup[2])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        for i in range(args.copies):
            shutil.copytree(FIXTURE, corpus / f"copy{i}")
        files = sorted(p for p in corpus.rglob("*") if p.is_file())
        texts = [p.read_text(encoding="utf-8") for p in files]
        size = sum(len(t.encode()) for t in texts)
        n_tokens = sum(len(e.ids) for e in tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False))

        def bare():
            tok.tokenizer.encode_batch(texts, add_special_tokens=False)

        def bare_fast():
            tok.tokenizer.encode_batch_fast(texts, add_special_tokens=False)

        def engram():
            summary, _ = count_corpus([corpus], tokenizer=tok, vocab=vocab, max_ngram_size=args.max_ngram, pad_id=pad, out_dir=Path(tmp) / "stats", memory_limit=args.memory_limit)
            assert summary.tokens == n_tokens, (summary.tokens, n_tokens)

        providers = {"tokenizers.encode_batch": bare, "tokenizers.encode_batch_fast": bare_fast, "engram.count_corpus": engram}
        wall = {name: float("inf") for name in providers}
        cpu = {name: float("inf") for name in providers}
        for _ in range(args.repeat):  # interleaved rounds: a busy machine hits every provider alike
            for name, fn in providers.items():
                c0 = cpu_seconds()
                wall[name] = min(wall[name], measure(fn, repeat=1, warmup=0)["best_s"])
                cpu[name] = min(cpu[name], cpu_seconds() - c0)

    rows = []
    base = "tokenizers.encode_batch"
    for name in providers:
        rows.append(
            {
                "provider": name,
                "mb": size / 1e6,
                "tokens": n_tokens,
                "best_s": wall[name],
                "cpu_s": cpu[name],
                "mtok_per_s": n_tokens / wall[name] / 1e6,
                "ratio_vs_encode_batch": wall[base] / wall[name],
                "cpu_ratio_vs_encode_batch": cpu[base] / cpu[name],
                "ratio_vs_encode_batch_fast": wall["tokenizers.encode_batch_fast"] / wall[name],
                "cpu_ratio_vs_encode_batch_fast": cpu["tokenizers.encode_batch_fast"] / cpu[name],
            }
        )
    print_rows(f"bench_encode: {size / 1e6:.1f} MB, {n_tokens} tokens, orders 2..{args.max_ngram}", rows)
    record("encode", rows, copies=args.copies, max_ngram=args.max_ngram)
    return rows


if __name__ == "__main__":
    main()
