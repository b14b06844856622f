"""`engram build-table` end to end through the real typer app (CliRunner).

Expected figures come from independent routes: the raw `tokenizers` encoder per file
and the reference position hash (`hash_positions`, docs/spec.md, "Hash") over
every document, bincounted per row; the published vectors of docs/spec.md "Test vectors" for the plan.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from engram_cli import store as store_module
from engram_cli.cli import app

from cli_checks import copy_fixtures, one_error_line
from engram_cli.hashing import position_row_ids
from engram_cli.store import TableStore

SMALL_FILES = ["debian-policy/ap-license.rst", "debian-policy/index.rst", "debian-policy/ap-pkg-alternatives.rst", "developers-reference/scope.rst"]
# A small plan: 2 layers x orders 2..3 x 4 heads, rows of 16 float32.
SMALL_PLAN = ["--heads", "4", "--dim", "64", "--rows-per-head", "3001,5003", "--chunk-size", "64KiB", "--shard-size", "256KiB"]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["build-table", *map(str, args)])


@pytest.fixture()
def small_corpus(tmp_path):
    return copy_fixtures(tmp_path / "corpus", SMALL_FILES)


def test_plan_only_checks_the_corpus_path(tmp_path):
    result = invoke(tmp_path / "missing", "--plan-only")
    assert result.exit_code == 2
    assert result.output.startswith("Error: corpus path") and len(result.output.strip().splitlines()) == 1


def test_plan_only_is_the_reference_plan(tmp_path):
    (tmp_path / "a.txt").write_text("unused text\n")
    result = invoke(tmp_path, "--plan-only", "--json")  # the corpus is checked, not read
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    layers = {layer["layer_id"]: layer for layer in plan["layers"]}
    # docs/spec.md, "Test vectors" (published vectors)
    assert layers[1]["orders"][0]["primes"] == [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]
    assert layers[1]["orders"][1]["primes"] == [646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619]
    assert layers[15]["orders"][0]["primes"] == [646631, 646637, 646643, 646669, 646687, 646721, 646757, 646771]
    assert layers[15]["orders"][1]["primes"] == [646781, 646823, 646831, 646837, 646843, 646859, 646873, 646879]
    assert layers[1]["multipliers"] == ["76632096046245", "4839876093313", "35959672319349"]
    assert layers[15]["multipliers"] == ["28919099099511", "56020370062535", "53929037264533"]
    assert plan["total_rows"] == sum(sum(o["primes"]) for layer in plan["layers"] for o in layer["orders"])
    assert plan["total_bytes"] == plan["total_rows"] * 64 * 4
    assert not (tmp_path / "tables.zarr").exists()


def test_build_matches_independent_hash_of_every_position(tmp_path, small_corpus, deepseek_tokenizer, deepseek_vocab):
    out = tmp_path / "t.zarr"
    result = invoke(small_corpus, "-o", out, *SMALL_PLAN, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)

    # Independent route: each file is one document, encoded alone by the raw tokenizer.
    docs = []
    for rel in sorted(SMALL_FILES):
        ids = deepseek_tokenizer.tokenizer.encode((small_corpus / rel).read_text(), add_special_tokens=False).ids
        docs.append(deepseek_vocab.lookup[np.asarray(ids, dtype=np.int64)])
    tokens = sum(len(d) for d in docs)
    assert report["corpus"]["documents"] == len(SMALL_FILES)
    assert report["corpus"]["tokens"] == tokens
    for n in ("2", "3"):
        assert report["stats"]["per_order"][n]["windows"] == tokens

    store = TableStore.open(out)
    plan = store.plan
    assert plan.heads == 4 and plan.head_dim == 16 and plan.rows_per_head == (3001, 5003)
    assert report["plan"]["fingerprint"] == plan.fingerprint
    for layer in plan.layer_ids:
        expected = np.zeros(plan.layer_rows(layer), dtype=np.int64)
        for doc in docs:
            rows = position_row_ids(plan, layer, doc[None, :])  # (1, T, 2*K)
            expected += np.bincount(rows.ravel(), minlength=plan.layer_rows(layer))
        hits = zarr.open_group(str(out), mode="r")[f"layer_{layer}/hits"][:]
        np.testing.assert_array_equal(hits.astype(np.int64), expected)
        # every window lands once per head of each order
        assert int(hits.sum()) == tokens * plan.heads * len(plan.orders)


def test_existing_output_needs_force(tmp_path, small_corpus):
    out = tmp_path / "t.zarr"
    assert invoke(small_corpus, "-o", out, *SMALL_PLAN, "--json").exit_code == 0
    before = TableStore.open(out).attrs["created"]
    line = one_error_line(invoke(small_corpus, "-o", out, *SMALL_PLAN))
    assert "--force" in line
    assert TableStore.open(out).attrs["created"] == before  # untouched
    result = invoke(small_corpus, "-o", out, *SMALL_PLAN, "--seed", "7", "--force", "--json")
    assert result.exit_code == 0, result.output
    assert TableStore.open(out).plan.seed == 7
    assert not store_module.partial_path(out).exists()


def test_output_inside_the_corpus_is_refused(tmp_path, small_corpus):
    out = small_corpus / "tables.zarr"  # the output would lie inside the corpus directory
    before = sorted(p.relative_to(small_corpus) for p in small_corpus.rglob("*"))
    for extra in ([], ["--force"]):
        line = one_error_line(invoke(small_corpus, "-o", out, *SMALL_PLAN, *extra))
        assert "inside the corpus path" in line and str(small_corpus) in line
    assert sorted(p.relative_to(small_corpus) for p in small_corpus.rglob("*")) == before  # nothing written there
    assert not list(tmp_path.glob(".*.lock"))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--budget", "1GiB", "--rows-per-head", "5000"], "--budget and --rows-per-head"),
        (["--budget", "lots"], "budget"),
        (["--memory-limit", "-3"], "--memory-limit"),
        (["--layers", "1,x"], "--layers"),
        (["--heads", "3"], "--dim 512"),
        (["--pad-id", "999999"], "--pad-id"),
        (["--dtype", "int2"], "--dtype"),
        (["--init", "bogus"], "--init"),
        (["--init-std", "nan"], "--init-std"),
        (["--compressor", "gzip"], "--compressor"),
        (["--workers", "0"], "--workers"),
        (["--seed", "-5"], "--seed"),
        (["--rows-per-head", "100000000000000000000"], "--rows-per-head"),
        (["--chunk-size", "0"], "--chunk-size"),
    ],
)
def test_bad_options_fail_before_work(tmp_path, small_corpus, args, fragment):
    out = tmp_path / "t.zarr"
    line = one_error_line(invoke(small_corpus, "-o", out, *args))
    assert fragment in line
    assert not out.exists() and not store_module.partial_path(out).exists()


@pytest.mark.parametrize("args", [["--seed", "-1", "--layers", "0"], ["--rows-per-head", "100000000000000000000"]])
def test_plan_only_rejects_out_of_range_plans(tmp_path, args):
    line = one_error_line(invoke(tmp_path / "unused", "--plan-only", *args))
    assert ("--seed" in line) or ("--rows-per-head" in line)


def test_missing_and_empty_corpus(tmp_path):
    out = tmp_path / "t.zarr"
    line = one_error_line(invoke(tmp_path / "nope", "-o", out, *SMALL_PLAN))
    assert "nope" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_error_line(invoke(empty, "-o", out, *SMALL_PLAN))
    assert "holds no files" in line
    # Files without text are found out only by reading them, after the plan is shown:
    # the error is still one line, the last one, and nothing is left behind.
    (empty / "blank.txt").write_text("")
    (empty / "blank.jsonl").write_text("")
    result = invoke(empty, "-o", out, *SMALL_PLAN)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert "no documents" in errors[0] or "no tokens" in errors[0] or "empty" in errors[0]
    assert not out.exists() and not store_module.partial_path(out).exists()


def test_interrupted_build_leaves_no_store(tmp_path, small_corpus, monkeypatch):
    out = tmp_path / "t.zarr"
    real = store_module.write_shard
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module.writer, "write_shard", interrupted)
    result = invoke(small_corpus, "-o", out, *SMALL_PLAN, "--workers", "1")
    assert result.exit_code == 130, result.output
    assert len(calls) == 2
    assert not out.exists()
    assert not store_module.partial_path(out).exists()


def test_vocab_default_is_used_when_it_matches_and_rebuilt_when_not(tmp_path, monkeypatch, tiny_tokenizer_path):
    from engram_cli.vocab import CompressedVocab, load_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text\n")
    made = runner.invoke(app, ["compress-vocab", str(tiny_tokenizer_path)])  # ./vocab.npz for another tokenizer
    assert made.exit_code == 0 and "Wrote vocab.npz" in made.stderr
    tiny_sha = CompressedVocab.load("vocab.npz").tokenizer_sha256
    r = invoke(tmp_path / "a.txt", "--plan-only")
    assert r.exit_code == 0, r.output
    assert "does not match deepseek" in r.stderr and "rebuilt it" in r.stderr
    rebuilt = CompressedVocab.load("vocab.npz")
    assert rebuilt.tokenizer_sha256 == load_tokenizer("deepseek").sha256 != tiny_sha
    r = invoke(tmp_path / "a.txt", "--plan-only")
    assert r.exit_code == 0 and "Using ./vocab.npz (matches deepseek)." in r.stderr
    assert "Table plan" in r.stdout and "Table plan" not in r.stderr
