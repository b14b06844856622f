"""`engram eval`: held-out loss with and without Engram memory, gate, table usage and lookups."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from engram_cli.commands._output import (
    console,
    json_option,
    print_json,
    progress_reporter,
)
from engram_cli.commands._state_dict import run as run_state_dict
from engram_cli.commands._variants import run as run_variants
from rich.table import Table

from engram_cli.defaults import DEFAULT_CHECKPOINT
from engram_cli.errors import EngramError
from engram_cli.evaluate import evaluate_windows
from engram_cli.intervals import compare
from engram_cli.kinds import TokenizerEngine
from engram_cli.store.output import read_locks


def _f(x, fmt=".4f"):
    return "-" if x is None else format(x, fmt)


def _norms(q) -> str:
    return "-" if q is None else f"p10 {q['p10']:.3f} / p50 {q['p50']:.3f} / p90 {q['p90']:.3f} ({q['rows']:,} rows)"


def _count_label(b: dict) -> str:
    return f"{b['min_count']:,}" if b["max_count"] == b["min_count"] else f"{b['min_count']:,}-{b['max_count']:,}"


def render_buckets(what: str, col: str, by_order: dict, label) -> None:
    """One table: a row per bucket, per order its positions, mean gate and mean loss change (branch skipped - full)."""
    t = Table(title=f"gate and dloss (branch skipped - full, nats) {what}", title_justify="left")
    t.add_column(col, justify="right")
    for n in by_order:
        for c in ("positions", "gate", "dloss"):
            t.add_column(f"{n}-gram {c}", justify="right")
    labels = []
    for buckets in by_order.values():
        labels += [label(b) for b in buckets if label(b) not in labels]
    for lab in labels:
        cells = [lab]
        for buckets in by_order.values():
            b = next((b for b in buckets if label(b) == lab), None)
            cells += ["-", "-", "-"] if b is None else [f"{b['positions']:,}", _f(b["gate_mean"], ".3f"), _f(b["loss_change"], "+.3f")]
        t.add_row(*cells)
    console.print(t)


def render_layer(name: str, l: str, lay: dict) -> None:
    console.print(f"[bold]{name}, Engram layer {l}[/]: mean gate {lay['gate_mean']:.3f}")
    ts = lay.get("training_split")
    if ts:
        render_buckets("by training count of the n-gram (0 = never seen in training)", "count", ts["by_training_count"], _count_label)
        render_buckets("by share of their row's training hits (the n-gram's count / its row's hits, best head)", "share", ts["by_row_share"], lambda b: b["share"])
        console.print("  hot-row cache hit rate by training hits: " + ", ".join(f"{v:.1%} at {k} capacity" for k, v in ts["cache_hit_rate"].items()))
    else:
        console.print("  no training statistics beside this checkpoint (NAME.train-stats/, written by `engram train` since the pinned split): "
                      "no frequency, row-share or cache figures")
    u = lay["usage"]
    console.print(f"  table usage: held-out text touches {u['rows_touched_heldout']:,} of {u['rows']:,} rows; training updated {u['rows_trained']:,}; "
                  f"{u['lookups_on_untrained_rows']:.1%} of {u['lookups']:,} held-out lookups land on rows never updated in training")
    n = lay["row_norms"]
    where = f"{n['chunks_read']} of {n['chunks']} chunks" if n["sampled"] else "all rows"
    console.print(f"  row norms ({where}): trained {_norms(n['trained'])}; untouched {_norms(n['untouched'])}")
    lk = lay["lookups"]
    for b, v in lk["backends"].items():
        console.print(f"  lookups {b}: {v['tokens_per_s']:,.0f} tokens/s, {v['gb_per_s']:.3f} GB/s, bit-exact vs torch {'yes' if v['bit_exact'] else 'NO'}"
                      f"  ({lk['device']}, table {lk['table']})")


def _iv(iv, fmt=".4f") -> str:
    return "-" if iv is None else f"[{iv[0]:{fmt}}, {iv[1]:{fmt}}]"


def render_ablations(r: dict) -> None:
    console.print(f"[bold]{r['checkpoint']}[/]: table ablations on the same weights")
    t = Table(title=f"delta = ablated - full loss; 95 % paired bootstrap over {r['windows']:,} windows", title_justify="left")
    for col in ("ablation", "loss", "delta", "95% interval"):
        t.add_column(col, justify="right")
    t.add_row("none (full model)", _f(r["loss"]), "-", _iv(r["loss_interval"]))
    for k, a in r["ablations"].items():
        if a is None:
            t.add_row(k, "-", "-", "(initial store gone)")
        else:
            t.add_row(k, _f(a["loss"]), _f(a["delta"], "+.4f"), _iv(a["interval"], "+.4f"))
    console.print(t)


def render(reports: list[dict]) -> None:
    t = Table(title="held-out cross-entropy (nats/token)", title_justify="left")
    for col in ("checkpoint", "engram", "seed", "steps", "tokens", "loss", "95% interval", "ppl", "loss, memory ablated", "ppl ablated", "memory gain"):
        t.add_column(col, justify="right")
    for r in reports:
        t.add_row(r["checkpoint"], "yes" if r["engram"] else "no", str(r.get("seed")), str(r["steps"]), f"{r['tokens']:,}", _f(r["loss"]), _iv(r["loss_interval"]),
                  _f(r["perplexity"], ".2f"), _f(r["loss_memory_ablated"]), _f(r["perplexity_memory_ablated"], ".2f"), _f(r["memory_gain"], "+.4f"))
    console.print(t)
    for r in reports:
        if r["ablations"]:
            render_ablations(r)
    for r in reports:
        for l, lay in r["layers"].items():
            render_layer(r["checkpoint"], l, lay)


def render_comparison(c: dict) -> None:
    for p in c["paired"]:
        if p["same_windows"]:
            console.print(f"paired: {p['b']} - {p['a']}: loss {p['delta']:+.4f} nats/token, 95 % interval {_iv(p['interval'], '+.4f')} (same held-out windows)")
        else:
            console.print(f"paired: {p['b']} vs {p['a']}: not comparable (different held-out windows)")
    for g in c["seed_groups"]:
        l, m = g["loss"], g["memory_gain"]
        console.print(f"seeds {', '.join(map(str, g['seeds']))} ({len(g['checkpoints'])} checkpoints, same config): loss mean {l['mean']:.4f}, "
                      f"std {_f(l['std'])}, range {l['min']:.4f}-{l['max']:.4f}; memory gain mean {m['mean']:+.4f}, std {_f(m['std'])}")


def eval_command(
    checkpoints: Optional[List[Path]] = typer.Argument(None, metavar="[MODEL.ckpt ...]", help=f"Checkpoints from `engram train` (default {DEFAULT_CHECKPOINT}); two or more are shown side by side."),
    tables: Optional[Path] = typer.Option(None, "--tables", help="Table store to use instead of the checkpoint's trained one."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Held-out text to score (default: the checkpoint's held-out split of its corpus)."),
    as_json: bool = json_option(),
    state_dict: Optional[Path] = typer.Option(None, "--state-dict", help="Audit a plain state dict (reference layout) against --tables (default tables.zarr) without a model; docs/eval.md."),
    variants: Optional[str] = typer.Option(None, "--variants", help="Gate smaller tables: score the checkpoint with each variant of its trained table, e.g. float32,bf16,fp8,int8,int4,prune:0.5,prune:0.1 (docs/quantize.md)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --variants: draw loss change against bytes per row (log x) to this image file."),
    tokenizer_engine: str = typer.Option(TokenizerEngine.AUTO.value, "--tokenizer-engine", callback=TokenizerEngine.option_callback, help="The library that tokenizes the held-out text: auto (fastokens where it loads the tokenizer, else tokenizers), fastokens, or hf (Hugging Face tokenizers, the reference); the ids are the same."),
) -> None:
    """Evaluate checkpoints on held-out text (report fields in docs/eval.md).

    Example:

        engram eval                               # ./model.ckpt on its held-out split
        engram eval model.ckpt base.ckpt --json   # side by side
        engram eval --state-dict engram.pt --tables tables.zarr   # no model: tables only
        engram eval model.ckpt --tables int8.zarr          # a quantized or pruned copy in place of its own
        engram eval model.ckpt --variants int8,int4,prune:0.1 --plot gate.png
    """
    if state_dict is not None:
        return run_state_dict(state_dict, checkpoints, tables, corpus, as_json, tokenizer_engine)
    paths = checkpoints or [Path(DEFAULT_CHECKPOINT)]
    if variants is not None:
        if len(paths) != 1 or tables is not None:
            raise EngramError("--variants gates one checkpoint's own trained table: pass one MODEL.ckpt and no --tables")
        with read_locks():
            return run_variants(paths[0], variants, corpus, as_json, tokenizer_engine, plot)
    if plot is not None:
        raise EngramError("--plot draws the --variants table; pass --variants too")
    with progress_reporter(quiet=as_json) as progress, read_locks():  # no store it reads is replaced meanwhile
        scored = [evaluate_windows(p, tables=tables, corpus=corpus, tokenizer_engine=tokenizer_engine, progress=progress) for p in paths]
    reports = [r for r, _ in scored]
    comparison = compare(reports, [w for _, w in scored])
    if as_json:
        print_json({"checkpoints": reports, **comparison})
    else:
        render(reports)
        render_comparison(comparison)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
