"""Device-neutral paged attention: the backend of models on CUDA (and, by choice, on the CPU).

Layout: the kernels' flat batch (attention/flat_batch.py): rows in schedule order, each
addressed by its block-table row and position; K and V pages both [blocks, block_size,
kv_heads, head_dim]. On CUDA the Triton kernel (attention/triton_paged.py) computes every
query row alone, over its keys in ascending block order with a fixed block width: a row's
bits depend on its query and keys only, never on its batch or on whether it is a prompt
or a generated token (no split-K, no atomics), so KV written by decode steps is reusable
as prompt KV and results are batch-invariant in attention. On the CPU the same contract
is computed in PyTorch per sequence (`reference`): the oracle of the kernel's tests and
the path tests run the device-neutral runner on.
"""

from __future__ import annotations

import torch

from tierlm.attention import flat_batch
from tierlm.attention.base import AttentionMetadata, ForwardBatch


class PagedAttention:
    name = "paged"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, block_size: int) -> None:
        if block_size % 16:
            raise ValueError(f"block_size {block_size} must be a multiple of 16 for paged attention")
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.block_size = block_size

    def k_cache_shape(self, num_blocks: int, width: int) -> tuple[int, ...]:
        return num_blocks, self.block_size, self.hkv, width

    def prepare(self, dtype: torch.dtype, deterministic: bool) -> None:
        pass  # each row runs alone in a fixed order: nothing to probe (an int8 cache is refused by EngineConfig)

    def build_batch(self, out, windows: tuple[int | None, ...], dtype: torch.dtype,
                    deterministic: bool) -> ForwardBatch:
        return flat_batch.build_flat(out, self.block_size, windows)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        flat_k = k_cache.view(-1, self.hkv, self.d)
        flat_v = v_cache.view(-1, self.hkv, self.d)
        flat_k.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        if q.is_cuda:
            from tierlm.attention import triton_paged

            out = triton_paged.attention(q, k_cache, v_cache, meta.tables, meta.seq, meta.positions,
                                         meta.window or 0, self.scale)
        else:
            out = reference(q, k_cache, v_cache, meta.tables, meta.seq, meta.positions, meta.window or 0, self.scale)
        return out.reshape(q.shape[0], self.h * self.d)


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              seq: torch.Tensor, positions: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Attention of each row of q [T, H, D] over its sequence's keys at positions
    (position - window, position] (window 0: from 0), read through block tables; float32
    softmax, output [T, H, D] in q's dtype. One PyTorch pass per sequence in the step."""
    h, d = q.shape[1:]
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    g = h // hkv
    out = torch.empty_like(q)
    for s in torch.unique(seq).tolist():
        rows = (seq == s).nonzero().squeeze(1)
        pos = positions.index_select(0, rows)
        length = int(pos.max()) + 1
        blocks = tables[s, : -(-length // bs)].long()
        keys = k_cache.index_select(0, blocks).reshape(-1, hkv, d)[:length].float()  # [L, Hkv, D]
        values = v_cache.index_select(0, blocks).reshape(-1, hkv, d)[:length].float()
        qs = q.index_select(0, rows).float().view(-1, hkv, g, d)  # [n, Hkv, G, D]
        scores = torch.einsum("nkgd,lkd->nkgl", qs, keys) * scale
        kpos = torch.arange(length, device=q.device)
        seen = kpos[None, :] <= pos[:, None]
        if window:
            seen &= kpos[None, :] > pos[:, None] - window
        scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[rows] = torch.einsum("nkgl,lkd->nkgd", probs, values).reshape(-1, h, d).to(q.dtype)
    return out
