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
