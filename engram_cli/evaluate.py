"""The `engram eval` report: held-out loss with intervals, table ablations, gate, table usage, lookups.

Every figure is computed on the checkpoint's held-out documents (or on --corpus, read
whole as held-out text); the schema is documented in docs/eval.md.

Memory is bounded by the held-out text, never by the table: the held-out row ids are
hashed first, their unique rows read once through the lookup kernels' chunk cache
(`EngramLookup.from_store(max_resident_bytes=...)`, each chunk decoded once), row norms
from a fixed sample of chunks. The frequency, row-share and hot-row cache figures come
from the training split's statistics beside the checkpoint (`train_stats`), never from
the store's whole-corpus statistics and hit counts. The lookup benchmark
holds one layer resident at a time, and only when it fits `LOOKUP_RESIDENT_BYTES` and half
the available RAM; a larger one is read through a chunk cache of ROW_READ_BYTES (random
lookups then decode most chunks per call: the figure says what that path costs).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from engram_cli.ablations import ABLATIONS, mean_source, row_source, shuffle_row_ids, window_losses
from engram_cli.checkpoint import check_unit, load_checkpoint
from engram_cli.checkpoint_schema import available_ram
from engram_cli.errors import CheckpointError, StoreError
from engram_cli.intervals import bootstrap_interval, paired
from engram_cli.kernels import REGISTRY, EngramLookup, available_backends
from engram_cli.kernels.cache import top_rows
from engram_cli.kinds import Backend, TokenizerEngine
from engram_cli.model import EngramGPT, ModelConfig, table_lookup
from engram_cli.quantize import same_addresses
from engram_cli.split import HELDOUT_SHARE, MAX_HELDOUT_TOKENS, ids_digest, pinned_heldout, read_split
from engram_cli.store import TableStore, from_storage
from engram_cli.store.output import hold_read
from engram_cli.store.tokenizer import load_store_tokenizer
from engram_cli.train import open_tables
from engram_cli.train_loop import TokenMap
from engram_cli.train_stats import load_stats, training_figures
from engram_cli.vocab import load_tokenizer

MiB = 1 << 20
CACHE_SHARES = (0.01, 0.05, 0.10)  # hot-row cache capacities, as shares of a layer's rows
EVAL_BATCH = 16  # windows per forward
ROW_READ_BYTES = 256 * MiB  # chunk cache while reading the held-out rows (each chunk is decoded once)
NORM_SAMPLE_ROWS = 1 << 20  # row norms: every row of a smaller table, else whole chunks evenly spaced up to about this many rows
LOOKUP_RESIDENT_BYTES = 4 << 30  # lookup benchmark: a layer up to this size (and half the available RAM) is held resident
LOOKUP_BENCH_WINDOWS = 8  # held-out windows per benchmarked lookup call
LOOKUP_REPS = 3  # timed calls per backend (the fastest counts)
QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}


def load_model(ckpt: dict, tables: str | None, tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF):
    """The model of a checkpoint (tables not loaded), its store and tokenizer (to encode with `tokenizer_engine`); refusals for store/plan/shape problems."""
    cfg = ModelConfig.from_dict(ckpt["config"])
    model = EngramGPT(cfg)
    store = plan = vocab = None
    tables = tables or ckpt.get("tables")
    if cfg.engram_layers or tables:
        if tables is None:
            tables = ckpt["extra"].get("initial_tables")
        if tables is None or not Path(tables).exists():
            raise StoreError(f"table store {str(tables)!r} is missing; pass --tables T.zarr or re-run `engram train`")
        store, plan, vocab, tok = open_tables(tables, tokenizer_engine)
        if cfg.engram_layers and ckpt.get("plan_fingerprint") and not same_addresses(plan, ckpt["plan_fingerprint"]):
            raise CheckpointError(f"plan fingerprint of {str(tables)!r} ({plan.fingerprint[:12]}) does not match the checkpoint's ({ckpt['plan_fingerprint'][:12]}); pass the tables it was trained with")
        for l in cfg.engram_layers:
            got, want = (store.plan.layer_rows(l), store.head_dim), (cfg.table_rows[str(l)], cfg.head_dim)
            if got != want:
                raise CheckpointError(f"table of layer {l} has shape {got}, the model expects {want}; pass the tables it was trained with")
    else:
        tok = baseline_tokenizer(ckpt, tokenizer_engine)
    try:
        model.load_state_dict(ckpt["weights"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint weights do not match its config ({first[:160]}); re-run `engram train`") from None
    model.eval()
    return model, store, plan, vocab, tok


def baseline_tokenizer(ckpt: dict, tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF):
    """The tokenizer of a checkpoint without Engram memory: its training store's (`extra.initial_tables`), else the default one."""
    initial = ckpt["extra"].get("initial_tables")
    if initial and Path(initial).exists():
        return load_store_tokenizer(TableStore.open(initial), tokenizer_engine)
    return load_tokenizer(engine=tokenizer_engine)


def heldout_stream(ckpt: dict, tok, corpus=None, max_tokens: int = MAX_HELDOUT_TOKENS, progress=None) -> np.ndarray:
    """The held-out tokens: all of --corpus, or the checkpoint's split of its corpus.

    A checkpoint with a pinned split (`heldout.documents`) gets exactly the recorded
    documents, read and tokenized alone and checked against the recorded digests
    (`split.pinned_heldout`); an older one re-derives its split from the whole corpus.
    """
    if corpus is not None:
        _, held = read_split(corpus, tok, share=1.0, max_train=0, max_heldout=max_tokens, progress=progress)
        return held
    src = ckpt["heldout"].get("corpus")
    if not src or not Path(src).exists():
        raise CheckpointError(f"the training corpus {src!r} of this checkpoint is gone; pass --corpus HELDOUT/")
    if "documents" in ckpt["heldout"]:
        return pinned_heldout(ckpt["heldout"], tok, max_tokens=max_tokens, progress=progress)
    _, held = read_split(src, tok, share=ckpt["heldout"].get("share", HELDOUT_SHARE), max_train=0, max_heldout=max_tokens, progress=progress)
    return held


def windows(stream: np.ndarray, block: int) -> np.ndarray:
    """Non-overlapping (N, block+1) windows (sharing one boundary token)."""
    n = (len(stream) - 1) // block
    return np.stack([stream[i * block : i * block + block + 1] for i in range(n)]) if n > 0 else np.zeros((0, block + 1), np.int64)


def heldout_rows(store, layer_id: int, row_ids: np.ndarray) -> torch.Tensor:
    """Rows `row_ids` (sorted, unique) of a layer as float32 (U, head_dim), through the kernels' chunk cache."""
    lk = EngramLookup.from_store(store, layer_id, backend=Backend.CPU, max_resident_bytes=ROW_READ_BYTES)
    ids = torch.as_tensor(row_ids, dtype=torch.int64)
    return lk.gather(ids.view(1, 1, -1), dtype=torch.float32).view(-1, store.head_dim)


def config_digest(ckpt: dict) -> str:
    """sha256 of what makes two checkpoints the same configuration but for the seed: model config, steps, batch, split, --no-engram."""
    ex, h = ckpt["extra"], ckpt["heldout"]
    what = {"config": ckpt["config"], "steps": ex.get("steps"), "batch": ex.get("batch"), "no_engram": ex.get("no_engram"),
            "split": h.get("split"), "share": h.get("share"), "plan": ckpt.get("plan_fingerprint")}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def initial_store(ckpt: dict, plan):
    """The store training started from (`extra.initial_tables`), or None when it is gone or has another plan."""
    path = ckpt["extra"].get("initial_tables")
    if not path or not Path(path).exists():
        return None
    hold_read(path)  # inside `read_locks()` (the command): not replaced while the ablation reads it
    try:
        init = TableStore.open(path)
    except StoreError:
        return None
    return init if init.plan.fingerprint == plan.fingerprint else None


def evaluate_checkpoint(path, **kw) -> dict:
    """The per-checkpoint report (docs/eval.md); keywords as `evaluate_windows`."""
    return evaluate_windows(path, **kw)[0]


def evaluate_windows(path, *, tables=None, corpus=None, max_tokens: int = MAX_HELDOUT_TOKENS, batch: int = EVAL_BATCH,
                     tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF, progress=None) -> tuple[dict, np.ndarray]:
    """(the report, the full model's mean loss per held-out window); the held-out text is encoded with `tokenizer_engine`."""
    t_start = time.perf_counter()
    ckpt = load_checkpoint(path)
    model, store, plan, vocab, tok = load_model(ckpt, tables, tokenizer_engine)
    check_unit(path, ckpt, store=store, stats=load_stats(path) if store is not None else None)  # one train's checkpoint, store and statistics
    cfg = model.cfg
    tmap = TokenMap(np.asarray(ckpt["extra"]["token_ids"], dtype=np.int64))
    named = None if progress is None else (lambda stage, done, total=None, detail="": progress(stage, done, total, detail or Path(path).name))
    stream = heldout_stream(ckpt, tok, corpus, max_tokens, named)  # one line per checkpoint, named
    W = windows(stream, cfg.block_size)
    if len(W) == 0:
        raise CheckpointError(f"held-out text has {len(stream)} tokens, fewer than one block of {cfg.block_size}; pass a larger --corpus")
    layers = list(cfg.engram_layers)
    x_raw = W[:, :-1]
    # every held-out lookup's row id, then each variant's rows read once (bounded by the held-out text)
    row_ids = {}
    for l in layers:
        if progress is not None:
            progress("read rows", 0, None, f"layer {l}")
        row_ids[l] = np.asarray(table_lookup(plan, vocab, l).row_ids(torch.as_tensor(x_raw)))  # (N, T, H)
        model.engrams()[l].keep_gate = True
    sources = {"full": row_source(plan, vocab, row_ids, lambda l, u: heldout_rows(store, l, u))}
    init = initial_store(ckpt, plan) if layers else None
    if layers:
        if init is not None:
            sources["initial_rows"] = row_source(plan, vocab, row_ids, lambda l, u: heldout_rows(init, l, u))
        shuffled = {l: shuffle_row_ids(plan, l, r) for l, r in row_ids.items()}
        sources["shuffled_rows"] = row_source(plan, vocab, shuffled, lambda l, u: heldout_rows(store, l, u))
        sources["mean_row"] = mean_source(plan, vocab, row_ids, store)
    gates, per_position = {l: [] for l in layers}, {}
    losses = window_losses(model, tmap, W, sources, batch=batch, ablate_branch=bool(layers), gates=gates, positions=per_position,
                           progress=progress, name=Path(path).name)
    train_stats = load_stats(path) if layers else None
    full = losses["full"]
    ntok = int(W.shape[0] * cfg.block_size)
    loss_m = float(full.mean())
    ablations = {k: paired(full, losses[k]) if k in losses else None for k in ABLATIONS} if layers else {}
    loss_a = ablations["branch_skipped"]["loss"] if layers else loss_m  # a model without memory: ablating nothing changes nothing
    report = {
        "checkpoint": str(path),
        "tables": str(store.path) if store is not None and layers else None,
        "engram": bool(layers),
        "steps": ckpt["extra"].get("steps"),
        "seed": ckpt["extra"].get("seed"),
        "config_sha256": config_digest(ckpt),
        "tokens": ntok,
        "windows": len(W),
        "windows_sha256": ids_digest(W),
        "loss": loss_m,
        "loss_interval": bootstrap_interval(full),
        "perplexity": math.exp(loss_m),
        "loss_memory_ablated": loss_a,
        "perplexity_memory_ablated": math.exp(loss_a),
        "memory_gain": loss_a - loss_m,
        "ablations": ablations,
        "layers": {},
    }
    touched_all = ckpt["extra"].get("touched_rows", {})
    for l in layers:
        if progress is not None:
            progress("audit", 0, None, f"layer {l}")
        touched = np.sort(np.asarray(touched_all.get(str(l), torch.zeros(0, dtype=torch.int64)), dtype=np.int64))
        g = np.concatenate(gates[l])  # (N*T,) in position order
        r = row_ids[l].reshape(-1, row_ids[l].shape[-1])  # (N*T, H)
        lay = {"gate_mean": float(g.mean())}
        lay["usage"] = usage_report(cfg.table_rows[str(l)], r, touched)
        lay["row_norms"] = row_norms(store, l, touched)
        lay["lookups"] = lookup_report(store, plan, vocab, l, x_raw[:LOOKUP_BENCH_WINDOWS])
        if train_stats is not None:
            dloss = (per_position["branch_skipped"] - per_position["full"]).ravel()
            lay["training_split"] = training_figures(train_stats, plan, vocab, l, x_raw, r, g, dloss)
        report["layers"][str(l)] = lay
    report["seconds"] = time.perf_counter() - t_start
    return report, full


# -- table usage --------------------------------------------------------------------------------
def usage_report(n_rows: int, rows: np.ndarray, touched: np.ndarray) -> dict:
    """Rows the held-out text touches and the share of its lookups on rows training never updated."""
    flat = rows.ravel()
    trained = np.zeros(flat.shape, dtype=bool)
    if touched.size:
        pos = np.minimum(np.searchsorted(touched, flat), touched.size - 1)
        trained = touched[pos] == flat
    return {
        "rows": int(n_rows),
        "rows_touched_heldout": int(np.unique(flat).size),
        "rows_trained": int(touched.size),
        "lookups": int(flat.size),
        "lookups_on_untrained_rows": float(1.0 - trained.mean()),
    }


def _quantiles(x: np.ndarray) -> dict | None:
    if x.size == 0:
        return None
    return {"rows": int(x.size), "mean": float(x.mean()), **{k: float(np.quantile(x, q)) for k, q in QUANTILES.items()}}


def row_norms(store, layer_id: int, touched: np.ndarray) -> dict:
    """L2-norm quantiles of trained vs untouched rows: every row, or whole chunks evenly spaced (about NORM_SAMPLE_ROWS rows)."""
    n = store.table(layer_id).shape[0]
    cr = store.chunk_rows
    n_chunks = -(-n // cr)
    k = max(1, NORM_SAMPLE_ROWS // cr)
    if n_chunks <= k:  # every row, in blocks of whole chunks
        step = cr * max(1, k // 4)
        ranges = [(a, min(n, a + step)) for a in range(0, n, step)]
    else:
        ranges = [(int(c) * cr, min(n, (int(c) + 1) * cr)) for c in np.unique(np.linspace(0, n_chunks - 1, k).round().astype(int))]
    trained, untouched, chunks_read = [], [], 0
    for a, b in ranges:
        block = np.asarray(from_storage(store.load_layer(layer_id, rows=(a, b)), store.dtype), dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        ids = np.arange(a, b) if store.kept_rows(layer_id) is None else store.kept_rows(layer_id)[a:b]  # a pruned store: its kept rows
        mask = np.isin(ids, touched[(touched >= ids[0]) & (touched <= ids[-1])], assume_unique=True)
        trained.append(norms[mask])
        untouched.append(norms[~mask])
        chunks_read += -(-(b - a) // cr)
    return {"sampled": chunks_read < n_chunks, "chunks_read": chunks_read, "chunks": n_chunks,
            "trained": _quantiles(np.concatenate(trained)), "untouched": _quantiles(np.concatenate(untouched))}


def cache_hit_rates(store, layer_id: int, rows: np.ndarray) -> dict:
    """Share of lookups `rows` a hot-row cache of the 1/5/10 % most-hit rows (store hit counts: the build corpus) would serve; `eval --state-dict` only."""
    if not store.has_hits:
        return {}
    hits = store.hits(layer_id)
    flat = np.sort(rows.ravel())
    out = {}
    for share in CACHE_SHARES:
        hot = top_rows(hits, max(1, int(share * hits.shape[0])))  # sorted ids, streamed block by block
        pos = np.minimum(np.searchsorted(hot, flat), hot.size - 1)
        out[f"{share:.0%}"] = float((hot[pos] == flat).mean())
    return out


# -- lookups -------------------------------------------------------------------------------------
def lookup_report(store, plan, vocab, layer_id: int, x_raw: np.ndarray, device=None) -> dict:
    """tokens/s and GB/s of each available backend on held-out ids, each checked bit-exact against the torch reference.

    A backend's call is the whole lookup: raw ids -> row ids -> rows (dequantized to
    float32). GB/s counts the stored bytes of the rows read. Every backend's row ids and
    rows are compared with `torch.equal` to the torch backend's (the plain reference).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    arr = store.table(layer_id)
    row_bytes = int(arr.shape[1]) * np.dtype(arr.dtype).itemsize
    layer_bytes = arr.shape[0] * row_bytes
    resident = layer_bytes <= min(LOOKUP_RESIDENT_BYTES, available_ram() // 2)
    table = store.load_layer(layer_id) if resident else None
    if not resident:
        x_raw = x_raw[:1]  # each call reads most chunks of the table: one window
    ids = torch.as_tensor(x_raw)

    def make(backend):
        if resident:
            return EngramLookup(plan, vocab, layer_id, table, backend=backend, device=device, kept=store.kept_rows(layer_id))
        return EngramLookup.from_store(store, layer_id, backend=backend, device=device, max_resident_bytes=ROW_READ_BYTES)

    ref = make(Backend.TORCH)
    want_rows, want_ids = ref(ids, dtype=torch.float32).cpu(), ref.row_ids(ids).cpu()
    backends = {}
    for name in available_backends(device):
        if REGISTRY[name].resident_only and not resident:
            continue  # the triton kernel needs the table on the device
        lk = ref if name == Backend.TORCH else make(name)
        got = lk(ids, dtype=torch.float32)  # warm-up, and the parity check
        exact = bool(torch.equal(got.cpu(), want_rows) and torch.equal(lk.row_ids(ids).cpu(), want_ids))
        best = math.inf
        for _ in range(LOOKUP_REPS):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            lk(ids, dtype=torch.float32)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        n_lookups = ids.numel() * want_ids.shape[-1]
        backends[name] = {"bit_exact": exact, "tokens_per_s": ids.numel() / best, "gb_per_s": n_lookups * row_bytes / best / 1e9}
    return {"device": str(device), "table": "resident" if resident else f"chunk cache ({ROW_READ_BYTES // MiB} MiB)",
            "tokens": int(ids.numel()), "backends": backends}
