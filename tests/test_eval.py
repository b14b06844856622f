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

from engram_cli.cli import app
from engram_cli.store import TableStore

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
TINY = ["--layers", "1", "--heads", "2", "--rows-per-head", "1000", "--dim", "32", "--shard-size", "16KiB", "--chunk-size", "4KiB"]
STEPS = "60"
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [*map(str, args)])


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def error_line(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_eval")
    shutil.copytree(FIXTURES / "debian-faq", root / "corpus")
    r = run("build-table", root / "corpus", "-o", root / "tables.zarr", *TINY)
    assert r.exit_code == 0, r.output
    before = tree_digest(root / "tables.zarr")
    r = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", root / "mem.ckpt", "--steps", STEPS, "--json")
    assert r.exit_code == 0, r.output
    r2 = run("train", root / "corpus", "--tables", root / "tables.zarr", "-o", root / "base.ckpt", "--steps", STEPS, "--no-engram", "--json")
    assert r2.exit_code == 0, r2.output
    return root, before, json.loads(r.stdout)


def test_train_writes_a_new_store_and_keeps_the_initial_one(trained):
    root, before, result = trained
    assert result["last_loss"] < result["first_loss"]
    assert tree_digest(root / "tables.zarr") == before  # the built store is the initial state
    init, new = TableStore.open(root / "tables.zarr"), TableStore.open(root / "mem.tables.zarr")
    ck = torch.load(root / "mem.ckpt", weights_only=True)
    touched = ck["extra"]["touched_rows"]["1"].numpy()
    a, b = init.table(1)[:], new.table(1)[:]
    changed = np.flatnonzero((a != b).any(1))
    assert set(changed.tolist()) <= set(touched.tolist()) and len(changed) > 0
    # shards without a trained row are hard links of the initial store's files
    shard = init.shard_rows
    untouched_shards = set(range(-(-a.shape[0] // shard))) - set((touched // shard).tolist())
    for s in untouched_shards:
        f = Path("layer_1/table/c") / str(s) / "0"
        assert (root / "tables.zarr" / f).stat().st_ino == (root / "mem.tables.zarr" / f).stat().st_ino


def test_eval_json_schema_and_memory_helps(trained):
    root, _, _ = trained
    r = run("eval", root / "mem.ckpt", root / "base.ckpt", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    mem, base = out["checkpoints"]
    for rep in (mem, base):
        assert {"loss", "loss_memory_ablated", "tokens", "perplexity", "memory_gain", "layers"} <= set(rep)
        assert rep["tokens"] > 0 and np.isfinite(rep["loss"])
    assert mem["tokens"] == base["tokens"]
    assert mem["loss_memory_ablated"] > mem["loss"]
    assert base["loss_memory_ablated"] == base["loss"] and base["layers"] == {}
    lay = mem["layers"]["1"]
    assert len(lay["gate_by_frequency_decile"]) == 10 and 0 < lay["gate_mean"] < 1
    assert 0 < lay["usage"]["rows_touched_heldout"] <= lay["usage"]["rows"]
    assert all(b["bit_exact"] for b in lay["lookups"]["backends"].values())
    rates = list(lay["lookups"]["cache_hit_rate"].values())
    assert rates == sorted(rates) and 0 < rates[0]


def test_eval_refusals(trained, tmp_path):
    root, _, _ = trained
    assert "engram train" in error_line(run("eval", tmp_path / "nothing.ckpt"))
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((root / "mem.ckpt").read_bytes()[:1000])
    assert "corrupt" in error_line(run("eval", cut))
    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "engram-checkpoint/1", "payload": pickle.dumps}, evil)
    assert "unpickling" in error_line(run("eval", evil))
    other = tmp_path / "other.zarr"
    r = run("build-table", root / "corpus", "-o", other, *TINY[:4], "--rows-per-head", "700", "--dim", "32")
    assert r.exit_code == 0, r.output
    assert "fingerprint" in error_line(run("eval", root / "mem.ckpt", "--tables", other))
    assert "missing" in error_line(run("eval", root / "mem.ckpt", "--tables", tmp_path / "gone.zarr"))


def test_train_refuses_a_missing_store(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text((FIXTURES / "debian-faq" / "debian-faq.en.txt").read_text()[:3000])
    assert "build-table" in error_line(run("train", tmp_path / "c", "--tables", tmp_path / "none.zarr", "-o", tmp_path / "m.ckpt"))
