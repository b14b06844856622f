"""Benchmark `engram collisions`: the audit's hashing against the docs/spec.md "Hash" numpy
reference on the same n-grams, xxh3 hashing (numpy XXH3 against the xxhash loop), and
the whole audit on the default plan.

    python benchmarks/bench_collisions.py                       # 10 M distinct n-grams
    python benchmarks/bench_collisions.py --distinct 1000000 --hash-ngrams 500000

Figures: hashing as a ratio against `hashing.hash_positions` (the reference layout,
fed the n-grams as (m, n) sequences and read at the last position) and against
`hashing.ngram_head_hashes`; the audit as wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _harness import measure, peak_rss_bytes, print_rows, record
from engram_cli import audit as C
from engram_cli.hashing import hash_positions, ngram_head_hashes, ngram_mix, xxh3_digests, xxh3_digests_loop, xxh3_seed
from engram_cli.ngrams import write_stats_from_arrays
from engram_cli.plan import make_plan

DEEPSEEK_COMPRESSED = 99_610  # about the DeepSeek V3 compressed vocabulary size (129,280 ids, ~23% fewer)


def synthetic_ngrams(rng, order: int, m: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """~m distinct n-grams with Zipf-like token and count distributions."""
    out = np.zeros((0, order), dtype=np.int64)
    while out.shape[0] < m:
        draw = (rng.zipf(1.15, size=(int(1.4 * m), order)) - 1) % vocab
        out = np.unique(np.concatenate([out, draw]), axis=0)
    out = out[rng.permutation(out.shape[0])[:m]]
    return out, rng.zipf(1.6, size=m).astype(np.int64)


def bench_hashing(plan, ids, layer: int) -> list[dict]:
    n = ids.shape[1]
    primes = plan.order_primes(layer, n)
    mult = plan.multipliers[layer][:n]

    def audit_path():
        mix = ngram_mix(ids, mult)
        return [mix % np.int64(p) for p in primes]

    def head_hashes():
        return ngram_head_hashes(plan, layer, ids)

    def positions():
        return hash_positions(plan, layer, ids)[:, -1, (n - 2) * plan.heads : (n - 1) * plan.heads]

    got = np.stack(audit_path(), axis=1)
    assert np.array_equal(got, head_hashes()) and np.array_equal(got, positions()), "audit hashing disagrees with the reference"
    t_audit = measure(audit_path)["best_s"]
    t_heads = measure(head_hashes)["best_s"]
    t_pos = measure(positions, repeat=2)["best_s"]
    m = ids.shape[0]
    return [
        {"provider": "audit (mix once, K mods)", "order": n, "ngrams": m, "best_s": t_audit, "ngrams_per_s": m / t_audit, "speedup_vs_positions": t_pos / t_audit, "speedup_vs_head_hashes": t_heads / t_audit},
        {"provider": "hashing.ngram_head_hashes", "order": n, "ngrams": m, "best_s": t_heads, "ngrams_per_s": m / t_heads},
        {"provider": "hashing.hash_positions (SPEC 3)", "order": n, "ngrams": m, "best_s": t_pos, "ngrams_per_s": m / t_pos},
    ]


def bench_xxh3(plan, ids, layer: int, loop_ngrams: int) -> list[dict]:
    """xxh3 digests of the audit (vectorized numpy XXH3) against one xxhash call per n-gram and head."""
    n = ids.shape[1]
    seeds = [xxh3_seed(plan.seed, layer, n, j) for j in range(plan.heads)]
    sub = ids[:loop_ngrams]
    assert np.array_equal(xxh3_digests(sub, seeds), xxh3_digests_loop(sub, seeds)), "vectorized xxh3 disagrees with xxhash"
    t_vec = measure(lambda: xxh3_digests(ids, seeds), repeat=3)["best_s"]
    t_loop = measure(lambda: xxh3_digests_loop(sub, seeds), repeat=1)["best_s"]
    m = ids.shape[0]
    vec, loop = m / t_vec, sub.shape[0] / t_loop
    return [
        {"provider": "xxh3_64 (numpy, K heads)", "order": n, "ngrams": m, "best_s": t_vec, "ngrams_per_s": vec, "speedup_vs_loop": vec / loop, "s_per_10M_ngrams_one_layer": 1e7 / vec},
        {"provider": "xxh3_64 (xxhash loop, K heads)", "order": n, "ngrams": sub.shape[0], "best_s": t_loop, "ngrams_per_s": loop, "s_per_10M_ngrams_one_layer": 1e7 / loop},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distinct", type=int, default=10_000_000, help="distinct n-grams in all (split 40%% bigrams, 60%% trigrams)")
    ap.add_argument("--hash-ngrams", type=int, default=2_000_000, help="n-grams for the hashing comparison")
    ap.add_argument("--xxh3-loop-ngrams", type=int, default=300_000, help="n-grams for the timing of the xxhash loop (the numpy xxh3 hashes all --hash-ngrams)")
    ap.add_argument("--vocab", type=int, default=DEEPSEEK_COMPRESSED)
    ap.add_argument("--skip-audit", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    plan = make_plan(compressed_vocab_size=args.vocab, compressed_pad_id=2)  # the reference default plan
    ids3, _ = synthetic_ngrams(rng, 3, args.hash_ngrams, args.vocab)
    rows = bench_hashing(plan, ids3, 1)
    rows += bench_xxh3(plan, ids3, 1, args.xxh3_loop_ngrams)
    print_rows("hashing distinct trigrams, layer 1 (default plan, K=8)", rows)
    record("collisions-hashing", rows, vocab=args.vocab)
    if args.skip_audit:
        return
    m2 = int(args.distinct * 0.4)
    per_order = {2: synthetic_ngrams(rng, 2, m2, args.vocab), 3: synthetic_ngrams(rng, 3, args.distinct - m2, args.vocab)}
    with tempfile.TemporaryDirectory() as tmp:
        stats = write_stats_from_arrays(Path(tmp) / "stats", per_order)
        del per_order
        rss0 = peak_rss_bytes()
        t0 = time.perf_counter()
        report = C.audit_collisions(plan, stats)
        wall = time.perf_counter() - t0
    a = report["audit"]
    row = {
        "provider": "audit_collisions (reference, default plan)",
        "distinct": args.distinct,
        "wall_s": wall,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
        "rss_before_gib": rss0 / 2**30,
        "shared_obs_mean": float(np.mean([x["mean"]["shared_observed"] for x in a])),
        "shared_ideal_mean": float(np.mean([x["mean"]["shared_ideal"] for x in a])),
        "indistinguishable_max": max(x["across"]["indistinguishable"]["distinct"] for x in a),
    }
    print_rows(f"whole audit, {args.distinct:,} distinct n-grams, layers {plan.layer_ids}, K={plan.heads}", [row])
    record("collisions-audit", [row], vocab=args.vocab)


if __name__ == "__main__":
    main()
