"""`engram train`: held-out split, model, the training loop (engram_cli/train_loop.py), and the
checkpoint, trained store and training statistics published as one unit (docs/train.md)."""

from __future__ import annotations

import functools
import gc
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engram_cli.aligned import aligned_empty
from engram_cli.checkpoint import (
    check_checkpoint_output,
    checkpoint_bytes,
    new_generation,
    remove_path,
    remove_stale_temps,
    replace_path,
    temp_path,
    write_temp,
)
from engram_cli.defaults import TRAINED_STORE_SUFFIX
from engram_cli.errors import CheckpointError, OutputError, StoreError
from engram_cli.kinds import TokenizerEngine
from engram_cli.model import EngramGPT, ModelConfig, table_lookup
from engram_cli.model import param_matched as matched_config
from engram_cli.split import (
    HELDOUT_SHARE,
    MAX_TRAIN_TOKENS,
    SPLITS,
    split_corpus,
    split_record,
)
from engram_cli.store import TableStore, from_storage, link_store, staged_output
from engram_cli.store.format import ROOT_ATTR, partial_path
from engram_cli.store.output import (
    check_inputs_apart,
    check_no_readers,
    check_output,
    hold_read,
    is_engram_staging,
    lock_output,
    read_locks,
    release_output,
    shown,
    storage_errors,
)
from engram_cli.store.tokenizer import load_store_tokenizer
from engram_cli.train_loop import TokenMap, train_steps
from engram_cli.train_stats import ROWS_FILE, stats_path, write_training_stats

DEFAULT_CORPUS = "corpus"  # `engram build-table corpus/` reads the same folder
DEFAULT_STEPS = 150  # the demo: a training loop of well under a minute on 2 CPU cores at the default depth, measured in docs/train.md
DEFAULT_DEPTH = 4  # backbone blocks; the plan's layers (1 and 15 of the reference's 30) are placed into them (model.place_layers)
DEFAULT_BATCH = 8
DEFAULT_BLOCK = 128


def load_layer_table(store, layer_id: int) -> np.ndarray:
    """A layer's table as float32, page-aligned (engram_cli/aligned.py): a float32 store as
    `store.load_layer` reads it, any other decoded shard by shard into the float32 table (the
    stored form of one shard at a time beside it, never the whole stored table)."""
    if store.storage_dtype == np.float32:
        return store.load_layer(layer_id)
    out = aligned_empty((store.stored_rows(layer_id), store.head_dim), np.float32)
    for start, block in store.iter_row_blocks(layer_id, store.shard_rows):
        out[start : start + block.shape[0]] = from_storage(block, store.dtype)
    return out


def save_trained_store(src: Path, dst: Path, trained: dict[int, tuple[np.ndarray, np.ndarray]], *, force: bool = True,
                       generation: str | None = None) -> Path:
    """Write a NEW store at `dst`: `src` with the trained rows replaced (the one write path).

    Files are hard-linked from `src` (copied across devices); zarr replaces the shards
    it rewrites by temp file + rename, so `src` is never modified. The output goes
    through the build's checks (docs/build-table.md, "Failure modes"): `dst` may
    replace only an engram store (and only with `force`, the default for `train`'s own
    `model.tables.zarr`), is locked while written, staged in `<dst>.partial` and moved
    into place (`store.staged_output`). `generation` (the train's unit id, recorded in its
    checkpoint too) goes into the root attributes, written last.
    """

    src, dst = Path(src), Path(dst)
    check_inputs_apart(dst, [src], what="trained store", source="table store")
    with staged_output(dst, force) as staging:
        link_store(src, staging.partial)
        store = TableStore.open(staging.partial, mode="r+")
        for layer_id, (rows, values) in trained.items():
            store.write_rows(layer_id, rows, values, by="trained")
        if generation is not None:
            store.group.attrs[ROOT_ATTR] = {**store.attrs, "generation": generation}
    return dst


def publish_unit(out, data, *, src, trained: dict | None, stats_dir: Path | None, force: bool, generation: str) -> None:
    """Publish one train's unit: statistics and checkpoint written to temps first, then the trained store, then the renames.

    Every write that can fail for space or a size limit (the checkpoint's bytes `data`,
    the statistics already counted into the temp folder `stats_dir`, the store's rows) happens before anything is replaced: such a failure
    leaves the previous checkpoint, store and statistics as they were. The trained store
    moves in first (`staged_output`, tagged `generation`), then the statistics, the
    checkpoint last; a failure of those renames leaves a checkpoint whose generation no
    longer matches, which eval refuses by name (`checkpoint.check_unit`). Call under the
    locks of `claimed_outputs`.
    """
    out = Path(out)
    temps: list[tuple[Path, Path]] = []
    try:
        with storage_errors(out):
            if stats_dir is not None:
                temps.append((Path(stats_dir), stats_path(out)))
            temps.append((write_temp(out, data), out))
            for _, dst in temps:  # an immutable or read-only old file would fail its rename after the store moved in
                if dst.exists() and not os.access(dst, os.W_OK):
                    raise OutputError(f"cannot replace {shown(dst)}: it is read-only or immutable; nothing was replaced; "
                                      "fix the permissions (or `chattr -i`) or choose another -o/--out")
            if trained is not None:
                save_trained_store(src, trained_store_path(out), trained, force=force, generation=generation)
        for tmp, dst in temps:
            try:
                replace_path(tmp, dst)
            except OSError as e:
                store = f"its trained store {shown(trained_store_path(out))} was replaced, so `engram eval` refuses the old one; " if trained is not None else ""
                raise OutputError(f"cannot move {shown(dst)} into place: {e.strerror}; {store}"
                                  "fix the permissions (or `chattr -i`) and train again with --force") from None
    finally:
        for tmp, _ in temps:
            remove_path(tmp)


def trained_store_path(out) -> Path:
    """The trained store beside checkpoint `out`: NAME.tables.zarr."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".ckpt").removesuffix(".safetensors") + TRAINED_STORE_SUFFIX)


def check_train_outputs(corpus, tables, out, force: bool, *, engram: bool = True) -> tuple[Path, Path]:
    """Before any work: the checkpoint `out`, its trained store and statistics may be written (`OutputError` otherwise).

    The checkpoint by `checkpoint.check_checkpoint_output`; the trained store apart from
    the corpus and the input store (training into its own input store is refused) and
    replacing only an engram store, only with --force; the statistics file replacing
    only a statistics file (an .npz archive); no other process reading the trained store
    (those two only when `engram`: a --no-engram train writes neither).
    """
    out = check_checkpoint_output(out, force, inputs=[corpus], tables=tables)
    trained = trained_store_path(out)
    if not engram:
        return out, trained
    check_inputs_apart(trained, [tables], what="trained store", source="table store")
    check_output(trained, force, inputs=[corpus])
    stats = stats_path(out)
    check_inputs_apart(stats, [corpus, tables], what="training statistics file")
    if (stats.exists() or stats.is_symlink()) and (stats.is_symlink() or not (stats / ROWS_FILE).is_file()):
        raise OutputError(f"{shown(stats)} is in the way of the training statistics and is not one; move it away or choose another -o/--out")
    partial = partial_path(trained)
    if (partial.exists() or partial.is_symlink()) and not is_engram_staging(partial):
        raise OutputError(f"{shown(partial)} exists and is not an engram staging directory; move it away or choose another -o/--out")
    check_no_readers(trained)
    return out, trained


@contextmanager
def claimed_outputs(corpus, tables, out, force: bool, *, engram: bool = True):
    """Checks (`check_train_outputs`), then the locks of the checkpoint and its trained store held for the block, checked again under them.

    A second train to the same -o is refused at once naming this one (`OutputBusy`);
    temps a killed train left are removed. Stores read inside the block are read-locked
    (`output.read_locks`).
    """
    check_train_outputs(corpus, tables, out, force, engram=engram)
    with ExitStack() as stack:
        for path in (Path(out), trained_store_path(out)):
            lock_output(path)
            stack.callback(release_output, path)
        remove_stale_temps(out)
        remove_stale_temps(stats_path(out))
        check_train_outputs(corpus, tables, out, force, engram=engram)
        stack.enter_context(read_locks())
        yield


def _claiming_outputs(fn):
    """`run_training` runs inside `claimed_outputs`: every output refusal comes before the corpus is read."""

    @functools.wraps(fn)
    def run(corpus, tables, out, *args, force: bool = False, **kw):
        if not Path(out).parent.exists():  # the missing-folder refusal stays the run's own
            return fn(corpus, tables, out, *args, force=force, **kw)
        with claimed_outputs(corpus, tables, out, force, engram=not kw.get("no_engram", False)):
            return fn(corpus, tables, out, *args, force=force, **kw)

    return run


def open_tables(tables, tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF):
    """The store, its plan and vocab, and the tokenizer it was built with (`store.tokenizer.load_store_tokenizer`, checked by sha256),
    to encode with `tokenizer_engine`."""

    hold_read(tables)  # inside `read_locks()` (train, eval): no --force rebuild replaces the store while it is read
    store = TableStore.open(tables)
    vocab = store.vocab
    tok = load_store_tokenizer(store, tokenizer_engine)
    if vocab.tokenizer_sha256 and tok.sha256 != vocab.tokenizer_sha256:
        raise StoreError(f"table store {str(tables)!r} was built with another tokenizer (sha256 {vocab.tokenizer_sha256[:12]}); rebuild it with `engram build-table`")
    return store, store.plan, vocab, tok


def train_device() -> str:
    """CUDA when present, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@_claiming_outputs
def run_training(corpus, tables, out, *, force: bool = False, steps: int = DEFAULT_STEPS, no_engram: bool = False, param_matched: bool = False, batch: int = DEFAULT_BATCH,
                 block: int = DEFAULT_BLOCK, d_model: int = 128, depth: int = DEFAULT_DEPTH, lr: float = 3e-3, seed: int = 0,
                 split: str = "document", heldout_fraction: float = HELDOUT_SHARE,
                 max_train_tokens: int = MAX_TRAIN_TOKENS, tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF, progress=None,
                 announce=None, model_options: dict | None = None) -> dict:
    """Train the reference model; write the checkpoint `out` and (with Engram) `out`'s trained store.

    `announce()`, when given, is called once every input and output check has passed, just
    before the model is built (the command's notice of what training will write).
    `model_options`: `ModelConfig` fields set on the shape made here (the MoE FFN of
    `engram sweep allocation`).

    Each Engram layer's table is loaded once, resident (every batch touches rows all over
    it), and updated in place by `RowAdam`; only the touched rows are written to the new
    store, whose other shards are hard links of the initial store's files.

    Outputs (docs/train.md, "What is refused"): every refusal comes before the corpus is
    read (`check_train_outputs`); the checkpoint and its trained store are locked for
    the run, `tables` read-locked; `force` replaces an existing checkpoint (only a
    checkpoint) and its trained store. The trained store and the statistics carry a
    fresh generation id; the checkpoint, written last, records it (`checkpoint.check_unit`).
    """

    out = Path(out)
    if not out.parent.exists():
        raise CheckpointError(f"folder {str(out.parent)!r} does not exist; create it or pass -o elsewhere")
    if param_matched and not no_engram:
        raise CheckpointError("--param-matched shapes the --no-engram baseline; pass it with --no-engram")
    if split not in SPLITS:
        raise CheckpointError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if not 0 < heldout_fraction < 1:
        raise CheckpointError(f"--heldout-fraction {heldout_fraction} is not between 0 and 1 (exclusive); 0.1 holds out a tenth")
    store, plan, vocab, tok = open_tables(tables, tokenizer_engine)
    if depth < len(plan.layer_ids):
        raise CheckpointError(f"--depth {depth} cannot hold the plan's {len(plan.layer_ids)} Engram layers ({', '.join(map(str, plan.layer_ids))}); "
                              f"give --depth {len(plan.layer_ids)} or more")
    train_ids, held_ids, held_docs = split_corpus(corpus, tok, split=split, share=heldout_fraction, max_train=max_train_tokens, progress=progress)
    if len(train_ids) < block + 2:
        hint = "; with few documents, try --split segment" if split == "document" else ""
        raise CheckpointError(f"corpus {str(corpus)!r} has only {len(train_ids)} training tokens; give at least {block + 2}{hint}")
    if len(held_ids) < block + 1:
        hint = " or --split segment" if split == "document" else ""
        raise CheckpointError(f"the held-out split of {str(corpus)!r} ({split}s, {heldout_fraction:.0%}) has only {len(held_ids)} tokens, "
                              f"fewer than one window of {block + 1}; use a corpus with more documents, a larger --heldout-fraction{hint}")
    if announce is not None:
        announce()
    tmap = TokenMap.from_ids(np.concatenate([train_ids, held_ids]))
    torch.manual_seed(seed)
    device = train_device()
    # --no-engram keeps the depth: the baseline is the same backbone without memory
    cfg = ModelConfig.for_plan(None if no_engram else plan, vocab_size=tmap.size, n_layer=depth, n_head=4, d_model=d_model, block_size=block)
    if param_matched:  # the Engram model's dense parameters, the branch's given to the FFN width
        cfg = matched_config(ModelConfig.for_plan(plan, vocab_size=tmap.size, n_layer=depth, n_head=4, d_model=d_model, block_size=block))
    if model_options:
        cfg = replace(cfg, **model_options)
    model = EngramGPT(cfg).to(device)
    lookups = {}
    for l in cfg.engram_layers:
        if progress is not None:
            progress("load table", 0, None, f"layer {l}")
        lookups[l] = table_lookup(plan, vocab, l, load_layer_table(store, l), device=device)  # the one resident copy
    model.attach_tables(lookups)

    def on_step(step, loss, tps):
        if progress is not None:
            progress("train", step + 1, steps, f"loss {loss:.3f}  {tps:,.0f} tokens/s")

    if progress is not None:  # training begins: the table loading before it has ended
        progress("train", 0, steps, "")
    t0 = time.perf_counter()
    losses, opts = train_steps(model, lookups, tmap, train_ids, steps=steps, batch=batch, lr=lr, seed=seed, device=device, on_step=on_step)
    train_s = time.perf_counter() - t0
    row_opt = opts[-1] if cfg.engram_layers else None
    touched_rows = {l: row_opt.touched(l) for l in cfg.engram_layers}
    state_bytes = row_opt.state_bytes() if row_opt is not None else 0
    generation = new_generation()
    trained_store = trained_store_path(out) if cfg.engram_layers else None
    trained = stats = None
    if cfg.engram_layers:
        if progress is not None:
            progress("save rows", 0, None, str(trained_store))
        trained = {l: (r, lookups[l].table[torch.as_tensor(r, device=device)].cpu().numpy()) for l, r in touched_rows.items()}
        # the trained rows are out: let the resident tables and the optimizer state go before the store is written
        for m in model.memories().values():
            m.lookup = None
        del lookups, opts, row_opt
        gc.collect()
        # eval's frequency, share and cache figures count the training split only (train_stats)
        if progress is not None:
            progress("count", 0, None, "training n-grams and row hits")
        stats = write_training_stats(temp_path(stats_path(out)), plan, vocab, train_ids, cfg.engram_layers, generation=generation)
    data = checkpoint_bytes(
        out, model.cpu(),
        tables=str(trained_store) if trained_store else None,
        plan_fingerprint=plan.fingerprint if cfg.engram_layers else None,
        heldout=split_record(corpus, split, heldout_fraction, held_ids, held_docs),
        extra={
            "token_ids": torch.as_tensor(tmap.used),
            "touched_rows": {str(l): torch.as_tensor(r) for l, r in touched_rows.items()},
            "initial_tables": str(Path(store.path).resolve()), "generation": generation,
            "steps": steps, "batch": batch, "losses": losses, "no_engram": no_engram, "param_matched": param_matched, "seed": seed,
        },
    )
    publish_unit(out, data, src=store.path, trained=trained, stats_dir=stats, force=force, generation=generation)
    train_stats = stats_path(out) if stats is not None else None
    return {"checkpoint": str(out), "tables": str(trained_store) if trained_store else None,
            "train_stats": str(train_stats) if train_stats else None, "steps": steps,
            "first_loss": losses[0], "last_loss": losses[-1], "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(held_ids)), "heldout_documents": len(held_docs), "split": split, "seed": seed, "depth": depth,
            "engram_blocks": {str(l): b for l, b in cfg.placement().items()}, "seconds": train_s, "tokens_per_s": steps * batch * block / train_s,
            "device": device, "rows_trained": {str(l): int(r.size) for l, r in touched_rows.items()},
            "optimizer_state_bytes": state_bytes}
