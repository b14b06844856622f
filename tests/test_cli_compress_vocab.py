"""`engram compress-vocab` through the real typer app (CliRunner).

typer 0.29's CliRunner keeps stdout and stderr apart (`result.stdout`, `result.stderr`;
`result.output` is both interleaved); there is no `mix_stderr` argument any more.
Expected figures come from the independent route in test_vocab.py, not from the library.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os

import numpy as np
from pathlib import Path

import pytest
from oracles import byte_decoder, byte_level_text, independent_lookup, merge_classes, tokens_from_json
from typer.testing import CliRunner

from engram_cli.cli import app

runner = CliRunner()


def independent(path):
    tokens = tokens_from_json(path)
    table = byte_decoder()
    texts = [byte_level_text(t, table) for t in tokens]
    return tokens, texts, independent_lookup(tokens, texts)


@pytest.fixture(autouse=True)
def fresh_directory(tmp_path, monkeypatch):
    """compress-vocab writes ./vocab.npz by default: run each test in its own directory."""
    monkeypatch.chdir(tmp_path)


def invoke(*args):
    return runner.invoke(app, ["compress-vocab", *map(str, args)])


def test_json_report_tiny(tiny_tokenizer_path):
    tokens, texts, lookup = independent(tiny_tokenizer_path)
    result = invoke(tiny_tokenizer_path, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --json: nothing for people, so `| jq` always works
    report = json.loads(result.stdout)
    size = int(lookup.max()) + 1
    assert report["vocab_size"] == len(tokens)
    assert report["compressed_size"] == size
    assert report["reduction"] == pytest.approx(1 - size / len(tokens))
    assert report["fffd_tokens"] == sum("\ufffd" in t for t in texts)
    assert report["tokenizer_sha256"] == hashlib.sha256(tiny_tokenizer_path.read_bytes()).hexdigest()
    classes = sorted(merge_classes(lookup), key=len, reverse=True)
    assert report["merged_classes"] == len(classes)
    assert [c["size"] for c in report["largest_classes"]] == [len(c) for c in classes[:10]]
    for cls in report["largest_classes"]:
        members = [m["id"] for m in cls["members"]]
        assert tuple(members) in merge_classes(lookup) and len(members) == cls["size"]
        assert {int(lookup[t]) for t in members} == {cls["compressed_id"]}
        for m in cls["members"]:
            assert m["token"] == tokens[m["id"]]
            assert m["text"] == texts[m["id"]] or "\ufffd" in m["text"]


def test_human_report_shows_decoded_text(tiny_tokenizer_path):
    _, texts, lookup = independent(tiny_tokenizer_path)
    result = invoke(tiny_tokenizer_path)
    assert result.exit_code == 0, result.output
    assert "ids ->" not in result.stderr  # the report goes to stdout; stderr has the notice only
    assert "Wrote vocab.npz" in result.stderr and Path("vocab.npz").is_file()
    err = " ".join(result.stdout.split())  # rich wraps lines at the terminal width
    assert f"{len(texts):,} ids -> {int(lookup.max()) + 1:,} compressed ids" in err
    assert f"{sum(chr(0xFFFD) in t for t in texts):,} byte-fallback tokens (U+FFFD) kept raw" in err
    # the whitespace class is shown with visible escapes, and decoded text, not byte-level tokens
    assert "\\t" in err and "\\n" in err and "␣" in err
    assert "␣café" in err or "␣CAFÉ" in err
    assert "Ġ" not in err and "Ã©" not in err


def test_out_writes_lookup_and_metadata(tmp_path, tiny_tokenizer_path):
    _, _, lookup = independent(tiny_tokenizer_path)
    out = tmp_path / "v.npz"
    result = invoke(tiny_tokenizer_path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    with np.load(out) as z:
        assert np.array_equal(z["lookup"], lookup)
        meta = json.loads(str(z["metadata"]))
    assert meta["tokenizer_sha256"] == hashlib.sha256(tiny_tokenizer_path.read_bytes()).hexdigest()
    assert meta["vocab_size"] == len(lookup) and meta["compressed_size"] == int(lookup.max()) + 1
    assert meta["normalizer"] and meta["normalizer_version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npz"]


def test_default_is_deepseek():
    result = invoke("--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tokenizer"] == "deepseek" and report["vocab_size"] == 129_280
    assert 0.20 < report["reduction"] < 0.26


def assert_clean_failure(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    "make, fragments",
    [
        (lambda d: d / "missing.json", ("does not exist", "pass a tokenizer.json")),
        (lambda d: (d / "empty").mkdir() or d / "empty", ("holds no tokenizer.json",)),
        (lambda d: (d / "bad.json").write_text("{bad") and d / "bad.json", ("is not valid JSON", "pass a Hugging Face tokenizer.json")),
        (lambda d: (d / "binary.json").write_bytes(b"\xff\xfe\x00") and d / "binary.json", ("is not valid JSON",)),
        (lambda d: (d / "cfg.json").write_text('{"vocab_size": 3}') and d / "cfg.json", ("not a tokenizer", 'no "model"')),
        (lambda d: (d / "broken.json").write_text('{"model": {"type": "BPE"}}') and d / "broken.json", ("not a tokenizers tokenizer",)),
    ],
    ids=["missing", "dir-without-tokenizer", "invalid-json", "binary", "json-not-tokenizer", "broken-tokenizer"],
)
def test_bad_tokenizer(tmp_path, make, fragments):
    out = tmp_path / "out" / "v.npz"
    out.parent.mkdir()
    assert_clean_failure(invoke(make(tmp_path), "-o", out), *fragments)
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    "out, fragments",
    [
        ("nodir/v.npz", ("directory", "does not exist", "mkdir -p")),
        ("adir", ("is a directory", "ending in .npz")),
        ("v.txt", ("must end in .npz",)),
        ("afile/v.npz", ("is not a directory",)),
    ],
)
def test_unwritable_out(tmp_path, tiny_tokenizer_path, out, fragments):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_clean_failure(invoke(tiny_tokenizer_path, "-o", tmp_path / out), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and list((tmp_path / "adir").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_dir(tmp_path, tiny_tokenizer_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_clean_failure(invoke(tiny_tokenizer_path, "-o", ro / "v.npz"), "not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_read_only_dir_simulated(tmp_path, tiny_tokenizer_path, monkeypatch):
    """What access(2) reports for a read-only mount (EROFS) even to root."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real_access(p, mode, **kw))
    assert_clean_failure(invoke(tiny_tokenizer_path, "-o", tmp_path / "v.npz"), "not writable", "choose a writable")
    assert list(tmp_path.iterdir()) == []


def test_write_failure_leaves_nothing(tmp_path, tiny_tokenizer_path, monkeypatch):
    """The disk fails half-way through writing: no file at --out and no partial file."""
    real_savez = np.savez

    def failing_savez(file, **arrays):
        real_savez(file, **arrays)  # the partial file exists now ...
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... and then the disk fills

    monkeypatch.setattr(np, "savez", failing_savez)
    assert_clean_failure(invoke(tiny_tokenizer_path, "-o", tmp_path / "v.npz"), "No space left on device", "choose a writable path")
    assert list(tmp_path.iterdir()) == []
