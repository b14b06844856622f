"""Every figure of one (family, layer, order) of an audit (docs/collisions.md), and the ideal hash's.

For each head (m distinct n-grams of the order, p the head's prime, W their occurrences):

- shared (observed): share of distinct n-grams whose bucket holds another n-gram;
- shared (ideal): 1 - (1 - 1/p)^(m-1), the same share for an ideal uniform hash;
- token-weighted rate: share of W whose bucket holds another n-gram;
- shadowed mass: share of W whose n-gram is not the most frequent of its bucket;

and across the K heads of an order, for every n-gram x, `s(x)` = the most heads x shares
with any one other n-gram (its worst partner): s = K is indistinguishable, and "clean
head" means some head where x is alone in its bucket.

Each figure is computed from integer sums over buckets (`head_sums`, `across_sums`), so
the sums of disjoint bucket ranges add up to the whole head's: what an audit partitioned
by bucket range computes. While the across-head figures run the audit holds per head the
bucket of each n-gram and a collide flag, and a 1-byte s(x); the worst buckets' members
are picked by row index in one more streaming pass over the statistics.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Iterable, Sequence

import numpy as np

from ..errors import StoreError
from ..hashing import TWO64
from ..kinds import HashFamily
from ..ngrams import NgramStats
from ..plan import TablePlan
from .keys import (
    BATCH_ROWS,
    SMALL_SET,
    OrderKeys,
    collide_mask,
    count_dtype,
    duplicated_rows,
)

TOP_BUCKETS = 10
MAX_MEMBERS = 20  # members listed per worst bucket (all are counted)


# -- ideal-hash expectations -------------------------------------------------------
def ideal_shared(m: int, p: int) -> float:
    """P(an n-gram shares its bucket) under an ideal uniform hash: 1 - (1 - 1/p)^(m-1).

    Under an ideal hash the bucket does not depend on the n-gram's count, so this is
    also the expected token-weighted collision rate.
    """
    if m <= 1:
        return 0.0
    return float(-math.expm1((m - 1) * math.log1p(-1.0 / p)))


def ideal_all_heads(m: int, primes: Sequence[int]) -> float:
    """P(some other n-gram shares every head) for K independent ideal heads: 1 - (1 - 1/prod p)^(m-1)."""
    if m <= 1:
        return 0.0
    log_q = sum(math.log(p) for p in primes)
    return float(-math.expm1((m - 1) * math.log1p(-math.exp(-log_q))))


def ideal_clean_head(m: int, primes: Sequence[int]) -> float:
    """P(at least one head where the n-gram is alone) for independent ideal heads: 1 - prod_j shared_j."""
    return float(1.0 - math.prod(ideal_shared(m, p) for p in primes))


def rows_for_rate(m: int, target: float) -> int:
    """The table size p at which the ideal shared share equals `target` (solves the formula above)."""
    if m <= 1:
        return 2
    return max(2, math.ceil(-1.0 / math.expm1(math.log1p(-target) / (m - 1))))


# -- worst partner across heads ------------------------------------------------------
def _pairwise_max(B: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each row of B (c, K): the most columns it shares with any other row (exact, O(c^2 K))."""
    c = B.shape[0]
    out = np.zeros(c, dtype=np.int64)
    for start in range(0, c, chunk):
        block = (B[start : start + chunk, None, :] == B[None, :, :]).sum(axis=2)
        block[np.arange(block.shape[0]), np.arange(start, start + block.shape[0])] = -1
        out[start : start + chunk] = block.max(axis=1)
    return np.maximum(out, 0)


def identical_from(primes: Sequence[int]) -> int | None:
    """Smallest t such that any t of these primes multiply to >= 2^64, or None.

    Two int64 mixes differ by less than 2^64 in absolute value, so for the reference
    family sharing t heads (each prime dividing the difference) means identical mixes.
    """
    prod = 1
    for t, p in enumerate(sorted(int(q) for q in primes), start=1):
        prod *= p
        if prod >= TWO64:
            return t
    return None


def worst_partner_heads(
    buckets: Sequence[np.ndarray],
    primes: Sequence[int],
    *,
    collide: Sequence[np.ndarray] | None = None,
    mix_duplicated: np.ndarray | None = None,
    small_set: int = SMALL_SET,
) -> np.ndarray:
    """s(x) for every n-gram: the most heads it shares (same bucket) with any single other n-gram.

    Exact for any family. Level 1 from per-head bucket occupancy; level s+1 only looks at
    n-grams already sharing s heads with someone (their partners are among them), testing
    every (s+1)-subset of heads for duplicated bucket tuples; candidate sets this small
    (`small_set`) are finished by comparing all pairs. With `mix_duplicated` (reference
    family: which n-grams have a mix equal to another's) levels from `identical_from(primes)`
    on are read from it: sharing that many heads means identical mixes, hence all K.
    """
    K = len(buckets)
    m = buckets[0].size
    s = np.zeros(m, dtype=count_dtype(K))
    if m < 2:
        return s
    if collide is None:
        collide = [collide_mask(b, int(p)) for b, p in zip(buckets, primes)]
    any_collide = np.logical_or.reduce(list(collide))
    cand = np.flatnonzero(any_collide)
    s[cand] = 1
    shortcut = identical_from(primes) if mix_duplicated is not None else None
    level = 1
    while cand.size and level < K:
        if cand.size <= small_set:
            B = np.stack([np.asarray(b)[cand] for b in buckets], axis=1)
            s[cand] = _pairwise_max(B)
            break
        if shortcut is not None and level + 1 >= shortcut:
            s[cand[mix_duplicated[cand]]] = K
            break
        sub = [np.asarray(b)[cand] for b in buckets]
        nxt = np.zeros(cand.size, dtype=bool)
        for S in combinations(range(K), level + 1):
            nxt |= duplicated_rows([sub[j] for j in S], [primes[j] for j in S])
        cand = cand[nxt]
        level += 1
        s[cand] = level
    return s


def worst_partner_heads_through(buckets: Sequence[np.ndarray], primes: Sequence[int], head: int, *, mix_duplicated: np.ndarray | None = None) -> np.ndarray:
    """For n-grams that all share their bucket of head `head` with another: the most heads each
    shares with one partner *of that bucket* (at least 1).

    The max over x's colliding heads of this is x's s(x) (`worst_partner_heads`): its worst
    partner shares one of its buckets. So the audit partitioned by bucket range computes
    s(x) head by head, each range holding whole buckets. Levels as in
    `worst_partner_heads`, every tested subset of heads including `head`: C(K-1, t) per
    level t, no pairwise step; `mix_duplicated` (reference family) as there.
    """
    K = len(buckets)
    m = buckets[0].size
    s = np.ones(m, dtype=count_dtype(K))
    others = [i for i in range(K) if i != head]
    shortcut = identical_from(primes) if mix_duplicated is not None else None
    cand = np.arange(m)
    level = 1
    while cand.size and level < K:
        if shortcut is not None and level + 1 >= shortcut:
            s[cand[mix_duplicated[cand]]] = K
            break
        sub = {i: np.asarray(buckets[i])[cand] for i in range(K)}
        nxt = np.zeros(cand.size, dtype=bool)
        for S in combinations(others, level):
            cols = [head, *S]
            nxt |= duplicated_rows([sub[i] for i in cols], [primes[i] for i in cols])
        cand = cand[nxt]
        level += 1
        s[cand] = level
    return s


# -- per-head and across-head figures ----------------------------------------------
def share(num: float, den: float) -> float:
    """num / den, or 0 for an empty denominator (a figure of no n-grams)."""
    return float(num / den) if den else 0.0


def _top_buckets(sel: np.ndarray, shadow: np.ndarray, wsum: np.ndarray, k: int) -> np.ndarray:
    """The k buckets of `sel` (ascending) ranked by (shadowed desc, total desc, bucket asc)."""
    sh = shadow[sel]
    thr = np.partition(sh, sel.size - k)[sel.size - k]
    above, ties = sel[sh > thr], sel[sh == thr]
    need = k - above.size
    if ties.size > need:
        ws = wsum[ties]
        wthr = np.partition(ws, ties.size - need)[ties.size - need]
        better, equal = ties[ws > wthr], ties[ws == wthr]
        ties = np.concatenate([better, equal[: need - better.size]])
    return np.concatenate([above, ties])


def head_figures(b: np.ndarray, counts: np.ndarray, p: int, *, head: int, top: int) -> tuple[dict, np.ndarray, list]:
    """Per-head figures from bucket occupancy, the n-grams' collide mask, and worst-bucket candidates.

    Returns (figures, collide mask (m,), [(shadowed, total, occupancy, head, bucket), ...]).
    """
    sums, collide, worst = head_sums(b, counts, p, head=head, top=top)
    return head_figures_from_sums(sums, p, head=head), collide, worst


def head_sums(b: np.ndarray, counts: np.ndarray, nbuckets: int, *, head: int, top: int, offset: int = 0) -> tuple[dict, np.ndarray, list]:
    """The integer sums behind one head's figures over the buckets `offset + b`, b in [0, nbuckets).

    Every sum is over buckets, so the sums of disjoint bucket ranges add up (`add_head_sums`)
    to the whole head's: what a bucket-range partition of the audit computes. Also returns
    the collide mask of these n-grams and the range's `top` worst-bucket candidates.
    """
    m = b.size
    if nbuckets <= max(1 << 22, 4 * m):
        idx, nb, uniq = b, nbuckets, None
    else:  # huge table: compact the occupied buckets
        uniq, idx = np.unique(b, return_inverse=True)
        nb = uniq.size
    occ = np.bincount(idx, minlength=nb)
    wsum = np.bincount(idx, weights=counts, minlength=nb)
    wmax = np.zeros(nb, dtype=np.int64)
    np.maximum.at(wmax, idx, counts)
    shared_b = occ > 1
    collide = shared_b[idx]
    shadow = wsum - wmax
    sums = {
        "n_grams": int(m),
        "occurrences": int(counts.sum()),
        "buckets_used": int((occ > 0).sum()),
        "max_occupancy": int(occ.max()) if m else 0,
        "shared": int(collide.sum()),
        "shared_occurrences": int(counts[collide].sum()),
        "shadowed": int(counts.sum()) - int(wmax.sum()),
    }
    worst = []
    if top and m:
        sel = np.flatnonzero(shared_b)  # ascending bucket order (uniq is sorted too)
        if sel.size > top:
            sel = _top_buckets(sel, shadow, wsum, top)
        for c in sel:
            bucket = int(c) if uniq is None else int(uniq[c])
            worst.append((float(shadow[c]), float(wsum[c]), int(occ[c]), head, bucket + offset))
    return sums, collide, worst


def add_head_sums(parts: Sequence[dict]) -> dict:
    """The `head_sums` of a whole head from those of its disjoint bucket ranges (exact: integers)."""
    return {k: (max if k == "max_occupancy" else sum)(int(s[k]) for s in parts) for k in parts[0]}


def head_figures_from_sums(sums: dict, p: int, *, head: int) -> dict:
    """One head's figures (docs/collisions.md) from its `head_sums`."""
    m, W = sums["n_grams"], float(sums["occurrences"])
    figures = {
        "head": head,
        "p": int(p),
        "load": m / p,
        "buckets_used": sums["buckets_used"],
        "max_occupancy": sums["max_occupancy"],
        "shared_observed": share(sums["shared"], m),
        "shared_ideal": ideal_shared(m, p),
        "token_weighted": share(float(sums["shared_occurrences"]), W),
        "shadowed": share(float(sums["shadowed"]), W),
    }
    figures["shared_excess"] = figures["shared_observed"] - figures["shared_ideal"]
    figures["token_weighted_excess"] = figures["token_weighted"] - figures["shared_ideal"]
    return figures


def across_figures(keys: OrderKeys, buckets: list[np.ndarray], primes: Sequence[int], collide: list[np.ndarray], *, small_set: int = SMALL_SET) -> dict:
    """Figures across the K heads of an order (see docs/collisions.md)."""
    K = len(buckets)
    m, counts = keys.m, keys.counts
    mix_dup = keys.mix_duplicated()
    s = worst_partner_heads(buckets, primes, collide=collide, mix_duplicated=mix_dup, small_set=small_set)
    colliding_heads = np.add.reduce([c.astype(count_dtype(K)) for c in collide]) if m else np.zeros(0, count_dtype(K))
    sums = across_sums(s, colliding_heads, counts, K)
    return across_figures_from_sums(sums, primes, family=keys.family, mix_duplicates=None if mix_dup is None else int(mix_dup.sum()))


def across_sums(s: np.ndarray, colliding_heads: np.ndarray, counts: np.ndarray, K: int) -> dict:
    """The integer sums behind the across-head figures of a set of n-grams: their s(x) histogram
    (plain and weighted by count), and how many (and what weight) collide in every head (no clean head).

    Sums over disjoint sets of n-grams add up (`add_across_sums`): what a partition of the
    n-grams computes, given each n-gram's s(x) and its number of colliding heads.
    """
    every = colliding_heads >= K
    return {
        "n_grams": int(s.size),
        "occurrences": int(counts.sum()),
        "s": [int(v) for v in np.bincount(s, minlength=K + 1)],
        "s_weighted": [int(round(v)) for v in np.bincount(s, weights=counts, minlength=K + 1)],
        "no_clean_head": int(every.sum()),
        "no_clean_head_weighted": int(counts[every].sum()),
    }


def add_across_sums(parts: Sequence[dict]) -> dict:
    """The `across_sums` of disjoint sets of n-grams, added (exact: integers)."""
    return {k: [sum(v) for v in zip(*(p[k] for p in parts))] if isinstance(parts[0][k], list) else sum(p[k] for p in parts) for k in parts[0]}


def across_figures_from_sums(sums: dict, primes: Sequence[int], *, family: str, mix_duplicates: int | None) -> dict:
    """The across-head figures (docs/collisions.md) from `across_sums` of all the order's n-grams."""
    K = len(primes)
    m, W = sums["n_grams"], float(sums["occurrences"])
    hist, hist_w = sums["s"], sums["s_weighted"]
    return {
        "indistinguishable": {"distinct": share(hist[K], m), "weighted": share(float(hist_w[K]), W), "count": int(hist[K])},
        "indistinguishable_ideal": ideal_all_heads(m, primes),
        "clean_head": {"distinct": share(m - sums["no_clean_head"], m), "weighted": share(float(sums["occurrences"] - sums["no_clean_head_weighted"]), W)},
        "clean_head_ideal": ideal_clean_head(m, primes),
        "mix_duplicates": mix_duplicates,
        "identical_from_heads": identical_from(primes) if family == HashFamily.REFERENCE else None,
        "worst_partner_heads": {"distinct": list(hist), "weighted": list(hist_w)},
    }


# -- worst buckets ----------------------------------------------------------------
def decode_ngram(ids: Sequence[int], vocab_keys: Sequence[str] | None) -> list[str] | None:
    """An n-gram's tokens as text, one string per token (`<id>` for an id outside the keys; as
    `build-table` reports them); None without keys."""
    if vocab_keys is None:
        return None
    return [vocab_keys[i] if 0 <= i < len(vocab_keys) else f"<{i}>" for i in ids]


def read_rows(stats: NgramStats, order: int, rows: np.ndarray, *, batch_rows: int = BATCH_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(ids, counts) of the given row indices of an order's stats, in the given order.

    One streaming pass (`NgramStats.iter_batches`), keeping only the wanted rows of each
    batch and stopping after the last one; the order's file is never held whole.
    """
    rows = np.asarray(rows, dtype=np.int64)
    wanted = np.unique(rows)  # sorted
    ids = np.zeros((wanted.size, order), dtype=np.int64)
    counts = np.zeros(wanted.size, dtype=np.int64)
    if wanted.size:
        if wanted[0] < 0 or wanted[-1] >= stats.distinct(order):
            raise StoreError(f"row {int(wanted[-1] if wanted[-1] >= 0 else wanted[0])} is outside order {order}'s {stats.distinct(order)} n-grams")
        offset, got = 0, 0
        for batch_ids, batch_counts in stats.iter_batches(order, batch_rows):
            end = offset + batch_counts.size
            hi = int(np.searchsorted(wanted, end, side="left"))
            if hi > got:
                local = wanted[got:hi] - offset
                ids[got:hi] = batch_ids[local]
                counts[got:hi] = batch_counts[local]
                got = hi
            offset = end
            if got == wanted.size:
                break
    take = np.searchsorted(wanted, rows)
    return ids[take], counts[take]


def worst_buckets(stats: NgramStats, keys: OrderKeys, buckets: list[np.ndarray], candidates: list, *, top: int, vocab_keys: Sequence[str] | None) -> list[dict]:
    """The `top` buckets of an order with the most shadowed occurrences (ties: most occurrences, then head, bucket)."""
    chosen = rank_worst(candidates, top)
    members = bucket_members(stats, keys.order, [np.flatnonzero(buckets[head] == bucket) for _, _, _, head, bucket in chosen], vocab_keys=vocab_keys)
    return [worst_bucket_entry(c, mine, keys.total) for c, mine in zip(chosen, members)]


def rank_worst(candidates: Iterable[tuple], top: int) -> list[tuple]:
    """The `top` worst of `head_sums` candidates: most shadowed, then most occurrences, then head, bucket.

    A total order, so the worst of a union are among the worst of each part: a bucket-range
    partition keeps its own `top` and the whole keeps the `top` of theirs.
    """
    return sorted(candidates, key=lambda t: (-t[0], -t[1], t[3], t[4]))[:top]


def bucket_members(stats: NgramStats, order: int, members_rows: Sequence[np.ndarray], *, vocab_keys: Sequence[str] | None) -> list[list[dict]]:
    """For each bucket's member rows (row indices of the order's stats): its `MAX_MEMBERS` most frequent
    n-grams (ties: lower row first), with ids, decoded text and count; one streaming pass."""
    wanted = np.unique(np.concatenate(members_rows)) if members_rows else np.zeros(0, np.int64)
    ids, counts = read_rows(stats, order, wanted) if wanted.size else (np.zeros((0, order), np.int64), np.zeros(0, np.int64))
    where = {int(r): i for i, r in enumerate(wanted)}
    out = []
    for rows in members_rows:
        local = np.array([where[int(r)] for r in rows], dtype=np.int64)
        order_ = np.lexsort((rows, -counts[local]))
        members = []
        for i in order_[:MAX_MEMBERS]:
            g = ids[local[i]].tolist()
            members.append({"ids": g, "text": decode_ngram(g, vocab_keys), "count": int(counts[local[i]])})
        out.append(members)
    return out


def worst_bucket_entry(candidate: tuple, members: list[dict], occurrences: int) -> dict:
    """The report's entry for one worst bucket (a `head_sums` candidate and its `bucket_members`)."""
    shadow, total, occ, head, bucket = candidate
    return {
        "head": head,
        "bucket": bucket,
        "n_grams": occ,
        "occurrences": int(round(total)),
        "shadowed": int(round(shadow)),
        "shadowed_share": share(shadow, float(occurrences)),
        "members": members,
    }


# -- one (family, layer, order) ------------------------------------------------------
def audit_order(plan: TablePlan, stats: NgramStats, keys: OrderKeys, *, top: int = TOP_BUCKETS, vocab_keys=None, small_set: int = SMALL_SET) -> dict:
    """Every figure of one (family, layer, order) under `plan`."""
    primes = [int(p) for p in plan.primes[keys.layer_id][keys.order - 2]]
    buckets, collide, heads, cands = [], [], [], []
    for j, p in enumerate(primes):
        b = keys.buckets(j, p)
        fig, col, worst = head_figures(b, keys.counts, p, head=j, top=top)
        buckets.append(b)
        collide.append(col)
        heads.append(fig)
        cands += worst
    across = across_figures(keys, buckets, primes, collide, small_set=small_set)
    return order_audit_entry(keys.family, keys.layer_id, keys.order, distinct=keys.m, occurrences=keys.total, heads=heads, across=across,
                             worst=worst_buckets(stats, keys, buckets, cands, top=top, vocab_keys=vocab_keys))


def order_audit_entry(family: str, layer: int, order: int, *, distinct: int, occurrences: int, heads: list[dict], across: dict, worst: list[dict]) -> dict:
    """The report's audit entry of one (family, layer, order) from its figures."""
    return {
        "family": family,
        "layer": layer,
        "order": order,
        "distinct": distinct,
        "occurrences": occurrences,
        "heads": heads,
        "mean": {
            "shared_observed": float(np.mean([h["shared_observed"] for h in heads])),
            "shared_ideal": float(np.mean([h["shared_ideal"] for h in heads])),
            "token_weighted": float(np.mean([h["token_weighted"] for h in heads])),
            "shadowed": float(np.mean([h["shadowed"] for h in heads])),
        },
        "across": across,
        "worst_buckets": worst,
    }


# -- rates of other head sizes (sizing, sweeps) ---------------------------------------
def token_weighted_rate(keys: OrderKeys, primes: Sequence[int]) -> float:
    """Mean over heads of the token-weighted collision rate for these head sizes."""
    return token_weighted_from_sums(collided_occurrences(keys, primes), keys.total)


def collided_occurrences(keys: OrderKeys, primes: Sequence[int]) -> list[int]:
    """Per head: the occurrences of the n-grams that share their bucket (for these head sizes).
    Bucket-local, so the sums over disjoint bucket ranges of a head add up to the head's."""
    return [int(keys.counts[collide_mask(keys.buckets(j, int(p)), int(p))].sum()) for j, p in enumerate(primes)]


def token_weighted_from_sums(collided: Sequence[int], occurrences: int) -> float:
    """`token_weighted_rate` from each head's `collided_occurrences` (summed over bucket ranges)."""
    rates = [share(float(w), float(occurrences)) for w in collided]
    return float(np.mean(rates)) if rates else 0.0


def all_heads_share(keys: OrderKeys, primes: Sequence[int]) -> tuple[float, float]:
    """(distinct, weighted) share of n-grams sharing every head with one same other n-gram."""
    indist = all_heads_mask(keys, primes)
    return all_heads_from_sums(int(indist.sum()), int(keys.counts[indist].sum()), keys.m, keys.total)


def all_heads_mask(keys: OrderKeys, primes: Sequence[int]) -> np.ndarray:
    """Which n-grams share every head with one same other n-gram (pairs with equal buckets in
    every head: a partition by head 0's bucket range holds each such pair whole)."""
    m = keys.m
    if m < 2:
        return np.zeros(m, dtype=bool)
    primes = [int(p) for p in primes]
    t = identical_from(primes) if keys.family == HashFamily.REFERENCE else None
    if t is not None and t <= len(primes):
        indist = keys.mix_duplicated()
    else:
        buckets = [keys.buckets(j, p) for j, p in enumerate(primes)]
        both = np.logical_and.reduce([collide_mask(b, p) for b, p in zip(buckets, primes)])
        cand = np.flatnonzero(both)
        indist = np.zeros(m, dtype=bool)
        if cand.size:
            indist[cand[duplicated_rows([b[cand] for b in buckets], primes)]] = True
    return indist


def all_heads_from_sums(n_grams: int, occurrences: int, m: int, total: int) -> tuple[float, float]:
    """`all_heads_share` from the count and occurrences of the n-grams sharing every head."""
    if m < 2:
        return 0.0, 0.0
    return share(n_grams, m), share(float(occurrences), total)
