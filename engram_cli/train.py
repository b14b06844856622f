"""Training the reference model: held-out split, batches of raw ids, sparse table updates.

Dense weights use AdamW; each Engram table is an `nn.Embedding(sparse=True)` trained by
`torch.optim.SparseAdam` at 5x the base learning rate with no weight decay (the paper's
recipe), so optimizer state is only allocated for the rows a batch touches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from engram_cli.model import EngramGPT, row_ids_for

TABLE_LR_MULT = 5.0  # the paper: table Adam at 5x the base learning rate, no weight decay


def is_heldout(doc_key: str, share: float = 0.1, seed: int = 0) -> bool:
    """Deterministic held-out membership by a hash of the document key (index or path)."""
    return xxhash.xxh64_intdigest(doc_key.encode(), seed=seed) % 10_000 < int(share * 10_000)


@dataclass
class TokenMap:
    """Output ids cover only the tokenizer ids the corpus uses; id 0 is reserved for unknown."""

    used: np.ndarray  # sorted raw tokenizer ids

    @classmethod
    def from_ids(cls, ids: np.ndarray) -> "TokenMap":
        return cls(np.unique(np.asarray(ids, dtype=np.int64)))

    @property
    def size(self) -> int:
        return len(self.used) + 1

    def local(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.int64)
        pos = np.searchsorted(self.used, raw)
        pos_c = np.minimum(pos, len(self.used) - 1)
        return np.where(self.used[pos_c] == raw, pos_c + 1, 0)


def sample_batch(stream: np.ndarray, batch: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, block+1) raw-id windows from a 1-D token stream."""
    starts = rng.integers(0, len(stream) - block - 1, size=batch)
    return np.stack([stream[s : s + block + 1] for s in starts])


def batch_inputs(model: EngramGPT, plan, vocab, tmap: TokenMap, window: np.ndarray, device="cpu"):
    """Model inputs, targets and per-layer row ids for a (B, T+1) raw-id window."""
    x_raw, y_raw = window[:, :-1], window[:, 1:]
    rows = None
    if plan is not None and model.cfg.engram_layers:
        rows = {l: torch.as_tensor(row_ids_for(plan, vocab, l, x_raw), device=device) for l in model.cfg.engram_layers}
    x = torch.as_tensor(tmap.local(x_raw), device=device)
    y = torch.as_tensor(tmap.local(y_raw), device=device)
    return x, y, rows


def make_optimizers(model: EngramGPT, lr: float = 3e-3, weight_decay: float = 0.01):
    opts = [torch.optim.AdamW(model.dense_parameters(), lr=lr, weight_decay=weight_decay)]
    tables = model.table_parameters()
    if tables:
        opts.append(torch.optim.SparseAdam(tables, lr=lr * TABLE_LR_MULT))
    return opts


def train_steps(model, plan, vocab, tmap, stream, *, steps: int, batch: int = 8, lr: float = 3e-3, seed: int = 0, on_step=None) -> list[float]:
    """Run `steps` optimizer steps on random windows of `stream`; returns the per-step losses."""
    rng = np.random.default_rng(seed)
    opts = make_optimizers(model, lr)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x, y, rows = batch_inputs(model, plan, vocab, tmap, sample_batch(stream, batch, model.cfg.block_size, rng))
        _, loss = model(x, rows, targets=y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1], (step + 1) * x.numel() / (time.perf_counter() - t0))
    return losses
