"""Reliability of `engram train`'s outputs and of checkpoint reads (issue 23, the checkpoint side).

In the style of tests/test_hardening.py: real stores, real processes (SIGSTOP to force two
trains and a rebuild to meet; the file-size limit of `ulimit -f`, RLIMIT_FSIZE, to fail
the checkpoint write), real files damaged on disk. Every refusal is one `Error: ...`
line, exit 2, nothing of the user's overwritten, and a checkpoint never evaluated against
another train's table. One training (a subprocess, 1 step on a 60 kB corpus) serves the
module; the failed write is a second one, in this process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import FIXTURES, one_error_line
from typer.testing import CliRunner

from engram_cli.checkpoint import (
    check_unit,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
)
from engram_cli.cli import app
from engram_cli.errors import CheckpointError
from engram_cli.model import EngramGPT, ModelConfig
from engram_cli.store import TableStore
from engram_cli.store.output import hold_read, lock_path, read_locks, readers_path
from engram_cli.train_stats import ROWS_FILE, load_stats, stats_path

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
SMALL = ["--layers", "1", "--heads", "2", "--dim", "64", "--rows-per-head", "101", "--chunk-size", "1KiB", "--shard-size", "4KiB"]
TRAIN = ["--steps", "1", "--split", "segment", "--heldout-fraction", "0.5"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def engram_process(args, cwd) -> subprocess.Popen:
    """`engram ARGS` as a real process of this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "engram_cli.cli", *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def digest(root: Path) -> dict:
    paths = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): (None if p.is_dir() else p.read_bytes()) for p in paths}


def beside(path: Path) -> list[str]:
    """What a train of `path` may leave beside it: temps, partials, locks."""
    stem = path.name.removesuffix(".ckpt")
    return sorted(n.name for n in path.parent.iterdir() if n.name.startswith((f".{stem}", f"{stem}.")) and n.name not in
                  (path.name, f"{stem}.tables.zarr", f"{stem}.train-stats"))


@pytest.fixture(scope="module")
def unit(tmp_path_factory, deepseek_vocab_file):
    """One real train A to m.ckpt, stopped (SIGSTOP) while it holds its locks, while B trains to the same -o and a rebuild
    of its input store runs; then continued. Returns the paths and what B and the rebuild got."""
    root = tmp_path_factory.mktemp("train_unit")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "faq.txt").write_bytes((FIXTURES / "debian-faq" / "debian-faq.en.txt").read_bytes()[:60000])
    store = root / "s.zarr"
    r = invoke("build-table", corpus, "-o", store, *SMALL, "--vocab", deepseek_vocab_file, "--json")
    assert r.exit_code == 0, r.output
    before = digest(store)
    out = root / "m.ckpt"
    a = engram_process(["train", corpus, "--tables", store, "-o", out, *TRAIN, "--json"], cwd=root)
    got = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # A holds the checkpoint's lock and reads the store
            assert a.poll() is None, a.communicate()
            try:
                pid = json.loads(lock_path(out).read_text()).get("pid")
            except (OSError, ValueError):
                pid = None
            if pid == a.pid and readers_path(store).exists():
                break
            time.sleep(0.02)
        a.send_signal(signal.SIGSTOP)
        t0 = time.perf_counter()
        got["second"] = invoke("train", corpus, "--tables", store, "-o", out, *TRAIN, "--force")
        got["rebuild"] = invoke("build-table", corpus, "-o", store, *SMALL, "--vocab", deepseek_vocab_file, "--force", "--json")
        got["seconds"] = time.perf_counter() - t0
        assert a.poll() is None
    finally:
        a.send_signal(signal.SIGCONT)
    stdout, stderr = a.communicate(timeout=600)
    assert a.returncode == 0, stderr.decode()
    assert digest(store) == before
    return {"root": root, "corpus": corpus, "store": store, "out": out, "pid": a.pid, "result": json.loads(stdout), **got}


def test_a_second_train_to_the_same_output_is_refused_at_once_naming_the_first(unit):
    line = one_error_line(unit["second"])
    assert "m.ckpt" in line and f"pid {unit['pid']}" in line
    assert unit["seconds"] < 60
    out = unit["out"]
    assert beside(out) == []  # no temp, partial or lock left by either
    ck = load_checkpoint(out)  # A's unit is whole and one
    check_unit(out, ck, store=TableStore.open(ck["tables"]), stats=load_stats(out))
    assert unit["result"]["tables"].endswith("m.tables.zarr")


def test_a_store_read_by_a_train_is_not_rebuilt_under_it(unit):
    line = one_error_line(unit["rebuild"])
    assert "s.zarr" in line and "is being read" in line
    assert not readers_path(unit["store"]).exists()  # the last reader removed its lock file


@pytest.mark.parametrize("case", ["corpus file", "file", "directory", "symlink", "store", "inside store", "own input", "checkpoint"])
def test_checkpoint_outputs_are_refused_before_training(unit, tmp_path, case):
    corpus, store = unit["corpus"], unit["store"]
    tables, extra = store, []
    if case == "corpus file":
        out, expect = corpus / "faq.txt", "lies inside the corpus path"
        extra = ["--force"]
    elif case == "file":
        out, expect = tmp_path / "notes.txt", "is a file but not an engram checkpoint; --force replaces only a checkpoint"
        out.write_text("the user's notes\n")
        extra = ["--force"]
    elif case == "directory":
        out, expect = tmp_path / "d", "is a directory, not a checkpoint"
        out.mkdir()
        (out / "keep.txt").write_text("mine\n")
    elif case == "symlink":
        out, expect = tmp_path / "link.ckpt", "is a symlink"
        out.symlink_to(unit["out"])
        extra = ["--force"]
    elif case == "store":
        out, expect = store, "is the table store"
    elif case == "inside store":
        out, expect = store / "m.ckpt", "lies inside the table store"
    elif case == "own input":  # --tables x.tables.zarr -o x.ckpt: the trained store would be the input store
        tables = tmp_path / "x.tables.zarr"
        os.symlink(store, tables)
        out, expect = tmp_path / "x.ckpt", "trained store"
    else:
        out, expect = unit["out"], "already exists; pass --force"
    watched = [p for p in (out, corpus, store, unit["out"]) if p.exists()]
    before = {str(p): digest(p) for p in watched}
    t0 = time.perf_counter()
    line = one_error_line(invoke("train", corpus, "--tables", tables, "-o", out, *TRAIN, *extra))
    assert expect in line
    assert time.perf_counter() - t0 < 15  # before the corpus is read
    assert {str(p): digest(p) for p in watched} == before
    assert beside(out) == [] and not lock_path(out).exists()


def test_a_failed_checkpoint_write_leaves_the_previous_unit_whole(unit):
    out = unit["out"]
    files = [out, stats_path(out), out.with_name("m.tables.zarr")]
    before = {str(p): digest(p) for p in files}
    dead = subprocess.Popen(["true"])
    dead.wait()  # the pid of a process that has exited: what a `kill -9` of a train leaves behind
    (out.parent / f".m.ckpt.{dead.pid}.partial").write_bytes(b"PK\x03\x04" + bytes(4096))  # its half-written temps
    (out.parent / f".m.train-stats.{dead.pid}.partial").mkdir()
    (out.parent / f".m.train-stats.{dead.pid}.partial" / "order_2.parquet").write_bytes(bytes(4096))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (out.stat().st_size // 2, hard))  # `ulimit -f`: half the checkpoint, more than the statistics
    try:
        result = invoke("train", unit["corpus"], "--tables", unit["store"], "-o", out, *TRAIN, "--seed", "1", "--force")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [l for l in result.stderr.splitlines() if l.startswith("Error: ")]  # after the progress lines and notices of a whole run
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0])
    assert "m.ckpt" in errors[0] and "File too large" in errors[0] and "nothing was replaced" in errors[0]
    assert result.stderr.count("left by an interrupted train") == 2
    assert {str(p): digest(p) for p in files} == before
    assert beside(out) == []  # the killed train's temps removed under the lock, the failed write's own too


def test_a_flipped_byte_in_a_safetensors_checkpoint_is_one_line(unit, tmp_path):
    ck = load_checkpoint(unit["out"])
    model = EngramGPT(ModelConfig.from_dict(ck["config"]))
    model.load_state_dict(ck["weights"])
    st = save_checkpoint(unit["root"] / "st.safetensors", model, tables=ck["tables"], plan_fingerprint=ck["plan_fingerprint"],
                         heldout=ck["heldout"], extra=ck["extra"])
    try:
        assert load_checkpoint(st)["config"] == ck["config"]
        data = bytearray(st.read_bytes())
        data[len(data) // 2] ^= 0x40  # inside a weight
        st.write_bytes(bytes(data))
        line = one_error_line(invoke("eval", st, "--json"))
        assert "st.safetensors" in line and "XXH3-128" in line
    finally:
        st.unlink()


def test_eval_refuses_a_checkpoint_whose_store_or_statistics_come_from_another_train(unit, tmp_path):
    for name in ("m.ckpt", "m.tables.zarr", "m.train-stats"):
        src = unit["root"] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    out = tmp_path / "m.ckpt"
    meta_path = tmp_path / "m.tables.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    gen = meta["attributes"]["engram"]["generation"]
    assert torch.load(out, weights_only=True)["extra"]["generation"] == gen
    meta["attributes"]["engram"]["generation"] = "0" * 32  # the store another train wrote there
    meta_path.write_text(json.dumps(meta))
    line = one_error_line(invoke("eval", out, "--json"))
    assert "m.ckpt" in line and "m.tables.zarr" in line and gen[:12] in line and "000000000000" in line
    ck, store = load_checkpoint(out), TableStore.open(tmp_path / "m.tables.zarr")
    with pytest.raises(CheckpointError, match="different trains"):  # --tables naming the same store: checked too
        check_unit(out, ck, store=store, stats=None)
    meta["attributes"]["engram"]["generation"] = gen
    meta_path.write_text(json.dumps(meta))
    check_unit(out, ck, store=TableStore.open(tmp_path / "m.tables.zarr"), stats=load_stats(out))  # the unit again
    rows_file = stats_path(out) / ROWS_FILE
    with np.load(rows_file) as z:
        stats = {k: z[k] for k in z.files}
    np.savez(rows_file, **{**stats, "generation": np.array("1" * 32)})
    with pytest.raises(CheckpointError, match=r"training statistics \(generation 111111111111\)"):
        check_unit(out, ck, store=None, stats=load_stats(out))


KILL_IN_PUBLISH = """
import os, signal, sys
import numpy as np
from engram_cli.checkpoint import checkpoint_bytes, load_checkpoint, new_generation
from engram_cli.model import EngramGPT, ModelConfig
from engram_cli.store import TableStore
from engram_cli.train import publish_unit
from engram_cli.checkpoint import temp_path
from engram_cli.train_stats import stats_path, write_training_stats
out, src = sys.argv[1], sys.argv[2]
ck = load_checkpoint(out)
model = EngramGPT(ModelConfig.from_dict(ck["config"]))
model.load_state_dict(ck["weights"])
gen = new_generation()
data = checkpoint_bytes(out, model, tables=ck["tables"], plan_fingerprint=ck["plan_fingerprint"], heldout=ck["heldout"], extra={**ck["extra"], "generation": gen})
store = TableStore.open(src)
stats = write_training_stats(temp_path(stats_path(out)), store.plan, store.vocab, np.arange(64) % 50, ck["config"]["engram_layers"], generation=gen)
layer = ck["config"]["engram_layers"][0]
rows = (np.array([0, 1]), np.ones((2, TableStore.open(src).head_dim), np.float32))
real = os.replace
def replace(a, b):
    if os.fspath(b) == out:  # the checkpoint's rename, the last step of publishing
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)
os.replace = replace
publish_unit(out, data, src=src, trained={layer: rows}, stats_dir=stats, force=True, generation=gen)
"""


def test_kill_9_before_the_checkpoint_moves_in_leaves_a_pair_eval_refuses(unit, tmp_path):
    for name in ("m.ckpt", "m.tables.zarr", "m.train-stats"):
        src = unit["root"] / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    out = tmp_path / "m.ckpt"
    old = out.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_PUBLISH, str(out), str(unit["store"])], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert out.read_bytes() == old  # the old checkpoint, beside the new store and statistics
    assert [n.name for n in tmp_path.iterdir() if n.name.startswith(".m.ckpt.")] != []  # the killed writer's temp
    line = one_error_line(invoke("eval", out, "--json"))
    assert "m.ckpt" in line and "m.tables.zarr" in line and "different trains" in line
    remove_stale_temps(out)  # what the next train of -o does under its lock
    assert beside(out) == []


def test_a_store_an_eval_reads_is_not_replaced_by_a_train(unit):
    """eval's read lock (here taken by the library call eval makes) refuses a `train --force` of the same -o before training."""
    trained = unit["out"].with_name("m.tables.zarr")
    before = digest(trained)
    with read_locks():
        hold_read(trained)
        t0 = time.perf_counter()
        line = one_error_line(invoke("train", unit["corpus"], "--tables", unit["store"], "-o", unit["out"], *TRAIN, "--force"))
        assert "m.tables.zarr" in line and "is being read" in line and time.perf_counter() - t0 < 15
    assert digest(trained) == before and not readers_path(trained).exists()


# -- malformed checkpoints: one line each --------------------------------------------------------
def _set(d: dict, path: str, value):
    keys = path.split(".", 1) if path.startswith("weights.") else path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value(d[keys[-1]]) if callable(value) else value


CASES = [
    ("config", KeyError, "lacks 'config'"), ("extra", KeyError, "lacks 'extra'"), ("heldout", KeyError, "lacks 'heldout'"),
    ("extra.token_ids", KeyError, "lacks 'token_ids'"), ("config", "n_layer=4", "config is str"),
    ("config.dropout", 0.1, "unknown key(s) 'dropout'"), ("surprise", 1, "unknown top-level key(s) 'surprise'"),
    ("config.n_head", 0, "config.n_head = 0 is outside"), ("config.d_model", "128", "config.d_model is str"),
    ("config.engram_layers", [999], "engram_layers = 999 is outside"), ("config.engram_blocks", [9], "engram_blocks = 9 is outside"), ("config.engram_layers", "1", "config.engram_layers is str"),
    ("config.table_rows", [420], "config.table_rows is list"), ("tables", 5, "tables is int"), ("heldout", None, "heldout is NoneType"),
    ("config.n_layer", 10**7, "config.n_layer = 10000000 is outside"), ("config.d_model", 10**6, "config.d_model = 1000000 is outside"),
    ("config.vocab_size", 10**12, "config.vocab_size = 1000000000000 is outside"), ("config.eps", float("nan"), "not in (0, 1)"),
    ("config.vocab_size", 1 << 22, "weights['wte.weight'] has shape"),
    ("config", lambda c: {**c, "vocab_size": 1 << 22, "d_model": 1 << 16}, "of weights, more than the"),
    ("extra.token_ids", torch.zeros(3, 2, dtype=torch.int64), "not a 1-D integer tensor"),
    ("extra.touched_rows", {"1": torch.tensor([10**6])}, "extra.touched_rows['1'] has values outside"),
    ("weights.wte.weight", torch.zeros(3, 3), "weights['wte.weight'] has shape (3, 3)"), ("heldout.documents", [{"file": 3}], "heldout.documents[0].file is int"),
]


def test_malformed_checkpoints_are_one_line_each(unit):
    good = torch.load(unit["out"], weights_only=True)
    t0 = time.perf_counter()
    for i, (key, value, expect) in enumerate(CASES):
        bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        bad["config"], bad["extra"], bad["heldout"] = dict(good["config"]), dict(good["extra"]), dict(good["heldout"])
        _set(bad, key, value)
        path = unit["root"] / f"bad{i}.ckpt"  # beside the unit's store, which the checkpoint names relative to itself
        torch.save(bad, path)
        try:
            line = one_error_line(invoke("eval", path, "--json"))
        finally:
            path.unlink()
        assert expect in line and f"bad{i}.ckpt" in line, (key, line)
    assert time.perf_counter() - t0 < 120


def test_eval_on_an_empty_corpus_file_is_one_line(unit, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = one_error_line(invoke("eval", unit["out"], "--corpus", empty, "--json"))
    assert "has 0 tokens" in line
