"""`engram inspect [TABLES.zarr]`: a store's plan, size, provenance, row usage and checksums."""

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
from rich.markup import escape
from rich.table import Table

from engram_cli.audit import check_plot_support
from engram_cli.defaults import DEFAULT_STORE
from engram_cli.inspect import hit_profiles, inspect_store, plot_hit_ranks, verify_store
from engram_cli.store import TableStore
from engram_cli.store.output import reading
from engram_cli.units import format_bytes


def identity_text(tok: dict) -> str:
    """How the engine's ids were checked against the reference, in words."""
    ident = tok.get("identity")
    if ident:
        skipped = f", {ident['skipped_for_time']:,} passed over for time" if ident.get("skipped_for_time") else ""
        return (f"identity checked: {ident['texts_checked']:,} of {ident['texts']:,} texts ({ident['tokens_checked']:,} tokens; a text is a document or a 256 KiB piece of a long one) re-encoded by "
                f"{ident['reference']}, {ident['mismatches']} mismatches{skipped}")
    if tok["engine"] == "tokenizers":
        return "the reference engine (no identity check needed)"
    return "no identity check recorded"


def render_inspect(report: dict) -> None:
    plan, size, built = report["plan"], report["size"], report["built"]
    console.print(f"[bold]{escape(str(report['path']))}[/] ({report['store_format']}, plan {plan['fingerprint'][:12]})")
    table = Table(title="Plan", title_justify="left")
    for col in ("layer", "order", "heads", "rows", "bytes"):
        table.add_column(col, justify="right")
    for layer in plan["layers"]:
        for o in layer["orders"]:
            table.add_row(str(layer["layer_id"]), str(o["order"]), str(len(o["primes"])), f"{o['rows']:,}", format_bytes(o["bytes"]))
    console.print(table)
    console.print(
        f"Layers {', '.join(str(x['layer_id']) for x in report['layers'])}; rows of {plan['head_dim']} x {report['dtype']} "
        f"(stored {report['storage_dtype']}, {report['row_bytes']} bytes); {report['compressor']} + crc32c, "
        f"{report['chunk_rows']:,} rows per chunk, {report['shard_rows']:,} per shard."
    )
    console.print(
        f"Size: {format_bytes(size['in_memory'])} of tables in memory ({size['in_memory']:,} bytes)"
        + (f" + {format_bytes(size['hits_in_memory'])} of hits" if size["hits_in_memory"] else "")
        + f"; {format_bytes(size['on_disk'])} on disk ({size['on_disk']:,} bytes)."
    )
    c = built.get("corpus") or {}
    corpus = f"{c.get('files', 0):,} files, {c.get('documents', 0):,} documents, {format_bytes(c.get('bytes', 0))}, {c.get('tokens', 0):,} tokens" if c else "no corpus"
    console.print(f"Built: {built.get('created')} by engram {built.get('engram_version')}, from {corpus}; init {built.get('init', {}).get('kind')}.")
    tok = built.get("tokenizer")
    if tok:
        console.print(f"Tokenizer: {escape(str(tok['spec']))} (sha256 {(tok['sha256'] or '')[:12]}), encoded by {tok['engine']} {tok.get('engine_version') or ''}".rstrip() + "; " + identity_text(tok) + ".")
    mod = report["modified"]
    if mod["since_build"]:
        ops = mod["operations"]
        console.print(f"Modified since build: [bold]yes[/], {len(ops)} operation(s), oldest first:")
        for op in ops:
            when = op["first_at"] if op["first_at"] == op["last_at"] else f"{op['first_at']} .. {op['last_at']}"
            console.print(
                f"  by {escape(str(op['by']))} at {when}: {op['rows']:,} rows, layers {', '.join(map(str, op['layers']))} "
                f"({op['writes']:,} write(s)){'' if op['complete'] else ' [red]INCOMPLETE[/]'}"
            )
    else:
        console.print("Modified since build: no.")
    d = report.get("derived")
    if d:
        console.print(f"Derived from {escape(str(d.get('from')))} ({d.get('from_dtype')}) at {d.get('at')}.")
    pr = report.get("pruned")
    if pr:
        kept = "; ".join(f"layer {x['layer_id']} {x['kept_rows']:,} of {x['rows']:,} ({x['kept_share']:.1%})" for x in pr["layers"])
        how = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in pr.items() if k in ("kept_by", "keep_top", "min_hits") and v is not None)
        console.print(f"Pruned: kept rows {kept}; every other row reads {'+0.0' if pr['fallback'] == 'zeros' else pr['fallback']}"
                      + (f" ({how})." if how else "."))
    if report.get("saturation") and report["saturation"]["notice"]:
        console.print(report["saturation"]["notice"], markup=False, soft_wrap=True)
    if report["hits"]:
        hits = Table(title="Row hits per layer and order (top 1%/10%: share of all hits on the most-hit 1%/10% of rows)", title_justify="left")
        for col in ("layer", "order", "rows", "hit", "never", "hits", "top 1%", "top 10%"):
            hits.add_column(col, justify="right")
        for h in report["hits"]:
            hits.add_row(
                str(h["layer_id"]), str(h["order"]), f"{h['rows']:,}", f"{h['rows_hit']:,} ({h['hit_share_of_rows']:.1%})",
                f"{h['rows_never_hit']:,}", f"{h['hits']:,}", f"{h['top1pct_share']:.1%}", f"{h['top10pct_share']:.1%}",
            )
        console.print(hits)
    else:
        console.print("Row hits: none stored (built without a corpus).")
    v = report["verify"]
    if v is not None:
        if v["ok"]:
            files = v.get("stats_files", 0)
            console.print(f"Verify: all {v['chunks'] - files:,} chunks read, crc32c intact"
                          + (f"; {files} n-gram statistics file(s) match their recorded XXH3-128" if files else "")
                          + f" ({format_bytes(v['bytes_read'])} read).")
        else:
            b = v["first_bad"]
            where = b["array"] if b["layer_id"] is None else f"layer {b['layer_id']} {b['array']}"
            at = (f"n-gram statistics file {escape(str(b['shard_file']))}" if b["array"].startswith("stats/") else
                  f"{where} chunk {b['chunk']} (rows {b['rows'][0]:,}..{b['rows'][1]:,}, shard file {escape(str(b['shard_file']))})")
            console.print(f"Verify: [red]FAILED[/] at {at} after {v['checked']:,} good chunks of {v['chunks']:,}.")


def inspect_command(
    store_path: Path = typer.Argument(Path(DEFAULT_STORE), help="The table store (a Zarr v3 directory from `engram build-table`)."),
    verify: bool = typer.Option(False, "--verify", help="Read every chunk and check its crc32c; exit 2 at the first bad one."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the rank/frequency curve of row hits (log-log) per layer and order to FILE.png (needs matplotlib: pip install 'engram-cli\\[plot]').", dir_okay=False),
    as_json: bool = json_option(),
) -> None:
    """Show a store: plan, layers, dtype, size, how it was built, modifications, row hits.

    Example:

        engram inspect                      # tables.zarr
        engram inspect big.zarr --verify    # also check every chunk's crc32c
        engram inspect --json --plot hits.png
    """

    if plot is not None:
        check_plot_support(plot)
    with reading(store_path), progress_reporter(quiet=as_json) as progress:  # not replaced while it is read
        store = TableStore.open(store_path)
        checked = verify_store(store, progress=progress) if verify else None
        # a store that failed verification may not stream its hits: report without them
        profiles = hit_profiles(store, progress=progress) if checked is None or checked["ok"] else []
        report = inspect_store(store, profiles)
        report["verify"] = checked
    if plot is not None:
        plot_hit_ranks(profiles, plot)
    if as_json:
        print_json(report)
    else:
        render_inspect(report)
        if plot is not None:
            console.print(f"Wrote {escape(str(plot))}.")
    if verify and not report["verify"]["ok"]:
        b = report["verify"]["first_bad"]
        where = b["array"] if b["layer_id"] is None else f"layer {b['layer_id']} {b['array']}"
        if b["array"].startswith("stats/"):
            typer.echo(f"Error: corrupt n-gram statistics file {b['shard_file']}: its size or XXH3-128 differs from the build's record; "
                       "rebuild the store (`engram build-table --force`) or restore it from a copy", err=True)
        else:
            typer.echo(f"Error: corrupt chunk: {where} chunk {b['chunk']} (rows {b['rows'][0]}..{b['rows'][1]}) in {b['shard_file']}; rebuild the store or restore it from a copy", err=True)
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
