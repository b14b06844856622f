"""FP8 table rows: float8 e4m3 values with one ue8m0 scale byte per 32 values.

The layout vLLM's DeepSeek-V4.1 Engram tables use (docs/spec.md, "FP8 rows"). A stored
row of a `head_dim`-wide table is `head_dim + head_dim // 32` bytes:

    [ e4m3 value bytes (head_dim) | ue8m0 scale bytes (head_dim // 32) ]

Block b of a row (values 32*b .. 32*b+31) has scale `2 ** (scale_byte[b] - 127)`.
Dequantization is defined bit-exactly as one float32 multiply, which every backend
(numpy here, torch and Triton in `engram_cli.kernels`) performs identically:

    value_f32 = float32(e4m3 byte) * bitcast_f32(uint32(scale_byte) << 23)

Quantization picks the smallest power-of-two scale that brings the block's absolute
maximum within e4m3's range (448), `e = ceil(log2(amax / 448))` clipped to
[-126, 127] (so the scale byte is in 1..254 and the scale a normal float32), then
rounds `x / 2**e` to e4m3 (round to nearest even, torch's cast).

What a store may hold (checked on every write, `fp8_rows_problem`): finite values only
(a NaN or inf would turn its 31 block neighbours into garbage: `quantize_fp8_rows`
refuses the row, `FP8RowError`), no e4m3 NaN byte (0x7F, 0xFF), and scale bytes in
1..254. ue8m0 gives byte 0 the scale 2**-127 and byte 255 NaN, where the bit-cast above
gives 0.0 and inf; the quantizer never writes either, and rows that carry them (an
imported file) are refused, so the bit-cast is exactly ue8m0 on every byte a store holds.
"""

from __future__ import annotations

import numpy as np

from engram_cli.errors import PlanError, StoreError

# torch (the e4m3 cast) is imported inside the two functions that cast: store.format
# imports this module, and the plan, the store reader and the scale-out map tasks that
# import it never cast, so they do not pay torch's ~1 s import.

FP8_BLOCK = 32  # values per scale byte
FP8_MAX = 448.0  # largest finite e4m3fn value
_SCALE_BIAS = 127


class FP8RowError(StoreError):
    """A row that cannot be stored as FP8: `row` is its index in the block given, `what` the problem."""

    def __init__(self, row: int, what: str):
        self.row, self.what = int(row), what
        super().__init__(f"row {self.row} {what}")


E4M3_NAN_BYTES = (0x7F, 0xFF)
SCALE_BYTES_STORED = (1, 254)  # the scale bytes a store holds (ue8m0 0 = 2**-127 and 255 = NaN are refused)


def check_finite_rows(x: np.ndarray) -> None:
    """`FP8RowError` naming the first row of `x` (n, d) that holds NaN or inf."""
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        raise FP8RowError(r, f"holds {float(x[r, c])} at column {c}; FP8 rows must be finite (a NaN or inf spoils its whole 32-value block)")


def fp8_rows_problem(packed: np.ndarray, head_dim: int) -> FP8RowError | None:
    """The first problem of packed rows a store must not hold: an e4m3 NaN value byte, a scale byte 0 or 255."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1, packed.shape[-1])
    values, scales = packed[:, :head_dim], packed[:, head_dim:]
    bad = (values == E4M3_NAN_BYTES[0]) | (values == E4M3_NAN_BYTES[1])
    if bad.any():
        r, c = (int(v) for v in np.argwhere(bad)[0])
        return FP8RowError(r, f"holds the e4m3 NaN byte 0x{int(values[r, c]):02X} at column {c}; FP8 rows must be finite")
    lo, hi = SCALE_BYTES_STORED
    bad = (scales < lo) | (scales > hi)
    if bad.any():
        r, b = (int(v) for v in np.argwhere(bad)[0])
        byte = int(scales[r, b])
        meaning = "2**-127, below what the spec's quantizer writes" if byte == 0 else "NaN in ue8m0"
        return FP8RowError(r, f"has scale byte {byte} ({meaning}) in block {b}; FP8 scale bytes must be in {lo}..{hi}")
    return None


def fp8_row_bytes(head_dim: int) -> int:
    """Stored bytes per row: head_dim value bytes + head_dim // 32 scale bytes."""
    check_fp8_head_dim(head_dim)
    return head_dim + head_dim // FP8_BLOCK


def check_fp8_head_dim(head_dim: int) -> None:
    if head_dim <= 0 or head_dim % FP8_BLOCK:
        raise PlanError(
            f"float8_e4m3 rows need a head width that is a multiple of {FP8_BLOCK}, got {head_dim}; "
            f"change --dim or --heads, or pick another --dtype"
        )


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn bytes (NaN for 0x7F and 0xFF)."""
    import torch  # lazily: the build and its Ray map tasks use fp8 through the store and never pay torch's ~1 s import

    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


_E4M3_TO_F32: np.ndarray | None = None


def e4m3_to_float32_table() -> np.ndarray:
    """The 256-entry lookup table byte -> float32 (computed once, by torch's own cast)."""
    global _E4M3_TO_F32
    if _E4M3_TO_F32 is None:
        _E4M3_TO_F32 = _e4m3_table()
    return _E4M3_TO_F32


def scale_bytes_to_float32(scale_bytes: np.ndarray) -> np.ndarray:
    """ue8m0 bytes -> float32 scales, by bit-casting `byte << 23` (byte 0 -> 0.0)."""
    return (np.asarray(scale_bytes, dtype=np.uint8).astype(np.uint32) << np.uint32(23)).view(np.float32)


def fp8_scale_bytes(x: np.ndarray) -> np.ndarray:
    """The spec's ue8m0 scale byte of each 32-value block of float32 rows: (n, head_dim) -> (n, head_dim // 32) uint8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    check_fp8_head_dim(d)
    amax = np.abs(x.reshape(n, d // FP8_BLOCK, FP8_BLOCK)).max(axis=2)  # (n, d/32)
    with np.errstate(divide="ignore"):
        e = np.ceil(np.log2(amax / np.float32(FP8_MAX)))
    e = np.nan_to_num(e, nan=-126.0, neginf=-126.0, posinf=127.0)
    e = np.clip(e, -126, 127).astype(np.int32)
    # log2 in float can land one off at exact powers of two: fix up exactly.
    scale = np.ldexp(np.float32(1), e).astype(np.float32)
    too_small = amax / scale > FP8_MAX
    e = np.where(too_small & (e < 127), e + 1, e)
    smaller = (e > -126) & (amax / np.ldexp(np.float32(1), e - 1).astype(np.float32) <= FP8_MAX)
    e = np.where(smaller, e - 1, e)
    return (e + _SCALE_BIAS).astype(np.uint8)


def pack_fp8_rows(x: np.ndarray, scale_bytes: np.ndarray) -> np.ndarray:
    """float32 rows (n, head_dim) with given ue8m0 scale bytes (n, head_dim // 32) -> packed uint8 rows.

    Each value is `x * 2**(127 - scale_byte)` (exact: a power of two) rounded to e4m3
    (nearest even, torch's cast); the scale bytes follow the values unchanged.
    """
    import torch  # lazily, as in _e4m3_table

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    check_fp8_head_dim(d)
    scale_bytes = np.asarray(scale_bytes, dtype=np.uint8)
    inv = np.ldexp(np.float32(1), _SCALE_BIAS - scale_bytes.astype(np.int32)).astype(np.float32)  # exact power of two
    with np.errstate(over="ignore", invalid="ignore"):  # byte 0 (never chosen by fp8_scale_bytes) overflows to inf
        scaled = x.reshape(n, d // FP8_BLOCK, FP8_BLOCK) * inv[:, :, None]
    values = torch.from_numpy(np.ascontiguousarray(scaled.reshape(n, d))).to(torch.float8_e4m3fn)
    out = np.empty((n, d + d // FP8_BLOCK), dtype=np.uint8)
    out[:, :d] = values.view(torch.uint8).numpy()
    out[:, d:] = scale_bytes
    return out


def quantize_fp8_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows (n, head_dim) -> packed uint8 rows (n, head_dim + head_dim // 32), the spec's scales.

    `FP8RowError` naming the first row that holds NaN or inf (`check_finite_rows`).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_finite_rows(x)
    return pack_fp8_rows(x, fp8_scale_bytes(x))


def quantize_fp8_rows_keeping(x: np.ndarray, scale_bytes: np.ndarray | None) -> np.ndarray:
    """`quantize_fp8_rows`, except that a block keeps its given scale byte where that scale
    reproduces the block's float32 values exactly (FP8 rows dequantized and coming back).

    scale_bytes: (n, head_dim // 32) uint8 or None (then exactly `quantize_fp8_rows`);
    a byte 0 (scale 0.0) never reproduces a block.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    packed = quantize_fp8_rows(x)
    if scale_bytes is None:
        return packed
    n, d = x.shape
    nb = d // FP8_BLOCK
    sb = np.asarray(scale_bytes, dtype=np.uint8)
    given = pack_fp8_rows(x, sb)
    back = dequantize_fp8_rows(given, d)
    ok = (back.reshape(n, nb, FP8_BLOCK).view(np.uint32) == x.reshape(n, nb, FP8_BLOCK).view(np.uint32)).all(axis=2) & (sb > 0)
    vals = packed[:, :d].reshape(n, nb, FP8_BLOCK)
    vals[ok] = given[:, :d].reshape(n, nb, FP8_BLOCK)[ok]
    packed[:, d:][ok] = sb[ok]
    return packed


def dequantize_fp8_rows(packed: np.ndarray, head_dim: int | None = None) -> np.ndarray:
    """Packed uint8 rows (n, head_dim + head_dim // 32) -> float32 rows (n, head_dim)."""
    packed = np.asarray(packed, dtype=np.uint8)
    width = packed.shape[-1]
    d = head_dim if head_dim is not None else width * FP8_BLOCK // (FP8_BLOCK + 1)
    if width != fp8_row_bytes(d):
        raise StoreError(f"packed fp8 rows are {width} bytes wide, expected {fp8_row_bytes(d)} for head width {d}")
    values = e4m3_to_float32_table()[packed[..., :d]]  # (..., d) float32
    scales = scale_bytes_to_float32(packed[..., d:])  # (..., d/32)
    out = values.reshape(*values.shape[:-1], d // FP8_BLOCK, FP8_BLOCK) * scales[..., None]
    return out.reshape(values.shape).astype(np.float32, copy=False)
