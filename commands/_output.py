"""The one rendering path: reports on stdout, progress and notices on stderr.

- `console` (stdout): the human report; rich styling on a terminal, plain text when
  stdout is a file or a pipe (`engram collisions > report.txt` keeps the report).
- `notices` (stderr): what a command did besides its report ("wrote vocab.npz").
- `progress_reporter`: live bars on a terminal; when stderr is not a terminal, no live
  frames, one line per finished stage.
- `--json`: one JSON object alone on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from engram_cli.units import format_bytes

# A report written to a file or a pipe is not cut at 80 columns.
REPORT_WIDTH_WHEN_NOT_A_TERMINAL = 200



def escape_surrogates(text: str) -> str:
    """`text` made encodable as UTF-8: lone surrogates written out as backslash escapes.

    Paths that are not valid UTF-8 reach Python as str with their bad bytes decoded by
    `surrogateescape` (U+DC80..U+DCFF); each such byte is shown as `\\xNN` (the byte, as
    Python's `backslashreplace` writes it: the directory `corp\\xff` stays readable and
    tells which byte it was). Any other lone surrogate (from escaped JSON text) is shown as
    `\\uXXXX`. Text without surrogates comes back unchanged.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def json_safe_text(obj):
    """`obj` (dicts, lists, tuples, scalars) with every string, keys too, passed through `escape_surrogates`."""
    if isinstance(obj, str):
        return escape_surrogates(obj)
    if isinstance(obj, dict):
        return {json_safe_text(k) if isinstance(k, str) else k: json_safe_text(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe_text(v) for v in obj]
    return obj


class _EscapingStream:
    """A text stream that forwards to `sys.stdout` / `sys.stderr` as they are at each write, surrogates escaped.

    Looked up at each write (test runners swap the streams); every other attribute
    (isatty, encoding, fileno...) is the stream's own, so rich sees the real terminal.
    """

    def __init__(self, name: str):
        self._name = name

    def write(self, text: str) -> int:
        return getattr(sys, self._name).write(escape_surrogates(text))

    def __getattr__(self, attr):
        return getattr(getattr(sys, self._name), attr)


console = Console(file=_EscapingStream("stdout"), highlight=False, width=None if sys.stdout.isatty() else REPORT_WIDTH_WHEN_NOT_A_TERMINAL)
notices = Console(file=_EscapingStream("stderr"), highlight=False)

# Stages whose counts are bytes (corpus reading, shard writing): shown as 1.2 GiB, not raw integers.
BYTE_STAGES = frozenset({"reading", "writing", "map shards"})
# The unit of every other stage's count, named on every line ("472,748 tokens"). A stage
# reported only as started (done 0, no total) counts nothing: its line has no count.
STAGE_UNITS = {
    "tokenizing": "tokens", "counting": "tokens", "tokenize": "tokens", "tokenize held-out": "held-out pieces",
    "merging": "parts", "merge partitions": "partitions", "hit counts": "n-grams",
    "hash n-grams": "n-grams", "audit": "layer-orders", "audit shuffle": "tasks", "audit bucket ranges": "tasks",
    "audit row ranges": "tasks", "audit sizing": "tasks", "read hits": "rows", "verify chunks": "chunks",
    "train": "steps", "eval": "windows", "importing": "rows", "auditing": "rows",
}
# Redirected stderr: a running stage prints a line at least this often (seconds;
# ENGRAM_PROGRESS_SECONDS overrides), and the long loops below also at every tenth of their total.
PROGRESS_SECONDS = 30.0
LOOP_STAGES = frozenset({"train", "eval", "audit", "auditing", "hash n-grams", "verify chunks"})


def progress_seconds() -> float:
    """Seconds between a running stage's lines on redirected stderr (`ENGRAM_PROGRESS_SECONDS`, default 30)."""
    try:
        return float(os.environ.get("ENGRAM_PROGRESS_SECONDS", PROGRESS_SECONDS))
    except ValueError:
        return PROGRESS_SECONDS


def format_seconds(seconds: float) -> str:
    """A duration as `42 s`, `3 min 05 s` or `2 h 07 min`."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def notice(message: str) -> None:
    """One line on stderr: what a command did besides its report."""
    notices.print(message, markup=False, soft_wrap=True)


JSON_OPTION_HELP = "Print one JSON object on stdout instead of the rich report (schema in docs/)."


def json_option() -> bool:
    return typer.Option(False, "--json", help=JSON_OPTION_HELP)


def print_json(obj) -> None:
    """`obj` as one indented JSON object on stdout: valid UTF-8 JSON always.

    Strings are written as they are (`ensure_ascii=False`), except that lone surrogates
    (a path that is not valid UTF-8) are escaped first by `escape_surrogates`: the byte
    0xff of such a path reads `\\xff` in the parsed string.
    """
    sys.stdout.write(json.dumps(json_safe_text(obj), indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def visible(text: str) -> str:
    """Show a token readably: spaces as ␣, control characters and escapes as \\n, \\x01..."""
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) > 0xFF else f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


NGRAM_SEPARATOR = " · "


def ngram_text(tokens) -> str:
    """An n-gram as `of · the`: each token made visible, one separator everywhere."""
    return NGRAM_SEPARATOR.join(visible(t) for t in tokens)


def format_count(stage: str, value: float | None, unit: bool = False) -> str:
    """A stage's count in its unit: bytes in human units, other counts with separators
    (and, with `unit`, the stage's unit from `STAGE_UNITS`: `472,748 tokens`)."""
    if value is None:
        return "?"
    if stage in BYTE_STAGES:
        return format_bytes(int(value))
    name = STAGE_UNITS.get(stage) if unit else None
    if name and int(value) == 1 and name.endswith("s"):
        name = name[:-1]  # 1 part, 1 step
    return f"{int(value):,}" + (f" {name}" if name else "")


class _CountColumn(ProgressColumn):
    """`done/total` (or `done`), bytes in human units."""

    def render(self, task) -> Text:
        done = format_count(task.description, task.completed)
        if task.total is None or task.finished:
            return Text(done)
        return Text(f"{done}/{format_count(task.description, task.total)}")


def make_progress(quiet: bool = False) -> Progress:
    """The live progress display on stderr (disabled with --json)."""
    return Progress(
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        _CountColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=notices,
        disable=quiet,
        transient=False,
    )


@dataclass
class _Stage:
    started: float
    done: float = 0
    total: float | None = None
    detail: str = ""
    finished: bool = False
    task: TaskID | None = None
    counted: bool = False  # reported a count (done > 0 or a total): its line names the count in its unit
    details: list = field(default_factory=list)  # an uncounted stage's details, in order (`load table`: layer 1, layer 15)
    last_line: float = 0.0  # when its last line was printed (redirected stderr)
    last_tenth: int = 0  # the last tenth of its total a line was printed at


class ProgressReporter:
    """Adapts the library's `progress(stage, done, total, detail)` callback to stderr.

    A stage ends when its count reaches its total, when a later stage with a known
    total starts (streaming stages such as tokenizing and counting have no total of
    their own), when a stage is reported as just started (done 0, no total: the
    stages before it without a total have ended), or when the command ends. An ended
    stage shows done, its final count in its unit (`STAGE_UNITS`; none for a stage that
    counted nothing) and its time: its bar stops on a terminal; elsewhere it is one
    line on stderr. A finished stage that reports again (the same stage for the next
    layer) reopens.

    On redirected stderr a running stage also prints a line every `progress_seconds()`
    (30 s, from a ticker thread, so also between two reports) and, for the long loops (`LOOP_STAGES`: training, eval, audits), at every
    tenth of its total: its count, its detail (the loss), the time so far and an
    estimate of the time left.
    """

    def __init__(self, progress: Progress | None, quiet: bool = False):
        self.progress = progress  # None: stderr is not a terminal, print one line per finished stage
        self.quiet = quiet
        self.stages: dict[str, _Stage] = {}
        self._lock = threading.Lock()
        self._idle_since = time.monotonic()  # when the last stage ended (or the command began)
        self._every = progress_seconds()

    def __call__(self, stage: str, done: float, total: float | None = None, detail: str = "") -> None:
        with self._lock:
            s = self.stages.get(stage)
            started_now = not done and total is None  # "this begins now": the uncounted stages before it are over
            if s is None or (s.finished and (total is None or done < (s.total or 0) or done < s.done)):
                if total is not None or started_now:  # new, or reopened for the next checkpoint or layer
                    for other_name, other in self.stages.items():
                        if not other.finished and other.total is None:
                            self._finish(other_name, other)
                s = self._open(stage, s)
            if s.finished:  # a late report of an ended stage (the same final count) changes nothing
                return
            s.done, s.total, s.detail = done, total, detail
            s.counted = s.counted or bool(done) or total is not None
            if detail and (not s.details or s.details[-1] != detail):
                s.details.append(detail)
            if s.task is not None:
                self.progress.update(s.task, completed=done, total=total, detail=detail)
            if total is not None and done >= total and not s.finished:
                self._finish(stage, s)
            elif self.progress is None and not self.quiet:
                self._maybe_line(stage, s)

    def _open(self, stage: str, previous: _Stage | None) -> _Stage:
        # A stage reports only after some work; it began with the stages still running
        # beside it (a streaming pipeline), else when the last stage ended.
        running = [o.started for o in self.stages.values() if not o.finished]
        s = _Stage(started=min(running) if running else self._idle_since)
        s.last_line = time.monotonic()
        if self.progress is not None:
            s.task = previous.task if previous is not None and previous.task is not None else self.progress.add_task(stage, total=None, detail="")
            if previous is not None:
                self.progress.reset(s.task, total=None, detail="")
            task = next(t for t in self.progress.tasks if t.id == s.task)
            task.start_time = s.started  # the bar's timer counts from when the stage began (same monotonic clock)
        self.stages[stage] = s
        return s

    def _maybe_line(self, stage: str, s: _Stage) -> None:
        """A running stage's line on redirected stderr: every `_every` seconds, and at each tenth of a long loop's total."""
        now = time.monotonic()
        tenth = int(10 * s.done / s.total) if s.total else 0
        due = now - s.last_line >= self._every or (stage in LOOP_STAGES and tenth > s.last_tenth)
        if not due:
            return
        s.last_line, s.last_tenth = now, max(s.last_tenth, tenth)
        elapsed = now - s.started
        if not s.counted:  # a stage that counts nothing: that it still runs, and for how long
            detail = f" ({', '.join(s.details)})" if s.details else ""
            notices.print(f"{stage}: running{detail}, {format_seconds(elapsed)} so far", markup=False, highlight=False, soft_wrap=True)
            return
        count = format_count(stage, s.done) if s.total is None else f"{format_count(stage, s.done)}/{format_count(stage, s.total, unit=True)}"
        if s.total is None and stage not in BYTE_STAGES:
            count = format_count(stage, s.done, unit=True)
        left = f", about {format_seconds(elapsed * (s.total - s.done) / s.done)} left" if s.total and s.done else ""
        detail = f" ({s.detail})" if s.detail else ""
        notices.print(f"{stage}: {count}{detail}, {format_seconds(elapsed)} so far{left}", markup=False, highlight=False, soft_wrap=True)

    def _finish(self, stage: str, s: _Stage) -> None:
        s.finished = True
        self._idle_since = time.monotonic()
        seconds = self._idle_since - s.started
        if s.task is not None:
            self.progress.update(s.task, total=s.done, completed=s.done, detail="done")
            self.progress.stop_task(s.task)
        elif not self.quiet:
            if s.counted:
                detail = f" ({s.detail})" if s.detail and s.detail != "done" else ""
                line = f"{stage}: done, {format_count(stage, s.done, unit=True)}{detail}"
            else:
                detail = f" ({', '.join(s.details)})" if s.details else ""
                line = f"{stage}: done{detail}"
            notices.print(f"{line} in {format_seconds(seconds)}", markup=False, highlight=False, soft_wrap=True)

    def tick(self) -> None:
        """Print the line of every running stage that is due (`_maybe_line`), reports or not: a
        step that takes minutes between two reports still shows every `progress_seconds()`."""
        with self._lock:
            for name, s in self.stages.items():
                if not s.finished:
                    self._maybe_line(name, s)

    def start_ticker(self) -> None:
        """On redirected stderr: a daemon thread calling `tick` every second until `close`."""
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(1.0):
                self.tick()

        threading.Thread(target=run, name="engram-progress", daemon=True).start()

    def close(self) -> None:
        if getattr(self, "_stop", None) is not None:
            self._stop.set()
        with self._lock:
            for name, s in self.stages.items():
                if not s.finished:
                    self._finish(name, s)


@contextmanager
def progress_reporter(quiet: bool = False):
    """A `ProgressReporter` for a command's run; every stage is closed at the end."""
    if quiet or not notices.is_terminal:
        reporter = ProgressReporter(None, quiet=quiet)
        if not quiet:
            reporter.start_ticker()
        try:
            yield reporter
        finally:
            reporter.close()
        return
    with make_progress() as progress:
        reporter = ProgressReporter(progress)
        try:
            yield reporter
        finally:
            reporter.close()
