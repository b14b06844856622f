"""Statistics of the training split only: n-gram counts and row hits saved beside the checkpoint, and eval's figures from them.

`engram train` counts, over the training token stream it trained on (the training
documents concatenated, as the batches sample it; one sequence, padded at its start as
the lookup pads a window), every order's n-grams (compressed ids) and every Engram
layer's row hits (each position's rows, all heads). They go to `NAME.train-stats.npz`
beside the checkpoint (plain arrays: loads with `allow_pickle=False`). Held-out
documents are not in that stream, so a held-out n-gram that training never saw has
count 0 here (tests/test_split.py counts them independently).

Eval's figures from them (`training_figures`), per layer and order: the mean gate and
the mean loss change when the branch is skipped, by the n-gram's training count
(bucket 0 = never seen in training, then log2-spaced bins [1, 2), [2, 4), ...) and by
the n-gram's share of its row's training hits (the best head of the order:
count / row hits; 1 = the row's training hits are all this n-gram's), and the hot-row
cache hit rates by training hits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from engram_cli.hashing import shift_k
from engram_cli.model import table_lookup
from engram_cli.ngrams import token_columns

STATS_SUFFIX = ".train-stats.npz"
SHARE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)  # share buckets: unseen (count 0), (0, .25], (.25, .5], (.5, .75], (.75, 1), exactly 1
CACHE_SHARES = (0.01, 0.05, 0.10)


def stats_path(checkpoint) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".ckpt").removesuffix(".safetensors") + STATS_SUFFIX)


def position_ngrams(c: np.ndarray, order: int, pad: int) -> np.ndarray:
    """(N*T, order) uint32: the order-n n-gram ending at each position of compressed ids `c` (N, T), each row padded at its start."""
    return np.stack([shift_k(c, order - 1 - i, pad).ravel() for i in range(order)], -1).astype(np.uint32)


def count_training(plan, vocab, train_ids: np.ndarray, layers) -> dict:
    """{"ngrams_n", "counts_n"} per order and {"rows_l", "hits_l"} per layer over the training stream (one sequence)."""
    c = np.asarray(vocab.lookup)[np.asarray(train_ids, dtype=np.int64)][None]
    out = {}
    for n in plan.orders:
        grams, counts = np.unique(position_ngrams(c, n, plan.compressed_pad_id), axis=0, return_counts=True)
        out[f"ngrams_{n}"], out[f"counts_{n}"] = grams, counts.astype(np.int64)
    for l in layers:
        ids = np.asarray(table_lookup(plan, vocab, l).row_ids(torch.as_tensor(np.asarray(train_ids, dtype=np.int64)[None])))
        rows, hits = np.unique(ids, return_counts=True)
        out[f"rows_{l}"], out[f"hits_{l}"] = rows.astype(np.int64), hits.astype(np.int64)
    return out


def save_stats(path, stats: dict) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez(tmp, **stats)
    tmp.replace(path)
    return path


def load_stats(checkpoint) -> dict | None:
    """The training statistics beside `checkpoint`, or None (a checkpoint made before them, or the file is gone)."""
    p = stats_path(checkpoint)
    if not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def training_counts(stats: dict, grams: np.ndarray) -> np.ndarray:
    """Training count of each n-gram row of `grams` (M, n), 0 for one never seen in training."""
    n = grams.shape[1]
    cols = token_columns(n)
    table = pl.DataFrame({**{name: stats[f"ngrams_{n}"][:, i] for i, name in enumerate(cols)}, "count": stats[f"counts_{n}"]})
    pos = pl.DataFrame({name: grams[:, i] for i, name in enumerate(cols)}).with_row_index("i")
    got = pos.join(table, on=cols, how="left").sort("i")["count"].fill_null(0)
    return got.to_numpy().astype(np.int64)


def row_hits(stats: dict, layer_id: int, rows: np.ndarray) -> np.ndarray:
    """Training hits of each row id in `rows` (any shape), 0 for rows training never looked up."""
    ids, hits = stats[f"rows_{layer_id}"], stats[f"hits_{layer_id}"]
    if ids.size == 0:
        return np.zeros(rows.shape, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ids, rows), ids.size - 1)
    return np.where(ids[pos] == rows, hits[pos], 0)


def _bucket(mask_of: list, gate: np.ndarray, dloss: np.ndarray) -> list:
    return [{**info, "positions": int(m.sum()), "gate_mean": float(gate[m].mean()) if m.any() else None,
             "loss_change": float(dloss[m].mean()) if m.any() else None} for info, m in mask_of]


def training_figures(stats: dict, plan, vocab, layer_id: int, x_raw: np.ndarray, rows: np.ndarray, gate: np.ndarray, dloss: np.ndarray) -> dict:
    """Gate and loss change (branch skipped - full, per position) by training count and by share of the row's training hits, per order; cache hit rates."""
    c = np.asarray(vocab.lookup)[x_raw]
    K = plan.heads
    by_count, by_share = {}, {}
    for i, n in enumerate(plan.orders):
        count = training_counts(stats, position_ngrams(c, n, plan.compressed_pad_id))
        top = int(count.max()).bit_length() if count.size else 0
        bins = [({"min_count": 0, "max_count": 0}, count == 0)]
        bins += [({"min_count": 1 << k, "max_count": (1 << (k + 1)) - 1}, (count >= 1 << k) & (count < 1 << (k + 1))) for k in range(top)]
        by_count[str(n)] = _bucket(bins, gate, dloss)
        h = row_hits(stats, layer_id, rows[:, i * K : (i + 1) * K])
        share = np.where(h > 0, count[:, None] / np.maximum(h, 1), 0.0).max(1)
        e = SHARE_EDGES
        masks = [({"share": "unseen"}, count == 0)]
        masks += [({"share": f"({a:g}, {b:g}]" if b < 1 else f"({a:g}, 1)"}, (count > 0) & (share > a) & ((share <= b) if b < 1 else (share < 1)))
                  for a, b in zip(e[:-1], e[1:])]
        masks.append(({"share": "1"}, (count > 0) & (share >= 1)))
        by_share[str(n)] = _bucket(masks, gate, dloss)
    ids, hits = stats[f"rows_{layer_id}"], stats[f"hits_{layer_id}"]
    flat = rows.ravel()
    rates = {}
    n_rows = plan.layer_rows(layer_id)
    for s in CACHE_SHARES:
        cap = max(1, int(s * n_rows))
        hot = np.sort(ids[np.argsort(-hits, kind="stable")[:cap]])
        pos = np.minimum(np.searchsorted(hot, flat), max(hot.size - 1, 0))
        rates[f"{s:.0%}"] = float((hot[pos] == flat).mean()) if hot.size else 0.0
    return {"by_training_count": by_count, "by_row_share": by_share, "cache_hit_rate": rates}
