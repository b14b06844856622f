"""FP8 rows: the scale byte is exactly the smallest power of two that fits, within 1..254.

Independent route: the exact exponent is computed here in float64 (every float32 and
every power of two is exact there) by searching, not by the quantizer's log2; the value
bytes by torch's own float8 cast of `x / 2**e`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_cli.fp8 import FP8_BLOCK, FP8_MAX, dequantize_fp8_rows, quantize_fp8_rows

E_MIN, E_MAX = -126, 127  # scale bytes 1..254: the scale is a normal float32


def exact_exponent(amax: float) -> int:
    """The smallest e in [E_MIN, E_MAX] with amax / 2**e <= 448 (E_MIN for tiny or zero blocks)."""
    e = E_MIN
    while e < E_MAX and float(amax) / 2.0**e > FP8_MAX:
        e += 1
    return e


def expected_rows(x: np.ndarray) -> np.ndarray:
    n, d = x.shape
    blocks = x.reshape(n, d // FP8_BLOCK, FP8_BLOCK).astype(np.float64)
    e = np.array([[exact_exponent(a) for a in row] for row in np.abs(blocks).max(axis=2)], dtype=np.int64)
    scaled = (blocks / np.ldexp(1.0, e)[:, :, None]).astype(np.float32).reshape(n, d)  # exact: a power of two
    values = torch.from_numpy(scaled).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return np.concatenate([values, (e + 127).astype(np.uint8)], axis=1)


def edge_blocks() -> np.ndarray:
    """One 32-value block per row: amax at and around 448 * 2**k for every k, tiny and zero blocks."""
    rng = np.random.default_rng(7)
    amax = []
    for k in range(-160, 128):
        if 448 * 2.0**k > float(np.finfo(np.float32).max):
            continue
        at = np.float32(448 * 2.0**k)
        amax += [at, np.nextafter(at, np.float32(0)), np.nextafter(at, np.float32(np.inf))]
    amax += [np.float32(v) for v in (1e-45, 1e-40, 1e-38, 2.0**-126, 448 * 2.0**-126, 3e38, np.finfo(np.float32).max)]
    amax = np.array([a for a in amax if np.isfinite(a) and a > 0], dtype=np.float32)
    rows = rng.uniform(-1, 1, (amax.size, FP8_BLOCK)).astype(np.float32) * amax[:, None]
    rows[np.arange(amax.size), rng.integers(0, FP8_BLOCK, amax.size)] = amax * rng.choice(np.float32([-1, 1]), amax.size)
    return np.concatenate([rows, np.zeros((1, FP8_BLOCK), np.float32)])


def test_scale_bytes_are_the_exact_smallest_fit_within_1_to_254():
    x = edge_blocks()
    got = quantize_fp8_rows(x)
    scale = got[:, FP8_BLOCK]
    assert scale.min() >= 1 and scale.max() <= 254
    np.testing.assert_array_equal(got, expected_rows(x))


def test_tiny_and_zero_blocks_keep_the_smallest_normal_scale():
    """Blocks below 448 * 2**-126 (subnormal float32 among them) use scale byte 1, never 0 (a zero scale)."""
    x = np.zeros((4, 2 * FP8_BLOCK), np.float32)
    x[0, :FP8_BLOCK] = np.float32(1e-40)  # subnormal
    x[1, FP8_BLOCK:] = np.linspace(-2.0**-120, 2.0**-120, FP8_BLOCK, dtype=np.float32)
    x[2, 3] = np.float32(448 * 2.0**-127)
    packed = quantize_fp8_rows(x)
    np.testing.assert_array_equal(packed[:, -2:], np.ones((4, 2), np.uint8))
    back = dequantize_fp8_rows(packed)
    assert back[0, 0] > 0 and back[1, -1] > 0 and back[2, 3] == x[2, 3]  # not flushed to zero by a zero scale
    np.testing.assert_array_equal(back[3], 0)
    np.testing.assert_array_equal(packed, expected_rows(x))


@pytest.mark.parametrize("direction", [np.inf, -np.inf])
def test_a_log2_one_ulp_off_is_fixed_up_exactly(monkeypatch, direction):
    """The fix-ups make the scale exact when float log2 lands one ulp off (up: "smaller"; down: "too small")."""
    x = edge_blocks()
    want = quantize_fp8_rows(x)
    real = np.log2

    def off_by_one_ulp(v, *args, **kwargs):
        r = real(v, *args, **kwargs)
        return np.nextafter(r, np.asarray(direction, dtype=r.dtype)).astype(r.dtype)

    monkeypatch.setattr(np, "log2", off_by_one_ulp)
    got = quantize_fp8_rows(x)
    monkeypatch.undo()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, expected_rows(x))
