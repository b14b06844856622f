"""Counting a corpus into n-gram statistics: ONE `count_corpus`, in this process or as map/reduce tasks on any Executor.

Without an executor the whole corpus is the one map: read, tokenized and counted here,
straight into the output directory (no shards, no work directory, nothing to reduce).
With one, the same shard-level functions run as tasks:

    map      one group of corpus shards (`engram_cli.corpus.shards`) -> partial statistics
             (`count_map_shard`: `encode.encode_documents` + `ngrams.count_ngrams` on the
             shards' documents, the tokenizer loaded in the task's own process, no Rust
             handle crosses a process boundary), with a sample of its tok_0 quantiles
    reduce   one radix partition (a `tok_0` range) of every partial ->
             `ngrams.merge_stats(..., tok0_range=)` (`merge_partition`);
             `ngrams.concat_stats` joins the partitions, in order

Partials are written atomically under a `execution.work.WorkDir` and reused by a rerun
with `resume` when their fingerprint (shard, tokenizer, vocabulary, orders, pad id)
matches. Both ways give the same statistics files, byte for byte (a file's bytes depend
on its rows only: `ngrams.STATS_ROW_GROUP`).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..corpus import CorpusSummary, corpus_files, empty_corpus_message, iter_documents
from ..corpus.shards import (
    DEFAULT_SHARD_BYTES,
    group_shards,
    iter_shard_documents,
    merge_summaries,
    plan_shards,
)
from ..defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_TEXT_FIELD
from ..engines import IdentityCheck
from ..encode import (
    DEFAULT_BATCH_CHARS,
    DEFAULT_BATCH_SIZE,
    batch_chars_for,
    encode_documents,
    locked_progress,
)
from ..errors import CorpusError, TokenizerError
from ..execution.work import (
    WORK_FORMAT,
    Progress,
    StageCounter,
    WorkDir,
    atomic_dir,
    fingerprint,
    is_done,
    run_all,
)
from ..ngrams import (
    BYTES_PER_ROW_OVERHEAD,
    SUMMARY_FILE,
    NgramStats,
    concat_stats,
    count_ngrams,
    merge_stats,
    order_file,
    write_summary,
)
from ..kinds import TokenizerEngine
from ..vocab import CompressedVocab, LoadedTokenizer, load_tokenizer

TOKENIZE_SHARE = 0.125  # of --memory-limit, for the tokenizer batches in flight; the rest counts
TOK0_SAMPLE_FILE = "tok0_sample.json"  # a map partial's tok_0 quantiles: where the radix partitions cut
TOK0_SAMPLES = 256  # per order and map partial
IDENTITY_KEY = "identity"  # a map partial's summary.json: its `engines.IdentityCheck` record (the driver merges them)


def identity_check_for(tokenizer) -> IdentityCheck | None:
    """A fresh `engines.IdentityCheck` when `tokenizer` encodes with a fast engine, else None (the reference needs none)."""
    return IdentityCheck(engine=tokenizer.engine) if getattr(tokenizer, "fast", None) is not None else None


def count_corpus(
    paths: list[str | os.PathLike],
    *,
    tokenizer: LoadedTokenizer,
    vocab: CompressedVocab,
    max_ngram_size: int,
    pad_id: int,
    out_dir: str | Path,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    text_field: str = DEFAULT_TEXT_FIELD,
    batch_size: int = DEFAULT_BATCH_SIZE,
    add_special_tokens: bool = False,
    progress: Progress | None = None,
    spill_dir: str | Path | None = None,
    executor: cf.Executor | None = None,
    work: WorkDir | None = None,
    map_bytes: int | None = None,
    partitions: int | None = None,
    cpus: int = 1,
    resume: bool = False,
    check: IdentityCheck | None = None,
) -> tuple[CorpusSummary, NgramStats]:
    """Read, tokenize, compress and count a corpus: the n-gram statistics of `build-table`.

    `pad_id` is the *compressed* pad id. Writes `out_dir/order_{n}.parquet` and
    `summary.json` (with the corpus figures under "corpus"); returns (CorpusSummary,
    NgramStats). Raises `CorpusError` for a missing path or a corpus without documents
    or tokens.

    With `executor` (any `concurrent.futures.Executor`: threads, Ray...), the corpus is
    cut into map shards of about `map_bytes` (default `shards.DEFAULT_SHARD_BYTES`),
    counted as tasks into `work` (required then; on storage every worker sees) and
    merged in `partitions` radix partitions (default `auto_partitions`, from
    `memory_limit`, which is then per task, and `cpus`); `resume` reuses finished
    partials. Without one, everything runs here (`spill_dir`, `batch_size` apply).
    The statistics are the same either way, byte for byte.

    With a fast tokenization engine (`tokenizer.fast`), a sample of the texts is
    re-encoded by the reference (`engines.IdentityCheck`; `check`, the caller's to read
    its record afterwards, else a fresh one) and the first differing id raises
    `TokenizerError` before anything is returned. With an executor, each map task checks
    its own texts and its record is added to `check`.
    """
    check = check if check is not None else identity_check_for(tokenizer)
    if executor is None:
        return _count_here(paths, out_dir, tokenizer=tokenizer, vocab=vocab, max_ngram_size=max_ngram_size, pad_id=pad_id, memory_limit=memory_limit,
                           text_field=text_field, batch_size=batch_size, add_special_tokens=add_special_tokens, progress=progress, spill_dir=spill_dir, check=check)
    if work is None:
        raise ValueError("count_corpus(executor=...) needs work=WorkDir(...): the directory of the map and reduce partials")
    return _count_on(list(paths), out_dir, executor=executor, work=work, tokenizer=tokenizer, vocab=vocab, max_ngram_size=max_ngram_size, pad_id=pad_id,
                     memory_limit=memory_limit, text_field=text_field, add_special_tokens=add_special_tokens, map_bytes=map_bytes, partitions=partitions,
                     cpus=cpus, resume=resume, progress=progress, check=check)


def count_documents(
    docs,
    summary: CorpusSummary,
    *,
    tokenizer: LoadedTokenizer,
    vocab: CompressedVocab,
    max_ngram_size: int,
    pad_id: int,
    out_dir: str | Path,
    memory_limit: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    add_special_tokens: bool = False,
    progress: Progress | None = None,
    spill_dir: str | Path | None = None,
    check: IdentityCheck | None = None,
) -> NgramStats:
    """Tokenize, compress and count `docs` into `out_dir` (`memory_limit`: the counting buffers);
    the count of a whole corpus and of one map task alike. Sets `summary.tokens`. `check`:
    the `engines.IdentityCheck` of a fast engine (a mismatch raises `TokenizerError`)."""
    ids = encode_documents(docs, tokenizer=tokenizer, vocab=vocab, batch_size=batch_size, batch_chars=batch_chars, add_special_tokens=add_special_tokens,
                           progress=progress, check=check)
    stats = count_ngrams(ids, max_ngram_size=max_ngram_size, pad_id=pad_id, vocab_size=vocab.compressed_size, out_dir=out_dir,
                         memory_limit=memory_limit, spill_dir=spill_dir, progress=progress)
    summary.tokens = int(stats.summary["tokens"])
    return stats


def _count_here(
    paths: list[str | os.PathLike],
    out_dir: str | Path,
    *,
    tokenizer: LoadedTokenizer,
    vocab: CompressedVocab,
    max_ngram_size: int,
    pad_id: int,
    memory_limit: int,
    text_field: str,
    batch_size: int,
    add_special_tokens: bool,
    progress: Progress | None,
    spill_dir: str | Path | None,
    check: IdentityCheck | None,
) -> tuple[CorpusSummary, NgramStats]:
    """`count_corpus` without an executor: the whole corpus is the one map, counted here into `out_dir` (nothing to reduce).

    Memory: documents are read and tokenized in pieces (`corpus.readers.TEXT_PIECE_BYTES`), so
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
    stats = count_documents(
        docs, summary, tokenizer=tokenizer, vocab=vocab, max_ngram_size=max_ngram_size, pad_id=pad_id, out_dir=out_dir,
        memory_limit=memory_limit - tokenize_bytes, batch_size=batch_size, batch_chars=batch_chars_for(tokenize_bytes),
        add_special_tokens=add_special_tokens, progress=progress, spill_dir=spill_dir, check=check,
    )
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
    text_field: str = DEFAULT_TEXT_FIELD,
    add_special_tokens: bool = False,
    spill_dir: str | Path | None = None,
    tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF,
) -> NgramStats:
    """Count one corpus shard (a list of files) into `out_dir`: the unit of a distributed build.

    Picklable by design (a module-level function whose arguments may all be plain
    values): `tokenizer` may be a tokenizer spec (`deepseek`, a tokenizer.json or a
    directory, loaded in the worker so no Rust handle crosses a process boundary) and
    `vocab` a vocab.npz path. `pad_id` is the *compressed* pad id. The shards' results,
    in corpus order, go to `ngrams.merge_stats`, which gives exactly the statistics of
    counting the files one after the other in one process. `tokenizer_engine` is the
    engine a spec is loaded with (`vocab.load_tokenizer`).
    """
    if not isinstance(tokenizer, LoadedTokenizer):
        tokenizer = load_tokenizer(tokenizer, tokenizer_engine)
    if not isinstance(vocab, CompressedVocab):
        vocab = CompressedVocab.load(vocab)
    _, stats = count_corpus(
        list(files), tokenizer=tokenizer, vocab=vocab, max_ngram_size=max_ngram_size, pad_id=pad_id,
        out_dir=out_dir, memory_limit=memory_limit, text_field=text_field, add_special_tokens=add_special_tokens, spill_dir=spill_dir,
    )
    return stats


# -- map: count one group of corpus shards --------------------------------------------------------
_TOKENIZERS: dict[tuple[str, str], Any] = {}  # per worker process: (spec, engine) -> LoadedTokenizer, loaded on first use


def _tokenizer_in_process(spec: str, sha256: str, engine: str = TokenizerEngine.HF.library):
    """Load (once per process) the tokenizer named `spec` with `engine` and check it is the driver's."""
    tok = _TOKENIZERS.get((spec, engine))
    if tok is None:
        tok = _TOKENIZERS[(spec, engine)] = load_tokenizer(spec, engine)
    if tok.sha256 != sha256:
        raise TokenizerError(f"tokenizer {spec!r} on worker {socket.gethostname()} has sha256 {tok.sha256[:12]}, the driver's has {sha256[:12]}; install the same tokenizer on every node")
    return tok


def count_map_shard(
    pieces,
    out_dir: str,
    *,
    tokenizer: str,
    tokenizer_sha256: str,
    vocab,
    max_ngram_size: int,
    pad_id: int,
    fp: str,
    memory_limit: int,
    add_special_tokens: bool = False,
    resume: bool = False,
    tokenizer_engine: str = TokenizerEngine.HF.library,
) -> str:
    """Map task: count `pieces` (`shards.Shard`s, read in order) into partial statistics at `out_dir`; returns `out_dir`.

    The statistics are what `count_corpus` writes for the pieces' documents (with
    their `CorpusSummary` under "corpus"), but an empty task is not an error here:
    the driver checks the merged corpus. With `resume`, a finished partial of the same
    fingerprint `fp` is kept as it is. The tokenizer is loaded with `tokenizer_engine`
    (the driver's); with a fast engine the task checks a sample of its texts against the
    reference and records the check under `IDENTITY_KEY` in its summary (null otherwise).
    """
    out = Path(out_dir)
    if resume and is_done(out, fp):
        return str(out)
    with atomic_dir(out, fp) as tmp:
        (tmp / "started.json").write_text(json.dumps({"pid": os.getpid(), "shards": [p.index for p in pieces]}))  # what a kill test looks for
        tok = _tokenizer_in_process(tokenizer, tokenizer_sha256, tokenizer_engine)
        check = identity_check_for(tok)
        summary = CorpusSummary()
        docs = (doc for piece in pieces for doc in iter_shard_documents(piece, summary=summary, tmp_dir=tmp))
        stats = count_documents(docs, summary, tokenizer=tok, vocab=vocab, max_ngram_size=max_ngram_size, pad_id=pad_id, out_dir=tmp,
                                memory_limit=memory_limit, add_special_tokens=add_special_tokens, check=check)
        write_summary(tmp, {**stats.summary, "corpus": summary.to_dict(), IDENTITY_KEY: check.to_dict() if check is not None else None})
        (tmp / TOK0_SAMPLE_FILE).write_text(json.dumps(tok0_sample(stats)))
        (tmp / "started.json").unlink()
    return str(out)


# -- reduce: merge one radix partition ---------------------------------------------------------
def merge_partition(parts: list[str], out_dir: str, *, tok0_range: tuple[int, int] | None, fp: str, memory_limit: int, resume: bool = False) -> str:
    """Reduce task: the n-grams with `tok_0` in `tok0_range` of every partial, merged (`merge_stats`); None: all of them."""
    out = Path(out_dir)
    if resume and is_done(out, fp):
        return str(out)
    with atomic_dir(out, fp) as tmp:
        merge_stats(parts, tmp, memory_limit=memory_limit, tok0_range=None if tok0_range is None else tuple(tok0_range))
    return str(out)


def auto_partitions(partial_rows: dict[int, int], memory_limit: int, cpus: int) -> int:
    """Radix partitions for the reduce: 1 when every order's merge fits one key range, else `cpus`.

    Either way the statistics files are byte-identical to the single-process count's
    (`ngrams.STATS_ROW_GROUP`: a file's bytes depend on its rows only); one partition
    saves `concat_stats`' extra pass when the merge fits one task. The estimate is the
    sum of the partials' distinct rows per order, `partial_rows` (an upper bound).
    """
    overhead = BYTES_PER_ROW_OVERHEAD
    for n, rows in partial_rows.items():
        range_rows = max(1 << 6, memory_limit // (8 * (n + 1) * 2 * overhead))
        if rows > range_rows:
            return max(1, cpus)
    return 1


def radix_ranges(vocab_size: int, partitions: int, weights=None) -> list[tuple[int, int]]:
    """`partitions` contiguous `tok_0` ranges covering [0, vocab_size), in ascending order.

    Equal ranges of ids; with `weights` (estimated rows per tok_0 value, `tok0_weights`)
    ranges of about equal weight instead: tok_0 is Zipf-distributed, so equal id ranges
    would leave one reduce task with most of the rows. A value heavier than a share is a
    range of its own (a radix partition never splits one tok_0).
    """
    partitions = max(1, min(int(partitions), vocab_size))
    if weights is None or float(np.sum(weights)) <= 0:
        bounds = [vocab_size * i // partitions for i in range(partitions + 1)]
    else:
        cum = np.cumsum(np.asarray(weights, dtype=np.float64))
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, partitions) / partitions, side="left") + 1
        bounds = [0, *sorted({int(c) for c in cuts if 0 < c < vocab_size}), vocab_size]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def tok0_sample(stats, samples: int = TOK0_SAMPLES) -> dict:
    """Per order of a (map partial's) statistics: every `step`-th row's tok_0 (its rows are
    sorted, so these are quantiles), each standing for `step` rows. Reads the tok_0 column once."""
    out = {}
    for n in stats.orders:
        rows = stats.distinct(n)
        step = max(1, -(-rows // samples))
        values = stats.scan(n).select(pl.col("tok_0").gather_every(step)).collect().get_column("tok_0").to_list() if rows else []
        out[str(n)] = {"step": step, "values": values}
    return out


def tok0_weights(map_dirs: list[str], vocab_size: int):
    """Estimated rows per tok_0 value over the map partials (from their `tok0_sample`), or None
    when a partial has none. O(vocab) memory in the driver, whatever the corpus size."""
    weights = np.zeros(vocab_size, dtype=np.float64)
    for d in map_dirs:
        try:
            sample = json.loads((Path(d) / TOK0_SAMPLE_FILE).read_text())
        except (OSError, ValueError):
            return None
        for entry in sample.values():
            values = np.asarray(entry["values"], dtype=np.int64)
            np.add.at(weights, values[(values >= 0) & (values < vocab_size)], float(entry["step"]))
    return weights


# -- the map/reduce driver -----------------------------------------------------------------------
def _count_on(
    paths: list,
    stats_out: Path,
    *,
    executor: cf.Executor,
    work: WorkDir,
    tokenizer,
    vocab,
    max_ngram_size: int,
    pad_id: int,
    memory_limit: int,
    text_field: str = DEFAULT_TEXT_FIELD,
    add_special_tokens: bool = False,
    map_bytes: int | None = None,
    partitions: int | None = None,
    cpus: int = 1,
    resume: bool = False,
    progress: Progress | None = None,
    check: IdentityCheck | None = None,
):
    """`count_corpus` on `executor`: map (count shards) and reduce (merge radix partitions) into `stats_out`.

    Each map task loads the tokenizer with the driver's engine and checks its own texts;
    their records are added to `check` (a partial reused by `resume` adds its own)."""
    first = CorpusSummary()
    files = corpus_files(paths, first)
    map_bytes = map_bytes or DEFAULT_SHARD_BYTES
    groups = group_shards(plan_shards(files, expanded=True, shard_bytes=map_bytes, text_field=text_field), map_bytes)
    share = getattr(executor, "share", lambda x: x)
    vocab_arg = share(vocab)
    base = (WORK_FORMAT, tokenizer.sha256, vocab.fingerprint, max_ngram_size, pad_id, add_special_tokens)
    map_fps = [fingerprint("map", [s.fingerprint for s in g], *base) for g in groups]
    map_dirs = [str(work.map_dir / f"{i:06d}-{fp[:16]}") for i, fp in enumerate(map_fps)]
    weights = [sum(max(1, s.weight) for s in g) for g in groups]
    reused = sum(1 for d, fp in zip(map_dirs, map_fps) if resume and is_done(Path(d), fp))
    counter = StageCounter(progress, "map shards", float(sum(weights)))
    if reused:
        counter.report(f"{reused} of {len(groups)} shards reused (--resume)")
    calls = [
        (count_map_shard, (g, d), dict(tokenizer=tokenizer.name, tokenizer_sha256=tokenizer.sha256, vocab=vocab_arg, max_ngram_size=max_ngram_size,
                                        pad_id=pad_id, fp=fp, memory_limit=memory_limit, add_special_tokens=add_special_tokens, resume=resume,
                                        tokenizer_engine=tokenizer.engine))
        for g, d, fp in zip(groups, map_dirs, map_fps)
    ]
    run_all(executor, calls, lambda i, _: counter.add(weights[i], groups[i][0].describe() + (f" (+{len(groups[i]) - 1} more)" if len(groups[i]) > 1 else "")))
    corpus, partial_rows = first, {}  # folded one partial at a time: the driver never holds every summary
    for d in map_dirs:
        part = NgramStats.open(d)
        corpus = merge_summaries(corpus, [CorpusSummary.from_dict(part.summary["corpus"])])
        if check is not None:
            check.add(part.summary.get(IDENTITY_KEY))
        for n in part.orders:
            partial_rows[n] = partial_rows.get(n, 0) + part.distinct(n)
    if corpus.documents == 0 or corpus.tokens == 0:
        raise CorpusError(empty_corpus_message(files, corpus, text_field))

    partitions = partitions or auto_partitions(partial_rows, memory_limit, cpus)
    ranges: list = radix_ranges(vocab.compressed_size, partitions, tok0_weights(map_dirs, vocab.compressed_size)) if partitions > 1 else [None]
    red_fps = [fingerprint("reduce", map_fps, r, memory_limit) for r in ranges]
    red_dirs = [str(work.reduce_dir / f"{i:04d}-{fp[:16]}") for i, fp in enumerate(red_fps)]
    rcounter = StageCounter(progress, "merge partitions", float(len(ranges)))
    calls = [(merge_partition, (map_dirs, d), dict(tok0_range=r, fp=fp, memory_limit=memory_limit, resume=resume)) for r, d, fp in zip(ranges, red_dirs, red_fps)]
    run_all(executor, calls, lambda i, _: rcounter.add(1, "all n-grams" if ranges[i] is None else f"tok_0 in [{ranges[i][0]}, {ranges[i][1]})"))
    if ranges == [None]:
        stats_out = Path(stats_out)
        stats_out.mkdir(parents=True, exist_ok=True)
        merged = NgramStats.open(red_dirs[0])
        for n in merged.orders:
            shutil.copyfile(order_file(merged.root, n), order_file(stats_out, n))
        stats = NgramStats(root=stats_out, summary=merged.summary)
    else:
        stats = concat_stats(red_dirs, stats_out)
    full = {**{k: v for k, v in stats.summary.items() if k != "corpus"}, "corpus": corpus.to_dict()}
    write_summary(stats_out, full)
    return corpus, NgramStats(root=Path(stats_out), summary=full)


__all__ = [
    "IDENTITY_KEY", "TOK0_SAMPLES", "TOKENIZE_SHARE", "auto_partitions", "count_corpus", "count_documents", "count_map_shard", "count_shard", "identity_check_for",
    "merge_partition", "radix_ranges", "tok0_sample", "tok0_weights",
]
