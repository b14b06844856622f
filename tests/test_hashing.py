"""The multiply-XOR hash (docs/spec.md, "Hash", "Rows", "Test vectors"), against the published vectors and a
plain-Python re-implementation with explicit int64 wrapping and floor modulo."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_cli.hashing import hash_positions, mix_to_hashes, ngram_mix, ngram_row_ids, position_row_ids
from engram_cli.plan import make_plan

# docs/spec.md, "Test vectors": layer 1 hashes of compressed ids [5, 17, 99], pad = compressed 2.
SPEC_POS0 = [417694, 153810, 631746, 619567, 19819, 4616, 64500, 103595, 142458, 557886, 379397, 606178, 191641, 26676, 195389, 29662]
SPEC_POS2 = [11664, 151525, 496189, 480017, 619978, 64166, 315710, 315608, 38504, 114869, 163716, 394173, 83204, 529655, 423994, 53290]


def wrap64(v: int) -> int:
    return (v + 2**63) % 2**64 - 2**63


def python_hashes(plan, layer, seq: list[int]) -> list[list[int]]:
    """Per position, (max-1)*K hashes, order-major; Python ints, explicit wrapping."""
    mult = plan.multipliers[layer]
    out = []
    for t in range(len(seq)):
        row = []
        for n in plan.orders:
            mix = 0
            for k in range(n):
                x = seq[t - k] if t - k >= 0 else plan.compressed_pad_id
                mix ^= wrap64(x * mult[k])
            row += [mix % p for p in plan.primes[layer][n - 2]]  # Python % is floor modulo
        out.append(row)
    return out


@pytest.fixture(scope="module")
def reference_plan(deepseek_vocab):
    return make_plan(compressed_vocab_size=deepseek_vocab.compressed_size, compressed_pad_id=int(deepseek_vocab.compress([2])[0]))


@pytest.fixture(scope="module")
def small_plan():
    return make_plan(compressed_vocab_size=1000, compressed_pad_id=7, layer_ids=(0, 3), max_ngram_size=4, heads=3, rows_per_head=(101, 211, 307), dim=12, seed=5)


def test_spec_vectors(reference_plan):
    h = hash_positions(reference_plan, 1, np.array([[5, 17, 99]]))  # (B=1, T=3, 16)
    assert h.shape == (1, 3, 16)
    assert h[0, 0].tolist() == SPEC_POS0
    assert h[0, 2].tolist() == SPEC_POS2
    assert python_hashes(reference_plan, 1, [5, 17, 99]) == h[0].tolist()


@given(st.lists(st.integers(0, 999), min_size=1, max_size=12), st.sampled_from([0, 3]))
@settings(max_examples=100, deadline=None)
def test_hash_positions_matches_python(small_plan, seq, layer):
    h = hash_positions(small_plan, layer, np.array([seq]))
    assert h[0].tolist() == python_hashes(small_plan, layer, seq)
    assert (h >= 0).all() and (h < np.tile(small_plan.head_primes(layer), 1)).all()


def test_ngram_rows_equal_position_rows(small_plan):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, size=(3, 17))  # (B, T)
    pad = small_plan.compressed_pad_id
    padded = np.concatenate([np.full((3, small_plan.max_ngram_size - 1), pad), ids], axis=1)
    K = small_plan.heads
    for layer in small_plan.layer_ids:
        rows = position_row_ids(small_plan, layer, ids)  # (B, T, (max-1)*K)
        for i, n in enumerate(small_plan.orders):
            # every n-gram ending at every position, in text order, deduplicated
            grams = np.stack([padded[:, s : s + ids.shape[1]] for s in range(small_plan.max_ngram_size - n, small_plan.max_ngram_size)], axis=2)  # (B, T, n)
            distinct, inverse = np.unique(grams.reshape(-1, n), axis=0, return_inverse=True)
            by_ngram = ngram_row_ids(small_plan, layer, distinct)  # (m, K)
            assert np.array_equal(by_ngram[inverse.ravel()].reshape(3, -1, K), rows[:, :, i * K : (i + 1) * K])


def test_floor_modulo_of_negative_mix(reference_plan):
    """Multipliers are below int64_max // C, so ids in 0..C-1 never make a negative mix;
    negative ids (passed through by `compress`) and ids past C (wrapping) do."""
    m = reference_plan.multipliers[1]
    assert all(wrap64((reference_plan.compressed_vocab_size - 1) * v) > 0 for v in m)
    big = next(x for x in range(2**40, 2**40 + 100) if wrap64(x * m[0]) < 0)  # wraps negative
    for a, b in [(-1, 17), (5, -3), (99, big)]:
        check_negative_mix(reference_plan, m, a, b)


def check_negative_mix(reference_plan, m, a, b):
    mix = wrap64(b * m[0]) ^ wrap64(a * m[1])
    assert ngram_mix(np.array([[a, b]]), m[:2]).tolist() == [mix] and mix < 0
    primes = reference_plan.primes[1][0]
    got = ngram_row_ids(reference_plan, 1, np.array([[a, b]]))[0] - reference_plan.order_offsets(1, 2)
    assert got.tolist() == [mix % p for p in primes]
    assert all(0 <= h < p for h, p in zip(got.tolist(), primes))
    assert any(mix % p != -((-mix) % p) for p in primes)  # truncating modulo would differ (negative)
    assert mix_to_hashes(np.array([-1, -(2**63)]), [7]).ravel().tolist() == [6, (-(2**63)) % 7]
