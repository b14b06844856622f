"""The Ray adapter: parse `--cluster`, join or start a cluster, and run tasks on it as a `concurrent.futures.Executor`.

Only scheduling lives here; the tasks are the library's own shard-level functions
(`pipeline.count`, `store.writer`, `audit.partitioned`). Ray is an optional extra and is
imported only when a cluster is asked for (`import_ray`); without it, `ClusterError`
names `pip install 'engram-cli[ray]'`.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from ..errors import ClusterError

INSTALL_HINT = "pip install 'engram-cli[ray]'"
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
    return import_ray().__version__


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
            raise ClusterError("RayExecutor needs a connected Ray cluster; use engram_cli.execution.ray.connect(...) first")
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


@contextmanager
def executor_for(cluster: ClusterSpec | str | None, executor: cf.Executor | None = None, max_retries: int = DEFAULT_MAX_RETRIES) -> Iterator[tuple[cf.Executor, dict]]:
    """(executor, cluster description) for the block: `executor` when given (any Executor; not shut down
    here), else a `RayExecutor` on `cluster`, joined (or started) with `connect` for the block."""
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
    "DEFAULT_MAX_RETRIES", "INSTALL_HINT", "Cluster", "ClusterSpec", "RayExecutor", "check_cluster_options", "connect", "executor_for",
    "import_ray", "parse_cluster",
]
