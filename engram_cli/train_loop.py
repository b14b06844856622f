"""The training loop of the reference model: batches of raw ids, dense AdamW, sparse table updates.

Dense weights use AdamW. Each Engram table stays outside the parameters (see
`model.MultiHeadEmbedding`): a batch's unique rows are gathered into a leaf tensor, and
`RowAdam` applies torch.optim.SparseAdam's update to exactly those rows, at 5x the base
learning rate with no weight decay (the paper's recipe), keeping moment state only for
rows that have had a gradient (allocated lazily, row by row). No dense gradient or
optimizer state of a table ever exists: memory beyond the tables is bounded by the rows
the batches touch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from engram_cli.model import EngramGPT

TABLE_LR_MULT = 5.0  # the paper: table Adam at 5x the base learning rate, no weight decay


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


def batch_inputs(model: EngramGPT, lookups: dict, tmap: TokenMap, window: np.ndarray, device="cpu"):
    """Model inputs, targets and per-layer row ids (by each layer's EngramLookup) for a (B, T+1) raw-id window."""
    x_raw, y_raw = window[:, :-1], window[:, 1:]
    rows = {l: lk.row_ids(torch.as_tensor(x_raw)).to(device) for l, lk in lookups.items() if l in model.cfg.engram_layers} or None
    x = torch.as_tensor(tmap.local(x_raw), device=device)
    y = torch.as_tensor(tmap.local(y_raw), device=device)
    return x, y, rows


class _RowState:
    """Adam moments of the rows of one table that have had a gradient; rows found by binary search.

    Slots are handed out in order of a row's first gradient and live in fixed blocks of
    BLOCK rows, so the state grows with the rows trained, without copies and with at
    most one partly used block.
    """

    BLOCK = 1 << 16

    def __init__(self, width: int, device):
        self.width, self.device = int(width), device
        self.ids = np.zeros(0, dtype=np.int64)  # sorted row ids with state
        self.slots = np.zeros(0, dtype=np.int64)  # their slots (slot s: block s // BLOCK, row s % BLOCK)
        self.exp_avg: list[torch.Tensor] = []
        self.exp_avg_sq: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.exp_avg + self.exp_avg_sq) + self.ids.nbytes + self.slots.nbytes

    def slots_for(self, rows: np.ndarray) -> np.ndarray:
        """Slots of the sorted unique `rows`, allocating zeroed state for rows seen the first time."""
        pos = np.searchsorted(self.ids, rows)
        found = np.zeros(rows.shape, dtype=bool)
        inside = pos < self.ids.size
        found[inside] = self.ids[pos[inside]] == rows[inside]
        new = rows[~found]
        if new.size:
            n = self.ids.size
            while len(self.exp_avg) * self.BLOCK < n + new.size:
                self.exp_avg.append(torch.zeros((self.BLOCK, self.width), device=self.device))
                self.exp_avg_sq.append(torch.zeros((self.BLOCK, self.width), device=self.device))
            self.ids = np.insert(self.ids, pos[~found], new)
            self.slots = np.insert(self.slots, pos[~found], np.arange(n, n + new.size))
            pos = np.searchsorted(self.ids, rows)
        return self.slots[pos]

    def _blocks(self, slots: np.ndarray):
        """(block index, positions in `slots`, rows in that block) for each block the slots use."""
        block = slots // self.BLOCK
        for k in np.unique(block):
            sel = np.flatnonzero(block == k)
            yield int(k), torch.as_tensor(sel, device=self.device), torch.as_tensor(slots[sel] % self.BLOCK, device=self.device)

    def get(self, slots: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.empty((slots.size, self.width), device=self.device)
        v = torch.empty((slots.size, self.width), device=self.device)
        for k, sel, off in self._blocks(slots):
            m[sel] = self.exp_avg[k][off]
            v[sel] = self.exp_avg_sq[k][off]
        return m, v

    def put(self, slots: np.ndarray, m: torch.Tensor, v: torch.Tensor) -> None:
        for k, sel, off in self._blocks(slots):
            self.exp_avg[k][off] = m[sel]
            self.exp_avg_sq[k][off] = v[sel]


class RowAdam:
    """torch.optim.SparseAdam's update for tables served by `MultiHeadEmbedding`, with lazy row-wise state.

    After `loss.backward()`, each memory's last forward holds (unique row ids, leaf rows
    with .grad); `step()` updates exactly those rows of the lookup's table in place, with
    the same operations in the same order as SparseAdam (tests/test_train.py checks the
    two agree), but its moment state holds only rows that have had a gradient, never a
    dense (rows, head_dim) tensor per table.
    """

    def __init__(self, memories: dict, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.memories, self.lr, self.betas, self.eps = memories, float(lr), betas, float(eps)
        self.state = {l: _RowState(m.head_dim, m.lookup.table.device) for l, m in memories.items()}
        self.steps = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: every forward gathers a fresh leaf, so no gradient carries over."""

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = self.betas
        step_size = self.lr * math.sqrt(1 - b2**self.steps) / (1 - b1**self.steps)
        for l, m in self.memories.items():
            if m.last is None or m.last[1].grad is None:
                continue
            uniq, leaf = m.last
            grad = leaf.grad  # (U, head_dim): one row per unique looked-up row
            st = self.state[l]
            slots = st.slots_for(uniq.cpu().numpy())
            old_m, old_v = st.get(slots)
            numer = grad.sub(old_m).mul_(1 - b1)
            upd_v = grad.pow(2).sub_(old_v).mul_(1 - b2)
            st.put(slots, old_m + numer, old_v + upd_v)
            numer.add_(old_m)
            denom = upd_v.add_(old_v).sqrt_().add_(self.eps)
            table = m.lookup.table
            table.index_add_(0, uniq.to(table.device), -step_size * numer.div_(denom))
            m.last = None

    def touched(self, layer_id: int) -> np.ndarray:
        """Sorted ids of the rows this optimizer has updated."""
        return self.state[layer_id].ids.copy()

    def state_bytes(self) -> int:
        """Bytes of moment state and row index, all tables."""
        return sum(s.nbytes for s in self.state.values())


def make_optimizers(model: EngramGPT, lr: float = 3e-3, weight_decay: float = 0.01) -> list:
    """AdamW for the dense weights; RowAdam (5x lr, no weight decay) for the tables."""
    opts = [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)]
    if model.memories():
        opts.append(RowAdam(model.memories(), lr=lr * TABLE_LR_MULT))
    return opts


def train_steps(model, lookups: dict, tmap, stream, *, steps: int, batch: int = 8, lr: float = 3e-3, seed: int = 0, device="cpu", on_step=None):
    """Run `steps` optimizer steps on random windows of `stream`; returns (per-step losses, optimizers).

    `lookups`: layer id -> EngramLookup, already attached to the model (`attach_tables`).
    `on_step(step, loss, tokens_per_s)` is called after each step.
    """
    rng = np.random.default_rng(seed)
    opts = make_optimizers(model, lr)
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x, y, rows = batch_inputs(model, lookups, tmap, sample_batch(stream, batch, model.cfg.block_size, rng), device)
        _, loss = model(x, rows, targets=y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1], (step + 1) * x.numel() / (time.perf_counter() - t0))
    return losses, opts
