"""Linear layers and the matmul kernels they run on.

Owns the choice of GEMM kernel. In deterministic mode every product runs on row tiles
of one fixed height (`TILE_ROWS`), padding the last tile: BLAS picks its kernel and
blocking from the matrix shape, so a row's result would otherwise change with the
number of rows it is batched with (measured on this CPU: fp32 sgemm gives different
bits for M=1, M=2..3 and M>=4; bf16 for M>=100 at K=1536). With one fixed shape the
kernel is fixed and each row's result depends on that row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TILE_ROWS = 16


def invariant_mm(x: torch.Tensor, w_t: torch.Tensor, tile: int = TILE_ROWS) -> torch.Tensor:
    """x [M, K] @ w_t [K, N] computed on fixed-height row tiles (batch-invariant)."""
    m = x.shape[0]
    padded = -(-m // tile) * tile
    if padded != m:
        x = torch.cat([x, x.new_zeros(padded - m, x.shape[1])])
    out = x.new_empty(padded, w_t.shape[1])
    for i in range(0, padded, tile):
        torch.mm(x[i : i + tile], w_t, out=out[i : i + tile])
    return out[:m]


class Linear(nn.Module):
    """y = x W^T (+ b) over a flat [tokens, in] activation.

    The weight is a plain [out, in] parameter so loaders can fill it directly;
    `deterministic` selects the batch-invariant tiled kernel.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 deterministic: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.deterministic = deterministic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deterministic:
            return F.linear(x, self.weight, self.bias)
        y = invariant_mm(x, self.weight.t())
        if self.bias is not None:
            y = y + self.bias
        return y
