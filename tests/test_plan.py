"""The table plan (docs/spec.md, "Table plan" and "Test vectors"): primes, multipliers, budgets, serialization."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_cli.audit import audit_collisions, what_if_plan
from engram_cli.errors import PlanError, StoreError
from engram_cli.errors import EngramError
from engram_cli.ngrams import write_stats_from_arrays
from engram_cli.units import parse_bytes
from engram_cli.plan import Budget, TablePlan, check_rows_or_budget, check_stats_cover, check_target_rate, fit_plan_to_budget, is_prime, make_plan, parse_budget
from engram_cli.pipeline.sizing import resolve_rows_option, size_plan_to_target

# docs/spec.md, "Test vectors": published vectors of the reference (default parameters, DeepSeek tokenizer).
SPEC_PRIMES = {
    1: [[646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523],
        [646537, 646543, 646549, 646571, 646573, 646577, 646609, 646619]],
    15: [[646631, 646637, 646643, 646669, 646687, 646721, 646757, 646771],
         [646781, 646823, 646831, 646837, 646843, 646859, 646873, 646879]],
}
SPEC_MULTIPLIERS = {1: [76632096046245, 4839876093313, 35959672319349], 15: [28919099099511, 56020370062535, 53929037264533]}


def trial_division_prime(n: int) -> bool:
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


@pytest.fixture(scope="module")
def reference_plan(deepseek_vocab) -> TablePlan:
    return make_plan(compressed_vocab_size=deepseek_vocab.compressed_size, compressed_pad_id=int(deepseek_vocab.compress([2])[0]))


def test_spec_primes_and_multipliers(reference_plan):
    assert {k: [list(o) for o in v] for k, v in reference_plan.primes.items()} == SPEC_PRIMES
    assert {k: list(v) for k, v in reference_plan.multipliers.items()} == SPEC_MULTIPLIERS
    assert reference_plan.head_dim == 64 and reference_plan.compressed_pad_id == 2


def test_primes_distinct_and_prime(reference_plan):
    primes = [p for layer in reference_plan.layer_ids for p in reference_plan.head_primes(layer).tolist()]
    assert len(primes) == len(set(primes)) == 2 * 2 * 8
    assert all(trial_division_prime(p) for p in primes)
    # each is the smallest prime above the previous one (start = engram_vocab_size - 1)
    for layer in reference_plan.layer_ids:
        for order in reference_plan.primes[layer]:
            start = 129280 * 5 - 1
            for p in order:
                assert all(not trial_division_prime(q) or q in primes[: primes.index(p)] for q in range(start + 1, p)), p
                start = p


def test_row_offsets(reference_plan):
    p = reference_plan.head_primes(1).tolist()
    assert reference_plan.row_offsets(1).tolist() == [sum(p[:i]) for i in range(len(p))]
    assert reference_plan.layer_rows(1) == sum(p)
    assert reference_plan.total_bytes == sum(sum(reference_plan.head_primes(k).tolist()) for k in (1, 15)) * 64 * 4


@given(st.integers(0, 10**6))
@settings(max_examples=300, deadline=None)
def test_is_prime_agrees_with_trial_division(n):
    assert is_prime(n) == trial_division_prime(n)


@pytest.mark.parametrize(
    "text, amount, unit",
    [
        ("2GiB", 2 * 1024**3, "bytes"), ("2048MiB", 2 * 1024**3, "bytes"), ("800MB", 800 * 10**6, "bytes"),
        ("1.5GB", 1_500_000_000, "bytes"), ("500M", 500 * 10**6, "params"), ("1.5G", 1_500_000_000, "params"),
        ("  3 k ", 3000, "params"), ("1tib", 1024**4, "bytes"),
        # a bare number is a plain count (no scale), never thousands
        ("12345", 12345, "params"), ("500MB", 500_000_000, "bytes"), ("500MiB", 524_288_000, "bytes"),
    ],
)
def test_parse_budget(text, amount, unit):
    assert parse_budget(text) == Budget(amount=amount, unit=unit)


@pytest.mark.parametrize("text", ["", "abc", "2Gi", "0", "0GB", "-1G", "1..5G", "2 GiBs"])
def test_parse_budget_rejects(text):
    with pytest.raises(PlanError):
        parse_budget(text)


@pytest.mark.parametrize(
    "text, amount",
    [
        # decimal units are powers of 1000, binary ones (with i) powers of 1024: 500 * 1000**2
        # and 500 * 1024**2 written out, so swapping the bases (or the scale table) fails here
        ("500MB", 500 * 1000 * 1000), ("500MiB", 500 * 1024 * 1024), ("500M", 500 * 1000 * 1000),
        ("2GB", 2 * 1000 * 1000 * 1000), ("2GiB", 2 * 1024 * 1024 * 1024), ("3kB", 3000), ("3KiB", 3072),
        ("1TB", 1000**4), ("1TiB", 1024**4), ("1024", 1024), ("1.5kB", 1500), (" 7 b ", 7),
    ],
)
def test_parse_bytes_decimal_and_binary(text, amount):
    assert parse_bytes(text) == amount


@pytest.mark.parametrize("text", ["", "abc", "0", "0MB", "-1MB", "2 GiBs", "1..5G"])
def test_parse_bytes_rejects(text):
    with pytest.raises(EngramError, match="size|positive"):
        parse_bytes(text)


def test_budget_and_byte_sizes_agree():
    """One parser: a byte budget reads exactly what `parse_bytes` reads."""
    for text in ("500MB", "500MiB", "1.5GB", "2TiB", "64kB"):
        assert parse_budget(text) == Budget(amount=parse_bytes(text), unit="bytes")


@pytest.mark.parametrize("budget, kwargs", [("64MiB", {}), ("10M", {"heads": 4, "dim": 256}), ("1GB", {"layer_ids": (2,), "max_ngram_size": 4, "dtype": "bfloat16"})])
def test_fit_plan_to_budget_is_largest_fit(budget, kwargs):
    b = parse_budget(budget)
    plan = fit_plan_to_budget(b, compressed_vocab_size=99092, compressed_pad_id=2, **kwargs)
    limit = b.amount // plan.dtype_bytes if b.unit == "bytes" else b.amount
    assert plan.total_params <= limit
    assert plan.total_params == sum(plan.layer_rows(k) for k in plan.layer_ids) * plan.head_dim
    rows = plan.rows_per_head[0]
    per_row = len(plan.layer_ids) * len(plan.orders) * plan.heads * plan.head_dim
    # scan every larger request up to where the requested rows alone exceed the budget
    fits = [make_plan(rows_per_head=r, compressed_vocab_size=99092, compressed_pad_id=2, **kwargs).total_params for r in range(rows + 1, limit // per_row + 1)]
    best = max([t for t in fits if t <= limit], default=plan.total_params)
    # the plan grows monotonically with the request: no larger request may fit
    assert plan.total_params >= best, (plan.total_params, best, limit)


def test_fit_plan_too_small():
    with pytest.raises(PlanError, match="too small"):
        fit_plan_to_budget(parse_budget("1KiB"), compressed_vocab_size=99092, compressed_pad_id=2)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"layer_ids": ()}, "no layers"), ({"layer_ids": (1, 1)}, "repeat"), ({"layer_ids": (-1,)}, ">= 0"),
        ({"max_ngram_size": 1}, "at least 2"), ({"heads": 0}, "at least 1"), ({"dim": 100, "heads": 8}, "multiple"),
        ({"rows_per_head": (10, 20, 30)}, "need 2"), ({"rows_per_head": 1}, "at least 2"), ({"dtype": "int2"}, "--dtype"),
        ({"compressed_vocab_size": 0}, "positive"),
    ],
)
def test_invalid_plan(kwargs, fragment):
    args = {"compressed_vocab_size": 1000, "compressed_pad_id": 2, "rows_per_head": 1000} | kwargs
    with pytest.raises(PlanError, match=fragment):
        make_plan(**args)


def test_to_dict_round_trip(reference_plan):
    d = json.loads(json.dumps(reference_plan.to_dict()))
    back = TablePlan.from_dict(d)
    assert back == reference_plan and back.fingerprint == reference_plan.fingerprint
    assert back.multipliers[1][0] == SPEC_MULTIPLIERS[1][0]  # > 2**53, exact through JSON
    # a double-precision reader would lose the multipliers; from_dict reads the strings
    d_float = json.loads(json.dumps(reference_plan.to_dict()), parse_int=float)
    assert [int(m) for m in d_float["multipliers_str"]["15"]] == SPEC_MULTIPLIERS[15]
    assert np.array_equal(back.row_offsets(15), reference_plan.row_offsets(15))


def test_from_dict_detects_edits(reference_plan):
    d = json.loads(json.dumps(reference_plan.to_dict()))
    d["primes"]["1"][0][0] = 646409
    with pytest.raises(PlanError, match="fingerprint"):
        TablePlan.from_dict(d)
    d = reference_plan.to_dict()
    del d["multipliers_str"]
    with pytest.raises(PlanError, match="malformed"):
        TablePlan.from_dict(d)


# -- the shared option checks: one home (engram_cli.plan), every caller uses it ------------
def _only_order_2_stats(tmp_path):
    return write_stats_from_arrays(tmp_path, {2: (np.array([[3, 4], [5, 6]], dtype=np.int64), np.array([2, 1], dtype=np.int64))})


@pytest.mark.parametrize("rows, budget, refused", [(None, None, False), ((40,), None, False), (None, Budget(1000, "bytes"), False), ((40,), Budget(1000, "bytes"), True)])
def test_check_rows_or_budget(rows, budget, refused):
    if refused:
        with pytest.raises(PlanError, match=r"^--budget and --rows-per-head both size the tables; give one of them$"):
            check_rows_or_budget(rows, budget)
    else:
        assert check_rows_or_budget(rows, budget) is None


@pytest.mark.parametrize("target", [0, 1, -0.05, 1.5, float("nan")])
def test_check_target_rate_refuses_outside_0_1(target):
    with pytest.raises(PlanError, match=r"^--target must be a rate between 0 and 1 \(e\.g\. 0\.05\), got "):
        check_target_rate(target)


def test_check_target_rate_returns_a_float():
    got = check_target_rate(np.float32(0.25))
    assert type(got) is float and got == 0.25


def test_check_stats_cover_names_the_orders(tmp_path):
    stats = _only_order_2_stats(tmp_path)
    check_stats_cover(make_plan(compressed_vocab_size=97, compressed_pad_id=2, max_ngram_size=2, heads=2, dim=64, rows_per_head=50), stats)
    plan = make_plan(compressed_vocab_size=97, compressed_pad_id=2, max_ngram_size=3, heads=2, dim=64, rows_per_head=50)
    with pytest.raises(StoreError, match=r"^the n-gram statistics cover orders \[2\] but the plan needs \[2, 3\]; recount with --max-ngram 3$"):
        check_stats_cover(plan, stats)


def test_library_callers_share_the_checks(tmp_path):
    """The audit, what-if plans and `--rows-per-head auto` sizing raise the one message of each check."""
    stats = _only_order_2_stats(tmp_path)
    plan = make_plan(compressed_vocab_size=97, compressed_pad_id=2, max_ngram_size=3, heads=2, dim=64, rows_per_head=50)
    cover = r"^the n-gram statistics cover orders \[2\] but the plan needs \[2, 3\]"
    for call in (lambda: audit_collisions(plan, stats), lambda: size_plan_to_target(plan, stats, 0.1)):
        with pytest.raises(StoreError, match=cover):
            call()
    covered = make_plan(compressed_vocab_size=97, compressed_pad_id=2, max_ngram_size=2, heads=2, dim=64, rows_per_head=50)
    target = r"^--target must be a rate between 0 and 1 \(e\.g\. 0\.05\), got 2"
    for call in (lambda: audit_collisions(covered, stats, target=2), lambda: size_plan_to_target(covered, stats, 2), lambda: resolve_rows_option("auto", 2.0)):
        with pytest.raises(PlanError, match=target):
            call()
    with pytest.raises(PlanError, match=r"^--budget and --rows-per-head both size the tables"):
        what_if_plan(plan, rows_per_head=(40, 40), budget=Budget(10**6, "bytes"))
    for call in (lambda: what_if_plan(plan, heads=0), lambda: make_plan(compressed_vocab_size=97, compressed_pad_id=2, heads=0, dim=64)):
        with pytest.raises(PlanError, match=r"^--heads must be at least 1, got 0$"):
            call()
