"""Paged attention in plain PyTorch: the CPU default and the reference for other backends.

Batch invariance by construction: queries are cut into tiles and keys into tiles of
`KEY_TILE` positions aligned at absolute position 0. Every (query tile, key tile) pair
is one item of a single fused attention call (PyTorch's CPU flash kernel: bf16 K/V read
in place, fp32 softmax); a row's result depends only on its own query, the keys of that
tile and the item's shape, never on the other rows of its item or how many items share
the call. The kernel returns each item's output normalised within its key tile plus its
log-sum-exp; the key tiles are then combined in ascending order against the overall
maximum (exact, order-free). A key tile a query cannot see (beyond its position, or
behind its sliding window) gets weight exactly 0, so a query's result depends only on
its own context, not on how many tokens or key tiles share its step.

The item shape follows the token's role, like its weight format (layers/linear.py):
prompt tokens go in tiles of PROMPT_TILE rows (a long prompt is a few large items that
share one gather of its context), generated tokens in tiles of GENERATED_TILE rows (a
decode is one small item). A token never changes role, so it always runs in the same
shape, however its prompt is chunked or batched.
"""

from __future__ import annotations

import torch

from tierlm.attention.base import AttentionMetadata, QueryTiles

PROMPT_TILE = 64
GENERATED_TILE = 4
KEY_TILE = 128
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _vector_exp(x: torch.Tensor) -> torch.Tensor:
    """exp with every element on the kernel's vector path. An elementwise kernel runs the
    elements past the last full vector (and near a thread split) through its scalar
    function, whose exp can differ in the last bit; which elements those are depends on
    the tensor's size, i.e. on the batch. Computing over 32 copies of each element makes
    the size a multiple of 32, so every split and the end fall on vector boundaries."""
    return torch.exp(x.unsqueeze(-1).expand(*x.shape, 32))[..., 0]


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
        outs = [self._attend(q, k_cache, v_cache, tiles) for tiles in meta.tiles]
        return (torch.cat(outs) if len(outs) > 1 else outs[0]).index_select(0, meta.token_tile_index)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                tiles: QueryTiles) -> torch.Tensor:
        """Attention output of every tile row, [Qt * Tq, H * D] in q's dtype."""
        qt, tq = tiles.rows.shape
        hkv, g, d = self.hkv, self.group, self.d
        nt = tiles.num_key_tiles - tiles.first_key_tile
        # Queries [Qt, Tq, Hkv, G, D] -> one item per (query tile, key tile):
        # [Qt * nt, Hkv, Tq * G, D]; q head h reads kv head h // G.
        # index_select, not q[rows]: advanced indexing costs several times more per call here.
        qtiles = q.index_select(0, tiles.rows.view(-1)).view(qt, 1, tq, hkv, g, d).permute(0, 1, 3, 2, 4, 5)
        qtiles = qtiles.expand(qt, nt, hkv, tq, g, d).reshape(qt * nt, hkv, tq * g, d).to(k_cache.dtype)
        keys, values = self._tiles(k_cache, tiles.blocks), self._tiles(v_cache, tiles.blocks)
        out, lse = _flash(qtiles, keys, values, attn_mask=tiles.key_bias, scale=self.scale)
        if nt > 1:
            # The kernel reports lse 0 for a row with no visible key: make its weight 0.
            lse = lse.masked_fill(tiles.unseen, float("-inf")).view(qt, nt, hkv, tq * g, 1)
            weights = _vector_exp(lse - lse.amax(dim=1, keepdim=True))
            parts = out.view(qt, nt, hkv, tq * g, d).float() * weights
            acc, denom = parts[:, 0], weights[:, 0]
            for j in range(1, nt):  # ascending, one add per tile: the same order at any nt
                acc = acc + parts[:, j]
                denom = denom + weights[:, j]
            out = acc / denom
        out = out.view(qt, hkv, tq, g, d).permute(0, 2, 1, 3, 4).reshape(qt * tq, hkv * g * d)
        return out.to(q.dtype)

    def _tiles(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Blocks [Qt, nb] -> [Qt * key tiles, Hkv, KEY_TILE, D]: one gather, then a view."""
        qt, nb = blocks.shape
        gathered = cache.index_select(0, blocks.view(-1))
        return gathered.view(qt * nb // self.blocks_per_tile, KEY_TILE, self.hkv, self.d).transpose(1, 2)
