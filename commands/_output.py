"""The one rendering path: rich to stderr for people, plain JSON to stdout for scripts."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Human output goes to stderr so that `--json` output on stdout is always clean.
console = Console(stderr=True, highlight=False)

JSON_OPTION_HELP = "Print one JSON object on stdout instead of the rich report (schema in docs/)."


def json_option() -> bool:
    return typer.Option(False, "--json", help=JSON_OPTION_HELP)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
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


def make_progress(quiet: bool = False) -> Progress:
    """The standard progress display (stderr; disabled with --json/--quiet)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


class ProgressReporter:
    """Adapts the library's `progress(stage, done, total, detail)` callback to rich bars."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: float, total: float | None = None, detail: str = "") -> None:
        task = self.tasks.get(stage)
        if task is None:
            task = self.tasks[stage] = self.progress.add_task(stage, total=total, detail=detail)
        self.progress.update(task, completed=done, total=total, detail=detail)


@contextmanager
def progress_reporter(quiet: bool = False):
    with make_progress(quiet) as progress:
        yield ProgressReporter(progress)
