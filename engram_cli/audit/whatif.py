"""What-if plans of an audit: other heads, rows or budget; sweep grids; rows per head sized to a target rate.

All keep the stored plan's layers, seed, pad id, vocabulary and dtype. The sizing
search (`size_for_target`, docs/collisions.md "Sizing") measures each candidate's
token-weighted rate with the real hash on the real n-grams; `engram build-table
--rows-per-head auto` uses the same search (engram_cli.pipeline.sizing), so both commands agree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..errors import PlanError
from ..kinds import HashFamily
from ..plan import (
    Budget,
    TablePlan,
    check_heads,
    check_rows_or_budget,
    fit_plan_to_budget,
)
from .figures import rows_for_rate, share, token_weighted_rate
from .keys import OrderKeys


# -- what-if plans -----------------------------------------------------------------
def _plan_kwargs(plan: TablePlan) -> dict:
    """The plan's `make_plan` arguments less the sizing ones (heads, dim, rows per head)."""
    return {k: v for k, v in plan.make_kwargs().items() if k not in ("heads", "dim", "rows_per_head")}


def dim_for_heads(plan: TablePlan, heads: int) -> int:
    """The row width a what-if plan with `heads` heads keeps: the stored dim when heads divides it
    (same per-token width, so bytes do not change with K), else heads * the stored head_dim."""
    return plan.dim if plan.dim % heads == 0 else heads * plan.head_dim


def what_if_plan(stored: TablePlan, *, heads: int | None = None, rows_per_head=None, budget: Budget | None = None) -> tuple[TablePlan, list[str]]:
    """The stored plan with new heads and/or rows (same layers, seed, pad, vocab, dtype); notes on choices made."""
    check_rows_or_budget(rows_per_head, budget)
    if heads is None and rows_per_head is None and budget is None:
        return stored, []
    notes = []
    K = stored.heads if heads is None else check_heads(int(heads))
    dim = dim_for_heads(stored, K)
    if dim != stored.dim:
        notes.append(f"--heads {K} does not divide the stored dim {stored.dim}; the what-if plan keeps head_dim {stored.head_dim} (dim {dim})")
    kwargs = _plan_kwargs(stored) | dict(heads=K, dim=dim)
    if budget is not None:
        plan = fit_plan_to_budget(budget, **kwargs)
    else:
        plan = stored.remade(heads=K, dim=dim, rows_per_head=stored.rows_per_head if rows_per_head is None else rows_per_head)
    if plan.fingerprint == stored.fingerprint:  # e.g. `--heads 8` on an 8-head store
        given = " ".join(f"{f} {v if f != '--rows-per-head' else ','.join(map(str, v))}" for f, v in (("--heads", heads), ("--rows-per-head", rows_per_head)) if v is not None) or "--budget"
        notes.append(f"{given} gives the stored plan itself: this is the stored plan's audit, not a what-if")
        return stored, notes
    return plan, notes


# -- sweeps ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepSpec:
    """A grid: head counts x rows per head (absolute, or `f` x the audited plan's rows)."""

    heads: tuple[int, ...]
    rows: tuple[str, ...]  # as given: "0.5x" or "1000000"


_ROWS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(x?)\s*$", re.IGNORECASE)


def parse_sweep(specs: Iterable[str], base: TablePlan) -> SweepSpec:
    """`heads=1,2,4,8` and `rows=0.25x,0.5x,1x,2x` (either may be left out: the plan's value)."""
    heads: tuple[int, ...] | None = None
    rows: tuple[str, ...] | None = None
    for spec in specs:
        for part in spec.split():
            name, eq, values = part.partition("=")
            name = name.strip().lower()
            items = [v.strip() for v in values.split(",") if v.strip()]
            if not eq or name not in ("heads", "rows") or not items:
                raise PlanError(f"cannot read --sweep {part!r}; write heads=1,2,4,8 and/or rows=0.25x,0.5x,1x,2x")
            if name == "heads":
                try:
                    heads = tuple(int(v) for v in items)
                except ValueError:
                    raise PlanError(f"--sweep heads must be whole numbers, got {values!r}") from None
                if any(h < 1 for h in heads):
                    raise PlanError(f"--sweep heads must be at least 1, got {values!r}")
            else:
                for v in items:
                    if not _ROWS_RE.match(v):
                        raise PlanError(f"--sweep rows value {v!r} is neither a multiple like 0.5x nor a row count like 1000000")
                rows = tuple(items)
    if heads is None and rows is None:
        raise PlanError("--sweep needs heads=... and/or rows=..., e.g. --sweep heads=1,2,4,8 rows=0.5x,1x,2x")
    return SweepSpec(heads=heads or (base.heads,), rows=rows or ("1x",))


def resolve_rows(value: str, base: TablePlan) -> tuple[int, ...]:
    """Rows per head per order for one sweep value."""
    num, times = _ROWS_RE.match(value).groups()
    if times:
        rows = tuple(max(2, int(round(float(num) * r))) for r in base.rows_per_head)
    else:
        rows = (max(2, int(float(num))),) * len(base.orders)
    return rows


def sweep_plans(spec: SweepSpec, base: TablePlan) -> list[tuple[int, str, TablePlan]]:
    return [(K, r, base.remade(heads=K, dim=dim_for_heads(base, K), rows_per_head=resolve_rows(r, base))) for K in spec.heads for r in spec.rows]


def sweep_summary(cells, rows: list[dict], families) -> dict:
    """The --sweep grid (per cell: rates averaged over orders, bytes) from per-(layer, order) cell rows."""
    grid = []
    for fam in families:
        for K, r, cell_plan in cells:
            mine = [x for x in rows if x["family"] == fam and x["heads"] == K and x["rows"] == r]
            per_order = {}
            for n in cell_plan.orders:
                on = [x for x in mine if x["order"] == n]
                per_order[str(n)] = {k: float(np.mean([x[k] for x in on])) for k in ("token_weighted", "all_heads", "all_heads_weighted")}
            grid.append(
                {
                    "family": fam,
                    "heads": K,
                    "rows": r,
                    "rows_per_head": list(cell_plan.rows_per_head),
                    "bytes": cell_plan.total_bytes,
                    "token_weighted": float(np.mean([v["token_weighted"] for v in per_order.values()])),
                    "all_heads": float(np.mean([v["all_heads"] for v in per_order.values()])),
                    "all_heads_weighted": float(np.mean([v["all_heads_weighted"] for v in per_order.values()])),
                    "per_order": per_order,
                }
            )
    return {"heads": sorted({c[0] for c in cells}), "rows": list(dict.fromkeys(c[1] for c in cells)), "grid": grid}


# -- sizing to a target rate ----------------------------------------------------------
def size_for_target(keys: OrderKeys, base: TablePlan, target: float, *, max_evals: int = 10, tolerance: float = 0.01, max_rows: int = 1 << 33) -> dict:
    """Smallest rows per head (within `tolerance`) whose mean token-weighted rate over the
    order's heads is <= target in this layer, found with the real hash on the real n-grams.

    Starts from the ideal-hash solution, then refines with secant steps on the model
    rate = 1 - exp(-L/p) fitted to each measured point, keeping a verified bracket.
    """
    floor = None
    if keys.family == HashFamily.REFERENCE:
        dup = keys.mix_duplicated()
        floor = share(float(keys.counts[dup].sum()), keys.total)
    return search_rows_for_target(lambda primes: token_weighted_rate(keys, primes), base, target, layer=keys.layer_id, order=keys.order, distinct=keys.m,
                                  floor=floor, max_evals=max_evals, tolerance=tolerance, max_rows=max_rows)


def search_rows_for_target(rate_at: Callable[[list[int]], float], base: TablePlan, target: float, *, layer: int, order: int, distinct: int, floor: float | None,
                           max_evals: int = 10, tolerance: float = 0.01, max_rows: int = 1 << 33) -> dict:
    """`size_for_target`'s search, measuring each candidate's primes with `rate_at(primes)`
    (`token_weighted_rate`, or its sum over bucket ranges); `floor`: the reference family's
    share of occurrences with a duplicated mix (no table size goes below it), else None."""
    m = distinct
    if floor is not None and floor >= target:
        return {"rows_per_head": None, "rate": floor, "reachable": False, "evaluations": 0, "floor": floor, "ideal_rows": rows_for_rate(m, target)}

    def primes_at(rows: int) -> list[int]:
        rph = list(base.rows_per_head)
        rph[order - 2] = rows
        return list(base.remade(rows_per_head=tuple(rph)).primes[layer][order - 2])

    rows = rows_for_rate(m, target)
    lo, hi, hi_rate, evals, rate = 0, None, None, 0, None
    while evals < max_evals:
        rows = int(min(max(rows, 2), max_rows))
        rate = rate_at(primes_at(rows))
        evals += 1
        if rate <= target:
            if hi is None or rows < hi:
                hi, hi_rate = rows, rate
        else:
            lo = max(lo, rows)
        if hi is not None and (hi <= 2 or hi <= lo * (1 + tolerance)):
            break
        if hi is None and rows >= max_rows:
            break
        # secant step on the model rate = 1 - exp(-L / p), L fitted to this point
        guess = -rows * math.log1p(-rate) / -math.log1p(-target) if 0 < rate < 1 else (rows * 2 if rate >= 1 else rows / 2)
        if hi is None:
            guess = max(guess * 1.002, lo * 1.05)  # must grow until a verified point exists
        else:
            if guess >= hi:  # the model says hi is about right: probe just below it
                guess = hi / (1 + tolerance)
            guess = min(max(guess, lo + 1), hi - 1)
        rows = int(math.ceil(guess))
    if hi is None:
        return {"rows_per_head": None, "rate": rate, "reachable": False, "evaluations": evals, "floor": floor, "ideal_rows": rows_for_rate(m, target)}
    return {"rows_per_head": int(hi), "rate": hi_rate, "reachable": True, "evaluations": evals, "floor": floor, "ideal_rows": rows_for_rate(m, target), "bracket_low": int(lo)}


def order_bytes(plan: TablePlan, order: int) -> int:
    """Bytes of one order's heads across all layers of the plan."""
    return sum(sum(plan.primes[layer][order - 2]) for layer in plan.layer_ids) * plan.head_dim * plan.dtype_bytes


def sizing_summary(plan: TablePlan, target: float, family: str, rows: list[dict]) -> dict:
    """The --target answer per order (the largest rows any audited layer needs) from `size_for_target` rows."""
    per_order = []
    answer = list(plan.rows_per_head)
    reachable = True
    for n in plan.orders:
        mine = [r for r in rows if r["order"] == n]
        ok = all(r["reachable"] for r in mine)
        need = max((r["rows_per_head"] for r in mine if r["rows_per_head"] is not None), default=None)
        if ok and need is not None:
            answer[n - 2] = need
        reachable &= ok
        per_order.append({"order": n, "rows_per_head": need if ok else None, "reachable": ok, "per_layer": mine})
    sized = plan.remade(rows_per_head=tuple(answer)) if reachable else None
    for entry in per_order:
        entry["bytes"] = order_bytes(sized, entry["order"]) if sized else None
    return {
        "target": target,
        "family": family,
        "criterion": "mean over the order's heads of the token-weighted rate, <= target in every audited layer",
        "orders": per_order,
        "total_bytes": sized.total_bytes if sized else None,
        "current_total_bytes": plan.total_bytes,
    }
