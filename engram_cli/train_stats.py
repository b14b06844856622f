"""Statistics of the training split only: n-gram counts and row hits saved beside the checkpoint, and eval's figures from them.

`engram train` counts, over the training token stream it trained on (the training
documents concatenated, as the batches sample it; one sequence, padded at its start as
the lookup pads a window), every order's n-grams (compressed ids) and every Engram
layer's row hits (each position's rows, all heads). They go to the folder
`NAME.train-stats/` beside the checkpoint: the n-grams counted by the build's
out-of-core counter (`ngrams.count_ngrams`: sorted runs spilled past its memory limit,
the same `order_N.parquet` + `summary.json` layout as a store's statistics) and the row
hits as plain arrays (`rows.npz`: per layer the rows hit and their hits; loads with
`allow_pickle=False`), counted piece by piece into one count per table row (memory:
8 bytes per row of the table, which training already holds resident at 256). Eval joins
the held-out n-grams against the parquet (polars streams it), so neither side holds
the training n-grams in memory. Held-out documents are not in that stream, so a
held-out n-gram that training never saw has count 0 here (tests/test_split.py counts
them independently). A `NAME.train-stats.npz` of the first version (all arrays in one
file) still loads.

Eval's figures from them (`training_figures`), per layer and order: the mean gate and
the mean loss change when the branch is skipped, by the n-gram's training count
(bucket 0 = never seen in training, then log2-spaced bins [1, 2), [2, 4), ...) and by
the n-gram's share of its row's training hits (the best head of the order:
count / row hits; 1 = the row's training hits are all this n-gram's), and the hot-row
cache hit rates by training hits.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from engram_cli.hashing import shift_k
from engram_cli.model import table_lookup
from engram_cli.ngrams import NgramStats, count_ngrams, token_columns

STATS_SUFFIX = ".train-stats"
OLD_SUFFIX = ".train-stats.npz"  # the first version: every array in one file
ROWS_FILE = "rows.npz"
HIT_PIECE_TOKENS = 1 << 20  # row hits are counted this many positions at a time
SHARE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)  # share buckets: unseen (count 0), (0, .25], (.25, .5], (.5, .75], (.75, 1), exactly 1
CACHE_SHARES = (0.01, 0.05, 0.10)


def stats_path(checkpoint, suffix: str = STATS_SUFFIX) -> Path:
    p = Path(checkpoint)
    return p.with_name(p.name.removesuffix(".ckpt").removesuffix(".safetensors") + suffix)


def position_ngrams(c: np.ndarray, order: int, pad: int) -> np.ndarray:
    """(N*T, order) uint32: the order-n n-gram ending at each position of compressed ids `c` (N, T), each row padded at its start."""
    return np.stack([shift_k(c, order - 1 - i, pad).ravel() for i in range(order)], -1).astype(np.uint32)


def count_row_hits(plan, vocab, train_ids: np.ndarray, layer_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows hit, their hits) int64 of one layer over the training stream, HIT_PIECE_TOKENS positions at a time.

    Each piece after the first is hashed behind the max_ngram-1 tokens before it (their
    positions dropped), so the row ids are those of the whole stream as one sequence.
    """
    lookup = table_lookup(plan, vocab, layer_id)
    ids = np.asarray(train_ids, dtype=np.int64)
    ctx = plan.max_ngram_size - 1
    hits = np.zeros(plan.layer_rows(layer_id), dtype=np.int64)
    for a in range(0, ids.size, HIT_PIECE_TOKENS):
        head = max(0, a - ctx)
        rows = np.asarray(lookup.row_ids(torch.as_tensor(ids[head : a + HIT_PIECE_TOKENS][None])))[0, a - head :]
        hits += np.bincount(rows.ravel(), minlength=hits.size)
    rows = np.flatnonzero(hits)
    return rows.astype(np.int64), hits[rows]


def write_training_stats(folder, plan, vocab, train_ids: np.ndarray, layers, *, generation: str | None = None, progress=None) -> Path:
    """Count the training stream into the new folder `folder` (n-grams by `ngrams.count_ngrams`, row hits per layer, the train's
    `generation` in rows.npz); the caller moves it into place with the rest of the train's unit (`train.publish_unit`)."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        c = np.asarray(vocab.lookup)[np.asarray(train_ids, dtype=np.int64)]
        count_ngrams([c], max_ngram_size=plan.max_ngram_size, pad_id=plan.compressed_pad_id, vocab_size=vocab.compressed_size, out_dir=folder,
                     progress=progress, extra={"what": "training split of engram train"})
        rows = {} if generation is None else {"generation": np.array(generation)}
        for l in layers:
            rows[f"rows_{l}"], rows[f"hits_{l}"] = count_row_hits(plan, vocab, train_ids, l)
        np.savez(folder / ROWS_FILE, **rows)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


@dataclass
class TrainingStats:
    """The training split's statistics beside a checkpoint: n-gram counts (scanned, never loaded whole) and row hits per layer."""

    ngrams: NgramStats | None  # the folder form
    arrays: dict  # rows_L, hits_L, generation (and, from a first-version .npz, ngrams_N, counts_N)

    @property
    def generation(self) -> str | None:
        """The train that wrote these statistics (`checkpoint.check_unit`), None before generations."""
        return str(self.arrays["generation"]) if "generation" in self.arrays else None

    def scan(self, order: int) -> pl.LazyFrame:
        """Token columns and `count` of every order-n training n-gram."""
        if self.ngrams is not None:
            return self.ngrams.scan(order).select([*token_columns(order), "count"])
        grams = self.arrays[f"ngrams_{order}"]
        return pl.DataFrame({**{name: grams[:, i] for i, name in enumerate(token_columns(order))}, "count": self.arrays[f"counts_{order}"]}).lazy()


def load_stats(checkpoint) -> TrainingStats | None:
    """The training statistics beside `checkpoint`, or None (a checkpoint made before them, or they are gone)."""
    folder, old = stats_path(checkpoint), stats_path(checkpoint, OLD_SUFFIX)
    if (folder / ROWS_FILE).is_file():
        return load_stats_file(folder)
    if old.is_file():
        return load_stats_file(old)
    return None


def load_stats_file(path) -> TrainingStats:
    """Training statistics from a `NAME.train-stats` folder or a first-version `NAME.train-stats.npz` file."""
    path = Path(path)
    folder = path.is_dir()
    with np.load(path / ROWS_FILE if folder else path, allow_pickle=False) as z:
        return TrainingStats(NgramStats.open(path) if folder else None, {k: z[k] for k in z.files})


def training_counts(stats: TrainingStats, grams: np.ndarray) -> np.ndarray:
    """Training count of each n-gram row of `grams` (M, n), 0 for one never seen in training.

    Only the n-grams of `grams` are joined against the statistics (a polars semi-join
    over the scanned parquet), so memory follows `grams`.
    """
    n = grams.shape[1]
    cols = token_columns(n)
    pos = pl.DataFrame({name: grams[:, i].astype(np.uint32) for i, name in enumerate(cols)})
    table = stats.scan(n).with_columns([pl.col(c).cast(pl.UInt32) for c in cols])
    counts = table.join(pos.unique().lazy(), on=cols, how="semi").collect(engine="streaming")
    got = pos.with_row_index("i").join(counts, on=cols, how="left").sort("i")["count"].fill_null(0)
    return got.to_numpy().astype(np.int64)


def row_hits(stats: TrainingStats, layer_id: int, rows: np.ndarray) -> np.ndarray:
    """Training hits of each row id in `rows` (any shape), 0 for rows training never looked up."""
    ids, hits = stats.arrays[f"rows_{layer_id}"], stats.arrays[f"hits_{layer_id}"]
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
    ids, hits = stats.arrays[f"rows_{layer_id}"], stats.arrays[f"hits_{layer_id}"]
    flat = rows.ravel()
    rates = {}
    n_rows = plan.layer_rows(layer_id)
    for s in CACHE_SHARES:
        cap = max(1, int(s * n_rows))
        hot = np.sort(ids[np.argsort(-hits, kind="stable")[:cap]])
        pos = np.minimum(np.searchsorted(hot, flat), max(hot.size - 1, 0))
        rates[f"{s:.0%}"] = float((hot[pos] == flat).mean()) if hot.size else 0.0
    return {"by_training_count": by_count, "by_row_share": by_share, "cache_hit_rate": rates}
