"""The CPU kernels (numba, both cores): a layer's row ids in one fused pass, and the row gather (+ FP8 dequant).

- `row_ids_into(ids, hash_constants(...), out)`: raw ids (B, T) -> row ids (B*T, H), every
  head of every order in one pass over chunks of positions: per chunk the compressed ids
  are read once (negative ids pass through, docs/spec.md "Ids outside the vocabulary"),
  each order's mix is the previous order's XOR one more product (vectorized over the
  positions), and each head's floor modulo is computed in registers, LANES (8) heads at a
  time as explicit LLVM vector code (`_floor_mod_lanes`: one AVX-512 register of int64),
  written straight into the output (no temporaries per head or per order).
- `gather_rows_into(table, rows, out)`: rows of a (R, row bytes) uint8 view of any table
  into a (N, row bytes) uint8 view of the output, with software prefetch of the rows
  PREFETCH_AHEAD iterations ahead (the gather is bound by memory latency, not bandwidth)
  and, when the output rows are whole 64-byte-aligned lines, 64-byte copies with
  non-temporal stores (the output is not read back soon: no read-for-ownership of its
  lines); row ids outside the table are an IndexError.
- `gather_fp8_into(table, rows, head_dim, out)`: packed float8_e4m3 rows dequantized to
  float32 while gathered, 16 values at a time: `e4m3(byte) * bitcast_f32(scale byte << 23)`,
  the e4m3 value decoded with vector integer ops (`_dequant_fp8_lanes`), bit-identical to
  engram_cli/fp8.py's 256-entry table (tested on every byte under every scale).

The floor modulo (why it is exact): for an int64 mix m and a prime p >= 2, d = float64(m) is
within 2^9 of m, 1/p is rounded to within 2^-53 relative, and the product to within
2^-53 relative, so d * (1/p) is within (2^9 + 2^10 + 2^10)/p = E/p of m/p (E = QUOTIENT_ERROR,
2560). Computed as one fma, y = d * (1/p) - E/p is rounded once (within 2^10/p, in place of
the product's rounding), so m/p - 2E/p <= y <= m/p (up to 2^-40/p, far less than the 1/p
between m/p and the next integer below). For p >= FAST_MOD_MIN_PRIME (8192) 2E/p is under 1:
q = floor(y) is the true quotient or one less, r = m - q*p (wrapping int64, exact because the
true value is small) lies in [0, 2p), and one conditional subtract of p makes it the floor
modulo. For smaller primes (tiny test plans) an unbiased step runs twice (the second on
|r| < 2^13 + 2p, exact in float64) and r in [-p, 2p) takes one add and one subtract.
q fits int64 (|m/p| <= 2^62); the products q*p wrap, but the difference is exact.

Threads: OpenMP (numba's `omp` layer) first, the work queue where no OpenMP runtime loads;
inputs under PARALLEL_MIN_ITEMS outputs, and every call in a child forked from a process that
imported this module, run a serial build of the same kernel (the chunk functions are shared).

Compiled on first use and cached on disk next to this file (numba `cache=True`); the
torch reference (`RowHasher.reference`, `index_select`) stays beside these in hash.py and
gather.py, and tests/kernels checks them against it bit for bit.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from engram_cli.fp8 import FP8_BLOCK, e4m3_to_float32_table, scale_bytes_to_float32

# Threading: OpenMP first. Its workers spin briefly between kernels, so a launch costs about 2 us
# against about 50 us for numba's work queue (whose workers sleep), which on a 0.1 ms kernel is
# the difference between ~29x and ~9x the numpy hash; interleaved with torch ops, and with another
# job busy on one of the two cores, OpenMP still came out ahead (docs/kernels.md). The work queue
# stays the fallback where no OpenMP runtime loads. NUMBA_THREADING_LAYER(_PRIORITY) still override.
if not (os.environ.get("NUMBA_THREADING_LAYER") or os.environ.get("NUMBA_THREADING_LAYER_PRIORITY")):
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

_forked = False  # True in a child forked from this process: GNU OpenMP's pool does not survive a fork


def _mark_forked() -> None:
    global _forked
    _forked = True  # the kernels run serially from here on (the child's own threads are not started)


os.register_at_fork(after_in_child=_mark_forked)


QUOTIENT_ERROR = 2560.0  # the float quotient's error bound times p (module docstring)
FAST_MOD_MIN_PRIME = 8192  # floor_mod's single step is exact for primes from here up (module docstring)
CHUNK_POSITIONS = 2048  # positions per parallel task of the hash
CHUNK_ROWS = 2048  # rows per parallel task of the gathers
PREFETCH_AHEAD = 32  # rows prefetched ahead of the copy (4-8 KB of bfloat16 / float32 rows in flight per core)
CACHE_LINE = 64
PARALLEL_MIN_ITEMS = 1 << 15  # below this many outputs (ids or rows) a kernel runs on the calling thread only


def _parallel(items: int) -> bool:
    """Whether a kernel over `items` outputs runs on all threads: large inputs, not in a forked child."""
    return items >= PARALLEL_MIN_ITEMS and not _forked and numba.get_num_threads() > 1


@intrinsic
def _prefetch(typingctx, arr, row, col):
    """LLVM's prefetch of &arr[row, col] into L2 (read, locality 2: prefetcht1 on x86); never faults.
    Into L2, not L1: L2 keeps more misses in flight than L1's fill buffers, and that is what
    a random gather is bound by (128-byte rows: 13.1 GB/s prefetching into L1 at best, 24.5
    GB/s into L2 at 32 rows ahead, against a 14.6 GB/s copy; docs/kernels.md)."""

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, row, col), codegen


@intrinsic
def _copy_line_nt(typingctx, src, r, dst, i, w):
    """dst[i, w : w+64] = src[r, w : w+64]: one 64-byte load and one non-temporal store (the
    output is written once and not read back soon: streaming it past the caches saves the
    read-for-ownership of every line, a third of a gather's memory traffic). dst[i, w] must be
    64-byte aligned."""

    def codegen(context, builder, sig, args):
        v64 = ir.VectorType(ir.IntType(8), CACHE_LINE)

        def ptr(k, idx):
            ary = context.make_array(sig.args[k])(context, builder, args[k])
            p = cgutils.get_item_pointer(context, builder, sig.args[k], ary, idx, wraparound=False)
            return builder.bitcast(p, v64.as_pointer())

        v = builder.load(ptr(0, [args[1], args[4]]), align=1)
        st = builder.store(v, ptr(2, [args[3], args[4]]), align=CACHE_LINE)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(src, r, dst, i, w), codegen


@intrinsic
def _store_fence(typingctx):
    """A full memory fence: the non-temporal stores before it are visible to every thread after it."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


FP8_LANES = 16  # values decoded per vector (16 float32: one AVX-512 register)
_E4M3_NAN_BITS = int(e4m3_to_float32_table()[0x7F:0x80].astype(np.float32).view(np.uint32)[0])  # fp8.py's NaN (0x7f), unsigned


@intrinsic
def _dequant_fp8_lanes(typingctx, table, r, d0, scale, out, i):
    """out[i, d0 : d0+16] = e4m3(table[r, d0 : d0+16]) * scale, the e4m3 values decoded with vector
    integer ops, exactly: sign << 31 | (e + 120) << 23 | m << 20 for e > 0 (bias 7 -> 127),
    float(m) * 2^-9 for e = 0 (the subnormals, exact), fp8.py's NaN bits for |byte| = 0x7f;
    then one float32 multiply by the block's scale, the same operation as the table path
    (tests/kernels compare every byte under every scale bit for bit)."""

    def codegen(context, builder, sig, args):
        i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
        vb, vi, vf = ir.VectorType(i8, FP8_LANES), ir.VectorType(i32, FP8_LANES), ir.VectorType(f32, FP8_LANES)

        def ptr(k, idx, ty):
            ary = context.make_array(sig.args[k])(context, builder, args[k])
            return builder.bitcast(cgutils.get_item_pointer(context, builder, sig.args[k], ary, idx, wraparound=False), ty.as_pointer())

        def c(v):
            return ir.Constant(vi, [v] * FP8_LANES)

        b = builder.zext(builder.load(ptr(0, [args[1], args[2]], vb), align=1), vi)
        sign = builder.shl(builder.and_(b, c(0x80)), c(24))
        e = builder.and_(builder.lshr(b, c(3)), c(15))
        m = builder.and_(b, c(7))
        normal = builder.or_(builder.shl(builder.add(e, c(120)), c(23)), builder.shl(m, c(20)))
        subnormal = builder.bitcast(builder.fmul(builder.uitofp(m, vf), ir.Constant(vf, [2.0**-9] * FP8_LANES)), vi)
        bits = builder.select(builder.icmp_unsigned("==", e, c(0)), subnormal, normal)
        bits = builder.select(builder.icmp_unsigned("==", builder.and_(b, c(0x7F)), c(0x7F)), c(_E4M3_NAN_BITS), bits)
        value = builder.bitcast(builder.or_(bits, sign), vf)
        s = builder.insert_element(ir.Constant(vf, ir.Undefined), args[3], ir.Constant(i32, 0))
        s = builder.shuffle_vector(s, ir.Constant(vf, ir.Undefined), ir.Constant(ir.VectorType(i32, FP8_LANES), [0] * FP8_LANES))
        builder.store(builder.fmul(value, s), ptr(4, [args[5], args[2]], vf), align=4)
        return context.get_dummy_value()

    return types.void(table, r, d0, scale, out, i), codegen


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
            fma = fn(f"llvm.fma.v{LANES}f64", v8d, [v8d, v8d, v8d])
            store = fn(f"llvm.masked.store.v{LANES}i64.p0", ir.VoidType(), [v8i, i8p, i32, v8b])
            p, iv, off = vec(args[1], v8i), vec(args[2], v8d), vec(args[3], v8i)
            bias_v = builder.fmul(iv, ir.Constant(v8d, [-QUOTIENT_ERROR] * LANES))  # -2560/p
            if vector_mix:
                m = builder.load(builder.bitcast(ptr(0, [ir.Constant(i64, 0)]), v8i.as_pointer()), align=8)
            else:
                m = splat(args[0], v8i)

            def step(x, bias=None):  # x - floor(float(x) * (1/p) [- bias]) * p, in wrapping int64
                y = builder.sitofp(x, v8d)
                y = builder.fmul(y, iv) if bias is None else builder.call(fma, [y, iv, bias])
                return builder.sub(x, builder.mul(builder.fptosi(builder.call(floor, [y]), v8i), p))

            if two_step:  # quotient within one of the true one, twice: r in [-p, 2p)
                r = step(step(m))
                r = builder.select(builder.icmp_signed("<", r, ir.Constant(v8i, [0] * LANES)), builder.add(r, p), r)
            else:  # quotient biased down by its error bound: the true one or one less, r in [0, 2p)
                r = step(m, bias_v)
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


@njit(cache=True, nogil=True)
def _row_ids_chunk(c, ids, lookup, pad, mult, primes8, inv8, offsets8, head_order8, group_order, H, two_step, out):
    """Row ids of chunk `c` (CHUNK_POSITIONS positions of one sequence) into `out`; returns the
    count of ids >= the vocabulary size met (read as the pad id)."""
    B, T = ids.shape
    N = mult.shape[0]
    V = lookup.shape[0]
    G = group_order.shape[0]
    per_row = (T + CHUNK_POSITIONS - 1) // CHUNK_POSITIONS
    bad = 0
    b = c // per_row
    t0 = (c - b * per_row) * CHUNK_POSITIONS
    n = min(T, t0 + CHUNK_POSITIONS) - t0
    mixes = np.empty((N, CHUNK_POSITIONS), np.int64)  # each order's mix at each position of the chunk
    mh = np.empty(LANES, np.int64)
    xs = np.empty(CHUNK_POSITIONS + N, np.int64)  # compressed ids of positions t0-(N-1) .. t0+n-1
    lead = max(0, N - 1 - t0)  # positions before the sequence start: the pad id
    xs[:lead] = pad
    src = ids[b, t0 + lead - (N - 1): t0 + n]
    for i in range(src.shape[0]):  # (loops over views: no negative-index checks, so they vectorize)
        x = src[i]
        if x >= V:
            bad += 1
            x = pad
        elif x >= 0:  # negative ids pass through
            x = lookup[x]
        xs[lead + i] = x
    for k in range(N):  # each order's mix: the previous order's XOR one more product, vectorized over positions
        mk = mult[k]
        sh = xs[N - 1 - k: N - 1 - k + n]
        mix = mixes[k]
        if k == 0:
            for i in range(n):
                mix[i] = sh[i] * mk
        else:
            prev = mixes[k - 1]
            for i in range(n):
                mix[i] = prev[i] ^ (sh[i] * mk)
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


@njit(parallel=True, cache=True, nogil=True)
def _row_ids_parallel(ids, lookup, pad, mult, primes8, inv8, offsets8, head_order8, group_order, H, two_step, out):
    B, T = ids.shape
    bad = 0
    for c in prange(B * ((T + CHUNK_POSITIONS - 1) // CHUNK_POSITIONS)):
        bad += _row_ids_chunk(c, ids, lookup, pad, mult, primes8, inv8, offsets8, head_order8, group_order, H, two_step, out)
    return bad


@njit(cache=True, nogil=True)
def _row_ids_serial(ids, lookup, pad, mult, primes8, inv8, offsets8, head_order8, group_order, H, two_step, out):
    B, T = ids.shape
    bad = 0
    for c in range(B * ((T + CHUNK_POSITIONS - 1) // CHUNK_POSITIONS)):
        bad += _row_ids_chunk(c, ids, lookup, pad, mult, primes8, inv8, offsets8, head_order8, group_order, H, two_step, out)
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


@njit(inline="always")
def _prefetch_row(table, r):
    """Every line of table row r into L2 (nothing for a row id outside the table: the gather reports it)."""
    R, W = table.shape
    if r >= 0 and r < R:
        for w in range(0, W, CACHE_LINE):
            _prefetch(table, r, w)
        _prefetch(table, r, W - 1)  # the row's last line (a table not on a line boundary: one more)


@njit(cache=True, nogil=True)
def _gather_chunk(c, table, rows, out, ahead, stream):
    """Rows CHUNK_ROWS*c .. of `rows` from `table` into `out`, the rows `ahead` prefetched; stream:
    whole 64-byte blocks with non-temporal stores (out's rows 64-byte aligned, width a multiple of
    64), else a byte loop. Returns the count of row ids outside the table."""
    R, W = table.shape
    N = rows.shape[0]
    e = min(N, (c + 1) * CHUNK_ROWS)
    bad = 0
    for i in range(c * CHUNK_ROWS, e):
        if i + ahead < e:
            _prefetch_row(table, rows[i + ahead])
        r = rows[i]
        if r < 0 or r >= R:
            bad += 1
            continue
        if stream:
            for w in range(0, W, CACHE_LINE):
                _copy_line_nt(table, r, out, i, w)
        else:
            for w in range(W):
                out[i, w] = table[r, w]
    if stream:
        _store_fence()
    return bad


@njit(parallel=True, cache=True, nogil=True)
def _gather_parallel(table, rows, out, ahead, stream):
    bad = 0
    for c in prange((rows.shape[0] + CHUNK_ROWS - 1) // CHUNK_ROWS):
        bad += _gather_chunk(c, table, rows, out, ahead, stream)
    return bad


@njit(cache=True, nogil=True)
def _gather_serial(table, rows, out, ahead, stream):
    bad = 0
    for c in range((rows.shape[0] + CHUNK_ROWS - 1) // CHUNK_ROWS):
        bad += _gather_chunk(c, table, rows, out, ahead, stream)
    return bad


@njit(cache=True, nogil=True)
def _gather_fp8_chunk(c, table, rows, head_dim, slut, out, ahead):
    """FP8 rows CHUNK_ROWS*c .. dequantized to float32 while gathered; returns the count of bad row ids."""
    R, W = table.shape
    N = rows.shape[0]
    e = min(N, (c + 1) * CHUNK_ROWS)
    bad = 0
    for i in range(c * CHUNK_ROWS, e):
        if i + ahead < e:
            _prefetch_row(table, rows[i + ahead])
        r = rows[i]
        if r < 0 or r >= R:
            bad += 1
            continue
        for d0 in range(0, head_dim, FP8_LANES):  # head_dim is a multiple of FP8_BLOCK (32)
            _dequant_fp8_lanes(table, r, d0, slut[table[r, head_dim + d0 // FP8_BLOCK]], out, i)
    return bad


@njit(parallel=True, cache=True, nogil=True)
def _gather_fp8_parallel(table, rows, head_dim, slut, out, ahead):
    bad = 0
    for c in prange((rows.shape[0] + CHUNK_ROWS - 1) // CHUNK_ROWS):
        bad += _gather_fp8_chunk(c, table, rows, head_dim, slut, out, ahead)
    return bad


@njit(cache=True, nogil=True)
def _gather_fp8_serial(table, rows, head_dim, slut, out, ahead):
    bad = 0
    for c in range((rows.shape[0] + CHUNK_ROWS - 1) // CHUNK_ROWS):
        bad += _gather_fp8_chunk(c, table, rows, head_dim, slut, out, ahead)
    return bad


_SLUT = scale_bytes_to_float32(np.arange(256, dtype=np.uint8))  # every ue8m0 scale byte's float32: bitcast(byte << 23)


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
    kernel = _row_ids_parallel if _parallel(out.size) else _row_ids_serial
    bad = kernel(ids, *consts, out)
    if bad:
        raise IndexError(f"{bad} token ids are outside the vocabulary of {consts[0].shape[0]} ids")
    return out


def _streams(out: np.ndarray) -> bool:
    """Whether `out` takes the gather's non-temporal stores: rows of whole, 64-byte-aligned lines."""
    return out.shape[1] % CACHE_LINE == 0 and out.ctypes.data % CACHE_LINE == 0 and out.strides[0] == out.shape[1]


def gather_rows_into(table: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 rows (R, W) at `rows` (N,) int64 -> `out` (N, W) uint8."""
    kernel = _gather_parallel if _parallel(rows.shape[0]) else _gather_serial
    bad = kernel(table, rows, out, PREFETCH_AHEAD, _streams(out))
    if bad:
        raise IndexError(f"{bad} row ids are outside the table's {table.shape[0]} rows")
    return out


def gather_fp8_into(table: np.ndarray, rows: np.ndarray, head_dim: int, out: np.ndarray) -> np.ndarray:
    """Packed FP8 rows (R, head_dim + head_dim//32) uint8 at `rows` -> float32 `out` (N, head_dim)."""
    kernel = _gather_fp8_parallel if _parallel(rows.shape[0]) else _gather_fp8_serial
    bad = kernel(table, rows, np.int64(head_dim), _SLUT, out, PREFETCH_AHEAD)
    if bad:
        raise IndexError(f"{bad} row ids are outside the table's {table.shape[0]} rows")
    return out


def threads() -> int:
    """The threads the kernels use (numba's, set by NUMBA_NUM_THREADS; all cores by default)."""
    return numba.get_num_threads()
