"""The table plan: which primes, offsets and multipliers address every row.

`TablePlan` is the single source of truth for addressing. The store's attributes,
the kernels and the checkpoints all hold `TablePlan.to_dict()`; `TablePlan.from_dict`
restores it and checks its fingerprint. The construction follows docs/spec.md,
"Table plan" (DeepSeek's `engram_demo_v1.py`) exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import EngramError, PlanError, StoreError
from .fp8 import check_fp8_head_dim
from .kinds import HashFamily, TableDtype
from .units import parse_bytes

# The layer seed stride of the reference (`PRIME_1` in engram_demo_v1.py).
LAYER_SEED_STRIDE = 10007

# Reference defaults (docs/spec.md, "Table plan").
DEFAULT_LAYER_IDS = (1, 15)
DEFAULT_MAX_NGRAM = 3
DEFAULT_HEADS = 8
DEFAULT_ROWS_PER_HEAD = 129280 * 5  # engram_vocab_size per order
DEFAULT_DIM = 512  # n_embed_per_ngram; each head's row is dim // heads wide
DEFAULT_SEED = 0
DEFAULT_PAD_ID = 2  # a tokenizer id, compressed before use
# Far above any real table (DeepSeek's ~768 M rows are all heads together), and low
# enough that primes, row offsets and mix % p stay in int64.
MAX_ROWS_PER_HEAD = 1 << 40
# A restored plan's primes are bounded (`check_plan_consistent`): the next unused prime
# above a request of at most 2**40 rows lies far below 2**41.
MAX_PRIME = 1 << 41


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin, exact for every n < 3.3e24 (so any int64)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime(start: int, seen: set[int]) -> int:
    """The smallest prime p > start that is not in `seen` (the reference's `find_next_prime`)."""
    p = start + 1
    while not (is_prime(p) and p not in seen):
        p += 1
    return p


def plan_primes(layer_ids, max_ngram_size: int, heads: int, rows_per_head) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Per layer, per order (2..max), the K head primes; one `seen` set across everything."""
    seen: set[int] = set()
    primes: dict[int, tuple[tuple[int, ...], ...]] = {}
    for layer_id in layer_ids:
        per_order = []
        for n in range(2, max_ngram_size + 1):
            start = rows_per_head[n - 2] - 1
            heads_primes = []
            for _ in range(heads):
                p = next_prime(start, seen)
                seen.add(p)
                heads_primes.append(p)
                start = p
            per_order.append(tuple(heads_primes))
        primes[int(layer_id)] = tuple(per_order)
    return primes


def layer_multipliers(layer_id: int, seed: int, max_ngram_size: int, compressed_vocab_size: int) -> tuple[int, ...]:
    """The reference's odd multipliers for one layer (one per position in the window)."""
    m_max = int(np.iinfo(np.int64).max // compressed_vocab_size)
    half = max(1, m_max // 2)
    rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer_id)))
    r = rng.integers(0, half, size=(max_ngram_size,), dtype=np.int64)
    return tuple(int(v) for v in (r * 2 + 1))


@dataclass(frozen=True)
class TablePlan:
    """Everything needed to hash tokens to rows and to size the tables.

    `primes[layer][n - 2][j]` is the table size of head j of order n in that layer;
    a layer's rows are all its heads stacked order-major (order 2 heads 0..K-1, then
    order 3, ...), so head i starts at `row_offsets(layer)[i]`.
    """

    layer_ids: tuple[int, ...]
    max_ngram_size: int
    heads: int
    rows_per_head: tuple[int, ...]  # requested size per order (engram_vocab_size)
    dim: int  # n_embed_per_ngram: the width of one token's concatenated order rows
    seed: int
    pad_id: int  # tokenizer id
    compressed_pad_id: int
    compressed_vocab_size: int
    primes: dict[int, tuple[tuple[int, ...], ...]]
    multipliers: dict[int, tuple[int, ...]]
    dtype: str = TableDtype.FLOAT32.value
    hash_family: str = HashFamily.REFERENCE.plan_name  # "multiply-xor": the name stores and fingerprints hold
    tokenizer_sha256: str = ""
    vocab_fingerprint: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    # -- derived figures -------------------------------------------------------
    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(range(2, self.max_ngram_size + 1))

    @property
    def head_dim(self) -> int:
        """Columns of every table row (`n_embed_per_ngram // n_head_per_ngram`)."""
        return self.dim // self.heads

    @property
    def heads_per_layer(self) -> int:
        return len(self.orders) * self.heads

    def head_primes(self, layer_id: int) -> np.ndarray:
        """All head sizes of a layer, order-major, as int64 (length (max-1)*K)."""
        return np.array([p for order in self.primes[layer_id] for p in order], dtype=np.int64)

    def order_primes(self, layer_id: int, order: int) -> np.ndarray:
        return np.array(self.primes[layer_id][order - 2], dtype=np.int64)

    def row_offsets(self, layer_id: int) -> np.ndarray:
        """First row of each head in the layer's table (exclusive prefix sum of the primes)."""
        p = self.head_primes(layer_id)
        return np.concatenate([[0], np.cumsum(p)[:-1]]).astype(np.int64)

    def order_offsets(self, layer_id: int, order: int) -> np.ndarray:
        i = (order - 2) * self.heads
        return self.row_offsets(layer_id)[i : i + self.heads]

    def layer_rows(self, layer_id: int) -> int:
        return int(self.head_primes(layer_id).sum())

    @property
    def total_rows(self) -> int:
        return sum(self.layer_rows(layer) for layer in self.layer_ids)

    @property
    def dtype_bytes(self) -> int:
        return TableDtype.parse(self.dtype).bytes_per_value  # fp8 rows also carry head_dim // 32 scale bytes

    def layer_bytes(self, layer_id: int) -> int:
        return self.layer_rows(layer_id) * self.head_dim * self.dtype_bytes

    @property
    def total_params(self) -> int:
        return self.total_rows * self.head_dim

    @property
    def total_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    # -- what-if variants -------------------------------------------------------
    def make_kwargs(self) -> dict:
        """The `make_plan` arguments that rebuild this plan."""
        return dict(
            compressed_vocab_size=self.compressed_vocab_size,
            compressed_pad_id=self.compressed_pad_id,
            layer_ids=self.layer_ids,
            max_ngram_size=self.max_ngram_size,
            heads=self.heads,
            rows_per_head=self.rows_per_head,
            dim=self.dim,
            seed=self.seed,
            pad_id=self.pad_id,
            dtype=self.dtype,
            hash_family=self.hash_family,
            tokenizer_sha256=self.tokenizer_sha256,
            vocab_fingerprint=self.vocab_fingerprint,
        )

    def remade(self, **changes) -> "TablePlan":
        """This plan rebuilt with some `make_plan` arguments changed (what-if plans)."""
        return make_plan(**(self.make_kwargs() | changes))

    # -- serialization ---------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-safe dict (integers stay integers; multipliers exceed 2**53)."""
        return {
            "format": "engram-table-plan/1",
            "layer_ids": list(self.layer_ids),
            "max_ngram_size": self.max_ngram_size,
            "orders": list(self.orders),
            "heads": self.heads,
            "rows_per_head": list(self.rows_per_head),
            "dim": self.dim,
            "head_dim": self.head_dim,
            "seed": self.seed,
            "pad_id": self.pad_id,
            "compressed_pad_id": self.compressed_pad_id,
            "compressed_vocab_size": self.compressed_vocab_size,
            "primes": {str(k): [list(o) for o in v] for k, v in self.primes.items()},
            "row_offsets": {str(k): self.row_offsets(k).tolist() for k in self.layer_ids},
            "layer_rows": {str(k): self.layer_rows(k) for k in self.layer_ids},
            "multipliers": {str(k): list(v) for k, v in self.multipliers.items()},
            # Multipliers pass 2**53: readers that parse JSON numbers as doubles use these.
            "multipliers_str": {str(k): [str(m) for m in v] for k, v in self.multipliers.items()},
            "dtype": self.dtype,
            "hash_family": self.hash_family,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_fingerprint": self.vocab_fingerprint,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TablePlan":
        try:
            plan = cls(
                layer_ids=tuple(int(x) for x in d["layer_ids"]),
                max_ngram_size=int(d["max_ngram_size"]),
                heads=int(d["heads"]),
                rows_per_head=tuple(int(x) for x in d["rows_per_head"]),
                dim=int(d["dim"]),
                seed=int(d["seed"]),
                pad_id=int(d["pad_id"]),
                compressed_pad_id=int(d["compressed_pad_id"]),
                compressed_vocab_size=int(d["compressed_vocab_size"]),
                primes={int(k): tuple(tuple(int(p) for p in o) for o in v) for k, v in d["primes"].items()},
                multipliers={int(k): tuple(int(m) for m in v) for k, v in d["multipliers_str"].items()},
                dtype=str(d["dtype"]),
                hash_family=str(d["hash_family"]),
                tokenizer_sha256=str(d.get("tokenizer_sha256", "")),
                vocab_fingerprint=str(d.get("vocab_fingerprint", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"the stored table plan is malformed ({type(e).__name__}: {e}); rebuild the store with `engram build-table`") from None
        if "fingerprint" in d and d["fingerprint"] != plan.fingerprint:
            raise PlanError(
                f"the stored table plan's fingerprint {d['fingerprint'][:12]} does not match its contents "
                f"({plan.fingerprint[:12]}); the store was edited or is corrupt: rebuild it"
            )
        check_plan_consistent(plan)
        return plan

    @property
    def fingerprint(self) -> str:
        """sha256 over everything that changes an address or a row's bytes."""
        core = {
            "layer_ids": list(self.layer_ids),
            "max_ngram_size": self.max_ngram_size,
            "heads": self.heads,
            "dim": self.dim,
            "seed": self.seed,
            "compressed_pad_id": self.compressed_pad_id,
            "compressed_vocab_size": self.compressed_vocab_size,
            "primes": {str(k): [list(o) for o in v] for k, v in self.primes.items()},
            "multipliers": {str(k): [str(m) for m in v] for k, v in self.multipliers.items()},
            "dtype": self.dtype,
            "hash_family": self.hash_family,
            "vocab_fingerprint": self.vocab_fingerprint,
        }
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


INT64_MAX = int(np.iinfo(np.int64).max)


def _inconsistent(field: str, what: str) -> PlanError:
    return PlanError(f"the stored table plan is inconsistent: {field} {what}; the store was edited or written by a faulty tool: rebuild it with `engram build-table --force`")


def check_plan_consistent(plan: TablePlan) -> None:
    """`PlanError` naming the field when a (restored) plan contradicts itself.

    What `make_plan` guarantees and every reader relies on, checked without I/O in time
    linear in the number of heads (each prime by deterministic Miller-Rabin): layer ids
    distinct and >= 0, the same layers in `primes` and `multipliers`; max_ngram_size >= 2,
    heads >= 1, dim a positive multiple of heads, one rows_per_head per order, each in
    [2, 2**40]; per layer and order `heads` primes, each a prime in [rows_per_head, 2**41], all distinct across the
    plan (docs/spec.md, "Primes"); per layer `max_ngram_size` odd multipliers in
    [1, int64_max // compressed_vocab_size] (so id x multiplier cannot overflow);
    0 <= compressed_pad_id < compressed_vocab_size; pad_id >= 0; a known dtype.
    `from_dict` calls it, so every store, checkpoint and kernel that restores a plan does.
    """
    layers = plan.layer_ids
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
        raise _inconsistent("layer_ids", f"{list(layers)} must be distinct ids >= 0, at least one")
    if set(plan.primes) != set(layers):
        raise _inconsistent("primes", f"cover layers {sorted(plan.primes)}, the plan has layers {sorted(layers)}")
    if set(plan.multipliers) != set(layers):
        raise _inconsistent("multipliers", f"cover layers {sorted(plan.multipliers)}, the plan has layers {sorted(layers)}")
    if plan.max_ngram_size < 2:
        raise _inconsistent("max_ngram_size", f"is {plan.max_ngram_size}, it must be at least 2")
    if plan.heads < 1 or plan.dim < 1 or plan.dim % plan.heads:
        raise _inconsistent("dim", f"{plan.dim} must be a positive multiple of heads {plan.heads}")
    orders = plan.orders
    if len(plan.rows_per_head) != len(orders):
        raise _inconsistent("rows_per_head", f"has {len(plan.rows_per_head)} values for {len(orders)} orders")
    if any(not 2 <= r <= MAX_ROWS_PER_HEAD for r in plan.rows_per_head):
        raise _inconsistent("rows_per_head", f"{list(plan.rows_per_head)} must each be in [2, {MAX_ROWS_PER_HEAD:,}] (2**40)")
    if plan.dtype not in {d.value for d in TableDtype}:
        raise _inconsistent("dtype", f"{plan.dtype!r} is not one of {TableDtype.choices()}")
    if plan.compressed_vocab_size < 1:
        raise _inconsistent("compressed_vocab_size", f"is {plan.compressed_vocab_size}, it must be positive")
    if not 0 <= plan.compressed_pad_id < plan.compressed_vocab_size:
        raise _inconsistent("compressed_pad_id", f"{plan.compressed_pad_id} is outside the compressed vocabulary [0, {plan.compressed_vocab_size})")
    if plan.pad_id < 0:
        raise _inconsistent("pad_id", f"is {plan.pad_id}, a tokenizer id must be >= 0")
    m_max = INT64_MAX // plan.compressed_vocab_size
    seen: dict[int, str] = {}
    for layer in layers:
        per_order = plan.primes[layer]
        if len(per_order) != len(orders) or any(len(heads) != plan.heads for heads in per_order):
            raise _inconsistent(f"primes of layer {layer}", f"are {[len(h) for h in per_order]} per order, the plan needs {plan.heads} heads for each of orders {list(orders)}")
        for n, rows, heads in zip(orders, plan.rows_per_head, per_order):
            for j, p in enumerate(heads):
                where = f"primes of layer {layer} order {n} head {j}"
                if not 2 <= p <= MAX_PRIME:
                    raise _inconsistent(where, f"{p} is outside [2, {MAX_PRIME:,}] (2**41: a head holds at most 2**40 requested rows)")
                if not is_prime(p):
                    raise _inconsistent(where, f"{p} is not a prime")
                if p < rows:
                    raise _inconsistent(where, f"{p} is below rows_per_head {rows}")
                if p in seen:
                    raise _inconsistent(where, f"{p} is not distinct (also the {seen[p]})")
                seen[p] = where
        mults = plan.multipliers[layer]
        if len(mults) != plan.max_ngram_size:
            raise _inconsistent(f"multipliers of layer {layer}", f"are {len(mults)}, the plan needs max_ngram_size = {plan.max_ngram_size}")
        for m in mults:
            if m < 1 or m % 2 == 0 or m > m_max:
                raise _inconsistent(f"multipliers of layer {layer}", f"hold {m}; each must be odd and in [1, {m_max}] (int64_max // compressed_vocab_size)")


def make_plan(
    *,
    compressed_vocab_size: int,
    compressed_pad_id: int,
    layer_ids=DEFAULT_LAYER_IDS,
    max_ngram_size: int = DEFAULT_MAX_NGRAM,
    heads: int = DEFAULT_HEADS,
    rows_per_head=DEFAULT_ROWS_PER_HEAD,
    dim: int = DEFAULT_DIM,
    seed: int = DEFAULT_SEED,
    pad_id: int = DEFAULT_PAD_ID,
    dtype: str = TableDtype.FLOAT32.value,
    hash_family: str = HashFamily.REFERENCE.plan_name,
    tokenizer_sha256: str = "",
    vocab_fingerprint: str = "",
) -> TablePlan:
    """Build the reference plan (docs/spec.md, "Table plan"); every argument is checked."""
    layer_ids = tuple(int(x) for x in layer_ids)
    if not layer_ids:
        raise PlanError("no layers given; pass at least one layer id, e.g. --layers 1,15")
    if len(set(layer_ids)) != len(layer_ids):
        raise PlanError(f"layer ids repeat: {list(layer_ids)}; give each layer once, e.g. --layers 1,15")
    if any(x < 0 for x in layer_ids):
        raise PlanError(f"layer ids must be >= 0, got {list(layer_ids)}")
    if max_ngram_size < 2:
        raise PlanError(f"--max-ngram must be at least 2 (orders 2..N), got {max_ngram_size}")
    check_heads(heads)
    if dim < 1 or dim % heads:
        raise PlanError(f"--dim {dim} must be a positive multiple of --heads {heads} (each head's row is dim // heads wide)")
    n_orders = max_ngram_size - 1
    if isinstance(rows_per_head, int):
        rows_per_head = (rows_per_head,) * n_orders
    rows_per_head = tuple(int(r) for r in rows_per_head)
    if len(rows_per_head) == 1:
        rows_per_head = rows_per_head * n_orders
    if len(rows_per_head) != n_orders:
        raise PlanError(
            f"--rows-per-head has {len(rows_per_head)} values but orders 2..{max_ngram_size} need {n_orders}; "
            "give one value for all orders or one per order"
        )
    if any(r < 2 for r in rows_per_head):
        raise PlanError(f"--rows-per-head must be at least 2, got {list(rows_per_head)}")
    if any(r > MAX_ROWS_PER_HEAD for r in rows_per_head):
        raise PlanError(f"--rows-per-head {max(rows_per_head):,} is beyond {MAX_ROWS_PER_HEAD:,} (2**40) rows per head; a head that large would not fit any host")
    if seed < 0:
        raise PlanError(f"--seed must be >= 0 (it seeds numpy's generator with seed + 10007 * layer), got {seed}")
    if TableDtype.parse(dtype).fp8:
        check_fp8_head_dim(int(dim) // int(heads))  # one scale byte per 32 values of a row
    if compressed_vocab_size < 1:
        raise PlanError(f"compressed vocabulary size must be positive, got {compressed_vocab_size}")
    return TablePlan(
        layer_ids=layer_ids,
        max_ngram_size=int(max_ngram_size),
        heads=int(heads),
        rows_per_head=rows_per_head,
        dim=int(dim),
        seed=int(seed),
        pad_id=int(pad_id),
        compressed_pad_id=int(compressed_pad_id),
        compressed_vocab_size=int(compressed_vocab_size),
        primes=plan_primes(layer_ids, max_ngram_size, heads, rows_per_head),
        multipliers={layer: layer_multipliers(layer, seed, max_ngram_size, compressed_vocab_size) for layer in layer_ids},
        dtype=dtype,
        hash_family=hash_family,
        tokenizer_sha256=tokenizer_sha256,
        vocab_fingerprint=vocab_fingerprint,
    )


# -- budgets -------------------------------------------------------------------
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A memory budget: either bytes (`2GiB`, `800MB`) or parameters (`500M`)."""

    amount: int
    unit: str  # "bytes" | "params"

    def params(self, dtype_bytes: int) -> int:
        return self.amount // dtype_bytes if self.unit == "bytes" else self.amount

    def __str__(self) -> str:
        return f"{self.amount:,} {self.unit}"


def parse_budget(text: str) -> Budget:
    """`2GiB`/`2GB`/`2048MiB` are bytes (binary with `i`); `500M`/`1.5G` are parameters.

    The number and its scale are read by `units.parse_bytes` (one parser for every size
    the CLI takes); a trailing `B` makes it bytes, its absence parameters.
    """
    m = _BUDGET_RE.match(str(text))
    if not m:
        raise PlanError(f"cannot read budget {text!r}; write bytes like 2GiB or 800MB, or parameters like 500M")
    value, scale, binary, is_bytes = m.groups()
    if binary and not is_bytes:
        raise PlanError(f"budget {text!r}: a binary unit needs a B (e.g. 2GiB); write 500M for parameters")
    try:
        amount = parse_bytes(f"{value}{scale}{binary}", what="budget")
    except EngramError:
        raise PlanError(f"budget {text!r} is not positive; write bytes like 2GiB or parameters like 500M") from None
    return Budget(amount=amount, unit="bytes" if is_bytes else "params")


def rows_for_budget(budget: Budget, *, layers: int, orders: int, heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Equal rows per head (all orders) so that the planned tables fit `budget`.

    The primes land slightly above the requested size; `fit_plan_to_budget` trims the
    request until the actual plan fits.
    """
    params = budget.params(dtype_bytes)
    rows = params // (layers * orders * heads * head_dim)
    if rows < 2:
        raise PlanError(
            f"budget {budget} is too small for {layers} layers x {orders} orders x {heads} heads of "
            f"{head_dim} columns; raise --budget or lower --heads/--layers"
        )
    return int(rows)


def fit_plan_to_budget(budget: Budget, **plan_kwargs) -> TablePlan:
    """The reference plan with equal per-order rows per head, the largest that fits `budget`."""
    heads = plan_kwargs.get("heads", DEFAULT_HEADS)
    dim = plan_kwargs.get("dim", DEFAULT_DIM)
    if heads < 1 or dim % heads:
        return make_plan(**plan_kwargs)  # let make_plan raise the precise error
    layers = len(tuple(plan_kwargs.get("layer_ids", DEFAULT_LAYER_IDS)))
    orders = plan_kwargs.get("max_ngram_size", DEFAULT_MAX_NGRAM) - 1
    dtype = plan_kwargs.get("dtype", TableDtype.FLOAT32)
    dtype_bytes = TableDtype(dtype).bytes_per_value if dtype in {d.value for d in TableDtype} else 4  # make_plan rejects others
    rows = rows_for_budget(budget, layers=layers, orders=max(orders, 1), heads=heads, head_dim=dim // heads, dtype_bytes=dtype_bytes)
    limit = budget.params(dtype_bytes)

    def fits(r: int) -> bool:
        return make_plan(rows_per_head=r, **plan_kwargs).total_params <= limit

    # Each head's prime is the next unused prime above the request, so the plan grows
    # monotonically with `rows`: binary-search the largest request that fits.
    lo, hi = 1, rows  # fits(hi) is unknown (primes land above the request); lo is a sentinel
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid >= 2 and fits(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo >= 2:
        return make_plan(rows_per_head=lo, **plan_kwargs)
    raise PlanError(f"budget {budget} is too small for this plan; raise --budget")


# -- checks every command and library caller shares -------------------------------------
def check_rows_or_budget(rows_per_head, budget) -> None:
    """`--rows-per-head` and `--budget` both size the tables: refuse both at once (before any work)."""
    if rows_per_head is not None and budget is not None:
        raise PlanError("--budget and --rows-per-head both size the tables; give one of them")


def check_heads(heads: int) -> int:
    """`--heads`: at least one hash head per order."""
    if heads < 1:
        raise PlanError(f"--heads must be at least 1, got {heads}")
    return int(heads)


def check_target_rate(target: float) -> float:
    """A `--target` collision rate: strictly between 0 and 1 (as a float)."""
    if not 0 < target < 1:
        raise PlanError(f"--target must be a rate between 0 and 1 (e.g. 0.05), got {target}")
    return float(target)


def check_stats_cover(plan: TablePlan, stats) -> None:
    """The n-gram statistics (anything with `.orders`) hold every order of `plan`."""
    missing = [n for n in plan.orders if n not in stats.orders]
    if missing:
        raise StoreError(f"the n-gram statistics cover orders {list(stats.orders)} but the plan needs {list(plan.orders)}; recount with --max-ngram {plan.max_ngram_size}")
