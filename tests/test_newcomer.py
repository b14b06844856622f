"""A newcomer's session, read with redirected output (issue 24): units, periodic training
lines, the saturation notice, one meaning of "document", disk and next-step hints.

The session runs once (module fixture), each command in this process with stdout and
stderr captured apart, neither a terminal (what a redirect gives; tests/test_readme.py
runs real subprocesses), on a part of the fixture corpus chosen so that the held-out
split is one short document
(eval scores ~20 windows) while one long document is read as two 256 KiB pieces: the
first 300,000 bytes of debian-reference (cut at a line end) and three short debian-policy
files. The plan is tiny (`--budget 2MiB --layers 1`, a 4-layer model, `--steps 3`), so it
is saturated.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from engram_cli.commands.collisions import _pct
from typer.testing import CliRunner

from engram_cli.audit.saturation import SATURATION_THRESHOLD, saturation_verdict
from engram_cli.cli import app
from engram_cli.inspect import inspect_store
from engram_cli.pipeline.build import plan_tables
from engram_cli.plan import (
    DEFAULT_DIM,
    DEFAULT_HEADS,
    DEFAULT_LAYER_IDS,
    DEFAULT_MAX_NGRAM,
    DEFAULT_PAD_ID,
    DEFAULT_ROWS_PER_HEAD,
    DEFAULT_SEED,
)
from engram_cli.store import TableStore
from engram_cli.units import format_bytes
from engram_cli.vocab import CompressedVocab

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "corpus"
# 4 documents read as 5 pieces; at the default 10% only ap-pkg-sourcepkg.rst is held out (by its key's hash).
LONG, LONG_BYTES = "debian-reference/part.txt", 300_000
PART = ["debian-policy/ap-pkg-sourcepkg.rst", "debian-policy/ap-license.rst", "debian-policy/ap-flowcharts.rst"]
SMALL = ["--budget", "2MiB", "--layers", "1"]
SESSION = [
    ("build-table", ["build-table", "corpus/", *SMALL]),
    ("collisions", ["collisions", "--heads", "8"]),
    ("inspect", ["inspect"]),
    ("train", ["train", "corpus/", "--steps", "3"]),
    ("baseline", ["train", "corpus/", "--steps", "1", "--no-engram", "-o", "base.ckpt"]),
    ("eval", ["eval", "model.ckpt"]),
]


def run(cwd: Path, args: list[str]) -> tuple[str, str]:
    """One command in `cwd`, in this process: stdout and stderr captured apart (neither a terminal, as when redirected)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("ENGRAM_PROGRESS_SECONDS", raising=False)  # the default: lines every 30 s and at each tenth of a loop
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"engram {' '.join(args)} exited {result.exit_code}: {result.output} {result.exception!r}"
    return result.stdout, result.stderr


@pytest.fixture(scope="module")
def session(tmp_path_factory, deepseek_vocab_file) -> dict:
    root = tmp_path_factory.mktemp("newcomer")
    for rel in PART:
        (root / "corpus" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / rel, root / "corpus" / rel)
    text = (FIXTURES / "debian-reference" / "debian-reference.en.txt").read_bytes()
    (root / "corpus" / LONG).parent.mkdir(parents=True)
    (root / "corpus" / LONG).write_bytes(text[: text.index(b"\n", LONG_BYTES) + 1])
    shutil.copy(deepseek_vocab_file, root / "vocab.npz")  # what `engram compress-vocab` writes (test_readme runs it)
    printed: dict = {name: run(root, args) for name, args in SESSION}
    printed["root"] = root
    return printed


def done_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if re.match(r"^[a-z][a-z -]*: done\b", line)]


def test_every_stage_names_its_unit_and_none_is_reported_twice(session):
    for name, _ in SESSION:
        err = session[name][1]
        assert "\x1b[" not in err and "\r" not in err  # no live frames in a file
        lines = done_lines(err)
        assert lines or name in ("inspect",), (name, err)
        for line in lines:
            assert not re.search(r": done, 0\b", line), line  # nothing uncounted shown as 0
            m = re.match(r"^[a-z -]+: done, ([\d,.]+) (\S+)", line)
            if m:  # a count: followed by its unit, never by "(" or "in"
                assert m.group(2) not in ("in",) and not m.group(2).startswith("("), line
        stripped = [re.sub(r" in [^ ]+ (s|min .*|h .*)$", "", line) for line in lines]
        assert len(stripped) == len(set(stripped)), (name, lines)  # no stage reported twice
    build_err = session["build-table"][1]
    assert re.search(r"^tokenizing: done, [\d,]+ tokens \(4 documents\)", build_err, re.MULTILINE), build_err
    assert re.search(r"^hit counts: done, [\d,]+ n-grams in ", build_err, re.MULTILINE), build_err


def test_training_prints_periodic_lines_with_the_loss_and_time_left(session):
    err = session["train"][1]
    running = re.findall(r"^train: (\d)/3 steps \(loss \d+\.\d+ .*\), .* so far, about .* left$", err, re.MULTILINE)
    assert sorted(set(running)) == ["1", "2"], err  # each tenth of 3 steps (a slow step may add a 30 s line)
    assert re.search(r"^train: done, 3 steps \(loss ", err, re.MULTILINE)
    assert re.search(r"^load table: done \(layer 1\) in ", err, re.MULTILINE)  # no "done, 0 (layer 1)"
    assert re.search(r"^eval: done, \d+ windows \(model.ckpt\) in ", session["eval"][1], re.MULTILINE)


def test_document_counts_agree(session):
    build = re.search(r"Corpus: 4 files, (\d+) documents", session["build-table"][0])
    assert build and build.group(1) == "4"
    for name in ("train", "baseline"):
        assert re.search(r"^tokenize: done, [\d,]+ tokens \(4 documents, read as 5 pieces of up to 256 KiB\)", session[name][1], re.MULTILINE), session[name][1]
        assert "held out for engram eval: 1 piece (documents, long ones as 256 KiB pieces)" in session[name][0]
    assert re.search(r"^tokenize held-out: done, 1 held-out piece \(model.ckpt\)", session["eval"][1], re.MULTILINE), session["eval"][1]
    assert "4 documents" in " ".join(session["inspect"][0].split())


def test_saturation_notice_for_a_tiny_plan_and_not_for_the_reference_plan(session):
    root = session["root"]
    notice = "Saturated plan: 2-grams 100.00% in shared buckets per head"
    assert notice in session["build-table"][1] and notice not in session["build-table"][0]  # a notice, on stderr
    assert notice in session["collisions"][0] and notice in session["inspect"][0]  # the same verdict in the reports
    assert "--rows-per-head " in session["build-table"][1]
    store = TableStore.open(root / "tables.zarr")
    distinct = {n: store.stats.distinct(n) for n in store.plan.orders}
    reference = plan_tables(CompressedVocab.load(root / "vocab.npz"), layer_ids=DEFAULT_LAYER_IDS, max_ngram_size=DEFAULT_MAX_NGRAM, heads=DEFAULT_HEADS,
                            rows_per_head=DEFAULT_ROWS_PER_HEAD, dim=DEFAULT_DIM, seed=DEFAULT_SEED, pad_id=DEFAULT_PAD_ID)  # the default plan
    assert saturation_verdict(reference, distinct)["saturated"] == []
    # the whole fixture corpus (108,757 distinct 2-grams, 237,837 3-grams, docs/collisions.md) under the reference plan: not saturated either
    verdict = saturation_verdict(reference, {2: 108_757, 3: 237_837})
    assert verdict["notice"] is None and verdict["threshold"] == SATURATION_THRESHOLD


def test_disk_what_if_and_next_step_hints(session):
    train_out, train_err = session["train"]
    assert re.search(r"^Training writes model.ckpt and model.tables.zarr: up to [\d.]+ (KiB|MiB) of rewritten shards", train_err, re.MULTILINE), train_err
    assert re.search(r"on disk: model.tables.zarr added [\d.]+ (KiB|MiB) \(rewritten shards\), [\d.]+ (B|KiB|MiB) hard-linked from tables.zarr", train_out)
    assert "next: engram eval model.ckpt base.ckpt" in session["baseline"][0]
    assert "--heads 8 gives the stored plan itself: this is the stored plan's audit, not a what-if" in session["collisions"][0]
    assert "Modified since build: no." in session["inspect"][0]


def test_inspect_reports_the_verdict_and_one_training_run_as_one_operation(session):
    root = session["root"]
    report = inspect_store(TableStore.open(root / "tables.zarr"))  # what `engram inspect --json` prints
    assert [s["order"] for s in report["saturation"]["saturated"]] == [2, 3]
    ops = inspect_store(TableStore.open(root / "model.tables.zarr"))["modified"]["operations"]
    assert [op["by"] for op in ops] == ["trained"] and ops[0]["writes"] >= 1 and ops[0]["complete"]


def test_numbers_formatted_for_their_column():
    assert [_pct(x) for x in (4.23e-06, 1e-9, 0.5)] == ["0.00042%", "0.00000010%", "50.00%"]  # never 4.23e-06 among percentages
    assert [format_bytes(n) for n in (1023 << 20, 1000 << 20, 3 << 29)] == ["1023 MiB", "1000 MiB", "1.5 GiB"]  # never 1.02e+03 MiB
