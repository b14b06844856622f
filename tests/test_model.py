"""The Engram module against a plain re-implementation of the reference equations."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_cli.model import (
    EngramGPT,
    ModelConfig,
    place_layers,
    row_ids_for,
    table_lookup,
)
from engram_cli.plan import make_plan

TEXT = next(p for p in sorted(Path("fixtures/corpus").rglob("*")) if p.is_file()).read_text(errors="replace")[:4000]


@pytest.fixture(scope="module")
def setup(deepseek_tokenizer, deepseek_vocab):
    vocab = deepseek_vocab
    plan = make_plan(
        compressed_vocab_size=vocab.compressed_size,
        compressed_pad_id=int(vocab.lookup[2]),
        layer_ids=(1,),
        heads=2,
        dim=16,
        rows_per_head=(50, 80),
    )
    ids = np.asarray(deepseek_tokenizer.tokenizer.encode(TEXT).ids[:64], dtype=np.int64)[None, :]
    rows = row_ids_for(plan, vocab, 1, ids)
    torch.manual_seed(0)
    cfg = ModelConfig.for_plan(plan, vocab_size=64, n_layer=2, n_head=2, d_model=32, block_size=64)
    model = EngramGPT(cfg)
    table = torch.randn(plan.layer_rows(1), plan.head_dim)  # the layer's table, outside the parameters
    model.attach_tables({1: table_lookup(plan, vocab, 1, table)})
    eng = model.blocks[1].engram
    with torch.no_grad():  # non-trivial norms and conv so every term matters
        for p in [eng.norm1[0].weight, eng.norm2[0].weight, eng.short_conv.norm.weight, eng.short_conv.conv.weight]:
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return plan, rows, model, eng, table


def plain_engram(eng, h, rows):
    """The equations of docs/spec.md written out with explicit loops where it matters."""
    W = eng.multi_head_embedding.lookup.table
    B, T, H = rows.shape
    e = torch.cat([W[rows[:, :, i]] for i in range(H)], dim=-1)

    def rms(x, w, eps=1e-6):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    key = rms(e @ eng.key_projs[0].weight.T + eng.key_projs[0].bias, eng.norm1[0].weight)
    q = rms(h, eng.norm2[0].weight)
    g = (key * q).sum(-1) / math.sqrt(h.shape[-1])
    gate = 1 / (1 + torch.exp(-(torch.sign(g) * torch.sqrt(g.abs()))))
    v = gate[..., None] * (e @ eng.value_proj.weight.T + eng.value_proj.bias)
    y = rms(v, eng.short_conv.norm.weight)
    w = eng.short_conv.conv.weight[:, 0, :]  # (d, 4)
    dil, K = eng.short_conv.dilation, w.shape[1]
    conv = torch.zeros_like(y)
    for t in range(T):
        for k in range(K):
            s = t - (K - 1 - k) * dil
            if s >= 0:
                conv[:, t] += w[:, k] * y[:, s]
    return v + conv * torch.sigmoid(conv)


def test_engram_matches_reference_equations(setup):
    plan, rows, model, eng, table = setup
    r = torch.as_tensor(rows)
    assert r.shape[-1] == len(plan.orders) * plan.heads
    h = torch.randn(1, r.shape[1], 32)
    with torch.no_grad():
        got = eng(h, r)
        want = plain_engram(eng, h, r)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_exactly_the_looked_up_rows(setup):
    """Backward reaches exactly the looked-up rows; an optimizer step changes exactly those rows of the table."""
    from engram_cli.train_loop import RowAdam

    plan, rows, model, eng, table = setup
    ids = torch.randint(0, 64, (1, rows.shape[1]))
    model.train()
    opt = RowAdam(model.memories(), lr=1e-2)
    _, loss = model(ids, {1: torch.as_tensor(rows)}, targets=ids)
    loss.backward()
    uniq, leaf = eng.multi_head_embedding.last
    assert set(uniq.tolist()) == set(np.unique(rows).tolist())
    assert leaf.grad.shape == (uniq.numel(), plan.head_dim) and (leaf.grad.abs().sum(1) > 0).all()
    assert not any(p is leaf for p in model.parameters())  # the table is no parameter: no dense gradient
    before = table.clone()
    opt.step()
    changed = set(np.flatnonzero((table != before).any(1).numpy()).tolist())
    assert changed == set(np.unique(rows).tolist())
    model.eval()


def test_ablation_changes_output(setup):
    plan, rows, model, eng, table = setup
    ids = torch.randint(0, 64, (1, rows.shape[1]))
    with torch.no_grad():
        a = model(ids, {1: torch.as_tensor(rows)})
        b = model(ids, {1: torch.as_tensor(rows)}, ablate=True)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("ids, depth, blocks", [
    ((1, 15), 30, (1, 15)),  # the reference depth: the ids themselves
    ((1, 15), 4, (1, 2)),  # the default: early, and mid-depth as in the reference
    ((1, 15), 16, (1, 8)),
    ((15, 1), 4, (2, 1)),  # in the plan's order
    ((1, 3), 4, (1, 2)),  # both scale to block 1: the later one moves up
    ((28, 29), 4, (2, 3)),  # both scale past the top: the earlier one moves down
    ((0, 1, 2), 3, (0, 1, 2)),
    ((40, 100), 4, (2, 3)),  # ids beyond 30: scaled from max id + 1
])
def test_place_layers(ids, depth, blocks):
    assert place_layers(ids, depth) == blocks


def test_place_layers_refuses_too_shallow():
    with pytest.raises(ValueError, match="at least 2"):
        place_layers((1, 15), 1)


def test_layers_placed_in_a_shallow_backbone_keep_their_tables(deepseek_tokenizer, deepseek_vocab):
    """Layer 15 of a 4-block model sits in block 2 and is fed layer 15's row ids (its hash and table); the config records it."""
    vocab = deepseek_vocab
    plan = make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=int(vocab.lookup[2]), layer_ids=(1, 15), heads=2, dim=16, rows_per_head=(50, 80))
    cfg = ModelConfig.for_plan(plan, vocab_size=64, n_layer=4, n_head=2, d_model=32, block_size=64)
    assert cfg.engram_blocks == (1, 2) and cfg.placement() == {1: 1, 15: 2}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    torch.manual_seed(0)
    model = EngramGPT(cfg)
    assert [None if b.engram is None else b.engram.layer_id for b in model.blocks] == [None, 1, 15, None]
    model.attach_tables({l: table_lookup(plan, vocab, l, torch.randn(plan.layer_rows(l), plan.head_dim)) for l in plan.layer_ids})
    ids = np.asarray(deepseek_tokenizer.tokenizer.encode(TEXT).ids[:32], dtype=np.int64)[None, :]
    rows = {l: torch.as_tensor(row_ids_for(plan, vocab, l, ids)) for l in plan.layer_ids}
    assert not torch.equal(rows[1], rows[15])
    seen = {}
    for l, e in model.engrams().items():
        e.register_forward_hook(lambda m, args, out, l=l: seen.__setitem__(l, args[1]))
    model(torch.zeros(ids.shape, dtype=torch.int64), rows)
    assert torch.equal(seen[1], rows[1]) and torch.equal(seen[15], rows[15])


def test_config_without_placement_loads_as_before():
    """A checkpoint config from before placement (no engram_blocks): each Engram layer in the block of its id, weight names unchanged."""
    old = {"vocab_size": 64, "n_layer": 16, "n_head": 2, "d_model": 32, "block_size": 16, "engram_layers": [1, 15], "mem_dim": 64,
           "head_dim": 16, "table_rows": {"1": 100, "15": 100}, "max_ngram_size": 3, "conv_kernel": 4, "eps": 1e-6}
    cfg = ModelConfig.from_dict(old)
    assert cfg.engram_blocks == () and cfg.placement() == {1: 1, 15: 15}
    model = EngramGPT(cfg)
    assert model.blocks[15].engram.layer_id == 15 and "blocks.15.engram.value_proj.weight" in model.state_dict()
