"""PyTorch definitions of the compiled kernels' numerics: the oracle the C++ paths must
equal bit for bit (tests), and the fallback when the extension is not built.

Weights: GGUF blocks repacked at load (`pack`), padded to an even block count with a zero
block: Q4_1 codes [N, nb, 16] (nibbles as stored: values 0-15 low, 16-31 high, so one
32-byte load holds two blocks' low halves and, shifted, their high halves), Q8_0 codes
[N, nb, 32] pair-interleaved (below), f16 scales and Q4_1 offsets [N, nb].
Activations: per 32-value block, d = amax / 127, q = round-half-even(x * (1 / d)) as
int8, s = d * sum(q), padded with zero blocks to nbp, a multiple of 8 (the kernels read
whole groups of 8 blocks). Codes are pair-interleaved: blocks 2p and 2p+1 are stored as
[2p values 0-15, 2p+1 values 0-15, 2p values 16-31, 2p+1 values 16-31], so each 32-byte
load lines up with a Q4_1 weight load. A block's integer products are exact int32 sums; the
fp32 partials accumulate in 8 lanes (block b into lane b % 8), each step rounded on its
own: acc = (acc + (dw * dx) * isum) [+ mw * s], then
((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 32
Q4_1, Q8_0 = 3, 8  # ggml type ids
BLOCK_BYTES = {Q4_1: 20, Q8_0: 34}
CODE_BYTES = {Q4_1: 16, Q8_0: 32}


@dataclass(frozen=True)
class Packed:
    """One weight matrix in the kernels' layout (see the module docstring)."""

    ggml_type: int
    out_features: int
    in_features: int
    qs: torch.Tensor  # uint8 [N, nb, 16 | 32]
    d: torch.Tensor  # float16 [N * nb + 8]: row-major [N, nb], then 8 zeros (kernels load 8 at a time)
    mins: torch.Tensor  # the same for Q4_1's offsets (zeros for Q8_0)

    @property
    def blocks(self) -> int:
        return self.qs.shape[1]

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, mins) as [N, nb] views."""
        n, nb = self.out_features, self.blocks
        return self.d[: n * nb].view(n, nb), self.mins[: n * nb].view(n, nb)

    @property
    def padded_blocks(self) -> int:
        return padded_blocks(self.in_features)

    def nbytes(self) -> int:
        """Bytes a product reads (codes, scales, Q4_1 offsets)."""
        return self.qs.numel() + 2 * self.d.numel() + (2 * self.mins.numel() if self.ggml_type == Q4_1 else 0)


def padded_blocks(k: int) -> int:
    return -(-(k // QK) // 8) * 8


def interleave_pairs(codes: torch.Tensor) -> torch.Tensor:
    """[..., nb, 32] (nb even) -> the pair-interleaved layout, same shape."""
    *lead, nb, _ = codes.shape
    return codes.reshape(*lead, nb // 2, 2, 2, 16).transpose(-3, -2).reshape(*lead, nb, QK)


def deinterleave_pairs(codes: torch.Tensor) -> torch.Tensor:
    *lead, nb, _ = codes.shape
    return codes.reshape(*lead, nb // 2, 2, 2, 16).transpose(-3, -2).reshape(*lead, nb, QK)


def pack(raw: torch.Tensor, ggml_type: int, n: int, k: int) -> Packed:
    """GGUF blocks (uint8, n rows of k values) -> the kernels' layout."""
    if ggml_type not in BLOCK_BYTES:
        raise ValueError(f"no kernel for ggml type {ggml_type}")
    if k % QK:
        raise ValueError(f"rows of {k} values are not whole 32-value blocks")
    nb = k // QK
    b = torch.nn.functional.pad(raw.reshape(n, nb, BLOCK_BYTES[ggml_type]), (0, 0, 0, nb % 2))  # even count
    qs = b[..., BLOCK_BYTES[ggml_type] - CODE_BYTES[ggml_type]:]
    if ggml_type == Q8_0:
        qs = interleave_pairs(qs)
    d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]
    mins = b[..., 2:4].contiguous().view(torch.float16)[..., 0] if ggml_type == Q4_1 else torch.zeros_like(d)
    if not (torch.isfinite(d).all() and torch.isfinite(mins).all()):
        raise ValueError("the tensor's block scales are not all finite")
    slack = torch.zeros(8, dtype=torch.float16)
    return Packed(ggml_type, n, k, qs.contiguous(), torch.cat([d.reshape(-1), slack]),
                  torch.cat([mins.reshape(-1), slack]))


def codes(w: Packed) -> torch.Tensor:
    """The weight codes as int32 [N, nb, 32], in value order (with the padding block)."""
    if w.ggml_type == Q4_1:
        qs = w.qs.to(torch.int32)
        return torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    return deinterleave_pairs(w.qs.view(torch.int8)).to(torch.int32)


def dequantize(w: Packed) -> torch.Tensor:
    """fp32 weights [N, K] (Q4_1: d * q + m; Q8_0: d * q)."""
    d, mins = w.scales()
    full = codes(w).float() * d.float()[..., None] + mins.float()[..., None]
    return full[:, : w.in_features // QK].reshape(w.out_features, w.in_features)


def quantize_rows(x: torch.Tensor, nbp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M, K] -> (int8 codes [M, nbp * 32], block scales [M, nbp], block sums [M, nbp])."""
    m, k = x.shape
    xb = x.float().reshape(m, k // QK, QK)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv[..., None])  # round half to even, as nearbyint
    s = d * q.sum(-1)
    extra = nbp - k // QK
    q = interleave_pairs(torch.nn.functional.pad(q, (0, 0, 0, extra)).to(torch.int8)).reshape(m, nbp * QK)
    return q, torch.nn.functional.pad(d, (0, extra)), torch.nn.functional.pad(s, (0, extra))


def gemm(qx: torch.Tensor, dx: torch.Tensor, sx: torch.Tensor, w: Packed) -> torch.Tensor:
    """Quantized activations x packed weights -> fp32 [M, N], the kernels' numerics."""
    m, nb = dx.shape[0], w.in_features // QK
    n = w.out_features
    xq = deinterleave_pairs(qx.reshape(m, -1, QK))[:, :nb].float()
    # Per block: exact integer sums (every partial is an integer below 2^24, so fp32 is exact).
    isum = torch.einsum("mbi,nbi->mnb", xq, codes(w)[:, :nb].float())
    dw, mw = (t.float() for t in w.scales())
    lanes = torch.zeros(m, n, 8)
    for b in range(nb):
        j = b % 8
        step = lanes[:, :, j] + (dw[None, :, b] * dx[:, None, b]) * isum[:, :, b]
        if w.ggml_type == Q4_1:
            step = step + mw[None, :, b] * sx[:, None, b]
        lanes[:, :, j] = step
    left = (lanes[..., 0] + lanes[..., 4]) + (lanes[..., 2] + lanes[..., 6])
    right = (lanes[..., 1] + lanes[..., 5]) + (lanes[..., 3] + lanes[..., 7])
    return left + right
