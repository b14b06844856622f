"""A mixture-of-experts FFN for the reference model: top-k routed experts, an optional shared expert, a load-balancing loss.

Written the plain way (a loop over experts, `index_add_` of each expert's weighted
output), so it reads like the definition and is deterministic on the CPU:

- the router is a bias-free linear map to one logit per expert; its softmax gives each
  token's expert probabilities, the top `k` are kept and renormalised to sum to 1;
- each expert is the dense FFN of `model.Block` (Linear, GELU, Linear, with biases), so
  one expert with k = 1 IS the dense FFN with the same weights (tests/test_sweep.py);
- the shared expert (width `shared_hidden`, 0 = none) sees every token, unweighted;
- the load-balancing loss is Switch Transformer's: E * sum_e f_e * P_e, where f_e is
  the share of routed slots sent to expert e and P_e its mean router probability
  (1.0 when the load is uniform); `load_balance_loss` averages it over a model's MoE
  layers and scales it by AUX_WEIGHT, added to the training loss only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

AUX_WEIGHT = 0.01  # Switch Transformer's alpha: large enough to balance the load, small beside the loss


def dense_ffn(d_model: int, hidden: int) -> nn.Sequential:
    """The FFN one expert (and `model.Block`'s dense FFN) is: Linear, GELU, Linear."""
    return nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))


def ffn_params(d_model: int, hidden: int) -> int:
    """Parameters of `dense_ffn(d_model, hidden)`: two weights and two biases."""
    return 2 * d_model * hidden + hidden + d_model


class MoEFFN(nn.Module):
    """Top-k routed experts (each `dense_ffn(d_model, hidden)`) plus an optional shared expert."""

    def __init__(self, d_model: int, hidden: int, experts: int, top_k: int, shared_hidden: int = 0):
        super().__init__()
        assert 1 <= top_k <= experts, f"top_k {top_k} must be in [1, experts {experts}]"
        self.top_k = top_k
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList([dense_ffn(d_model, hidden) for _ in range(experts)])
        self.shared = dense_ffn(d_model, shared_hidden) if shared_hidden else None
        self.aux_loss = None  # the last forward's load-balancing loss (a scalar tensor)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        flat = x.reshape(-1, x.shape[-1])  # (N, d)
        probs = F.softmax(self.router(flat), dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = top_p / top_p.sum(-1, keepdim=True)  # (N, k), renormalised over the chosen experts
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tok, slot = (top_i == e).nonzero(as_tuple=True)  # tokens routed to e, and which of their k slots
            if tok.numel():
                out.index_add_(0, tok, weights[tok, slot, None] * expert(flat[tok]))
        if self.shared is not None:
            out = out + self.shared(flat)
        E = len(self.experts)
        routed = F.one_hot(top_i, E).to(probs.dtype).sum((0, 1)) / top_i.numel()  # f_e: share of slots
        self.aux_loss = E * (routed * probs.mean(0)).sum()
        return out.view_as(x)


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def load_balance_loss(model: nn.Module) -> torch.Tensor:
    """AUX_WEIGHT x the mean load-balancing loss of the model's MoE layers (their last forward)."""
    layers = moe_layers(model)
    return AUX_WEIGHT * torch.stack([m.aux_loss for m in layers]).mean()


def activated_params(model: nn.Module) -> int:
    """Parameters one token uses: all, less the routed experts it is not sent to (top_k of each MoE layer's experts run)."""
    total = sum(p.numel() for p in model.parameters())
    for m in moe_layers(model):
        per_expert = sum(p.numel() for p in m.experts[0].parameters())
        total -= (len(m.experts) - m.top_k) * per_expert
    return total
