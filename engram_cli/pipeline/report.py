"""The build's reports as plain dicts (the `--json` schemas of docs/build-table.md): the plan, and the n-gram statistics decoded."""

from __future__ import annotations

from ..ngrams import NgramStats
from ..plan import TablePlan
from ..vocab import CompressedVocab


def plan_report(plan: TablePlan) -> dict:
    """Per layer and order: primes, rows and bytes (the plan printed before writing)."""
    layers = []
    for layer in plan.layer_ids:
        orders = []
        for n in plan.orders:
            primes = [int(p) for p in plan.primes[layer][n - 2]]
            orders.append({"order": n, "primes": primes, "rows": sum(primes), "bytes": sum(primes) * plan.head_dim * plan.dtype_bytes})
        layers.append({"layer_id": layer, "rows": plan.layer_rows(layer), "bytes": plan.layer_bytes(layer), "orders": orders, "multipliers": [str(m) for m in plan.multipliers[layer]]})
    return {
        "heads": plan.heads,
        "max_ngram_size": plan.max_ngram_size,
        "rows_per_head": list(plan.rows_per_head),
        "dim": plan.dim,
        "head_dim": plan.head_dim,
        "dtype": plan.dtype,
        "seed": plan.seed,
        "pad_id": plan.pad_id,
        "compressed_pad_id": plan.compressed_pad_id,
        "compressed_vocab_size": plan.compressed_vocab_size,
        "total_rows": plan.total_rows,
        "total_params": plan.total_params,
        "total_bytes": plan.total_bytes,
        "fingerprint": plan.fingerprint,
        "layers": layers,
    }


def decode_ngram(vocab: CompressedVocab, ids) -> list[str]:
    """The text of each compressed id of an n-gram (its normalized key)."""
    return [vocab.keys[int(i)] for i in ids]


def stats_report(stats: NgramStats, vocab: CompressedVocab) -> dict:
    """The n-gram summary with the most frequent n-grams decoded to text."""
    per_order = {}
    for n in stats.orders:
        s = dict(stats.order_summary(n))
        s["top"] = [{**t, "text": decode_ngram(vocab, t["ids"])} for t in s.get("top", [])]
        per_order[str(n)] = s
    return {"tokens": stats.summary.get("tokens"), "documents": stats.summary.get("documents"), "per_order": per_order}


__all__ = ["decode_ngram", "plan_report", "stats_report"]
