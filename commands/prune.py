"""`engram prune`: a copy of a table store keeping only its most-used rows (the others read as zeros)."""

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

from engram_cli.errors import EngramError, StoreError
from engram_cli.quantize import derived_report, prune_store
from engram_cli.store.output import reading
from engram_cli.train_stats import load_stats_file


def render(r: dict) -> None:
    a, b = r["source"], r["output"]
    console.print(f"[bold]{b['path']}[/]: kept {b['rows_stored']:,} of {b['rows']:,} rows ({b['rows_stored'] / max(b['rows'], 1):.1%}, "
                  f"by {(r['pruned'] or {}).get('kept_by')}); tables {b['table_bytes']:,} bytes with the kept-row map "
                  f"({r['table_bytes_ratio']:.1%} of {a['table_bytes']:,}); on disk {b['table_bytes_on_disk']:,} bytes; dropped rows read as zeros")


def prune_command(
    tables: Path = typer.Argument(..., metavar="TABLES.zarr", help="Store to prune (never modified)."),
    out: Path = typer.Option(..., "-o", "--out", help="New store to write."),
    keep_top: Optional[float] = typer.Option(None, "--keep-top", help="Keep this fraction of each layer's rows, the highest-scoring (e.g. 0.1)."),
    min_hits: Optional[float] = typer.Option(None, "--min-hits", help="Keep every row with at least this many hits (--by hits)."),
    by: str = typer.Option("hits", "--by", help="Score rows by training-split hits (`hits`: --train-stats, else the store's own hit counts) or by how much training changed them (`change`: needs --initial)."),
    train_stats: Optional[Path] = typer.Option(None, "--train-stats", help="NAME.train-stats (folder) from `engram train` (training-split row hits)."),
    initial: Optional[Path] = typer.Option(None, "--initial", help="The store training started from (for --by change)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Also store the kept rows as this dtype (default: the source's)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing table store at -o."),
    as_json: bool = json_option(),
) -> None:
    """Write a copy of a store holding only its kept rows and the map of their row ids (docs/quantize.md).

    Example:

        engram prune model.tables.zarr --keep-top 0.1 --train-stats model.train-stats -o top10.zarr
        engram prune model.tables.zarr --keep-top 0.5 --by change --initial tables.zarr -o half.zarr
    """
    stats = None
    if train_stats is not None:
        try:
            stats = load_stats_file(train_stats).arrays
        except (OSError, ValueError, EngramError) as e:
            raise StoreError(f"cannot read the training statistics {str(train_stats)!r} ({type(e).__name__}); pass the NAME.train-stats folder `engram train` wrote") from None
    with reading(tables, initial), progress_reporter(quiet=as_json) as progress:  # the sources are not replaced while they are read
        new = prune_store(tables, out, keep_top=keep_top, min_hits=min_hits, by=by, train_stats=stats, initial=initial, dtype=dtype,
                          force=force, progress=progress)
    r = derived_report(tables, new)
    print_json(r) if as_json else render(r)


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)
