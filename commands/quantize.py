"""`engram quantize`: a copy of a table store with its rows stored as another dtype (bfloat16, float8_e4m3, int8, int4, ...)."""

from __future__ import annotations

from pathlib import Path

import typer
from engram_cli.commands._output import (
    console,
    json_option,
    print_json,
    progress_reporter,
)

from engram_cli.quantize import derived_report, quantize_store
from engram_cli.store.output import reading


def render(r: dict) -> None:
    a, b = r["source"], r["output"]
    console.print(f"[bold]{b['path']}[/]: {b['dtype']} rows, {b['bytes_per_row']} bytes per row, tables {b['table_bytes']:,} bytes "
                  f"({r['table_bytes_ratio']:.1%} of {a['path']}'s {a['dtype']} {a['table_bytes']:,}); on disk {b['table_bytes_on_disk']:,} bytes; "
                  f"next: engram eval MODEL.ckpt --tables {b['path']}")


def quantize_command(
    tables: Path = typer.Argument(..., metavar="TABLES.zarr", help="Store to quantize (never modified)."),
    dtype: str = typer.Option(..., "--dtype", help="Row dtype of the copy: float32, float16, bfloat16 (bf16), float8_e4m3 (fp8), int8, int4 (docs/quantize.md)."),
    out: Path = typer.Option(..., "-o", "--out", help="New store to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing table store at -o."),
    as_json: bool = json_option(),
) -> None:
    """Write a copy of a store with its rows in another dtype; a row that is not finite is refused, named.

    Example:

        engram quantize model.tables.zarr --dtype int8 -o int8.zarr
        engram eval model.ckpt --tables int8.zarr
    """
    with reading(tables), progress_reporter(quiet=as_json) as progress:  # the source is not replaced while it is copied
        new = quantize_store(tables, out, dtype, force=force, progress=progress)
    r = derived_report(tables, new)
    print_json(r) if as_json else render(r)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
