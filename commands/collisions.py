"""`engram collisions`: audit hash collisions per head and order of a table store's plan."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer
from engram_cli.commands._output import (
    console,
    json_option,
    ngram_text,
    notice,
    print_json,
    progress_reporter,
)
from rich.table import Table

from engram_cli.audit import (
    DEFAULT_FAMILIES,
    TOP_BUCKETS,
    audit_collisions,
    check_plot_support,
    parse_sweep,
    plot_sweep,
    validate_audit,
    what_if_plan,
)
from engram_cli.audit.partitioned import audit_collisions_distributed
from engram_cli.audit.saturation import saturation_verdict
from engram_cli.defaults import DEFAULT_STORE
from engram_cli.errors import PlanError, StoreError
from engram_cli.execution.ray import check_cluster_options
from engram_cli.kinds import HashFamily
from engram_cli.plan import check_rows_or_budget, check_target_rate, parse_budget
from engram_cli.store import TableStore
from engram_cli.store.output import reading
from engram_cli.units import format_bytes, parse_int_list

SWEEP_AXES = ("heads=", "rows=")
MEMBERS_SHOWN = 4


def _pct(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x and abs(x) < 1e-4:  # still a percentage, never an exponent: two significant figures, 0.00042%
        return f"{x * 100:.{1 - math.floor(math.log10(abs(x) * 100))}f}%"
    return f"{x:.2%}"


def _split_arguments(args: List[str], sweep: List[str]) -> tuple[str, List[str]]:
    """The store path, and sweep axes typed after `--sweep` without repeating the flag."""
    paths = [a for a in args if not a.lower().startswith(SWEEP_AXES)]
    extra = [a for a in args if a.lower().startswith(SWEEP_AXES)]
    if extra and not sweep:
        raise PlanError(f"{extra[0]!r} is a sweep axis; write it after --sweep, e.g. --sweep heads=1,2,4,8 rows=0.5x,1x,2x")
    if len(paths) > 1:
        raise PlanError(f"give one table store, got {len(paths)}: {', '.join(paths)}")
    return (paths[0] if paths else DEFAULT_STORE), [*sweep, *extra]


WORST_PARTNER_SENTENCE = (
    "  worst partner: for each n-gram, the other n-gram that shares its bucket in the most heads; "
    "'s:c' = c n-grams share s of the {heads} heads with it (0 = a head of their own in every head, "
    "{heads} = indistinguishable from it)."
)


def summary_rows(report: dict) -> list[dict]:
    """One row per audited hash family, layer and order: the figures the summary prints (means over heads from the audit)."""
    return [
        {
            "family": a["family"],
            "layer": a["layer"],
            "order": a["order"],
            "distinct": a["distinct"],
            "shared_observed": a["mean"]["shared_observed"],
            "shared_ideal": a["mean"]["shared_ideal"],
            "clean_head": a["across"]["clean_head"]["distinct"],
            "token_weighted": a["mean"]["token_weighted"],
        }
        for a in report["audit"]
    ]


def render_summary(report: dict) -> None:
    """The short summary: one line per layer and order (mean over heads)."""
    t = Table(title="summary (mean over heads)", title_justify="left")
    for col in ("hash", "layer", "order", "n-grams", "shared", "ideal", "clean head", "tok rate"):
        t.add_column(col, justify="right")
    for r in summary_rows(report):
        t.add_row(r["family"], str(r["layer"]), str(r["order"]), f"{r['distinct']:,}", _pct(r["shared_observed"]), _pct(r["shared_ideal"]), _pct(r["clean_head"]), _pct(r["token_weighted"]))
    console.print(t)
    console.print("  shared: share of n-grams whose bucket holds another n-gram (ideal: a uniform hash); clean head: share of n-grams")
    console.print("  alone in their bucket in at least one head; tok rate: share of occurrences whose bucket holds another n-gram.")


def render(report: dict, details: bool = False) -> None:
    plan = report["plan"]
    console.print(f"[bold]{report['store']}[/]  " + ("[yellow]what-if plan[/] " if report["what_if"] else "stored plan ") + f"K={plan['heads']} heads, rows/head {plan['rows_per_head']}, {format_bytes(plan['total_bytes'])} ({plan['dtype']})")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    console.print("n-grams: " + ", ".join(f"order {n}: {o['distinct']:,} distinct / {o['occurrences']:,} occurrences" for n, o in report["orders"].items()))
    render_summary(report)
    if not details:
        console.print("Per-head tables, the worst-partner histogram and the family distance: add --details.")
    for a in report["audit"] if details else ():
        t = Table(title=f"{a['family']} hash, layer {a['layer']}, order {a['order']}: m = {a['distinct']:,} distinct n-grams; shared = share of them in a shared bucket (ideal: uniform hash); tok rate = share of occurrences", title_justify="left")
        for col in ("head", "p", "m/p", "shared", "ideal", "excess", "tok rate", "shadowed", "max"):
            t.add_column(col, justify="right")
        for h in a["heads"]:
            t.add_row(str(h["head"]), f"{h['p']:,}", f"{h['load']:.3g}", _pct(h["shared_observed"]), _pct(h["shared_ideal"]), f"{h['shared_excess']:+.3%}", _pct(h["token_weighted"]), _pct(h["shadowed"]), str(h["max_occupancy"]))
        console.print(t)
        x = a["across"]
        console.print(
            f"  across heads: indistinguishable {_pct(x['indistinguishable']['distinct'])} of n-grams / {_pct(x['indistinguishable']['weighted'])} of tokens "
            f"(ideal {_pct(x['indistinguishable_ideal'])}); clean head {_pct(x['clean_head']['distinct'])} / {_pct(x['clean_head']['weighted'])} "
            f"(ideal {_pct(x['clean_head_ideal'])})"
            + (f"; identical 64-bit mixes: {x['mix_duplicates']:,}" if x["mix_duplicates"] is not None else "")
        )
        hist = x["worst_partner_heads"]["distinct"]
        console.print("  heads shared with the worst partner: " + "  ".join(f"{s}:{c:,}" for s, c in enumerate(hist)))
        console.print(WORST_PARTNER_SENTENCE.format(heads=len(hist) - 1))
    fd = Table(title="distance from the ideal hash (mean over heads)", title_justify="left")
    for col in ("family", "heads", "shared obs - ideal", "max |obs - ideal|", "relative", "token-weighted - ideal"):
        fd.add_column(col, justify="right")
    for fam, d in report["family_distance"].items():
        fd.add_row(fam, str(d["heads"]), f"{d['shared_excess_mean']:+.4%}", f"{d['shared_excess_max_abs']:.4%}", f"{d['shared_excess_relative_mean']:+.3%}", f"{d['token_weighted_excess_mean']:+.4%}")
    if details:
        console.print(fd)
    for a in report["audit"]:
        if a["family"] != report["families"][0] or not a["worst_buckets"]:
            continue
        wb = Table(title=f"worst buckets, layer {a['layer']} order {a['order']} (most shadowed occurrences)", title_justify="left")
        for col in ("head", "bucket", "n-grams", "occurrences", "shadowed"):
            wb.add_column(col, justify="right")
        wb.add_column("members (text × count)")
        for b in a["worst_buckets"]:
            shown = "  ".join(f"{ngram_text(m['text']) if m['text'] is not None else m['ids']}×{m['count']:,}" for m in b["members"][:MEMBERS_SHOWN])
            if b["n_grams"] > MEMBERS_SHOWN:
                shown += f"  … +{b['n_grams'] - MEMBERS_SHOWN}"
            wb.add_row(str(b["head"]), f"{b['bucket']:,}", str(b["n_grams"]), f"{b['occurrences']:,}", f"{b['shadowed']:,}", shown)
        console.print(wb)
    if report["sizing"]:
        s = report["sizing"]
        st = Table(title=f"rows per head for a token-weighted rate <= {s['target']:.2%} ({s['family']} hash)", title_justify="left")
        for col in ("order", "rows/head", "ideal-hash rows", "rate reached", "bytes (order)"):
            st.add_column(col, justify="right")
        for o in s["orders"]:
            rates = [r["rate"] for r in o["per_layer"] if r["rate"] is not None]
            st.add_row(str(o["order"]), f"{o['rows_per_head']:,}" if o["reachable"] else "unreachable", f"{max(r['ideal_rows'] for r in o['per_layer']):,}", _pct(max(rates) if rates else None), format_bytes(o["bytes"]) if o["bytes"] else "-")
        console.print(st)
        if s["total_bytes"]:
            console.print(f"  sized plan: {format_bytes(s['total_bytes'])} (now {format_bytes(s['current_total_bytes'])})")
    if report["sweep"]:
        sw = report["sweep"]
        for fam in report["families"]:
            g = Table(title=f"sweep ({fam} hash): token-weighted rate / all-heads share of tokens / bytes", title_justify="left")
            g.add_column("heads", justify="right")
            for r in sw["rows"]:
                g.add_column(f"rows {r}", justify="right")
            for K in sw["heads"]:
                cells = {c["rows"]: c for c in sw["grid"] if c["family"] == fam and c["heads"] == K}
                g.add_row(str(K), *(f"{_pct(cells[r]['token_weighted'])} / {_pct(cells[r]['all_heads_weighted'])} / {format_bytes(cells[r]['bytes'])}" for r in sw["rows"]))
            console.print(g)
    if report.get("plot"):
        notice(f"Wrote {report['plot']}.")


def collisions_command(
    args: Optional[List[str]] = typer.Argument(None, metavar="[STORE]", help=f"The table store written by `engram build-table` (default {DEFAULT_STORE})."),
    heads: Optional[int] = typer.Option(None, "--heads", help="What-if: audit this many heads per order instead of the stored plan's.", show_default="the stored plan's"),
    rows_per_head: Optional[str] = typer.Option(None, "--rows-per-head", help="What-if: rows per head, one value or one per order (comma list).", show_default="the stored plan's"),
    budget: Optional[str] = typer.Option(None, "--budget", help="What-if: fit rows per head to a budget: bytes (2GiB, 800MB) or parameters (500M).", show_default="none"),
    layers: Optional[str] = typer.Option(None, "--layers", help="Audit only these layers of the plan (comma list, e.g. 1,15).", show_default="all"),
    hash_family: str = typer.Option(",".join(DEFAULT_FAMILIES), "--hash", help=f"Hash family to audit: {', '.join(HashFamily)}, or reference,xxh3 for both."),
    target: Optional[float] = typer.Option(None, "--target", help="Find the rows per head that bring the token-weighted collision rate to this rate (e.g. 0.05).", show_default="none"),
    sweep: Optional[List[str]] = typer.Option(None, "--sweep", help="Grid of what-if plans: heads=1,2,4,8 rows=0.25x,0.5x,1x,2x (rows: multiples of the plan's or absolute).", show_default="none"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the --sweep grid to FILE.png (needs matplotlib: pip install 'engram-cli[plot]').", dir_okay=False, show_default="none"),
    top: int = typer.Option(TOP_BUCKETS, "--top", help="Worst buckets listed per layer and order."),
    details: bool = typer.Option(False, "--details", help="Show the per-head tables, the worst-partner histogram and the distance from the ideal hash after the summary."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Audit on Ray, one task per layer: local[:N], auto or ray://HOST:PORT (the store on storage every worker sees). Needs engram-cli[ray].", show_default="one process"),
    as_json: bool = json_option(),
) -> None:
    """Audit hash collisions per layer, order and head, against an ideal hash.

    Reads the plan and n-gram statistics that `engram build-table` stored; --heads,
    --rows-per-head or --budget audit a what-if plan over the same statistics without
    writing anything.

    Example:

        engram collisions                                    # ./tables.zarr
        engram collisions tables.zarr --heads 8 --hash reference,xxh3
        engram collisions --target 0.05 --sweep heads=1,2,4,8 rows=0.5x,1x,2x --plot sweep.png
        engram collisions /shared/tables.zarr --cluster auto  # one Ray task per layer
    """
    store_path, sweep_specs = _split_arguments(list(args or []), list(sweep or []))
    check_rows_or_budget(rows_per_head, budget)
    if plot is not None and not sweep_specs:
        raise PlanError("--plot draws the --sweep grid; add --sweep, e.g. --sweep heads=1,2,4,8 rows=0.5x,1x,2x")
    families = HashFamily.parse_many(hash_family)
    rows = tuple(parse_int_list(rows_per_head, what="--rows-per-head")) if rows_per_head is not None else None
    parsed_budget = parse_budget(budget) if budget is not None else None
    layer_ids = parse_int_list(layers, what="--layers") if layers is not None else None
    if target is not None:
        check_target_rate(target)
    if plot is not None:
        check_plot_support(plot)
    cluster_spec = check_cluster_options(cluster)

    with reading(store_path):  # the store is not replaced while its statistics are read
        store = TableStore.open(store_path)
        stored = store.plan
        stats = store.stats
        plan, notes = what_if_plan(stored, heads=heads, rows_per_head=rows, budget=parsed_budget)
        spec = parse_sweep(sweep_specs, plan) if sweep_specs else None
        validate_audit(plan, stats, layers=layer_ids, target=target, top=top)
        try:
            keys = store.vocab.keys
        except StoreError:  # decoding is a nicety: ids are shown when the vocabulary is unreadable
            keys = None
        with progress_reporter(quiet=as_json) as progress:
            if cluster_spec is not None:
                report = audit_collisions_distributed(store_path, plan, cluster=cluster_spec, families=families, layers=layer_ids, target=target, sweep=spec, top=top, progress=progress)
            else:
                report = audit_collisions(plan, stats, families=families, layers=layer_ids, target=target, sweep=spec, vocab_keys=keys, top=top, progress=progress)
    verdict = saturation_verdict(stored, {n: stats.distinct(n) for n in stored.orders})  # the stored plan's, as build-table and inspect give it
    report = {"store": str(store_path), "what_if": plan is not stored, "saturation": verdict, "stored_plan": None if plan is stored else {"heads": stored.heads, "rows_per_head": list(stored.rows_per_head), "dim": stored.dim, "total_bytes": stored.total_bytes}, "notes": notes, **report}
    if plot is not None:
        plot_sweep(report["sweep"], plot)
        report["plot"] = str(plot)
    if as_json:
        print_json(report)
    else:
        render(report, details=details)
        if verdict["notice"]:  # part of the audit: on stdout with the report
            console.print(verdict["notice"], markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("collisions")(collisions_command)
