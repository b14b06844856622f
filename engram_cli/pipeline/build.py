"""The build: ONE `build_tables` (corpus -> n-gram statistics -> plan -> Zarr tables), in this process or on any executor.

`plan_tables` turns the user's parameters into the reference `TablePlan` (docs/spec.md,
"Table plan"). `build_tables` counts the corpus into a staged store
(`store.staging.staged_output`), re-plans from the counted statistics when asked
(`replan`: `--rows-per-head auto`), writes the tables there (`store.write_tables`) and
moves the store into place, so an interrupted run never leaves a store that looks
complete. With no executor and no cluster everything runs in this process; with one
(`--cluster`: a Ray cluster, or any `concurrent.futures.Executor`) the same steps run
as tasks: map/reduce counting (`pipeline.count`), hit-count ranges and Zarr shards
(`store.writer`), and the store is the same, byte for byte (its attributes gain
`extra.cluster`: where it ran).
"""

from __future__ import annotations

import concurrent.futures as cf
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..corpus import CorpusSummary, corpus_files
from ..defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_TEXT_FIELD
from ..errors import CorpusError, PlanError
from ..execution.ray import DEFAULT_MAX_RETRIES, ClusterSpec, executor_for
from ..execution.work import Progress, WorkDir, default_work_dir, fingerprint
from ..ngrams import NgramStats
from ..plan import Budget, TablePlan, fit_plan_to_budget, make_plan
from ..store import TableStore, planned_write_bytes, write_tables
from ..store.format import DEFAULT_INIT, partial_path
from ..store.output import check_inputs_apart
from ..store.staging import staged_output
from ..vocab import CompressedVocab, LoadedTokenizer
from .count import count_corpus, identity_check_for


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


@dataclass(frozen=True)
class BuildResult:
    store: TableStore
    corpus: dict  # CorpusSummary.to_dict()


@dataclass
class DistributedOptions:
    """The scheduling knobs of a build on an executor or cluster (the table options go to the store)."""

    work_dir: Path | None = None  # default: .OUT.work beside the output (hidden: never read as corpus)
    resume: bool = False
    map_bytes: int | None = None  # corpus bytes per map shard (default shards.DEFAULT_SHARD_BYTES)
    partitions: int | None = None  # radix partitions (reduce tasks); default: `count.auto_partitions`
    max_retries: int = DEFAULT_MAX_RETRIES
    keep_work: bool = False  # keep the partials after a successful build


def build_tables(
    paths: list[Path],
    out: Path,
    *,
    tokenizer: LoadedTokenizer,
    vocab: CompressedVocab,
    plan: TablePlan,
    executor: cf.Executor | None = None,
    cluster: ClusterSpec | str | None = None,
    options: DistributedOptions | None = None,
    force: bool = False,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    text_field: str = DEFAULT_TEXT_FIELD,
    add_special_tokens: bool = False,
    progress: Progress | None = None,
    replan: Callable[[NgramStats], TablePlan] | None = None,
    on_counted: Callable[[TablePlan, NgramStats], None] | None = None,
    **store_options,
) -> BuildResult:
    """Count `paths`, write the plan's tables and statistics to `out` (atomically).

    `replan` (for `--rows-per-head auto`) is called with the counted statistics and
    returns the plan to write (same layers, orders and hash; e.g.
    `sizing.size_plan_to_target`); it runs after counting and before any table is
    written, so the caller can print the plan it made. `on_counted(plan, stats)` runs
    then too, with the plan to write (the saturation notice). `store_options` go to
    `store.write_tables` (init, init_std, chunk_bytes, shard_bytes, compressor, workers).

    With `executor` (any `concurrent.futures.Executor`, not shut down here) or
    `cluster` (a Ray `ClusterSpec` or its text, joined for the build), counting, hit
    counts and shard writes run as tasks; `options` holds their knobs (work directory,
    resume, map shard bytes, radix partitions), and `memory_limit` is per task. A failed
    scaled-out build keeps its work directory, so a rerun with `options.resume` redoes
    only the missing partials; success removes it (unless `options.keep_work`).

    The corpus is encoded by `tokenizer`'s engine; with a fast one (`tokenizer.fast`) a
    sample of the texts is re-encoded by the reference (`engines.IdentityCheck`, in each
    map task when scaled out), a difference stops the build before anything is published
    (`TokenizerError`), and the check's record goes into the store's `tokenizer`
    attribute (`identity`; null for the reference engine).
    """
    out = Path(out)
    # Output safety before the corpus is read (docs/build-table.md, "Failure modes"): the
    # output checked, locked until the end, leftovers settled, free space checked (for a
    # `replan` only once its plan is made, by `create_layout`).
    need = 0 if replan is not None else planned_write_bytes(plan, store_options.get("init", DEFAULT_INIT))
    scaled = executor is not None or cluster is not None
    options = options or DistributedOptions()
    work = None
    if scaled:  # the partials live in a work directory every worker sees; never one holding the corpus
        work = WorkDir(Path(options.work_dir) if options.work_dir else default_work_dir(out),
                       fingerprint("build", tokenizer.sha256, vocab.fingerprint, plan.max_ngram_size, plan.compressed_pad_id, add_special_tokens, text_field))
        check_inputs_apart(work.root, paths, what="work directory", option="--work-dir")
        # nor the output: a work dir inside it blocks the move into place, an output inside it goes with its cleanup
        check_inputs_apart(work.root, [out, partial_path(out)], what="work directory", option="--work-dir", source="output")
    with staged_output(out, force, inputs=paths, need=need) as staging:
        if work is not None:
            work.open(options.resume)
        with executor_for(cluster, executor, options.max_retries) if scaled else nullcontext((None, None)) as (ex, where):
            if scaled:  # tasks: the knobs of the map/reduce count, and shard writers for every CPU
                cpus = where.get("cpus") or store_options.get("workers") or 1
                store_options["workers"] = 2 * cpus
                tasks = dict(executor=ex, work=work, map_bytes=options.map_bytes, partitions=options.partitions, cpus=cpus, resume=options.resume)
            else:
                tasks = {}
            check = identity_check_for(tokenizer)
            corpus, stats = count_corpus(
                list(paths), tokenizer=tokenizer, vocab=vocab, max_ngram_size=plan.max_ngram_size, pad_id=plan.compressed_pad_id,
                out_dir=staging.partial / "stats", memory_limit=memory_limit, text_field=text_field,
                add_special_tokens=add_special_tokens, progress=progress, check=check, **tasks,
            )
            plan = replan(stats) if replan is not None else plan
            if on_counted is not None:
                on_counted(plan, stats)
            attrs = {"corpus": corpus.to_dict(), "stats": {k: v for k, v in stats.summary.items() if k != "per_order"}}
            if scaled:
                attrs["cluster"] = where
            write_tables(staging.partial, plan, vocab, stats=stats, memory_limit=memory_limit, extra_attrs=attrs, progress=progress,
                         executor=ex, tokenizer=tokenizer, identity=check.to_dict() if check is not None else None, **store_options)
    if work is not None and not options.keep_work:
        work.remove()
    return BuildResult(store=staging.store, corpus=corpus.to_dict())
