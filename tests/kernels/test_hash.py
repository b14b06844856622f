"""Row ids (kernels/hash.py, kernels/cpu.py and the Triton kernel): every backend against the numpy
oracle engram_cli.hashing.position_row_ids, and the CPU kernel's division-free floor modulo against
torch.remainder."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _common import BACKENDS, DEVICE, edge_ids, plan_for
from engram_cli.hashing import compress_ids, position_row_ids
from engram_cli.kernels import EngramLookup
from engram_cli.kernels.cpu import FAST_MOD_MIN_PRIME, floor_mod_heads
from engram_cli.plan import make_plan

SPEC_POS0 = [417694, 153810, 631746, 619567, 19819, 4616, 64500, 103595, 142458, 557886, 379397, 606178, 191641, 26676, 195389, 29662]
SPEC_POS2 = [11664, 151525, 496189, 480017, 619978, 64166, 315710, 315608, 38504, 114869, 163716, 394173, 83204, 529655, 423994, 53290]


def row_ids(plan, vocab, backend, ids):
    got = EngramLookup(plan, vocab, 1, backend=backend, device=DEVICE).row_ids(torch.from_numpy(ids).to(DEVICE))
    assert got.dtype == torch.int64
    return got.cpu().numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_vectors(backend, deepseek_vocab):
    pad = int(deepseek_vocab.compress([2])[0])
    plan = make_plan(compressed_vocab_size=deepseek_vocab.compressed_size, compressed_pad_id=pad)
    raw = np.array([[int(np.nonzero(deepseek_vocab.lookup == c)[0][0]) for c in (5, 17, 99)]])
    r = row_ids(plan, deepseek_vocab, backend, raw) - plan.row_offsets(1)
    assert r[0, 0].tolist() == SPEC_POS0
    assert r[0, 2].tolist() == SPEC_POS2


@pytest.mark.parametrize("max_n,heads", [(2, 1), (3, 2), (4, 3), (4, 8), (3, 16)])
@pytest.mark.parametrize("B,T", [(1, 1), (2, 2), (3, 5), (1, 9)])  # T = 1, T < order, odd sizes
@pytest.mark.parametrize("backend", BACKENDS)
def test_row_ids(backend, B, T, max_n, heads, deepseek_vocab):
    plan = plan_for(deepseek_vocab, max_n=max_n, heads=heads, dim=heads * 32)
    ids = edge_ids(deepseek_vocab, B, T, seed=B * 31 + T)
    want = position_row_ids(plan, 1, deepseek_vocab.compress(ids))
    np.testing.assert_array_equal(row_ids(plan, deepseek_vocab, backend, ids), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_mix_floor_modulo(backend, deepseek_vocab):
    """Reference multipliers never overflow; hand-set huge odd ones do, so mixes go negative
    and the hash must still be the floor modulo (Triton's `%` truncates)."""
    plan = plan_for(deepseek_vocab, max_n=4, heads=2, dim=64)
    big = (0x7FFF_FFFF_FFFF_FFC5, 0x5DEE_CE66_DD15_B3A1, 0x6A09_E667_F3BC_C909, 0x3C6E_F372_FE94_F82B)
    plan = dataclasses.replace(plan, multipliers={1: big})
    ids = edge_ids(deepseek_vocab, 2, 8, seed=7)
    c = deepseek_vocab.compress(ids)
    mixes = c[:, 1:] * np.int64(big[0]) ^ c[:, :-1] * np.int64(big[1])
    assert (mixes < 0).any() and (mixes > 0).any()
    np.testing.assert_array_equal(row_ids(plan, deepseek_vocab, backend, ids), position_row_ids(plan, 1, c))


def v41_plan(vocab):
    """DeepSeek-V4.1's sizes: 16 M rows per head, orders 2..4 (row ids only: no table)."""
    pad = int(vocab.compress([2])[0])
    return make_plan(compressed_vocab_size=vocab.compressed_size, compressed_pad_id=pad, layer_ids=(1,),
                     max_ngram_size=4, heads=8, rows_per_head=(16_000_000,) * 3, dim=1024)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_ids_v41_sizes(backend, deepseek_vocab):
    plan = v41_plan(deepseek_vocab)
    ids = edge_ids(deepseek_vocab, 2, 7, seed=9)
    got = row_ids(plan, deepseek_vocab, backend, ids)
    np.testing.assert_array_equal(got, position_row_ids(plan, 1, deepseek_vocab.compress(ids)))
    assert int(got.max()) < plan.layer_rows(1)


PRIMES = st.integers(2, 2**40)  # any modulus works (the plan's are primes): small ones take the two-step path


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=64), st.lists(PRIMES, min_size=1, max_size=8))
def test_floor_mod_matches_remainder(mixes, moduli):
    """The float64-quotient floor modulo equals torch.remainder for every int64 and modulus, extremes included."""
    mix = torch.tensor(mixes + [-(2**63), 2**63 - 1, -1, 0, 1], dtype=torch.int64)
    p = torch.tensor(moduli, dtype=torch.int64)
    assert torch.equal(torch.from_numpy(floor_mod_heads(mix.numpy(), p.numpy())), torch.remainder(mix[:, None], p))


def test_floor_mod_multiples_and_prime_sizes():
    """Exact multiples and their neighbours (the quotient's rounding edge), for primes around the
    single-step limit, the reference plan's, V4.1's and past 2^24."""
    p = torch.tensor([FAST_MOD_MIN_PRIME - 3, FAST_MOD_MIN_PRIME + 3, 646_403, 16_000_057, 2**31 - 1, 3], dtype=torch.int64)
    k = torch.tensor([-(2**39), -7, -1, 0, 1, 5, 2**39], dtype=torch.int64)
    mix = torch.cat([k * q + e for q in p[:5] for e in (-1, 0, 1)])
    want = torch.remainder(mix[:, None], p)
    assert torch.equal(torch.from_numpy(floor_mod_heads(mix.numpy(), p.numpy())), want)
    assert torch.equal(torch.from_numpy(floor_mod_heads(mix.numpy(), p[2:5].numpy())), want[:, 2:5])  # single-step path only


def test_floor_mod_biased_quotient_edges():
    """The single-step path biases the float quotient down by its error bound and keeps one
    correction (kernels/cpu.py): exact multiples and their neighbours at the largest quotients,
    where the float error is largest, for the smallest moduli that take that path."""
    p = torch.tensor([FAST_MOD_MIN_PRIME, 8209, 8219, 65_537, 646_403, 2**40 - 87], dtype=torch.int64)
    mixes = []
    for q in p.tolist():
        top = (2**63 - 1) // q
        for k in (top, top - 1, top - 2**20, -top, -top + 1, 2**52 // q, -(2**52 // q)):
            mixes += [k * q + e for e in (-2, -1, 0, 1, 2) if -(2**63) <= k * q + e < 2**63]
    mix = torch.tensor(mixes + [-(2**63), 2**63 - 1], dtype=torch.int64)
    assert torch.equal(torch.from_numpy(floor_mod_heads(mix.numpy(), p.numpy())), torch.remainder(mix[:, None], p))


@pytest.mark.parametrize("B,T", [(1, 5000), (3, 1500), (64, 3)])
def test_fast_path_chunks(B, T, deepseek_vocab):
    """Positions split across the CPU kernel's parallel chunks (2048 positions) give the same ids."""
    plan = plan_for(deepseek_vocab, max_n=4, heads=3, dim=96, rows=(5003, 7001, 9001))
    ids = edge_ids(deepseek_vocab, B, T, seed=2)
    ids[0, ::7] = -1
    want = position_row_ids(plan, 1, compress_ids(deepseek_vocab.lookup, ids))
    np.testing.assert_array_equal(row_ids(plan, deepseek_vocab, "cpu", ids), want)


def test_forked_child_hashes_serially(deepseek_vocab):
    """A child forked after the parallel kernel ran (GNU OpenMP's pool does not survive a fork)
    computes the same ids, on its own thread, instead of hanging or being terminated."""
    plan = plan_for(deepseek_vocab, max_n=3, heads=8, dim=256, rows=(5003, 7001))
    ids = edge_ids(deepseek_vocab, 4, 4096, seed=5)  # 16 k positions x 16 heads: the parallel path
    want = position_row_ids(plan, 1, compress_ids(deepseek_vocab.lookup, ids))
    np.testing.assert_array_equal(row_ids(plan, deepseek_vocab, "cpu", ids), want)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only when its ids are right
        ok = False
        try:
            ok = np.array_equal(row_ids(plan, deepseek_vocab, "cpu", ids), want)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_parallel_kernels_run_on_openmp_threads(deepseek_vocab):
    """kernels/cpu.py puts OpenMP first (a ~2 us launch against the work queue's ~50 us: docs/kernels.md);
    the work queue only where no OpenMP runtime loads or the user asks for it."""
    import numba

    if os.environ.get("NUMBA_THREADING_LAYER") or os.environ.get("NUMBA_THREADING_LAYER_PRIORITY"):
        pytest.skip("the threading layer is set by the environment")
    plan = plan_for(deepseek_vocab, max_n=3, heads=8, dim=256, rows=(5003, 7001))
    row_ids(plan, deepseek_vocab, "cpu", edge_ids(deepseek_vocab, 4, 4096, seed=1))  # the parallel path
    try:
        import numba.np.ufunc.omppool  # noqa: F401  (loads only where an OpenMP runtime does)
        want = "omp"
    except ImportError:
        want = "workqueue"
    assert numba.threading_layer() in (want, "tbb")
