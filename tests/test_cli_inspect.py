"""`engram inspect` through the real typer app, on a real small store built from fixtures/."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.store import TableStore

from cli_checks import build_small_store, flip_byte, one_error_line

DOC = Path(__file__).resolve().parent.parent / "docs" / "inspect.md"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["inspect", *map(str, args)])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_small_store(tmp_path_factory.mktemp("cli_inspect"))


def test_json_schema_is_the_documented_one(built):
    result = invoke(built, "--json", "--verify")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    documented = re.findall(r"^\| `([a-z_0-9]+)` \|", DOC.read_text(), flags=re.M)
    assert sorted(report) == sorted(documented)
    store = TableStore.open(built)
    assert report["plan"]["fingerprint"] == store.plan.fingerprint
    assert [h["order"] for h in report["hits"]] == [n for _ in store.layer_ids for n in store.plan.orders]
    assert report["verify"]["ok"] is True and report["verify"]["checked"] == report["verify"]["chunks"]
    assert set(report["verify"]) == {"ok", "chunks", "checked", "bytes_read", "first_bad", "stats_files"}


def test_human_report(built):
    result = invoke(built)
    assert result.exit_code == 0, result.output
    text = result.stdout + result.stderr
    for words in ("Plan", "Size:", "on disk", "Built:", "Modified since build: no", "Row hits", "top 1%"):
        assert words in text, words


def test_a_path_with_brackets_is_shown_as_it_is(built, tmp_path):
    """Paths are printed literally, not read as rich markup (a `[bold]` in a name stays text)."""
    odd = tmp_path / "t[bold]x[/bold][red].zarr"
    shutil.copytree(built, odd)
    result = invoke(odd)
    assert result.exit_code == 0, result.output
    assert str(odd) in "".join(result.stdout.split())  # the report may wrap a long path: compare without whitespace


def test_default_store_is_tables_zarr(built, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "does not exist" in one_error_line(invoke())
    shutil.copytree(built, tmp_path / "tables.zarr")
    assert invoke("--json").exit_code == 0


def test_bad_path_is_one_line(tmp_path):
    assert "does not exist" in one_error_line(invoke(tmp_path / "nope.zarr"))
    (tmp_path / "plain").mkdir()
    one_error_line(invoke(tmp_path / "plain"))


def test_verify_reports_the_first_bad_chunk(built, tmp_path):
    copy = tmp_path / "bad.zarr"
    shutil.copytree(built, copy)
    store = TableStore.open(copy)
    layer = store.layer_ids[0]
    flip_byte(store.shard_path(layer, 2), 10)
    line = one_error_line(invoke(copy, "--verify", "--json"))
    chunk = 2 * store.shard_rows // store.chunk_rows
    assert f"layer {layer} table chunk {chunk}" in line
    report = json.loads(result_stdout := invoke(copy, "--verify", "--json").stdout)
    assert report["verify"]["first_bad"]["chunk"] == chunk, result_stdout
    assert invoke(copy).exit_code == 0  # without --verify the report does not read the tables


def test_modified_store_shows_it(built, tmp_path):
    copy = tmp_path / "trained.zarr"
    shutil.copytree(built, copy)
    store = TableStore.open(copy, mode="r+")
    store.write_rows(store.layer_ids[-1], np.array([1, 2, 3]), np.zeros((3, store.plan.head_dim), dtype=np.float32), by="train")
    result = invoke(copy)
    assert result.exit_code == 0, result.output
    text = " ".join((result.stdout + result.stderr).split())
    assert "Modified since build: yes" in text and "by train" in text


def test_plot(built, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "hits.png"
    result = invoke(built, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "does not exist" in one_error_line(invoke(built, "--plot", tmp_path / "no" / "x.png"))


def test_plot_without_matplotlib_is_one_line(built, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert "engram-cli[plot]" in one_error_line(invoke(built, "--plot", tmp_path / "x.png"))


def test_bad_hits_chunk_without_verify_is_one_line(built, tmp_path):
    copy = tmp_path / "badhits.zarr"
    shutil.copytree(built, copy)
    flip_byte(copy / f"layer_{TableStore.open(copy).layer_ids[0]}" / "hits" / "c" / "0", 10)
    for args, words in (((), "--verify"), (("--verify",), "hits chunk 0")):
        result = invoke(copy, *args)
        assert result.exit_code == 2 and "Traceback" not in result.output
        # the progress display's last frame (engram_cli's progress, not this command) may precede it
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and words in errors[0] and result.stderr.rstrip().endswith(errors[0]), result.stderr


def test_store_without_hits(tmp_path, tiny_tokenizer):
    from engram_cli.plan import make_plan
    from engram_cli.store import create_store
    from engram_cli.vocab import compress_vocab

    vocab = compress_vocab(tiny_tokenizer)
    plan = make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=int(vocab.lookup[2]), heads=2, dim=32, rows_per_head=101)
    bare = create_store(tmp_path / "bare.zarr", plan, vocab, stats_root=None)
    result = invoke(bare.path, "--json", "--verify")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["has_hits"] is False and report["hits"] == [] and report["built"]["corpus"] is None
    assert report["verify"]["ok"] and report["verify"]["chunks"] == len(plan.layer_ids) + 4  # one table chunk per layer, no hits; 4 vocabulary arrays of one chunk
    human = invoke(bare.path)
    assert "none stored" in human.stdout + human.stderr
