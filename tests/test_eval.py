"""`engram train` and `engram eval` end to end on a tiny real store, and every refusal."""

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli_checks import FIXTURES, one_error_line

from engram_cli.cli import app
from engram_cli.store import TableStore

# 2 heads x orders 2..3 of 20,000 rows: training touches part of the table, so usage and row norms have both kinds of rows
TINY = ["--layers", "1", "--heads", "2", "--rows-per-head", "20000", "--dim", "32", "--shard-size", "16KiB", "--chunk-size", "4KiB"]
STEPS = "40"  # the fewest at which memory clearly helps (ablated loss +0.03 over the trained one; 20 steps: +0.002)
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*map(str, args)])


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, deepseek_vocab_file):
    root = tmp_path_factory.mktemp("train_eval")
    shutil.copytree(FIXTURES / "debian-faq", root / "corpus")
    r = run("build-table", root / "corpus", "-o", root / "tables.zarr", *TINY, "--vocab", deepseek_vocab_file)
    assert r.exit_code == 0, r.output
    before = tree_digest(root / "tables.zarr")
    r = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", root / "mem.ckpt", "--steps", STEPS, "--split", "segment", "--json")
    assert r.exit_code == 0, r.output
    r2 = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", root / "base.ckpt", "--steps", STEPS, "--no-engram", "--split", "segment", "--json")
    assert r2.exit_code == 0, r2.output
    return root, before, json.loads(r.stdout)


def test_train_writes_a_new_store_and_keeps_the_initial_one(trained):
    root, before, result = trained
    assert result["last_loss"] < result["first_loss"]
    assert tree_digest(root / "tables.zarr") == before  # the built store is the initial state
    init, new = TableStore.open(root / "tables.zarr"), TableStore.open(root / "mem.tables.zarr")
    ck = torch.load(root / "mem.ckpt", weights_only=True)
    touched = ck["extra"]["touched_rows"]["1"].numpy()
    assert result["rows_trained"] == {"1": touched.size} and 0 < touched.size < init.table(1).shape[0]
    a, b = init.table(1)[:], new.table(1)[:]
    changed = np.flatnonzero((a != b).any(1))
    np.testing.assert_array_equal(changed, touched)  # every updated row, and only those, differs
    assert ck["heldout"]["share"] == 0.1 and ck["tables"] == "mem.tables.zarr"  # relative to the checkpoint
    assert not any("multi_head_embedding" in k for k in ck["weights"])  # the table is not in the checkpoint


@pytest.fixture(scope="module")
def evaluation(trained) -> dict:
    """`engram eval mem.ckpt base.ckpt --json`, run once for the tests that read its report."""
    root, _, _ = trained
    r = run("eval", root / "mem.ckpt", root / "base.ckpt", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def reports(evaluation) -> list[dict]:
    return evaluation["checkpoints"]


def changed_rows(root) -> np.ndarray:
    init, new = TableStore.open(root / "tables.zarr"), TableStore.open(root / "mem.tables.zarr")
    return (init.table(1)[:] != new.table(1)[:]).any(1)


def test_eval_json_schema_and_memory_helps(reports):
    mem, base = reports
    for rep in (mem, base):
        assert {"checkpoint", "tables", "engram", "steps", "tokens", "loss", "perplexity", "loss_memory_ablated",
                "perplexity_memory_ablated", "memory_gain", "layers", "seconds"} <= set(rep)
        assert rep["tokens"] > 0 and np.isfinite(rep["loss"]) and rep["perplexity"] == pytest.approx(np.exp(rep["loss"]))
    assert mem["tokens"] == base["tokens"] and mem["steps"] == base["steps"] == int(STEPS)
    assert mem["loss_memory_ablated"] > mem["loss"]
    assert base["engram"] is False and base["loss_memory_ablated"] == base["loss"] and base["layers"] == {} and base["memory_gain"] == 0
    assert base["ablations"] == {} and mem["windows"] == base["windows"] == mem["tokens"] // 128
    for rep in (mem, base):
        lo, hi = rep["loss_interval"]
        assert lo < rep["loss"] < hi and hi - lo < 1
    assert list(mem["ablations"]) == ["branch_skipped", "initial_rows", "shuffled_rows", "mean_row"]
    assert mem["ablations"]["branch_skipped"]["loss"] == mem["loss_memory_ablated"]
    for a in mem["ablations"].values():
        assert a["delta"] == pytest.approx(a["loss"] - mem["loss"], abs=1e-9)
        lo, hi = a["interval"]
        assert lo <= a["delta"] <= hi
    assert mem["ablations"]["branch_skipped"]["interval"][0] > 0  # at 40 steps the memory helps beyond the noise of the windows
    lay = mem["layers"]["1"]
    assert 0 < lay["gate_mean"] < 1
    # the store's whole-corpus figures are gone: frequency, row share and cache rates come from the training split only
    assert not {"gate_by_frequency_decile", "gate_by_collision"} & set(lay) and "cache_hit_rate" not in lay["lookups"]
    ts = lay["training_split"]  # from mem.train-stats/: the training split's counts only
    assert set(ts) == {"by_training_count", "by_row_share", "cache_hit_rate"} and list(ts["cache_hit_rate"]) == ["1%", "5%", "10%"]
    for n in ("2", "3"):
        assert sum(b["positions"] for b in ts["by_training_count"][n]) == sum(b["positions"] for b in ts["by_row_share"][n]) == mem["tokens"]
        counts = ts["by_training_count"][n]
        assert counts[0]["max_count"] == 0 and ts["by_row_share"][n][0]["share"] == "unseen"
        assert [(b["min_count"], b["max_count"]) for b in counts[1:]] == [(1 << k, (1 << (k + 1)) - 1) for k in range(len(counts) - 1)]  # log2 bins
        for b in counts + ts["by_row_share"][n]:
            assert (b["gate_mean"] is None) == (b["loss_change"] is None) == (b["positions"] == 0)
            assert b["gate_mean"] is None or 0 < b["gate_mean"] < 1
    u = lay["usage"]
    assert 0 < u["rows_touched_heldout"] <= u["rows"] and u["lookups"] == mem["tokens"] * 4
    assert 0 < u["lookups_on_untrained_rows"] < 1
    assert set(lay["lookups"]["backends"]) >= {"torch", "cpu"}
    assert all(b["bit_exact"] and b["tokens_per_s"] > 0 and b["gb_per_s"] > 0 for b in lay["lookups"]["backends"].values())
    rates = list(ts["cache_hit_rate"].values())
    assert rates == sorted(rates) and 0 < rates[0] and rates[-1] <= 1


def test_eval_paired_difference(evaluation):
    """mem vs base on the same held-out windows: the paired delta is the difference of the two losses."""
    mem, base = evaluation["checkpoints"]
    (p,) = evaluation["paired"]
    assert p["a"].endswith("mem.ckpt") and p["b"].endswith("base.ckpt") and p["same_windows"] is True
    assert mem["windows_sha256"] == base["windows_sha256"]
    assert p["delta"] == pytest.approx(base["loss"] - mem["loss"], abs=1e-9) and p["interval"][0] <= p["delta"] <= p["interval"][1]
    assert evaluation["seed_groups"] == []  # one seed of each config


def test_ablations_by_independent_routes(trained, reports):
    """initial_rows = the same checkpoint scored with the initial store as --tables; the shuffle is a permutation of each head; the mean row is the table's."""
    from engram_cli.ablations import shuffle_row_ids, table_mean_row

    root, _, _ = trained
    r = run("eval", root / "mem.ckpt", "--tables", root / "tables.zarr", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checkpoints"][0]["loss"] == pytest.approx(reports[0]["ablations"]["initial_rows"]["loss"], abs=1e-6)
    store = TableStore.open(root / "mem.tables.zarr")
    plan = store.plan
    n, offs, primes = plan.layer_rows(1), plan.row_offsets(1), plan.head_primes(1)
    heads = np.stack([np.arange(n)] * len(primes), -1)  # every row, as if looked up by every head
    mapped = shuffle_row_ids(plan, 1, heads)
    for h, (o, p) in enumerate(zip(offs, primes)):
        own = np.arange(o, o + p)
        np.testing.assert_array_equal(np.sort(mapped[o : o + p, h]), own)  # a permutation of the head's rows
        assert (mapped[o : o + p, h] != own).mean() > 0.99
    np.testing.assert_array_equal(shuffle_row_ids(plan, 1, heads[:50]), mapped[:50])  # deterministic
    np.testing.assert_allclose(table_mean_row(store, 1), store.table(1)[:].astype(np.float64).mean(0), rtol=1e-5, atol=1e-7)


def test_eval_usage_and_norms_by_an_independent_route(trained, reports, deepseek_tokenizer):
    """Usage from the rows that differ between the initial and the trained store; norms from the whole table."""
    from engram_cli.evaluate import heldout_stream, windows
    from engram_cli.model import row_ids_for

    root, _, _ = trained
    lay = reports[0]["layers"]["1"]  # mem.ckpt's report
    ck = torch.load(root / "mem.ckpt", weights_only=True)
    store = TableStore.open(root / "mem.tables.zarr")
    W = windows(heldout_stream(ck, deepseek_tokenizer), ck["config"]["block_size"])
    rows = row_ids_for(store.plan, store.vocab, 1, W[:, :-1]).ravel()
    changed = changed_rows(root)
    assert lay["usage"]["rows_touched_heldout"] == np.unique(rows).size
    assert lay["usage"]["lookups_on_untrained_rows"] == pytest.approx(float((~changed[rows]).mean()), abs=1e-12)
    norms = np.linalg.norm(store.table(1)[:], axis=1)
    assert lay["row_norms"]["sampled"] is False
    for kind, mask in (("trained", changed), ("untouched", ~changed)):
        q = lay["row_norms"][kind]
        assert q["rows"] == mask.sum() and q["p50"] == pytest.approx(float(np.median(norms[mask])), rel=1e-6)


def test_eval_side_by_side_table(trained):
    root, _, _ = trained
    r = run("eval", root / "mem.ckpt", root / "base.ckpt")
    assert r.exit_code == 0, r.output
    table = r.stdout.split("held-out cross-entropy", 1)[1]
    mem_line = next(l for l in table.splitlines() if "mem.ckpt" in l)
    base_line = next(l for l in table.splitlines() if "base.ckpt" in l)
    assert " yes " in mem_line and " no " in base_line and "+0.0000" in base_line
    for what in ("table ablations", "full model", "branch_skipped", "initial_rows", "shuffled_rows", "mean_row", "paired: ", "by training count", "by share of their row", "cache hit rate by training hits", "table usage", "row norms", "lookups cpu", "hot-row cache hit rate"):
        assert what in r.stdout, what


def test_eval_refusals(trained, tmp_path, deepseek_vocab_file):
    root, _, _ = trained
    assert "engram train" in one_error_line(run("eval", tmp_path / "nothing.ckpt"))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((root / "mem.ckpt").read_bytes()[:1000])
    assert "corrupt" in one_error_line(run("eval", cut))
    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "engram-checkpoint/1", "payload": pickle.dumps}, evil)
    assert "unpickling" in one_error_line(run("eval", evil))
    other = tmp_path / "other.zarr"
    r = run("build-table", root / "corpus", "-o", other, *TINY[:4], "--rows-per-head", "700", "--dim", "32", "--vocab", deepseek_vocab_file)
    assert r.exit_code == 0, r.output
    assert "fingerprint" in one_error_line(run("eval", root / "mem.ckpt", "--tables", other))
    assert "missing" in one_error_line(run("eval", root / "mem.ckpt", "--tables", tmp_path / "gone.zarr"))
    ck = torch.load(root / "mem.ckpt", weights_only=True)
    ck["weights"]["wte.weight"] = ck["weights"]["wte.weight"][:-1]  # a state dict whose shapes do not match
    torch.save(ck, tmp_path / "mem.ckpt")
    shutil.copytree(root / "mem.tables.zarr", tmp_path / "mem.tables.zarr")
    assert "weights do not match" in one_error_line(run("eval", tmp_path / "mem.ckpt"))
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(2, 2)}, str(tmp_path / "bare.safetensors"))  # a bare state dict, no engram metadata
    assert "metadata" in one_error_line(run("eval", tmp_path / "bare.safetensors"))


def test_train_refuses_a_missing_store(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text((FIXTURES / "debian-faq" / "debian-faq.en.txt").read_text()[:3000])
    assert "build-table" in one_error_line(run("train", tmp_path / "c", "--tables", tmp_path / "none.zarr", "-o", tmp_path / "m.ckpt"))


def test_training_counts_by_an_independent_route(trained):
    """The polars join against the training statistics equals a plain dict of the counted n-grams, 0 for n-grams never counted."""
    from engram_cli.train_stats import load_stats, position_ngrams, training_counts
    from engram_cli.vocab import load_tokenizer

    root, _, _ = trained
    store = TableStore.open(root / "tables.zarr")
    plan, vocab = store.plan, store.vocab
    stats = load_stats(root / "mem.ckpt")
    text = (root / "corpus" / "debian-faq.en.txt").read_text()[:3000] + " zyxwv qqqq unusual words"
    x = np.asarray(load_tokenizer().tokenizer.encode(text).ids, dtype=np.int64)[: 4 * 64].reshape(4, 64)
    c = np.asarray(vocab.lookup)[x]
    for n in plan.orders:
        table = {}
        for ids, counts in stats.ngrams.iter_batches(n):
            table.update(zip(map(tuple, ids.tolist()), counts.tolist()))
        grams = position_ngrams(c, n, plan.compressed_pad_id)
        want = np.array([table.get(tuple(g), 0) for g in grams.tolist()], dtype=np.int64)
        np.testing.assert_array_equal(training_counts(stats, grams), want)
        assert (want > 0).mean() > 0.5  # most of the text was in training
