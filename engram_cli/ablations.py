"""Ablations of the Engram tables on the same trained weights: per-window held-out losses with rows swapped per lookup.

Each ablation changes only where a looked-up row comes from, row by row, so memory
follows the held-out text, never the table (docs/eval.md, "Ablations"):

- `branch_skipped`: every Engram branch's output is skipped (the residual stream passes unchanged);
- `initial_rows`: each looked-up row is read from the initial store training started from
  (`extra.initial_tables`), at the same row id;
- `shuffled_rows`: each row id is mapped by a fixed permutation of its head's rows
  (`shuffle_row_ids`: an affine map modulo the head's prime size, seeded), and that row
  of the trained table is read;
- `mean_row`: every lookup reads the layer table's mean row (`table_mean_row`, streamed
  over the table in blocks of chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engram_cli.model import table_lookup
from engram_cli.store import from_storage

ABLATIONS = ("branch_skipped", "initial_rows", "shuffled_rows", "mean_row")
SHUFFLE_SEED = 0
MULT_BITS = 22  # shuffle multipliers below 2**22: a * (row < 2**40) stays in int64
MEAN_BLOCK_ROWS = 1 << 18  # rows per block of the mean-row pass (whole chunks)


def shuffle_row_ids(plan, layer_id: int, rows: np.ndarray, seed: int = SHUFFLE_SEED) -> np.ndarray:
    """Row ids (..., H) mapped within each head: local -> (a*local + b) mod p, a permutation since p is prime and 0 < a < p.

    Head h (the last axis, order-major as the lookup emits them) owns rows
    [offset_h, offset_h + p_h); a and b per head come from `seed` and the layer id.
    """
    primes = plan.head_primes(layer_id)
    offsets = plan.row_offsets(layer_id)
    rng = np.random.default_rng([int(seed), int(layer_id)])
    a = np.array([rng.integers(1, min(int(p), 1 << MULT_BITS)) if p > 1 else 1 for p in primes], dtype=np.int64)
    b = np.array([rng.integers(0, int(p)) for p in primes], dtype=np.int64)
    local = np.asarray(rows, dtype=np.int64) - offsets
    return (a * local + b) % primes + offsets


def table_mean_row(store, layer_id: int) -> np.ndarray:
    """The mean of every row of a layer's table (float32, (head_dim,)), read in blocks of whole chunks."""
    n = store.table(layer_id).shape[0]
    step = max(store.chunk_rows, MEAN_BLOCK_ROWS // store.chunk_rows * store.chunk_rows)
    total = np.zeros(store.head_dim, dtype=np.float64)
    for a in range(0, n, step):
        block = np.asarray(from_storage(store.load_layer(layer_id, rows=(a, min(n, a + step))), store.dtype), dtype=np.float32)
        total += block.sum(0, dtype=np.float64)
    return (total / max(n, 1)).astype(np.float32)


@dataclass
class RowSource:
    """Where one variant's rows come from, per layer: a lookup over a subset of rows, its row ids, and the per-position ids."""

    lookups: dict  # layer -> EngramLookup over the subset's rows
    subsets: dict  # layer -> sorted unique global row ids the lookup holds
    row_ids: dict  # layer -> (N, T, H) int64 row ids of every held-out position


def row_source(plan, vocab, row_ids: dict, read_rows) -> RowSource:
    """A variant that reads `read_rows(layer, uniq)` (float32 (U, head_dim)) at the positions' `row_ids`."""
    lookups, subsets = {}, {}
    for l, r in row_ids.items():
        uniq = np.unique(r)
        lookups[l], subsets[l] = table_lookup(plan, vocab, l, read_rows(l, uniq)), uniq
    return RowSource(lookups, subsets, row_ids)


def mean_source(plan, vocab, row_ids: dict, store) -> RowSource:
    """Every position of every layer reads that layer's mean row (a one-row table)."""
    lookups = {l: table_lookup(plan, vocab, l, torch.as_tensor(table_mean_row(store, l))[None]) for l in row_ids}
    zeros = {l: np.zeros(r.shape, dtype=np.int64) for l, r in row_ids.items()}
    return RowSource(lookups, {l: np.zeros(1, dtype=np.int64) for l in row_ids}, zeros)


def window_losses(model, tmap, W: np.ndarray, sources: dict, *, batch: int, ablate_branch: bool, gates: dict | None = None, positions: dict | None = None,
                  progress=None, name="") -> dict:
    """Mean cross-entropy per window (N,) float64 of each variant: `sources` (name -> RowSource, "full" first) and the skipped branch.

    `gates`: layer -> list, filled with the full model's gate per position. `positions`
    (a dict) is filled with the per-position cross-entropy (N, T) of "full" and "branch_skipped".
    """
    layers = list(model.cfg.engram_layers)
    names = list(sources) + (["branch_skipped"] if ablate_branch else [])
    out = {k: np.zeros(len(W), dtype=np.float64) for k in names}
    if positions is not None:
        positions.update({k: np.zeros((len(W), W.shape[1] - 1), dtype=np.float32) for k in ("full", "branch_skipped") if k in names})
    mems, engrams = model.memories(), model.engrams()
    with torch.no_grad():
        if progress is not None:  # the stage begins here (the stages before it have ended)
            progress("eval", 0, len(W), name)
        for s in range(0, len(W), batch):
            win = W[s : s + batch]
            x = torch.as_tensor(tmap.local(win[:, :-1]))
            y = torch.as_tensor(tmap.local(win[:, 1:]))
            for k in names:
                src = sources.get(k)
                rows = None
                if src is not None and layers:
                    for l in layers:
                        mems[l].attach(src.lookups[l], row_ids=src.subsets[l])
                    rows = {l: torch.as_tensor(src.row_ids[l][s : s + batch]) for l in layers}
                logits = model(x, rows, ablate=k == "branch_skipped")
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
                out[k][s : s + len(win)] = nll.double().mean(1).numpy()
                if positions is not None and k in positions:
                    positions[k][s : s + len(win)] = nll.numpy()
                if k == "full" and gates is not None:
                    for l in layers:
                        gates[l].append(engrams[l].gate.numpy().ravel())
            if progress is not None:
                progress("eval", min(s + batch, len(W)), len(W), name)
    return out
