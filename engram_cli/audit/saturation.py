"""The saturation verdict: the orders whose heads a plan fills past the threshold, and the rows that bring them to a target.

A plan is *saturated* for an order when, under an ideal uniform hash, more than
`SATURATION_THRESHOLD` (50%) of that order's distinct n-grams share their bucket with
another n-gram in a head (`figures.ideal_shared`, the `ideal` column of `engram
collisions`; the reference hash measures within a few tenths of a point of it). Past
that, most lookups return a row several n-grams wrote into, and a larger plan is the
fix: `rows_for_rate` gives the rows per head that bring the share down to
`SATURATION_TARGET` (25%). The verdict needs only the plan and each order's distinct
n-gram count, so `build-table` gives it after counting, and `collisions` and `inspect`
give the same one from the stored statistics (docs/collisions.md, "Saturation").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engram_cli.audit.figures import ideal_shared, rows_for_rate
from engram_cli.plan import TablePlan
from engram_cli.units import format_bytes

SATURATION_THRESHOLD = 0.5  # over half of an order's n-grams in shared buckets, per head: saturated
SATURATION_TARGET = 0.25  # the share the suggested size brings it to


@dataclass(frozen=True)
class Saturated:
    """One saturated order: its worst layer's ideal shared share and the size that brings it to the target."""

    order: int
    layer_id: int  # the layer with the smallest heads for this order (the highest share)
    distinct: int  # distinct n-grams of the order
    rows_per_head: int  # the layer's smallest head (a prime)
    shared: float  # ideal share of n-grams in a shared bucket, per head
    target_rows: int  # rows per head that bring `shared` to the target
    target: float = SATURATION_TARGET

    def as_dict(self) -> dict:
        return asdict(self)


def saturated_orders(plan: TablePlan, distinct: dict[int, int], threshold: float = SATURATION_THRESHOLD, target: float = SATURATION_TARGET) -> list[Saturated]:
    """The orders of `plan` whose ideal per-head shared share passes `threshold` (`distinct`: order -> distinct n-grams)."""
    out = []
    for order in plan.orders:
        m = int(distinct.get(order, 0))
        layer_id, p = min(((lid, int(min(plan.order_primes(lid, order)))) for lid in plan.layer_ids), key=lambda x: x[1])
        shared = ideal_shared(m, p)
        if shared > threshold:
            out.append(Saturated(order=order, layer_id=layer_id, distinct=m, rows_per_head=p, shared=shared, target_rows=rows_for_rate(m, target), target=target))
    return out


def target_bytes(plan: TablePlan, found: list[Saturated]) -> int:
    """The plan's bytes with each saturated order's heads grown to its target rows (the others as they are)."""
    grow = {s.order: s.target_rows for s in found}
    rows = 0
    for lid in plan.layer_ids:
        for order in plan.orders:
            primes = plan.order_primes(lid, order)
            rows += len(primes) * grow[order] if order in grow else int(sum(primes))
    return rows * plan.head_dim * plan.dtype_bytes


def saturation_notice(plan: TablePlan, found: list[Saturated]) -> str | None:
    """One line naming each saturated order, its share and the flag that brings it to the target; None when none is."""
    if not found:
        return None
    parts = [f"{s.order}-grams {s.shared:.2%} in shared buckets per head ({s.distinct:,} distinct in {s.rows_per_head:,} rows)" for s in found]
    rows = ",".join(str(next((s.target_rows for s in found if s.order == o), rpr)) for o, rpr in zip(plan.orders, plan.rows_per_head))
    target = found[0].target
    return (f"Saturated plan: {'; '.join(parts)}, over the {SATURATION_THRESHOLD:.0%} threshold: most lookups read a row other n-grams share. "
            f"--rows-per-head {rows} (about {format_bytes(target_bytes(plan, found))}) brings it to {target:.0%} "
            f"(or --rows-per-head auto --target {target}; docs/collisions.md, Saturation).")


def saturation_verdict(plan: TablePlan, distinct: dict[int, int]) -> dict:
    """The verdict as a dict for reports and --json: threshold, target, the saturated orders and the notice line."""
    found = saturated_orders(plan, distinct)
    return {"threshold": SATURATION_THRESHOLD, "target": SATURATION_TARGET, "saturated": [s.as_dict() for s in found],
            "notice": saturation_notice(plan, found)}
