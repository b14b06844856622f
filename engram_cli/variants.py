"""The quality gate of smaller tables (`engram eval --variants`): each variant's bytes, held-out loss, paired loss change and lookup speed.

A variant is a table dtype (`float32`, `bf16`, `fp16`, `fp8`, `int8`, `int4`: the trained
store quantized, `quantize.quantize_store`) or `prune:F` (its top fraction F of each
layer's rows by training-split hits, `quantize.prune_store`; the store's own hits where
the checkpoint has no `NAME.train-stats`), or both joined by `+` (`int8+prune:0.5`).
Every variant's store is written once into a scratch folder (or `workdir`) and read
through the lookup kernels as the model would read it. All variants are scored on the
same held-out windows with the same weights; the loss change is paired against the
trained table as stored (`trained`), with a bootstrap interval over windows
(`intervals.paired`). Lookup speed: `evaluate.lookup_report` per backend on one layer
(held-out ids, every backend checked bit-exact against the torch backend), and the
torch backend's rows checked bit-exact against the numpy dequantization of the store
(`TableStore.read_rows`). docs/quantize.md has the schema and the fixture figures.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram_cli.ablations import row_source, window_losses
from engram_cli.audit.plot import MATPLOTLIB_MISSING, check_plot_path
from engram_cli.checkpoint import load_checkpoint
from engram_cli.errors import CheckpointError, EngramError
from engram_cli.evaluate import (
    EVAL_BATCH,
    LOOKUP_BENCH_WINDOWS,
    heldout_rows,
    heldout_stream,
    load_model,
    lookup_report,
    windows,
)
from engram_cli.intervals import bootstrap_interval, paired
from engram_cli.kernels import EngramLookup
from engram_cli.kinds import Backend, TableDtype, TokenizerEngine
from engram_cli.model import table_lookup
from engram_cli.quantize import parse_dtype, prune_store, quantize_store, store_size
from engram_cli.split import MAX_HELDOUT_TOKENS
from engram_cli.store import TableStore
from engram_cli.train_loop import TokenMap
from engram_cli.train_stats import load_stats

DEFAULT_VARIANTS = "float32,bf16,fp8,int8,int4,prune:0.5,prune:0.1"
BASELINE = "trained"


@dataclass(frozen=True)
class Variant:
    """One table variant: a dtype (None: the trained store's) and/or a kept fraction (None: every row)."""

    name: str
    dtype: TableDtype | None = None
    keep_top: float | None = None


def parse_variants(text: str) -> list[Variant]:
    """`float32,bf16,fp8,int8,int4,prune:0.5,...` -> variants, each once, in order (EngramError naming a bad one)."""
    out: list[Variant] = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        dtype = keep = None
        for part in item.split("+"):
            part = part.strip().lower()
            if part.startswith("prune:"):
                try:
                    keep = float(part.split(":", 1)[1])
                except ValueError:
                    keep = -1.0
                if not 0 < keep <= 1:
                    raise EngramError(f"--variants: {part!r} needs a kept fraction in (0, 1], e.g. prune:0.1")
            else:
                try:
                    dtype = parse_dtype(part)
                except EngramError:
                    raise EngramError(f"--variants: unknown variant {part!r}; use dtypes ({TableDtype.choices()}, bf16, fp16, fp8) "
                                      "and prune:F, joined by commas (a dtype and a prune joined by +)") from None
        v = Variant(item, dtype, keep)
        if v.name not in [o.name for o in out]:
            out.append(v)
    if not out:
        raise EngramError(f"--variants names no variant; e.g. --variants {DEFAULT_VARIANTS}")
    return out


def make_variant(v: Variant, trained: TableStore, folder: Path, train_stats: dict | None) -> TableStore:
    """The variant's store in `folder` (the trained store itself for its own dtype, unpruned)."""
    if v.keep_top is None and (v.dtype is None or v.dtype == trained.dtype):
        return trained
    out = folder / f"{v.name.replace(':', '_').replace('+', '_')}.zarr"
    if v.keep_top is None:
        return quantize_store(trained.path, out, v.dtype, force=True)
    return prune_store(trained.path, out, keep_top=v.keep_top, train_stats=train_stats, dtype=v.dtype, force=True)


def reference_check(store: TableStore, layer_id: int, ids: torch.Tensor) -> bool:
    """The torch backend's rows equal, bit for bit, the numpy dequantization of the stored rows (`read_rows`)."""
    lk = EngramLookup.from_store(store, layer_id, backend=Backend.TORCH)
    got = lk(ids, dtype=torch.float32).reshape(-1, store.head_dim)
    want = torch.from_numpy(np.ascontiguousarray(store.read_rows(layer_id, lk.row_ids(ids).reshape(-1).numpy()), dtype=np.float32))
    return bool(torch.equal(got.view(torch.int32), want.view(torch.int32)))


def gate_report(checkpoint, variants: str | list[Variant] = DEFAULT_VARIANTS, *, corpus=None, workdir=None, max_tokens: int = MAX_HELDOUT_TOKENS,
                tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF, lookups: bool = True, progress=None) -> dict:
    """The gate table of one checkpoint (docs/quantize.md): per variant, sizes, loss with interval, paired change vs `trained`, lookups."""
    t0 = time.perf_counter()
    vs = parse_variants(variants) if isinstance(variants, str) else list(variants)
    ckpt = load_checkpoint(checkpoint)
    model, store, plan, vocab, tok = load_model(ckpt, None, tokenizer_engine)
    layers = list(model.cfg.engram_layers)
    if not layers:
        raise CheckpointError(f"{str(checkpoint)!r} has no Engram layers: there is no table to gate; pass a checkpoint trained with memory")
    tmap = TokenMap(np.asarray(ckpt["extra"]["token_ids"], dtype=np.int64))
    W = windows(heldout_stream(ckpt, tok, corpus, max_tokens, progress), model.cfg.block_size)
    if len(W) == 0:
        raise CheckpointError(f"the held-out text is shorter than one block of {model.cfg.block_size} tokens; pass a larger --corpus")
    x_raw = W[:, :-1]
    row_ids = {l: np.asarray(table_lookup(plan, vocab, l).row_ids(torch.as_tensor(x_raw))) for l in layers}
    loaded = load_stats(checkpoint)
    train_stats = None if loaded is None else loaded.arrays  # rows_L, hits_L
    with tempfile.TemporaryDirectory(prefix="engram-variants-", dir=workdir) as tmp:
        stores = {BASELINE: store}
        for i, v in enumerate(vs):
            if progress is not None:
                progress("variants", i, len(vs), v.name)
            stores[v.name] = make_variant(v, store, Path(tmp), train_stats)
        sources = {name: row_source(plan, vocab, row_ids, lambda l, u, s=s: heldout_rows(s, l, u)) for name, s in stores.items()}
        losses = window_losses(model, tmap, W, sources, batch=EVAL_BATCH, ablate_branch=False, progress=progress, name=Path(checkpoint).name)
        base = losses[BASELINE]
        rows = []
        ids = torch.as_tensor(x_raw[:LOOKUP_BENCH_WINDOWS])
        for name in [BASELINE, *(v.name for v in vs)]:
            s = stores[name]
            p = paired(base, losses[name])
            row = {"variant": name, **store_size(s), "loss": p["loss"], "loss_interval": bootstrap_interval(losses[name]),
                   "loss_change": p["delta"], "loss_change_interval": p["interval"]}
            if lookups:
                lay = layers[0]
                row["lookups"] = {"layer": lay, **lookup_report(s, s.plan, vocab, lay, x_raw[:LOOKUP_BENCH_WINDOWS])}
                row["lookups"]["torch_matches_reference"] = reference_check(s, lay, ids)
            rows.append(row)
    return {"checkpoint": str(checkpoint), "tables": str(store.path), "trained_dtype": store.dtype, "windows": int(len(W)),
            "tokens": int(W.shape[0] * model.cfg.block_size), "prune_by": "training-split hits" if train_stats is not None else "store hits",
            "variants": rows, "seconds": time.perf_counter() - t0}


def plot_gate(report: dict, path) -> None:
    """Loss change (with its interval) against bytes per row, log x, one labelled point per variant."""
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EngramError(MATPLOTLIB_MISSING) from None
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for i, r in enumerate(v for v in report["variants"] if v["variant"] != BASELINE):  # the baseline is 0 by definition
        x, y, (lo, hi) = r["bytes_per_logical_row"], r["loss_change"], r["loss_change_interval"]
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=3)
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 else -11), fontsize=8)  # alternate: neighbours do not overlap
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per row (log; pruned: stored bytes incl. the kept-row map, per row of the plan)")
    ax.set_ylabel("held-out loss change vs trained (nats/token)")
    ax.set_title(f"{Path(report['checkpoint']).name}: {report['windows']} held-out windows, 95% paired intervals", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
