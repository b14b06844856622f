"""Rendering of `engram eval --variants` (the quality gate of quantized and pruned tables, engram_cli/variants.py)."""

from __future__ import annotations

from engram_cli.commands._output import console, notice, print_json, progress_reporter
from rich.table import Table

from engram_cli.audit.plot import check_plot_support
from engram_cli.variants import gate_report, plot_gate


def _iv(iv, fmt) -> str:
    return f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]"


def render(r: dict) -> None:
    t = Table(title=f"{r['checkpoint']}: table variants on the same weights, {r['windows']:,} held-out windows ({r['tokens']:,} tokens); "
                    f"change = variant - trained ({r['trained_dtype']}), 95 % paired bootstrap; prune by {r['prune_by']}", title_justify="left")
    backends = list(dict.fromkeys(b for v in r["variants"] for b in (v.get("lookups") or {}).get("backends", {})))
    for col in ("variant", "rows stored", "bytes/row", "table bytes", "loss", "95% interval", "change", "95% interval", *(f"{b} tok/s" for b in backends), "bit-exact"):
        t.add_column(col, justify="right")
    for v in r["variants"]:
        lk = v.get("lookups") or {}
        speeds = [f"{lk['backends'][b]['tokens_per_s']:,.0f}" if b in lk.get("backends", {}) else "-" for b in backends]
        exact = "-" if not lk else ("yes" if lk["torch_matches_reference"] and all(x["bit_exact"] for x in lk["backends"].values()) else "NO")
        t.add_row(v["variant"], f"{v['rows_stored']:,}", f"{v['bytes_per_logical_row']:.1f}", f"{v['table_bytes']:,}", f"{v['loss']:.4f}",
                  _iv(v["loss_interval"], ".4f"), f"{v['loss_change']:+.4f}", _iv(v["loss_change_interval"], "+.4f"), *speeds, exact)
    console.print(t)
    console.print("bytes/row: stored bytes per row of the plan (pruned: kept rows and their 8-byte row ids over all rows); "
                  "tok/s: held-out ids -> float32 rows on one layer (noisy on a shared machine); bit-exact: every backend equals torch, and torch the numpy dequantization")


def run(checkpoint, variants: str, corpus, as_json: bool, tokenizer_engine, plot) -> None:
    if plot is not None:
        check_plot_support(plot)
    with progress_reporter(quiet=as_json) as progress:
        report = gate_report(checkpoint, variants, corpus=corpus, tokenizer_engine=tokenizer_engine, progress=progress)
    if plot is not None:
        plot_gate(report, plot)
    if as_json:
        print_json(report)
    else:
        render(report)
    if plot is not None:
        notice(f"wrote {plot}")
