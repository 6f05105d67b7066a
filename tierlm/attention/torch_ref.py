"""Paged attention in plain PyTorch: the CPU default and the reference for other backends.

Batch invariance by construction. Queries are cut into tiles, and each tile's keys into
spans; every (query tile, key span) pair is one item of a single fused attention call
(PyTorch's CPU flash kernel: bf16 K/V read in place, fp32 softmax), all items of a call
of one shape. A row's result depends only on its own query, the keys of its span and
the item's shape, never on the other rows of its item or how many items share the call.

Two ways to span the keys, both invariant:
- Key tiles: spans of KEY_TILE positions aligned at absolute position 0, only those a
  tile can see (the rest would be exact no-ops). The kernel returns each item's output
  normalised within its span plus its log-sum-exp; a tile's spans are then combined in
  ascending order against their maximum (exact, order-free). Prompt tiles use these:
  a long causal prompt skips the ~half of its (query, key) pairs above the diagonal.
- Whole context: one span per tile from position 0 to the longest context in the call,
  rounded up to KEY_TILE, the keys past a query masked. The kernel gives a row the same
  bits however long the masked tail (checked by `keeps_bits`, a probe of this machine's
  kernel: it holds for small bf16 tiles), and no merge is needed. Generated tiles of
  full-attention layers use this when the probe holds (`decode_layout`); sliding-window
  layers use key tiles (a window's start would shift the kernel's key blocks).

The item shape follows the token's role, like its weight format (layers/linear.py):
prompt tokens go in tiles of PROMPT_TILE rows (a long prompt is a few large items),
generated tokens in tiles of a few rows, the fewest the probe finds invariant (a decode
is one small item: one row for bf16 SmolLM2, two for float32). A token never changes
role, so it always runs in the same shape, however its prompt is chunked or batched.
"""

from __future__ import annotations

import functools

import torch

from tierlm.attention import tiled_batch
from tierlm.attention.base import AttentionMetadata, ForwardBatch, QueryTiles
from tierlm.attention.tiled_batch import KEY_TILE, PROMPT_TILE
from tierlm.config import ConfigError
from tierlm.kernels.reference import dequantize_kv, quantize_kv
from tierlm.layers.activation import vector_path

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def keeps_bits(rows: int, kv_heads: int, head_dim: int, dtype: torch.dtype, whole_context: bool) -> bool:
    """Whether the flash kernel gives an item's rows the same bits however many items share
    the call (every item, on whichever thread it lands) and, for whole-context items,
    whatever masked tail pads the span (any multiple of KEY_TILE). Probed on random data
    with the model's head counts (kernel choice and work split depend on shapes, not
    values): ~50 small calls."""
    gen = torch.Generator().manual_seed(0)
    longest = 6 * KEY_TILE
    keys = torch.randn(kv_heads, longest, head_dim, generator=gen).to(dtype)
    values = torch.randn(kv_heads, longest, head_dim, generator=gen).to(dtype)
    q = torch.randn(1, kv_heads, rows, head_dim, generator=gen).to(dtype)

    def run(ctx: int, length: int, items: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.zeros(items, kv_heads, length, head_dim, dtype=dtype)
        v = torch.zeros_like(k)
        k[:, :, :ctx] = keys[:, :ctx]
        v[:, :, :ctx] = values[:, :ctx]
        bias = torch.full((items, 1, rows, length), float("-inf"), dtype=dtype)
        bias[..., :ctx] = 0
        return _flash(q.expand(items, -1, -1, -1).contiguous(), k, v, attn_mask=bias, scale=0.125)

    for ctx in (1, 57, KEY_TILE, 3 * KEY_TILE - 5, 4 * KEY_TILE + 1):
        tight = -(-ctx // KEY_TILE) * KEY_TILE
        if not whole_context and tight > KEY_TILE:
            continue
        ref_out, ref_lse = run(ctx, tight, 1)
        variants = [(tight, 2), (tight, 3), (tight, 7), (tight, 16)]
        if whole_context:
            variants += [(tight + KEY_TILE, 3), (longest, 2), (longest, 1)]
        for length, items in variants:
            out, lse = run(ctx, length, items)
            if not (torch.equal(out, ref_out.expand_as(out)) and torch.equal(lse, ref_lse.expand_as(lse))):
                return False
    return True


@functools.cache
def decode_layout(group: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> tuple[int, bool]:
    """(rows per generated tile, whole-context items) for batch-invariant decode attention on
    this machine: the smallest tile whose key-tile items are invariant, and whether its
    whole-context items are too. Checks the prompt tile's shape as well."""
    if not keeps_bits(PROMPT_TILE * group, kv_heads, head_dim, dtype, whole_context=False):
        raise ConfigError(_NOT_INVARIANT)
    for height in (1, 2, 4, 8):
        if keeps_bits(height * group, kv_heads, head_dim, dtype, whole_context=False):
            return height, keeps_bits(height * group, kv_heads, head_dim, dtype, whole_context=True)
    raise ConfigError(_NOT_INVARIANT)


_NOT_INVARIANT = ("this machine's attention kernel gives no batch-invariant layout for this model; "
                  "run with --no-deterministic")


class TorchPagedAttention:
    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 block_size: int) -> None:
        if KEY_TILE % block_size:
            raise ValueError(f"block_size {block_size} must divide the key tile {KEY_TILE}")
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.block_size = block_size
        self.decode_layout = (1, True)  # set by prepare()

    def k_cache_shape(self, num_blocks: int, width: int) -> tuple[int, ...]:
        return num_blocks, self.block_size, self.hkv, width

    def prepare(self, dtype: torch.dtype, deterministic: bool) -> None:
        """Probe this machine's kernel for batch-invariant decode tiles (deterministic), or
        take the cheapest layout."""
        self.decode_layout = decode_layout(self.group, self.hkv, self.d, dtype) if deterministic else (1, True)

    def build_batch(self, out, windows: tuple[int | None, ...], dtype: torch.dtype,
                    deterministic: bool) -> ForwardBatch:
        return tiled_batch.build(out, self.block_size, windows, self.group, dtype, self.decode_layout)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if k_cache.dtype == torch.int8:  # codes and their parameters, per token and head (kernels/reference.py)
            k, v = quantize_kv(k), quantize_kv(v)
        flat_k = k_cache.view(-1, self.hkv, k_cache.shape[-1])
        flat_v = v_cache.view(-1, self.hkv, v_cache.shape[-1])
        flat_k.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        outs = [self._attend(q, k_cache, v_cache, tiles) for tiles in meta.tiles]
        return (torch.cat(outs) if len(outs) > 1 else outs[0]).index_select(0, meta.token_tile_index)

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                tiles: QueryTiles) -> torch.Tensor:
        """Attention output of every tile row, [Qt * Tq, H * D] in q's dtype."""
        qt, tq = tiles.rows.shape
        n = tiles.item_rows.shape[0]
        hkv, g, d = self.hkv, self.group, self.d
        # Queries [N, Tq, Hkv, G, D] -> [N, Hkv, Tq * G, D]: q head h reads kv head h // G.
        # index_select, not q[rows]: advanced indexing costs several times more per call here.
        qi = q.index_select(0, tiles.item_rows.view(-1)).view(n, tq, hkv, g, d).permute(0, 2, 1, 3, 4)
        compute = k_cache.dtype if k_cache.is_floating_point() else q.dtype  # int8 caches: q's dtype
        qi = qi.reshape(n, hkv, tq * g, d).to(compute)
        keys = self._spans(k_cache, tiles.item_blocks, compute)
        values = self._spans(v_cache, tiles.item_blocks, compute)
        out, lse = _flash(qi, keys, values, attn_mask=tiles.key_bias, scale=self.scale)
        if tiles.combine is not None:
            out = self._combine(out, lse, tiles)
        out = out.view(qt, hkv, tq, g, d).permute(0, 2, 1, 3, 4).reshape(qt * tq, hkv * g * d)
        return out.to(q.dtype)

    @staticmethod
    def _combine(out: torch.Tensor, lse: torch.Tensor, tiles: QueryTiles) -> torch.Tensor:
        """Merge each tile's items (key spans) into its attention output, [Qt, Hkv, R, D] fp32."""
        qt, m = tiles.combine.shape
        # The kernel reports lse 0 for a row with no visible key: make its weight 0. Slot N
        # is an empty item (weight 0, output 0) for tiles with fewer than M spans.
        empty = lse.new_full((1, *lse.shape[1:]), float("-inf"))
        lse = torch.cat([lse.masked_fill(tiles.unseen, float("-inf")), empty])
        out = torch.cat([out, out.new_zeros((1, *out.shape[1:]))])
        index = tiles.combine.view(-1)
        lse = lse.index_select(0, index).view(qt, m, *lse.shape[1:], 1)
        weights = vector_path(torch.exp, lse - lse.amax(dim=1, keepdim=True))  # batch-invariant exp
        parts = out.index_select(0, index).view(qt, m, *out.shape[1:]).float() * weights
        acc, denom = parts[:, 0], weights[:, 0]
        for j in range(1, m):  # ascending, one add per span: the same order at any M
            acc = acc + parts[:, j]
            denom = denom + weights[:, j]
        return acc / denom

    def _spans(self, cache: torch.Tensor, blocks: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """Blocks [N, nb] -> [N, Hkv, nb * block_size, D]: one gather, then a view (an int8
        cache's values dequantized to `compute`)."""
        n, nb = blocks.shape
        gathered = cache.index_select(0, blocks.view(-1))
        if cache.dtype == torch.int8:
            gathered = dequantize_kv(gathered).to(compute)
        return gathered.view(n, nb * self.block_size, self.hkv, self.d).transpose(1, 2)
