"""`engram sweep memory|allocation`: train and evaluate one point per table size (or per rho) and seed; table, JSON and plot."""

from __future__ import annotations

from pathlib import Path

import typer
from engram_cli.commands._output import (
    console,
    json_option,
    notice,
    print_json,
    progress_reporter,
)
from rich.table import Table

from engram_cli.errors import EngramError
from engram_cli.kinds import TokenizerEngine
from engram_cli.sweep import allocation as alloc_defaults
from engram_cli.sweep import memory as mem_defaults
from engram_cli.sweep.allocation import run_allocation_sweep
from engram_cli.sweep.memory import SweepOptions, run_memory_sweep
from engram_cli.sweep.summary import fmt_params
from engram_cli.train import DEFAULT_CORPUS
from engram_cli.units import format_bytes, parse_int_list

sweep_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="rich", context_settings={"show_default": True})

_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_counts(text: str, *, what: str) -> list[int]:
    """`256,4k,64k` -> [256, 4096, 65536] (k, M, G: binary multiples)."""
    out = []
    for v in str(text).replace(" ", "").split(","):
        if not v:
            continue
        mult = _SUFFIX.get(v[-1].lower(), 1)
        try:
            out.append(int(float(v[:-1] if mult > 1 else v) * mult))
        except ValueError:
            raise EngramError(f"cannot read {what} {text!r}; give comma-separated counts, e.g. 256,4k,64k") from None
    if not out:
        raise EngramError(f"{what} is empty; give comma-separated counts, e.g. 256,4k,64k")
    return out


def parse_floats(text: str, *, what: str) -> list[float]:
    try:
        out = [float(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise EngramError(f"cannot read {what} {text!r}; give comma-separated numbers, e.g. 0.4,0.6,0.8,1.0") from None
    if not out:
        raise EngramError(f"{what} is empty; give comma-separated numbers, e.g. 0.4,0.6,0.8,1.0")
    return out


def _f(x, fmt=".4f") -> str:
    return "-" if x is None else format(x, fmt)


def render_groups(result: dict, title: str, extra_cols=()) -> None:
    t = Table(title=title, title_justify="left")
    cols = ("point", *[c for c, _ in extra_cols], "table params", "table bytes", "loss (mean)", "std", "range", "ablated loss", "shuffled rows d", "hit rate", "collision rate", "wall/seed")
    for c in cols:
        t.add_column(c, justify="right")
    for g in result["groups"]:
        l, a = g["loss"], g["loss_memory_ablated"]
        t.add_row(g["label"], *[fn(g) for _, fn in extra_cols], fmt_params(g["table_params"]), format_bytes(g["table_bytes"]) if g["table_bytes"] else "0",
                  _f(l["mean"]), _f(l["std"]), f"{l['min']:.4f}-{l['max']:.4f}", _f(a["mean"]) if g["engram"] else "-",
                  _f(g["ablation_delta"].get("shuffled_rows"), "+.4f") if g["engram"] else "-",
                  _f(g["hit_rate"], ".1%"), _f(g["collision_rate"], ".1%"), f"{g['seconds']:.0f} s")
    console.print(t)


def _tail(result: dict, name: str) -> None:
    where = result["plot"] or "no plot (matplotlib not installed: pip install 'engram-cli[plot]')"
    console.print(f"{len(result['points'])} points, {result['seconds']:.0f} s this run; {Path(result['out']) / name}; {where}")


def _opts(steps, seeds, dim, layers, engram_layers, heads, table_dim, tokenizer) -> SweepOptions:
    return SweepOptions(steps=steps, seeds=seeds, d_model=dim, n_layer=layers, engram_layers=tuple(parse_int_list(engram_layers, what="--engram-layers")),
                        heads=heads, table_dim=table_dim, tokenizer=tokenizer)


_CORPUS = typer.Argument(Path(DEFAULT_CORPUS), help=f"Corpus folder or files (default {DEFAULT_CORPUS}/).")


def _common(default_steps: int):
    """The options both sweeps share (steps, seeds, backbone, table layout, output)."""
    return {
        "out": typer.Option(Path(mem_defaults.DEFAULT_OUT), "-o", "--out", help="Folder of the sweep: one checkpoint directory per point, the stores, the JSON and the plot."),
        "steps": typer.Option(default_steps, "--steps", min=1, help="Optimizer steps per point (batch 8 x 128 tokens)."),
        "seeds": typer.Option(mem_defaults.DEFAULT_SEEDS, "--seeds", min=1, help="Seeds per point (0..N-1): the spread of every figure."),
        "dim": typer.Option(mem_defaults.DEFAULT_D_MODEL, "--dim", min=4, help="Model width (d_model) of the backbone."),
        "layers": typer.Option(mem_defaults.DEFAULT_N_LAYER, "--layers", min=1, help="Transformer blocks of the backbone."),
        "engram_layers": typer.Option(",".join(map(str, mem_defaults.DEFAULT_ENGRAM_LAYERS)), "--engram-layers", help="Block ids that get an Engram table (below --layers)."),
        "heads": typer.Option(mem_defaults.DEFAULT_HEADS, "--heads", min=1, help="Hash heads per n-gram order (K) of the tables."),
        "table_dim": typer.Option(mem_defaults.DEFAULT_TABLE_DIM, "--table-dim", min=1, help="n_embed_per_ngram of the tables; each row is table-dim // heads wide."),
        "tokenizer": typer.Option(mem_defaults.DEFAULT_TOKENIZER, "--tokenizer", help="Tokenizer of the stores (as `engram build-table --tokenizer`)."),
        "jobs": typer.Option(1, "--jobs", min=1, help="Points run at once, each in its own local process (the stores are built first, one at a time)."),
        "tokenizer_engine": typer.Option(TokenizerEngine.AUTO.value, "--tokenizer-engine", callback=TokenizerEngine.option_callback, help="The library that tokenizes: auto, fastokens or hf (the ids are the same)."),
        "no_plot": typer.Option(False, "--no-plot", help="Write no image (matplotlib is needed for it)."),
        "as_json": json_option(),
    }


_M = _common(mem_defaults.DEFAULT_STEPS)
_A = _common(alloc_defaults.DEFAULT_STEPS)


@sweep_app.command("memory")
def memory_command(
    corpus: Path = _CORPUS,
    rows_per_head: str | None = typer.Option(None, "--rows-per-head", help=f"Table sizes, rows per head, comma-separated (k = 1024). Default {','.join(map(str, mem_defaults.DEFAULT_ROWS_PER_HEAD))}."),
    budget: str | None = typer.Option(None, "--budget", help="Table sizes as budgets instead, comma-separated (e.g. 1MiB,8MiB,64MiB)."),
    out: Path = _M["out"], steps: int = _M["steps"], seeds: int = _M["seeds"], dim: int = _M["dim"], layers: int = _M["layers"],
    engram_layers: str = _M["engram_layers"], heads: int = _M["heads"], table_dim: int = _M["table_dim"], tokenizer: str = _M["tokenizer"],
    jobs: int = _M["jobs"], tokenizer_engine: str = _M["tokenizer_engine"], no_plot: bool = _M["no_plot"], as_json: bool = _M["as_json"],
) -> None:
    """Held-out loss against table size, with seeds, the no-memory control and the table ablations (docs/sweep.md).

    Example:

        engram sweep memory corpus/                         # -> sweep/sweep.json, sweep/sweep.png
        engram sweep memory corpus/ --rows-per-head 1k,16k,256k --seeds 3
    """
    opts = _opts(steps, seeds, dim, layers, engram_layers, heads, table_dim, tokenizer)
    rows = parse_counts(rows_per_head, what="--rows-per-head") if rows_per_head else None
    budgets = [b for b in budget.replace(" ", "").split(",") if b] if budget else None
    with progress_reporter(quiet=as_json) as progress:
        result = run_memory_sweep(corpus, out, rows_per_head=rows, budgets=budgets, opts=opts, jobs=jobs, plot=not no_plot,
                                  tokenizer_engine=tokenizer_engine, progress=progress, notice=None if as_json else notice)
    if as_json:
        print_json(result)
        return
    render_groups(result, f"memory sweep: held-out loss (nats/token) over {opts.seeds} seed(s); ablated = Engram branch skipped; d = ablated - full")
    fit = result["power_law"]
    if fit is None:
        console.print("power law: not fitted (fewer than 3 table sizes)")
    else:
        seeds_txt = ", ".join(f"seed {s['seed']} {s['slope']:+.4f}" for s in result["power_law_per_seed"])
        console.print(f"power law: loss ~ table params^{fit['slope']:+.4f} (r^2 {_f(fit['r2'], '.3f')}, {fit['points']} sizes; {seeds_txt})")
    _tail(result, "sweep.json")


@sweep_app.command("allocation")
def allocation_command(
    corpus: Path = _CORPUS,
    rho: str = typer.Option(",".join(map(str, alloc_defaults.DEFAULT_RHO)), "--rho", help="Shares of the sparse budget given to MoE experts (the rest to Engram rows), comma-separated."),
    experts: int = typer.Option(alloc_defaults.DEFAULT_EXPERTS, "--experts", min=2, help="Routed experts per block at rho = 1 (sets the sparse budget)."),
    top_k: int = typer.Option(alloc_defaults.DEFAULT_TOP_K, "--top-k", min=1, help="Experts each token is routed to."),
    expert_hidden: int = typer.Option(alloc_defaults.DEFAULT_EXPERT_HIDDEN, "--expert-hidden", min=1, help="Width of one routed expert."),
    shared_hidden: int = typer.Option(alloc_defaults.DEFAULT_SHARED_HIDDEN, "--shared-hidden", min=0, help="Width of the shared expert (0: none)."),
    out: Path = _A["out"], steps: int = _A["steps"], seeds: int = _A["seeds"], dim: int = _A["dim"], layers: int = _A["layers"],
    engram_layers: str = _A["engram_layers"], heads: int = _A["heads"], table_dim: int = _A["table_dim"], tokenizer: str = _A["tokenizer"],
    jobs: int = _A["jobs"], tokenizer_engine: str = _A["tokenizer_engine"], no_plot: bool = _A["no_plot"], as_json: bool = _A["as_json"],
) -> None:
    """Held-out loss against rho, the experts' share of a fixed sparse budget (the rest is Engram rows) (docs/sweep.md).

    Example:

        engram sweep allocation corpus/                     # -> sweep/allocation.json, sweep/allocation.png
        engram sweep allocation corpus/ --rho 0,0.5,0.8,1 --seeds 3
    """
    opts = _opts(steps, seeds, dim, layers, engram_layers, heads, table_dim, tokenizer)
    rhos = parse_floats(rho, what="--rho")
    with progress_reporter(quiet=as_json) as progress:
        result = run_allocation_sweep(corpus, out, rhos=rhos, opts=opts, experts=experts, top_k=top_k, expert_hidden=expert_hidden, shared_hidden=shared_hidden,
                                      jobs=jobs, plot=not no_plot, tokenizer_engine=tokenizer_engine, progress=progress, notice=None if as_json else notice)
    if as_json:
        print_json(result)
        return
    t = Table(title="sizes at each rho (params): the sparse budget = inactive experts + table", title_justify="left")
    for c in ("rho", "experts", "inactive experts", "table budget", "table (primes)", "sparse total", "dense params", "activated params"):
        t.add_column(c, justify="right")
    for g in result["groups"]:
        t.add_row(f"{g['rho']:g}", str(g["experts"]), f"{g['inactive_expert_params']:,}", f"{g['sparse_params'] - g['inactive_expert_params']:,}",
                  f"{g['table_params']:,}", f"{g['inactive_expert_params'] + g['table_params']:,}", f"{g['dense_params']:,}", f"{g['activated_params']:,}")
    console.print(t)
    render_groups(result, f"allocation sweep: held-out loss (nats/token) over {opts.seeds} seed(s)", extra_cols=(("experts", lambda g: str(g["experts"])),))
    _tail(result, "allocation.json")


@sweep_app.callback()
def sweep_callback() -> None:
    """The Engram paper's two experiments at small scale: loss against table size, and the experts/memory split (docs/sweep.md).

    Example:

        engram sweep memory corpus/
        engram sweep allocation corpus/ --steps 600
    """


def register(app: typer.Typer) -> None:
    app.add_typer(sweep_app, name="sweep")
