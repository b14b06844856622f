"""The offload pipeline (kernels/offload.py): prefetched rows equal direct lookups, in order;
errors reach the consumer."""

from __future__ import annotations

import torch

import pytest

from _common import DEVICE, edge_ids, plan_for, table_for
from engram_cli.errors import BackendError
from engram_cli.kernels import EngramLookup, OffloadPrefetcher


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3"])
@pytest.mark.parametrize("depth", [1, 3])
def test_prefetch_matches_direct(depth, dtype, deepseek_vocab):
    plan = plan_for(deepseek_vocab, max_n=3, heads=2, dim=128)
    stored, _ = table_for(plan, dtype)
    batches = [torch.from_numpy(edge_ids(deepseek_vocab, 2, 6 + s, seed=s)) for s in range(5)]
    ref = EngramLookup(plan, deepseek_vocab, 1, stored, backend="torch", device=DEVICE)
    off = EngramLookup(plan, deepseek_vocab, 1, stored, backend="offload", device=DEVICE)
    got = list(OffloadPrefetcher(off, batches, depth=depth))
    assert len(got) == 5
    for g, b in zip(got, batches):
        assert g.device.type == torch.device(DEVICE).type
        assert torch.equal(g, ref(b.to(DEVICE)))
    bf = list(off.prefetcher(batches[:2], dtype=torch.bfloat16))
    assert torch.equal(bf[1], ref(batches[1].to(DEVICE), dtype=torch.bfloat16))


def test_prefetch_error_reaches_consumer(deepseek_vocab):
    off = EngramLookup(plan_for(deepseek_vocab), deepseek_vocab, 1, backend="offload", device=DEVICE)  # no table
    with pytest.raises(BackendError):
        list(off.prefetcher([torch.zeros((1, 2), dtype=torch.int64)]))


@pytest.mark.parametrize("dtype,out_dtype", [("float32", None), ("bfloat16", None), ("float8_e4m3", None), ("float8_e4m3", torch.bfloat16)])
def test_uva_path_matches_reference(dtype, out_dtype, monkeypatch, deepseek_vocab):
    """The offload backend's CUDA path (the fused Triton kernel reading the host table, UVA), forced
    on here: under TRITON_INTERPRET=1 the kernel runs on the CPU table; bit-exact with the torch backend.
    On a GPU machine the existing offload tests take this path by themselves (pinned table, CUDA)."""
    pytest.importorskip("triton")
    import engram_cli.kernels.registry as registry

    if DEVICE == "cpu":
        monkeypatch.setattr(registry, "offload_uva", lambda lk: registry._triton_usable(lk.device) and lk.hot is None)
    plan = plan_for(deepseek_vocab, max_n=3, heads=2, dim=128, dtype="float32" if dtype == "float8_e4m3" else dtype)
    stored, _ = table_for(plan, dtype, seed=3)
    off = EngramLookup(plan, deepseek_vocab, 1, stored, backend="offload", device=DEVICE)
    if DEVICE != "cpu":
        assert off.table.is_pinned() and off.table.device.type == "cpu"
    assert registry.offload_uva(off)
    ref = EngramLookup(plan, deepseek_vocab, 1, stored, backend="torch", device=DEVICE)
    ids = edge_ids(deepseek_vocab, 2, 9, seed=4)
    ids[0, :2] = -1  # padding passes through here too
    ids = torch.from_numpy(ids)
    assert torch.equal(off.row_ids(ids), ref.row_ids(ids.to(DEVICE)))
    got = off(ids, dtype=out_dtype)
    assert got.device.type == torch.device(DEVICE).type
    assert torch.equal(got, ref(ids.to(DEVICE), dtype=out_dtype))
