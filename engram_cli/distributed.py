"""Ray scheduling of the build's shard-level functions: map, radix reduce and materialize on a cluster.

The distributed build adds scheduling, not a second implementation. Every task runs a
function the single-process path runs too:

    map           one corpus shard (`engram_cli.shards`) -> partial n-gram statistics:
                  `encode.encode_documents` + `ngrams.count_ngrams`, the pieces of
                  `count_corpus`, on the shard's documents; loads the tokenizer in the
                  task's own process (no Rust handle crosses a process boundary)
    reduce        one radix partition (a `tok_0` range) of every partial ->
                  `ngrams.merge_stats(..., tok0_range=)`; `ngrams.concat_stats` joins
                  the partitions, in order, into the store's `stats/`
    materialize   the store's public steps: `create_layout`, `count_hits_range` per row
                  range, `run_shard_task` per Zarr shard (each written by one task,
                  through `run_shard_tasks(..., executor=)`), `mark_complete`

The collision audit (`engram collisions --cluster`) runs `collisions`' pieces on
bucket ranges of each head (`audit_collisions_partitioned`: a shuffle by bucket range,
per-range sums and top-k, a join by row for s(x)), merged exactly into the
single-process report.

Tasks run through `RayExecutor`, a `concurrent.futures.Executor` over Ray tasks (any
other Executor works too: tests compare with a thread pool). Map and reduce outputs
are written atomically (a temporary directory renamed into place, a `done.json`
marker last) under `--work-dir`, which every worker must see (a shared file system
on a real cluster); Ray retries a task whose worker died (`max_retries`), and a rerun
with `resume=True` reuses every partial whose fingerprint (shard, tokenizer,
vocabulary, orders, pad id) matches. Nothing here imports Ray until a cluster is
asked for; without the `ray` extra, `ClusterError` names `pip install 'engram-cli[ray]'`.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import socket
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from .errors import ClusterError, CorpusError, ResumeError, TokenizerError

Progress = Callable[..., None]

INSTALL_HINT = "pip install 'engram-cli[ray]'"
WORK_FORMAT = "engram-work/2"  # 2: statistics files with fixed row groups, tok_0 samples
WORK_FILE = "work.json"  # marks a directory as ours: only then do we delete inside it
DONE_FILE = "done.json"  # written last in a partial's directory: its fingerprint
TOK0_SAMPLE_FILE = "tok0_sample.json"  # a map partial's tok_0 quantiles: where the radix partitions cut
TOK0_SAMPLES = 256  # per order and map partial
DEFAULT_MAX_RETRIES = 3  # Ray re-runs a task whose worker process died this many times
ClusterKind = Literal["local", "address"]


# -- the cluster -------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterSpec:
    """Where tasks run: a local cluster of `workers` processes, or a running cluster at `address`."""

    kind: str  # "local" | "address"
    workers: int | None = None  # local: worker processes (num_cpus); None = CPU count
    address: str | None = None  # "auto" (RAY_ADDRESS or the local head) | "ray://host:port" | "host:port"

    def describe(self) -> str:
        return f"local:{self.workers}" if self.kind == "local" else str(self.address)


def parse_cluster(text: str) -> ClusterSpec:
    """`local`, `local:N`, `auto` or `ray://HOST:PORT` (also `HOST:PORT`); `ClusterError` otherwise."""
    value = text.strip()
    if value == "local":
        return ClusterSpec("local", os.cpu_count() or 1)
    if value.startswith("local:"):
        n = value.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ClusterError(f"--cluster {text!r}: the worker count after 'local:' must be a positive integer, e.g. --cluster local:4")
        return ClusterSpec("local", int(n))
    if value == "auto":
        return ClusterSpec("address", address="auto")
    if value.startswith("ray://") or (":" in value and value.rsplit(":", 1)[1].isdigit()):
        return ClusterSpec("address", address=value)
    raise ClusterError(f"--cluster {text!r} is not a cluster: use local, local:N, auto (a running cluster, RAY_ADDRESS honoured) or ray://HOST:PORT")


def check_cluster_options(cluster: str | None, *, work_dir=None, resume: bool = False) -> ClusterSpec | None:
    """The CLI's --cluster/--work-dir/--resume, checked before any work: the spec, or None (one process).

    Raises `ClusterError` for a bad --cluster, for --work-dir/--resume without it, and
    when Ray is not installed (naming the extra).
    """
    if cluster is None:
        if work_dir is not None or resume:
            flag = "--work-dir" if work_dir is not None else "--resume"
            raise ClusterError(f"{flag} applies to distributed builds only; add --cluster local:N (or auto, ray://HOST:PORT), or drop {flag}")
        return None
    spec = parse_cluster(cluster)
    import_ray()
    return spec


def import_ray():
    """The `ray` module, or `ClusterError` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--cluster needs Ray, which is not installed here; {INSTALL_HINT} (or build without --cluster)") from None
    return ray


@dataclass
class Cluster:
    """A joined cluster: its spec and what it offers (for the store's `cluster` attribute)."""

    spec: ClusterSpec
    cpus: int
    nodes: int
    started: bool  # we started it (a local cluster) and shut it down on exit

    @property
    def description(self) -> dict:
        return {"cluster": self.spec.describe(), "cpus": self.cpus, "nodes": self.nodes, "ray": _ray_version()}


def _ray_version() -> str:
    import ray

    return ray.__version__


@contextmanager
def connect(spec: ClusterSpec | str) -> Iterator[Cluster]:
    """Start (local) or join (address) a Ray cluster for the duration of the block.

    A local cluster is `ray.init(num_cpus=N, include_dashboard=False)`: N worker
    processes, no dashboard, shut down on exit. Joining never shuts the cluster down.
    A Ray session already initialised in this process is reused as it is.
    """
    spec = parse_cluster(spec) if isinstance(spec, str) else spec
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        common = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if spec.kind == "local":
                # RAY_ADDRESS would make init join a cluster instead of starting one.
                saved = os.environ.pop("RAY_ADDRESS", None)
                try:
                    ray.init(num_cpus=spec.workers, **common)
                finally:
                    if saved is not None:
                        os.environ["RAY_ADDRESS"] = saved
            else:
                ray.init(address=spec.address, **{k: v for k, v in common.items() if k != "include_dashboard"})
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ClusterError(f"cannot join the Ray cluster {spec.describe()!r} ({first}); start one with `ray start --head`, or use --cluster local:N") from None
        started = True
    try:
        res = ray.cluster_resources()
        yield Cluster(spec, int(res.get("CPU", 0)), len([n for n in ray.nodes() if n.get("Alive")]), started)
    finally:
        if started:
            ray.shutdown()


# -- the executor ----------------------------------------------------------------------------
def _call(fn: Callable, *args, **kwargs):
    """The body of every Ray task: a plain call (module-level, so Ray pickles it by name)."""
    return fn(*args, **kwargs)


class RayExecutor(cf.Executor):
    """A `concurrent.futures.Executor` whose `submit` runs `fn(*args, **kwargs)` as a Ray task.

    Each task asks for `num_cpus` CPUs and is re-run up to `max_retries` times when its
    worker process dies (Ray's task retries; an exception the function raises is not
    retried). Futures carry the task's own exception (not Ray's wrapper), so an
    `EngramError` raised in a worker reaches the CLI as its one-line message. Needs a
    connected Ray (see `connect`). `share(obj)` puts a large argument in the object
    store once; pass the result as a top-level argument and each task gets the value.
    """

    def __init__(self, *, max_retries: int = DEFAULT_MAX_RETRIES, num_cpus: float = 1):
        ray = import_ray()
        if not ray.is_initialized():
            raise ClusterError("RayExecutor needs a connected Ray cluster; use engram_cli.distributed.connect(...) first")
        self._ray = ray
        self._task = ray.remote(max_retries=max_retries, num_cpus=num_cpus)(_call)
        self._lock = threading.Lock()
        self._pending: dict[cf.Future, Any] = {}
        self._closed = False

    def share(self, obj):
        return self._ray.put(obj)

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a RayExecutor after shutdown")
            ref = self._task.remote(fn, *args, **kwargs)
            out: cf.Future = cf.Future()
            out.set_running_or_notify_cancel()
            self._pending[out] = ref
        ray_future = ref.future()

        def done(f: cf.Future) -> None:
            with self._lock:
                self._pending.pop(out, None)
            if f.cancelled():
                out.set_exception(cf.CancelledError())
                return
            exc = f.exception()
            if exc is None:
                out.set_result(f.result())
            else:
                out.set_exception(_unwrap(exc))

        ray_future.add_done_callback(done)
        return out

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            pending = dict(self._pending)
        if cancel_futures:
            for ref in pending.values():
                try:
                    self._ray.cancel(ref, force=False)
                except Exception:  # already finished or gone
                    pass
        if wait:
            cf.wait(list(pending))


def _unwrap(exc: BaseException) -> BaseException:
    """The exception a task raised, out of Ray's RayTaskError; a dead worker as a ClusterError."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    name = type(exc).__name__
    if name in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError"):
        first = (str(exc).splitlines() or [name])[0]
        return ClusterError(f"a Ray worker died {DEFAULT_MAX_RETRIES + 1} times running a task ({name}: {first}); check worker memory (--memory-limit is per task), then rerun with --resume")
    return exc


# -- atomic partials -----------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of `parts`: what a partial was made from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def read_done(path: Path) -> dict | None:
    """The `done.json` of a finished partial, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(path) / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None


def is_done(path: Path, fp: str) -> bool:
    done = read_done(path)
    return done is not None and done.get("fingerprint") == fp


@contextmanager
def atomic_dir(final: Path, fp: str) -> Iterator[Path]:
    """Write a partial into a temporary sibling; on success mark it done and rename it to `final`.

    A task killed midway leaves only a `.tmp-*` directory (removed with the work
    directory); `final` either does not exist or is complete with its `done.json`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / DONE_FILE).write_text(json.dumps({"fingerprint": fp, "pid": os.getpid(), "host": socket.gethostname()}))
        if final.exists():  # a stale partial of another input (or a duplicate run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- map: count one corpus shard -------------------------------------------------------------
_TOKENIZERS: dict[str, Any] = {}  # per worker process: spec -> LoadedTokenizer, loaded on first use


def _tokenizer_in_process(spec: str, sha256: str):
    """Load (once per process) the tokenizer named `spec` and check it is the driver's."""
    from .vocab import load_tokenizer

    tok = _TOKENIZERS.get(spec)
    if tok is None:
        tok = _TOKENIZERS[spec] = load_tokenizer(spec)
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
) -> str:
    """Map task: count `pieces` (`shards.Shard`s, read in order) into partial statistics at `out_dir`; returns `out_dir`.

    The statistics are what `count_corpus` writes for the pieces' documents (with
    their `CorpusSummary` under "corpus"), but an empty task is not an error here:
    the driver checks the merged corpus. With `resume`, a finished partial of the same
    fingerprint `fp` is kept as it is.
    """
    from .corpus import CorpusSummary
    from .encode import encode_documents
    from .ngrams import count_ngrams
    from .shards import iter_shard_documents

    out = Path(out_dir)
    if resume and is_done(out, fp):
        return str(out)
    with atomic_dir(out, fp) as tmp:
        (tmp / "started.json").write_text(json.dumps({"pid": os.getpid(), "shards": [p.index for p in pieces]}))  # what a kill test looks for
        tok = _tokenizer_in_process(tokenizer, tokenizer_sha256)
        summary = CorpusSummary()
        docs = (doc for piece in pieces for doc in iter_shard_documents(piece, summary=summary, tmp_dir=tmp))
        ids = encode_documents(docs, tokenizer=tok, vocab=vocab, add_special_tokens=add_special_tokens)
        stats = count_ngrams(ids, max_ngram_size=max_ngram_size, pad_id=pad_id, vocab_size=vocab.compressed_size, out_dir=tmp, memory_limit=memory_limit)
        summary.tokens = int(stats.summary["tokens"])
        _write_summary(tmp, {**stats.summary, "corpus": summary.to_dict()})
        (tmp / TOK0_SAMPLE_FILE).write_text(json.dumps(tok0_sample(stats)))
        (tmp / "started.json").unlink()
    return str(out)


def _write_summary(root: Path, summary: dict) -> None:
    from .ngrams import write_summary

    write_summary(Path(root), summary)


# -- reduce: merge one radix partition ---------------------------------------------------------
def merge_partition(parts: list[str], out_dir: str, *, tok0_range: tuple[int, int] | None, fp: str, memory_limit: int, resume: bool = False) -> str:
    """Reduce task: the n-grams with `tok_0` in `tok0_range` of every partial, merged (`merge_stats`); None: all of them."""
    from .ngrams import merge_stats

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
    from . import ngrams

    overhead = ngrams.BYTES_PER_ROW_OVERHEAD
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
    import numpy as np

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
    import polars as pl

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
    import numpy as np

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


# -- the driver --------------------------------------------------------------------------------
@dataclass
class WorkDir:
    """The shared directory of a distributed build's partials (`.OUT.work` beside the output by default)."""

    root: Path
    build_fp: str

    @property
    def map_dir(self) -> Path:
        return self.root / "map"

    @property
    def reduce_dir(self) -> Path:
        return self.root / "reduce"

    def open(self, resume: bool) -> None:
        """Create it (or take it over); without `resume`, drop the partials of an earlier run."""
        marker = self.root / WORK_FILE
        if self.root.exists() and any(self.root.iterdir()) and not marker.is_file():
            raise ResumeError(f"--work-dir {str(self.root)!r} exists and is not an engram work directory; pass an empty or new directory")
        self.root.mkdir(parents=True, exist_ok=True)
        if marker.is_file():
            try:
                old = json.loads(marker.read_text())
            except ValueError:
                old = {}
            if resume and old.get("build") not in (None, self.build_fp):
                raise ResumeError(
                    f"--work-dir {str(self.root)!r} holds partials of another build (tokenizer, vocabulary or orders differ); "
                    "rerun without --resume to start afresh, or pass another --work-dir"
                )
        if not resume:
            for d in (self.map_dir, self.reduce_dir):
                shutil.rmtree(d, ignore_errors=True)
        marker.write_text(json.dumps({"format": WORK_FORMAT, "build": self.build_fp}))

    def remove(self) -> None:
        for d in (self.map_dir, self.reduce_dir):
            shutil.rmtree(d, ignore_errors=True)
        (self.root / WORK_FILE).unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:  # the user's directory with other content: leave it
            pass


def default_work_dir(out: str | os.PathLike) -> Path:
    """`.OUT.work` beside the output: hidden, so a corpus directory that holds the output never reads it as corpus."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


@dataclass
class StageCounter:
    """Reports a stage's progress as futures finish."""

    progress: Progress | None
    stage: str
    total: float
    done: float = 0.0

    def __post_init__(self) -> None:
        self.report("")

    def report(self, detail: str) -> None:
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total, detail)

    def add(self, amount: float, detail: str = "") -> None:
        self.done += amount
        self.report(detail)


def run_all(executor: cf.Executor, calls: list[tuple[Callable, tuple, dict]], on_done: Callable[[int, Any], None] | None = None) -> list:
    """Submit every call, wait for all; results in call order. The first error cancels the rest."""
    futures = [executor.submit(fn, *args, **kwargs) for fn, args, kwargs in calls]
    index = {f: i for i, f in enumerate(futures)}
    results: list = [None] * len(futures)
    try:
        for f in cf.as_completed(futures):
            results[index[f]] = f.result()
            if on_done is not None:
                on_done(index[f], results[index[f]])
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    return results


@dataclass
class DistributedOptions:
    """The scheduling knobs of a distributed build (the table options go to the store)."""

    work_dir: Path | None = None  # default: .OUT.work beside the output (hidden: never read as corpus)
    resume: bool = False
    map_bytes: int | None = None  # corpus bytes per map shard (default shards.DEFAULT_SHARD_BYTES)
    partitions: int | None = None  # radix partitions (reduce tasks); default: `auto_partitions`
    max_retries: int = DEFAULT_MAX_RETRIES
    keep_work: bool = False  # keep the partials after a successful build


def count_distributed(
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
    text_field: str = "text",
    add_special_tokens: bool = False,
    map_bytes: int | None = None,
    partitions: int | None = None,
    cpus: int = 1,
    resume: bool = False,
    progress: Progress | None = None,
):
    """Map (count shards) and reduce (merge radix partitions) into `stats_out`: the statistics of `count_corpus`.

    Returns (CorpusSummary, NgramStats), like `count_corpus`; raises `CorpusError` for
    a corpus without documents or tokens (checked on the merged figures).
    """
    from .corpus import CorpusSummary, corpus_files, empty_corpus_message
    from .ngrams import NgramStats, concat_stats, order_file
    from .shards import DEFAULT_SHARD_BYTES, group_shards, merge_summaries, plan_shards

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
                                        pad_id=pad_id, fp=fp, memory_limit=memory_limit, add_special_tokens=add_special_tokens, resume=resume))
        for g, d, fp in zip(groups, map_dirs, map_fps)
    ]
    run_all(executor, calls, lambda i, _: counter.add(weights[i], groups[i][0].describe() + (f" (+{len(groups[i]) - 1} more)" if len(groups[i]) > 1 else "")))
    corpus, partial_rows = first, {}  # folded one partial at a time: the driver never holds every summary
    for d in map_dirs:
        part = NgramStats.open(d)
        corpus = merge_summaries(corpus, [CorpusSummary.from_dict(part.summary["corpus"])])
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
    _write_summary(stats_out, full)
    return corpus, NgramStats(root=Path(stats_out), summary=full)


def materialize(
    partial: Path,
    plan,
    vocab,
    *,
    stats,
    executor: cf.Executor,
    memory_limit: int,
    extra_attrs: dict,
    progress: Progress | None = None,
    workers: int | None = None,
    **store_options,
) -> None:
    """The store's public steps on `executor`: layout, hit counts per row range, Zarr shards, complete."""
    from .store import (
        check_hit_totals,
        count_hits_range,
        create_layout,
        hit_passes,
        mark_complete,
        run_shard_tasks,
        shard_tasks,
    )

    layout = create_layout(partial, plan, vocab, stats=stats, memory_limit=memory_limit, extra_attrs=extra_attrs, **store_options)
    if layout.has_hits:
        passes = hit_passes(layout)
        counter = StageCounter(progress, "hit counts", float(len(passes)))
        calls = [(count_hits_range, (layout.path, plan, lid, a, b), dict(memory_limit=memory_limit)) for lid, a, b in passes]
        sums = run_all(executor, calls, lambda i, _: counter.add(1, f"layer {passes[i][0]} rows {passes[i][1]}:{passes[i][2]}"))
        for layer_id in plan.layer_ids:
            per_order = dict.fromkeys(plan.orders, 0)
            for (lid, _, _), got in zip(passes, sums):
                if lid == layer_id:
                    for order, n in got.items():
                        per_order[int(order)] += n
            check_hit_totals(plan, stats, layer_id, per_order)
    run_shard_tasks(shard_tasks(layout), executor, workers or 2, "threads", progress)
    mark_complete(partial)


def build_tables_distributed(
    paths: list,
    out: Path,
    *,
    cluster: ClusterSpec | str,
    tokenizer,
    vocab,
    plan,
    options: DistributedOptions | None = None,
    force: bool = False,
    memory_limit: int | None = None,
    text_field: str = "text",
    add_special_tokens: bool = False,
    progress: Progress | None = None,
    executor: cf.Executor | None = None,
    **store_options,
):
    """`build_table.build_tables` on a Ray cluster (or on `executor`): same store, bit for bit.

    Map, reduce and materialize as in the module docstring, into `<out>.partial`,
    renamed into place at the end. The store's attributes gain `cluster` (where it
    ran); everything else is what the single-process build writes. `memory_limit` is
    per task. A failure keeps the work directory, so a rerun with `options.resume`
    redoes only the missing partials; success removes it (unless `keep_work`).
    """
    from .build_table import BuildResult
    from .defaults import DEFAULT_MEMORY_LIMIT
    from .store import finalize, planned_write_bytes, prepare_partial
    from .store.format import DEFAULT_INIT
    from .store.output import check_inputs_apart, release_output, storage_error

    options = options or DistributedOptions()
    memory_limit = memory_limit or DEFAULT_MEMORY_LIMIT
    out = Path(out)
    work = WorkDir(Path(options.work_dir) if options.work_dir else default_work_dir(out),
                   fingerprint("build", tokenizer.sha256, vocab.fingerprint, plan.max_ngram_size, plan.compressed_pad_id, add_special_tokens, text_field))
    check_inputs_apart(work.root, paths, what="work directory", option="--work-dir")  # never a corpus inside the work directory (its partials are dropped)
    partial = prepare_partial(out, force, inputs=paths, need=planned_write_bytes(plan, store_options.get("init", DEFAULT_INIT)))
    workers = store_options.pop("workers", None)
    try:
        work.open(options.resume)
        with _executor(cluster, executor, options.max_retries) as (ex, description):
            n_cpus = description.get("cpus") or workers or 1
            corpus, stats = count_distributed(
                list(paths), partial / "stats", executor=ex, work=work, tokenizer=tokenizer, vocab=vocab,
                max_ngram_size=plan.max_ngram_size, pad_id=plan.compressed_pad_id, memory_limit=memory_limit,
                text_field=text_field, add_special_tokens=add_special_tokens, map_bytes=options.map_bytes,
                partitions=options.partitions, cpus=n_cpus, resume=options.resume, progress=progress,
            )
            attrs = {"corpus": corpus.to_dict(), "stats": {k: v for k, v in stats.summary.items() if k != "per_order"}, "cluster": description}
            materialize(partial, plan, vocab, stats=stats, executor=ex, memory_limit=memory_limit, extra_attrs=attrs, progress=progress, workers=2 * n_cpus, tokenizer=tokenizer, **store_options)
        store = finalize(partial, out, force)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)  # ours: prepare_partial made it
        converted = storage_error(out, e)  # disk full or a permission error, one line
        if converted is not None:
            raise converted from None
        raise
    finally:
        release_output(out)
    if not options.keep_work:
        work.remove()
    return BuildResult(store=store, corpus=corpus.to_dict())


# -- the collision audit, partitioned by bucket range ------------------------------------------------
# Bytes a bucket-range task holds per n-gram of its range and head: 40 + 16 * heads (row, ids,
# count, hash state, every head's bucket, masks, temporaries). Measured with tracemalloc on
# 1 M trigrams (docs/scale-out.md): 40-63 (reference) and 68-101 (xxh3) for 4-8 heads,
# under the formula's 104-168; a shuffle task holds 92-148 bytes per row of its row range.
AUDIT_BYTES_PER_HEAD = (40, 16)


def bucket_range(p: int, part: int, parts: int) -> tuple[int, int]:
    """Buckets [lo, hi) of range `part` of `parts` equal ranges of a head with `p` buckets."""
    return int(p) * part // parts, int(p) * (part + 1) // parts


def hash_state(plan, family: str, layer: int, order: int, ids, counts, heads: int):
    """`collisions.OrderKeys` of these n-grams (ids (m, n), counts (m,)): what every head's bucket comes from."""
    import numpy as np

    from .collisions import OrderKeys
    from .hashing import ngram_mix, xxh3_digests, xxh3_seed

    ids = np.asarray(ids, dtype=np.int64).reshape(-1, order)
    if family == "reference":
        return OrderKeys(family, layer, order, counts, mix=ngram_mix(ids, plan.multipliers[layer][:order]))
    return OrderKeys(family, layer, order, counts, digests=xxh3_digests(ids, [xxh3_seed(plan.seed, layer, order, j) for j in range(heads)]))


def range_of_bucket(b, p: int, parts: int):
    """The `bucket_range` index of each bucket b (inverse of `bucket_range`: p * r // parts <= b < p * (r + 1) // parts)."""
    import numpy as np

    return ((np.asarray(b, dtype=np.int64) + 1) * parts + int(p) - 1) // int(p) - 1


def stream_bucket_ranges(plan, stats, family: str, layer: int, order: int, primes, part: int, parts: int, *, batch_rows: int):
    """One streaming pass over an order's n-grams: for each head j (prime `primes[j]`), the
    (row indices, `collisions.OrderKeys`) of the n-grams whose head-j bucket lies in range
    `part` of `parts` (`bucket_range`). The keys hold the hash state of every head, so all
    their buckets follow; a head's bucket range holds every n-gram of its buckets.
    (`scatter_row_range` + `gather_bucket_ranges` give the same without re-reading the order.)"""
    import numpy as np

    K = len(primes)
    rows, counts, ids_ = ([[] for _ in range(K)] for _ in range(3))
    offset = 0
    for ids, cnt in stats.iter_batches(order, batch_rows):
        batch = hash_state(plan, family, layer, order, ids, cnt, K)
        for j, p in enumerate(primes):
            sel = np.flatnonzero(range_of_bucket(batch.buckets(j, p), p, parts) == part)
            rows[j].append(sel + offset)
            counts[j].append(cnt[sel])
            ids_[j].append(ids[sel])
        offset += cnt.size
    return [_range_keys(plan, family, layer, order, rows[j], ids_[j], counts[j], K) for j in range(K)]


def _range_keys(plan, family, layer, order, rows, ids, counts, heads):
    import numpy as np

    cat = lambda xs, empty: np.concatenate(xs) if xs else empty  # noqa: E731
    c = cat(counts, np.zeros(0, np.int64))
    return cat(rows, np.zeros(0, np.int64)), hash_state(plan, family, layer, order, cat(ids, np.zeros((0, order), np.int64)), c, heads)


def scatter_row_range(stats, plan, family: str, layer: int, order: int, start: int, stop: int, parts: int, out_dir: str) -> str:
    """Shuffle task: rows [start, stop) of an order, split for every head j by the bucket range
    (of `parts`) their head-j bucket falls in, into `out_dir/h{j}` (rows, ids as uint32, counts,
    each grouped by range in row order, and the groups' `offsets`). Written atomically."""
    import numpy as np
    import polars as pl

    from .ngrams import order_file, token_columns

    primes = [int(p) for p in plan.primes[layer][order - 2]]
    cols = token_columns(order)
    frame = pl.scan_parquet(order_file(stats.root, order)).select([*cols, "count"]).slice(start, stop - start).collect()
    ids = np.stack([frame.get_column(c).to_numpy().astype(np.int64) for c in cols], axis=1) if frame.height else np.zeros((0, order), np.int64)
    counts = frame.get_column("count").to_numpy().astype(np.int64)
    del frame
    keys = hash_state(plan, family, layer, order, ids, counts, len(primes))
    with atomic_dir(Path(out_dir), fingerprint(out_dir)) as tmp:
        for j, p in enumerate(primes):
            r = range_of_bucket(keys.buckets(j, p), p, parts)
            by_range = np.argsort(r, kind="stable")
            head = tmp / f"h{j}"
            head.mkdir()
            np.save(head / "offsets.npy", np.concatenate([[0], np.cumsum(np.bincount(r, minlength=parts))]))
            np.save(head / "rows.npy", by_range + start)
            np.save(head / "ids.npy", ids[by_range].astype(np.uint32))
            np.save(head / "counts.npy", counts[by_range])
    return out_dir


def gather_bucket_ranges(plan, family: str, layer: int, order: int, part: int, scatter_dirs: list[str]):
    """`stream_bucket_ranges` from the shuffle files of `scatter_row_range` (in row order):
    reads only this range's slice of each file."""
    import numpy as np

    K = len(plan.primes[layer][order - 2])
    out = []
    for j in range(K):
        rows, ids, counts = [], [], []
        for d in scatter_dirs:
            head = Path(d) / f"h{j}"
            lo, hi = np.load(head / "offsets.npy")[part:part + 2]
            rows.append(np.asarray(np.load(head / "rows.npy", mmap_mode="r")[lo:hi]))
            ids.append(np.asarray(np.load(head / "ids.npy", mmap_mode="r")[lo:hi], dtype=np.int64))
            counts.append(np.asarray(np.load(head / "counts.npy", mmap_mode="r")[lo:hi]))
        out.append(_range_keys(plan, family, layer, order, rows, ids, counts, K))
    return out


def audit_bucket_range(stats, plan, family: str, layer: int, order: int, part: int, parts: int, out_dir: str, *, top: int, scatter_dirs: list[str] | None = None, batch_rows: int = 1 << 20) -> dict:
    """Task: the audit of one (family, layer, order) over bucket range `part` of `parts` of every head.

    Returns each head's `head_sums` over its range, the range's `top` worst-bucket
    candidates with their members, and (head 0's range) the n-grams with a duplicated
    mix. Writes, per head j, the n-grams colliding in head j with the most heads they
    share with a partner of their bucket (`collisions.worst_partner_heads_through`), into
    `out_dir/h{j}` (rows, s, counts: .npy, row order): `audit_row_range` joins the heads
    by row into s(x). The range's n-grams come from the shuffle files of
    `scatter_row_range` (`scatter_dirs`, in row order), else from streaming the order.
    """
    import numpy as np

    from .collisions import (
        bucket_members,
        head_sums,
        rank_worst,
        worst_partner_heads_through,
    )

    primes = [int(p) for p in plan.primes[layer][order - 2]]
    result = {"heads": [], "worst": [], "mix_duplicates": None, "mix_dup_occurrences": None}
    cands = []
    subsets = (gather_bucket_ranges(plan, family, layer, order, part, scatter_dirs) if scatter_dirs is not None
               else stream_bucket_ranges(plan, stats, family, layer, order, primes, part, parts, batch_rows=batch_rows))
    for j, (rows, sub) in enumerate(subsets):
        lo, hi = bucket_range(primes[j], part, parts)
        buckets = [sub.buckets(i, p) for i, p in enumerate(primes)]
        sums, collide, worst = head_sums(buckets[j] - buckets[j].dtype.type(lo), sub.counts, hi - lo, head=j, top=top, offset=lo)
        result["heads"].append(sums)
        cands += [(c, rows[buckets[j] == c[4]]) for c in worst]
        dup = sub.mix_duplicated()
        if j == 0 and dup is not None:
            result["mix_duplicates"], result["mix_dup_occurrences"] = int(dup.sum()), int(sub.counts[dup].sum())
        s = worst_partner_heads_through([b[collide] for b in buckets], primes, j, mix_duplicated=None if dup is None else dup[collide])
        with atomic_dir(Path(out_dir) / f"h{j}", fingerprint(out_dir, j)) as tmp:
            for name, values in (("rows", rows[collide]), ("s", s), ("counts", sub.counts[collide])):
                np.save(tmp / f"{name}.npy", values)
    chosen = rank_worst([c for c, _ in cands], top)
    member_rows = {c: r for c, r in cands}
    members = bucket_members(stats, order, [member_rows[c] for c in chosen], vocab_keys=None)  # the driver decodes
    result["worst"] = list(zip(chosen, members))
    return result


def audit_row_range(head_dirs: list[str], heads: int, start: int, stop: int) -> dict:
    """Task: `collisions.across_sums` of the rows [start, stop) that collide in some head, joined
    from every head's bucket-range files (s(x) is the most over its heads, exact: x's worst
    partner shares one of x's buckets, so that head's range holds both)."""
    import numpy as np

    from .collisions import across_sums, count_dtype

    n = stop - start
    s = np.zeros(n, dtype=count_dtype(heads))
    colliding = np.zeros(n, dtype=count_dtype(heads))
    counts = np.zeros(n, dtype=np.int64)
    for d in head_dirs:
        rows = np.load(Path(d) / "rows.npy", mmap_mode="r")
        i, k = np.searchsorted(rows, [start, stop])
        local = np.asarray(rows[i:k]) - start
        s[local] = np.maximum(s[local], np.load(Path(d) / "s.npy", mmap_mode="r")[i:k])
        colliding[local] += 1
        counts[local] = np.load(Path(d) / "counts.npy", mmap_mode="r")[i:k]
    seen = colliding > 0
    return across_sums(s[seen], colliding[seen], counts[seen], heads)


def rates_bucket_range(stats, plan, family: str, layer: int, order: int, primes, part: int, parts: int, *, batch_rows: int = 1 << 20) -> dict:
    """Task: over bucket range `part` of `parts`, each head's `collided_occurrences` and (head 0's
    range) the n-grams sharing every head with one other (`all_heads_mask`), for head sizes `primes`."""
    from .collisions import all_heads_mask, collide_mask

    primes = [int(p) for p in primes]
    collided, every = [], (0, 0)
    for j, (_, sub) in enumerate(stream_bucket_ranges(plan, stats, family, layer, order, primes, part, parts, batch_rows=batch_rows)):
        collided.append(int(sub.counts[collide_mask(sub.buckets(j, primes[j]), primes[j])].sum()))
        if j == 0:
            mask = all_heads_mask(sub, primes)
            every = (int(mask.sum()), int(sub.counts[mask].sum()))
    return {"collided": collided, "all_heads": every}


def audit_parts(plan, stats, *, heads: int, memory_limit: int, cpus: int) -> int:
    """Bucket ranges per head: enough that one task's share of the largest order fits half of
    `memory_limit` (the other half: the streamed batches), at least `cpus`."""
    largest = max(stats.distinct(n) for n in plan.orders)
    fixed, per_head = AUDIT_BYTES_PER_HEAD
    need = largest * heads * (fixed + per_head * heads)
    return max(1, cpus, -(-need // max(1, memory_limit // 2)))


def audit_collisions_partitioned(
    plan,
    stats,
    *,
    executor: cf.Executor,
    work_dir: Path,
    families=("reference",),
    layers=None,
    target=None,
    sweep=None,
    vocab_keys=None,
    top: int = 10,
    parts: int | None = None,
    memory_limit: int | None = None,
    cpus: int = 1,
    progress: Progress | None = None,
    batch_rows: int = 1 << 20,
) -> dict:
    """`collisions.audit_collisions`, bit for bit, as tasks on `executor` that each hold one bucket range of each head.

    Per (family, layer, order): `parts` shuffle tasks over row ranges
    (`scatter_row_range`: split by bucket range of each head), `parts` tasks over the
    heads' bucket ranges (`audit_bucket_range`: per-head sums, worst buckets, each n-gram's best partner within
    a head), then `parts` tasks over row ranges (`audit_row_range`: s(x) joined across
    heads, through files under `work_dir`, which every worker must see); the --sweep
    cells and each --target evaluation are `parts` more (`rates_bucket_range`). Every
    partial result is an integer sum or a top-k, merged exactly; the figures are then
    computed by the audit's own functions. No task or the driver holds a whole order: a
    task holds ~1/`parts` of it per head (`audit_parts` picks `parts` from
    `memory_limit`). The main audit reads each order once, through a shuffle
    (`scatter_row_range`); the sweep and sizing tasks stream it once each.
    """
    from . import collisions as col
    from .defaults import DEFAULT_MEMORY_LIMIT

    families = col.parse_families(families)
    layers = col.validate_audit(plan, stats, layers=layers, target=target, top=top)
    cells = col.sweep_plans(sweep, plan) if sweep is not None else []
    heads = max([plan.heads, *(c[2].heads for c in cells)])
    parts = parts or audit_parts(plan, stats, heads=heads, memory_limit=memory_limit or DEFAULT_MEMORY_LIMIT, cpus=cpus)
    share = getattr(executor, "share", lambda x: x)
    stats_ref, plan_ref = share(stats), share(plan)
    units = [(f, layer, n) for f in families for layer in layers for n in plan.orders]
    unit_dir = {u: Path(work_dir) / f"{u[0]}-{u[1]}-{u[2]}" for u in units}

    # shuffle: row ranges of every unit split by bucket range; then the bucket ranges (and the
    # sweep cells, which stream: their heads differ), then row ranges joining the heads
    def row_range(n: int, q: int) -> tuple[int, int]:
        m = stats.distinct(n)
        return m * q // parts, m * (q + 1) // parts

    scatter = {u: [str(unit_dir[u] / "scatter" / f"q{q:05d}") for q in range(parts)] for u in units}
    calls = [(scatter_row_range, (stats_ref, plan_ref, f, layer, n, *row_range(n, q), parts, scatter[(f, layer, n)][q]), {}) for f, layer, n in units for q in range(parts)]
    counter = StageCounter(progress, "audit shuffle", float(len(calls)))
    run_all(executor, calls, lambda i, _: counter.add(1))
    calls = [(audit_bucket_range, (stats_ref, plan_ref, f, layer, n, r, parts, str(unit_dir[(f, layer, n)] / f"p{r:05d}")), dict(top=top, scatter_dirs=scatter[(f, layer, n)]))
             for f, layer, n in units for r in range(parts)]
    cell_calls = [(rates_bucket_range, (stats_ref, plan_ref, f, layer, n, cell_plan.primes[layer][n - 2], r, parts), dict(batch_rows=batch_rows))
                  for f, layer, n in units for _, _, cell_plan in cells for r in range(parts)]
    counter = StageCounter(progress, "audit bucket ranges", float(len(calls) + len(cell_calls)))
    merged = [{"heads": None, "mix_duplicates": 0, "mix_dup_occurrences": 0, "worst": []} for _ in units]

    def fold(i: int, result) -> None:
        """Fold a bucket range's result into its unit's as it arrives (the driver keeps the
        running sums and top-k, not every range's members)."""
        counter.add(1)
        if i >= len(calls):
            return
        acc = merged[i // parts]
        acc["heads"] = result["heads"] if acc["heads"] is None else [col.add_head_sums(pair) for pair in zip(acc["heads"], result["heads"])]
        if result["mix_duplicates"] is not None:
            acc["mix_duplicates"] += result["mix_duplicates"]
            acc["mix_dup_occurrences"] += result["mix_dup_occurrences"]
        members = dict(acc["worst"]) | dict(result["worst"])
        acc["worst"] = [(c, members[c]) for c in col.rank_worst(members, top)]
        result.clear()

    cell_sums = run_all(executor, calls + cell_calls, fold)[len(calls):]
    row_calls = []
    for f, layer, n in units:
        K, m = len(plan.primes[layer][n - 2]), stats.distinct(n)
        dirs = [str(unit_dir[(f, layer, n)] / f"p{r:05d}" / f"h{j}") for r in range(parts) for j in range(K)]
        row_calls += [(audit_row_range, (dirs, K, *row_range(n, r)), {}) for r in range(parts)]
    counter = StageCounter(progress, "audit row ranges", float(len(row_calls)))
    joined = run_all(executor, row_calls, lambda i, _: counter.add(1))

    audits, cell_rows = [], []
    for u, (f, layer, n) in enumerate(units):
        primes = [int(p) for p in plan.primes[layer][n - 2]]
        m, total = stats.distinct(n), stats.total(n)
        heads_fig = [col.head_figures_from_sums(sums, p, head=j) for j, (sums, p) in enumerate(zip(merged[u]["heads"], primes))]
        across = col.add_across_sums(joined[u * parts:(u + 1) * parts])
        across["s"][0] += m - across["n_grams"]  # n-grams colliding in no head: s = 0, a clean head
        across["s_weighted"][0] += total - across["occurrences"]
        across["n_grams"], across["occurrences"] = m, total
        mix_dup = None if f != "reference" else merged[u]["mix_duplicates"]
        across_fig = col.across_figures_from_sums(across, primes, family=f, mix_duplicates=mix_dup)
        for _, members in merged[u]["worst"]:  # decoded here: the tasks need not load the vocabulary
            for member in members:
                member["text"] = col.decode_ngram(member["ids"], vocab_keys)
        audits.append(col.order_audit_entry(f, layer, n, distinct=m, occurrences=total, heads=heads_fig, across=across_fig,
                                            worst=[col.worst_bucket_entry(c, members, total) for c, members in merged[u]["worst"]]))
        for c, (K, rows, _) in enumerate(cells):
            got = cell_sums[(u * len(cells) + c) * parts:(u * len(cells) + c + 1) * parts]
            collided = [sum(g["collided"][j] for g in got) for j in range(K)]
            d, w = col.all_heads_from_sums(sum(g["all_heads"][0] for g in got), sum(g["all_heads"][1] for g in got), m, total)
            cell_rows.append({"family": f, "heads": K, "rows": rows, "layer": layer, "order": n, "token_weighted": col.token_weighted_from_sums(collided, total), "all_heads": d, "all_heads_weighted": w})

    sizing_rows = []
    if target is not None:
        first = [(u, x) for u, x in enumerate(units) if x[0] == families[0]]

        def size(item) -> dict:
            u, (f, layer, n) = item
            m, total = stats.distinct(n), stats.total(n)
            floor = None
            if f == "reference":
                dup = merged[u]["mix_dup_occurrences"]
                floor = float(float(dup) / total) if total else 0.0  # as size_for_target's share

            def rate_at(primes) -> float:
                got = run_all(executor, [(rates_bucket_range, (stats_ref, plan_ref, f, layer, n, primes, r, parts), dict(batch_rows=batch_rows)) for r in range(parts)])
                return col.token_weighted_from_sums([sum(g["collided"][j] for g in got) for j in range(len(primes))], total)

            return {"layer": layer, "order": n, **col.search_rows_for_target(rate_at, plan, target, layer=layer, order=n, distinct=m, floor=floor)}

        counter = StageCounter(progress, "audit sizing", float(len(first)))
        with cf.ThreadPoolExecutor(max(1, len(first))) as searches:
            for row in searches.map(size, first):
                sizing_rows.append(row)
                counter.add(1, f"layer {row['layer']} order {row['order']}")
    return col.audit_report(plan, stats, families=families, layers=layers, audits=audits, target=target, sizing_rows=sizing_rows, sweep=sweep, cells=cells, cell_rows=cell_rows)


def audit_collisions_distributed(
    store_path,
    plan,
    *,
    cluster: ClusterSpec | str,
    families=("reference",),
    layers=None,
    target=None,
    sweep=None,
    top: int = 10,
    parts: int | None = None,
    memory_limit: int | None = None,
    work_dir=None,
    progress: Progress | None = None,
    executor: cf.Executor | None = None,
) -> dict:
    """`collisions.audit_collisions` of a store's statistics on a Ray cluster (or `executor`),
    partitioned by bucket range (`audit_collisions_partitioned`): the same report, bit for bit.

    The statistics are read by the tasks from the store (on storage every worker sees);
    the join files go to `work_dir` (default: a hidden directory beside the store, removed
    afterwards). `memory_limit` is per task.
    """
    import tempfile

    from .errors import OutputError, StoreError
    from .store import TableStore

    store = TableStore.open(store_path)
    try:
        keys = store.vocab.keys
    except StoreError:  # decoding is a nicety, as in the single-process audit
        keys = None
    store_path = Path(store_path)
    base = Path(work_dir) if work_dir is not None else store_path.resolve().parent
    try:
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{store_path.name}.audit-", dir=base))
    except OSError as e:
        raise OutputError(f"cannot create the audit's work directory in {str(base)!r} ({e.strerror or e}); the distributed audit writes its shuffle files there: "
                          "make it writable (or audit without --cluster)") from None
    try:
        with _executor(cluster, executor, DEFAULT_MAX_RETRIES) as (ex, description):
            return audit_collisions_partitioned(plan, store.stats, executor=ex, work_dir=work, families=families, layers=layers, target=target, sweep=sweep,
                                                vocab_keys=keys, top=top, parts=parts, memory_limit=memory_limit, cpus=int(description.get("cpus") or 1), progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _executor(cluster, executor: cf.Executor | None, max_retries: int):
    """(executor, cluster description): the given executor, or a RayExecutor on the joined cluster."""
    if executor is not None:
        if isinstance(executor, RayExecutor):  # a cluster the caller joined
            res = executor._ray.cluster_resources()
            yield executor, {"cluster": "ray (joined by the caller)", "cpus": int(res.get("CPU", 1)), "ray": _ray_version()}
        else:
            yield executor, {"cluster": f"executor:{type(executor).__name__}", "cpus": getattr(executor, "_max_workers", None) or 1}
        return
    with connect(cluster) as c:
        ex = RayExecutor(max_retries=max_retries)
        try:
            yield ex, c.description
        finally:
            ex.shutdown(wait=True, cancel_futures=True)


__all__ = [
    "Cluster", "ClusterSpec", "audit_bucket_range", "audit_collisions_distributed", "audit_collisions_partitioned", "audit_parts", "audit_row_range", "bucket_range", "check_cluster_options", "gather_bucket_ranges", "hash_state", "range_of_bucket", "rates_bucket_range", "scatter_row_range", "stream_bucket_ranges", "DistributedOptions", "RayExecutor", "WorkDir", "atomic_dir", "build_tables_distributed",
    "connect", "count_distributed", "count_map_shard", "default_work_dir", "fingerprint", "import_ray", "materialize",
    "merge_partition", "parse_cluster", "radix_ranges", "run_all", "tok0_sample", "tok0_weights",
]
