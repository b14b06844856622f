"""Audit without a backbone: a plain state dict's Engram tables against a table store, no model.

`engram eval --state-dict FILE --tables T.zarr [--corpus DIR]` (docs/eval.md, "--state-dict").
FILE is a safetensors file or a torch state dict (loaded with `weights_only=True`,
memory-mapped) in the reference demo's layout: per Engram layer
`multi_head_embedding.embedding.weight` and optionally `value_proj`, `key_projs.*`,
`norm1.*`, `norm2.*`, `short_conv.*`, under a prefix that names the layer (`layers.1.`,
`blocks.1.engram.`; engram_cli.exchange.find_tables). T.zarr supplies the plan, the
vocabulary (hashing) and the rows the tables started from.

Per layer it reports the table's shape against the plan; row norms (one pass, chunk
by chunk: exact min, max, mean and zero rows, quantiles from a log-spaced histogram);
rows that differ from the store's; usage by the text (`--corpus`, hashed with the
plan) or, without one, by the store's hit counts (the build corpus' lookups): rows
touched and the share of lookups on zero rows and on rows equal to the store's; and
lookup parity: every lookup backend that can run here against the torch reference
on the same token ids, bit for bit, GB/s of the rows read, and hot-row cache hit
rates (evaluate.cache_hit_rates). Nothing loads a whole table: tensors stay memory-mapped.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engram_cli.errors import CheckpointError
from engram_cli.evaluate import cache_hit_rates
from engram_cli.exchange import (
    WEIGHT,
    check_fingerprint,
    check_table,
    find_tables,
    open_tensor_file,
)
from engram_cli.kernels import EngramLookup, available_backends
from engram_cli.kinds import Backend, TokenizerEngine
from engram_cli.model import row_ids_for
from engram_cli.store import TableStore, from_storage
from engram_cli.store.output import hold_read
from engram_cli.split import MAX_HELDOUT_TOKENS, read_split
from engram_cli.train import open_tables

PARITY_WINDOWS = 16  # token windows (of PARITY_BLOCK) hashed and gathered by every backend
PARITY_BLOCK = 128
RANDOM_IDS_SEED = 0  # without --corpus, parity runs on seeded random tokenizer ids
HIST_DECADES = (-12, 6)  # row norms 1e-12 .. 1e6 (outside: the end bins)
HIST_BINS_PER_DECADE = 200  # quantiles to within 10**(1/200) - 1 = 1.2 % (relative)


class NormHistogram:
    """Row norms seen chunk by chunk: exact count, zeros, min, max, mean; quantiles to 1.2 %."""

    def __init__(self):
        lo, hi = HIST_DECADES
        self.edges = np.logspace(lo, hi, (hi - lo) * HIST_BINS_PER_DECADE + 1)
        self.counts = np.zeros(len(self.edges) - 1, np.int64)
        self.n = self.zeros = 0
        self.total = 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, norms: np.ndarray) -> None:
        norms = np.asarray(norms, dtype=np.float64)
        if not norms.size:
            return
        self.n += norms.size
        self.total += float(norms.sum())
        self.lo, self.hi = min(self.lo, float(norms.min())), max(self.hi, float(norms.max()))
        pos = norms[norms > 0]
        self.zeros += norms.size - pos.size
        idx = np.clip(np.searchsorted(self.edges, pos, side="right") - 1, 0, len(self.counts) - 1)
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def quantile(self, q: float) -> float:
        """The q-quantile (lower, like numpy's 'lower' method) as the geometric centre of its bin."""
        k = int(np.floor(q * (self.n - 1)))  # 0-based rank
        if k < self.zeros:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.counts), k - self.zeros + 1))
        mid = float(np.sqrt(self.edges[i] * self.edges[i + 1]))
        return min(max(mid, self.lo), self.hi)

    def summary(self) -> dict:
        if not self.n:
            return {}
        return {"min": self.lo, "p10": self.quantile(0.1), "p50": self.quantile(0.5), "p90": self.quantile(0.9),
                "max": self.hi, "mean": self.total / self.n, "zero_rows": int(self.zeros)}


def module_shapes(tf, prefix: str, plan, source) -> dict | None:
    """The Engram module's other tensors under `prefix`, checked against the plan's row width.

    value_proj / key_projs.i: (hidden, (max_ngram-1) * n_embed_per_ngram) weights;
    norm1.i / norm2.i: (hidden,); short_conv.conv.weight: (hidden * hc_mult, 1, kernel).
    None when the state dict holds the table alone.
    """
    names = [k for k in tf.keys() if k.startswith(prefix) and not k.startswith(prefix + "multi_head_embedding.")]
    if not names:
        return None
    mem_dim = plan.heads_per_layer * plan.head_dim
    hidden = None

    def want(name: str, shape: tuple) -> None:
        if tf.shape(name) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tf.shape(name)}, the plan (rows of {plan.heads_per_layer} x {plan.head_dim}) needs {shape}; "
                                  "the state dict was made for another plan: pass the matching --tables")

    for proj in [prefix + "value_proj.weight"] + sorted(k for k in names if k.startswith(prefix + "key_projs.") and k.endswith(".weight")):
        if proj in names:
            hidden = tf.shape(proj)[0] if hidden is None else hidden
            want(proj, (hidden, mem_dim))
    hc = len([k for k in names if k.startswith(prefix + "key_projs.") and k.endswith(".weight")])
    vectors = tuple(prefix + p for p in ("norm1.", "norm2.", "short_conv.norm"))  # RMSNorm weights (short_conv.norms.i in the demo)
    if hidden is not None:
        for k in names:
            if k.startswith(vectors) or (k.endswith(".bias") and k.startswith((prefix + "value_proj.", prefix + "key_projs."))):
                want(k, (hidden,))
    conv = prefix + "short_conv.conv.weight"
    kernel = None
    if conv in names:
        shape = tf.shape(conv)
        if len(shape) != 3 or shape[1] != 1 or (hidden is not None and shape[0] != hidden * max(hc, 1)):
            raise CheckpointError(f"{source}: {conv} has shape {shape}, a depthwise conv over {hidden} x {max(hc, 1)} channels needs ({(hidden or 0) * max(hc, 1)}, 1, kernel)")
        kernel = shape[2]
    return {"hidden_size": hidden, "hc_mult": hc, "conv_kernel": kernel, "tensors": len(names) + 1}


def lookup_parity(plan, vocab, layer_id: int, table: torch.Tensor, token_ids: np.ndarray) -> dict:
    """Each available backend's rows for `token_ids` against the torch reference backend: bit-exact, tokens/s."""
    ids = torch.as_tensor(token_ids)
    ref = EngramLookup(plan, vocab, layer_id, table, backend=Backend.TORCH)(ids)
    runs = [(b, None) for b in available_backends(torch.device("cpu"))]
    if torch.cuda.is_available():  # triton compiled for the device rather than interpreted
        runs = [r for r in runs if r[0] != Backend.TRITON] + [(Backend.TRITON, "cuda")]
    out = {}
    for b, dev in runs:
        lk = EngramLookup(plan, vocab, layer_id, table, backend=b, device=dev)
        t0 = time.perf_counter()
        got = lk(ids)
        dt = time.perf_counter() - t0
        out[b] = {"bit_exact": bool(torch.equal(got.cpu(), ref)), "tokens_per_s": ids.numel() / dt if dt > 0 else None}
    return out


def gather_report(parity: dict, rows_per_token: float, row_bytes: int, cache_hit_rate: dict) -> dict:
    """The checkpoint report's `lookups` block from the parity runs: per backend rows read per second and GB/s."""
    backends = {}
    for name, p in parity.items():
        tps = p["tokens_per_s"]
        backends[name] = {"bit_exact": p["bit_exact"], "tokens_per_s": tps,
                          "gb_per_s": None if tps is None else tps * rows_per_token * row_bytes / 1e9}
    return {"backends": backends, "cache_hit_rate": cache_hit_rate}


def _text_ids(tables, corpus, max_tokens: int, progress, tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF) -> np.ndarray | None:
    """Raw tokenizer ids of --corpus (all of it held out, capped), with the tables' tokenizer encoding with `tokenizer_engine`."""
    if corpus is None:
        return None
    _, _, _, tok = open_tables(tables, tokenizer_engine)
    _, held = read_split(corpus, tok, share=1.0, max_train=0, max_heldout=max_tokens, progress=progress)
    if not len(held):
        raise CheckpointError(f"corpus {str(corpus)!r} holds no tokens; pass a folder of text with --corpus")
    return held


def audit_state_dict(path, tables, *, corpus=None, max_tokens: int | None = None, tokenizer_engine: TokenizerEngine | str = TokenizerEngine.HF, progress=None) -> dict:
    """The `engram eval --state-dict` report (schema: docs/eval.md, "--state-dict")."""
    hold_read(tables)  # inside `read_locks()` (the command): no --force rebuild replaces the store while it is audited
    store = TableStore.open(tables)
    plan, vocab = store.plan, store.vocab
    source = str(path)
    tf = open_tensor_file(path)
    check_fingerprint(tf, plan, source)
    prefixes = find_tables(tf.keys(), plan, source)
    if not prefixes:
        raise CheckpointError(f"{source} holds no Engram table (no key ending in {WEIGHT!r}); pass a state dict of the reference module or `engram export` output")
    text = _text_ids(tables, corpus, max_tokens or MAX_HELDOUT_TOKENS, progress, tokenizer_engine)
    if text is not None:
        n_win = min(PARITY_WINDOWS, max(1, len(text) // PARITY_BLOCK))
        parity_ids = np.resize(text, n_win * PARITY_BLOCK).reshape(n_win, PARITY_BLOCK)
    else:
        rng = np.random.default_rng(RANDOM_IDS_SEED)
        parity_ids = rng.integers(0, len(vocab.lookup), size=(4, PARITY_BLOCK), dtype=np.int64)
    report = {
        "state_dict": source, "file_format": tf.kind, "tables": str(store.path), "plan_fingerprint": plan.fingerprint,
        "fingerprint_checked": bool(tf.metadata.get("plan_fingerprint")),
        "text": {"source": "corpus" if text is not None else ("store hits" if store.has_hits else "none"),
                 "path": None if corpus is None else str(corpus), "tokens": None if text is None else int(len(text))},
        "parity_tokens": int(parity_ids.size),
        "layers": {},
    }
    missing = [l for l in plan.layer_ids if l not in prefixes]
    report["layers_missing"] = missing
    for l in sorted(prefixes):
        c = check_table(tf, prefixes[l], l, plan, source)
        if c["dtype"] == torch.float8_e4m3fn:
            raise CheckpointError(f"{source}: layer {l} holds float8_e4m3 values with separate scales, which the reference module cannot load; "
                                  "audit a `--format reference` export (float32 rows) instead")
        module = module_shapes(tf, prefixes[l], plan, source)
        W = tf.tensor(c["weight"])  # (rows, head_dim), memory-mapped
        rows = plan.layer_rows(l)
        hist = NormHistogram()
        changed_rows = 0
        hit_lookups = hit_zero = hit_same = hit_rows = 0
        use_hits = text is None and store.has_hits
        for a in range(0, rows, store.chunk_rows):
            b = min(rows, a + store.chunk_rows)
            w = W[a:b].float()
            norms = torch.linalg.vector_norm(w, dim=1).numpy()
            hist.add(norms)
            init = torch.from_numpy(np.asarray(from_storage(store.load_layer(l, rows=(a, b)), store.dtype), dtype=np.float32))
            same = (w.view(torch.int32) == init.view(torch.int32)).all(dim=1).numpy()
            changed_rows += int((~same).sum())
            if use_hits:
                h = np.asarray(store.hits(l)[a:b], dtype=np.int64)
                hit_lookups += int(h.sum())
                hit_zero += int(h[norms == 0].sum())
                hit_same += int(h[same].sum())
                hit_rows += int((h > 0).sum())
            if progress is not None:
                progress("auditing", b, rows, f"layer {l}")
        usage = None
        if text is not None:
            flat = row_ids_for(plan, vocab, l, text[None]).reshape(-1)
            uniq, counts = np.unique(flat, return_counts=True)
            wu = W[torch.as_tensor(uniq)].float()
            init = torch.from_numpy(np.asarray(store.read_rows(l, uniq), dtype=np.float32))
            zero = (torch.linalg.vector_norm(wu, dim=1) == 0).numpy()
            same = (wu.view(torch.int32) == init.view(torch.int32)).all(dim=1).numpy()
            usage = {"lookups": int(flat.size), "rows_touched": int(uniq.size), "rows_touched_share": uniq.size / rows,
                     "lookups_on_zero_rows": float(counts[zero].sum() / flat.size), "lookups_on_unchanged_rows": float(counts[same].sum() / flat.size)}
        elif use_hits and hit_lookups:
            usage = {"lookups": hit_lookups, "rows_touched": hit_rows, "rows_touched_share": hit_rows / rows,
                     "lookups_on_zero_rows": hit_zero / hit_lookups, "lookups_on_unchanged_rows": hit_same / hit_lookups}
        lk_rows = row_ids_for(plan, vocab, l, parity_ids).reshape(-1)
        parity = lookup_parity(plan, vocab, l, W, parity_ids)
        report["layers"][str(l)] = {
            "key": c["weight"], "rows": rows, "head_dim": plan.head_dim, "dtype": str(c["dtype"]).removeprefix("torch."),
            "module": module, "row_norms": hist.summary(), "rows_changed": changed_rows, "usage": usage,
            "parity": parity,
            "lookups": gather_report(parity, lk_rows.size / parity_ids.size, plan.head_dim * W.element_size(), cache_hit_rates(store, l, lk_rows)),
        }
    return report

