"""Plan sizes (bytes vs free disk, the >1 GiB notice) and `--rows-per-head auto --target`.

The auto plan is checked by an independent route: the `collisions --target` metric
(`token_weighted_rate`) measured on the written store's own plan and statistics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app

from cli_checks import FIXTURES, copy_fixtures, one_error_line
from engram_cli.audit import load_order_keys, token_weighted_rate
from engram_cli.errors import PlanError
from engram_cli.pipeline.sizing import AUTO, LARGE_PLAN_BYTES, free_disk_bytes, large_plan_notice, plan_footprint, resolve_rows_option
from engram_cli.plan import DEFAULT_ROWS_PER_HEAD, make_plan
from engram_cli.store import TableStore

SMALL = ["--heads", "4", "--dim", "64", "--chunk-size", "64KiB", "--shard-size", "256KiB"]
TARGET = 0.2

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["build-table", *map(str, args)])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return copy_fixtures(tmp_path_factory.mktemp("sizing") / "corpus")


def test_footprint_is_rows_times_row_bytes_against_the_free_disk(tmp_path):
    plan = make_plan(compressed_vocab_size=1000, compressed_pad_id=2, heads=4, dim=64, rows_per_head=(3001, 5003))
    fp = plan_footprint(plan, tmp_path / "not-yet" / "tables.zarr")
    rows = sum(p for layer in plan.primes.values() for order in layer for p in order)
    assert fp["bytes"] == rows * 16 * 4
    free = shutil.disk_usage(tmp_path).free
    assert abs(fp["free_disk_bytes"] - free) < 64 * 2**20  # other writers on the disk move it a little
    assert fp["share_of_free_disk"] == pytest.approx(fp["bytes"] / fp["free_disk_bytes"])
    assert not fp["large"] and large_plan_notice(fp) is None
    assert free_disk_bytes(tmp_path) is not None


def test_reference_plan_is_large_and_the_notice_names_auto(tmp_path):
    (tmp_path / "corpus.txt").write_text("--plan-only checks that the corpus exists\n")
    result = invoke(tmp_path / "corpus.txt", "--plan-only", "-o", tmp_path / "t.zarr")
    assert result.exit_code == 0, result.output
    plan = make_plan(compressed_vocab_size=10, compressed_pad_id=2)  # bytes do not depend on the vocabulary
    assert plan.total_bytes > LARGE_PLAN_BYTES
    assert f"{plan.total_bytes:,} bytes" in result.stdout + result.stderr
    assert "GiB free" in result.stdout + result.stderr
    notices = [line for line in result.stderr.splitlines() if line.startswith("Notice:")]
    assert len(notices) == 1 and "--rows-per-head auto" in notices[0]


def test_plan_only_json_carries_the_size(tmp_path):
    (tmp_path / "corpus.txt").write_text("--plan-only checks that the corpus exists\n")
    result = invoke(tmp_path / "corpus.txt", "--plan-only", "--json", *SMALL, "--rows-per-head", "3001")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["plan_size"]["bytes"] == out["plan"]["total_rows"] * out["plan"]["head_dim"] * 4
    assert out["plan_size"]["large"] is False
    assert "Notice" not in result.stderr


def test_rows_option_resolution():
    assert resolve_rows_option(None, None) == (DEFAULT_ROWS_PER_HEAD, None)
    assert resolve_rows_option("3001,5003", None) == ([3001, 5003], None)
    assert resolve_rows_option("AUTO", 0.1) == (AUTO, 0.1)
    for args, kwargs in (((AUTO, None), {}), ((AUTO, 1.5), {}), (("3001", 0.1), {}), ((AUTO, 0.1), {"plan_only": True})):
        with pytest.raises(PlanError):
            resolve_rows_option(*args, **kwargs)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--rows-per-head", "auto", "--plan-only", "--target", "0.1"], "--plan-only"),
        (["--rows-per-head", "auto"], "--target"),
        (["--target", "0.1"], "--rows-per-head auto"),
    ],
)
def test_auto_misuse_is_one_line(tmp_path, small_corpus, extra, words):
    line = one_error_line(invoke(small_corpus, "-o", tmp_path / "t.zarr", *extra))
    assert words in line
    assert not (tmp_path / "t.zarr").exists()


def test_auto_sizes_each_order_to_the_target(tmp_path, small_corpus):
    out = tmp_path / "auto.zarr"
    result = invoke(small_corpus, "-o", out, *SMALL, "--rows-per-head", "auto", "--target", TARGET, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    store = TableStore.open(out)
    plan, stats = store.plan, store.stats
    assert report["plan"]["fingerprint"] == plan.fingerprint
    assert list(plan.rows_per_head) == [o["rows_per_head"] for o in report["sizing"]["orders"]]
    assert report["plan_size"]["bytes"] == plan.total_rows * plan.head_dim * 4
    # primes as the plan code makes them: distinct across everything
    primes = [p for layer in plan.primes.values() for order in layer for p in order]
    assert len(set(primes)) == len(primes)
    # independent route: the collisions metric on the written plan meets the target in every
    # layer, and a plan 20% smaller misses it in at least one layer for every order
    smaller = plan.remade(rows_per_head=tuple(int(r * 0.8) for r in plan.rows_per_head))
    for n in plan.orders:
        rates, rates_small = [], []
        for layer in plan.layer_ids:
            keys = load_order_keys(plan, stats, layer, n, "reference", heads=plan.heads)
            rates.append(token_weighted_rate(keys, plan.primes[layer][n - 2]))
            rates_small.append(token_weighted_rate(keys, smaller.primes[layer][n - 2]))
        assert max(rates) <= TARGET, (n, rates)
        assert max(rates_small) > TARGET, (n, rates_small)
    # and the same search through `engram collisions --target` on the store agrees
    col = runner.invoke(app, ["collisions", str(out), "--target", str(TARGET), "--json"])
    assert col.exit_code == 0, col.output
    theirs = [o["rows_per_head"] for o in json.loads(col.stdout)["sizing"]["orders"]]
    assert np.allclose(theirs, plan.rows_per_head, rtol=0.03), (theirs, plan.rows_per_head)


DOC = Path(__file__).resolve().parent.parent / "docs" / "build-table.md"


def test_docs_sizing_figures(tmp_path, deepseek_tokenizer, deepseek_vocab):
    """The fixture-corpus table of docs/build-table.md ("Sizing"), recomputed."""
    import re

    from engram_cli.pipeline.build import plan_tables
    from engram_cli.pipeline.count import count_corpus
    from engram_cli.pipeline.sizing import compare_targets, reference_rates

    text = DOC.read_text()
    rows = re.findall(r"^\| ([0-9.]+) \| ([0-9,]+) \| ([0-9,]+) \| ([0-9,]+) \([^)]*\) \| ([0-9.]+)x \|$", text, flags=re.M)
    assert len(rows) >= 3
    base = plan_tables(deepseek_vocab, layer_ids=(1, 15), max_ngram_size=3, heads=8, rows_per_head=DEFAULT_ROWS_PER_HEAD, dim=512, seed=0, pad_id=2)
    corpus, stats = count_corpus([FIXTURES], tokenizer=deepseek_tokenizer, vocab=deepseek_vocab, max_ngram_size=3, pad_id=base.compressed_pad_id, out_dir=tmp_path / "stats")
    assert f"{corpus.files} files, {corpus.tokens:,} tokens; {stats.distinct(2):,}" in " ".join(text.split())
    assert f"is {base.total_bytes:,} bytes" in text
    rates = reference_rates(base, stats)
    assert f"its rates are {rates[2]:.1%} (order 2) and {rates[3]:.1%} (order 3)" in " ".join(text.split())
    got = compare_targets(stats, base, [float(r[0]) for r in rows])
    for r, g in zip(rows, got):
        assert [int(r[1].replace(",", "")), int(r[2].replace(",", ""))] == g["rows_per_head"]
        assert int(r[3].replace(",", "")) == g["total_bytes"]
        assert float(r[4]) == pytest.approx(g["ratio_to_base"], abs=0.005)
