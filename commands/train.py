"""`engram train`: train the reference model on a corpus with a table store's Engram memory."""

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

from engram_cli.defaults import DEFAULT_CHECKPOINT, DEFAULT_STORE, TRAINED_STORE_SUFFIX
from engram_cli.errors import EngramError
from engram_cli.inspect import disk_split
from engram_cli.kinds import TokenizerEngine
from engram_cli.split import HELDOUT_SHARE
from engram_cli.store import TableStore
from engram_cli.train import DEFAULT_CORPUS, DEFAULT_DEPTH, DEFAULT_STEPS, run_training
from engram_cli.units import format_bytes


def train_command(
    corpus: Path = typer.Argument(Path(DEFAULT_CORPUS), help=f"Corpus folder or files (default {DEFAULT_CORPUS}/, the folder `engram build-table corpus/` read)."),
    tables: Path = typer.Option(Path(DEFAULT_STORE), "--tables", help="Table store from `engram build-table` (its tokenizer and plan are used)."),
    out: Path = typer.Option(Path(DEFAULT_CHECKPOINT), "-o", "--out", help="Checkpoint to write; trained rows go to NAME.tables.zarr beside it."),
    steps: int = typer.Option(DEFAULT_STEPS, "--steps", min=1, help="Optimizer steps."),
    no_engram: bool = typer.Option(False, "--no-engram", help="Train the same backbone without Engram memory (the baseline)."),
    param_matched: bool = typer.Option(False, "--param-matched", help="With --no-engram: give the FFN of every block the dense parameters the Engram branches would add (a parameter-matched baseline)."),
    depth: int = typer.Option(DEFAULT_DEPTH, "--depth", min=1, help="Backbone blocks; the plan's layer ids (numbering the reference's 30 layers) are placed at the same relative depth, and still address their tables (docs/train.md, \"Model\")."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the model's initialisation and the batch order (recorded; the same seed gives the same checkpoint on the CPU)."),
    split: str = typer.Option("document", "--split", help="Held-out unit: document (whole documents, by file path and index) or segment (2048-token segments of every document)."),
    heldout_fraction: float = typer.Option(HELDOUT_SHARE, "--heldout-fraction", help="Share of the documents (or segments) held out for `engram eval`."),
    tokenizer_engine: str = typer.Option(TokenizerEngine.AUTO.value, "--tokenizer-engine", callback=TokenizerEngine.option_callback, help="The library that tokenizes the corpus: auto (fastokens where it loads the tokenizer, else tokenizers), fastokens, or hf (Hugging Face tokenizers, the reference); the ids are the same."),
    force: bool = typer.Option(False, "--force", help="Replace an existing checkpoint (only a checkpoint) and its trained store NAME.tables.zarr."),
    as_json: bool = json_option(),
) -> None:
    """Train the reference model; held-out documents are kept for `engram eval` (docs/train.md).

    Example:

        engram train corpus/                      # ./tables.zarr -> model.ckpt + model.tables.zarr
        engram train corpus/ --no-engram -o base.ckpt
        engram train corpus/ --seed 1 -o seed1.ckpt
        engram train corpus/ --no-engram --param-matched -o matched.ckpt
        engram train corpus/ --force              # replace model.ckpt and model.tables.zarr
    """
    with progress_reporter(quiet=as_json) as progress:
        result = run_training(corpus, tables, out, force=force, steps=steps, no_engram=no_engram, param_matched=param_matched, seed=seed, split=split, depth=depth,
                              heldout_fraction=heldout_fraction, tokenizer_engine=tokenizer_engine, progress=progress,
                              announce=None if as_json else lambda: notice(write_estimate(tables, out, no_engram)))
    if as_json:
        print_json(result)
        return
    console.print(f"[bold]{result['checkpoint']}[/]: {result['steps']} steps, loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, "
                  f"{result['tokens_per_s']:,.0f} tokens/s, {result['seconds']:.1f} s")
    n = result["heldout_documents"]
    unit = ("segment" if result["split"] == "segment" else "piece") + ("" if n == 1 else "s")
    unit += "" if result["split"] == "segment" else " (documents, long ones as 256 KiB pieces)"
    console.print(f"held out for engram eval: {result['heldout_documents']:,} {unit}, {result['heldout_tokens']:,} tokens")
    placed = "; Engram " + ", ".join(f"layer {l} in block {b}" for l, b in result["engram_blocks"].items()) if result["engram_blocks"] else ""
    console.print(f"model: {result['depth']} blocks{placed}")
    if result["tables"]:
        rows = sum(result["rows_trained"].values())
        new, linked = disk_split(result["tables"])
        console.print(f"trained rows: {rows:,} in {result['tables']}  (the initial {tables} is unchanged); "
                      f"table optimizer state {format_bytes(result['optimizer_state_bytes'])}")
        console.print(f"on disk: {result['tables']} added {format_bytes(new)} (rewritten shards), {format_bytes(linked)} hard-linked from {tables}")
    other = Path(DEFAULT_CHECKPOINT)
    if no_engram and Path(result["checkpoint"]).resolve() != other.resolve() and other.exists():
        console.print(f"next: engram eval {other} {result['checkpoint']}  (memory vs baseline, side by side)")
    else:
        console.print("next: engram eval " + result["checkpoint"])


def write_estimate(tables: Path, out: Path, no_engram: bool) -> str:
    """The notice before training: what it will write, and at most how much."""
    if no_engram:
        return f"Training writes {out} (the model only; no tables)."
    try:
        size = TableStore.open(tables).summary()
    except EngramError:  # run_training says what is wrong with it, after its own checks
        return f"Training writes {out} and its trained tables."
    table_disk = sum(layer["bytes_on_disk"] for layer in size["layers"])
    trained = out.with_name(out.name.removesuffix(".ckpt").removesuffix(".safetensors") + TRAINED_STORE_SUFFIX)
    return (f"Training writes {out} and {trained}: up to {format_bytes(table_disk)} of rewritten shards (every shard holding a trained row; "
            f"most of them on a whole corpus), the rest hard-linked from {tables} ({format_bytes(size['bytes_on_disk'])} on disk).")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
