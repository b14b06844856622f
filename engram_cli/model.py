"""The reference Engram model: a small decoder-only transformer with Engram memory at the plan's layers.

Follows DeepSeek's engram_demo_v1.py (docs/spec.md, "Rows"): per position the
(max_ngram-1)*K looked-up rows are concatenated into e (B, T, D_mem);
value = value_proj(e); key = key_projs.0(e); g = (RMSNorm(key) . RMSNorm(h)) / sqrt(d);
gate = sigmoid(sign(g) * sqrt(|g|)); out = gate*value + short_conv(gate*value), added to
the residual stream before the layer's attention. Module names follow the demo
(`multi_head_embedding`, `value_proj`, `key_projs.*`, `norm1`, `norm2`, `short_conv.*`)
so audits line up; the table itself (the demo's `multi_head_embedding.embedding.weight`)
is not a parameter here: it stays in its store and its rows come through the lookup
kernels (`EngramLookup`), so the model never holds a dense copy, gradient or optimizer
state of it (see `MultiHeadEmbedding`). Without a plan (`--no-engram`) the same
backbone has no Engram layers.

Placement (`place_layers`): the plan's layer ids number the layers of the reference's
30-layer backbone (DeepSeek's demo: layers 1 and 15 of 30); in a backbone of `depth`
blocks, layer id i sits in block ceil(i * depth / 30) (30 -> max id + 1 for a plan with
deeper ids), at most depth - 1, moved up (or down at the top) to the next free block
when two land together. The layer id still addresses the table and its hash: only the
block the branch sits in follows the depth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_cli.kernels import EngramLookup
from engram_cli.kinds import Backend, TableDtype
from engram_cli.moe import MoEFFN, load_balance_loss
from engram_cli.plan import TablePlan

REFERENCE_DEPTH = 30  # the reference backbone the plan's layer ids number (DeepSeek's engram_demo_v1: num_layers 30, layer_ids [1, 15])


def place_layers(layer_ids, depth: int) -> tuple[int, ...]:
    """The block (0 .. depth-1) of each layer id, in the order given: ids scaled from the reference depth, kept distinct and in order."""
    ids = [int(x) for x in layer_ids]
    n = len(ids)
    if depth < n:
        raise ValueError(f"a backbone of {depth} blocks cannot hold {n} Engram layers; give a depth of at least {n}")
    source = max(REFERENCE_DEPTH, max(ids, default=0) + 1)
    blocks, prev = {}, -1
    for i, l in enumerate(sorted(ids)):
        prev = min(max(-(-l * depth // source), prev + 1), depth - n + i)
        blocks[l] = prev
    return tuple(blocks[l] for l in ids)


@dataclass
class ModelConfig:
    """Shape of the reference model; defaults are the CPU demo size."""

    vocab_size: int = 4096  # output ids: the tokens the corpus uses (a 129k-id head would dominate a tiny model)
    n_layer: int = 4  # backbone depth (blocks); the plan's layers are placed into it (place_layers)
    n_head: int = 4  # head width 32: the smallest that still trains well at this size
    d_model: int = 128  # nanoGPT-small scale: 200 steps run in a few minutes on 2 CPU cores
    block_size: int = 128  # context: short, so a CPU step stays fast; Engram layers see only the last 3 tokens anyway
    engram_layers: tuple[int, ...] = ()  # the plan's layer ids; empty = --no-engram
    mem_dim: int = 0  # (max_ngram-1) * K * head_dim: one position's concatenated rows
    head_dim: int = 0  # width of one table row
    table_rows: dict = field(default_factory=dict)  # layer id (str) -> rows in that layer's table
    max_ngram_size: int = 3  # dilation of the short conv (the reference uses max_ngram_size)
    conv_kernel: int = 4  # the reference short conv kernel
    eps: float = 1e-6
    mlp_hidden: int = 0  # FFN width; 0 = 4 * d_model (a parameter-matched baseline widens it: `param_matched`)
    engram_blocks: tuple[int, ...] = ()  # the block of each engram_layers id; () = the id itself (checkpoints made before placement)

    def placement(self) -> dict[int, int]:
        """Engram layer id -> the block its branch sits in."""
        return dict(zip(self.engram_layers, self.engram_blocks or self.engram_layers))
    moe_experts: int = 0  # routed experts of a mixture-of-experts FFN (engram_cli/moe.py); 0 = the dense FFN
    moe_top_k: int = 2  # experts per token: two, as in the Switch/DeepSeek small configurations
    moe_hidden: int = 0  # width of one routed expert; 0 = d_model
    moe_shared_hidden: int = 0  # width of the shared expert every token uses; 0 = none

    def to_dict(self) -> dict:
        d = asdict(self)
        d["engram_layers"] = list(self.engram_layers)
        d["engram_blocks"] = list(self.engram_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["engram_layers"] = tuple(int(x) for x in d.get("engram_layers", ()))
        d["engram_blocks"] = tuple(int(x) for x in d.get("engram_blocks", ()))
        d["table_rows"] = {str(k): int(v) for k, v in d.get("table_rows", {}).items()}
        return cls(**d)

    @classmethod
    def for_plan(cls, plan: TablePlan | None, **kw) -> "ModelConfig":
        if plan is None:
            return cls(**kw)
        n_layer = kw.pop("n_layer", 4)
        orders = len(plan.orders) * plan.heads
        return cls(
            n_layer=n_layer,
            engram_layers=tuple(plan.layer_ids),
            engram_blocks=place_layers(plan.layer_ids, n_layer),
            mem_dim=orders * plan.head_dim,
            head_dim=plan.head_dim,
            table_rows={str(l): plan.layer_rows(l) for l in plan.layer_ids},
            max_ngram_size=plan.max_ngram_size,
            **kw,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MultiHeadEmbedding(nn.Module):
    """One layer's table: all heads stacked (docs/spec.md, "Rows"), rows served by an `EngramLookup`.

    The table is NOT an nn.Parameter: it can be larger than RAM (the lookup then reads it
    through its bounded chunk cache) and it must never get a dense gradient or optimizer
    state. A forward gathers the batch's unique rows into `rows` (U, head_dim) float32;
    in training that tensor is a leaf that requires grad, so backward reaches exactly
    the looked-up rows, and `train.RowAdam` writes the updated rows back into the
    lookup's (resident) table. Memory beyond the table: O(rows the batch touches).
    """

    def __init__(self, rows: int, head_dim: int):
        super().__init__()
        self.n_rows, self.head_dim = int(rows), int(head_dim)
        self.lookup = None  # an EngramLookup over this layer's table (attach())
        self.subset = None  # sorted global row ids when the lookup's table holds only those rows
        self.last = None  # training: (unique row ids (U,), leaf rows (U, head_dim)) of the last forward

    def attach(self, lookup, row_ids=None) -> "MultiHeadEmbedding":
        """Serve rows from `lookup.table`: the whole table, or only the rows `row_ids` (sorted, unique).

        A subset (eval: the rows the held-out text touches) is addressed by global row
        id all the same; asking for a row outside it fails.
        """
        self.subset = None if row_ids is None else torch.as_tensor(np.asarray(row_ids), dtype=torch.int64)
        n = int(lookup.table.shape[0]) if lookup.table is not None else -1
        want = self.n_rows if self.subset is None else int(self.subset.numel())
        assert n == want, f"table has {n} rows, the model expects {want}"
        self.lookup = lookup
        return self

    def forward(self, row_ids):  # (B, T, H) int64 -> (B, T, H, head_dim)
        assert self.lookup is not None, "no table attached: call EngramGPT.attach_tables first"
        uniq, inv = torch.unique(row_ids, return_inverse=True)  # (U,), (B, T, H)
        at = uniq
        if self.subset is not None:
            at = torch.searchsorted(self.subset, uniq).clamp_(max=self.subset.numel() - 1)
            assert torch.equal(self.subset[at], uniq), "a row outside the attached subset was looked up"
        rows = self.lookup.gather(at.view(1, 1, -1), dtype=torch.float32).view(-1, self.head_dim)  # (U, hd)
        if self.training and torch.is_grad_enabled():
            rows.requires_grad_(True)
            self.last = (uniq, rows)
        return F.embedding(inv, rows)


class ShortConv(nn.Module):
    """Depthwise causal conv1d (kernel 4, dilation max_ngram) after RMSNorm, SiLU; zero-initialised."""

    def __init__(self, dim: int, kernel: int, dilation: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.kernel, self.dilation = kernel, dilation
        self.conv = nn.Conv1d(dim, dim, kernel, groups=dim, dilation=dilation, padding=(kernel - 1) * dilation, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        T = x.shape[1]
        y = self.conv(self.norm(x).transpose(1, 2))[..., :T]  # causal: drop the right padding
        return F.silu(y).transpose(1, 2)


class Engram(nn.Module):
    """The reference Engram branch for one layer (single residual stream: one key projection)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.d = cfg.d_model
        self.multi_head_embedding = MultiHeadEmbedding(cfg.table_rows[str(layer_id)], cfg.head_dim)
        self.value_proj = nn.Linear(cfg.mem_dim, cfg.d_model)
        self.key_projs = nn.ModuleList([nn.Linear(cfg.mem_dim, cfg.d_model)])
        self.norm1 = nn.ModuleList([RMSNorm(cfg.d_model, cfg.eps)])  # key
        self.norm2 = nn.ModuleList([RMSNorm(cfg.d_model, cfg.eps)])  # hidden state
        self.short_conv = ShortConv(cfg.d_model, cfg.conv_kernel, cfg.max_ngram_size, cfg.eps)
        self.keep_gate = False  # eval: keep the last forward's gate (B, T) in self.gate
        self.gate = None

    def forward(self, h, row_ids, return_gate: bool = False):
        B, T, _ = h.shape
        e = self.multi_head_embedding(row_ids).reshape(B, T, -1)  # (B, T, D_mem)
        assert e.shape[-1] == self.value_proj.in_features, f"rows width {e.shape[-1]} != mem_dim {self.value_proj.in_features}"
        key = self.norm1[0](self.key_projs[0](e))  # (B, T, d)
        query = self.norm2[0](h)  # (B, T, d)
        g = (key * query).sum(-1, keepdim=True) / math.sqrt(self.d)  # (B, T, 1)
        gate = torch.sigmoid(g.sign() * g.abs().clamp_min(1e-6).sqrt())
        v = gate * self.value_proj(e)  # (B, T, d)
        out = v + self.short_conv(v)
        if self.keep_gate:
            self.gate = gate.squeeze(-1).detach()  # (B, T)
        return (out, gate.squeeze(-1)) if return_gate else out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        layer_at = {b: l for l, b in cfg.placement().items()}  # block -> the plan's layer id (it addresses the table)
        self.engram = Engram(cfg, layer_at[index]) if index in layer_at else None
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = nn.MultiheadAttention(cfg.d_model, cfg.n_head, batch_first=True, bias=False)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        hidden = cfg.mlp_hidden or 4 * cfg.d_model
        if cfg.moe_experts:  # the FFN as routed experts (engram_cli/moe.py)
            self.mlp = MoEFFN(cfg.d_model, cfg.moe_hidden or cfg.d_model, cfg.moe_experts, cfg.moe_top_k, cfg.moe_shared_hidden)
        else:
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))

    def forward(self, x, row_ids=None, ablate: bool = False):
        if self.engram is not None and not ablate:
            x = x + self.engram(x, row_ids)  # before attention, as in the reference
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        a = self.ln1(x)
        x = x + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class EngramGPT(nn.Module):
    """Decoder-only transformer; `row_ids[layer]` (B, T, H) int64 feed the Engram layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = RMSNorm(cfg.d_model, cfg.eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def engrams(self) -> dict:
        """Layer id (the plan's) -> that layer's Engram branch, wherever its block sits."""
        return {b.engram.layer_id: b.engram for b in self.blocks if b.engram is not None}

    def memories(self) -> dict:
        """Layer id -> that layer's MultiHeadEmbedding (the tables live outside the parameters)."""
        return {l: e.multi_head_embedding for l, e in self.engrams().items()}

    def attach_tables(self, lookups: dict) -> "EngramGPT":
        """Serve each Engram layer's rows from `lookups[layer_id]` (an EngramLookup with a table)."""
        for l, m in self.memories().items():
            m.attach(lookups[l])
        return self

    def forward(self, idx, row_ids: dict | None = None, targets=None, ablate: bool = False):
        B, T = idx.shape
        assert T <= self.cfg.block_size, f"sequence {T} > block_size {self.cfg.block_size}"
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, d)
        for b in self.blocks:
            x = b(x, None if row_ids is None or b.engram is None else row_ids.get(b.engram.layer_id), ablate=ablate)
        logits = self.head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        if self.cfg.moe_experts and self.training:  # the routers' load-balancing loss, in training only
            loss = loss + load_balance_loss(self)
        return logits, loss


def engram_dense_params(cfg: ModelConfig) -> int:
    """Dense parameters the Engram branches add (projections, norms, short conv; never the tables)."""
    return sum(p.numel() for l in cfg.engram_layers for p in Engram(cfg, l).parameters())


def param_matched(cfg: ModelConfig) -> ModelConfig:
    """The same backbone without Engram, its FFN widened in every block by the Engram branches' dense parameters.

    Each unit of FFN width costs 2 * d_model + 1 parameters (in and out weights, one bias),
    so the widths match to within half a unit per block.
    """
    extra = engram_dense_params(cfg)
    d = cfg.d_model
    grow = round(extra / cfg.n_layer / (2 * d + 1))
    return replace(cfg, engram_layers=(), engram_blocks=(), mem_dim=0, head_dim=0, table_rows={}, mlp_hidden=(cfg.mlp_hidden or 4 * d) + grow)


def table_lookup(plan: TablePlan, vocab, layer_id: int, table=None, *, backend: Backend | str = Backend.CPU, device=None):
    """The layer's `EngramLookup` (row ids by the named kernel backend; rows from `table`).

    `table` may be a float32 decoding of a bfloat16/fp8 store (training updates float32
    rows): the lookup then reads it as float32.
    """
    if table is not None and getattr(table, "dtype", None) in (np.float32, torch.float32) and plan.dtype != TableDtype.FLOAT32:
        plan = replace(plan, dtype=TableDtype.FLOAT32.value)
    return EngramLookup(plan, vocab, layer_id, table, backend=backend, device=device)


def row_ids_for(plan: TablePlan, vocab, layer_id: int, token_ids: np.ndarray) -> np.ndarray:
    """Raw tokenizer ids (B, T) -> layer row ids (B, T, orders*K), by the kernels' cpu backend.

    Bit-exact with their torch reference, the triton kernel and the numpy hashing the build uses.
    """
    return np.asarray(table_lookup(plan, vocab, layer_id).row_ids(torch.as_tensor(token_ids)))
