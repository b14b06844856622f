"""The build-table pipeline (read + tokenize + compress + count + write a small plan) vs bare tokenizing and KenLM.

    python benchmarks/bench_build.py --corpus DIR [--max-bytes 120e6] [--repeat 2]
        [--lmplz PATH] [--lmplz-input FILE] [--budget 16MiB] [--skip-hf] [--skip-tokenizers]

Corpus: the files under `--corpus` sorted by path, the first `--max-bytes` of them
(issues 8 and 18 used the .rst/.txt/.c/.h files of Debian's linux-source-6.1: `apt-get
download linux-source-6.1`, `dpkg-deb -x`, untar those suffixes); default:
fixtures/corpus. When every file is taken, engram is handed the directory, as
`engram build-table DIR` is. Providers, in `--repeat` interleaved rounds (every
provider once per round, so a machine shared with other work slows all alike):

  tokenizers.encode_batch_fast   bare `tokenizers` over the texts already in memory, in
                                 batches of `DEFAULT_BATCH_SIZE` documents
  fastokens.encode_batch_flat    the bare fast engine, same batches, ids left in its buffers
  kenlm.lmplz                    `lmplz -o 3 -S 2G --skip_symbols --discount_fallback` on the
                                 same text concatenated (`--lmplz-input`, else written to a
                                 temporary file first); counts AND estimates a trigram model;
                                 skipped with one line when `--lmplz` is not found
  engram.count_corpus[ENGINE]    read + tokenize + compress + count (orders 2..--max-ngram)
  engram.build_tables[ENGINE]    ... + a small plan's tables (`--budget`, default layers,
                                 heads and dim: `engram build-table --budget 16MiB`)

ENGINE is fastokens, and hf (`tokenizers`) for `build_tables` as the reference (skipped
with `--skip-hf`). The engram providers each run in a fresh spawned process (the
tokenizer and vocabulary loaded before the clock starts) so their peak RSS is their own;
lmplz's comes from its own rusage. Figures per provider: best and per-round wall and CPU
seconds (user + system, every thread), MB/s and M tokens/s (DeepSeek tokens; lmplz
counts whitespace words, its tokens/s is left out), peak RSS, and the medians of the
per-round ratios against lmplz, the bare fast engine and bare `tokenizers` (other /
this: above 1 means this provider is faster).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import print_rows, record  # noqa: E402

from engram_cli.encode import DEFAULT_BATCH_SIZE  # noqa: E402
from engram_cli.vocab import compress_vocab, load_tokenizer  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
TOKENIZERS = "tokenizers.encode_batch_fast"
FAST = "fastokens.encode_batch_flat"
LMPLZ = "kenlm.lmplz"
LMPLZ_ARGS = ["-o", "3", "-S", "2G", "--skip_symbols", "--discount_fallback"]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: /proc/self/clear_refs, 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak RSS in bytes since the last `reset_peak_rss` (VmHWM), else since it started."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pick_files(root: Path, max_bytes: float) -> list[Path]:
    files, total = [], 0
    for p in sorted(p for p in root.rglob("*") if p.is_file()):
        if total >= max_bytes:
            break
        files.append(p)
        total += p.stat().st_size
    return files


def engram_run(kind: str, engine: str, paths: list[str], budget: str, max_ngram: int, memory_limit: int, tmp: str) -> dict:
    """One engram provider in this (spawned) process: tokenizer and vocabulary loaded first, then timed."""
    from engram_cli.pipeline.build import build_tables, plan_tables
    from engram_cli.pipeline.count import count_corpus
    from engram_cli.plan import DEFAULT_DIM, DEFAULT_HEADS, DEFAULT_LAYER_IDS, parse_budget

    tok = load_tokenizer("deepseek", engine=engine)
    vocab = compress_vocab(tok)
    pad = int(vocab.lookup[2])
    plan = plan_tables(vocab, layer_ids=list(DEFAULT_LAYER_IDS), max_ngram_size=max_ngram, heads=DEFAULT_HEADS, rows_per_head=None,
                       dim=DEFAULT_DIM, seed=0, pad_id=2, budget=parse_budget(budget))
    files = [Path(p) for p in paths]
    Path(tmp).mkdir(parents=True, exist_ok=True)
    reset_peak_rss()
    c0, t0 = cpu_seconds(), time.perf_counter()
    if kind == "count_corpus":
        summary, _ = count_corpus(files, tokenizer=tok, vocab=vocab, max_ngram_size=max_ngram, pad_id=pad, out_dir=Path(tmp) / "stats", memory_limit=memory_limit)
        tokens = summary.tokens
    else:
        result = build_tables(files, Path(tmp) / "t.zarr", tokenizer=tok, vocab=vocab, plan=plan, force=True, memory_limit=memory_limit)
        tokens = result.corpus["tokens"]
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"wall": wall, "cpu": cpu, "peak": peak_rss(), "tokens": tokens, "engine": tok.engine}


def in_child(fn, *args) -> dict:
    """`fn(*args)` in a fresh spawned process (no rayon pool crosses a fork; its own peak RSS)."""
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result()


def lmplz_runner(lmplz: str, text: Path, tmp: Path):
    """A provider for lmplz measured through wait4 (its own rusage, not the children's running totals)."""

    def run() -> dict:
        out = tmp / "lm.arpa"
        with open(text, "rb") as fin, open(out, "wb") as fout:
            t0 = time.perf_counter()
            proc = subprocess.Popen([lmplz, *LMPLZ_ARGS, "-T", str(tmp)], stdin=fin, stdout=fout, stderr=subprocess.DEVNULL)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        out.unlink(missing_ok=True)
        if proc.returncode:
            raise SystemExit(f"{lmplz} exited with {proc.returncode}; run it by hand: {lmplz} {' '.join(LMPLZ_ARGS)} < {text}")
        return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": usage.ru_maxrss * 1024}

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=FIXTURE)
    ap.add_argument("--max-bytes", type=float, default=120e6)
    ap.add_argument("--max-ngram", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--memory-limit", type=int, default=2 << 30)
    ap.add_argument("--budget", default="16MiB", help="the small plan of build_tables (engram build-table --budget)")
    ap.add_argument("--lmplz", default="lmplz", help="KenLM's lmplz (a path, or a name on PATH)")
    ap.add_argument("--lmplz-input", type=Path, help="the corpus's texts concatenated (else written to a temporary file)")
    ap.add_argument("--skip-build", action="store_true", help="time count_corpus only")
    ap.add_argument("--skip-hf", action="store_true", help="leave out build_tables with the reference engine (slow)")
    ap.add_argument("--skip-tokenizers", action="store_true", help="leave out bare tokenizers.encode_batch_fast (slow)")
    ap.add_argument("--label", default="", help="recorded with the rows (e.g. which checkout's engram_cli ran)")
    args = ap.parse_args(argv)

    tok = load_tokenizer("deepseek", engine="fastokens")
    if tok.fast is None:
        raise SystemExit("fastokens does not load the DeepSeek tokenizer here; pip install fastokens")
    files = pick_files(args.corpus, args.max_bytes)
    everything = len(files) == len(pick_files(args.corpus, float("inf")))
    paths = [str(args.corpus)] if everything else [str(p) for p in files]  # the directory, as `engram build-table DIR` is called
    texts = [p.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace") for p in files]  # as the corpus reader does
    size = sum(p.stat().st_size for p in files)
    tokens: dict[str, int] = {}
    lmplz = shutil.which(args.lmplz)

    def bare_tokenizers() -> dict:
        n = 0
        for i in range(0, len(texts), DEFAULT_BATCH_SIZE):
            n += sum(len(e.ids) for e in tok.tokenizer.encode_batch_fast(texts[i : i + DEFAULT_BATCH_SIZE], add_special_tokens=False))
        return {"tokens": n}

    def bare_fast() -> dict:
        n = 0
        for i in range(0, len(texts), DEFAULT_BATCH_SIZE):
            ids, _ = tok.fast.encode_batch_flat(texts[i : i + DEFAULT_BATCH_SIZE], add_special_tokens=False)
            n += len(memoryview(ids).cast("B")) // 4
        return {"tokens": n}

    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp_dir:
        tmp = Path(tmp_dir)
        providers = {}
        if not args.skip_tokenizers:
            providers[TOKENIZERS] = bare_tokenizers
        providers[FAST] = bare_fast
        if lmplz is None:
            print(f"kenlm.lmplz skipped: {args.lmplz!r} not found (build kpu/kenlm with cmake and pass --lmplz PATH)")
        else:
            text = args.lmplz_input
            if text is None:
                text = tmp / "corpus.txt"
                with open(text, "w", encoding="utf-8") as f:
                    for t in texts:
                        f.write(t)
                        f.write("\n")
            providers[LMPLZ] = lmplz_runner(lmplz, text, tmp)
        runs = [("count_corpus", "fastokens")]
        if not args.skip_build:
            runs.append(("build_tables", "fastokens"))
            if not args.skip_hf:
                runs.append(("build_tables", "hf"))
        for kind, engine in runs:
            providers[f"engram.{kind}[{engine}]"] = (lambda kind=kind, engine=engine: in_child(
                engram_run, kind, engine, paths, args.budget, args.max_ngram, args.memory_limit, str(tmp / "engram")))
        wall = {name: [] for name in providers}
        cpu = {name: [] for name in providers}
        peak = {name: [] for name in providers}
        for r in range(args.repeat):  # interleaved rounds: a busy machine hits every provider alike
            for name, fn in providers.items():
                reset_peak_rss()
                c0, t0 = cpu_seconds(), time.perf_counter()
                got = fn()
                w, c = time.perf_counter() - t0, cpu_seconds() - c0
                wall[name].append(got.get("wall", w))
                cpu[name].append(got.get("cpu", c))
                peak[name].append(got.get("peak", peak_rss()))
                if "tokens" in got:
                    tokens[name] = got["tokens"]
                shutil.rmtree(tmp / "engram", ignore_errors=True)
                print(f"round {r + 1}: {name:34s} wall {wall[name][-1]:7.2f} s  CPU {cpu[name][-1]:7.2f} s  peak RSS {peak[name][-1] / 2**30:.2f} GiB", flush=True)
    assert len(set(tokens.values())) == 1, f"token counts differ between providers: {tokens}"
    n_tokens = next(iter(tokens.values()))
    rows = []
    for name in providers:
        row = {
            "provider": name, "files": len(files), "mb": size / 1e6, "tokens": n_tokens, "best_s": min(wall[name]),
            "times_s": [round(t, 3) for t in wall[name]], "cpu_s": [round(t, 3) for t in cpu[name]],
            "mb_per_s": size / 1e6 / min(wall[name]), "peak_rss_gib": max(peak[name]) / 2**30,
        }
        if name != LMPLZ:
            row["mtok_per_s"] = n_tokens / min(wall[name]) / 1e6
        for base, key in ((LMPLZ, "vs_lmplz"), (FAST, "vs_fast_engine"), (TOKENIZERS, "vs_tokenizers")):
            if base in providers and base != name:
                row[f"wall_{key}"] = statistics.median(b / w for b, w in zip(wall[base], wall[name]))
                row[f"cpu_{key}"] = statistics.median(b / c for b, c in zip(cpu[base], cpu[name]))
        rows.append(row)
    print_rows(f"bench_build: {len(files)} files, {size / 1e6:.1f} MB, {n_tokens} tokens, orders 2..{args.max_ngram}, plan --budget {args.budget}", rows)
    record("build", rows, corpus=str(args.corpus), max_bytes=args.max_bytes, max_ngram=args.max_ngram, budget=args.budget, label=args.label,
           lmplz=lmplz, lmplz_args=LMPLZ_ARGS)
    return rows


if __name__ == "__main__":
    main()
