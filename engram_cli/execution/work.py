"""The resumable work directory of a scaled-out run: fingerprinted partials written atomically, and the scheduling helpers.

A partial (a map task's statistics, a reduce task's partition, an audit's shuffle
files) is written into a temporary sibling directory and renamed into place with a
`done.json` marker last (`atomic_dir`), so a task killed midway leaves nothing that
looks finished; a rerun with `resume` keeps every partial whose fingerprint (what it
was made from) matches (`is_done`). `WorkDir` is the shared directory that holds
them (`.OUT.work` beside the output by default), every worker must see it (a shared
file system on a real cluster). `run_all` submits calls to any
`concurrent.futures.Executor` and `StageCounter` reports a stage's progress.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import ResumeError

Progress = Callable[..., None]

WORK_FORMAT = "engram-work/2"  # 2: statistics files with fixed row groups, tok_0 samples
WORK_FILE = "work.json"  # marks a directory as ours: only then do we delete inside it
DONE_FILE = "done.json"  # written last in a partial's directory: its fingerprint


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
    """True when the partial at `path` is finished and was made from fingerprint `fp`."""
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


# -- the work directory --------------------------------------------------------------------
@dataclass
class WorkDir:
    """The shared directory of a scaled-out build's partials (`.OUT.work` beside the output by default)."""

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


# -- scheduling ------------------------------------------------------------------------------
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


__all__ = [
    "DONE_FILE", "WORK_FILE", "WORK_FORMAT", "Progress", "StageCounter", "WorkDir", "atomic_dir", "default_work_dir", "fingerprint",
    "is_done", "read_done", "run_all",
]
