"""A few training steps of the reference model on real tokenized text lower the loss."""

from pathlib import Path

import numpy as np
import torch

from engram_cli.checkpoint import load_checkpoint, save_checkpoint
from engram_cli.errors import CheckpointError
from engram_cli.model import EngramGPT, ModelConfig, table_lookup
from engram_cli.plan import make_plan
from engram_cli.split import is_heldout
from engram_cli.train_loop import RowAdam, TokenMap, train_steps

import pytest


@pytest.fixture(scope="module")
def data(deepseek_tokenizer, deepseek_vocab):
    files = sorted(p for p in Path("fixtures/corpus").rglob("*") if p.is_file())[:3]
    text = "\n".join(p.read_text(errors="replace")[:20000] for p in files)
    stream = np.asarray(deepseek_tokenizer.tokenizer.encode(text).ids, dtype=np.int64)
    plan = make_plan(compressed_vocab_size=deepseek_vocab.compressed_size, compressed_pad_id=int(deepseek_vocab.lookup[2]),
                     layer_ids=(1,), heads=2, dim=32, rows_per_head=1000)
    return stream, plan, deepseek_vocab


def test_few_steps_lower_loss_and_touch_only_batch_rows(data):
    stream, plan, vocab = data
    tmap = TokenMap.from_ids(stream)
    torch.manual_seed(0)
    model = EngramGPT(ModelConfig.for_plan(plan, vocab_size=tmap.size, n_layer=2, n_head=2, d_model=64, block_size=32))
    table = torch.randn(plan.layer_rows(1), plan.head_dim) * 0.02
    lookups = {1: table_lookup(plan, vocab, 1, table)}
    model.attach_tables(lookups)
    before = table.clone()
    losses, opts = train_steps(model, lookups, tmap, stream, steps=30, batch=8)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    changed = np.flatnonzero((table != before).any(1).numpy())
    assert 0 < changed.size < table.shape[0]
    np.testing.assert_array_equal(changed, opts[-1].touched(1))  # exactly the rows with optimizer state


def test_row_adam_matches_torch_sparse_adam(monkeypatch):
    """RowAdam (lazy row state, rows outside the parameters) against torch.optim.SparseAdam on an nn.Embedding."""
    from engram_cli.train_loop import _RowState

    monkeypatch.setattr(_RowState, "BLOCK", 64)  # state spread over several blocks
    torch.manual_seed(0)
    rows, width = 500, 8
    init = torch.randn(rows, width)
    emb = torch.nn.Embedding(rows, width, sparse=True)
    emb.weight.data.copy_(init)
    ref = torch.optim.SparseAdam(emb.parameters(), lr=0.05)

    class Memory:  # what RowAdam reads of a MultiHeadEmbedding: head_dim, lookup.table, last
        head_dim = width
        last = None

        class lookup:
            table = init.clone()

    mem = Memory()
    opt = RowAdam({0: mem}, lr=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        ids = torch.randint(0, rows // (step + 1), (40,), generator=g)  # repeats within a batch, new and old rows
        target = torch.randn(40, width, generator=g)
        ref.zero_grad()
        ((emb(ids) - target) ** 2).sum().backward()
        ref.step()
        uniq, inv = torch.unique(ids, return_inverse=True)
        leaf = mem.lookup.table[uniq].clone().requires_grad_(True)
        ((torch.nn.functional.embedding(inv, leaf) - target) ** 2).sum().backward()
        mem.last = (uniq, leaf)
        opt.step()
        torch.testing.assert_close(mem.lookup.table, emb.weight.detach(), rtol=1e-6, atol=1e-7)
    touched = torch.unique(torch.cat([torch.as_tensor(np.flatnonzero((emb.weight.detach() != init).any(1).numpy()))]))
    np.testing.assert_array_equal(opt.touched(0), touched.numpy())
    assert opt.state[0].ids.size < rows  # state only for rows that had a gradient
    assert len(opt.state[0].exp_avg) == -(-opt.state[0].ids.size // 64) > 1


def test_checkpoint_round_trip_and_refusals(tmp_path, data):
    stream, plan, vocab = data
    model = EngramGPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=8))
    p = save_checkpoint(tmp_path / "m.ckpt", model, tables=None, plan_fingerprint=None, heldout={"share": 0.1, "seed": 0})
    ck = load_checkpoint(p)
    m2 = EngramGPT(ModelConfig.from_dict(ck["config"]))
    m2.load_state_dict(ck["weights"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    with pytest.raises(CheckpointError, match="engram train"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(p.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.ckpt")
    torch.save({"format": "engram-checkpoint/1", "obj": Path("x")}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="unpickling"):
        load_checkpoint(tmp_path / "evil.ckpt")
    # the same checkpoint as safetensors: tensors under dotted keys, the rest as JSON metadata
    extra = {"token_ids": torch.arange(5), "touched_rows": {"1": torch.tensor([3, 9])}, "losses": [2.5, 1.0]}
    st = save_checkpoint(tmp_path / "m.safetensors", model, tables=None, plan_fingerprint="abc", heldout={"share": 0.1}, extra=extra)
    from safetensors.torch import load_file

    assert "weights.wte.weight" in load_file(str(st)) and "extra.touched_rows.1" in load_file(str(st))
    ck2 = load_checkpoint(st)
    assert ck2["config"] == ck["config"] and ck2["heldout"] == {"share": 0.1} and ck2["plan_fingerprint"] == "abc"
    assert ck2["extra"]["losses"] == [2.5, 1.0] and torch.equal(ck2["extra"]["touched_rows"]["1"], torch.tensor([3, 9]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck2["weights"][k])
    (tmp_path / "cut.safetensors").write_bytes(st.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_heldout_is_deterministic():
    keys = [f"doc{i}" for i in range(2000)]
    a = [is_heldout(k) for k in keys]
    assert a == [is_heldout(k) for k in keys]
    assert 0.05 < np.mean(a) < 0.15


def test_trained_store_rewrites_only_touched_shards(tmp_path):
    """save_trained_store: shards holding trained rows are new files; every other file is a hard link of the initial store's."""
    from cli_checks import build_small_store

    from engram_cli.store import TableStore
    from engram_cli.train import save_trained_store

    src = build_small_store(tmp_path)
    init = TableStore.open(src)
    layer = init.layer_ids[0]
    sr, n = init.shard_rows, init.table(layer).shape[0]
    assert n > 3 * sr  # several shards, so some stay untouched
    rows = np.array([1, sr + 5, sr + 7], dtype=np.int64)  # shards 0 and 1
    values = np.full((rows.size, init.head_dim), 0.5, dtype=np.float32)
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in src.rglob("*") if p.is_file()}
    dst = save_trained_store(src, tmp_path / "model.tables.zarr", {layer: (rows, values)})
    new = TableStore.open(dst)
    np.testing.assert_array_equal(new.read_rows(layer, rows), values)
    rewritten = {init.shard_path(layer, 0).relative_to(src), init.shard_path(layer, 1).relative_to(src)}
    for p, (ino, data) in before.items():
        rel, q = p.relative_to(src), dst / p.relative_to(src)
        assert p.stat().st_ino == ino and p.read_bytes() == data  # the initial store is untouched
        if rel in rewritten:
            assert q.stat().st_ino != ino and p.stat().st_nlink == 1
        elif rel.name != "zarr.json":  # attributes are rewritten (the modification record)
            assert q.stat().st_ino == ino and q.stat().st_nlink == 2, rel


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3", "int4"])
def test_load_layer_table_decodes_by_shard_into_aligned_float32(tmp_path, dtype):
    """train's resident table: the store's rows as float32 (from_storage of the whole layer, bit for bit),
    page-aligned for the CPU gather, decoded shard by shard (several shards here)."""
    from typer.testing import CliRunner

    from cli_checks import SMALL_STORE_ARGS, copy_fixtures
    from engram_cli.aligned import ALIGN
    from engram_cli.cli import app
    from engram_cli.store import TableStore, from_storage
    from engram_cli.train import load_layer_table

    corpus = copy_fixtures(tmp_path / "corpus")
    out = tmp_path / "tables.zarr"
    args = ["--heads", "2", *SMALL_STORE_ARGS[2:]]  # 2 heads of 32 dims: FP8 and int4 need whole blocks of 32
    result = CliRunner().invoke(app, ["build-table", str(corpus), "-o", str(out), *args, "--dtype", dtype])
    assert result.exit_code == 0, result.output
    store = TableStore.open(out)
    for layer in store.layer_ids:
        assert store.stored_rows(layer) > store.shard_rows  # more than one shard decoded
        got = load_layer_table(store, layer)
        want = np.asarray(from_storage(store.load_layer(layer), store.dtype), dtype=np.float32)
        assert got.dtype == np.float32 and got.ctypes.data % ALIGN == 0
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
