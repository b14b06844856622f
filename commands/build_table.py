"""`engram build-table CORPUS...`: count a corpus's n-grams, plan and write the tables."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from engram_cli.commands._output import (
    console,
    json_option,
    ngram_text,
    notice,
    print_json,
    progress_reporter,
)
from engram_cli.commands._sizes import render_plan_size
from rich.table import Table

from engram_cli import plan as plan_defaults
from engram_cli.audit.saturation import saturation_verdict
from engram_cli.defaults import (
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_STORE,
    DEFAULT_TEXT_FIELD,
    DEFAULT_VOCAB,
)
from engram_cli.execution.ray import check_cluster_options
from engram_cli.kinds import Compressor, InitKind, TableDtype, TokenizerEngine
from engram_cli.pipeline.build import (
    DistributedOptions,
    build_tables,
    plan_tables,
    resolve_corpus,
)
from engram_cli.pipeline.report import plan_report, stats_report
from engram_cli.pipeline.sizing import (
    AUTO,
    check_fits_disk,
    plan_footprint,
    resolve_rows_option,
    size_plan_to_target,
)
from engram_cli.plan import check_rows_or_budget, parse_budget
from engram_cli.store import check_output, check_write_options
from engram_cli.store import format as store_format
from engram_cli.units import format_bytes, parse_bytes, parse_int_list
from engram_cli.vocab import DEFAULT_TOKENIZER, load_tokenizer, resolve_vocab

TOP_SHOWN = 10


def render_plan(report: dict, out: Path) -> None:
    table = Table(title=f"Table plan for {out}", title_justify="left")
    for col, justify in (("layer", "right"), ("order", "right"), ("head primes", "left"), ("rows", "right"), ("bytes", "right")):
        table.add_column(col, justify=justify)
    for layer in report["layers"]:
        for o in layer["orders"]:
            p = o["primes"]
            primes = ", ".join(map(str, p)) if len(p) <= 4 else f"{p[0]}, {p[1]}, … {p[-1]} ({len(p)} heads)"
            table.add_row(str(layer["layer_id"]), str(o["order"]), primes, f"{o['rows']:,}", format_bytes(o["bytes"]))
    console.print(table)
    console.print(
        f"{len(report['layers'])} layers x orders 2..{report['max_ngram_size']} x {report['heads']} heads, rows of "
        f"{report['head_dim']} x {report['dtype']}: [bold]{report['total_rows']:,} rows, {format_bytes(report['total_bytes'])}[/]"
    )


def render_result(report: dict) -> None:
    c = report["corpus"]
    skipped = dict(c.get("skipped_other") or {})
    if c.get("skipped_binary"):
        skipped["binary"] = c["skipped_binary"]
    reasons = ", ".join(f"{n:,} {reason}" for reason, n in skipped.items())
    console.print(
        f"Corpus: {c.get('files', 0):,} files, {c.get('documents', 0):,} documents, {format_bytes(c.get('bytes', 0))}, "
        f"{c.get('tokens', 0):,} tokens; skipped: {reasons or 'nothing'}; "
        f"{c.get('invalid_utf8', 0):,} documents with invalid UTF-8 replaced"
    )
    stats = report["stats"]
    table = Table(title="N-gram statistics", title_justify="left")
    for col in ("order", "windows", "distinct", "singletons", "top 1% share", "top 10% share"):
        table.add_column(col, justify="right")
    for n, s in stats["per_order"].items():
        table.add_row(n, f"{s['windows']:,}", f"{s['distinct']:,}", f"{s['singletons']:,}", f"{s['top1pct_share']:.1%}", f"{s['top10pct_share']:.1%}")
    console.print(table)
    for n, s in stats["per_order"].items():
        top = Table(title=f"Most frequent {n}-grams", title_justify="left")
        top.add_column("count", justify="right")
        top.add_column("n-gram")
        for t in s["top"][:TOP_SHOWN]:
            top.add_row(f"{t['count']:,}", ngram_text(t["text"]))
        console.print(top)
    store = report["store"]
    notice(f"Wrote {store.get('path')} ({format_bytes(store.get('bytes_on_disk', 0))} on disk); next: engram collisions")


def build_table_command(
    corpus: List[Path] = typer.Argument(..., help="Corpus files or directories (text, .jsonl, .parquet, and .gz/.zst of these)."),
    out: Path = typer.Option(Path(DEFAULT_STORE), "-o", "--out", help="The Zarr v3 store to write."),
    tokenizer: str = typer.Option(DEFAULT_TOKENIZER, "--tokenizer", help="A tokenizer.json, a directory holding one, or `deepseek`."),
    tokenizer_engine: str = typer.Option(TokenizerEngine.AUTO.value, "--tokenizer-engine", callback=TokenizerEngine.option_callback, help="The library that tokenizes: auto (fastokens where it loads the tokenizer, else tokenizers), fastokens, or hf (Hugging Face tokenizers, the reference). A fast engine is checked against the reference on a sample of the corpus (docs/build-table.md, Tokenization engines)."),
    vocab_path: Optional[Path] = typer.Option(None, "--vocab", help="A compressed vocabulary from `engram compress-vocab` (checked against the tokenizer). ", show_default=f"./{DEFAULT_VOCAB} when it matches the tokenizer, else computed"),
    layers: str = typer.Option(",".join(map(str, plan_defaults.DEFAULT_LAYER_IDS)), "--layers", help="Layer ids that get a table, comma-separated."),
    max_ngram: int = typer.Option(plan_defaults.DEFAULT_MAX_NGRAM, "--max-ngram", help="Largest n-gram order (orders 2..N)."),
    heads: int = typer.Option(plan_defaults.DEFAULT_HEADS, "--heads", help="Hash heads per order (K)."),
    rows_per_head: Optional[str] = typer.Option(None, "--rows-per-head", help=f"Requested rows per head (engram_vocab_size): one value, one per order, or `auto` (sized to the counted n-grams for --target; docs/build-table.md, Sizing). Default {plan_defaults.DEFAULT_ROWS_PER_HEAD}."),
    target: Optional[float] = typer.Option(None, "--target", help="With --rows-per-head auto (required there): the token-weighted collision rate to reach, as `engram collisions --target` reports it."),
    dim: int = typer.Option(plan_defaults.DEFAULT_DIM, "--dim", help="n_embed_per_ngram; each head's row is dim // heads wide."),
    seed: int = typer.Option(plan_defaults.DEFAULT_SEED, "--seed", help="Seed of the hash multipliers and of the table initialization."),
    pad_id: int = typer.Option(plan_defaults.DEFAULT_PAD_ID, "--pad-id", help="Tokenizer id used as left padding (compressed before use)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Size the tables to fit: bytes (2GiB, 800MB) or parameters (500M)."),
    dtype: str = typer.Option(store_format.DEFAULT_DTYPE, "--dtype", callback=TableDtype.option_callback, help=f"Row dtype: {TableDtype.choices()} (float8_e4m3: e4m3 values and one power-of-two scale per 32; docs/store.md)."),
    init: str = typer.Option(store_format.DEFAULT_INIT, "--init", callback=InitKind.option_callback, help="Row initialization: normal (std --init-std) or zeros."),
    init_std: float = typer.Option(store_format.DEFAULT_INIT_STD, "--init-std", help="Standard deviation of the normal initialization."),
    chunk_size: str = typer.Option(format_bytes(store_format.DEFAULT_CHUNK_BYTES).replace(" ", ""), "--chunk-size", help="Target bytes per Zarr chunk (1-8 MiB is typical)."),
    shard_size: str = typer.Option(format_bytes(store_format.DEFAULT_SHARD_BYTES).replace(" ", ""), "--shard-size", help="Target bytes per shard file (many chunks each)."),
    compressor: str = typer.Option(store_format.DEFAULT_COMPRESSOR, "--compressor", callback=Compressor.option_callback, help="Chunk compressor: lz4 (blosc), zstd or none; crc32c checksums always."),
    memory_limit: str = typer.Option(format_bytes(DEFAULT_MEMORY_LIMIT).replace(" ", ""), "--memory-limit", help="Memory for in-flight n-gram counts before spilling to disk."),
    text_field: str = typer.Option(DEFAULT_TEXT_FIELD, "--text-field", help="The text field of .jsonl records and .parquet rows."),
    special_tokens: bool = typer.Option(False, "--special-tokens/--no-special-tokens", help="Add the tokenizer's special tokens (e.g. BOS) to each document."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel shard writers (default: CPU count)."),
    plan_only: bool = typer.Option(False, "--plan-only", help="Print the plan and stop; write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output store."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Run on Ray: local[:N] (a local cluster of N workers), auto (a running cluster; RAY_ADDRESS) or ray://HOST:PORT. Needs engram-cli[ray]."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="With --cluster: partial results, on storage every worker sees (default: .OUT.work beside the output)."),
    resume: bool = typer.Option(False, "--resume", help="With --cluster: reuse the finished partials in --work-dir (same corpus shard, tokenizer and plan)."),
    as_json: bool = json_option(),
) -> None:
    """Count a corpus's n-grams, plan prime-sized multi-head tables and write them as Zarr v3.

    The plan is printed before anything is written. Example:

        engram build-table corpus/                        # reference plan -> tables.zarr
        engram build-table corpus/ --budget 256MiB -o small.zarr
        engram build-table data.jsonl --heads 4 --max-ngram 4 --plan-only
        engram build-table corpus/ --cluster local:8      # 8 Ray workers (docs/scale-out.md)
    """
    check_rows_or_budget(rows_per_head, budget)
    budget_value = parse_budget(budget) if budget is not None else None
    rows, target = resolve_rows_option(rows_per_head, target, plan_only=plan_only)
    memory = parse_bytes(memory_limit, what="--memory-limit")
    chunk_bytes = parse_bytes(chunk_size, what="--chunk-size")
    shard_bytes = parse_bytes(shard_size, what="--shard-size")
    check_write_options(init=init, init_std=init_std, compressor=compressor, workers=workers, chunk_bytes=chunk_bytes, shard_bytes=shard_bytes)
    cluster_spec = check_cluster_options(cluster, work_dir=work_dir, resume=resume)  # Ray missing fails here, before any work

    loaded = load_tokenizer(tokenizer, tokenizer_engine)
    vocab = resolve_vocab(loaded, vocab_path, notice=notice)
    plan = plan_tables(
        vocab,
        layer_ids=parse_int_list(layers, what="--layers"),
        max_ngram_size=max_ngram,
        heads=heads,
        rows_per_head=plan_defaults.DEFAULT_ROWS_PER_HEAD if rows == AUTO else rows,  # auto: re-planned after counting
        dim=dim,
        seed=seed,
        pad_id=pad_id,
        dtype=dtype,
        budget=budget_value,
    )
    planned = plan_report(plan)
    footprint = plan_footprint(plan, out)
    if not plan_only:
        check_output(out, force, inputs=corpus)  # cheap refusals before any work (docs/build-table.md, "Failure modes")
    resolve_corpus(corpus)  # missing paths and empty directories fail before the plan is shown, --plan-only too
    if plan_only:
        if as_json:
            print_json({"plan": planned, "plan_size": footprint})
        else:
            render_plan(planned, out)
            render_plan_size(footprint)
        return
    sizing = None
    replan = None
    if rows == AUTO:
        if not as_json:
            notice(f"--rows-per-head auto: the plan is made after counting, for a token-weighted collision rate <= {target:.2%}.")

        def replan(stats):
            nonlocal planned, footprint, sizing
            sized, sizing = size_plan_to_target(plan, stats, target, progress=progress)
            planned, footprint = plan_report(sized), plan_footprint(sized, out)
            check_fits_disk(footprint)
            if not as_json:
                render_plan(planned, out)
                render_plan_size(footprint)
            return sized
    elif not as_json:
        render_plan(planned, out)
        render_plan_size(footprint)
    verdict = {}

    def on_counted(final_plan, stats):  # the saturation notice, after counting and before the tables are written
        verdict.update(saturation_verdict(final_plan, {n: stats.distinct(n) for n in final_plan.orders}))
        if verdict["notice"] and not as_json:
            notice(verdict["notice"])

    with progress_reporter(quiet=as_json) as progress:
        result = build_tables(
            list(corpus),
            out,
            tokenizer=loaded,
            vocab=vocab,
            plan=plan,
            cluster=cluster_spec,
            options=DistributedOptions(work_dir=work_dir, resume=resume),
            force=force,
            memory_limit=memory,
            text_field=text_field,
            add_special_tokens=special_tokens,
            progress=progress,
            init=init,
            init_std=init_std,
            chunk_bytes=chunk_bytes,
            shard_bytes=shard_bytes,
            compressor=compressor,
            workers=workers,
            replan=replan,
            on_counted=on_counted,
        )
    report = {
        "plan": planned,
        "plan_size": footprint,
        "sizing": sizing,
        "corpus": result.corpus,
        "stats": stats_report(result.store.stats, vocab),
        "store": result.store.summary(),
        "saturation": verdict,
    }
    if as_json:
        print_json(report)
    else:
        render_result(report)


def register(app: typer.Typer) -> None:
    app.command("build-table")(build_table_command)
