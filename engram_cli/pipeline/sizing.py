"""Table sizes that surprise no one: a plan's footprint against the free disk, and
`--rows-per-head auto`, which sizes each order's heads from the counted n-grams.

The auto metric is the one `engram collisions --target` reports (docs/collisions.md,
"Sizing"): per layer and order, the mean over the order's heads of the token-weighted
collision rate (the share of the order's corpus windows whose n-gram shares its head's
row with another distinct n-gram), measured with the plan's real hash on the real
counted n-grams. Each order gets the smallest rows per head (within 1%) whose rate is
<= target in every layer; `audit.size_for_target` does the search and
`audit.sizing_summary` takes the per-layer maximum, so both commands agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from ..audit import (
    load_order_keys,
    size_for_target,
    sizing_summary,
    token_weighted_rate,
)
from ..errors import OutputError, PlanError
from ..kinds import HashFamily
from ..plan import (
    DEFAULT_ROWS_PER_HEAD,
    TablePlan,
    check_stats_cover,
    check_target_rate,
)
from ..store.format import row_bytes
from ..units import parse_int_list

GiB = 1 << 30
# Plans above this many bytes get a notice naming `--rows-per-head auto`.
LARGE_PLAN_BYTES = 1 * GiB
AUTO = "auto"


def free_disk_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system that will hold `path` (its nearest existing ancestor)."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                return int(shutil.disk_usage(candidate).free)
            except OSError:
                return None
    return None


def plan_footprint(plan: TablePlan, out: str | Path) -> dict:
    """The plan's table bytes, the free disk at `out` and the share of it the tables take.

    `bytes` counts the rows as stored uncompressed (rows x row bytes, fp8 scales
    included); compression saves little on random-initialized floats.
    """
    size = plan.total_rows * row_bytes(plan)
    free = free_disk_bytes(out)
    return {
        "bytes": int(size),
        "free_disk_bytes": free,
        "share_of_free_disk": (size / free) if free else None,
        "large": size > LARGE_PLAN_BYTES,
    }


def large_plan_notice(footprint: dict) -> str | None:
    """One line for a plan over `LARGE_PLAN_BYTES`, naming the flag that shrinks it."""
    if not footprint["large"]:
        return None
    gib = footprint["bytes"] / GiB
    return (
        f"Notice: this plan is {gib:.2f} GiB (over {LARGE_PLAN_BYTES // GiB} GiB); "
        "`--rows-per-head auto --target RATE` sizes the heads to the corpus for a collision rate (docs/build-table.md, \"Sizing\")."
    )


def check_fits_disk(footprint: dict) -> None:
    """Refuse a plan larger than the free disk at its output (before anything is written)."""
    free = footprint["free_disk_bytes"]
    if free is not None and footprint["bytes"] > free:
        raise OutputError(f"the plan needs {footprint['bytes'] / GiB:.2f} GiB but only {free / GiB:.2f} GiB is free at the output; raise --target, lower --heads or write elsewhere with -o")


def parse_rows_per_head(text: str | None):
    """`--rows-per-head`: None (the default), `auto`, or integers (one, or one per order)."""
    if text is None:
        return None
    if str(text).strip().lower() == AUTO:
        return AUTO
    return parse_int_list(text, what="--rows-per-head")


def size_plan_to_target(plan: TablePlan, stats, target: float, *, progress: Callable | None = None) -> tuple[TablePlan, dict]:
    """The plan with each order's rows per head sized so the `collisions --target`
    metric is <= `target` in every layer; and the sizing summary (the `sizing` object of
    `engram collisions --json`).

    Holds one (layer, order)'s hash state at a time (8 bytes per distinct n-gram plus
    its count), as `engram collisions` does. Raises PlanError when the target cannot be
    reached (the reference hash's own 64-bit collisions put a floor under the rate).
    """
    check_target_rate(target)
    check_stats_cover(plan, stats)
    family = HashFamily.REFERENCE  # the plan's multiply-xor hash
    rows = []
    for layer in plan.layer_ids:
        for n in plan.orders:
            keys = load_order_keys(plan, stats, layer, n, family, heads=plan.heads, progress=progress or (lambda *a, **k: None))
            rows.append({"layer": layer, "order": n, **size_for_target(keys, plan, target)})
            del keys
    summary = sizing_summary(plan, target, family, rows)
    bad = [o for o in summary["orders"] if not o["reachable"]]
    if bad:
        floors = ", ".join(f"order {o['order']}" for o in bad)
        raise PlanError(f"--target {target} cannot be reached for {floors} (the hash's own collisions or the size cap); raise --target, e.g. 0.1")
    sized = plan.remade(rows_per_head=tuple(o["rows_per_head"] for o in summary["orders"]))
    return sized, summary


def resolve_rows_option(rows_per_head: str | None, target: float | None, *, plan_only: bool = False):
    """build-table's `--rows-per-head`/`--target`: (rows per head or AUTO, target or None).

    `auto` needs a `--target` (no default: the rate that suits a corpus is the user's
    call; docs/build-table.md shows what each picks on the fixture corpus) and must count
    before it can plan, so `--plan-only` with it is refused (saying what to do
    instead); `--target` without `auto` is refused rather than ignored.
    """
    rows = parse_rows_per_head(rows_per_head)
    if rows != AUTO:
        if target is not None:
            raise PlanError("--target sizes the heads only with --rows-per-head auto; add --rows-per-head auto or drop --target")
        return (DEFAULT_ROWS_PER_HEAD if rows is None else rows), None
    if target is None:
        raise PlanError("--rows-per-head auto needs --target RATE: the per-head token-weighted collision rate to reach, as `engram collisions --target` reports it (e.g. 0.3 shrinks the reference plan on a few MB of text, 0.05 grows it)")
    target = check_target_rate(target)
    if plan_only:
        raise PlanError("--rows-per-head auto sizes the heads from the counted n-grams, so there is no plan before counting; drop --plan-only (the plan is printed after counting, before any table is written) or give --rows-per-head numbers")
    return AUTO, target


def reference_rates(plan: TablePlan, stats) -> dict[int, float]:
    """Per order, the `collisions --target` metric of `plan` (worst layer): what a target is compared with."""
    out: dict[int, float] = {}
    for layer in plan.layer_ids:
        for n in plan.orders:
            keys = load_order_keys(plan, stats, layer, n, HashFamily.REFERENCE, heads=plan.heads)
            out[n] = max(out.get(n, 0.0), token_weighted_rate(keys, plan.primes[layer][n - 2]))
            del keys
    return out


def compare_targets(stats, base: TablePlan, targets) -> list[dict]:
    """What `--rows-per-head auto` picks for each target, against `base` (docs/build-table.md, Sizing)."""
    rows = []
    for t in targets:
        sized, _ = size_plan_to_target(base, stats, t)
        rows.append({"target": t, "rows_per_head": list(sized.rows_per_head), "total_bytes": sized.total_bytes, "ratio_to_base": sized.total_bytes / base.total_bytes})
    return rows
