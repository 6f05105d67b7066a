"""RMSNorm (Llama) and Gemma's (1 + weight) variant. Statistics in float32 whatever the
compute dtype, each rounding where its reference implementation rounds.

The normalisation itself is PyTorch's fused `rms_norm` on the float32 activation: bitwise
the same as the reference's pow/mean/rsqrt/mul chain (checked on this CPU), in one
kernel instead of five, ~10x faster on prefill-sized inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in float32."""
    return F.rms_norm(x.float(), (x.shape[-1],), None, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * _normalized(x, self.eps).to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + weight) and multiplies in float32 before the cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_normalized(x, self.eps) * (1.0 + self.weight.float())).to(x.dtype)
