"""Paged attention on tierlm's own kernel (kernels/csrc/attention.cpp): the backend of
models whose weights run on the kernels.

Each query row is computed by one fixed sequence of operations over position-aligned
key chunks (see the kernel's header), so a token's attention output has the same bits
whether it is a prompt token in a long prefill chunk, a decode step alone or in a batch
of 32, or the same token recomputed as the prompt of the next chat turn. No tiles, no
probes, no role-dependent shapes: KV computed for generated tokens is reusable as prompt
KV. The cache keeps K transposed per block ([blocks, kv_heads, head_dim, block_size]).
"""

from __future__ import annotations

import torch

from tierlm import kernels
from tierlm.attention import flat_batch
from tierlm.attention.base import AttentionMetadata, ForwardBatch


class KernelPagedAttention:
    name = "kernels"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int) -> None:
        if block_size % 16:
            raise ValueError(f"block_size {block_size} must be a multiple of 16 for the kernels' attention")
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.block_size = block_size

    def k_cache_shape(self, num_blocks: int, width: int) -> tuple[int, ...]:
        return num_blocks, self.hkv, width, self.block_size  # K transposed per block

    def prepare(self, dtype: torch.dtype, deterministic: bool) -> None:
        pass  # every row runs the same arithmetic whatever its role or batch: nothing to probe

    def build_batch(self, out, windows: tuple[int | None, ...], dtype: torch.dtype,
                    deterministic: bool) -> ForwardBatch:
        return flat_batch.build_flat(out, self.block_size, windows)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        kernels.kv_write(k, v, k_cache, v_cache, meta.slot_mapping)
        return kernels.attention(q.contiguous(), k_cache, v_cache, meta.tables, meta.seq, meta.positions,
                                 meta.window or 0, self.scale)
