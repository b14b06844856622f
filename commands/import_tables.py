"""`engram import`: rows from a safetensors or torch file (e.g. trained elsewhere) into a new store."""

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

from engram_cli.defaults import DEFAULT_STORE
from engram_cli.exchange import import_tables


def import_command(
    file: Path = typer.Argument(..., metavar="FILE", help="A file from `engram export` (safetensors or .pt) or a state dict with the same names."),
    plan_from: Path = typer.Option(Path(DEFAULT_STORE), "--plan-from", help="Store whose plan, vocabulary and hit counts the new store takes (never modified)."),
    out: Path = typer.Option(..., "-o", "--out", help="New store to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing table store at -o (nothing else is ever replaced)."),
    as_json: bool = json_option(),
) -> None:
    """Import tables into a new store, checked against the plan of --plan-from.

    Example:

        engram import tables.safetensors --plan-from tables.zarr -o trained.zarr
        engram import engram.pt --plan-from tables.zarr -o trained.zarr --json
    """
    with progress_reporter(quiet=as_json) as progress:
        result = import_tables(file, plan_from, out, force=force, progress=progress)
    if as_json:
        print_json(result)
        return
    if result["converted_layers"]:
        notice(f"layers {result['converted_layers']}: float32 rows converted to {result['dtype']}")
    checked = "fingerprint checked" if result["fingerprint_checked"] else "no fingerprint in the file: shapes and offsets checked"
    console.print(f"[bold]{result['path']}[/]: {result['rows']:,} rows of layers {result['layers']} from {result['source']} "
                  f"({result['file_format']}), plan of {result['plan_from']} ({checked})")


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
