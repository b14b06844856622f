"""The CPU kernels (numba, both cores): a layer's row ids in one fused pass, and the row gather (+ FP8 dequant).

- `row_ids_into(ids, lookup, pad, mult, primes, offsets, head_order, out)`: raw ids (B, T)
  -> row ids (B*T, H), every head of every order in one pass over the positions: per
  position the compressed ids are read once (negative ids pass through, docs/spec.md "Ids
  outside the vocabulary"), each order's mix is the previous order's XOR one more
  product, and each head's floor modulo is computed in registers and written straight
  into the output (no temporaries per head or per order). The heads loop is what the
  compiler vectorizes (8 int64 lanes with AVX-512).
- `gather_rows_into(table, rows, out)`: rows of a (R, row bytes) uint8 view of any table
  into a (N, row bytes) uint8 view of the output, with software prefetch of the rows a
  few iterations ahead (the gather is bound by DRAM latency, not bandwidth); row ids
  outside the table are an IndexError.
- `gather_fp8_into(table, rows, head_dim, out)`: packed float8_e4m3 rows dequantized to
  float32 while gathered: `e4m3 LUT[byte] * bitcast_f32(scale byte << 23)`, bit-identical
  to engram_cli/fp8.py (both factors come from 256-entry tables built from it).

`floor_mod` (why it is exact): for an int64 mix m and a prime p >= 2, d = float64(m) is
within 2^9 of m, 1/p is rounded to within 2^-53 relative, and the product to within
2^-53 relative, so d * (1/p) is within (2^9 + 2^10 + 2^10)/p = 2560/p of m/p. For
p >= FAST_MOD_MIN_PRIME (4096) that is under 1: q = floor(d * (1/p)) is the true quotient
or one off, so r = m - q*p (wrapping int64, exact because the true value is small) lies in
[-p, 2p) and one add or subtract of p makes it the floor modulo. For smaller primes (tiny
test plans) the same step runs twice (the second on |r| < 2^12 + 2p, exact in float64).

Compiled on first use and cached on disk next to this file (numba `cache=True`); the
torch reference (`RowHasher.reference`, `index_select`) stays beside these in hash.py and
gather.py, and tests/kernels checks them against it bit for bit.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from engram_cli.fp8 import FP8_BLOCK, e4m3_to_float32_table

FAST_MOD_MIN_PRIME = 4096  # floor_mod's single step is exact for primes from here up (module docstring)
CHUNK_POSITIONS = 2048  # positions per parallel task of the hash
CHUNK_ROWS = 2048  # rows per parallel task of the gathers
PREFETCH_AHEAD = 12  # rows prefetched ahead of the copy (about 3 KB of float32 rows in flight per core)
CACHE_LINE = 64


@intrinsic
def _prefetch(typingctx, arr, row, col):
    """LLVM's prefetch (read, keep in all cache levels) of &arr[row, col]; never faults."""

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, row, col), codegen


@njit(inline="always")
def floor_mod(m, p, inv, two_step):
    """Floor modulo of int64 `m` by `p` (inv = 1.0 / p): exact, see the module docstring."""
    r = m - np.int64(math.floor(np.float64(m) * inv)) * p
    if two_step:
        r = r - np.int64(math.floor(np.float64(r) * inv)) * p
    r = r + p if r < 0 else r
    return r - p if r >= p else r


@njit(parallel=True, cache=True, nogil=True)
def _row_ids_kernel(ids, lookup, pad, mult, primes, inv, offsets, head_order, two_step, out):
    B, T = ids.shape
    N = mult.shape[0]
    H = primes.shape[0]
    V = lookup.shape[0]
    n_pos = B * T
    bad = 0
    for c in prange((n_pos + CHUNK_POSITIONS - 1) // CHUNK_POSITIONS):
        mixes = np.empty(N, np.int64)
        mh = np.empty(H, np.int64)
        for pos in range(c * CHUNK_POSITIONS, min(n_pos, (c + 1) * CHUNK_POSITIONS)):
            b = pos // T
            t = pos - b * T
            mix = np.int64(0)
            for k in range(N):
                x = pad
                if t >= k:
                    x = ids[b, t - k]
                    if x >= V:
                        bad += 1
                        x = pad
                    elif x >= 0:  # negative ids pass through
                        x = lookup[x]
                mix ^= x * mult[k]
                mixes[k] = mix
            for h in range(H):
                mh[h] = mixes[head_order[h] - 1]
            for h in range(H):
                out[pos, h] = floor_mod(mh[h], primes[h], inv[h], two_step) + offsets[h]
    return bad


@njit(cache=True, nogil=True)
def _floor_mod_kernel(mix, primes, inv, two_step, out):
    for i in range(mix.shape[0]):
        for h in range(primes.shape[0]):
            out[i, h] = floor_mod(mix[i], primes[h], inv[h], two_step)


@njit(parallel=True, cache=True, nogil=True)
def _gather_kernel(table, rows, out):
    R, W = table.shape
    N = rows.shape[0]
    bad = 0
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        e = min(N, (c + 1) * CHUNK_ROWS)
        for i in range(c * CHUNK_ROWS, e):
            j = i + PREFETCH_AHEAD
            if j < e:
                rp = rows[j]
                if rp >= 0 and rp < R:
                    for w in range(0, W, CACHE_LINE):
                        _prefetch(table, rp, w)
            r = rows[i]
            if r < 0 or r >= R:
                bad += 1
                continue
            for w in range(W):
                out[i, w] = table[r, w]
    return bad


@njit(parallel=True, cache=True, nogil=True)
def _gather_fp8_kernel(table, rows, head_dim, vlut, slut, out):
    R, W = table.shape
    N = rows.shape[0]
    bad = 0
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        e = min(N, (c + 1) * CHUNK_ROWS)
        for i in range(c * CHUNK_ROWS, e):
            j = i + PREFETCH_AHEAD
            if j < e:
                rp = rows[j]
                if rp >= 0 and rp < R:
                    for w in range(0, W, CACHE_LINE):
                        _prefetch(table, rp, w)
            r = rows[i]
            if r < 0 or r >= R:
                bad += 1
                continue
            for d in range(head_dim):
                out[i, d] = vlut[table[r, d]] * slut[table[r, head_dim + d // FP8_BLOCK]]
    return bad


_VLUT = e4m3_to_float32_table().astype(np.float32)
_SLUT = (np.arange(256, dtype=np.uint32) << np.uint32(23)).view(np.float32)  # bitcast_f32(byte << 23)


def mod_constants(primes: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(int64 primes, float64 1/p, two_step) for `floor_mod`."""
    primes = np.ascontiguousarray(primes, dtype=np.int64)
    return primes, 1.0 / primes.astype(np.float64), bool(primes.size and int(primes.min()) < FAST_MOD_MIN_PRIME)


def floor_mod_heads(mix: np.ndarray, primes) -> np.ndarray:
    """floor_mod of each int64 mix (M,) by each prime (K,): (M, K) int64 (what the hash kernel computes per head)."""
    p, inv, two = mod_constants(primes)
    mix = np.ascontiguousarray(mix, dtype=np.int64)
    out = np.empty((mix.shape[0], p.shape[0]), dtype=np.int64)
    _floor_mod_kernel(mix, p, inv, two, out)
    return out


def row_ids_into(ids: np.ndarray, lookup: np.ndarray, pad: int, mult: np.ndarray, primes: np.ndarray, offsets: np.ndarray,
                 head_order: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Raw ids (B, T) int64 -> row ids written into `out` (B*T, H) int64 (ids >= len(lookup): IndexError)."""
    p, inv, two = mod_constants(primes)
    bad = _row_ids_kernel(ids, lookup, np.int64(pad), mult, p, inv, offsets, head_order, two, out)
    if bad:
        raise IndexError(f"{bad} token ids are outside the vocabulary of {lookup.shape[0]} ids")
    return out


def gather_rows_into(table: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 rows (R, W) at `rows` (N,) int64 -> `out` (N, W) uint8."""
    bad = _gather_kernel(table, rows, out)
    if bad:
        raise IndexError(f"{bad} row ids are outside the table's {table.shape[0]} rows")
    return out


def gather_fp8_into(table: np.ndarray, rows: np.ndarray, head_dim: int, out: np.ndarray) -> np.ndarray:
    """Packed FP8 rows (R, head_dim + head_dim//32) uint8 at `rows` -> float32 `out` (N, head_dim)."""
    bad = _gather_fp8_kernel(table, rows, np.int64(head_dim), _VLUT, _SLUT, out)
    if bad:
        raise IndexError(f"{bad} row ids are outside the table's {table.shape[0]} rows")
    return out


def threads() -> int:
    """The threads the kernels use (numba's, set by NUMBA_NUM_THREADS; all cores by default)."""
    return numba.get_num_threads()
