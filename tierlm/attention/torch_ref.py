"""Paged attention in plain PyTorch: the CPU default and the reference for other backends.

Batch invariance by construction: queries are cut into tiles of `QUERY_TILE` rows and
keys into tiles of `KEY_TILE` positions aligned at absolute position 0, every product
is a fixed-shape bmm (whose per-item results do not depend on the batch count), and
the softmax is accumulated online over key tiles in order. A key tile lying wholly
beyond a query's position is an exact no-op for that query (max unchanged, scale
exp(0) = 1, zero weights), so a query's result depends only on its own context, not
on how many tokens share its step or chunk.

Sliding windows mask keys at or before `position - window`; a tile a query cannot see
at all stays an exact no-op for it (a running max of -inf is shifted by 0 instead,
so nothing becomes NaN), which is why tiles behind every window are simply skipped.
"""

from __future__ import annotations

import torch

from tierlm.attention.base import AttentionMetadata

QUERY_TILE = 4
KEY_TILE = 128


class TorchPagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 block_size: int) -> None:
        if KEY_TILE % block_size:
            raise ValueError(f"block_size {block_size} must divide the key tile {KEY_TILE}")
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.block_size = block_size
        self.blocks_per_tile = KEY_TILE // block_size

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        flat_k = k_cache.view(-1, self.hkv, self.d)
        flat_v = v_cache.view(-1, self.hkv, self.d)
        flat_k[meta.slot_mapping] = k.to(k_cache.dtype)
        flat_v[meta.slot_mapping] = v.to(v_cache.dtype)

        qt, tq = meta.tile_rows.shape
        hkv, g, d = self.hkv, self.group, self.d
        # [Qt, Tq, Hkv, G, D] -> [Qt * Hkv, Tq * G, D]; q head h reads kv head h // G.
        qtiles = q[meta.tile_rows].float().view(qt, tq, hkv, g, d)
        qtiles = qtiles.permute(0, 2, 1, 3, 4).reshape(qt * hkv, tq * g, d) * self.scale
        # Causal bound per (tile, row), broadcast over heads and group members.
        qpos = meta.tile_positions.view(qt, 1, tq, 1, 1)

        m = torch.full((qt * hkv, tq * g, 1), float("-inf"))
        denom = torch.zeros((qt * hkv, tq * g, 1))
        acc = torch.zeros((qt * hkv, tq * g, d))
        # Visible context once per layer: [Qt * Hkv, key tiles * KEY_TILE, D] (tile_blocks
        # starts at first_key_tile).
        first, window = meta.first_key_tile, meta.window
        keys, values = self._gather(k_cache, meta.tile_blocks), self._gather(v_cache, meta.tile_blocks)
        key_offsets = torch.arange(KEY_TILE)
        for j in range(first, meta.num_key_tiles):
            span = slice((j - first) * KEY_TILE, (j - first + 1) * KEY_TILE)
            s = torch.bmm(qtiles, keys[:, span].transpose(1, 2))
            key_pos = (j * KEY_TILE + key_offsets).view(1, 1, 1, 1, KEY_TILE)
            visible = key_pos <= qpos
            if window is not None:
                visible = visible & (key_pos > qpos - window)
            visible = visible.expand(qt, hkv, tq, g, KEY_TILE).reshape(qt * hkv, tq * g, KEY_TILE)
            s = s.masked_fill(~visible, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            shift = m_new
            if window is not None:  # rows that have seen no key yet: exp(-inf - 0) = 0, not NaN
                shift = torch.where(m_new == float("-inf"), 0.0, m_new)
            alpha = torch.exp(m - shift)
            p = torch.exp(s - shift)
            denom = denom * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + torch.bmm(p, values[:, span])
            m = m_new
        out = (acc / denom).view(qt, hkv, tq, g, d).permute(0, 2, 1, 3, 4).reshape(qt * tq, hkv * g * d)
        return out[meta.token_tile_index].to(q.dtype)

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [Qt, nb] -> keys/values [Qt * Hkv, nb * block_size, D] in float32 (one copy)."""
        qt, nb = blocks.shape
        length = nb * self.block_size
        x = cache[blocks].view(qt, length, self.hkv, self.d).permute(0, 2, 1, 3)
        out = torch.empty((qt, self.hkv, length, self.d), dtype=torch.float32)
        out.copy_(x)  # cast and head-major reorder in a single pass
        return out.view(qt * self.hkv, length, self.d)
