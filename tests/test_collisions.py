"""The collision audit against brute force: every figure recomputed here from a Python
dict over hashes computed with Python integers (reference) or xxhash called directly."""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from itertools import combinations

import numpy as np
import pytest
import xxhash

from engram_cli import audit as C
from engram_cli import hashing as H
from engram_cli.errors import EngramError, PlanError, StoreError
from engram_cli.kinds import HashFamily
from engram_cli.ngrams import write_stats_from_arrays
from engram_cli.plan import make_plan, parse_budget
from oracles import bf_bucket, brute_force, check_audit, close, ref_mix  # noqa: E402,F401

VOCAB = 97


# -- brute force ---------------------------------------------------------------------


def bf_token_weighted_mean(family, plan, layer, order, ids, counts, primes):
    W = sum(counts)
    rates = []
    for j, p in enumerate(primes):
        groups = defaultdict(list)
        for i, g in enumerate(ids):
            groups[bf_bucket(family, plan, layer, order, j, p, g)].append(i)
        rates.append(sum(counts[i] for g in groups.values() if len(g) > 1 for i in g) / W)
    return sum(rates) / len(rates)


def bf_all_heads(family, plan, layer, order, ids, counts, primes):
    rows = [tuple(bf_bucket(family, plan, layer, order, j, p, g) for j, p in enumerate(primes)) for g in ids]
    n = defaultdict(int)
    for r in rows:
        n[r] += 1
    hit = [n[r] > 1 for r in rows]
    return sum(hit) / len(ids), sum(c for c, h in zip(counts, hit) if h) / sum(counts)


# -- fixtures --------------------------------------------------------------------------
def random_ngrams(rng, order, m, vocab=VOCAB):
    ids = np.unique(rng.integers(0, vocab, size=(m, order)), axis=0)
    counts = rng.zipf(1.7, size=len(ids)).astype(np.int64)
    return ids, counts


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    rng = np.random.default_rng(7)
    per_order = {2: random_ngrams(rng, 2, 260), 3: random_ngrams(rng, 3, 300)}
    stats = write_stats_from_arrays(tmp_path_factory.mktemp("stats"), per_order)
    plan = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, layer_ids=(1, 15), heads=4, dim=64, rows_per_head=(60, 90), seed=3)
    return plan, stats, per_order


# -- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["reference", "xxh3"])
@pytest.mark.parametrize("small_set", [C.SMALL_SET, 0])
def test_every_figure_matches_brute_force(fixture, family, small_set):
    plan, stats, per_order = fixture
    keys = [f"w{i} " for i in range(VOCAB)]
    report = C.audit_collisions(plan, stats, families=(family,), vocab_keys=keys, small_set=small_set)
    assert [(a["layer"], a["order"]) for a in report["audit"]] == [(1, 2), (1, 3), (15, 2), (15, 3)]
    for a in report["audit"]:
        ids, counts = per_order[a["order"]]
        assert a["distinct"] == len(ids) and a["occurrences"] == int(counts.sum())
        bf = brute_force(family, plan, a["layer"], a["order"], ids, counts)
        check_audit(a, bf, ids, counts, keys)
        if family == "reference":
            assert a["across"]["mix_duplicates"] == bf["mix_dups"]
        else:
            assert a["across"]["mix_duplicates"] is None


def test_planted_pair_shares_every_head(tmp_path):
    """Tiny primes (3, 5, 7, 11: far below 2^64 together): two n-grams whose mixes differ
    by a multiple of 3*5*7*11 collide in every head without identical mixes."""
    plan = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, layer_ids=(1,), max_ngram_size=2, heads=4, dim=64, rows_per_head=3)
    primes = plan.primes[1][0]
    assert primes == (3, 5, 7, 11)
    mult = plan.multipliers[1]
    q = math.prod(primes)
    x = (5, 17)
    target = ref_mix(x, mult) % q
    y = next((a, b) for a in range(VOCAB) for b in range(VOCAB) if (a, b) != x and ref_mix((a, b), mult) % q == target and ref_mix((a, b), mult) != ref_mix(x, mult))
    # fill with n-grams that do not share all four heads with anyone
    chosen, seen = [x, y], {target}
    for a in range(VOCAB):
        for b in range(VOCAB):
            r = ref_mix((a, b), mult) % q
            if (a, b) not in chosen and r not in seen and len(chosen) < 40:
                chosen.append((a, b))
                seen.add(r)
    ids = np.array(chosen, dtype=np.int64)
    counts = np.arange(1, len(ids) + 1, dtype=np.int64)
    stats = write_stats_from_arrays(tmp_path, {2: (ids, counts)})
    for small_set in (C.SMALL_SET, 0):
        a = C.audit_collisions(plan, stats, small_set=small_set)["audit"][0]
        x_ = a["across"]
        assert x_["indistinguishable"]["count"] == 2
        assert x_["indistinguishable"]["distinct"] == pytest.approx(2 / len(ids))
        assert x_["indistinguishable"]["weighted"] == pytest.approx(3 / counts.sum())
        assert x_["mix_duplicates"] == 0 and x_["identical_from_heads"] is None
        assert x_["worst_partner_heads"]["distinct"][4] == 2
        check_audit(a, brute_force("reference", plan, 1, 2, ids, counts), ids, counts)


def test_worst_partner_heads_generic_vs_dict():
    """Large random buckets (candidate sets past SMALL_SET; keys past the direct-count range):
    the level algorithm against a dict over every subset of heads."""
    rng = np.random.default_rng(11)
    m, primes = 30000, [30011, 30013, 30029, 30047]
    buckets = [rng.integers(0, p, size=m) for p in primes]
    for j in (1, 2, 3):  # plant partners sharing 2, 3 and 4 heads
        for i in range(0, 60, 2):
            src, dst = 1000 + 100 * j + i, 1001 + 100 * j + i
            for h in range(j + 1):
                buckets[h][dst] = buckets[h][src]
    s = C.worst_partner_heads(buckets, primes)
    expect = np.zeros(m, dtype=np.int64)
    for size in range(1, 5):
        for S in combinations(range(4), size):
            groups = defaultdict(list)
            for i in range(m):
                groups[tuple(int(buckets[j][i]) for j in S)].append(i)
            for g in groups.values():
                if len(g) > 1:
                    expect[g] = np.maximum(expect[g], size)
    assert np.array_equal(s, expect), np.flatnonzero(s != expect)[:10]
    assert (s == 4).sum() >= 60


def test_identical_mix_shortcut_matches_generic():
    """Reference-size primes: sharing 4+ heads means identical mixes; the shortcut agrees
    with the generic path, including planted identical mixes and 2/3-head partners."""
    rng = np.random.default_rng(5)
    plan = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, heads=8)
    primes = list(plan.primes[1][0])
    assert C.identical_from(primes) == 4
    mix = rng.integers(-(2**63), 2**63 - 1, size=50000, dtype=np.int64)
    mix[10:20] = mix[0:10]  # identical mixes
    q = primes[0] * primes[1] * primes[2]
    mix[30] = mix[31] + q if mix[31] < 0 else mix[31] - q  # shares exactly heads 0, 1, 2
    buckets = [mix % np.int64(p) for p in primes]
    dup = C.duplicated(mix)
    fast = C.worst_partner_heads(buckets, primes, mix_duplicated=dup)
    slow = C.worst_partner_heads(buckets, primes, small_set=0)
    assert np.array_equal(fast, slow)
    assert (fast[:20] == 8).all() and fast[30] >= 3 and fast[31] >= 3


def test_duplicated_exact():
    rng = np.random.default_rng(3)
    for n, hi in ((10, 5), (5000, 10**6), (200000, 2**62)):
        key = rng.integers(-hi, hi, size=n, dtype=np.int64)
        key[: n // 50] = key[n // 50 : 2 * (n // 50)]
        _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        assert np.array_equal(C.duplicated(key), cnt[inv] > 1)
        cols = [key % 1000003, key % 999983, key % 7]
        rows = defaultdict(int)
        for r in zip(*cols):
            rows[r] += 1
        want = np.array([rows[r] > 1 for r in zip(*cols)])
        assert np.array_equal(C.duplicated_rows(cols, [1000003, 999983, 7]), want)
        big = [key % 4294967291, key % 4294967279, key % 4294967231]  # product past 2^63: hashed path
        rows = defaultdict(int)
        for r in zip(*big):
            rows[r] += 1
        want = np.array([rows[r] > 1 for r in zip(*big)])
        assert np.array_equal(C.duplicated_rows(big, [4294967291, 4294967279, 4294967231]), want)


def test_ideal_formula_vs_simulation():
    rng = np.random.default_rng(2024)
    m, p, trials = 400, 257, 3000
    shares = []
    for _ in range(trials):
        b = rng.integers(0, p, size=m)
        occ = np.bincount(b, minlength=p)
        shares.append((occ[b] > 1).mean())
    sim = float(np.mean(shares))
    se = float(np.std(shares)) / math.sqrt(trials)
    assert abs(sim - C.ideal_shared(m, p)) < 4 * se + 1e-12, (sim, C.ideal_shared(m, p), se)
    # across two independent ideal heads: all-heads and clean-head expectations
    primes, m2 = (17, 19), 60
    indist, clean = [], []
    for _ in range(trials):
        B = [rng.integers(0, q, size=m2) for q in primes]
        key = B[0] * primes[1] + B[1]
        cnt = np.bincount(key, minlength=primes[0] * primes[1])
        indist.append((cnt[key] > 1).mean())
        clean.append(np.logical_or.reduce([np.bincount(b, minlength=q)[b] == 1 for b, q in zip(B, primes)]).mean())
    for sim_v, ideal in ((indist, C.ideal_all_heads(m2, primes)), (clean, C.ideal_clean_head(m2, primes))):
        se = float(np.std(sim_v)) / math.sqrt(trials)
        assert abs(float(np.mean(sim_v)) - ideal) < 4 * se + 1e-12, (np.mean(sim_v), ideal, se)
    assert C.rows_for_rate(1000, 0.05) == pytest.approx(1 / (1 - 0.95 ** (1 / 999)), abs=1)


def test_what_if_plans(fixture):
    plan, stats, per_order = fixture
    w, notes = C.what_if_plan(plan, heads=8)
    assert (w.heads, w.dim, w.layer_ids, w.seed, w.compressed_vocab_size, w.compressed_pad_id, w.rows_per_head) == (8, 64, plan.layer_ids, plan.seed, VOCAB, 2, plan.rows_per_head)
    assert notes == [] and w.multipliers == plan.multipliers
    w3, notes = C.what_if_plan(plan, heads=3)
    assert w3.dim == 3 * plan.head_dim and notes
    wr, _ = C.what_if_plan(plan, rows_per_head=(40,))
    assert wr.rows_per_head == (40, 40) and wr.heads == plan.heads
    wb, _ = C.what_if_plan(plan, budget=parse_budget("200KB"))
    assert wb.total_bytes <= 200_000
    with pytest.raises(PlanError, match="--budget and --rows-per-head"):
        C.what_if_plan(plan, rows_per_head=(40,), budget=parse_budget("1MB"))
    assert C.what_if_plan(plan) == (plan, [])
    # the audit of a what-if plan is the brute force of that plan
    a = C.audit_collisions(w, stats, layers=(15,))["audit"]
    assert [x["layer"] for x in a] == [15, 15]
    for x in a:
        ids, counts = per_order[x["order"]]
        assert [h["p"] for h in x["heads"]] == list(w.primes[15][x["order"] - 2])
        check_audit(x, brute_force("reference", w, 15, x["order"], ids, counts), ids, counts)
    with pytest.raises(PlanError, match="--layers 7"):
        C.audit_collisions(plan, stats, layers=(7,))


def test_sweep_cells_match_brute_force(fixture):
    plan, stats, per_order = fixture
    spec = C.parse_sweep(["heads=1,2,4", "rows=0.5x,2x"], plan)
    for family in ("reference", "xxh3"):
        report = C.audit_collisions(plan, stats, families=(family,), sweep=spec, top=0)
        grid = report["sweep"]["grid"]
        assert len(grid) == 6
        for cell in grid:
            cp = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, layer_ids=(1, 15), heads=cell["heads"], dim=64, rows_per_head=tuple(cell["rows_per_head"]), seed=3)
            assert cell["bytes"] == cp.total_bytes
            for n in (2, 3):
                ids, counts = per_order[n]
                per = [(bf_token_weighted_mean(family, plan, layer, n, ids, counts, cp.primes[layer][n - 2]), bf_all_heads(family, plan, layer, n, ids, counts, cp.primes[layer][n - 2])) for layer in (1, 15)]
                close(cell["per_order"][str(n)]["token_weighted"], np.mean([t for t, _ in per]), "sweep token-weighted")
                close(cell["per_order"][str(n)]["all_heads"], np.mean([d for _, (d, _) in per]), "sweep all-heads")
                close(cell["per_order"][str(n)]["all_heads_weighted"], np.mean([w for _, (_, w) in per]), "sweep all-heads weighted")
    assert C.parse_sweep(["rows=1x"], plan).heads == (plan.heads,)
    assert C.resolve_rows("0.5x", plan) == (30, 45) and C.resolve_rows("1000", plan) == (1000, 1000)
    for bad in (["heads=a"], ["cols=1"], ["rows=fast"], [""]):
        with pytest.raises(PlanError):
            C.parse_sweep(bad, plan)


def test_sizing_reaches_target(fixture):
    plan, stats, per_order = fixture
    target = 0.3
    report = C.audit_collisions(plan, stats, target=target, top=0)
    s = report["sizing"]
    assert s["target"] == target
    for o in s["orders"]:
        n = o["order"]
        ids, counts = per_order[n]
        assert o["reachable"] and o["rows_per_head"] == max(r["rows_per_head"] for r in o["per_layer"])
        rph = list(plan.rows_per_head)
        for r in o["per_layer"]:
            rph[n - 2] = r["rows_per_head"]
            at = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, layer_ids=(1, 15), heads=4, dim=64, rows_per_head=tuple(rph), seed=3)
            rate = bf_token_weighted_mean("reference", plan, r["layer"], n, ids, counts, at.primes[r["layer"]][n - 2])
            close(r["rate"], rate, "sizing rate")
            assert rate <= target
            if r["bracket_low"] >= 2:
                rph[n - 2] = r["bracket_low"]
                below = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, layer_ids=(1, 15), heads=4, dim=64, rows_per_head=tuple(rph), seed=3)
                assert bf_token_weighted_mean("reference", plan, r["layer"], n, ids, counts, below.primes[r["layer"]][n - 2]) > target
    rph = [o["rows_per_head"] for o in s["orders"]]
    sized = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, layer_ids=(1, 15), heads=4, dim=64, rows_per_head=tuple(rph), seed=3)
    assert s["total_bytes"] == sized.total_bytes
    assert [o["bytes"] for o in s["orders"]] == [sum(sum(sized.primes[layer][n - 2]) for layer in (1, 15)) * 16 * 4 for n in (2, 3)]
    with pytest.raises(PlanError, match="--target"):
        C.audit_collisions(plan, stats, target=1.5)


def test_family_distance_and_options(fixture):
    plan, stats, _ = fixture
    report = C.audit_collisions(plan, stats, families="reference,xxh3", top=0)
    assert report["families"] == ["reference", "xxh3"]
    for fam, d in report["family_distance"].items():
        heads = [h for a in report["audit"] if a["family"] == fam for h in a["heads"]]
        close(d["shared_excess_mean"], np.mean([h["shared_observed"] - h["shared_ideal"] for h in heads]), "excess")
        close(d["token_weighted_excess_mean"], np.mean([h["token_weighted"] - h["shared_ideal"] for h in heads]), "tw excess")
    with pytest.raises(PlanError, match="unknown hash family"):
        HashFamily.parse_many("md5")
    assert HashFamily.parse_many("both") == ("reference", "xxh3")
    assert H.xxh3_seed(3, 15, 2, 1) == ((3 * 65536 + 15) * 256 + 2) * 256 + 1


def test_missing_order_is_a_store_error(tmp_path):
    rng = np.random.default_rng(0)
    stats = write_stats_from_arrays(tmp_path, {2: random_ngrams(rng, 2, 50)})
    plan = make_plan(compressed_vocab_size=VOCAB, compressed_pad_id=2, heads=2, dim=64, rows_per_head=50)
    with pytest.raises(StoreError, match="cover orders"):
        C.audit_collisions(plan, stats)


def test_plot_needs_matplotlib_or_draws(tmp_path, fixture):
    plan, stats, _ = fixture
    report = C.audit_collisions(plan, stats, sweep=C.parse_sweep(["heads=1,2"], plan), top=0)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(EngramError, match="pip install"):
            C.check_plot_support()
        with pytest.raises(EngramError, match="matplotlib"):
            C.plot_sweep(report["sweep"], tmp_path / "s.png")
    else:
        C.plot_sweep(report["sweep"], tmp_path / "s.png")
        assert (tmp_path / "s.png").stat().st_size > 0


def test_plot_path_checked_before_matplotlib(tmp_path, fixture):
    missing = tmp_path / "nodir" / "p.png"
    for call in (lambda: C.check_plot_support(missing), lambda: C.check_plot_path(missing)):
        with pytest.raises(EngramError, match="directory .*nodir.* does not exist"):
            call()
    with pytest.raises(EngramError, match="is a directory"):
        C.check_plot_path(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EngramError, match="is not a directory"):
        C.check_plot_path(tmp_path / "file" / "p.png")
    C.check_plot_path(tmp_path / "ok.png")  # an existing folder passes
    plan, stats, _ = fixture
    report = C.audit_collisions(plan, stats, sweep=C.parse_sweep(["heads=1,2"], plan), top=0)
    with pytest.raises(EngramError, match="does not exist"):
        C.plot_sweep(report["sweep"], missing)


# -- vectorized xxh3, compact buckets, streaming row reads -------------------------------
@pytest.mark.parametrize("order", [2, 3, 4, 7, 60, 61])
def test_xxh3_digests_match_xxhash(order):
    rng = np.random.default_rng(order)
    ids = rng.integers(0, 2**32, size=(200, order), dtype=np.int64)
    seeds = [H.xxh3_seed(3, layer, order, j) for layer in (1, 15) for j in range(3)] + [0, 2**64 - 1]
    got = H.xxh3_digests(ids, seeds)
    for j, seed in enumerate(seeds):
        want = [xxhash.xxh3_64_intdigest(struct.pack(f"<{order}I", *map(int, g)), seed) for g in ids]
        assert list(map(int, got[:, j])) == want
    assert np.array_equal(got, H.xxh3_digests_loop(ids, seeds))


@pytest.mark.parametrize("family", ["reference", "xxh3"])
def test_buckets_uint32_or_int64(fixture, family):
    plan, stats, per_order = fixture
    ids, _ = per_order[3]
    keys = C.load_order_keys(plan, stats, 15, 3, family, heads=2)
    rows = stats.scan(3).collect()
    ids = np.column_stack([rows[f"tok_{i}"].to_numpy() for i in range(3)])
    for p, dtype in ((89, np.uint32), (2**32 - 5, np.uint32), (2**32 + 15, np.int64), (2**61 - 1, np.int64)):
        b = keys.buckets(1, p)
        assert b.dtype == dtype
        assert [int(x) for x in b] == [bf_bucket(family, plan, 15, 3, 1, p, g) for g in ids]
    assert C.bucket_dtype(2**32) == np.uint32 and C.bucket_dtype(2**32 + 1) == np.int64


def test_buckets_chunked(fixture, monkeypatch):
    plan, stats, _ = fixture
    keys = C.load_order_keys(plan, stats, 1, 2, "reference", heads=1)
    whole = keys.buckets(0, 53)
    monkeypatch.setattr("engram_cli.audit.keys.BUCKET_CHUNK", 7)
    assert np.array_equal(keys.buckets(0, 53), whole)


def test_worst_partner_heads_is_a_small_counter():
    rng = np.random.default_rng(4)
    buckets = [rng.integers(0, 50, size=300).astype(np.uint32) for _ in range(3)]
    s = C.worst_partner_heads(buckets, [50, 50, 50])
    assert s.dtype == np.uint8 and int(s.max()) <= 3
    assert C.count_dtype(255) == np.uint8 and C.count_dtype(256) == np.uint16


@pytest.mark.parametrize("batch_rows", [1, 7, 64, 1 << 21])
def test_read_rows_streams(fixture, batch_rows):
    _, stats, _ = fixture
    df = stats.scan(3).collect()
    rng = np.random.default_rng(batch_rows)
    rows = rng.integers(0, df.height, size=40)
    rows[:3] = [df.height - 1, 0, rows[5]]  # last row, first row, a repeat; any order
    ids, counts = C.read_rows(stats, 3, rows, batch_rows=batch_rows)
    for k, r in enumerate(rows):
        assert ids[k].tolist() == [int(df[f"tok_{i}"][int(r)]) for i in range(3)]
        assert counts[k] == df["count"][int(r)]
    empty_ids, empty_counts = C.read_rows(stats, 3, np.zeros(0, np.int64))
    assert empty_ids.shape == (0, 3) and empty_counts.shape == (0,)
    with pytest.raises(StoreError):
        C.read_rows(stats, 3, np.array([df.height]))
