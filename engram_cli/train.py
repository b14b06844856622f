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


# -- the `engram train` pipeline ------------------------------------------------------
import os
import shutil
from pathlib import Path

from engram_cli.checkpoint import save_checkpoint
from engram_cli.errors import CheckpointError, StoreError
from engram_cli.model import ModelConfig

DEFAULT_CORPUS = "corpus"  # `engram build-table corpus/` reads the same folder
DEFAULT_STEPS = 200  # the demo: ~1-2 minutes on 2 CPU cores with the reference plan
DEFAULT_BATCH = 8
DEFAULT_BLOCK = 128
HELDOUT_SHARE = 0.1
SEGMENT_TOKENS = 2048  # held-out unit: a document segment (a few long documents still split)
MAX_TRAIN_TOKENS = 4_000_000  # training reads at most this many tokens (a TB corpus is sampled, never loaded)
MAX_HELDOUT_TOKENS = 200_000


def load_layer_table(store, layer_id: int) -> np.ndarray:
    """A layer's table as float32 (decoded from the storage form `store.load_layer` returns)."""
    from engram_cli.store import from_storage

    table = store.load_layer(layer_id)
    if table.dtype == np.float32:
        return table
    return np.asarray(from_storage(table, store.dtype), dtype=np.float32)


def save_trained_store(src: Path, dst: Path, trained: dict[int, tuple[np.ndarray, np.ndarray]], *, force: bool = True) -> Path:
    """Write a NEW store at `dst`: `src` with the trained rows replaced (the one write path).

    Files are hard-linked from `src` (copied across devices); zarr replaces the shards
    it rewrites by temp file + rename, so `src` is never modified. The output goes
    through the build's checks (docs/build-table.md, "Failure modes"): `dst` may
    replace only an engram store (and only with `force`, the default for `train`'s own
    `model.tables.zarr`), is locked while written, staged in `<dst>.partial` and moved
    into place by `store.finalize`.
    """
    from engram_cli.store import TableStore, finalize, prepare_partial
    from engram_cli.store.output import check_inputs_apart, release_output, storage_error

    src, dst = Path(src), Path(dst)
    check_inputs_apart(dst, [src], what="trained store", source="table store")
    partial = prepare_partial(dst, force)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    try:
        shutil.copytree(src, partial, copy_function=link, dirs_exist_ok=True)
        store = TableStore.open(partial, mode="r+")
        for layer_id, (rows, values) in trained.items():
            store.write_rows(layer_id, rows, values, by="trained")
        finalize(partial, dst, force)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)  # ours: prepare_partial made it
        converted = storage_error(dst, e)
        if converted is not None:
            raise converted from None
        raise
    finally:
        release_output(dst)
    return dst


def read_split(corpus, tokenizer, *, share: float = HELDOUT_SHARE, max_train: int = MAX_TRAIN_TOKENS, max_heldout: int = MAX_HELDOUT_TOKENS, progress=None):
    """Tokenize documents in order into (train, heldout) int64 streams, each capped.

    Documents are cut into segments of SEGMENT_TOKENS tokens; a segment is held out
    when the hash of "document index:segment index" says so (`is_heldout`), so a corpus
    of a few long documents still gets a held-out share. Reading stops once both
    streams are full.
    """
    from engram_cli.corpus import iter_documents

    train, held = [], []
    n_train = n_held = 0
    for i, doc in enumerate(iter_documents([corpus])):
        if n_held >= max_heldout and n_train >= max_train:
            break
        ids = np.asarray(tokenizer.tokenizer.encode(doc).ids, dtype=np.int64)
        for j in range(0, len(ids), SEGMENT_TOKENS):
            seg = ids[j : j + SEGMENT_TOKENS]
            if is_heldout(f"{i}:{j // SEGMENT_TOKENS}", share):
                if n_held < max_heldout:
                    held.append(seg)
                    n_held += len(seg)
            elif n_train < max_train:
                train.append(seg)
                n_train += len(seg)
        if progress is not None:
            progress("tokenize", n_train + n_held, None, f"{i + 1} documents")
    cat = lambda xs, cap: np.concatenate(xs)[:cap] if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(train, max_train), cat(held, max_heldout)


def open_tables(tables):
    """The store, its plan and vocab, and the tokenizer it was built with (checked by sha256)."""
    from engram_cli.store import TableStore
    from engram_cli.vocab import load_tokenizer

    store = TableStore.open(tables)
    vocab = store.vocab
    tok = load_tokenizer()
    if vocab.tokenizer_sha256 and tok.sha256 != vocab.tokenizer_sha256:
        raise StoreError(f"table store {str(tables)!r} was built with another tokenizer (sha256 {vocab.tokenizer_sha256[:12]}); rebuild it with `engram build-table`")
    return store, store.plan, vocab, tok


def run_training(corpus, tables, out, *, steps: int = DEFAULT_STEPS, no_engram: bool = False, batch: int = DEFAULT_BATCH,
                 block: int = DEFAULT_BLOCK, d_model: int = 128, n_layer: int = 4, lr: float = 3e-3, seed: int = 0,
                 max_train_tokens: int = MAX_TRAIN_TOKENS, progress=None) -> dict:
    """Train the reference model; write the checkpoint `out` and (with Engram) `out`'s trained store."""
    from engram_cli.defaults import TRAINED_STORE_SUFFIX

    out = Path(out)
    if not out.parent.exists():
        raise CheckpointError(f"folder {str(out.parent)!r} does not exist; create it or pass -o elsewhere")
    store, plan, vocab, tok = open_tables(tables)
    train_ids, held_ids = read_split(corpus, tok, max_train=max_train_tokens, progress=progress)
    if len(train_ids) < block + 2:
        raise CheckpointError(f"corpus {str(corpus)!r} has only {len(train_ids)} training tokens; give at least {block + 2}")
    tmap = TokenMap.from_ids(np.concatenate([train_ids, held_ids]))
    torch.manual_seed(seed)
    cfg_plan = None if no_engram else plan
    cfg = ModelConfig.for_plan(cfg_plan, vocab_size=tmap.size, n_layer=n_layer, n_head=4, d_model=d_model, block_size=block)
    model = EngramGPT(cfg)
    with torch.no_grad():
        for l, w in zip(cfg.engram_layers, model.table_parameters()):
            w.data = torch.from_numpy(load_layer_table(store, l))  # no second copy of the table
    touched = {l: [] for l in cfg.engram_layers}

    def on_step(step, loss, tps):
        if progress is not None:
            progress("train", step + 1, steps, f"loss {loss:.3f}  {tps:,.0f} tok/s")

    # record touched rows (bounded by rows batches touch) by wrapping batch_inputs' row ids
    rng = np.random.default_rng(seed)
    opts = make_optimizers(model, lr)
    t0 = time.perf_counter()
    losses = []
    model.train()
    for step in range(steps):
        x, y, rows = batch_inputs(model, plan if cfg.engram_layers else None, vocab, tmap, sample_batch(train_ids, batch, block, rng))
        if rows:
            for l, r in rows.items():
                touched[l].append(np.unique(r.numpy()))
                if len(touched[l]) > 64:
                    touched[l] = [np.unique(np.concatenate(touched[l]))]
        _, loss = model(x, rows, targets=y)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(float(loss.detach()))
        on_step(step, losses[-1], (step + 1) * x.numel() / (time.perf_counter() - t0))
    train_s = time.perf_counter() - t0
    touched_rows = {l: (np.unique(np.concatenate(v)) if v else np.zeros(0, np.int64)) for l, v in touched.items()}
    trained_store = None
    if cfg.engram_layers:
        trained_store = out.with_name(out.name.removesuffix(".ckpt") + TRAINED_STORE_SUFFIX)
        tables_w = {l: w.detach() for l, w in zip(cfg.engram_layers, model.table_parameters())}
        save_trained_store(store.path, trained_store, {l: (r, tables_w[l][torch.as_tensor(r)].numpy()) for l, r in touched_rows.items()})
    save_checkpoint(
        out, model,
        tables=str(trained_store) if trained_store else None,
        plan_fingerprint=plan.fingerprint if cfg.engram_layers else None,
        heldout={"share": HELDOUT_SHARE, "key": "document index:segment index", "segment_tokens": SEGMENT_TOKENS, "hash": "xxh64 % 10000 < share*10000", "corpus": str(Path(corpus).resolve())},
        extra={
            "token_ids": torch.as_tensor(tmap.used),
            "touched_rows": {str(l): torch.as_tensor(r) for l, r in touched_rows.items()},
            "initial_tables": str(Path(store.path).resolve()),
            "steps": steps, "batch": batch, "losses": losses, "no_engram": no_engram,
        },
    )
    return {"checkpoint": str(out), "tables": str(trained_store) if trained_store else None, "steps": steps,
            "first_loss": losses[0], "last_loss": losses[-1], "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(held_ids)), "seconds": train_s, "tokens_per_s": steps * batch * block / train_s}
