"""A few training steps of the reference model on real tokenized text lower the loss."""

from pathlib import Path

import numpy as np
import torch

from engram_cli.checkpoint import load_checkpoint, save_checkpoint
from engram_cli.errors import CheckpointError
from engram_cli.model import EngramGPT, ModelConfig
from engram_cli.plan import make_plan
from engram_cli.train import TokenMap, is_heldout, train_steps

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
    table = model.table_parameters()[0]
    before = table.detach().clone()
    losses = train_steps(model, plan, vocab, tmap, stream, steps=30, batch=8)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    changed = (table.detach() != before).any(1).sum().item()
    assert 0 < changed < table.shape[0]


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


def test_heldout_is_deterministic():
    keys = [f"doc{i}" for i in range(2000)]
    a = [is_heldout(k) for k in keys]
    assert a == [is_heldout(k) for k in keys]
    assert 0.05 < np.mean(a) < 0.15
