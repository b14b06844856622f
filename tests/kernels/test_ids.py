"""The id rule (docs/spec.md, "Ids outside the vocabulary") on every backend: negative ids pass
through compression and are hashed like the reference; ids >= the vocabulary size are one
TokenIdError before any kernel runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _common import BACKENDS, DEVICE, edge_ids, plan_for, table_for
from engram_cli.errors import TokenIdError
from engram_cli.hashing import compress_ids, position_row_ids
from engram_cli.kernels import EngramLookup


def padded_ids(vocab):
    """A padded serving batch: -1 padding left and right, a lone -100, and the vocabulary's edges."""
    ids = edge_ids(vocab, 3, 9, seed=11)
    ids[0, :3] = -1
    ids[1, -2:] = -1
    ids[2, 4] = -100
    ids[2, 0] = np.iinfo(np.int64).min // 4
    return ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_ids_pass_through(backend, deepseek_vocab):
    plan = plan_for(deepseek_vocab, max_n=4, heads=2, dim=128)
    stored, values = table_for(plan, "float32", seed=2)
    ids = padded_ids(deepseek_vocab)
    c = compress_ids(deepseek_vocab.lookup, ids)
    assert (c[ids < 0] == ids[ids < 0]).all()  # passed through, not read from the lookup's end
    want = position_row_ids(plan, 1, c)
    lk = EngramLookup(plan, deepseek_vocab, 1, stored, backend=backend, device=DEVICE)
    t = torch.from_numpy(ids).to(DEVICE)
    np.testing.assert_array_equal(lk.row_ids(t).cpu().numpy(), want)
    np.testing.assert_array_equal(lk(t).cpu().numpy(), values[want].reshape(3, 9, -1))
    # -1 is not the last token's compressed id (what indexing the lookup with it would give)
    last = ids.copy()
    last[ids == -1] = deepseek_vocab.vocab_size - 1
    assert not np.array_equal(position_row_ids(plan, 1, compress_ids(deepseek_vocab.lookup, last)), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_past_the_vocabulary_are_refused(backend, deepseek_vocab):
    plan = plan_for(deepseek_vocab)
    stored, _ = table_for(plan, "float32")
    V = deepseek_vocab.vocab_size
    lk = EngramLookup(plan, deepseek_vocab, 1, stored, backend=backend, device=DEVICE)
    for bad in (V, V + 7, 2**40):
        ids = edge_ids(deepseek_vocab, 2, 5)
        ids[1, 3] = bad
        for call in (lk.row_ids, lk, lambda x: list(lk.prefetcher([x]))):
            with pytest.raises(TokenIdError, match=f"token id {bad} is outside the tokenizer's vocabulary of {V} ids") as e:
                call(torch.from_numpy(ids).to(DEVICE))
            assert "\n" not in str(e.value)
    with pytest.raises(TokenIdError):
        compress_ids(deepseek_vocab.lookup, [[0, V]])
    assert lk(torch.from_numpy(edge_ids(deepseek_vocab, 1, 3)).to(DEVICE)).shape[1] == 3  # still usable after a refusal
