"""The reference multiply-XOR n-gram hash (shared/SPEC.md section 3) and row ids.

Two views of the same function:
- `hash_positions`: the reference layout, every position of (B, T) compressed ids,
  left-padded with the compressed pad id; output (B, T, (max-1)*K), order-major.
- `ngram_mix` / `ngram_head_hashes` / `ngram_row_ids`: distinct n-grams given as an
  (m, n) array in text order (column 0 the oldest token, column n-1 the token at the
  position), which is how `NgramStats` stores them. The last column is multiplied by
  multiplier 0, because the reference's `shift_0` is the current token.

All arithmetic is wrapping int64, and the modulo is floor modulo (numpy `%`): the mix
may be negative, the hash is always in [0, p).
"""

from __future__ import annotations

import numpy as np

from .plan import TablePlan


def ngram_mix(ngrams: np.ndarray, multipliers) -> np.ndarray:
    """The 64-bit mix of each n-gram: XOR over k of token[n-1-k] * multipliers[k].

    ngrams: (m, n) integer array in text order. Returns (m,) int64.
    """
    ngrams = np.asarray(ngrams)
    m, n = ngrams.shape
    mult = np.asarray(multipliers, dtype=np.int64)
    mix = ngrams[:, n - 1].astype(np.int64) * mult[0]
    for k in range(1, n):
        np.bitwise_xor(mix, ngrams[:, n - 1 - k].astype(np.int64) * mult[k], out=mix)
    return mix


def mix_to_hashes(mix: np.ndarray, primes) -> np.ndarray:
    """Floor-modulo a mix by each head's prime: (m,) -> (m, K) int64 in [0, p_j)."""
    primes = np.asarray(primes, dtype=np.int64)
    return np.asarray(mix, dtype=np.int64)[:, None] % primes[None, :]


def ngram_head_hashes(plan: TablePlan, layer_id: int, ngrams: np.ndarray) -> np.ndarray:
    """Per-head bucket (0..p_j-1) of each n-gram of one order: (m, n) -> (m, K)."""
    order = ngrams.shape[1]
    mix = ngram_mix(ngrams, plan.multipliers[layer_id][:order])
    return mix_to_hashes(mix, plan.order_primes(layer_id, order))


def ngram_row_ids(plan: TablePlan, layer_id: int, ngrams: np.ndarray) -> np.ndarray:
    """Row of each n-gram in the layer's table, per head: (m, n) -> (m, K) int64."""
    order = ngrams.shape[1]
    return ngram_head_hashes(plan, layer_id, ngrams) + plan.order_offsets(layer_id, order)[None, :]


def shift(x: np.ndarray, k: int, pad: int) -> np.ndarray:
    """The reference's `shift_k`: k pad columns on the left, the last k columns dropped."""
    if k == 0:
        return x
    T = x.shape[1]
    return np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad)[:, :T]


def hash_positions(plan: TablePlan, layer_id: int, ids: np.ndarray) -> np.ndarray:
    """The reference `_get_ngram_hashes`: (B, T) compressed ids -> (B, T, (max-1)*K) int64."""
    x = np.asarray(ids, dtype=np.int64)
    if x.ndim == 1:
        x = x[None, :]
    mult = np.asarray(plan.multipliers[layer_id], dtype=np.int64)
    shifts = [shift(x, k, plan.compressed_pad_id) for k in range(plan.max_ngram_size)]
    out = []
    for n in plan.orders:
        mix = shifts[0] * mult[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * mult[k])
        for p in plan.primes[layer_id][n - 2]:
            out.append(mix % np.int64(p))
    return np.stack(out, axis=2)


def position_row_ids(plan: TablePlan, layer_id: int, ids: np.ndarray) -> np.ndarray:
    """`hash_positions` plus each head's row offset: rows of the layer's table."""
    return hash_positions(plan, layer_id, ids) + plan.row_offsets(layer_id)[None, None, :]
