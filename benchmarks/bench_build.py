"""The build-table pipeline (read + tokenize + compress + count + write a small plan) vs bare tokenizing.

    python benchmarks/bench_build.py --corpus DIR [--max-bytes 120e6] [--max-ngram 3] [--repeat 2]

Corpus: the files under `--corpus` sorted by path, the first `--max-bytes` of them
(issue 8 used the .rst/.txt/.c/.h files of Debian's linux-source-6.1: `apt-get download
linux-source-6.1`, `dpkg-deb -x`, untar those suffixes); default: fixtures/corpus.
Baseline: `tokenizer.encode_batch_fast` over the same texts, already in memory, in
batches of `DEFAULT_BATCH_SIZE` documents (what the pipeline hands the tokenizer;
one call over 120 MB would hold every Encoding at once). Figures: wall-time ratio
baseline / engram (goal >= 0.85) for `count_corpus` and for `build_tables` with a
small plan, in `--repeat` interleaved rounds (every provider once per round, so a
machine shared with other work slows all alike): the median of the per-round ratios
(`ratio_median`), the ratio of the best times, and the CPU seconds (user + system,
all threads) of each run; peak RSS of the process.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import time
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import peak_rss_bytes, print_rows, record  # noqa: E402

from engram_cli.pipeline.build import build_tables, plan_tables  # noqa: E402
from engram_cli.pipeline.count import count_corpus  # noqa: E402
from engram_cli.encode import DEFAULT_BATCH_SIZE  # noqa: E402
from engram_cli.vocab import compress_vocab, load_tokenizer  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pick_files(root: Path, max_bytes: float) -> list[Path]:
    files, total = [], 0
    for p in sorted(p for p in root.rglob("*") if p.is_file()):
        if total >= max_bytes:
            break
        files.append(p)
        total += p.stat().st_size
    return files


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=FIXTURE)
    ap.add_argument("--max-bytes", type=float, default=120e6)
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--memory-limit", type=int, default=2 << 30)
    ap.add_argument("--skip-build", action="store_true", help="time count_corpus only")
    ap.add_argument("--label", default="", help="recorded with the rows (e.g. which checkout's engram_cli ran)")
    args = ap.parse_args(argv)

    tok = load_tokenizer()
    vocab = compress_vocab(tok)
    pad = int(vocab.lookup[2])
    files = pick_files(args.corpus, args.max_bytes)
    texts = [p.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace") for p in files]  # as the corpus reader does
    size = sum(p.stat().st_size for p in files)
    plan = plan_tables(vocab, layer_ids=[1], max_ngram_size=args.max_ngram, heads=2, rows_per_head=[1009], dim=16, seed=0, pad_id=2)
    tokens = []

    def bare_fast():
        n = 0
        for i in range(0, len(texts), DEFAULT_BATCH_SIZE):
            n += sum(len(e.ids) for e in tok.tokenizer.encode_batch_fast(texts[i : i + DEFAULT_BATCH_SIZE], add_special_tokens=False))
        tokens.append(n)

    with tempfile.TemporaryDirectory() as tmp:

        def engram_count():
            summary, _ = count_corpus(files, tokenizer=tok, vocab=vocab, max_ngram_size=args.max_ngram, pad_id=pad, out_dir=Path(tmp) / "stats", memory_limit=args.memory_limit)
            shutil.rmtree(Path(tmp) / "stats")
            tokens.append(summary.tokens)

        def engram_build():
            result = build_tables(files, Path(tmp) / "t.zarr", tokenizer=tok, vocab=vocab, plan=plan, force=True, memory_limit=args.memory_limit)
            tokens.append(result.corpus["tokens"])

        providers = {"tokenizers.encode_batch_fast": bare_fast, "engram.count_corpus": engram_count}
        if not args.skip_build:
            providers["engram.build_tables"] = engram_build
        wall = {name: [] for name in providers}
        cpu = {name: [] for name in providers}
        for _ in range(args.repeat):  # interleaved rounds: a busy machine hits every provider alike
            for name, fn in providers.items():
                c0, t0 = cpu_seconds(), time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(cpu_seconds() - c0)
    assert len(set(tokens)) == 1, f"token counts differ between providers: {set(tokens)}"
    base = "tokenizers.encode_batch_fast"
    rows = []
    for name in providers:
        ratios = [b / w for b, w in zip(wall[base], wall[name])]
        rows.append({
            "provider": name, "files": len(files), "mb": size / 1e6, "tokens": tokens[0], "best_s": min(wall[name]), "times_s": [round(t, 3) for t in wall[name]],
            "cpu_s": [round(t, 3) for t in cpu[name]], "mtok_per_s": tokens[0] / min(wall[name]) / 1e6,
            "ratio_vs_encode_batch_fast": min(wall[base]) / min(wall[name]), "ratio_median": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios],
            "cpu_ratio_median": statistics.median(b / c for b, c in zip(cpu[base], cpu[name])),
        })
    print_rows(f"bench_build: {len(files)} files, {size / 1e6:.1f} MB, {tokens[0]} tokens, orders 2..{args.max_ngram}; peak RSS {peak_rss_bytes() / 2**30:.2f} GiB", rows)
    record("build", rows, corpus=str(args.corpus), max_bytes=args.max_bytes, max_ngram=args.max_ngram, label=args.label)
    return rows


if __name__ == "__main__":
    main()
