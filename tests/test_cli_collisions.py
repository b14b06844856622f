"""`engram collisions` end to end on small stores built here; figures checked by brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from engram_cli.cli import app
from engram_cli.ngrams import write_stats_from_arrays
from engram_cli.plan import make_plan
from engram_cli.store import create_store
from engram_cli.vocab import compress_vocab

from oracles import brute_force, check_audit, close

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["collisions", *map(str, args)])


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer):
    """A store (4 heads, small primes) with statistics, and one without."""
    vocab = compress_vocab(tiny_tokenizer)
    C = vocab.compressed_size
    rng = np.random.default_rng(17)
    per_order = {}
    for n, m in ((2, 220), (3, 260)):
        ids = np.unique(rng.integers(0, C, size=(m, n)), axis=0)
        per_order[n] = (ids, rng.zipf(1.8, size=len(ids)).astype(np.int64))
    root = tmp_path_factory.mktemp("collisions_cli")
    stats_root = root / "stats_src"
    write_stats_from_arrays(stats_root, per_order)
    plan = make_plan(
        compressed_vocab_size=C,
        compressed_pad_id=int(vocab.lookup[2]),
        layer_ids=(1, 15),
        heads=4,
        dim=64,
        rows_per_head=(50, 80),
        vocab_fingerprint=vocab.fingerprint,
        tokenizer_sha256=vocab.tokenizer_sha256,
    )
    store = create_store(root / "tables.zarr", plan, vocab, stats_root=stats_root)
    bare = create_store(root / "bare.zarr", plan, vocab, stats_root=None)
    return {"store": store.path, "bare": bare.path, "plan": plan, "vocab": vocab, "per_order": per_order, "root": root}


def test_json_report_matches_brute_force(built):
    r = invoke(built["store"], "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["what_if"] is False and report["store"] == str(built["store"])
    assert report["plan"]["primes"] == {str(k): [list(o) for o in v] for k, v in built["plan"].primes.items()}
    keys = built["vocab"].keys
    for a in report["audit"]:
        ids, counts = built["per_order"][a["order"]]
        check_audit(a, brute_force("reference", built["plan"], a["layer"], a["order"], ids, counts), ids, counts, keys)


def test_what_if_heads_on_a_store_built_with_another_head_count(built):
    r = invoke(built["store"], "--heads", 8, "--hash", "xxh3", "--layers", 15, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["what_if"] and report["stored_plan"]["heads"] == 4 and report["plan"]["heads"] == 8
    what_if = built["plan"].remade(heads=8)
    assert [(a["family"], a["layer"]) for a in report["audit"]] == [("xxh3", 15), ("xxh3", 15)]
    for a in report["audit"]:
        ids, counts = built["per_order"][a["order"]]
        assert [h["p"] for h in a["heads"]] == list(what_if.primes[15][a["order"] - 2])
        check_audit(a, brute_force("xxh3", what_if, 15, a["order"], ids, counts), ids, counts)


def test_the_stored_head_count_is_the_stored_plan(built):
    r = invoke(built["store"], "--heads", built["plan"].heads, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert not report["what_if"] and report["stored_plan"] is None
    assert report["plan"]["primes"] == {str(k): [list(o) for o in v] for k, v in built["plan"].primes.items()}


def test_rows_per_head_and_sweep_axes_after_the_flag(built):
    r = invoke(built["store"], "--rows-per-head", "40,70", "--sweep", "heads=1,2", "rows=1x,2x", "--target", 0.4, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["plan"]["rows_per_head"] == [40, 70]
    assert report["sweep"]["heads"] == [1, 2] and report["sweep"]["rows"] == ["1x", "2x"]
    assert {(c["heads"], c["rows"]) for c in report["sweep"]["grid"]} == {(1, "1x"), (1, "2x"), (2, "1x"), (2, "2x")}
    assert [o["order"] for o in report["sizing"]["orders"]] == [2, 3]
    ids, counts = built["per_order"][2]
    what_if = built["plan"].remade(rows_per_head=(40, 70))
    a = report["audit"][0]
    bf = brute_force("reference", what_if, 1, 2, ids, counts)
    for h, e in zip(a["heads"], bf["heads"]):
        close(h["token_weighted"], e["token_weighted"], "token-weighted")


def test_summary_first_details_on_request(built):
    r = invoke(built["store"])
    assert r.exit_code == 0, r.output
    report = json.loads(invoke(built["store"], "--json").stdout)
    out = r.stdout
    assert out.index("summary (mean over heads)") < out.index("worst buckets")
    assert "excess" not in out and "--details" in out  # per-head tables only on request
    lines = [line for line in out.splitlines() if line.startswith("│ reference")]
    assert len(lines) == len(report["audit"])  # one summary line per layer and order
    first = report["audit"][0]
    cells = [c.strip() for c in lines[0].strip("│ ").split("│")]
    assert cells[:3] == ["reference", str(first["layer"]), str(first["order"])]
    # the summary's figures, from the per-head figures by an independent mean
    heads = first["heads"]
    expected = [sum(h[k] for h in heads) / len(heads) for k in ("shared_observed", "shared_ideal")]
    expected += [first["across"]["clean_head"]["distinct"], sum(h["token_weighted"] for h in heads) / len(heads)]
    assert [float(c.rstrip("%")) / 100 for c in cells[4:]] == pytest.approx(expected, abs=5e-5)


def test_rich_report(built):
    r = invoke(built["store"], "--hash", "reference,xxh3", "--top", 3, "--details")
    assert r.exit_code == 0, r.output
    out = r.output
    for text in ("summary (mean over heads)", "worst partner: for each n-gram", " · ", "reference hash, layer 1, order 2", "xxh3 hash, layer 15, order 3", "excess", "tok rate", "distance from the ideal hash", "worst buckets", "indistinguishable"):
        assert text in out, text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows-per-head", "100", "--budget", "1MB"], "Error: --budget and --rows-per-head both size the tables; give one of them"),
        (["--plot", "x.png"], "Error: --plot draws the --sweep grid; add --sweep"),
        (["rows=1x"], "Error: 'rows=1x' is a sweep axis; write it after --sweep"),
        (["--target", "2"], "Error: --target must be a rate between 0 and 1 (e.g. 0.05), got 2.0"),
        (["--hash", "md5"], "Error: unknown hash family 'md5'; use reference, xxh3, or reference,xxh3"),
        (["--sweep", "cols=3"], "Error: cannot read --sweep 'cols=3'"),
        (["--layers", "7"], "Error: --layers 7 not in the plan (layers 1,15)"),
    ],
)
def test_bad_options_fail_with_one_line(built, args, message):
    r = invoke(built["store"], *args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith(message), r.output
    assert len(r.output.strip().splitlines()) == 1


def test_store_without_statistics(built):
    r = invoke(built["bare"])
    assert r.exit_code == 2
    assert r.output.strip() == f"Error: table store {str(built['bare'])!r} holds no n-gram statistics (built without a corpus); rebuild it with `engram build-table CORPUS`"


def test_missing_store_defaults_to_tables_zarr(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("--heads", 8)
    assert r.exit_code == 2
    assert r.output.strip() == "Error: table store 'tables.zarr' does not exist; build it with `engram build-table`"


def test_plot(built, tmp_path):
    out = tmp_path / "sweep.png"
    r = invoke(built["store"], "--sweep", "heads=1,2", "--plot", out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.exit_code == 2 and "pip install 'engram-cli[plot]'" in r.output
        assert not out.exists()
    else:
        assert r.exit_code == 0, r.output
        assert out.stat().st_size > 0


def test_plot_into_missing_directory_fails_up_front(built, tmp_path):
    """One line and exit 2, before any audit work, whether or not matplotlib is installed."""
    out = tmp_path / "nodir" / "p.png"
    r = invoke(built["store"], "--sweep", "heads=1,2", "--plot", out)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    dir_error = f"Error: --plot {str(out)!r}: directory {str(out.parent)!r} does not exist; create it or choose another path"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert lines[0] in (dir_error, "Error: --plot needs matplotlib, which is not installed; run `pip install 'engram-cli[plot]'` (or pip install matplotlib)")
    else:
        assert lines[0] == dir_error
    assert not out.parent.exists()
    # checked before the store is opened: a missing store is not what is reported
    r = invoke(tmp_path / "no_store.zarr", "--sweep", "heads=1,2", "--plot", out)
    assert r.exit_code == 2 and "--plot" in r.output and "no_store" not in r.output, r.output
