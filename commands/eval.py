"""`engram eval`: held-out loss with and without Engram memory, gate, table usage and lookups."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from engram_cli.defaults import DEFAULT_CHECKPOINT
from engram_cli.evaluate import evaluate_checkpoint

from ._output import console, json_option, print_json, progress_reporter


def _f(x, fmt=".4f"):
    return "-" if x is None else format(x, fmt)


def render(reports: list[dict]) -> None:
    t = Table(title="held-out cross-entropy (nats/token)", title_justify="left")
    for col in ("checkpoint", "engram", "steps", "tokens", "loss", "ppl", "loss, memory ablated", "ppl ablated", "memory gain"):
        t.add_column(col, justify="right")
    for r in reports:
        t.add_row(r["checkpoint"], "yes" if r["engram"] else "no", str(r["steps"]), f"{r['tokens']:,}", _f(r["loss"]), _f(r["perplexity"], ".2f"),
                  _f(r["loss_memory_ablated"]), _f(r["perplexity_memory_ablated"], ".2f"), _f(r["memory_gain"], "+.4f"))
    console.print(t)
    for r in reports:
        for l, lay in r["layers"].items():
            console.print(f"[bold]{r['checkpoint']} layer {l}[/]: mean gate {lay['gate_mean']:.3f}"
                          + (f", clean head {_f(lay.get('gate_clean_head'), '.3f')} vs all heads collide {_f(lay.get('gate_all_heads_collide'), '.3f')}" if "gate_clean_head" in lay else ""))
            if lay.get("gate_by_frequency_decile"):
                console.print("  gate by n-gram frequency decile (1 = rarest): " + "  ".join(f"{d['decile']}:{_f(d['gate_mean'], '.3f')}" for d in lay["gate_by_frequency_decile"]))
            u = lay["usage"]
            console.print(f"  rows touched by held-out text {u['rows_touched_heldout']:,} of {u['rows']:,}; trained rows {u['rows_trained']:,}; "
                          f"held-out lookups on never-trained rows {u['lookups_on_untrained_rows']:.1%}")
            n = lay["row_norms"]
            console.print("  row norms p10/p50/p90: " + "; ".join(f"{k} " + ("-" if v is None else "/".join(f"{x:.3f}" for x in v.values())) for k, v in n.items()))
            for name, b in lay["lookups"]["backends"].items():
                console.print(f"  lookups {name}: {b['lookups_per_s']:,.0f} rows/s, {b['gb_per_s']:.2f} GB/s, bit-exact {b['bit_exact']}")
            if lay["lookups"]["cache_hit_rate"]:
                console.print("  hot-row cache hit rate: " + ", ".join(f"{k} capacity {v:.1%}" for k, v in lay["lookups"]["cache_hit_rate"].items()))


def eval_command(
    checkpoints: Optional[List[Path]] = typer.Argument(None, metavar="[MODEL.ckpt ...]", help=f"Checkpoints from `engram train` (default {DEFAULT_CHECKPOINT}); two or more are shown side by side."),
    tables: Optional[Path] = typer.Option(None, "--tables", help="Table store to use instead of the checkpoint's trained one."),
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="Held-out text to score (default: the checkpoint's held-out split of its corpus)."),
    as_json: bool = json_option(),
    state_dict: Optional[Path] = typer.Option(None, "--state-dict", help="Audit a plain state dict (reference layout) against --tables (default tables.zarr) without a model; docs/eval.md."),
) -> None:
    """Evaluate checkpoints on held-out text (report fields in docs/eval.md).

    Example:

        engram eval                               # ./model.ckpt on its held-out split
        engram eval model.ckpt base.ckpt --json   # side by side
        engram eval --state-dict engram.pt --tables tables.zarr   # no model: tables only
    """
    if state_dict is not None:
        from ._state_dict import run

        return run(state_dict, checkpoints, tables, corpus, as_json)
    paths = checkpoints or [Path(DEFAULT_CHECKPOINT)]
    with progress_reporter(quiet=as_json) as progress:
        reports = [evaluate_checkpoint(p, tables=tables, corpus=corpus, progress=progress) for p in paths]
    if as_json:
        print_json({"checkpoints": reports})
    else:
        render(reports)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
