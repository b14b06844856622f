"""Integer table rows: int8 or int4 values with one bfloat16 scale per 32 values (docs/quantize.md, docs/spec.md "Integer rows").

A stored row of a `head_dim`-wide table (`head_dim` a multiple of 32) is packed bytes:

    int8: [ head_dim int8 value bytes          | head_dim // 32 bfloat16 scale words (2 bytes each, little-endian) ]
    int4: [ head_dim // 2 bytes, two values each | head_dim // 32 bfloat16 scale words ]

int4 byte i holds value 2i in its low nibble and value 2i+1 in its high nibble, each as
`q + 8` (q in -7..7; nibble 0, q = -8, is never written but reads as -8). Block b
(values 32*b .. 32*b+31) has the scale word s_b. Dequantization is one float32 multiply,
bit-exact on every backend (numpy here, torch and Triton in `engram_cli.kernels`):

    value_f32 = float32(q) * bitcast_f32(uint32(s_b) << 16)

(exact, even: q has at most 8 significant bits and the bfloat16 scale 8, so the product
fits float32's 24-bit significand unless it underflows). Quantization: per block,
`scale = amax / QMAX` (QMAX 127 for int8, 7 for int4) rounded UP to bfloat16 (so no value
clips by more than the rounding), then `q = clip(rint(x / scale), -QMAX, QMAX)`, half to
even. The error of a value is at most scale / 2 <= amax * (1 + 2**-7) / (2 * QMAX): 0.40 %
of its block's absolute maximum for int8, 7.2 % for int4. An all-zero block has scale 0
and reads back as zeros.

What a store holds, checked on every write: finite values only (a row with NaN or inf
is refused, naming the row: `IntRowError`), and scale words that are finite and not
negative (`int_rows_problem`).
"""

from __future__ import annotations

import numpy as np

from engram_cli.errors import PlanError, StoreError

INT_BLOCK = 32  # values per scale word
QMAX = {"int8": 127, "int4": 7}
SCALE_BYTES = 2  # one bfloat16 word per block


class IntRowError(StoreError):
    """A row that cannot be stored as int8/int4: `row` is its index in the block given, `what` the problem."""

    def __init__(self, row: int, what: str):
        self.row, self.what = int(row), what
        super().__init__(f"row {self.row} {what}")


def check_int_head_dim(head_dim: int, kind: str) -> None:
    if head_dim <= 0 or head_dim % INT_BLOCK:
        raise PlanError(
            f"{kind} rows need a head width that is a multiple of {INT_BLOCK}, got {head_dim}; "
            "change --dim or --heads, or pick another --dtype"
        )


def value_bytes(head_dim: int, kind: str) -> int:
    """Bytes of a row's values: head_dim (int8) or head_dim // 2 (int4)."""
    return head_dim if kind == "int8" else head_dim // 2


def int_row_bytes(head_dim: int, kind: str) -> int:
    """Stored bytes per row: the value bytes, then two bytes per 32 values."""
    check_int_head_dim(head_dim, kind)
    return value_bytes(head_dim, kind) + SCALE_BYTES * (head_dim // INT_BLOCK)


def check_finite(x: np.ndarray, kind: str) -> None:
    """`IntRowError` naming the first row of `x` (n, d) that holds NaN or inf."""
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise IntRowError(r, f"holds {float(x[r, c])} at column {c}; {kind} rows must be finite (a NaN or inf spoils its whole 32-value block)")


def scale_words(x: np.ndarray, kind: str) -> np.ndarray:
    """The bfloat16 scale word of each 32-value block: (n, d) float32 -> (n, d // 32) uint16 (amax / QMAX, rounded up)."""
    n, d = x.shape
    amax = np.abs(x.reshape(n, d // INT_BLOCK, INT_BLOCK)).max(axis=2).astype(np.float32)
    scale = (amax / np.float32(QMAX[kind])).astype(np.float32)
    bits = scale.view(np.uint32).astype(np.uint64)
    words = ((bits + 0xFFFF) >> 16).astype(np.uint32)  # round up (positive values)
    return np.minimum(words, 0x7F7F).astype(np.uint16)  # never inf


def words_to_float32(words: np.ndarray) -> np.ndarray:
    """bfloat16 words -> float32 (exact)."""
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int_rows(x: np.ndarray, kind: str) -> np.ndarray:
    """float32 rows (n, head_dim) -> packed uint8 rows (n, int_row_bytes); `IntRowError` for a row that is not finite."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    check_int_head_dim(d, kind)
    check_finite(x, kind)
    words = scale_words(x, kind)
    scale = words_to_float32(words)
    q = np.zeros((n, d // INT_BLOCK, INT_BLOCK), dtype=np.float32)
    blocks = x.reshape(n, d // INT_BLOCK, INT_BLOCK)
    np.divide(blocks, scale[:, :, None], out=q, where=scale[:, :, None] > 0)
    qm = QMAX[kind]
    q = np.clip(np.rint(q), -qm, qm).astype(np.int8).reshape(n, d)
    return pack_int_rows(q, words, kind)


def head_dim_of(width: int, kind: str) -> int:
    """The head width of packed rows `width` bytes wide."""
    per32 = (INT_BLOCK if kind == "int8" else INT_BLOCK // 2) + SCALE_BYTES
    return width // per32 * INT_BLOCK


def unpack_values(packed: np.ndarray, head_dim: int, kind: str) -> np.ndarray:
    """The integer values q of packed rows: (..., width) uint8 -> (..., head_dim) int8."""
    packed = np.asarray(packed, dtype=np.uint8)
    vb = value_bytes(head_dim, kind)
    v = packed[..., :vb]
    if kind == "int8":
        return v.view(np.int8)
    out = np.empty((*v.shape[:-1], head_dim), dtype=np.int8)
    out[..., 0::2] = (v & np.uint8(0x0F)).astype(np.int8) - 8
    out[..., 1::2] = (v >> np.uint8(4)).astype(np.int8) - 8
    return out


def unpack_scales(packed: np.ndarray, head_dim: int, kind: str) -> np.ndarray:
    """The bfloat16 scale words of packed rows: (..., width) uint8 -> (..., head_dim // 32) uint16."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    return packed[..., value_bytes(head_dim, kind):].copy().view("<u2").astype(np.uint16)


def dequantize_int_rows(packed: np.ndarray, kind: str, head_dim: int | None = None) -> np.ndarray:
    """Packed rows (..., width) -> float32 (..., head_dim): float32(q) * bitcast(word << 16)."""
    packed = np.asarray(packed, dtype=np.uint8)
    d = head_dim if head_dim is not None else head_dim_of(packed.shape[-1], kind)
    if packed.shape[-1] != int_row_bytes(d, kind):
        raise StoreError(f"packed {kind} rows are {packed.shape[-1]} bytes wide, expected {int_row_bytes(d, kind)} for head width {d}")
    q = unpack_values(packed, d, kind).astype(np.float32)
    s = words_to_float32(unpack_scales(packed, d, kind))
    out = q.reshape(*q.shape[:-1], d // INT_BLOCK, INT_BLOCK) * s[..., None]
    return out.reshape(q.shape).astype(np.float32, copy=False)


def int_rows_problem(packed: np.ndarray, head_dim: int, kind: str) -> IntRowError | None:
    """The first problem of packed rows a store must not hold: a scale word that is NaN, inf or negative."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1, packed.shape[-1])
    words = unpack_scales(packed, head_dim, kind)
    bad = ((words & 0x7F80) == 0x7F80) | ((words & 0x8000) != 0)
    if bad.any():
        r, b = (int(v) for v in np.argwhere(bad)[0])
        return IntRowError(r, f"has scale word 0x{int(words[r, b]):04X} in block {b} (not a finite, non-negative bfloat16); {kind} scales must be finite and >= 0")
    return None


INT_LAYOUT = {
    "block": INT_BLOCK,
    "int8": "[int8 value bytes (head_dim) | bfloat16 scale words, little-endian (head_dim // 32)]",
    "int4": "[value bytes (head_dim // 2): value 2i = low nibble - 8, value 2i+1 = high nibble - 8 | bfloat16 scale words, little-endian (head_dim // 32)]",
    "dequantize": "float32(q) * bitcast_f32(uint32(scale_word) << 16)",
}


def pack_int_rows(q: np.ndarray, words: np.ndarray, kind: str) -> np.ndarray:
    """Integer values q (n, head_dim) int8 and scale words (n, head_dim // 32) uint16 -> packed uint8 rows."""
    q = np.asarray(q, dtype=np.int8)
    n, d = q.shape
    vb = value_bytes(d, kind)
    out = np.empty((n, vb + SCALE_BYTES * (d // INT_BLOCK)), dtype=np.uint8)
    if kind == "int8":
        out[:, :vb] = q.view(np.uint8)
    else:
        nib = (q.astype(np.int16) + 8).astype(np.uint8)
        out[:, :vb] = nib[:, 0::2] | (nib[:, 1::2] << np.uint8(4))
    out[:, vb:] = np.asarray(words, dtype=np.uint16).astype("<u2").view(np.uint8).reshape(n, -1)
    return out


def quantize_int_rows_keeping(x: np.ndarray, kind: str, words: np.ndarray | None) -> np.ndarray:
    """`quantize_int_rows`, except that a block keeps its given scale word where that scale reproduces
    the block's float32 values exactly (int rows dequantized, e.g. a reference-format export, coming back)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    packed = quantize_int_rows(x, kind)
    if words is None:
        return packed
    n, d = x.shape
    nb = d // INT_BLOCK
    words = np.asarray(words, dtype=np.uint16).reshape(n, nb)
    s = words_to_float32(words)
    q = np.zeros((n, nb, INT_BLOCK), dtype=np.float32)
    np.divide(x.reshape(n, nb, INT_BLOCK), s[:, :, None], out=q, where=s[:, :, None] > 0)
    qm = QMAX[kind]
    qi = np.clip(np.rint(q), -qm - 1, qm).astype(np.int8)
    given = pack_int_rows(qi.reshape(n, d), words, kind)
    back = dequantize_int_rows(given, kind, d)
    ok = (back.reshape(n, nb, INT_BLOCK).view(np.uint32) == x.reshape(n, nb, INT_BLOCK).view(np.uint32)).all(axis=2) & (int_rows_problem(given, d, kind) is None)
    if ok.any():
        mine, theirs = unpack_values(packed, d, kind).reshape(n, nb, INT_BLOCK), qi
        mine[ok] = theirs[ok]
        w = unpack_scales(packed, d, kind)
        w[ok] = words[ok]
        packed = pack_int_rows(mine.reshape(n, d), w, kind)
    return packed
