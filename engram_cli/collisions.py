"""Hash-collision audit of a table plan over n-gram statistics (`engram collisions`).

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
vectorized `engram_cli.xxh3`, bit-exact with the xxhash package, which hashes n-grams
of more than 60 ids).

Memory: one (layer, order) at a time, the audit holds per distinct n-gram its count
(int64) and either its mix (int64, reference) or one uint64 digest per head (xxh3),
plus per head the bucket of each n-gram (uint32; int64 only for a prime above 2^32)
and a collide flag while the across-head figures run, and a 1-byte s(x). The n-gram ids
themselves are streamed (`NgramStats.iter_batches`) and never held; the worst buckets'
members are picked by row index in one more streaming pass.

This module does not open stores: it takes a `TablePlan` and an `NgramStats`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import combinations, repeat
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import EngramError, OutputError, PlanError, StoreError
from .hashing import FAMILIES, TWO64, ngram_mix, parse_families, xxh3_digests, xxh3_digests_loop, xxh3_seed  # noqa: F401 - the families live in hashing
from .ngrams import NgramStats
from .plan import Budget, TablePlan, fit_plan_to_budget

Progress = Callable[..., None]

TOP_BUCKETS = 10
MAX_MEMBERS = 20  # members listed per worst bucket (all are counted)
SMALL_SET = 4096  # candidate sets this small get the exact pairwise comparison
BATCH_ROWS = 1 << 21
BUCKET_CHUNK = 1 << 20  # rows reduced per step when computing one head's buckets


def bucket_dtype(p: int) -> np.dtype:
    """Buckets of a head with prime p are stored as uint32 (every p <= 2^32), else int64."""
    return np.dtype(np.uint32) if int(p) <= (1 << 32) else np.dtype(np.int64)


def count_dtype(k: int) -> np.dtype:
    """The smallest unsigned dtype that holds 0..k (head counters)."""
    return np.dtype(np.uint8) if k < (1 << 8) else np.dtype(np.uint16) if k < (1 << 16) else np.dtype(np.int64)


def _noop(*_args, **_kwargs) -> None:
    pass


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


# -- exact duplicate detection -----------------------------------------------------
_FILTER_MULTS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)


def duplicated(key: np.ndarray) -> np.ndarray:
    """Exact mask of the entries of an int64/uint64 array whose value occurs more than once.

    A few rounds of multiply-shift hashing into ~2n bins drop entries whose hash bin is
    alone (an equal value always shares the bin, so no duplicate is lost); the survivors
    are sorted and compared exactly.
    """
    key = np.asarray(key)
    n = key.size
    out = np.zeros(n, dtype=bool)
    if n < 2:
        return out
    k = key.astype(np.uint64, copy=False) if key.dtype != np.int64 else key.view(np.uint64)
    lo, hi = int(k.min()), int(k.max())
    if hi - lo < max(1 << 22, 2 * n):  # small range: count directly
        kk = (k - np.uint64(lo)).view(np.int64)
        return (np.bincount(kk, minlength=hi - lo + 1) > 1)[kk]
    idx = None
    for mult in _FILTER_MULTS:
        size = k.size
        if size <= SMALL_SET:
            break
        bits = int(min(23, max(10, math.ceil(math.log2(size)) + 1)))
        h = ((k * np.uint64(mult)) >> np.uint64(64 - bits)).view(np.int64)
        keep = (np.bincount(h, minlength=1 << bits) > 1)[h]
        k = k[keep]
        idx = np.flatnonzero(keep) if idx is None else idx[keep]
        if k.size > 0.7 * size:  # the filter stopped paying off
            break
    if idx is None:
        idx = np.arange(n)
    order = np.argsort(k, kind="stable")
    ks = k[order]
    same = ks[1:] == ks[:-1]
    dup = np.zeros(ks.size, dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    out[idx[order[dup]]] = True
    return out


def duplicated_rows(cols: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """Exact mask of rows (one value per column, column c in [0, sizes[c])) equal to another row."""
    n = cols[0].size
    if math.prod(int(s) for s in sizes) < (1 << 63):  # pack exactly into one int64
        key = np.asarray(cols[0], dtype=np.int64).copy()
        for c, s in zip(cols[1:], sizes[1:]):
            key *= np.int64(s)
            key += np.asarray(c, dtype=np.int64)
        return duplicated(key)
    # hash-combine as a filter (equal rows give equal hashes), then compare exactly
    h = np.zeros(n, dtype=np.uint64)
    for c, mult in zip(cols, repeat(np.uint64(_FILTER_MULTS[0]))):
        h ^= np.asarray(c).astype(np.uint64)
        h *= mult
        h ^= h >> np.uint64(29)
    cand = np.flatnonzero(duplicated(h))
    out = np.zeros(n, dtype=bool)
    if cand.size:
        sub = np.stack([np.asarray(c)[cand] for c in cols], axis=1)
        _, inverse, counts = np.unique(sub, axis=0, return_inverse=True, return_counts=True)
        out[cand[counts[inverse.ravel()] > 1]] = True
    return out


def collide_mask(buckets: np.ndarray, p: int) -> np.ndarray:
    """Which n-grams share their bucket (values in [0, p)) with another n-gram."""
    if p <= max(1 << 22, 4 * buckets.size):
        return (np.bincount(buckets, minlength=p) > 1)[buckets]
    return duplicated(buckets)


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


# -- per (layer, order) hashing state ------------------------------------------------
@dataclass
class OrderKeys:
    """The hash state of one order in one layer: what every head's bucket is derived from."""

    family: str
    layer_id: int
    order: int
    counts: np.ndarray  # (m,) int64
    mix: np.ndarray | None = None  # (m,) int64, reference family
    digests: np.ndarray | None = None  # (m, H) uint64, xxh3 family (head j in column j)
    _mix_dup: np.ndarray | None = None

    @property
    def m(self) -> int:
        return int(self.counts.size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def buckets(self, head: int, p: int) -> np.ndarray:
        """Bucket in [0, p) of every n-gram for head `head` with table size p.

        uint32 (4 bytes per n-gram) when p <= 2^32, which every plan prime is in practice;
        int64 otherwise. Computed in chunks, so no full-length int64 temporary is made.
        """
        p = int(p)
        out = np.empty(self.m, dtype=bucket_dtype(p))
        for start in range(0, self.m, BUCKET_CHUNK):
            end = start + BUCKET_CHUNK
            if self.family == "reference":
                out[start:end] = self.mix[start:end] % np.int64(p)
            else:
                out[start:end] = self.digests[start:end, head] % np.uint64(p)
        return out

    def mix_duplicated(self) -> np.ndarray | None:
        """Reference only: which n-grams' 64-bit mix equals another n-gram's."""
        if self.mix is None:
            return None
        if self._mix_dup is None:
            self._mix_dup = duplicated(self.mix)
        return self._mix_dup


def load_order_keys(plan: TablePlan, stats: NgramStats, layer_id: int, order: int, family: str, *, heads: int, progress: Progress = _noop, batch_rows: int = BATCH_ROWS) -> OrderKeys:
    """Stream one order's distinct n-grams once and keep only what the hash needs."""
    total = stats.distinct(order)
    counts, parts = [], []
    seeds = [xxh3_seed(plan.seed, layer_id, order, j) for j in range(heads)]
    mult = plan.multipliers[layer_id][:order]
    done = 0
    stage, detail = "hash n-grams", f"{family} layer {layer_id} order {order}"
    progress(stage, 0, total, detail)
    for ids, cnt in stats.iter_batches(order, batch_rows):
        counts.append(cnt)
        parts.append(ngram_mix(ids, mult) if family == "reference" else xxh3_digests(ids, seeds))
        done += cnt.size
        progress(stage, done, total, detail)
    counts_arr = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    if family == "reference":
        return OrderKeys(family, layer_id, order, counts_arr, mix=np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return OrderKeys(family, layer_id, order, counts_arr, digests=np.concatenate(parts) if parts else np.zeros((0, heads), np.uint64))


# -- figures -----------------------------------------------------------------------
def _share(num: float, den: float) -> float:
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
        "shared_observed": _share(sums["shared"], m),
        "shared_ideal": ideal_shared(m, p),
        "token_weighted": _share(float(sums["shared_occurrences"]), W),
        "shadowed": _share(float(sums["shadowed"]), W),
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
        "indistinguishable": {"distinct": _share(hist[K], m), "weighted": _share(float(hist_w[K]), W), "count": int(hist[K])},
        "indistinguishable_ideal": ideal_all_heads(m, primes),
        "clean_head": {"distinct": _share(m - sums["no_clean_head"], m), "weighted": _share(float(sums["occurrences"] - sums["no_clean_head_weighted"]), W)},
        "clean_head_ideal": ideal_clean_head(m, primes),
        "mix_duplicates": mix_duplicates,
        "identical_from_heads": identical_from(primes) if family == "reference" else None,
        "worst_partner_heads": {"distinct": list(hist), "weighted": list(hist_w)},
    }


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
        "shadowed_share": _share(shadow, float(occurrences)),
        "members": members,
    }


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


def token_weighted_rate(keys: OrderKeys, primes: Sequence[int]) -> float:
    """Mean over heads of the token-weighted collision rate for these head sizes."""
    return token_weighted_from_sums(collided_occurrences(keys, primes), keys.total)


def collided_occurrences(keys: OrderKeys, primes: Sequence[int]) -> list[int]:
    """Per head: the occurrences of the n-grams that share their bucket (for these head sizes).
    Bucket-local, so the sums over disjoint bucket ranges of a head add up to the head's."""
    return [int(keys.counts[collide_mask(keys.buckets(j, int(p)), int(p))].sum()) for j, p in enumerate(primes)]


def token_weighted_from_sums(collided: Sequence[int], occurrences: int) -> float:
    """`token_weighted_rate` from each head's `collided_occurrences` (summed over bucket ranges)."""
    rates = [_share(float(w), float(occurrences)) for w in collided]
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
    t = identical_from(primes) if keys.family == "reference" else None
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
    return _share(n_grams, m), _share(float(occurrences), total)


# -- what-if plans, sizing, sweeps --------------------------------------------------
def _plan_kwargs(plan: TablePlan) -> dict:
    """The plan's `make_plan` arguments less the sizing ones (heads, dim, rows per head)."""
    return {k: v for k, v in plan.make_kwargs().items() if k not in ("heads", "dim", "rows_per_head")}


def dim_for_heads(plan: TablePlan, heads: int) -> int:
    """The row width a what-if plan with `heads` heads keeps: the stored dim when heads divides it
    (same per-token width, so bytes do not change with K), else heads * the stored head_dim."""
    return plan.dim if plan.dim % heads == 0 else heads * plan.head_dim


def what_if_plan(stored: TablePlan, *, heads: int | None = None, rows_per_head=None, budget: Budget | None = None) -> tuple[TablePlan, list[str]]:
    """The stored plan with new heads and/or rows (same layers, seed, pad, vocab, dtype); notes on choices made."""
    if rows_per_head is not None and budget is not None:
        raise PlanError("--rows-per-head and --budget both size the tables; give one of them")
    if heads is None and rows_per_head is None and budget is None:
        return stored, []
    notes = []
    K = stored.heads if heads is None else int(heads)
    if K < 1:
        raise PlanError(f"--heads must be at least 1, got {K}")
    dim = dim_for_heads(stored, K)
    if dim != stored.dim:
        notes.append(f"--heads {K} does not divide the stored dim {stored.dim}; the what-if plan keeps head_dim {stored.head_dim} (dim {dim})")
    kwargs = _plan_kwargs(stored) | dict(heads=K, dim=dim)
    if budget is not None:
        plan = fit_plan_to_budget(budget, **kwargs)
    else:
        plan = stored.remade(heads=K, dim=dim, rows_per_head=stored.rows_per_head if rows_per_head is None else rows_per_head)
    if plan.fingerprint == stored.fingerprint:  # e.g. `--heads 8` on an 8-head store
        return stored, notes
    return plan, notes


@dataclass(frozen=True)
class SweepSpec:
    """A grid: head counts x rows per head (absolute, or `f` x the audited plan's rows)."""

    heads: tuple[int, ...]
    rows: tuple[str, ...]  # as given: "0.5x" or "1000000"


_ROWS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(x?)\s*$", re.IGNORECASE)


def parse_sweep(specs: Iterable[str], base: TablePlan) -> SweepSpec:
    """`heads=1,2,4,8` and `rows=0.25x,0.5x,1x,2x` (either may be left out: the plan's value)."""
    heads: tuple[int, ...] | None = None
    rows: tuple[str, ...] | None = None
    for spec in specs:
        for part in spec.split():
            name, eq, values = part.partition("=")
            name = name.strip().lower()
            items = [v.strip() for v in values.split(",") if v.strip()]
            if not eq or name not in ("heads", "rows") or not items:
                raise PlanError(f"cannot read --sweep {part!r}; write heads=1,2,4,8 and/or rows=0.25x,0.5x,1x,2x")
            if name == "heads":
                try:
                    heads = tuple(int(v) for v in items)
                except ValueError:
                    raise PlanError(f"--sweep heads must be whole numbers, got {values!r}") from None
                if any(h < 1 for h in heads):
                    raise PlanError(f"--sweep heads must be at least 1, got {values!r}")
            else:
                for v in items:
                    if not _ROWS_RE.match(v):
                        raise PlanError(f"--sweep rows value {v!r} is neither a multiple like 0.5x nor a row count like 1000000")
                rows = tuple(items)
    if heads is None and rows is None:
        raise PlanError("--sweep needs heads=... and/or rows=..., e.g. --sweep heads=1,2,4,8 rows=0.5x,1x,2x")
    return SweepSpec(heads=heads or (base.heads,), rows=rows or ("1x",))


def resolve_rows(value: str, base: TablePlan) -> tuple[int, ...]:
    """Rows per head per order for one sweep value."""
    num, times = _ROWS_RE.match(value).groups()
    if times:
        rows = tuple(max(2, int(round(float(num) * r))) for r in base.rows_per_head)
    else:
        rows = (max(2, int(float(num))),) * len(base.orders)
    return rows


def sweep_plans(spec: SweepSpec, base: TablePlan) -> list[tuple[int, str, TablePlan]]:
    return [(K, r, base.remade(heads=K, dim=dim_for_heads(base, K), rows_per_head=resolve_rows(r, base))) for K in spec.heads for r in spec.rows]


def size_for_target(keys: OrderKeys, base: TablePlan, target: float, *, max_evals: int = 10, tolerance: float = 0.01, max_rows: int = 1 << 33) -> dict:
    """Smallest rows per head (within `tolerance`) whose mean token-weighted rate over the
    order's heads is <= target in this layer, found with the real hash on the real n-grams.

    Starts from the ideal-hash solution, then refines with secant steps on the model
    rate = 1 - exp(-L/p) fitted to each measured point, keeping a verified bracket.
    """
    floor = None
    if keys.family == "reference":
        dup = keys.mix_duplicated()
        floor = _share(float(keys.counts[dup].sum()), keys.total)
    return search_rows_for_target(lambda primes: token_weighted_rate(keys, primes), base, target, layer=keys.layer_id, order=keys.order, distinct=keys.m,
                                  floor=floor, max_evals=max_evals, tolerance=tolerance, max_rows=max_rows)


def search_rows_for_target(rate_at: Callable[[list[int]], float], base: TablePlan, target: float, *, layer: int, order: int, distinct: int, floor: float | None,
                           max_evals: int = 10, tolerance: float = 0.01, max_rows: int = 1 << 33) -> dict:
    """`size_for_target`'s search, measuring each candidate's primes with `rate_at(primes)`
    (`token_weighted_rate`, or its sum over bucket ranges); `floor`: the reference family's
    share of occurrences with a duplicated mix (no table size goes below it), else None."""
    m = distinct
    if floor is not None and floor >= target:
        return {"rows_per_head": None, "rate": floor, "reachable": False, "evaluations": 0, "floor": floor, "ideal_rows": rows_for_rate(m, target)}

    def primes_at(rows: int) -> list[int]:
        rph = list(base.rows_per_head)
        rph[order - 2] = rows
        return list(base.remade(rows_per_head=tuple(rph)).primes[layer][order - 2])

    rows = rows_for_rate(m, target)
    lo, hi, hi_rate, evals, rate = 0, None, None, 0, None
    while evals < max_evals:
        rows = int(min(max(rows, 2), max_rows))
        rate = rate_at(primes_at(rows))
        evals += 1
        if rate <= target:
            if hi is None or rows < hi:
                hi, hi_rate = rows, rate
        else:
            lo = max(lo, rows)
        if hi is not None and (hi <= 2 or hi <= lo * (1 + tolerance)):
            break
        if hi is None and rows >= max_rows:
            break
        # secant step on the model rate = 1 - exp(-L / p), L fitted to this point
        guess = -rows * math.log1p(-rate) / -math.log1p(-target) if 0 < rate < 1 else (rows * 2 if rate >= 1 else rows / 2)
        if hi is None:
            guess = max(guess * 1.002, lo * 1.05)  # must grow until a verified point exists
        else:
            if guess >= hi:  # the model says hi is about right: probe just below it
                guess = hi / (1 + tolerance)
            guess = min(max(guess, lo + 1), hi - 1)
        rows = int(math.ceil(guess))
    if hi is None:
        return {"rows_per_head": None, "rate": rate, "reachable": False, "evaluations": evals, "floor": floor, "ideal_rows": rows_for_rate(m, target)}
    return {"rows_per_head": int(hi), "rate": hi_rate, "reachable": True, "evaluations": evals, "floor": floor, "ideal_rows": rows_for_rate(m, target), "bracket_low": int(lo)}


# -- the whole audit ----------------------------------------------------------------
def plan_summary(plan: TablePlan) -> dict:
    return {
        "layer_ids": list(plan.layer_ids),
        "orders": list(plan.orders),
        "heads": plan.heads,
        "rows_per_head": list(plan.rows_per_head),
        "dim": plan.dim,
        "head_dim": plan.head_dim,
        "dtype": plan.dtype,
        "hash_family": plan.hash_family,
        "primes": {str(k): [list(o) for o in v] for k, v in plan.primes.items()},
        "total_rows": plan.total_rows,
        "total_bytes": plan.total_bytes,
        "fingerprint": plan.fingerprint,
    }


def order_bytes(plan: TablePlan, order: int) -> int:
    """Bytes of one order's heads across all layers of the plan."""
    return sum(sum(plan.primes[layer][order - 2]) for layer in plan.layer_ids) * plan.head_dim * plan.dtype_bytes


def family_distance(audits: list[dict]) -> dict:
    """Per hash family: how far its heads are from the ideal hash, over every audited (layer, order)."""
    out = {}
    for fam in dict.fromkeys(a["family"] for a in audits):
        heads = [h for a in audits if a["family"] == fam for h in a["heads"]]
        ex = np.array([h["shared_excess"] for h in heads])
        tw = np.array([h["token_weighted_excess"] for h in heads])
        ideal = np.array([h["shared_ideal"] for h in heads])
        rel = np.divide(ex, ideal, out=np.zeros_like(ex), where=ideal > 0)
        out[fam] = {
            "heads": len(heads),
            "shared_excess_mean": float(ex.mean()) if ex.size else 0.0,
            "shared_excess_max_abs": float(np.abs(ex).max()) if ex.size else 0.0,
            "shared_excess_relative_mean": float(rel.mean()) if ex.size else 0.0,
            "token_weighted_excess_mean": float(tw.mean()) if tw.size else 0.0,
            "indistinguishable_excess": [
                {"layer": a["layer"], "order": a["order"], "observed": a["across"]["indistinguishable"]["distinct"], "ideal": a["across"]["indistinguishable_ideal"]}
                for a in audits
                if a["family"] == fam
            ],
        }
    return out


def validate_audit(plan: TablePlan, stats: NgramStats, *, layers: Sequence[int] | None = None, target: float | None = None, top: int = TOP_BUCKETS) -> tuple[int, ...]:
    """Check the audit's options against the plan and statistics (before any work); the layers to audit."""
    layers = tuple(plan.layer_ids) if layers is None else tuple(int(x) for x in layers)
    unknown = [x for x in layers if x not in plan.layer_ids]
    if unknown:
        raise PlanError(f"--layers {','.join(map(str, unknown))} not in the plan (layers {','.join(map(str, plan.layer_ids))})")
    missing = [n for n in plan.orders if n not in stats.orders]
    if missing:
        raise StoreError(f"the n-gram statistics lack order(s) {missing} of the plan (counted: {list(stats.orders)}); rebuild with `engram build-table`")
    if target is not None and not 0 < target < 1:
        raise PlanError(f"--target must be a rate between 0 and 1 (e.g. 0.05), got {target}")
    if top < 0:
        raise PlanError(f"--top must be >= 0, got {top}")
    return layers


def audit_collisions(
    plan: TablePlan,
    stats: NgramStats,
    *,
    families: Sequence[str] = ("reference",),
    layers: Sequence[int] | None = None,
    target: float | None = None,
    sweep: SweepSpec | None = None,
    vocab_keys: Sequence[str] | None = None,
    top: int = TOP_BUCKETS,
    progress: Progress | None = None,
    small_set: int = SMALL_SET,
) -> dict:
    """Audit `plan` over `stats`: the JSON-safe report described in docs/collisions.md.

    One (family, layer, order) at a time: hash the distinct n-grams once, then the
    per-head and across-head figures, the worst buckets, the sizing search (`target`)
    and the sweep cells (`sweep`) all reuse that hash state.
    """
    progress = progress or _noop
    families = parse_families(families)
    layers = validate_audit(plan, stats, layers=layers, target=target, top=top)
    cells = sweep_plans(sweep, plan) if sweep is not None else []
    max_heads = max([plan.heads, *(c[2].heads for c in cells)])
    audits, sizing_rows, cell_rows = [], [], []
    units = [(f, layer, n) for f in families for layer in layers for n in plan.orders]
    for u, (fam, layer, n) in enumerate(units):
        progress("audit", u, len(units), f"{fam} layer {layer} order {n}")
        keys = load_order_keys(plan, stats, layer, n, fam, heads=max_heads, progress=progress)
        audits.append(audit_order(plan, stats, keys, top=top, vocab_keys=vocab_keys, small_set=small_set))
        if target is not None and fam == families[0]:
            sizing_rows.append({"layer": layer, "order": n, **size_for_target(keys, plan, target)})
        for K, rows, cell_plan in cells:
            primes = cell_plan.primes[layer][n - 2]
            d, w = all_heads_share(keys, primes)
            cell_rows.append({"family": fam, "heads": K, "rows": rows, "layer": layer, "order": n, "token_weighted": token_weighted_rate(keys, primes), "all_heads": d, "all_heads_weighted": w})
        del keys
    progress("audit", len(units), len(units), "done")
    return audit_report(plan, stats, families=families, layers=layers, audits=audits, target=target, sizing_rows=sizing_rows, sweep=sweep, cells=cells, cell_rows=cell_rows)


def audit_report(plan: TablePlan, stats: NgramStats, *, families, layers, audits: list[dict], target: float | None, sizing_rows: list[dict], sweep: SweepSpec | None, cells: list, cell_rows: list[dict]) -> dict:
    """The whole report from the per-(family, layer, order) audits, sizing rows and sweep cell rows
    (each list in (family, layer, order) order): the cross-layer summaries are computed here."""
    return {
        "plan": plan_summary(plan),
        "families": list(families),
        "layers": list(layers),
        "orders": {str(n): {"distinct": stats.distinct(n), "occurrences": stats.total(n)} for n in plan.orders},
        "audit": audits,
        "family_distance": family_distance(audits),
        "sizing": sizing_summary(plan, target, families[0], sizing_rows) if target is not None else None,
        "sweep": sweep_summary(cells, cell_rows, families) if sweep is not None else None,
    }


def sizing_summary(plan: TablePlan, target: float, family: str, rows: list[dict]) -> dict:
    """The --target answer per order (the largest rows any audited layer needs) from `size_for_target` rows."""
    per_order = []
    answer = list(plan.rows_per_head)
    reachable = True
    for n in plan.orders:
        mine = [r for r in rows if r["order"] == n]
        ok = all(r["reachable"] for r in mine)
        need = max((r["rows_per_head"] for r in mine if r["rows_per_head"] is not None), default=None)
        if ok and need is not None:
            answer[n - 2] = need
        reachable &= ok
        per_order.append({"order": n, "rows_per_head": need if ok else None, "reachable": ok, "per_layer": mine})
    sized = plan.remade(rows_per_head=tuple(answer)) if reachable else None
    for entry in per_order:
        entry["bytes"] = order_bytes(sized, entry["order"]) if sized else None
    return {
        "target": target,
        "family": family,
        "criterion": "mean over the order's heads of the token-weighted rate, <= target in every audited layer",
        "orders": per_order,
        "total_bytes": sized.total_bytes if sized else None,
        "current_total_bytes": plan.total_bytes,
    }


def sweep_summary(cells, rows: list[dict], families) -> dict:
    """The --sweep grid (per cell: rates averaged over orders, bytes) from per-(layer, order) cell rows."""
    grid = []
    for fam in families:
        for K, r, cell_plan in cells:
            mine = [x for x in rows if x["family"] == fam and x["heads"] == K and x["rows"] == r]
            per_order = {}
            for n in cell_plan.orders:
                on = [x for x in mine if x["order"] == n]
                per_order[str(n)] = {k: float(np.mean([x[k] for x in on])) for k in ("token_weighted", "all_heads", "all_heads_weighted")}
            grid.append(
                {
                    "family": fam,
                    "heads": K,
                    "rows": r,
                    "rows_per_head": list(cell_plan.rows_per_head),
                    "bytes": cell_plan.total_bytes,
                    "token_weighted": float(np.mean([v["token_weighted"] for v in per_order.values()])),
                    "all_heads": float(np.mean([v["all_heads"] for v in per_order.values()])),
                    "all_heads_weighted": float(np.mean([v["all_heads_weighted"] for v in per_order.values()])),
                    "per_order": per_order,
                }
            )
    return {"heads": sorted({c[0] for c in cells}), "rows": list(dict.fromkeys(c[1] for c in cells)), "grid": grid}


def save_figure(fig, path) -> None:
    """Write a matplotlib figure to `path` (120 dpi) and close it; a failed write is one OutputError line."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise OutputError(f"cannot write the --plot image {str(path)!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def plot_sweep(sweep: dict, path) -> None:
    """Draw the sweep grid (rates vs bytes, one line per head count) to an image file."""
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EngramError("--plot needs matplotlib, which is not installed; run `pip install 'engram-cli[plot]'` (or pip install matplotlib)") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, key, title in ((axes[0], "token_weighted", "token-weighted collision rate"), (axes[1], "all_heads_weighted", "all-heads (indistinguishable) share of tokens")):
        for fam in dict.fromkeys(c["family"] for c in sweep["grid"]):
            for K in sweep["heads"]:
                pts = sorted((c["bytes"], c[key]) for c in sweep["grid"] if c["family"] == fam and c["heads"] == K)
                ax.plot([p[0] for p in pts], [max(p[1], 1e-9) for p in pts], marker="o", label=f"{fam} K={K}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("table bytes")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def check_plot_path(path) -> None:
    """The --plot image's folder must exist (and be a folder): checked before any work."""
    from pathlib import Path

    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise OutputError(f"--plot {str(path)!r} is a directory; give an image file name such as sweep.png")
    if not parent.exists():
        raise OutputError(f"--plot {str(path)!r}: directory {str(parent)!r} does not exist; create it or choose another path")
    if not parent.is_dir():
        raise OutputError(f"--plot {str(path)!r}: {str(parent)!r} is not a directory")


def check_plot_support(path=None) -> None:
    """Raise a clear error now (before any work) when --plot cannot be honoured: the
    image's folder (when `path` is given) first, then matplotlib."""
    import importlib.util

    if path is not None:
        check_plot_path(path)
    if importlib.util.find_spec("matplotlib") is None:
        raise EngramError("--plot needs matplotlib, which is not installed; run `pip install 'engram-cli[plot]'` (or pip install matplotlib)")
