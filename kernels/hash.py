"""Row ids of one layer: raw tokenizer ids (B, T) -> int64 (B, T, orders*K) rows (docs/spec.md "Hash").

- `RowHasher.reference`: the plain torch reference, one int64 mix per order and one
  `torch.remainder` (floor modulo) per head, exactly the spec's loop.
- `RowHasher.fast`: the fast CPU path. The compressed ids are padded once, each order's
  mix is the previous order's mix XOR one more product (computed once per order, not per
  head), and the floor modulo is done in float64 without any integer division
  (`floor_mod_exact`), written straight into the preallocated output, in chunks of
  positions that stay in cache.
- the Triton kernel (kernels/triton_lookup.py) computes the same ids on the device.

`floor_mod_exact` (why it is exact): the mix m is any int64. Split m = hi * 2^32 + lo with
hi = m >> 32 in [-2^31, 2^31) and lo in [0, 2^32) (both exact in float64). For a prime
p < 2^24, q = floor((hi + 0.5) / p) computed as floor((hi + 0.5) * (1/p)) in float64 is the
true quotient: (hi + 0.5) / p sits at least 0.5/p away from every integer, and the
float64 error of the product is at most |hi/p| * 2^-51 <= 2^-20/p. So r1 = hi - q*p is
hi's floor modulo, in [0, p). Then y = r1 * (2^32 mod p) + lo < 2^48 + 2^32 < 2^53 is
exact, congruent to m mod p, non-negative, and the same half-offset argument (error
<= |y/p| * 2^-51 < 2^-2/p) gives y mod p exactly. Primes >= 2^24 (more than 16.7 M rows
per head) take `torch.remainder` instead.
"""

from __future__ import annotations

import numpy as np
import torch

EXACT_FLOAT_PRIME_LIMIT = 1 << 24  # floor_mod_exact is exact for primes below this
CHUNK_POSITIONS = 1 << 16  # positions per chunk of the fast path (bounds its float64 temporaries: 16 MB at K = 8)


class ModConstants:
    """Per-head float64 constants of `floor_mod_exact` for a vector of primes."""

    def __init__(self, primes: torch.Tensor):
        self.primes = primes
        self.exact = bool(primes.numel() == 0 or int(primes.max()) < EXACT_FLOAT_PRIME_LIMIT)
        self.p = primes.double()
        self.inv = 1.0 / self.p
        self.neg_p = -self.p
        self.c32 = torch.remainder(torch.full_like(primes, 1 << 32), primes).double()
        self.half_c32 = 0.5 - 0.5 * self.c32  # (r + 0.5) * c32 + lo + half_c32 = r * c32 + lo + 0.5


def floor_mod_exact(mix: torch.Tensor, k: ModConstants, add: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[..., j] = floor_mod(mix, p_j) + add[j] for int64 `mix` (...,), with no integer division.

    `out` is an int64 view (..., K) (a slice of a larger tensor is fine); `add` the int64
    per-head offsets. Exact for every int64 mix and primes < 2^24 (module docstring).
    """
    if not k.exact:
        torch.remainder(mix[..., None], k.primes, out=out)
        return out.add_(add)
    hi = (mix >> 32).double().add_(0.5)[..., None]  # (..., 1): hi + 0.5
    lo = (mix & 0xFFFFFFFF).double()[..., None]
    q = torch.mul(hi, k.inv)  # (..., K), then in place: no broadcasting fused ops (addcmul is slow here)
    q.floor_()
    y = q.mul_(k.neg_p).add_(hi)  # hi mod p, + 0.5
    y.mul_(k.c32).add_(lo).add_(k.half_c32)  # (hi mod p) * c32 + lo, + 0.5
    q = torch.mul(y, k.inv)
    q.floor_()
    y.add_(q.mul_(k.neg_p))  # y mod p, + 0.5
    y.add_(add.double().sub_(0.5))
    out.copy_(y)
    return out


class RowHasher:
    """The hash constants of one layer on one device, and its row-id paths."""

    def __init__(self, plan, lookup, layer_id: int, device):
        self.plan, self.layer_id = plan, int(layer_id)
        self.device = torch.device(device)
        self.orders = plan.orders
        self.K = plan.heads
        self.pad = int(plan.compressed_pad_id)
        self.max_n = plan.max_ngram_size
        self.lookup_ids = torch.from_numpy(np.asarray(lookup, dtype=np.int64)).to(self.device)
        self.mult = torch.tensor([int(m) for m in plan.multipliers[self.layer_id]], dtype=torch.int64, device=self.device)
        self.primes = torch.from_numpy(np.asarray(plan.head_primes(self.layer_id), dtype=np.int64)).to(self.device)
        self.offsets = torch.from_numpy(np.asarray(plan.row_offsets(self.layer_id), dtype=np.int64)).to(self.device)
        # per head: its order n (the Triton kernel mixes per head)
        self.head_order = torch.tensor([n for n in self.orders for _ in range(self.K)], dtype=torch.int64, device=self.device)
        self._mods = [ModConstants(self.primes[i * self.K : (i + 1) * self.K]) for i in range(len(self.orders))]

    @property
    def heads(self) -> int:
        return len(self.orders) * self.K

    @property
    def vocab_size(self) -> int:
        return int(self.lookup_ids.shape[0])

    def compress(self, ids: torch.Tensor) -> torch.Tensor:
        """Raw ids -> compressed ids; negative ids pass through (docs/spec.md, "Ids outside the
        vocabulary"; ids >= the vocabulary size are refused before this, by EngramLookup)."""
        return torch.where(ids >= 0, self.lookup_ids[ids.clamp(min=0)], ids)

    def reference(self, ids: torch.Tensor) -> torch.Tensor:
        """The spec's loop in plain torch: shifts, one mix per order, one floor modulo per head."""
        x = self.compress(ids)
        T = x.shape[1]
        shifts = [x]
        for k in range(1, self.max_n):
            s = torch.full_like(x, self.pad)
            if k < T:
                s[:, k:] = x[:, : T - k]
            shifts.append(s)
        cols, h = [], 0
        for n in self.orders:
            mix = shifts[0] * self.mult[0]
            for k in range(1, n):
                mix = torch.bitwise_xor(mix, shifts[k] * self.mult[k])
            for _ in range(self.K):
                cols.append(torch.remainder(mix, self.primes[h]) + self.offsets[h])  # floor modulo
                h += 1
        return torch.stack(cols, dim=2)

    def fast(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The same ids as `reference`: incremental mixes, division-free exact floor modulo, one output."""
        B, T = ids.shape
        N, K = self.max_n, self.K
        if out is None:
            out = torch.empty((B, T, self.heads), dtype=torch.int64, device=ids.device)
        xp = torch.full((B, T + N - 1), self.pad, dtype=torch.int64, device=ids.device)
        xp[:, N - 1 :] = self.compress(ids)
        step = max(1, CHUNK_POSITIONS // max(1, T)) if T < CHUNK_POSITIONS else 1
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            for t0 in range(0, T, CHUNK_POSITIONS):
                t1 = min(T, t0 + CHUNK_POSITIONS)
                o = N - 1 + t0
                mix = xp[b0:b1, o : o + t1 - t0] * self.mult[0]
                for k in range(1, N):
                    mix ^= xp[b0:b1, o - k : o - k + t1 - t0] * self.mult[k]
                    n = k + 1
                    if n in self.orders:
                        i = n - self.orders[0]
                        floor_mod_exact(mix, self._mods[i], self.offsets[i * K : (i + 1) * K], out[b0:b1, t0:t1, i * K : (i + 1) * K])
        return out
