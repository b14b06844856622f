"""The CPU kernels (numba, both cores): a layer's row ids in one fused pass, and the row gather (+ FP8 dequant).

- `row_ids_into(ids, hash_constants(...), out)`: raw ids (B, T) -> row ids (B*T, H), every
  head of every order in one pass over chunks of positions: per chunk the compressed ids
  are read once (negative ids pass through, docs/spec.md "Ids outside the vocabulary"),
  each order's mix is the previous order's XOR one more product (vectorized over the
  positions), and each head's floor modulo is computed in registers, LANES (8) heads at a
  time as explicit LLVM vector code (`_floor_mod_lanes`: one AVX-512 register of int64),
  written straight into the output (no temporaries per head or per order).
- `gather_rows_into(table, rows, out)`: rows of a (R, row bytes) uint8 view of any table
  into a (N, row bytes) uint8 view of the output, with software prefetch of the rows a
  few iterations ahead (the gather is bound by DRAM latency, not bandwidth); row ids
  outside the table are an IndexError.
- `gather_fp8_into(table, rows, head_dim, out)`: packed float8_e4m3 rows dequantized to
  float32 while gathered: `e4m3 LUT[byte] * bitcast_f32(scale byte << 23)`, bit-identical
  to engram_cli/fp8.py (both factors come from 256-entry tables built from it).

The floor modulo (why it is exact): for an int64 mix m and a prime p >= 2, d = float64(m) is
within 2^9 of m, 1/p is rounded to within 2^-53 relative, and the product to within
2^-53 relative, so d * (1/p) is within (2^9 + 2^10 + 2^10)/p = 2560/p of m/p. For
p >= FAST_MOD_MIN_PRIME (4096) that is under 1: q = floor(d * (1/p)) is the true quotient
or one off, so r = m - q*p (wrapping int64, exact because the true value is small) lies in
[-p, 2p) and one add or subtract of p makes it the floor modulo. For smaller primes (tiny
test plans) the same step runs twice (the second on |r| < 2^12 + 2p, exact in float64).
q fits int64 (|m/p| <= 2^62); the products q*p wrap, but the difference is exact.

Compiled on first use and cached on disk next to this file (numba `cache=True`); the
torch reference (`RowHasher.reference`, `index_select`) stays beside these in hash.py and
gather.py, and tests/kernels checks them against it bit for bit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from engram_cli.fp8 import FP8_BLOCK, e4m3_to_float32_table

# numba's work-queue threads sleep between kernels; OpenMP's spin, which on a machine shared with
# other jobs (or with torch's own OpenMP pool) turns a 0.3 ms kernel into a 10 ms wait for a
# descheduled thread. NUMBA_THREADING_LAYER still overrides this.
if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "workqueue"

FAST_MOD_MIN_PRIME = 4096  # floor_mod's single step is exact for primes from here up (module docstring)
CHUNK_POSITIONS = 2048  # positions per parallel task of the hash
CHUNK_ROWS = 2048  # rows per parallel task of the gathers
PREFETCH_AHEAD = 12  # rows prefetched ahead of the copy (about 3 KB of float32 rows in flight per core)
CACHE_LINE = 64
PARALLEL_MIN_ITEMS = 1 << 15  # below this many outputs (ids or rows) a kernel runs on the calling thread only


@contextmanager
def _threads_for(items: int):
    """All of numba's threads for large inputs, the calling thread alone for small ones (no hand-off)."""
    if items >= PARALLEL_MIN_ITEMS:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


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


def _floor_mod_lanes(two_step: bool, vector_mix: bool):
    """An intrinsic writing `out[pos, h0 : h0+count]` = floor_mod(mix, p_h) + offset_h for up to LANES
    heads at once, as explicit <8 x i64> / <8 x double> LLVM vector code (a masked store for
    count < LANES). The heads' constants come as LANES-tuples (primes, 1/p, offsets): values, so
    the compiler builds their vectors once outside the loop over positions. mix: one int64 for
    all lanes, or (vector_mix) an int64 array holding one mix per lane (a group of heads of
    different orders). two_step: the second reduction step for primes below FAST_MOD_MIN_PRIME
    (module docstring)."""

    @intrinsic
    def floor_mod_lanes(typingctx, mix, pt, it, ot, out, pos, h0, count):
        def codegen(context, builder, sig, args):
            i64, f64, i32, i8p = ir.IntType(64), ir.DoubleType(), ir.IntType(32), ir.IntType(8).as_pointer()
            v8i, v8d = ir.VectorType(i64, LANES), ir.VectorType(f64, LANES)
            v8b = ir.VectorType(ir.IntType(1), LANES)

            def vec(tup, vty):
                v = ir.Constant(vty, ir.Undefined)
                for j in range(LANES):
                    v = builder.insert_element(v, builder.extract_value(tup, j), ir.Constant(i32, j))
                return v

            def splat(x, vty):
                v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, ir.Constant(i32, 0))
                return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))

            def fn(name, ret, argtys):
                return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)

            def ptr(k, idx):
                ary = context.make_array(sig.args[k])(context, builder, args[k])
                return builder.bitcast(cgutils.get_item_pointer(context, builder, sig.args[k], ary, idx, wraparound=False), i8p)

            floor = fn(f"llvm.floor.v{LANES}f64", v8d, [v8d])
            store = fn(f"llvm.masked.store.v{LANES}i64.p0", ir.VoidType(), [v8i, i8p, i32, v8b])
            p, iv, off = vec(args[1], v8i), vec(args[2], v8d), vec(args[3], v8i)
            if vector_mix:
                m = builder.load(builder.bitcast(ptr(0, [ir.Constant(i64, 0)]), v8i.as_pointer()), align=8)
            else:
                m = splat(args[0], v8i)

            def step(x):  # x - floor(float(x) * (1/p)) * p, in wrapping int64
                q = builder.fptosi(builder.call(floor, [builder.fmul(builder.sitofp(x, v8d), iv)]), v8i)
                return builder.sub(x, builder.mul(q, p))

            r = step(m)
            if two_step:
                r = step(r)
            r = builder.select(builder.icmp_signed("<", r, ir.Constant(v8i, [0] * LANES)), builder.add(r, p), r)
            r = builder.select(builder.icmp_signed(">=", r, p), builder.sub(r, p), r)
            mask = builder.icmp_signed("<", ir.Constant(v8i, list(range(LANES))), splat(args[7], v8i))
            builder.call(store, [builder.add(r, off), ptr(4, [args[5], args[6]]), ir.Constant(i32, 8), mask])
            return context.get_dummy_value()

        return types.void(mix, pt, it, ot, out, pos, h0, count), codegen

    return floor_mod_lanes


LANES = 8  # heads per vector (8 int64: one AVX-512 register, two AVX2 ones)
_fm = _floor_mod_lanes(False, False)
_fm_two = _floor_mod_lanes(True, False)
_fm_vec = _floor_mod_lanes(False, True)
_fm_vec_two = _floor_mod_lanes(True, True)


@njit(inline="always")
def _lanes(a, h0):
    """a[h0 : h0+8] as a tuple (a is padded to a multiple of LANES)."""
    return (a[h0], a[h0 + 1], a[h0 + 2], a[h0 + 3], a[h0 + 4], a[h0 + 5], a[h0 + 6], a[h0 + 7])


@njit(parallel=True, cache=True, nogil=True)
def _row_ids_kernel(ids, lookup, pad, mult, primes8, inv8, offsets8, head_order8, group_order, H, two_step, out):
    B, T = ids.shape
    N = mult.shape[0]
    V = lookup.shape[0]
    G = group_order.shape[0]
    per_row = (T + CHUNK_POSITIONS - 1) // CHUNK_POSITIONS
    bad = 0
    for c in prange(B * per_row):
        b = c // per_row
        t0 = (c - b * per_row) * CHUNK_POSITIONS
        n = min(T, t0 + CHUNK_POSITIONS) - t0
        mixes = np.empty((N, CHUNK_POSITIONS), np.int64)  # each order's mix at each position of the chunk
        mh = np.empty(LANES, np.int64)
        xs = np.empty(CHUNK_POSITIONS + N, np.int64)  # compressed ids of positions t0-(N-1) .. t0+n-1
        for i in range(n + N - 1):
            t = t0 + i - (N - 1)
            x = pad
            if t >= 0:
                x = ids[b, t]
                if x >= V:
                    bad += 1
                    x = pad
                elif x >= 0:  # negative ids pass through
                    x = lookup[x]
            xs[i] = x
        m0 = mult[0]
        for i in range(n):  # vectorized over positions
            mixes[0, i] = xs[i + N - 1] * m0
        for k in range(1, N):
            mk = mult[k]
            for i in range(n):
                mixes[k, i] = mixes[k - 1, i] ^ (xs[i + N - 1 - k] * mk)
        base = b * T + t0
        for g in range(G):  # LANES heads at a time, their constants held in registers over the chunk
            h0 = g * LANES
            cnt = min(LANES, H - h0)
            pt, it, ot = _lanes(primes8, h0), _lanes(inv8, h0), _lanes(offsets8, h0)
            o = group_order[g] - 1
            if o >= 0:  # the group's heads share one order: its mix broadcast
                if two_step:
                    for i in range(n):
                        _fm_two(mixes[o, i], pt, it, ot, out, base + i, h0, cnt)
                else:
                    for i in range(n):
                        _fm(mixes[o, i], pt, it, ot, out, base + i, h0, cnt)
            else:
                for i in range(n):
                    for j in range(LANES):
                        mh[j] = mixes[head_order8[h0 + j] - 1, i]
                    if two_step:
                        _fm_vec_two(mh, pt, it, ot, out, base + i, h0, cnt)
                    else:
                        _fm_vec(mh, pt, it, ot, out, base + i, h0, cnt)
    return bad


@njit(cache=True, nogil=True)
def _floor_mod_kernel(mix, primes8, inv8, offsets8, H, two_step, out):
    for h0 in range(0, H, LANES):
        pt, it, ot = _lanes(primes8, h0), _lanes(inv8, h0), _lanes(offsets8, h0)
        for i in range(mix.shape[0]):
            if two_step:
                _fm_two(mix[i], pt, it, ot, out, i, h0, min(LANES, H - h0))
            else:
                _fm(mix[i], pt, it, ot, out, i, h0, min(LANES, H - h0))


@njit(parallel=True, cache=True, nogil=True)
def _gather_kernel(table, rows, out, ahead):
    R, W = table.shape
    N = rows.shape[0]
    bad = 0
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        e = min(N, (c + 1) * CHUNK_ROWS)
        for i in range(c * CHUNK_ROWS, e):
            j = i + ahead
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
def _gather_fp8_kernel(table, rows, head_dim, vlut, slut, out, ahead):
    R, W = table.shape
    N = rows.shape[0]
    bad = 0
    for c in prange((N + CHUNK_ROWS - 1) // CHUNK_ROWS):
        e = min(N, (c + 1) * CHUNK_ROWS)
        for i in range(c * CHUNK_ROWS, e):
            j = i + ahead
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


def _padded(a: np.ndarray, fill, dtype) -> np.ndarray:
    """`a` padded with `fill` to a multiple of LANES entries (the kernels read whole groups)."""
    n = -(-len(a) // LANES) * LANES
    out = np.full(n, fill, dtype=dtype)
    out[: len(a)] = a
    return out


def mod_constants(primes: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(int64 primes, float64 1/p, two_step), padded to a multiple of LANES (padding: p = 1)."""
    primes = np.asarray(primes, dtype=np.int64)
    p = _padded(primes, 1, np.int64)
    return p, 1.0 / p.astype(np.float64), bool(primes.size and int(primes.min()) < FAST_MOD_MIN_PRIME)


def group_orders(head_order: np.ndarray) -> np.ndarray:
    """Per group of LANES heads: the order they share, or -1 when the group spans orders (K % LANES != 0)."""
    g = [np.asarray(head_order[i : i + LANES]) for i in range(0, len(head_order), LANES)]
    return np.array([int(x[0]) if (x == x[0]).all() else -1 for x in g], dtype=np.int64)


def floor_mod_heads(mix: np.ndarray, primes) -> np.ndarray:
    """floor_mod of each int64 mix (M,) by each prime (K,): (M, K) int64, by the hash kernel's vector code."""
    k = len(primes)
    p, inv, two = mod_constants(primes)
    mix = np.ascontiguousarray(mix, dtype=np.int64)
    out = np.empty((mix.shape[0], k), dtype=np.int64)
    _floor_mod_kernel(mix, p, inv, np.zeros_like(p), np.int64(k), two, out)
    return out


def hash_constants(lookup: np.ndarray, pad: int, mult: np.ndarray, primes: np.ndarray, offsets: np.ndarray,
                   head_order: np.ndarray) -> tuple:
    """A layer's constants in the form `row_ids_into` passes to the kernel (built once per RowHasher)."""
    H = len(primes)
    p, inv, two = mod_constants(primes)
    off, order = _padded(offsets, 0, np.int64), _padded(head_order, head_order[-1] if H else 2, np.int64)
    return (np.ascontiguousarray(lookup, dtype=np.int64), np.int64(pad), np.ascontiguousarray(mult, dtype=np.int64),
            p, inv, off, order, group_orders(head_order), np.int64(H), two)


def row_ids_into(ids: np.ndarray, consts: tuple, out: np.ndarray) -> np.ndarray:
    """Raw ids (B, T) int64 -> row ids written into `out` (B*T, H) int64, with `hash_constants`
    (ids >= the vocabulary size: IndexError; EngramLookup refuses them before this)."""
    with _threads_for(out.size):
        bad = _row_ids_kernel(ids, *consts, out)
    if bad:
        raise IndexError(f"{bad} token ids are outside the vocabulary of {consts[0].shape[0]} ids")
    return out


def gather_rows_into(table: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 rows (R, W) at `rows` (N,) int64 -> `out` (N, W) uint8."""
    with _threads_for(rows.shape[0]):
        bad = _gather_kernel(table, rows, out, PREFETCH_AHEAD)
    if bad:
        raise IndexError(f"{bad} row ids are outside the table's {table.shape[0]} rows")
    return out


def gather_fp8_into(table: np.ndarray, rows: np.ndarray, head_dim: int, out: np.ndarray) -> np.ndarray:
    """Packed FP8 rows (R, head_dim + head_dim//32) uint8 at `rows` -> float32 `out` (N, head_dim)."""
    with _threads_for(rows.shape[0]):
        bad = _gather_fp8_kernel(table, rows, np.int64(head_dim), _VLUT, _SLUT, out, PREFETCH_AHEAD)
    if bad:
        raise IndexError(f"{bad} row ids are outside the table's {table.shape[0]} rows")
    return out


def threads() -> int:
    """The threads the kernels use (numba's, set by NUMBA_NUM_THREADS; all cores by default)."""
    return numba.get_num_threads()
