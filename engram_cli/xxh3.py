"""Vectorized XXH3_64 (seeded) over many equal-length short inputs, in numpy.

Bit-exact with `xxhash.xxh3_64_intdigest(data, seed)` (xxHash 0.8.x) for inputs of
0..240 bytes: the short-input paths of XXH3 (`len_0`, `len_1to3`, `len_4to8`,
`len_9to16`, `len_17to128`, `len_129to240`). For these lengths the seed is applied to
the default secret inline (no custom secret is derived), so the 192-byte default
`kSecret` plus the seed is all the state there is. Longer inputs are not supported
here (`MAX_LEN`); callers fall back to the xxhash package.

All inputs of one call have the same length L (every branch of XXH3 depends only on L),
given as a C-contiguous (m, L) uint8 array; `xxh3_64_ids` packs n-grams of ids as
little-endian uint32 (L = 4n), the layout `engram collisions --hash xxh3` hashes.
Arithmetic is wrapping uint64; the 64x64->128-bit multiply of `mul128_fold64` is done
in 32-bit halves.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_LEN = 240
CHUNK_ROWS = 1 << 16  # rows hashed per step: keeps the temporaries in cache (about 5x faster than whole arrays)
MASK64 = (1 << 64) - 1

# XXH3_kSecret: the default 192-byte secret of xxHash (xxhash.h).
K_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1c"
    "ded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221"
    "b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea3"
    "71644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d"
    "8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb"
    "170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce"
    "45cb3a8f95160428afd7fbcabb4b407e"
)
assert len(K_SECRET) == 192

PRIME64_1 = 0x9E3779B185EBCA87
PRIME64_2 = 0xC2B2AE3D27D4EB4F
PRIME64_3 = 0x165667B19E3779F9
PRIME_MX1 = 0x165667919E3779F9
PRIME_MX2 = 0x9FB21C651E98DF25
SECRET_SIZE_MIN = 136
MIDSIZE_STARTOFFSET = 3
MIDSIZE_LASTOFFSET = 17

_U64 = np.uint64
_LO32 = _U64(0xFFFFFFFF)
_S32 = _U64(32)


def _sec64(offset: int) -> int:
    return int.from_bytes(K_SECRET[offset : offset + 8], "little")


def _sec32(offset: int) -> int:
    return int.from_bytes(K_SECRET[offset : offset + 4], "little")


class _Words:
    """Little-endian words of every row of a contiguous (m, L) uint8 chunk, as uint64, read once per chunk.

    Every seed hashes the same chunk, so the reads (and the 4..8-byte input word) are shared;
    the arrays returned are never modified in place.
    """

    def __init__(self, buf: np.ndarray):
        self.buf = buf
        self.m, self.L = buf.shape
        self._cache: dict = {}

    def __call__(self, offset: int, width: int) -> np.ndarray:
        key = (offset, width)
        if key not in self._cache:
            dtype = "<u8" if width == 8 else "<u4"
            view = np.ndarray(shape=(self.m,), dtype=dtype, buffer=self.buf, offset=offset, strides=(self.L,))
            self._cache[key] = view.astype(np.uint64)
        return self._cache[key]


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << _U64(r)) | (x >> _U64(64 - r))


def mul128_fold64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(low 64 bits) XOR (high 64 bits) of the 128-bit products a * b (uint64 arrays)."""
    a_lo, a_hi = a & _LO32, a >> _S32
    b_lo, b_hi = b & _LO32, b >> _S32
    lo_lo = a_lo * b_lo
    hi_lo = a_hi * b_lo
    lo_hi = a_lo * b_hi
    hi_hi = a_hi * b_hi
    # cross <= (2^32-1)^2 + 2 (2^32-1) = 2^64 - 1: no overflow
    cross = (lo_lo >> _S32) + (hi_lo & _LO32) + lo_hi
    upper = (hi_lo >> _S32) + (cross >> _S32) + hi_hi
    upper ^= a * b  # the low 64 bits are the wrapping product
    return upper


def _xxh64_avalanche(h: np.ndarray) -> np.ndarray:
    h ^= h >> _U64(33)
    h *= _U64(PRIME64_2)
    h ^= h >> _U64(29)
    h *= _U64(PRIME64_3)
    h ^= h >> _U64(32)
    return h


def _avalanche(h: np.ndarray) -> np.ndarray:
    h ^= h >> _U64(37)
    h *= _U64(PRIME_MX1)
    h ^= h >> _U64(32)
    return h


def _rrmxmx(h: np.ndarray, length: int) -> np.ndarray:
    h = h ^ _rotl(h, 49) ^ _rotl(h, 24)
    h *= _U64(PRIME_MX2)
    h ^= (h >> _U64(35)) + _U64(length)
    h *= _U64(PRIME_MX2)
    h ^= h >> _U64(28)
    return h


def _mix16(w: _Words, in_off: int, sec_off: int, seed: int) -> np.ndarray:
    lo = w(in_off, 8) ^ _U64((_sec64(sec_off) + seed) & MASK64)
    hi = w(in_off + 8, 8) ^ _U64((_sec64(sec_off + 8) - seed) & MASK64)
    return mul128_fold64(lo, hi)


def _len_0(m: int, seed: int) -> np.ndarray:
    return _xxh64_avalanche(np.full(m, (seed ^ _sec64(56) ^ _sec64(64)) & MASK64, dtype=np.uint64))


def _len_1to3(buf: np.ndarray, L: int, seed: int) -> np.ndarray:
    c1 = buf[:, 0].astype(np.uint64)
    c2 = buf[:, L >> 1].astype(np.uint64)
    c3 = buf[:, L - 1].astype(np.uint64)
    combined = (c1 << _U64(16)) | (c2 << _U64(24)) | c3 | _U64(L << 8)
    bitflip = ((_sec32(0) ^ _sec32(4)) + seed) & MASK64
    return _xxh64_avalanche(combined ^ _U64(bitflip))


def _len_4to8(w: _Words, L: int, seed: int) -> np.ndarray:
    s32 = seed & 0xFFFFFFFF
    seed = (seed ^ (int.from_bytes(s32.to_bytes(4, "little"), "big") << 32)) & MASK64
    key = ("in64", L)
    if key not in w._cache:
        w._cache[key] = w(L - 4, 4) + (w(0, 4) << _S32)
    bitflip = ((_sec64(8) ^ _sec64(16)) - seed) & MASK64
    keyed = w._cache[key] ^ _U64(bitflip)
    return _rrmxmx(keyed, L)


def _len_9to16(w: _Words, L: int, seed: int) -> np.ndarray:
    bitflip1 = ((_sec64(24) ^ _sec64(32)) + seed) & MASK64
    bitflip2 = ((_sec64(40) ^ _sec64(48)) - seed) & MASK64
    lo = w(0, 8) ^ _U64(bitflip1)
    hi = w(L - 8, 8) ^ _U64(bitflip2)
    acc = lo.byteswap()
    acc += _U64(L)
    acc += hi
    acc += mul128_fold64(lo, hi)
    return _avalanche(acc)


def _len_17to128(w: _Words, L: int, seed: int) -> np.ndarray:
    acc = np.full(w.m, (L * PRIME64_1) & MASK64, dtype=np.uint64)
    if L > 32:
        if L > 64:
            if L > 96:
                acc += _mix16(w, 48, 96, seed)
                acc += _mix16(w, L - 64, 112, seed)
            acc += _mix16(w, 32, 64, seed)
            acc += _mix16(w, L - 48, 80, seed)
        acc += _mix16(w, 16, 32, seed)
        acc += _mix16(w, L - 32, 48, seed)
    acc += _mix16(w, 0, 0, seed)
    acc += _mix16(w, L - 16, 16, seed)
    return _avalanche(acc)


def _len_129to240(w: _Words, L: int, seed: int) -> np.ndarray:
    acc = np.full(w.m, (L * PRIME64_1) & MASK64, dtype=np.uint64)
    rounds = L // 16
    for i in range(8):
        acc += _mix16(w, 16 * i, 16 * i, seed)
    acc = _avalanche(acc)
    for i in range(8, rounds):
        acc += _mix16(w, 16 * i, 16 * (i - 8) + MIDSIZE_STARTOFFSET, seed)
    acc += _mix16(w, L - 16, SECRET_SIZE_MIN - MIDSIZE_LASTOFFSET, seed)
    return _avalanche(acc)


def _dispatch(w: _Words, seed: int) -> np.ndarray:
    """XXH3_64 of every row of the chunk behind `w` (the branch depends only on the length)."""
    L = w.L
    if L == 0:
        return _len_0(w.m, seed)
    if L <= 3:
        return _len_1to3(w.buf, L, seed)
    if L <= 8:
        return _len_4to8(w, L, seed)
    if L <= 16:
        return _len_9to16(w, L, seed)
    if L <= 128:
        return _len_17to128(w, L, seed)
    return _len_129to240(w, L, seed)


def _check(buf: np.ndarray) -> None:
    if buf.ndim != 2:
        raise ValueError(f"expected an (m, L) uint8 array, got shape {buf.shape}")
    if buf.shape[1] > MAX_LEN:
        raise ValueError(f"inputs of {buf.shape[1]} bytes are longer than the {MAX_LEN} bytes this implementation covers")


def xxh3_64(data: np.ndarray, seed: int = 0, *, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """XXH3_64 with `seed` of every row of `data`, an (m, L) uint8 array with L <= MAX_LEN: (m,) uint64."""
    buf = np.ascontiguousarray(data, dtype=np.uint8)
    _check(buf)
    seed = int(seed) & MASK64
    out = np.empty(buf.shape[0], dtype=np.uint64)
    for start in range(0, buf.shape[0], chunk):
        out[start : start + chunk] = _dispatch(_Words(buf[start : start + chunk]), seed)
    return out


def supports_ids(order: int) -> bool:
    """Whether n-grams of `order` ids (4 * order bytes) are within the vectorized lengths."""
    return 4 * int(order) <= MAX_LEN


def pack_ids(ids: np.ndarray) -> np.ndarray:
    """(m, n) ids -> (m, 4n) uint8: each n-gram as little-endian uint32 in text order."""
    ids = np.ascontiguousarray(np.asarray(ids), dtype="<u4")
    m, n = ids.shape
    return ids.view(np.uint8).reshape(m, 4 * n)


def xxh3_64_ids(ids: np.ndarray, seeds: Sequence[int], *, chunk: int = CHUNK_ROWS) -> np.ndarray:
    """XXH3_64 of each n-gram's ids packed as little-endian uint32, for each seed: (m, n) -> (m, len(seeds)) uint64.

    Equals `xxhash.xxh3_64_intdigest(struct.pack(f"<{n}I", *ids[i]), seeds[j])` at [i, j].
    """
    ids = np.asarray(ids)
    m, n = ids.shape
    if not supports_ids(n):
        raise ValueError(f"n-grams of {n} ids ({4 * n} bytes) are longer than the {MAX_LEN} bytes this implementation covers")
    seeds = [int(s) & MASK64 for s in seeds]
    out = np.empty((m, len(seeds)), dtype=np.uint64)
    for start in range(0, m, chunk):
        w = _Words(pack_ids(ids[start : start + chunk]))  # one cache-sized chunk at a time
        for j, seed in enumerate(seeds):
            out[start : start + chunk, j] = _dispatch(w, seed)
    return out
