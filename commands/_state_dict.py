"""Rendering of `engram eval --state-dict` (the audit of a plain state dict without a model)."""

from __future__ import annotations

from engram_cli.commands._output import console, print_json, progress_reporter

from engram_cli.defaults import DEFAULT_STORE
from engram_cli.errors import CheckpointError
from engram_cli.statedict_audit import audit_state_dict
from engram_cli.store.output import read_locks


def _share(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def render(report: dict) -> None:
    text = report["text"]
    if text["source"] == "corpus":
        src = f"{text['tokens']:,} tokens of {text['path']}"
    else:
        src = "the store's hit counts (the build corpus)" if text["source"] == "store hits" else "no text (the store has no hit counts)"
    console.print(f"[bold]{report['state_dict']}[/] ({report['file_format']}) against {report['tables']} "
                  f"(plan {report['plan_fingerprint'][:12]}{', fingerprint checked' if report['fingerprint_checked'] else ''}); usage from {src}")
    if report["layers_missing"]:
        console.print(f"  no table for plan layer(s) {report['layers_missing']}")
    for l, lay in report["layers"].items():
        m = lay["module"]
        mod = "table only" if m is None else f"hidden {m['hidden_size']}, hc_mult {m['hc_mult']}, conv kernel {m['conv_kernel']}, {m['tensors']} tensors"
        console.print(f"[bold]layer {l}[/]: {lay['key']} {lay['dtype']} ({lay['rows']:,} x {lay['head_dim']}); {mod}", markup=True)
        n = lay["row_norms"]
        console.print(f"  row norms min/p10/p50/p90/max {n['min']:.4g}/{n['p10']:.4g}/{n['p50']:.4g}/{n['p90']:.4g}/{n['max']:.4g}, mean {n['mean']:.4g}, "
                      f"zero rows {n['zero_rows']:,}; rows that differ from the store's: {lay['rows_changed']:,}")
        u = lay["usage"]
        if u is not None:
            console.print(f"  rows touched {u['rows_touched']:,} ({_share(u['rows_touched_share'])}) by {u['lookups']:,} lookups; "
                          f"lookups on zero rows {_share(u['lookups_on_zero_rows'])}, on rows equal to the store's {_share(u['lookups_on_unchanged_rows'])}")
        for name, p in lay["parity"].items():
            console.print(f"  backend {name}: bit-exact vs torch reference {p['bit_exact']}, {p['tokens_per_s'] or 0:,.0f} tokens/s")
        for name, b in lay["lookups"]["backends"].items():
            console.print(f"  lookups {name}: {b['gb_per_s'] or 0:.2f} GB/s of rows read")
        if lay["lookups"]["cache_hit_rate"]:
            console.print("  hot-row cache hit rate: " + ", ".join(f"{k} capacity {v:.1%}" for k, v in lay["lookups"]["cache_hit_rate"].items()))


def run(state_dict, checkpoints, tables, corpus, as_json: bool, tokenizer_engine: str = "hf") -> None:
    """`engram eval --state-dict FILE`: refuse checkpoints beside it, audit, render."""

    if checkpoints:
        raise CheckpointError(f"--state-dict audits a state dict without a model; drop the checkpoint argument(s) {[str(c) for c in checkpoints]}")
    with progress_reporter(quiet=as_json) as progress, read_locks():  # the store is not replaced while it is audited
        report = audit_state_dict(state_dict, tables or DEFAULT_STORE, corpus=corpus, tokenizer_engine=tokenizer_engine, progress=progress)
    if as_json:
        print_json(report)
    else:
        render(report)
