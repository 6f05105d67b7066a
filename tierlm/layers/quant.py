"""Weight-only quantized formats and their CPU kernels: int4 (group-wise affine) and int8
(per output channel, symmetric).

Owns the packed forms and the products on them. Both kernels keep the weight quantized in
memory and widen it inside the GEMM, which is what a memory-bound decode step wants
(measured here: int4 1.6-5x faster than a bf16 GEMM at one row, but 2-2.5x slower than
bf16 on AMX from ~32 rows up, which is why prefill rows use a dense copy instead). Each
kernel gives a row the same bits however many rows share the call (checked by the tests),
so they need no tiling to be batch-invariant.

`Q4` is the unpacked, loader-side form: 4-bit codes with a per-group affine map
`w = (code - 8) * scale + zero`. GGUF's Q4_0, Q4_1 and Q4_K blocks map onto it without
requantizing (Q4_1: scale = d, zero = m + 8d); HF checkpoints are quantized into it by
`quantize_q4` when `--quantization int4` asks. The kernel takes scale and zero in bf16
(its only fast activation dtype), a relative rounding of 2^-9 on each group's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32  # every supported source has 32-element groups (Q4_K: 8 sub-blocks of 32)


def int4_fits(out_features: int, in_features: int) -> bool:
    """The int4 kernel packs 16 output rows together and 32-element groups along the input."""
    return out_features % 16 == 0 and in_features % GROUP == 0


@dataclass
class Q4:
    """4-bit codes [N, K] (uint8, 0..15) with float32 scale and zero per (row, group)."""

    codes: torch.Tensor
    scale: torch.Tensor  # [N, K // GROUP]
    zero: torch.Tensor  # [N, K // GROUP]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def rows(self, index: torch.Tensor) -> Q4:
        return Q4(self.codes[index], self.scale[index], self.zero[index])

    @staticmethod
    def cat(parts: list[Q4]) -> Q4:
        return Q4(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "zero")))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        w = (self.codes.view(n, k // GROUP, GROUP).float() - 8.0) * self.scale[..., None] + self.zero[..., None]
        return w.view(n, k)


def quantize_q4(w: torch.Tensor) -> Q4:
    """Asymmetric 4-bit per 32-element group (min/max range, like GGUF's Q4_1)."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"int4 needs the input size to be a multiple of {GROUP}, got {k}")
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((g - lo[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Q4(codes.view(n, k), scale, lo + 8 * scale)


# ---- GGUF blocks -> Q4 ------------------------------------------------------------------
Q4_0, Q4_1, Q4_K = 2, 3, 12  # ggml type ids


def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """32-byte-wide nibble runs: low nibbles are the first elements, high nibbles the next."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes of packed 6-bit (scale, min) for 8 sub-blocks -> two [B, 8] tensors."""
    s = s.to(torch.int32)
    lo_sc, lo_mn = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_mn = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1).float(), torch.cat([lo_mn, hi_mn], 1).float()


def gguf_q4(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> Q4 | None:
    """The tensor's blocks as Q4 when its type maps onto int4 exactly, else None."""
    if len(shape) != 2 or ggml_type not in (Q4_0, Q4_1, Q4_K):
        return None
    n, k = shape
    if ggml_type == Q4_K:
        b = torch.from_numpy(raw.reshape(-1, 144).copy())
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _k_scales(b[:, 4:16])
        qs = b[:, 16:].reshape(-1, 4, 32)  # 4 runs of 32 bytes, each two sub-blocks
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
        scale, zero = d * sc, -dmin * mn + 8 * d * sc
    else:
        size, head = (18, 2) if ggml_type == Q4_0 else (20, 4)
        b = torch.from_numpy(raw.reshape(-1, size).copy())
        codes = _nibbles(b[:, head:])
        d = _f16(b, 0)[:, 0]
        scale, zero = d, (_f16(b, 2)[:, 0] + 8 * d) if ggml_type == Q4_1 else torch.zeros_like(d)
    groups = k // GROUP
    return Q4(codes.reshape(n, k), scale.reshape(n, groups), zero.reshape(n, groups))


# ---- packed kernels ---------------------------------------------------------------------
class Int4Weight:
    """A Q4 packed for `_weight_int4pack_mm_for_cpu`: y = x W^T with x in bf16."""

    bits = 4

    def __init__(self, q: Q4) -> None:
        self.out_features, self.in_features = q.shape
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 1)
        # Kernel layout: [K // group, N, 2] of (scale, zero).
        self.scales_zeros = torch.stack([q.scale.t(), q.zero.t()], dim=-1).to(torch.bfloat16).contiguous()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP,
                                                          self.scales_zeros)

    @staticmethod
    def kernel_view(q: Q4) -> torch.Tensor:
        """What `dequantize` gives for the kernel built from `q` (its bf16 scale and zero,
        the weight rounded to bf16 as the kernel returns it), as float32 [N, K], computed
        straight from the codes: far cheaper than a K-row product through the kernel."""
        w = Q4(q.codes, q.scale.bfloat16().float(), q.zero.bfloat16().float()).dequantize()
        return w.bfloat16().float()

    def dequantize(self) -> torch.Tensor:
        """The weight exactly as the kernel sees it (rounded to bf16), as float32 [N, K]."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self.mm(eye).float().t().contiguous()

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2


class CudaInt4Weight:
    """A Q4 packed for PyTorch's CUDA int4 kernel (`_weight_int4pack_mm`, tinygemm): the same
    affine map per 32-element group as Int4Weight, codes packed two per byte on the GPU."""

    bits = 4

    def __init__(self, q: Q4, device: torch.device) -> None:
        self.out_features, self.in_features = n, k = q.shape
        if not cuda_int4_fits(n, k):
            raise ValueError(f"the CUDA int4 kernel needs outputs % 8 and inputs % 32, got {n} x {k}")
        codes = q.codes.to(device=device, dtype=torch.int32)
        pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # [N, K / 2], first code high
        self.packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(k))
        self.scales_zeros = torch.stack([q.scale.t(), q.zero.t()], dim=-1).to(torch.bfloat16).contiguous().to(device)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.packed, GROUP,
                                                  self.scales_zeros)

    def dequantize(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return self.mm(eye).float().t().contiguous()

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


def cuda_int4_fits(out_features: int, in_features: int) -> bool:
    return out_features % 8 == 0 and in_features % GROUP == 0


def inner_k_tiles(k: int) -> int:
    """tinygemm's K tiling: inner tiles of 16, 2, 4 or 8 per outer tile, K a multiple of their product."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


class Int8Weight:
    """Symmetric int8 per output channel for `_weight_int8pack_mm`: y = (x W_q^T) * scale.

    A vocabulary-sized weight runs in slices of N_SLICE outputs: the kernel over 49,152
    outputs takes ~1.8x as long at 32 rows (and ~1.3x at one) as the same outputs in six
    slices; each output is the same dot product either way, so the bits do not change.
    """

    bits = 8
    N_SLICE = 8192

    def __init__(self, w: torch.Tensor) -> None:
        self.out_features, self.in_features = w.shape
        w = w.float()
        scale = w.abs().amax(dim=1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        self.qweight = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scale = scale.to(torch.bfloat16)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        n, step = self.out_features, self.N_SLICE
        if n <= step:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scale)
        out = x.new_empty(x.shape[0], n)
        for i in range(0, n, step):
            out[:, i : i + step] = torch.ops.aten._weight_int8pack_mm(x, self.qweight[i : i + step],
                                                                      self.scale[i : i + step])
        return out

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * 2


QuantizedWeight = Int4Weight | CudaInt4Weight | Int8Weight
