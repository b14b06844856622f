"""engram_cli.xxh3 (numpy XXH3_64) against the xxhash package, the independent route."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_cli import xxh3

MAX64 = 2**64 - 1
SEEDS = [0, 1, 2, 0x9E3779B1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 0xDEADBEEFCAFEBABE, MAX64 - 1, MAX64]


def expected(rows: np.ndarray, seed: int) -> list[int]:
    return [xxhash.xxh3_64_intdigest(r.tobytes(), seed) for r in rows]


@pytest.mark.parametrize("length", range(0, xxh3.MAX_LEN + 1))
def test_every_length_random_bytes(length):
    rng = np.random.default_rng(length)
    rows = rng.integers(0, 256, size=(24, length), dtype=np.uint8)
    seeds = SEEDS + [int(s) for s in rng.integers(0, 2**63, size=4, dtype=np.int64)] + [int(rng.integers(0, 2**63)) * 2 + 1]
    for seed in seeds:
        assert list(map(int, xxh3.xxh3_64(rows, seed))) == expected(rows, seed), (length, seed)


@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x80])
def test_constant_inputs(fill):
    # all-zero / all-ones bytes hit the carries of the 128-bit multiply's halves hardest
    for length in (4, 8, 12, 16, 17, 20, 24, 32, 64, 96, 128, 132, 240):
        rows = np.full((1, length), fill, dtype=np.uint8)
        for seed in SEEDS:
            assert int(xxh3.xxh3_64(rows, seed)[0]) == expected(rows, seed)[0], (length, seed, fill)


def test_chunking_does_not_change_digests():
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, size=(1000, 12), dtype=np.uint8)
    whole = xxh3.xxh3_64(rows, 77)
    for chunk in (1, 7, 256, 999, 1000, 5000):
        assert np.array_equal(xxh3.xxh3_64(rows, 77, chunk=chunk), whole)
    assert list(map(int, whole)) == expected(rows, 77)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6, 8, 16, 24, 32, 33, 48, 60])
def test_ids_packed_as_little_endian_uint32(order):
    rng = np.random.default_rng(order)
    ids = rng.integers(0, 2**32, size=(300, order), dtype=np.int64)
    ids[:5] = 0
    ids[5:10] = 2**32 - 1
    seeds = [0, 3, MAX64, 2**63 + 12345]
    got = xxh3.xxh3_64_ids(ids, seeds, chunk=64)
    assert got.shape == (300, 4) and got.dtype == np.uint64
    for j, seed in enumerate(seeds):
        want = [xxhash.xxh3_64_intdigest(struct.pack(f"<{order}I", *map(int, row)), seed) for row in ids]
        assert list(map(int, got[:, j])) == want


def test_empty_and_unsupported():
    assert xxh3.xxh3_64(np.zeros((0, 12), np.uint8), 3).shape == (0,)
    assert xxh3.xxh3_64_ids(np.zeros((0, 3), np.int64), [1, 2]).shape == (0, 2)
    assert xxh3.supports_ids(60) and not xxh3.supports_ids(61)
    with pytest.raises(ValueError):
        xxh3.xxh3_64(np.zeros((2, 241), np.uint8))
    with pytest.raises(ValueError):
        xxh3.xxh3_64_ids(np.zeros((2, 61), np.int64), [0])


def test_mul128_fold64_against_python_ints():
    rng = np.random.default_rng(9)
    a = rng.integers(0, 2**64, size=2000, dtype=np.uint64)
    b = rng.integers(0, 2**64, size=2000, dtype=np.uint64)
    a[:4] = [0, MAX64, MAX64, 2**32 - 1]
    b[:4] = [MAX64, MAX64, 1, 2**32 - 1]
    got = xxh3.mul128_fold64(a, b)
    for x, y, g in zip(a.tolist(), b.tolist(), got.tolist()):
        prod = x * y
        assert g == (prod & MAX64) ^ (prod >> 64)


@settings(max_examples=300, deadline=None)
@given(length=st.integers(min_value=0, max_value=xxh3.MAX_LEN), seed=st.integers(min_value=0, max_value=MAX64), data=st.data())
def test_property_matches_xxhash(length, seed, data):
    rows = data.draw(st.lists(st.binary(min_size=length, max_size=length), min_size=1, max_size=6))
    arr = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), length)
    assert list(map(int, xxh3.xxh3_64(arr, seed))) == [xxhash.xxh3_64_intdigest(d, seed) for d in rows]


@settings(max_examples=200, deadline=None)
@given(
    order=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=MAX64),
    data=st.data(),
)
def test_property_ids_match_xxhash(order, seed, data):
    rows = data.draw(st.lists(st.lists(st.integers(0, 2**32 - 1), min_size=order, max_size=order), min_size=1, max_size=5))
    ids = np.array(rows, dtype=np.int64)
    got = xxh3.xxh3_64_ids(ids, [seed])[:, 0]
    assert list(map(int, got)) == [xxhash.xxh3_64_intdigest(struct.pack(f"<{order}I", *r), seed) for r in rows]
