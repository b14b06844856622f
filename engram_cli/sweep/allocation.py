"""`engram sweep allocation`: held-out loss against rho, the share of a fixed sparse budget given to MoE experts instead of Engram rows.

The budget, as in the Engram paper: the sparse parameters are those a token does not
activate. At rho = 1 every block's FFN is `experts` routed experts (top-k) plus the
shared expert, and the sparse budget S is the routed experts a token skips:
S = layers x (experts - k) x P_e (P_e: one expert's parameters). At share rho the
experts get E = k + round(rho x S / (layers x P_e)) experts and the table gets the rest,
S - layers x (E - k) x P_e parameters, as rows per head (`rows_for_params`; the store's
primes round each head up by a few rows). Activated parameters stay fixed: k experts,
the shared expert, attention and embeddings are the same at every rho, and the Engram
branch's dense parameters (projections, norms, short convolution), which exist only
with memory, are given to the shared expert's width at rho = 1 (no memory). What is not
held exactly, and printed per point: the router (d x E weights, activated) and the
primes' rounding of the table.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from engram_cli.errors import EngramError
from engram_cli.kinds import TokenizerEngine
from engram_cli.model import ModelConfig, engram_dense_params
from engram_cli.moe import ffn_params
from engram_cli.sweep.memory import SweepOptions
from engram_cli.sweep.points import ensure_store, run_points
from engram_cli.sweep.summary import group_points, publish_sweep

DEFAULT_RHO = (0.4, 0.6, 0.8, 1.0)
DEFAULT_EXPERTS = 32  # routed experts per block at rho = 1: a sparse budget of 994k parameters at the defaults (tables of 1.6k-4.7k rows per head at rho 0.8-0.4)
DEFAULT_TOP_K = 2
DEFAULT_EXPERT_HIDDEN = 128  # one expert's width (2 x d_model at the default 64)
DEFAULT_SHARED_HIDDEN = 128  # the shared expert: one expert's width, as in DeepSeekMoE
DEFAULT_STEPS = 150  # as `engram train`: 4 rho x 2 seeds should fit 30 minutes on 2 CPU cores (docs/sweep.md)


def rows_for_params(params: int, opts: SweepOptions) -> int:
    """Rows per head whose table holds at most `params` parameters (all Engram layers, orders and heads; primes may add a few)."""
    per_row = opts.table_dim // opts.heads
    heads_total = len(opts.engram_layers) * (opts.max_ngram - 1) * opts.heads
    return params // (per_row * heads_total)


def branch_params(opts: SweepOptions) -> int:
    """Dense parameters of the Engram branches at this layout (they do not depend on the table's rows)."""
    head_dim = opts.table_dim // opts.heads
    cfg = ModelConfig(d_model=opts.d_model, n_layer=opts.n_layer, engram_layers=opts.engram_layers, head_dim=head_dim,
                      mem_dim=(opts.max_ngram - 1) * opts.heads * head_dim, table_rows={str(l): 2 for l in opts.engram_layers},
                      max_ngram_size=opts.max_ngram)
    return engram_dense_params(cfg)


def allocation_sizes(rho: float, opts: SweepOptions, *, experts: int, top_k: int, expert_hidden: int, shared_hidden: int) -> dict:
    """The sizes at `rho`: experts, the table's parameter share and rows per head, the shared expert's width."""
    if not 0 <= rho <= 1:
        raise EngramError(f"--rho {rho} is not between 0 and 1")
    p_e = ffn_params(opts.d_model, expert_hidden)
    sparse = opts.n_layer * (experts - top_k) * p_e
    n_exp = top_k + round(rho * sparse / (opts.n_layer * p_e))
    table_budget = sparse - opts.n_layer * (n_exp - top_k) * p_e
    rows = rows_for_params(table_budget, opts)
    engram = rows >= 2
    shared = shared_hidden
    if not engram:  # no memory: the Engram branches' dense (activated) parameters go to the shared expert
        shared += round(branch_params(opts) / opts.n_layer / (2 * opts.d_model + 1))
    return {"rho": rho, "experts": n_exp, "top_k": top_k, "expert_params": p_e, "sparse_params": sparse,
            "inactive_expert_params": opts.n_layer * (n_exp - top_k) * p_e, "table_budget_params": table_budget,
            "rows_per_head": rows if engram else None, "engram": engram, "shared_hidden": shared,
            "model_options": {"moe_experts": n_exp, "moe_top_k": top_k, "moe_hidden": expert_hidden, "moe_shared_hidden": shared}}


def run_allocation_sweep(corpus, out_dir, *, rhos=DEFAULT_RHO, opts: SweepOptions | None = None, experts: int = DEFAULT_EXPERTS,
                         top_k: int = DEFAULT_TOP_K, expert_hidden: int = DEFAULT_EXPERT_HIDDEN, shared_hidden: int = DEFAULT_SHARED_HIDDEN,
                         jobs: int = 1, plot: bool = True, tokenizer_engine=TokenizerEngine.HF, progress=None, notice=None) -> dict:
    """Run (or resume) the allocation sweep into `out_dir`; the result, also written to `out_dir/allocation.json` (docs/sweep.md)."""
    opts = opts or SweepOptions(steps=DEFAULT_STEPS)
    opts.check()
    if not 1 <= top_k < experts:
        raise EngramError(f"--top-k {top_k} must be at least 1 and below --experts {experts} (the sparse budget is the experts a token skips)")
    sizes = [allocation_sizes(float(r), opts, experts=experts, top_k=top_k, expert_hidden=expert_hidden, shared_hidden=shared_hidden) for r in rhos]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with_memory = [s for s in sizes if s["engram"]]
    tables = {id(s): opts.table(rows_per_head=s["rows_per_head"]) for s in with_memory}
    # without memory the store only lends its tokenizer: the smallest table of the sweep (or one of 2 rows per head)
    tokenizer_table = min(tables.values(), key=lambda t: t.rows_per_head) if tables else opts.table(rows_per_head=2)
    stores = {}
    for spec in [*tables.values(), tokenizer_table]:
        if spec.digest() not in stores:
            stores[spec.digest()] = ensure_store(spec, corpus, out_dir, tokenizer_engine=tokenizer_engine, progress=progress, notice=notice)
    specs = [opts.point(sweep="allocation", label=f"rho {s['rho']:g}", table=tables.get(id(s), tokenizer_table), engram=s["engram"], seed=seed, rho=s["rho"],
                        model_options=s["model_options"]) for seed in range(opts.seeds) for s in sizes]  # seed by seed, as `sweep memory`
    points = run_points(specs, corpus, out_dir, stores, jobs=jobs, tokenizer_engine=tokenizer_engine, progress=progress, notice=notice)
    by_rho = {s["rho"]: s for s in sizes}
    points = [{**p, **{k: by_rho[p["rho"]][k] for k in ("experts", "sparse_params", "inactive_expert_params", "table_budget_params")}} for p in points]
    for p in points:  # what the budget came out as, with the primes' rounding
        p["sparse_params_actual"] = p["inactive_expert_params"] + p["table_params"]
    groups = group_points(points)
    result = {
        "sweep": "allocation", "corpus": str(corpus), "out": str(out_dir),
        "options": {**asdict(opts), "experts": experts, "top_k": top_k, "expert_hidden": expert_hidden, "shared_hidden": shared_hidden, "jobs": jobs},
        "sizes": sizes, "points": points, "groups": groups, "seconds": time.perf_counter() - t0, "plot": None,
    }
    return publish_sweep(result, out_dir, "allocation", plot=plot, x_key="rho", x_label="rho: share of the sparse budget given to MoE experts",
                         log_x=False, title=f"allocation sweep: {opts.steps} steps, {opts.n_layer} layers x {opts.d_model}, {opts.seeds} seed(s)")

