"""Sparse mixture-of-experts feed-forward block (Mixtral; Qwen2/3-MoE with a shared expert).

Routing: softmax over the router logits in float32, the top-k experts per token with
ties broken towards the lowest expert index (a stable sort, not `topk`, whose tie
order is unspecified), renormalised to sum to 1 where the architecture says so.

Determinism: tokens are grouped per expert and each expert runs once on its group
through the batch-invariant Linear, so a token's expert output does not depend on how
many other tokens chose that expert. A token's contributions are summed in ascending
expert order starting from zero, whatever the batch or token order, so the block's
output (and the expert choice) is bitwise independent of batch composition.

`expert_tokens` counts the tokens routed to each expert (for load metrics).
"""

from __future__ import annotations

import torch
from torch import nn

from tierlm.config import MoEConfig
from tierlm.layers.activation import vector_path
from tierlm.layers.linear import Linear
from tierlm.layers.mlp import GatedMLP


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, E] -> (expert ids [T, k], float32 weights [T, k]); ties go to the lower id."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    experts = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, experts)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEConfig, act: str, deterministic: bool) -> None:
        super().__init__()
        self.cfg = moe
        self.gate = Linear(hidden_size, moe.num_experts, deterministic=deterministic)
        self.experts = nn.ModuleList(GatedMLP(hidden_size, moe.intermediate_size, act, deterministic)
                                     for _ in range(moe.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, moe.shared_intermediate_size, act, deterministic)
            self.shared_expert_gate = Linear(hidden_size, 1, deterministic=deterministic)
        self.register_buffer("expert_tokens", torch.zeros(moe.num_experts, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        """`dense_rows`: see Linear; an expert's tokens stay ascending, so its first
        rows below `dense_rows` are exactly its dense ones."""
        k, num_experts = self.cfg.top_k, self.cfg.num_experts
        experts, weights = route(self.gate(x, dense_rows), k, self.cfg.norm_topk_prob)
        flat = experts.flatten()  # token-major: entry i is (token i // k, choice i % k)
        counts = torch.bincount(flat, minlength=num_experts)
        self.expert_tokens += counts
        # One stable sort groups the entries by expert, tokens ascending inside a group.
        order = torch.sort(flat, stable=True).indices
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            entries = order[start : start + n]
            start += n
            tokens = entries // k
            rows = None if dense_rows is None else int((tokens < dense_rows).sum())
            y = self.experts[e](x[tokens], rows) * weights.flatten()[entries, None]
            out.index_add_(0, tokens, y.to(x.dtype))
        if self.shared_expert is not None:
            gate = vector_path(torch.sigmoid, self.shared_expert_gate(x, dense_rows))
            out = out + gate * self.shared_expert(x, dense_rows)
        return out
