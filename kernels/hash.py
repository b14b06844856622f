"""Row ids of one layer: raw tokenizer ids (B, T) -> int64 (B, T, orders*K) rows (docs/spec.md "Hash").

- `RowHasher.reference`: the plain torch reference, one int64 mix per order and one
  `torch.remainder` (floor modulo) per head, exactly the spec's loop.
- `RowHasher.fast`: the fast CPU path, kernels/cpu.py's fused numba kernel: every head of
  every order in one pass over the positions, on both cores, written straight into the
  output (the exactness of its division-free floor modulo is argued there).
- the Triton kernel (kernels/triton_lookup.py) computes the same ids on the device.

Ids follow docs/spec.md "Ids outside the vocabulary": negative ids pass through
compression (`compress`); ids >= the vocabulary size are refused by EngramLookup first.
"""

from __future__ import annotations

import numpy as np
import torch

from engram_cli.kernels.cpu import hash_constants, row_ids_into


class RowHasher:
    """The hash constants of one layer on one device, and its row-id paths."""

    def __init__(self, plan, lookup, layer_id: int, device):
        self.plan, self.layer_id = plan, int(layer_id)
        self.device = torch.device(device)
        self.orders = plan.orders
        self.K = plan.heads
        self.pad = int(plan.compressed_pad_id)
        self.max_n = plan.max_ngram_size
        # the constants on the host (what the CPU kernel reads), and as torch tensors on `device`
        self.host = {
            "lookup": np.ascontiguousarray(lookup, dtype=np.int64),
            "mult": np.array([int(m) for m in plan.multipliers[self.layer_id]], dtype=np.int64),
            "primes": np.ascontiguousarray(plan.head_primes(self.layer_id), dtype=np.int64),
            "offsets": np.ascontiguousarray(plan.row_offsets(self.layer_id), dtype=np.int64),
            # per head: its order n (the Triton and CPU kernels mix per head)
            "head_order": np.array([n for n in self.orders for _ in range(self.K)], dtype=np.int64),
        }
        h = self.host
        self.cpu_constants = hash_constants(h["lookup"], self.pad, h["mult"], h["primes"], h["offsets"], h["head_order"])
        t = {k: torch.from_numpy(v).to(self.device) for k, v in self.host.items()}
        self.lookup_ids, self.mult, self.primes, self.offsets, self.head_order = (
            t["lookup"], t["mult"], t["primes"], t["offsets"], t["head_order"])

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
        """The same ids as `reference`, by the fused CPU kernel (kernels/cpu.py), into `out` when given
        (ids on another device are hashed on the host and the result moved back)."""
        B, T = ids.shape
        if ids.device.type != "cpu":
            res = self.fast(ids.cpu())
            return res.to(ids.device) if out is None else out.copy_(res)
        if out is None:
            out = torch.empty((B, T, self.heads), dtype=torch.int64)
        row_ids_into(ids.contiguous().numpy(), self.cpu_constants, out.view(B * T, self.heads).numpy())
        return out
