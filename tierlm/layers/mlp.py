"""Gated feed-forward block (SwiGLU / GeGLU) with fused gate and up projections."""

from __future__ import annotations

import torch
from torch import nn

from tierlm.layers.activation import GATED_ACTIVATIONS
from tierlm.layers.linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str, deterministic: bool) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, deterministic=deterministic)
        self.down_proj = Linear(intermediate_size, hidden_size, deterministic=deterministic)
        self.act = GATED_ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x, dense_rows)), dense_rows)
