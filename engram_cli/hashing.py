"""Every n-gram hash family: the reference multiply-XOR hash (docs/spec.md, "Hash"), xxh3, and row ids.

Two views of the same function:
- `hash_positions`: the reference layout, every position of (B, T) compressed ids,
  left-padded with the compressed pad id; output (B, T, (max-1)*K), order-major.
- `ngram_mix` / `ngram_head_hashes` / `ngram_row_ids`: distinct n-grams given as an
  (m, n) array in text order (column 0 the oldest token, column n-1 the token at the
  position), which is how `NgramStats` stores them. The last column is multiplied by
  multiplier 0, because the reference's `shift_0` is the current token.

All arithmetic is wrapping int64, and the modulo is floor modulo (numpy `%`): the mix
may be negative, the hash is always in [0, p).

`compress_ids` is the id rule (docs/spec.md, "Ids outside the vocabulary"): negative ids
pass through compression unchanged, ids >= the vocabulary size are refused
(`check_token_ids`, a `TokenIdError`); every lookup backend follows it.

`shift` / `shift_k` (one batch row per sequence) is the reference's shift. The families
are `engram_cli.kinds.HashFamily`; the `xxh3` family (XXH3_64 of the little-endian
uint32 ids, seeded per head by `xxh3_seed`) is what `engram collisions --hash xxh3` audits.
"""

from __future__ import annotations

from itertools import repeat
from typing import Sequence

import numpy as np
import xxhash

from . import xxh3
from .errors import TokenIdError
from .plan import TablePlan

TWO64 = 1 << 64


def check_token_ids(max_id: int, vocab_size: int) -> None:
    """Refuse ids >= the vocabulary size (the largest id given): one `TokenIdError` line."""
    if int(max_id) >= int(vocab_size):
        raise TokenIdError(f"token id {int(max_id)} is outside the tokenizer's vocabulary of {int(vocab_size)} ids "
                           f"(ids 0..{int(vocab_size) - 1}; negative ids are padding): were these ids made by another tokenizer?")


def compress_ids(lookup: np.ndarray, ids) -> np.ndarray:
    """Raw tokenizer ids -> compressed ids: negative ids pass through, ids >= len(lookup) are refused."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size:
        check_token_ids(ids.max(), len(lookup))
    out = ids.copy()
    ok = ids >= 0
    out[ok] = np.asarray(lookup)[ids[ok]]
    return out


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


shift_k = shift  # the reference's name


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


# -- the xxh3 family (for the collision audit) ----------------------------------------------------------------------
def xxh3_seed(plan_seed: int, layer_id: int, order: int, head: int) -> int:
    """The xxh3_64 seed of one head: ((seed * 2^16 + layer) * 2^8 + order) * 2^8 + head, mod 2^64.

    Injective for layer < 65536, order < 256, head < 256; independent of the head count,
    so head j hashes the same way in every what-if plan.
    """
    return (((int(plan_seed) * 2**16 + int(layer_id)) * 2**8 + int(order)) * 2**8 + int(head)) % TWO64


def xxh3_digests(ids: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
    """xxh3_64 of each n-gram's ids packed as little-endian uint32 in text order: (m, n) -> (m, len(seeds)) uint64.

    Vectorized (`engram_cli.xxh3`, bit-exact with xxhash) for n-grams of up to 60 ids
    (240 bytes, XXH3's short-input paths); longer ones go through `xxh3_digests_loop`.
    """
    ids = np.asarray(ids)
    if xxh3.supports_ids(ids.shape[1]):
        return xxh3.xxh3_64_ids(ids, seeds)
    return xxh3_digests_loop(ids, seeds)


def xxh3_digests_loop(ids: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
    """`xxh3_digests` by one xxhash C call per n-gram and head (xxhash has no array API)."""
    ids = np.ascontiguousarray(np.asarray(ids), dtype="<u4")
    m, n = ids.shape
    width = 4 * n
    buf = ids.tobytes()
    rows = [buf[i : i + width] for i in range(0, m * width, width)]
    out = np.empty((m, len(seeds)), dtype=np.uint64)
    fn = xxhash.xxh3_64_intdigest
    for j, seed in enumerate(seeds):
        out[:, j] = np.fromiter(map(fn, rows, repeat(int(seed))), dtype=np.uint64, count=m)
    return out
