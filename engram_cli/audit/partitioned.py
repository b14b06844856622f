"""The collision audit partitioned by bucket range: `audit.audit_collisions`, bit for bit, as tasks on any Executor.

Per (family, layer, order), a shuffle splits row ranges of the order's n-grams by the
bucket range each head puts them in (`scatter_row_range`); a task per bucket range of
every head computes the per-head sums, the worst buckets and each n-gram's best
partner within the head (`audit_bucket_range`); a task per row range joins the heads
by row into s(x) (`audit_row_range`). Every partial result is an integer sum or a
top-k, merged exactly; the figures are then computed by the audit's own functions.
`audit_collisions_distributed` runs it on a Ray cluster (`engram collisions --cluster`)
over a store's statistics. No task or the driver holds a whole order.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from ..defaults import DEFAULT_MEMORY_LIMIT
from ..errors import OutputError, StoreError
from ..execution.ray import ClusterSpec, executor_for
from ..execution.work import Progress, StageCounter, atomic_dir, fingerprint, run_all
from ..kinds import HashFamily
from ..ngrams import order_file, token_columns
from ..store import TableStore
from .figures import (
    across_figures_from_sums,
    across_sums,
    add_across_sums,
    add_head_sums,
    all_heads_from_sums,
    all_heads_mask,
    bucket_members,
    decode_ngram,
    head_figures_from_sums,
    head_sums,
    order_audit_entry,
    rank_worst,
    token_weighted_from_sums,
    worst_bucket_entry,
    worst_partner_heads_through,
)
from .keys import collide_mask, count_dtype, load_order_keys
from .report import audit_report, validate_audit
from .whatif import search_rows_for_target, sweep_plans

# Bytes a bucket-range task holds per n-gram of its range and head: 40 + 16 * heads (row, ids,
# count, hash state, every head's bucket, masks, temporaries). Measured with tracemalloc on
# 1 M trigrams (docs/scale-out.md): 40-63 (reference) and 68-101 (xxh3) for 4-8 heads,
# under the formula's 104-168; a shuffle task holds 92-148 bytes per row of its row range.
AUDIT_BYTES_PER_HEAD = (40, 16)


def bucket_range(p: int, part: int, parts: int) -> tuple[int, int]:
    """Buckets [lo, hi) of range `part` of `parts` equal ranges of a head with `p` buckets."""
    return int(p) * part // parts, int(p) * (part + 1) // parts


class _OneBatch:
    """In-memory n-grams of one order with the face of `NgramStats` that `audit.keys.load_order_keys` reads."""

    def __init__(self, ids, counts):
        self.ids, self.counts = ids, counts

    def distinct(self, order: int) -> int:
        return int(self.counts.size)

    def iter_batches(self, order: int, batch_rows: int):
        yield self.ids, self.counts


def hash_state(plan, family: str, layer: int, order: int, ids, counts, heads: int):
    """`audit.OrderKeys` of these n-grams (ids (m, n), counts (m,)): what every head's bucket comes from.

    The audit's own hashing (`audit.keys.load_order_keys`), over these n-grams as one batch.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1, order)
    return load_order_keys(plan, _OneBatch(ids, counts), layer, order, family, heads=heads)


def range_of_bucket(b, p: int, parts: int):
    """The `bucket_range` index of each bucket b (inverse of `bucket_range`: p * r // parts <= b < p * (r + 1) // parts)."""
    return ((np.asarray(b, dtype=np.int64) + 1) * parts + int(p) - 1) // int(p) - 1


def stream_bucket_ranges(plan, stats, family: str, layer: int, order: int, primes, part: int, parts: int, *, batch_rows: int):
    """One streaming pass over an order's n-grams: for each head j (prime `primes[j]`), the
    (row indices, `audit.OrderKeys`) of the n-grams whose head-j bucket lies in range
    `part` of `parts` (`bucket_range`). The keys hold the hash state of every head, so all
    their buckets follow; a head's bucket range holds every n-gram of its buckets.
    (`scatter_row_range` + `gather_bucket_ranges` give the same without re-reading the order.)"""
    K = len(primes)
    rows, counts, ids_ = ([[] for _ in range(K)] for _ in range(3))
    offset = 0
    for ids, cnt in stats.iter_batches(order, batch_rows):
        batch = hash_state(plan, family, layer, order, ids, cnt, K)
        for j, p in enumerate(primes):
            sel = np.flatnonzero(range_of_bucket(batch.buckets(j, p), p, parts) == part)
            rows[j].append(sel + offset)
            counts[j].append(cnt[sel])
            ids_[j].append(ids[sel])
        offset += cnt.size
    return [_range_keys(plan, family, layer, order, rows[j], ids_[j], counts[j], K) for j in range(K)]


def _range_keys(plan, family, layer, order, rows, ids, counts, heads):
    cat = lambda xs, empty: np.concatenate(xs) if xs else empty  # noqa: E731
    c = cat(counts, np.zeros(0, np.int64))
    return cat(rows, np.zeros(0, np.int64)), hash_state(plan, family, layer, order, cat(ids, np.zeros((0, order), np.int64)), c, heads)


def scatter_row_range(stats, plan, family: str, layer: int, order: int, start: int, stop: int, parts: int, out_dir: str) -> str:
    """Shuffle task: rows [start, stop) of an order, split for every head j by the bucket range
    (of `parts`) their head-j bucket falls in, into `out_dir/h{j}` (rows, ids as uint32, counts,
    each grouped by range in row order, and the groups' `offsets`). Written atomically."""
    primes = [int(p) for p in plan.primes[layer][order - 2]]
    cols = token_columns(order)
    frame = pl.scan_parquet(order_file(stats.root, order)).select([*cols, "count"]).slice(start, stop - start).collect()
    ids = np.stack([frame.get_column(c).to_numpy().astype(np.int64) for c in cols], axis=1) if frame.height else np.zeros((0, order), np.int64)
    counts = frame.get_column("count").to_numpy().astype(np.int64)
    del frame
    keys = hash_state(plan, family, layer, order, ids, counts, len(primes))
    with atomic_dir(Path(out_dir), fingerprint(out_dir)) as tmp:
        for j, p in enumerate(primes):
            r = range_of_bucket(keys.buckets(j, p), p, parts)
            by_range = np.argsort(r, kind="stable")
            head = tmp / f"h{j}"
            head.mkdir()
            np.save(head / "offsets.npy", np.concatenate([[0], np.cumsum(np.bincount(r, minlength=parts))]))
            np.save(head / "rows.npy", by_range + start)
            np.save(head / "ids.npy", ids[by_range].astype(np.uint32))
            np.save(head / "counts.npy", counts[by_range])
    return out_dir


def gather_bucket_ranges(plan, family: str, layer: int, order: int, part: int, scatter_dirs: list[str]):
    """`stream_bucket_ranges` from the shuffle files of `scatter_row_range` (in row order):
    reads only this range's slice of each file."""
    K = len(plan.primes[layer][order - 2])
    out = []
    for j in range(K):
        rows, ids, counts = [], [], []
        for d in scatter_dirs:
            head = Path(d) / f"h{j}"
            lo, hi = np.load(head / "offsets.npy")[part:part + 2]
            rows.append(np.asarray(np.load(head / "rows.npy", mmap_mode="r")[lo:hi]))
            ids.append(np.asarray(np.load(head / "ids.npy", mmap_mode="r")[lo:hi], dtype=np.int64))
            counts.append(np.asarray(np.load(head / "counts.npy", mmap_mode="r")[lo:hi]))
        out.append(_range_keys(plan, family, layer, order, rows, ids, counts, K))
    return out


def audit_bucket_range(stats, plan, family: str, layer: int, order: int, part: int, parts: int, out_dir: str, *, top: int, scatter_dirs: list[str] | None = None, batch_rows: int = 1 << 20) -> dict:
    """Task: the audit of one (family, layer, order) over bucket range `part` of `parts` of every head.

    Returns each head's `head_sums` over its range, the range's `top` worst-bucket
    candidates with their members, and (head 0's range) the n-grams with a duplicated
    mix. Writes, per head j, the n-grams colliding in head j with the most heads they
    share with a partner of their bucket (`audit.worst_partner_heads_through`), into
    `out_dir/h{j}` (rows, s, counts: .npy, row order): `audit_row_range` joins the heads
    by row into s(x). The range's n-grams come from the shuffle files of
    `scatter_row_range` (`scatter_dirs`, in row order), else from streaming the order.
    """
    primes = [int(p) for p in plan.primes[layer][order - 2]]
    result = {"heads": [], "worst": [], "mix_duplicates": None, "mix_dup_occurrences": None}
    cands = []
    subsets = (gather_bucket_ranges(plan, family, layer, order, part, scatter_dirs) if scatter_dirs is not None
               else stream_bucket_ranges(plan, stats, family, layer, order, primes, part, parts, batch_rows=batch_rows))
    for j, (rows, sub) in enumerate(subsets):
        lo, hi = bucket_range(primes[j], part, parts)
        buckets = [sub.buckets(i, p) for i, p in enumerate(primes)]
        sums, collide, worst = head_sums(buckets[j] - buckets[j].dtype.type(lo), sub.counts, hi - lo, head=j, top=top, offset=lo)
        result["heads"].append(sums)
        cands += [(c, rows[buckets[j] == c[4]]) for c in worst]
        dup = sub.mix_duplicated()
        if j == 0 and dup is not None:
            result["mix_duplicates"], result["mix_dup_occurrences"] = int(dup.sum()), int(sub.counts[dup].sum())
        s = worst_partner_heads_through([b[collide] for b in buckets], primes, j, mix_duplicated=None if dup is None else dup[collide])
        with atomic_dir(Path(out_dir) / f"h{j}", fingerprint(out_dir, j)) as tmp:
            for name, values in (("rows", rows[collide]), ("s", s), ("counts", sub.counts[collide])):
                np.save(tmp / f"{name}.npy", values)
    chosen = rank_worst([c for c, _ in cands], top)
    member_rows = {c: r for c, r in cands}
    members = bucket_members(stats, order, [member_rows[c] for c in chosen], vocab_keys=None)  # the driver decodes
    result["worst"] = list(zip(chosen, members))
    return result


def audit_row_range(head_dirs: list[str], heads: int, start: int, stop: int) -> dict:
    """Task: `audit.across_sums` of the rows [start, stop) that collide in some head, joined
    from every head's bucket-range files (s(x) is the most over its heads, exact: x's worst
    partner shares one of x's buckets, so that head's range holds both)."""
    n = stop - start
    s = np.zeros(n, dtype=count_dtype(heads))
    colliding = np.zeros(n, dtype=count_dtype(heads))
    counts = np.zeros(n, dtype=np.int64)
    for d in head_dirs:
        rows = np.load(Path(d) / "rows.npy", mmap_mode="r")
        i, k = np.searchsorted(rows, [start, stop])
        local = np.asarray(rows[i:k]) - start
        s[local] = np.maximum(s[local], np.load(Path(d) / "s.npy", mmap_mode="r")[i:k])
        colliding[local] += 1
        counts[local] = np.load(Path(d) / "counts.npy", mmap_mode="r")[i:k]
    seen = colliding > 0
    return across_sums(s[seen], colliding[seen], counts[seen], heads)


def rates_bucket_range(stats, plan, family: str, layer: int, order: int, primes, part: int, parts: int, *, batch_rows: int = 1 << 20) -> dict:
    """Task: over bucket range `part` of `parts`, each head's `collided_occurrences` and (head 0's
    range) the n-grams sharing every head with one other (`all_heads_mask`), for head sizes `primes`."""
    primes = [int(p) for p in primes]
    collided, every = [], (0, 0)
    for j, (_, sub) in enumerate(stream_bucket_ranges(plan, stats, family, layer, order, primes, part, parts, batch_rows=batch_rows)):
        collided.append(int(sub.counts[collide_mask(sub.buckets(j, primes[j]), primes[j])].sum()))
        if j == 0:
            mask = all_heads_mask(sub, primes)
            every = (int(mask.sum()), int(sub.counts[mask].sum()))
    return {"collided": collided, "all_heads": every}


def audit_parts(plan, stats, *, heads: int, memory_limit: int, cpus: int) -> int:
    """Bucket ranges per head: enough that one task's share of the largest order fits half of
    `memory_limit` (the other half: the streamed batches), at least `cpus`."""
    largest = max(stats.distinct(n) for n in plan.orders)
    fixed, per_head = AUDIT_BYTES_PER_HEAD
    need = largest * heads * (fixed + per_head * heads)
    return max(1, cpus, -(-need // max(1, memory_limit // 2)))


def audit_collisions_partitioned(
    plan,
    stats,
    *,
    executor: cf.Executor,
    work_dir: Path,
    families=(HashFamily.REFERENCE,),
    layers=None,
    target=None,
    sweep=None,
    vocab_keys=None,
    top: int = 10,
    parts: int | None = None,
    memory_limit: int | None = None,
    cpus: int = 1,
    progress: Progress | None = None,
    batch_rows: int = 1 << 20,
) -> dict:
    """`audit.audit_collisions`, bit for bit, as tasks on `executor` that each hold one bucket range of each head.

    Per (family, layer, order): `parts` shuffle tasks over row ranges
    (`scatter_row_range`: split by bucket range of each head), `parts` tasks over the
    heads' bucket ranges (`audit_bucket_range`: per-head sums, worst buckets, each n-gram's best partner within
    a head), then `parts` tasks over row ranges (`audit_row_range`: s(x) joined across
    heads, through files under `work_dir`, which every worker must see); the --sweep
    cells and each --target evaluation are `parts` more (`rates_bucket_range`). Every
    partial result is an integer sum or a top-k, merged exactly; the figures are then
    computed by the audit's own functions. No task or the driver holds a whole order: a
    task holds ~1/`parts` of it per head (`audit_parts` picks `parts` from
    `memory_limit`). The main audit reads each order once, through a shuffle
    (`scatter_row_range`); the sweep and sizing tasks stream it once each.
    """
    families = HashFamily.parse_many(families)
    layers = validate_audit(plan, stats, layers=layers, target=target, top=top)
    cells = sweep_plans(sweep, plan) if sweep is not None else []
    heads = max([plan.heads, *(c[2].heads for c in cells)])
    parts = parts or audit_parts(plan, stats, heads=heads, memory_limit=memory_limit or DEFAULT_MEMORY_LIMIT, cpus=cpus)
    share = getattr(executor, "share", lambda x: x)
    stats_ref, plan_ref = share(stats), share(plan)
    units = [(f, layer, n) for f in families for layer in layers for n in plan.orders]
    unit_dir = {u: Path(work_dir) / f"{u[0]}-{u[1]}-{u[2]}" for u in units}

    # shuffle: row ranges of every unit split by bucket range; then the bucket ranges (and the
    # sweep cells, which stream: their heads differ), then row ranges joining the heads
    def row_range(n: int, q: int) -> tuple[int, int]:
        m = stats.distinct(n)
        return m * q // parts, m * (q + 1) // parts

    scatter = {u: [str(unit_dir[u] / "scatter" / f"q{q:05d}") for q in range(parts)] for u in units}
    calls = [(scatter_row_range, (stats_ref, plan_ref, f, layer, n, *row_range(n, q), parts, scatter[(f, layer, n)][q]), {}) for f, layer, n in units for q in range(parts)]
    counter = StageCounter(progress, "audit shuffle", float(len(calls)))
    run_all(executor, calls, lambda i, _: counter.add(1))
    calls = [(audit_bucket_range, (stats_ref, plan_ref, f, layer, n, r, parts, str(unit_dir[(f, layer, n)] / f"p{r:05d}")), dict(top=top, scatter_dirs=scatter[(f, layer, n)]))
             for f, layer, n in units for r in range(parts)]
    cell_calls = [(rates_bucket_range, (stats_ref, plan_ref, f, layer, n, cell_plan.primes[layer][n - 2], r, parts), dict(batch_rows=batch_rows))
                  for f, layer, n in units for _, _, cell_plan in cells for r in range(parts)]
    counter = StageCounter(progress, "audit bucket ranges", float(len(calls) + len(cell_calls)))
    merged = [{"heads": None, "mix_duplicates": 0, "mix_dup_occurrences": 0, "worst": []} for _ in units]

    def fold(i: int, result) -> None:
        """Fold a bucket range's result into its unit's as it arrives (the driver keeps the
        running sums and top-k, not every range's members)."""
        counter.add(1)
        if i >= len(calls):
            return
        acc = merged[i // parts]
        acc["heads"] = result["heads"] if acc["heads"] is None else [add_head_sums(pair) for pair in zip(acc["heads"], result["heads"])]
        if result["mix_duplicates"] is not None:
            acc["mix_duplicates"] += result["mix_duplicates"]
            acc["mix_dup_occurrences"] += result["mix_dup_occurrences"]
        members = dict(acc["worst"]) | dict(result["worst"])
        acc["worst"] = [(c, members[c]) for c in rank_worst(members, top)]
        result.clear()

    cell_sums = run_all(executor, calls + cell_calls, fold)[len(calls):]
    row_calls = []
    for f, layer, n in units:
        K, m = len(plan.primes[layer][n - 2]), stats.distinct(n)
        dirs = [str(unit_dir[(f, layer, n)] / f"p{r:05d}" / f"h{j}") for r in range(parts) for j in range(K)]
        row_calls += [(audit_row_range, (dirs, K, *row_range(n, r)), {}) for r in range(parts)]
    counter = StageCounter(progress, "audit row ranges", float(len(row_calls)))
    joined = run_all(executor, row_calls, lambda i, _: counter.add(1))

    audits, cell_rows = [], []
    for u, (f, layer, n) in enumerate(units):
        primes = [int(p) for p in plan.primes[layer][n - 2]]
        m, total = stats.distinct(n), stats.total(n)
        heads_fig = [head_figures_from_sums(sums, p, head=j) for j, (sums, p) in enumerate(zip(merged[u]["heads"], primes))]
        across = add_across_sums(joined[u * parts:(u + 1) * parts])
        across["s"][0] += m - across["n_grams"]  # n-grams colliding in no head: s = 0, a clean head
        across["s_weighted"][0] += total - across["occurrences"]
        across["n_grams"], across["occurrences"] = m, total
        mix_dup = None if f != HashFamily.REFERENCE else merged[u]["mix_duplicates"]
        across_fig = across_figures_from_sums(across, primes, family=f, mix_duplicates=mix_dup)
        for _, members in merged[u]["worst"]:  # decoded here: the tasks need not load the vocabulary
            for member in members:
                member["text"] = decode_ngram(member["ids"], vocab_keys)
        audits.append(order_audit_entry(f, layer, n, distinct=m, occurrences=total, heads=heads_fig, across=across_fig,
                                            worst=[worst_bucket_entry(c, members, total) for c, members in merged[u]["worst"]]))
        for c, (K, rows, _) in enumerate(cells):
            got = cell_sums[(u * len(cells) + c) * parts:(u * len(cells) + c + 1) * parts]
            collided = [sum(g["collided"][j] for g in got) for j in range(K)]
            d, w = all_heads_from_sums(sum(g["all_heads"][0] for g in got), sum(g["all_heads"][1] for g in got), m, total)
            cell_rows.append({"family": f, "heads": K, "rows": rows, "layer": layer, "order": n, "token_weighted": token_weighted_from_sums(collided, total), "all_heads": d, "all_heads_weighted": w})

    sizing_rows = []
    if target is not None:
        first = [(u, x) for u, x in enumerate(units) if x[0] == families[0]]

        def size(item) -> dict:
            u, (f, layer, n) = item
            m, total = stats.distinct(n), stats.total(n)
            floor = None
            if f == HashFamily.REFERENCE:
                dup = merged[u]["mix_dup_occurrences"]
                floor = float(float(dup) / total) if total else 0.0  # as size_for_target's share

            def rate_at(primes) -> float:
                got = run_all(executor, [(rates_bucket_range, (stats_ref, plan_ref, f, layer, n, primes, r, parts), dict(batch_rows=batch_rows)) for r in range(parts)])
                return token_weighted_from_sums([sum(g["collided"][j] for g in got) for j in range(len(primes))], total)

            return {"layer": layer, "order": n, **search_rows_for_target(rate_at, plan, target, layer=layer, order=n, distinct=m, floor=floor)}

        counter = StageCounter(progress, "audit sizing", float(len(first)))
        with cf.ThreadPoolExecutor(max(1, len(first))) as searches:
            for row in searches.map(size, first):
                sizing_rows.append(row)
                counter.add(1, f"layer {row['layer']} order {row['order']}")
    return audit_report(plan, stats, families=families, layers=layers, audits=audits, target=target, sizing_rows=sizing_rows, sweep=sweep, cells=cells, cell_rows=cell_rows)


def audit_collisions_distributed(
    store_path,
    plan,
    *,
    cluster: ClusterSpec | str,
    families=(HashFamily.REFERENCE,),
    layers=None,
    target=None,
    sweep=None,
    top: int = 10,
    parts: int | None = None,
    memory_limit: int | None = None,
    work_dir=None,
    progress: Progress | None = None,
    executor: cf.Executor | None = None,
) -> dict:
    """`audit.audit_collisions` of a store's statistics on a Ray cluster (or `executor`),
    partitioned by bucket range (`audit_collisions_partitioned`): the same report, bit for bit.

    The statistics are read by the tasks from the store (on storage every worker sees);
    the join files go to `work_dir` (default: a hidden directory beside the store, removed
    afterwards). `memory_limit` is per task.
    """
    store = TableStore.open(store_path)
    try:
        keys = store.vocab.keys
    except StoreError:  # decoding is a nicety, as in the single-process audit
        keys = None
    store_path = Path(store_path)
    base = Path(work_dir) if work_dir is not None else store_path.resolve().parent
    try:
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{store_path.name}.audit-", dir=base))
    except OSError as e:
        raise OutputError(f"cannot create the audit's work directory in {str(base)!r} ({e.strerror or e}); the distributed audit writes its shuffle files there: "
                          "make it writable (or audit without --cluster)") from None
    try:
        with executor_for(cluster, executor) as (ex, description):
            return audit_collisions_partitioned(plan, store.stats, executor=ex, work_dir=work, families=families, layers=layers, target=target, sweep=sweep,
                                                vocab_keys=keys, top=top, parts=parts, memory_limit=memory_limit, cpus=int(description.get("cpus") or 1), progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = [
    "AUDIT_BYTES_PER_HEAD", "audit_bucket_range", "audit_collisions_distributed", "audit_collisions_partitioned", "audit_parts", "audit_row_range",
    "bucket_range", "gather_bucket_ranges", "hash_state", "range_of_bucket", "rates_bucket_range", "scatter_row_range", "stream_bucket_ranges",
]
