"""The hash-collision audit of a table plan over n-gram statistics (`engram collisions`).

Every figure is defined in docs/collisions.md. In short, for each layer, order and head
(m distinct n-grams of the order, p the head's prime, W their occurrences):

- shared (observed): share of distinct n-grams whose bucket holds another n-gram;
- shared (ideal): 1 - (1 - 1/p)^(m-1), the same share for an ideal uniform hash;
- token-weighted rate: share of W whose bucket holds another n-gram;
- shadowed mass: share of W whose n-gram is not the most frequent of its bucket;

and across the K heads of an order, for every n-gram x, `s(x)` = the most heads x shares
with any one other n-gram (its worst partner): s = K is indistinguishable, and "clean
head" means some head where x is alone in its bucket.

Hash families: `reference` (docs/spec.md, "Hash": one 64-bit multiply-XOR mix per n-gram,
reduced modulo each head's prime) and `xxh3` (XXH3_64 of the n-gram's little-endian
uint32 ids, seeded per head by `xxh3_seed`, reduced modulo the prime; computed by the
vectorized `engram_cli.xxh3`, bit-exact with the xxhash package). Their names and parser
are `engram_cli.kinds.HashFamily` (`HashFamily.parse_many` reads a --hash option).

Memory: one (layer, order) at a time, the audit holds per distinct n-gram its count
(int64) and either its mix (int64, reference) or one uint64 digest per head (xxh3),
plus per head the bucket of each n-gram (uint32; int64 only for a prime above 2^32)
and a collide flag while the across-head figures run, and a 1-byte s(x). The n-gram ids
themselves are streamed (`NgramStats.iter_batches`) and never held; the worst buckets'
members are picked by row index in one more streaming pass.

The package does not open stores: it takes a `TablePlan` and an `NgramStats`.

Modules, each one job, imports pointing down the list:

- `keys`    — one (layer, order)'s hash state (`OrderKeys`, `load_order_keys`) and exact
  duplicate detection over keys and bucket tuples;
- `figures` — every figure of one (family, layer, order): the ideal hash's, per head,
  across heads, the worst buckets, token-weighted and all-heads rates of other head sizes;
  each from integer sums that add up over disjoint bucket ranges;
- `whatif`  — what-if plans (heads, rows, budget), sweep grids, and the rows per head
  sized to a target rate (shared with `build-table --rows-per-head auto`);
- `report`  — the whole audit of a plan: `audit_collisions`, `audit_report`;
- `plot`    — the --sweep image and the figure writer (matplotlib, imported lazily).
- `saturation` — the saturation verdict (orders over 50% shared per head, and the rows
  that bring them to 25%) that build-table, collisions and inspect print.
"""

from __future__ import annotations

from .figures import (
    MAX_MEMBERS,
    TOP_BUCKETS,
    across_figures,
    across_figures_from_sums,
    across_sums,
    add_across_sums,
    add_head_sums,
    all_heads_from_sums,
    all_heads_mask,
    all_heads_share,
    audit_order,
    bucket_members,
    collided_occurrences,
    decode_ngram,
    head_figures,
    head_figures_from_sums,
    head_sums,
    ideal_all_heads,
    ideal_clean_head,
    ideal_shared,
    identical_from,
    order_audit_entry,
    rank_worst,
    read_rows,
    rows_for_rate,
    token_weighted_from_sums,
    token_weighted_rate,
    worst_bucket_entry,
    worst_buckets,
    worst_partner_heads,
    worst_partner_heads_through,
)
from .keys import (
    SMALL_SET,
    OrderKeys,
    bucket_dtype,
    collide_mask,
    count_dtype,
    duplicated,
    duplicated_rows,
    load_order_keys,
)
from .plot import check_plot_path, check_plot_support, plot_sweep, save_figure
from .report import (
    DEFAULT_FAMILIES,
    audit_collisions,
    audit_report,
    family_distance,
    plan_summary,
    validate_audit,
)
from .whatif import (
    SweepSpec,
    dim_for_heads,
    order_bytes,
    parse_sweep,
    resolve_rows,
    search_rows_for_target,
    size_for_target,
    sizing_summary,
    sweep_plans,
    sweep_summary,
    what_if_plan,
)

__all__ = [
    # the audit
    "audit_collisions",
    "audit_report",
    "validate_audit",
    "plan_summary",
    "family_distance",
    "DEFAULT_FAMILIES",
    "TOP_BUCKETS",
    "MAX_MEMBERS",
    "SMALL_SET",
    # hash state and duplicate detection
    "OrderKeys",
    "load_order_keys",
    "bucket_dtype",
    "count_dtype",
    "duplicated",
    "duplicated_rows",
    "collide_mask",
    # figures (and the sums a bucket-range partition adds up)
    "ideal_shared",
    "ideal_all_heads",
    "ideal_clean_head",
    "rows_for_rate",
    "identical_from",
    "worst_partner_heads",
    "worst_partner_heads_through",
    "head_figures",
    "head_sums",
    "add_head_sums",
    "head_figures_from_sums",
    "across_figures",
    "across_sums",
    "add_across_sums",
    "across_figures_from_sums",
    "decode_ngram",
    "read_rows",
    "worst_buckets",
    "rank_worst",
    "bucket_members",
    "worst_bucket_entry",
    "audit_order",
    "order_audit_entry",
    "token_weighted_rate",
    "collided_occurrences",
    "token_weighted_from_sums",
    "all_heads_share",
    "all_heads_mask",
    "all_heads_from_sums",
    # what-if plans, sweeps, sizing
    "what_if_plan",
    "dim_for_heads",
    "SweepSpec",
    "parse_sweep",
    "resolve_rows",
    "sweep_plans",
    "sweep_summary",
    "size_for_target",
    "search_rows_for_target",
    "order_bytes",
    "sizing_summary",
    # plots
    "check_plot_support",
    "check_plot_path",
    "plot_sweep",
    "save_figure",
]
