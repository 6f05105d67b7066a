"""Attention backend interface and the metadata every backend consumes.

A backend owns how K/V are written into the paged cache and how queries read them
through block tables. The model never sees pages: it hands q/k/v for the flattened
tokens of a step plus an `AttentionMetadata`, and gets the attention output back.
The cache tensors are owned by the model runner and live as long as the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class QueryTiles:
    """Query tiles of one height and the attention items that cover their keys.

    An item is one query tile against one contiguous span of key positions; every item
    of a group has the same shape, so one fused kernel call computes them all.

    rows:        [Qt, Tq] token row of each query in each tile (padded rows repeat the
                 tile's last real row; their results are discarded).
    item_rows:   [N, Tq] the rows of each item's query tile.
    item_blocks: [N, L / block_size] the cache blocks holding each item's key span
                 (padded with block 0, always masked out).
    key_bias:    [N, 1, Tq * G, L] in the cache dtype: 0 where an item's query sees the key,
                 -inf where it must not (causal bound, window); rows repeat per query head
                 of a KV head (G).
    unseen:      [N, 1, Tq * G] True where a query sees no key of the item (None: never).
    combine:     [Qt, M] each tile's items in ascending key order, padded with N (an empty
                 item), to be merged by log-sum-exp; None when each tile is exactly one item
                 (item i = tile i).
    """

    rows: torch.Tensor
    item_rows: torch.Tensor
    item_blocks: torch.Tensor
    key_bias: torch.Tensor
    unseen: torch.Tensor | None
    combine: torch.Tensor | None


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step attention inputs of one KV group, built by runner/forward_batch.py (pure)
    once per step and shared by the group's layers (see kv_cache/layout.py).

    slot_mapping:  [T] flat cache slot (block * block_size + offset) of each token's K/V.
    tiles:         the step's query tiles: prompt tokens in tall tiles, generated tokens in
                   short ones (either may be absent), see attention/torch_ref.py.
    token_tile_index: [T] index of each token in the tiles' rows, flattened and
                   concatenated in `tiles` order.
    window:        sliding window of the group's layers (None = full causal attention).
    tables, seq, positions: the kernels' attention (attention/kernel.py) instead of tiles:
                   int32 [S, max blocks] block tables, int32 [T] each token's table row,
                   int64 [T] its position.
    """

    slot_mapping: torch.Tensor
    tiles: tuple[QueryTiles, ...]
    token_tile_index: torch.Tensor
    window: int | None = None
    tables: torch.Tensor | None = None
    seq: torch.Tensor | None = None
    positions: torch.Tensor | None = None


@dataclass(frozen=True)
class ForwardBatch:
    """One step's model inputs, laid out by the attention backend that will read them."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: tuple[AttentionMetadata, ...]  # one per KV group
    logits_indices: torch.Tensor  # [R] rows to sample: each sampling request's last token (and drafts)
    sample_request_ids: list[str]  # [R] whose row it is
    # [R] 0 for a request's last known token, j for its j-th draft token (speculative decoding)
    sample_offsets: list[int]
    # Rows [0, prompt_rows) hold prompt-position tokens, the rest generated ones, so a
    # token's weight format can follow its role (see layers/linear.py).
    prompt_rows: int = 0
    # Per scheduled request, the row of its first prompt-position token this step.
    prompt_row_starts: tuple[int, ...] = ()
    # [T] int32: each row's request, as its index in the step's `scheduled` (per-request
    # state that rows carry, such as a LoRA adapter slot); None where a layout omits it.
    row_request: torch.Tensor | None = None


class AttentionBackend(Protocol):
    """Chosen per model by attention/registry.py and given to the model's constructor.
    Besides attending, a backend lays out a step's batch for itself (`build_batch`: row
    order, its own metadata) and says how its K cache is shaped."""

    name: str

    def k_cache_shape(self, num_blocks: int, width: int) -> tuple[int, ...]:
        """`width`: a KV head's elements per token (kv_cache/sizing.py `head_width`)."""
        ...

    def prepare(self, dtype: torch.dtype, deterministic: bool) -> None:
        """One-off checks and probes for this KV dtype, at startup (ConfigError if unusable)."""
        ...

    def build_batch(self, out, windows: tuple[int | None, ...], dtype: torch.dtype,
                    deterministic: bool) -> ForwardBatch:
        """`out`: the scheduler's output; `windows`: the KV groups' sliding windows;
        `dtype`: the KV cache's; `deterministic`: results must not depend on the batch."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D]; caches as `k_cache_shape` (V: [num_blocks, block_size, Hkv, width]),
        in the compute dtype or int8 (codes and their parameters, see kv_cache/sizing.py).

        Writes k/v into the cache at `meta.slot_mapping`, then returns [T, H * D].
        """
        ...
