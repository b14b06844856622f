"""The `engram eval` report: held-out loss with and without memory, gate, table usage, lookups.

Every figure is computed on the checkpoint's held-out documents (or on --corpus, read
whole as held-out text); the schema is documented in docs/eval.md.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from engram_cli.checkpoint import load_checkpoint
from engram_cli.errors import CheckpointError, StoreError
from engram_cli.model import EngramGPT, ModelConfig, row_ids_for
from engram_cli.train import HELDOUT_SHARE, MAX_HELDOUT_TOKENS, TokenMap, load_layer_table, open_tables, read_split

CACHE_SHARES = (0.01, 0.05, 0.10)


def load_model(ckpt: dict, tables: str | None):
    """The model of a checkpoint with its tables loaded; refusals for store/plan/shape problems."""
    cfg = ModelConfig.from_dict(ckpt["config"])
    model = EngramGPT(cfg)
    store = plan = vocab = tok = None
    tables = tables or ckpt.get("tables")
    if cfg.engram_layers or tables:
        if tables is None:
            tables = ckpt["extra"].get("initial_tables")
        if tables is None or not Path(tables).exists():
            raise StoreError(f"table store {str(tables)!r} is missing; pass --tables T.zarr or re-run `engram train`")
        store, plan, vocab, tok = open_tables(tables)
        if cfg.engram_layers and ckpt.get("plan_fingerprint") and plan.fingerprint != ckpt["plan_fingerprint"]:
            raise CheckpointError(f"plan fingerprint of {tables!r} ({plan.fingerprint[:12]}) does not match the checkpoint's ({ckpt['plan_fingerprint'][:12]}); pass the tables it was trained with")
    else:
        from engram_cli.vocab import load_tokenizer

        tok = load_tokenizer()
    missing, unexpected = model.load_state_dict(ckpt["weights"], strict=False)
    table_names = {n for n, p in model.named_parameters() if any(p is t for t in model.table_parameters())}
    if set(missing) - table_names or unexpected:
        raise CheckpointError(f"checkpoint weights do not match its config (missing {sorted(set(missing) - table_names)[:3]}, unexpected {list(unexpected)[:3]})")
    with torch.no_grad():
        for l, w in zip(cfg.engram_layers, model.table_parameters()):
            t = load_layer_table(store, l)
            if t.shape != tuple(w.shape):
                raise CheckpointError(f"table of layer {l} has shape {t.shape}, the model expects {tuple(w.shape)}")
            w.data = torch.from_numpy(t)  # no second copy of the table
    model.eval()
    return model, store, plan, vocab, tok


def heldout_stream(ckpt: dict, tok, corpus=None, max_tokens: int = MAX_HELDOUT_TOKENS, progress=None) -> np.ndarray:
    """The held-out tokens: the checkpoint's split of its corpus, or all of --corpus."""
    if corpus is not None:
        _, held = read_split(corpus, tok, share=1.0, max_train=0, max_heldout=max_tokens, progress=progress)
        return held
    src = ckpt["heldout"].get("corpus")
    if not src or not Path(src).exists():
        raise CheckpointError(f"the training corpus {src!r} of this checkpoint is gone; pass --corpus HELDOUT/")
    _, held = read_split(src, tok, share=ckpt["heldout"].get("share", HELDOUT_SHARE), max_train=0, max_heldout=max_tokens, progress=progress)
    return held


def windows(stream: np.ndarray, block: int) -> np.ndarray:
    """Non-overlapping (N, block+1) windows (sharing one boundary token)."""
    n = (len(stream) - 1) // block
    return np.stack([stream[i * block : i * block + block + 1] for i in range(n)]) if n else np.zeros((0, block + 1), np.int64)


def evaluate_checkpoint(path, *, tables=None, corpus=None, max_tokens: int = MAX_HELDOUT_TOKENS, batch: int = 16, progress=None) -> dict:
    """The per-checkpoint report (docs/eval.md)."""
    ckpt = load_checkpoint(path)
    model, store, plan, vocab, tok = load_model(ckpt, tables)
    cfg = model.cfg
    tmap = TokenMap(np.asarray(ckpt["extra"]["token_ids"], dtype=np.int64))
    stream = heldout_stream(ckpt, tok, corpus, max_tokens, progress)
    W = windows(stream, cfg.block_size)
    if len(W) == 0:
        raise CheckpointError(f"held-out text has {len(stream)} tokens, fewer than one block of {cfg.block_size}; pass a larger --corpus")
    layers = list(cfg.engram_layers)
    nll = {"memory": 0.0, "ablated": 0.0}
    ntok = 0
    gate_vals = {l: [] for l in layers}
    est_freq = {l: [] for l in layers}
    clean = {l: [] for l in layers}
    all_rows = {l: [] for l in layers}
    hits = {l: np.asarray(store.hits(l)[:]) for l in layers} if layers and store.has_hits else {}
    with torch.no_grad():
        for s in range(0, len(W), batch):
            win = W[s : s + batch]
            x = torch.as_tensor(tmap.local(win[:, :-1]))
            y = torch.as_tensor(tmap.local(win[:, 1:]))
            rows = {l: torch.as_tensor(row_ids_for(plan, vocab, l, win[:, :-1])) for l in layers}
            _, loss = model(x, rows, targets=y)
            nll["memory"] += float(loss) * y.numel()
            _, loss_a = model(x, rows, targets=y, ablate=True)
            nll["ablated"] += float(loss_a) * y.numel()
            ntok += y.numel()
            # the gate of each Engram layer on its own input (hooked from the block)
            for l in layers:
                r = rows[l]
                all_rows[l].append(r.numpy().ravel())
                if hits:
                    hk = hits[l][r.numpy()]  # (B, T, orders*K)
                    top = hk[..., -plan.heads :]  # the highest order's heads
                    m = top.min(-1)
                    est_freq[l].append(m.ravel())
                    clean[l].append((top == m[..., None]).sum(-1).ravel() < plan.heads)  # a head hit no more than the minimum
            for l, g in _gates(model, x, rows).items():
                gate_vals[l].append(g.ravel())
            if progress is not None:
                progress("eval", min(s + batch, len(W)), len(W), path.name if hasattr(path, "name") else str(path))
    loss_m, loss_a = nll["memory"] / ntok, nll["ablated"] / ntok
    report = {
        "checkpoint": str(path),
        "tables": ckpt.get("tables"),
        "engram": bool(layers),
        "tokens": int(ntok),
        "loss": loss_m,
        "perplexity": math.exp(loss_m),
        "loss_memory_ablated": loss_a,
        "perplexity_memory_ablated": math.exp(loss_a),
        "memory_gain": loss_a - loss_m,
        "steps": ckpt["extra"].get("steps"),
        "layers": {},
    }
    for l in layers:
        rows_l = np.concatenate(all_rows[l])
        touched = np.asarray(ckpt["extra"]["touched_rows"].get(str(l), torch.zeros(0, dtype=torch.int64)), dtype=np.int64)
        g = np.concatenate(gate_vals[l])
        lay = {"gate_mean": float(g.mean())}
        if hits:
            f = np.concatenate(est_freq[l])
            edges = np.quantile(f, np.linspace(0, 1, 11))
            dec = np.clip(np.searchsorted(edges[1:-1], f, side="right"), 0, 9)
            lay["gate_by_frequency_decile"] = [{"decile": d + 1, "min_count": int(f[dec == d].min()) if (dec == d).any() else None,
                                                "gate_mean": float(g[dec == d].mean()) if (dec == d).any() else None} for d in range(10)]
            c = np.concatenate(clean[l])
            lay["gate_clean_head"] = float(g[c].mean()) if c.any() else None
            lay["gate_all_heads_collide"] = float(g[~c].mean()) if (~c).any() else None
        uniq = np.unique(rows_l)
        never = ~np.isin(rows_l, touched)
        lay["usage"] = {
            "rows": int(cfg.table_rows[str(l)]),
            "rows_touched_heldout": int(uniq.size),
            "rows_trained": int(touched.size),
            "lookups": int(rows_l.size),
            "lookups_on_untrained_rows": float(never.mean()),
        }
        w = model.table_parameters()[layers.index(l)].detach()
        norms = w.norm(dim=1).numpy()
        mask = np.zeros(len(norms), bool)
        mask[touched] = True
        q = [0.1, 0.5, 0.9]
        lay["row_norms"] = {
            "trained": dict(zip(["p10", "p50", "p90"], map(float, np.quantile(norms[mask], q)))) if mask.any() else None,
            "untouched": dict(zip(["p10", "p50", "p90"], map(float, np.quantile(norms[~mask], q)))) if (~mask).any() else None,
        }
        lay["lookups"] = lookup_report(w, rows_l, hits.get(l))
        report["layers"][str(l)] = lay
    return report


def _gates(model: EngramGPT, x, rows) -> dict:
    """Each Engram layer's gate (B, T), recomputed on the hidden state that reaches it."""
    out = {}
    T = x.shape[1]
    h = model.wte(x) + model.wpe(torch.arange(T))
    for i, b in enumerate(model.blocks):
        if b.engram is not None:
            _, g = b.engram(h, rows[i], return_gate=True)
            out[i] = g.numpy()
        h = b(h, rows.get(i) if rows else None)
    return out


def lookup_report(table: torch.Tensor, rows: np.ndarray, hits: np.ndarray | None) -> dict:
    """Lookup speed of the torch reference gather (checked bit-exact against indexing) and hot-row cache hit rates."""
    r = torch.as_tensor(rows)
    ref = table[r]
    backends = {}
    for name, fn in {"torch.embedding": lambda: torch.nn.functional.embedding(r, table), "torch.index_select": lambda: table.index_select(0, r)}.items():
        got = fn()
        t0 = time.perf_counter()
        reps = 3
        for _ in range(reps):
            fn()
        dt = (time.perf_counter() - t0) / reps
        backends[name] = {"bit_exact": bool(torch.equal(got, ref)), "lookups_per_s": r.numel() / dt,
                          "gb_per_s": r.numel() * table.shape[1] * table.element_size() / dt / 1e9}
    cache = {}
    if hits is not None:
        order = np.argsort(-hits.astype(np.int64), kind="stable")
        for share in CACHE_SHARES:
            hot = np.zeros(len(hits), bool)
            hot[order[: max(1, int(share * len(hits)))]] = True
            cache[f"{share:.0%}"] = float(hot[rows].mean())
    return {"backends": backends, "cache_hit_rate": cache}
