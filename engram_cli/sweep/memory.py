"""`engram sweep memory`: held-out loss against table size, same backbone, data order and steps, with seeds and controls.

Each table size gets its own initial store (`points.ensure_store`: the same layers,
heads, row width and hash seed; only the rows per head differ), and each (size, seed)
one `engram train` + `engram eval` point. The controls: the same backbone without
memory, parameter-matched (`engram train --no-engram --param-matched`: the Engram
branches' dense parameters given to the FFN), per seed; and every trained model's table
ablations from `engram eval` (branch skipped, initial rows, shuffled rows, mean row).
The batches depend only on the seed, so every size sees the same data in the same order.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engram_cli.errors import EngramError
from engram_cli.kinds import TokenizerEngine
from engram_cli.sweep.points import (
    PointSpec,
    TableSpec,
    ensure_store,
    run_points,
)
from engram_cli.sweep.summary import (
    group_points,
    per_seed_slopes,
    power_law,
    publish_sweep,
)
from engram_cli.vocab import DEFAULT_TOKENIZER

# Defaults sized so `engram sweep memory fixtures/corpus` runs in under 20 minutes on 2 CPU cores
# (measured: docs/sweep.md, "Measured"): a 2-layer, 64-wide backbone (the output head over the
# corpus's ~15k token ids is most of a step), one Engram layer, 4 heads of 16-wide rows.
DEFAULT_STEPS = 100  # 102k training tokens: about 1 CPU-second a step here, so 8 points stay under 20 minutes (docs/sweep.md)
DEFAULT_SEEDS = 2
DEFAULT_D_MODEL = 64
DEFAULT_N_LAYER = 2
DEFAULT_ENGRAM_LAYERS = (1,)
DEFAULT_HEADS = 4
DEFAULT_TABLE_DIM = 64  # n_embed_per_ngram: 4 heads of 16
DEFAULT_MAX_NGRAM = 3
DEFAULT_ROWS_PER_HEAD = (256, 4096, 65536)  # table params x16 each step: 32.8k, 524k, 8.4M (2 orders x 4 heads x 16 wide)
DEFAULT_BATCH = 8
DEFAULT_BLOCK = 128
DEFAULT_LR = 3e-3
DEFAULT_OUT = "sweep"
CONTROL_LABEL = "no memory (param-matched)"


@dataclass(frozen=True)
class SweepOptions:
    """What every point of a sweep shares: the backbone, the training, the table layout."""

    steps: int = DEFAULT_STEPS
    seeds: int = DEFAULT_SEEDS
    d_model: int = DEFAULT_D_MODEL
    n_layer: int = DEFAULT_N_LAYER
    engram_layers: tuple[int, ...] = DEFAULT_ENGRAM_LAYERS
    heads: int = DEFAULT_HEADS
    table_dim: int = DEFAULT_TABLE_DIM
    max_ngram: int = DEFAULT_MAX_NGRAM
    batch: int = DEFAULT_BATCH
    block: int = DEFAULT_BLOCK
    lr: float = DEFAULT_LR
    split: str = "document"
    heldout_fraction: float = 0.1
    tokenizer: str = DEFAULT_TOKENIZER

    def check(self) -> None:
        if self.seeds < 1 or self.steps < 1:
            raise EngramError(f"--seeds {self.seeds} and --steps {self.steps} must be at least 1")
        if max(self.engram_layers) >= max(self.n_layer, 1) and self.n_layer:
            raise EngramError(f"--engram-layers {list(self.engram_layers)} needs --layers above {max(self.engram_layers)}; the backbone has {self.n_layer}")
        if self.d_model % 4:
            raise EngramError(f"--dim {self.d_model} must be a multiple of the 4 attention heads")

    def table(self, **size) -> TableSpec:
        return TableSpec(layer_ids=self.engram_layers, heads=self.heads, dim=self.table_dim, max_ngram=self.max_ngram, tokenizer=self.tokenizer, **size)

    def point(self, **kw) -> PointSpec:
        return PointSpec(steps=self.steps, d_model=self.d_model, n_layer=self.n_layer, batch=self.batch, block=self.block, lr=self.lr,
                         split=self.split, heldout_fraction=self.heldout_fraction, **kw)


def size_label(rows_per_head: int | None, budget: str | None) -> str:
    return f"budget {budget}" if budget else f"rows {rows_per_head:,}"


def run_memory_sweep(corpus, out_dir, *, rows_per_head: list[int] | None = None, budgets: list[str] | None = None, opts: SweepOptions | None = None,
                     jobs: int = 1, plot: bool = True, tokenizer_engine=TokenizerEngine.HF, progress=None, notice=None) -> dict:
    """Run (or resume) the memory sweep into `out_dir`; the result, also written to `out_dir/sweep.json` (docs/sweep.md)."""
    opts = opts or SweepOptions()
    opts.check()
    if rows_per_head and budgets:
        raise EngramError("give --rows-per-head or --budget, not both")
    sizes = [{"budget": b} for b in budgets] if budgets else [{"rows_per_head": int(r)} for r in (rows_per_head or DEFAULT_ROWS_PER_HEAD)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stores = {}
    for size in sizes:
        spec = opts.table(**size)
        stores[spec.digest()] = ensure_store(spec, corpus, out_dir, tokenizer_engine=tokenizer_engine, progress=progress, notice=notice)
    specs = []  # seed by seed, so a sweep stopped early still has whole curves
    for s in range(opts.seeds):
        specs += [opts.point(sweep="memory", label=size_label(size.get("rows_per_head"), size.get("budget")), table=opts.table(**size), engram=True, seed=s)
                  for size in sizes]
        specs.append(opts.point(sweep="memory", label=CONTROL_LABEL, table=opts.table(**sizes[0]), engram=False, param_matched=True, seed=s))
    points = run_points(specs, corpus, out_dir, stores, jobs=jobs, tokenizer_engine=tokenizer_engine, progress=progress, notice=notice)
    groups = group_points(points)
    result = {
        "sweep": "memory", "corpus": str(corpus), "out": str(out_dir), "options": {**asdict(opts), "jobs": jobs},
        "points": points, "groups": groups, "power_law": power_law(groups), "power_law_per_seed": per_seed_slopes(points),
        "stores": list(stores.values()), "seconds": time.perf_counter() - t0, "plot": None,
    }
    return publish_sweep(result, out_dir, "sweep", plot=plot, x_key="table_params", x_label="Engram table parameters", log_x=True,
                         title=f"memory sweep: {opts.steps} steps, {opts.n_layer} layers x {opts.d_model}, {opts.seeds} seed(s)")
