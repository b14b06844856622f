"""The whole collision audit of a plan over n-gram statistics: every (family, layer, order) into one report.

`audit_collisions` takes a `TablePlan` and an `NgramStats` (it does not open stores) and
returns the JSON-safe report of docs/collisions.md. One (family, layer, order) at a time
it holds that order's hash state (`keys.OrderKeys`), so memory follows the largest order,
not the plan.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import PlanError
from ..kinds import HashFamily
from ..ngrams import NgramStats
from ..plan import TablePlan, check_stats_cover, check_target_rate
from .figures import TOP_BUCKETS, all_heads_share, audit_order, token_weighted_rate
from .keys import SMALL_SET, Progress, load_order_keys, no_progress
from .whatif import (
    SweepSpec,
    size_for_target,
    sizing_summary,
    sweep_plans,
    sweep_summary,
)

DEFAULT_FAMILIES = (HashFamily.REFERENCE,)  # the plan's own multiply-xor hash (docs/spec.md, "Hash")


def plan_summary(plan: TablePlan) -> dict:
    return {
        "layer_ids": list(plan.layer_ids),
        "orders": list(plan.orders),
        "heads": plan.heads,
        "rows_per_head": list(plan.rows_per_head),
        "dim": plan.dim,
        "head_dim": plan.head_dim,
        "dtype": plan.dtype,
        "hash_family": plan.hash_family,
        "primes": {str(k): [list(o) for o in v] for k, v in plan.primes.items()},
        "total_rows": plan.total_rows,
        "total_bytes": plan.total_bytes,
        "fingerprint": plan.fingerprint,
    }


def family_distance(audits: list[dict]) -> dict:
    """Per hash family: how far its heads are from the ideal hash, over every audited (layer, order)."""
    out = {}
    for fam in dict.fromkeys(a["family"] for a in audits):
        heads = [h for a in audits if a["family"] == fam for h in a["heads"]]
        ex = np.array([h["shared_excess"] for h in heads])
        tw = np.array([h["token_weighted_excess"] for h in heads])
        ideal = np.array([h["shared_ideal"] for h in heads])
        rel = np.divide(ex, ideal, out=np.zeros_like(ex), where=ideal > 0)
        out[fam] = {
            "heads": len(heads),
            "shared_excess_mean": float(ex.mean()) if ex.size else 0.0,
            "shared_excess_max_abs": float(np.abs(ex).max()) if ex.size else 0.0,
            "shared_excess_relative_mean": float(rel.mean()) if ex.size else 0.0,
            "token_weighted_excess_mean": float(tw.mean()) if tw.size else 0.0,
            "indistinguishable_excess": [
                {"layer": a["layer"], "order": a["order"], "observed": a["across"]["indistinguishable"]["distinct"], "ideal": a["across"]["indistinguishable_ideal"]}
                for a in audits
                if a["family"] == fam
            ],
        }
    return out


def validate_audit(plan: TablePlan, stats: NgramStats, *, layers: Sequence[int] | None = None, target: float | None = None, top: int = TOP_BUCKETS) -> tuple[int, ...]:
    """Check the audit's options against the plan and statistics (before any work); the layers to audit."""
    layers = tuple(plan.layer_ids) if layers is None else tuple(int(x) for x in layers)
    unknown = [x for x in layers if x not in plan.layer_ids]
    if unknown:
        raise PlanError(f"--layers {','.join(map(str, unknown))} not in the plan (layers {','.join(map(str, plan.layer_ids))})")
    check_stats_cover(plan, stats)
    if target is not None:
        check_target_rate(target)
    if top < 0:
        raise PlanError(f"--top must be >= 0, got {top}")
    return layers


def audit_collisions(
    plan: TablePlan,
    stats: NgramStats,
    *,
    families: Sequence[str] = DEFAULT_FAMILIES,
    layers: Sequence[int] | None = None,
    target: float | None = None,
    sweep: SweepSpec | None = None,
    vocab_keys: Sequence[str] | None = None,
    top: int = TOP_BUCKETS,
    progress: Progress | None = None,
    small_set: int = SMALL_SET,
) -> dict:
    """Audit `plan` over `stats`: the JSON-safe report described in docs/collisions.md.

    One (family, layer, order) at a time: hash the distinct n-grams once, then the
    per-head and across-head figures, the worst buckets, the sizing search (`target`)
    and the sweep cells (`sweep`) all reuse that hash state.
    """
    progress = progress or no_progress
    families = HashFamily.parse_many(families)
    layers = validate_audit(plan, stats, layers=layers, target=target, top=top)
    cells = sweep_plans(sweep, plan) if sweep is not None else []
    max_heads = max([plan.heads, *(c[2].heads for c in cells)])
    audits, sizing_rows, cell_rows = [], [], []
    units = [(f, layer, n) for f in families for layer in layers for n in plan.orders]
    for u, (fam, layer, n) in enumerate(units):
        progress("audit", u, len(units), f"{fam} layer {layer} order {n}")
        keys = load_order_keys(plan, stats, layer, n, fam, heads=max_heads, progress=progress)
        audits.append(audit_order(plan, stats, keys, top=top, vocab_keys=vocab_keys, small_set=small_set))
        if target is not None and fam == families[0]:
            sizing_rows.append({"layer": layer, "order": n, **size_for_target(keys, plan, target)})
        for K, rows, cell_plan in cells:
            primes = cell_plan.primes[layer][n - 2]
            d, w = all_heads_share(keys, primes)
            cell_rows.append({"family": fam, "heads": K, "rows": rows, "layer": layer, "order": n, "token_weighted": token_weighted_rate(keys, primes), "all_heads": d, "all_heads_weighted": w})
        del keys
    progress("audit", len(units), len(units), "done")
    return audit_report(plan, stats, families=families, layers=layers, audits=audits, target=target, sizing_rows=sizing_rows, sweep=sweep, cells=cells, cell_rows=cell_rows)


def audit_report(plan: TablePlan, stats: NgramStats, *, families, layers, audits: list[dict], target: float | None, sizing_rows: list[dict], sweep: SweepSpec | None, cells: list, cell_rows: list[dict]) -> dict:
    """The whole report from the per-(family, layer, order) audits, sizing rows and sweep cell rows
    (each list in (family, layer, order) order): the cross-layer summaries are computed here."""
    return {
        "plan": plan_summary(plan),
        "families": list(families),
        "layers": list(layers),
        "orders": {str(n): {"distinct": stats.distinct(n), "occurrences": stats.total(n)} for n in plan.orders},
        "audit": audits,
        "family_distance": family_distance(audits),
        "sizing": sizing_summary(plan, target, families[0], sizing_rows) if target is not None else None,
        "sweep": sweep_summary(cells, cell_rows, families) if sweep is not None else None,
    }
