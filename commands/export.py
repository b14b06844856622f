"""`engram export`: a store's tables as one file in the reference module's names (safetensors or torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from engram_cli.commands._output import (
    console,
    json_option,
    print_json,
    progress_reporter,
)

from engram_cli.defaults import DEFAULT_STORE
from engram_cli.exchange import export_tables
from engram_cli.kinds import ExchangeFormat
from engram_cli.store.output import reading


def export_command(
    tables: Path = typer.Argument(Path(DEFAULT_STORE), metavar="[TABLES.zarr]", help=f"Table store from `engram build-table` or `engram train` (default {DEFAULT_STORE})."),
    fmt: str = typer.Option(ExchangeFormat.SAFETENSORS.value, "--format", callback=ExchangeFormat.option_callback, help=f"File format: {ExchangeFormat.choices()} (reference: a torch.save state dict, .pt); names in docs/exchange.md."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="File to write (default: the store's name with .safetensors or .pt)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file at -o."),
    as_json: bool = json_option(),
) -> None:
    """Export every layer's table, one tensor per layer in the reference module's names.

    Example:

        engram export tables.zarr --format safetensors -o tables.safetensors
        engram export model.tables.zarr --format reference -o engram.pt
    """
    with reading(tables), progress_reporter(quiet=as_json) as progress:  # the store is not replaced while it is exported
        result = export_tables(tables, out, fmt, force=force, progress=progress).as_dict()
    if as_json:
        print_json(result)
        return
    weights = [t for t in result["tensors"] if t["name"].endswith(".weight")]
    console.print(f"[bold]{result['path']}[/] ({result['format']}): {len(weights)} layer table(s), {result['dtype']} rows, "
                  f"{result['bytes']:,} bytes in {result['seconds']:.1f} s; plan {result['plan_fingerprint'][:12]}")
    for t in result["tensors"]:
        console.print(f"  {t['name']}  {t['dtype']}  {tuple(t['shape'])}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
