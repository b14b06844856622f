"""Progress on stderr: stages end, bytes read humanly, one line per stage off a terminal."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from engram_cli.commands import _output
from engram_cli.commands._output import ProgressReporter, format_count, make_progress, ngram_text
from engram_cli.units import format_bytes


@pytest.fixture
def stderr_file(monkeypatch, tmp_path):
    path = tmp_path / "stderr.txt"
    handle = path.open("w")
    monkeypatch.setattr(_output, "notices", Console(file=handle, highlight=False))
    yield lambda: (handle.flush(), path.read_text())[1]
    handle.close()


def test_off_a_terminal_one_line_per_finished_stage(stderr_file):
    report = ProgressReporter(None)
    total = 5_297_255_936
    report("reading", 0, total)
    report("tokenizing", 10, None, "1 documents")
    report("counting", 10, None, "1 documents")
    report("reading", total, total, "last.txt")  # reading ends at its total
    report("tokenizing", 20, None, "2 documents")
    assert [l.split(":")[0] for l in stderr_file().splitlines()] == ["reading"]  # the others still run
    report("merging", 0, 2, "order 2")  # a stage with a total: the streaming stages have ended
    report("merging", 2, 2, "order 3")
    report.close()
    lines = stderr_file().splitlines()
    assert [l.split(":")[0] for l in lines] == ["reading", "tokenizing", "counting", "merging"]
    assert lines[0].startswith(f"reading: done, {format_bytes(total)} (last.txt) in ")
    assert str(total) not in stderr_file()  # bytes in human units, never raw
    assert lines[1].startswith("tokenizing: done, 20 tokens (2 documents) in ")  # the unit named
    assert all(re.search(r" in \d+\.\d s$", l) for l in lines)


def test_off_a_terminal_uncounted_stages_print_no_count_and_end_when_the_next_begins(stderr_file):
    report = ProgressReporter(None)
    report("tokenize", 472_748, None, "37 documents")
    report("load table", 0, None, "layer 1")  # begins now: tokenizing is over
    report("load table", 0, None, "layer 15")
    report("train", 1, 3, "loss 9.0")
    report("train", 3, 3, "loss 8.9")
    report("save rows", 0, None, "model.tables.zarr")
    report.close()
    lines = [l for l in stderr_file().splitlines() if "so far" not in l]  # the running lines: next test
    assert [l.split(":")[0] for l in lines] == ["tokenize", "load table", "train", "save rows"]
    assert lines[0].startswith("tokenize: done, 472,748 tokens (37 documents) in ")
    assert lines[1].startswith("load table: done (layer 1, layer 15) in ")  # no "done, 0": nothing was counted
    assert lines[2].startswith("train: done, 3 steps (loss 8.9) in ")
    assert lines[3].startswith("save rows: done (model.tables.zarr) in ")


def test_off_a_terminal_a_reopened_stage_ends_the_uncounted_ones_before_it(stderr_file):
    report = ProgressReporter(None)  # eval of two checkpoints: the first one's audit ends when the second one's tokenizing begins
    for name in ("model.ckpt", "base.ckpt"):
        report("tokenize held-out", 1, 2, name)
        report("tokenize held-out", 2, 2, name)
        report("eval", 0, 2, name)
        report("eval", 2, 2, name)
        report("audit", 0, None, "layer 1")
    report.close()
    stages = [(l.split(":")[0], l.split("(")[1].split(")")[0]) for l in stderr_file().splitlines()]
    assert stages == [("tokenize held-out", "model.ckpt"), ("eval", "model.ckpt"), ("audit", "layer 1"),
                      ("tokenize held-out", "base.ckpt"), ("eval", "base.ckpt"), ("audit", "layer 1")]


def test_off_a_terminal_long_loops_print_a_line_with_the_time_left(stderr_file, monkeypatch):
    report = ProgressReporter(None)
    for step in range(1, 11):
        report("train", step, 10, f"loss {10 - step}.000")
    report("eval", 5, 384, "model.ckpt")  # under a tenth: nothing yet
    report.close()
    lines = stderr_file().splitlines()
    running = [l for l in lines if "so far" in l]
    assert len(running) == 9 and running[0].startswith("train: 1/10 steps (loss 9.000), ") and "left" in running[0]
    assert lines[-2].startswith("train: done, 10 steps") and lines[-1].startswith("eval: done, 5 windows (model.ckpt)")
    monkeypatch.setenv("ENGRAM_PROGRESS_SECONDS", "0")  # any stage, at every report
    report = ProgressReporter(None)
    report("read hits", 100, 1000, "layer 1 order 2")
    assert "read hits: 100/1,000 rows (layer 1 order 2), " in stderr_file()
    report("load table", 0, None, "layer 15")
    report.tick()  # between reports (the ticker thread's call): an uncounted stage says it still runs
    assert re.search(r"^load table: running \(layer 15\), [\d.]+ s so far$", stderr_file(), re.MULTILINE)


def test_on_a_terminal_a_finished_stage_stops():
    progress = make_progress()
    report = ProgressReporter(progress)
    report("tokenizing", 100, None, "3 documents")
    report("train", 0, 4)
    task = {t.description: t for t in progress.tasks}
    assert task["tokenizing"].finished and task["tokenizing"].completed == 100  # its timer is frozen
    assert not task["train"].finished
    report("train", 4, 4)
    assert task["train"].finished and task["train"].fields["detail"] == "done"


def test_counts_and_ngrams_render_one_way():
    assert format_count("writing", 3 << 30) == "3 GiB"
    assert format_count("counting", 1234567) == "1,234,567"
    assert format_count("counting", 1234567, unit=True) == "1,234,567 tokens"
    assert ngram_text(["of", " the"]) == "of · ␣the"
