"""The build-table pipeline: corpus -> n-gram statistics -> plan -> Zarr tables.

`plan_tables` turns the user's parameters into the reference `TablePlan` (docs/spec.md,
"Table plan"); `build_tables` counts the corpus into a staging store, materializes the
tables there and renames it into place, so an interrupted run never leaves a store
that looks complete. Reports are plain dicts (the `--json` schemas of
docs/build-table.md).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .corpus import CorpusSummary, corpus_files, empty_corpus_message, iter_documents
from .defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_STORE
from .encode import DEFAULT_BATCH_SIZE, batch_chars_for, encode_documents, locked_progress
from .errors import CorpusError, PlanError
from .ngrams import SUMMARY_FILE, NgramStats, count_ngrams, merge_stats, order_file, write_summary
from .plan import Budget, TablePlan, fit_plan_to_budget, make_plan
from .store import TableStore, finalize, planned_write_bytes, prepare_partial, write_tables
from .store.format import DEFAULT_INIT
from .store.output import release_output, storage_error
from .vocab import CompressedVocab, LoadedTokenizer

DEFAULT_OUT = DEFAULT_STORE  # kept for importers; the one home is engram_cli.defaults


def resolve_corpus(paths, summary: CorpusSummary | None = None) -> list[Path]:
    """The corpus files to read, checked before any work (missing paths, no files).

    Pruned table stores are counted in `summary` when given.
    """
    files = corpus_files(paths, summary)
    if not files:
        shown = ", ".join(str(p) for p in paths)
        raise CorpusError(f"the corpus {shown} holds no files; pass files or directories with text, .jsonl or .parquet documents")
    return files


def plan_tables(
    vocab: CompressedVocab,
    *,
    layer_ids,
    max_ngram_size: int,
    heads: int,
    rows_per_head,
    dim: int,
    seed: int,
    pad_id: int,
    dtype: str = "float32",
    budget: Budget | None = None,
) -> TablePlan:
    """The reference plan for `vocab`; `budget` derives equal per-order rows per head."""
    if not 0 <= pad_id < vocab.vocab_size:
        raise PlanError(f"--pad-id {pad_id} is not a token id of this tokenizer (0..{vocab.vocab_size - 1}); the DeepSeek pad id is 2")
    common = dict(
        compressed_vocab_size=vocab.compressed_size,
        compressed_pad_id=int(vocab.lookup[pad_id]),
        layer_ids=layer_ids,
        max_ngram_size=max_ngram_size,
        heads=heads,
        dim=dim,
        seed=seed,
        pad_id=pad_id,
        dtype=dtype,
        tokenizer_sha256=vocab.tokenizer_sha256,
        vocab_fingerprint=vocab.fingerprint,
    )
    if budget is not None:
        return fit_plan_to_budget(budget, **common)
    return make_plan(rows_per_head=rows_per_head, **common)


def plan_report(plan: TablePlan) -> dict:
    """Per layer and order: primes, rows and bytes (the plan printed before writing)."""
    layers = []
    for layer in plan.layer_ids:
        orders = []
        for n in plan.orders:
            primes = [int(p) for p in plan.primes[layer][n - 2]]
            orders.append({"order": n, "primes": primes, "rows": sum(primes), "bytes": sum(primes) * plan.head_dim * plan.dtype_bytes})
        layers.append({"layer_id": layer, "rows": plan.layer_rows(layer), "bytes": plan.layer_bytes(layer), "orders": orders, "multipliers": [str(m) for m in plan.multipliers[layer]]})
    return {
        "heads": plan.heads,
        "max_ngram_size": plan.max_ngram_size,
        "rows_per_head": list(plan.rows_per_head),
        "dim": plan.dim,
        "head_dim": plan.head_dim,
        "dtype": plan.dtype,
        "seed": plan.seed,
        "pad_id": plan.pad_id,
        "compressed_pad_id": plan.compressed_pad_id,
        "compressed_vocab_size": plan.compressed_vocab_size,
        "total_rows": plan.total_rows,
        "total_params": plan.total_params,
        "total_bytes": plan.total_bytes,
        "fingerprint": plan.fingerprint,
        "layers": layers,
    }


def decode_ngram(vocab: CompressedVocab, ids) -> list[str]:
    """The text of each compressed id of an n-gram (its normalized key)."""
    return [vocab.keys[int(i)] for i in ids]


def stats_report(stats: NgramStats, vocab: CompressedVocab) -> dict:
    """The n-gram summary with the most frequent n-grams decoded to text."""
    per_order = {}
    for n in stats.orders:
        s = dict(stats.order_summary(n))
        s["top"] = [{**t, "text": decode_ngram(vocab, t["ids"])} for t in s.get("top", [])]
        per_order[str(n)] = s
    return {"tokens": stats.summary.get("tokens"), "documents": stats.summary.get("documents"), "per_order": per_order}


@dataclass(frozen=True)
class BuildResult:
    store: TableStore
    corpus: dict  # CorpusSummary.to_dict()


def build_tables(
    paths: list[Path],
    out: Path,
    *,
    tokenizer: LoadedTokenizer,
    vocab: CompressedVocab,
    plan: TablePlan,
    force: bool = False,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    text_field: str = "text",
    add_special_tokens: bool = False,
    progress=None,
    replan: Callable[[NgramStats], TablePlan] | None = None,
    **store_options,
) -> BuildResult:
    """Count `paths`, write the plan's tables and statistics to `out` (atomically).

    `replan` (for `--rows-per-head auto`) is called with the counted statistics and
    returns the plan to write (same layers, orders and hash; e.g.
    `sizing.size_plan_to_target`); it runs after counting and before any table is
    written, so the caller can print the plan it made. `store_options` go to `store.write_tables` (init, init_std, chunk_bytes,
    shard_bytes, compressor, workers).
    """
    out = Path(out)
    # Output safety before the corpus is read (docs/build-table.md, "Failure modes"): the
    # output checked, locked until the end, leftovers settled, free space checked (for a
    # `replan` only once its plan is made, by `create_layout`).
    need = 0 if replan is not None else planned_write_bytes(plan, store_options.get("init", DEFAULT_INIT))
    partial = prepare_partial(out, force, inputs=paths, need=need)
    try:
        corpus, stats = count_corpus(
            list(paths),
            tokenizer=tokenizer,
            vocab=vocab,
            max_ngram_size=plan.max_ngram_size,
            pad_id=plan.compressed_pad_id,
            out_dir=partial / "stats",
            memory_limit=memory_limit,
            text_field=text_field,
            add_special_tokens=add_special_tokens,
            progress=progress,
        )
        if replan is not None:
            plan = replan(stats)
        write_tables(
            partial,
            plan,
            vocab,
            stats=stats,
            memory_limit=memory_limit,
            extra_attrs={"corpus": corpus.to_dict(), "stats": {k: v for k, v in stats.summary.items() if k != "per_order"}},
            progress=progress,
            tokenizer=tokenizer,
            **store_options,
        )
        store = finalize(partial, out, force)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)  # ours: prepare_partial made it
        converted = storage_error(out, e)  # disk full or a permission error, while counting or writing
        if converted is not None:
            raise converted from None
        raise
    finally:
        release_output(out)
    return BuildResult(store=store, corpus=corpus.to_dict())


# -- counting: corpus -> statistics (moved here from encode.py) ---------------------------
TOKENIZE_SHARE = 0.125  # of --memory-limit, for the tokenizer batches in flight; the rest counts


def count_corpus(
    paths: list[str | os.PathLike],
    *,
    tokenizer: LoadedTokenizer,
    vocab: CompressedVocab,
    max_ngram_size: int,
    pad_id: int,
    out_dir: str | Path,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    text_field: str = "text",
    batch_size: int = DEFAULT_BATCH_SIZE,
    add_special_tokens: bool = False,
    progress: Callable[..., None] | None = None,
    spill_dir: str | Path | None = None,
) -> tuple[CorpusSummary, NgramStats]:
    """Read, tokenize, compress and count a corpus: the n-gram statistics of `build-table`.

    `pad_id` is the *compressed* pad id. Writes `out_dir/order_{n}.parquet` and
    `summary.json` (with the corpus figures under "corpus"). Raises `CorpusError` for
    a missing path or a corpus without documents or tokens.

    Memory: documents are read and tokenized in pieces (`corpus.TEXT_PIECE_BYTES`), so
    nothing grows with the size of one document. `memory_limit` is shared:
    `TOKENIZE_SHARE` of it sizes the tokenizer batches in flight (`batch_chars_for`),
    the rest bounds the counting buffers (`count_ngrams`).
    """
    out_dir = Path(out_dir)
    summary = CorpusSummary()
    files = corpus_files(paths, summary)  # expanded once, here; a missing path fails before any work; skipped stores are counted
    progress = locked_progress(progress)
    docs = iter_documents(files, text_field=text_field, summary=summary, progress=progress, tmp_dir=spill_dir, expanded=True)
    tokenize_bytes = int(memory_limit * TOKENIZE_SHARE)
    ids = encode_documents(
        docs, tokenizer=tokenizer, vocab=vocab, batch_size=batch_size, batch_chars=batch_chars_for(tokenize_bytes),
        add_special_tokens=add_special_tokens, progress=progress,
    )
    stats = count_ngrams(
        ids,
        max_ngram_size=max_ngram_size,
        pad_id=pad_id,
        vocab_size=vocab.compressed_size,
        out_dir=out_dir,
        memory_limit=memory_limit - tokenize_bytes,
        spill_dir=spill_dir,
        progress=progress,
    )
    summary.tokens = int(stats.summary["tokens"])
    if summary.tokens == 0:
        for n in stats.orders:
            order_file(out_dir, n).unlink(missing_ok=True)
        (out_dir / SUMMARY_FILE).unlink(missing_ok=True)
        raise CorpusError(empty_corpus_message(files, summary, text_field))
    full = {**stats.summary, "corpus": summary.to_dict()}
    write_summary(out_dir, full)
    return summary, NgramStats(root=out_dir, summary=full)


def count_shard(
    files: list[str | os.PathLike],
    *,
    tokenizer: LoadedTokenizer | str,
    vocab: CompressedVocab | str | os.PathLike,
    max_ngram_size: int,
    pad_id: int,
    out_dir: str | Path,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    text_field: str = "text",
    add_special_tokens: bool = False,
    spill_dir: str | Path | None = None,
) -> NgramStats:
    """Count one corpus shard (a list of files) into `out_dir`: the unit of a distributed build.

    Picklable by design (a module-level function whose arguments may all be plain
    values): `tokenizer` may be a tokenizer spec (`deepseek`, a tokenizer.json or a
    directory, loaded in the worker so no Rust handle crosses a process boundary) and
    `vocab` a vocab.npz path. `pad_id` is the *compressed* pad id. The shards' results,
    in corpus order, go to `ngrams.merge_stats`, which gives exactly the statistics of
    counting the files one after the other in one process.
    """
    from .vocab import load_tokenizer

    if not isinstance(tokenizer, LoadedTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if not isinstance(vocab, CompressedVocab):
        vocab = CompressedVocab.load(vocab)
    _, stats = count_corpus(
        list(files), tokenizer=tokenizer, vocab=vocab, max_ngram_size=max_ngram_size, pad_id=pad_id,
        out_dir=out_dir, memory_limit=memory_limit, text_field=text_field, add_special_tokens=add_special_tokens, spill_dir=spill_dir,
    )
    return stats


__all__ = ["count_corpus", "count_shard", "merge_stats"]
