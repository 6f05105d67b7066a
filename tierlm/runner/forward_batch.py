"""Flatten a SchedulerOutput into model inputs. Pure: lists in, CPU tensors out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.attention.base import AttentionMetadata
from tierlm.attention.torch_ref import KEY_TILE, QUERY_TILE
from tierlm.kv_cache.block_pool import NULL_BLOCK
from tierlm.scheduler.output import SchedulerOutput


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [R] row of the last token of each sampling request
    sample_request_ids: list[str]


def build(out: SchedulerOutput, block_size: int) -> ForwardBatch:
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    tile_rows: list[list[int]] = []
    tile_pos: list[list[int]] = []
    tile_tables: list[list[int]] = []
    token_tile_index: list[int] = []
    logits_indices: list[int] = []
    sample_ids: list[str] = []
    max_ctx = 0
    for s in out.scheduled:
        row0 = len(ids)
        n = len(s.token_ids)
        ids.extend(s.token_ids)
        pos = range(s.start, s.start + n)
        positions.extend(pos)
        slots.extend(s.block_table[p // block_size] * block_size + p % block_size for p in pos)
        for t0 in range(0, n, QUERY_TILE):
            real = list(range(row0 + t0, row0 + min(t0 + QUERY_TILE, n)))
            pad = QUERY_TILE - len(real)
            token_tile_index.extend(len(tile_rows) * QUERY_TILE + k for k in range(len(real)))
            tile_rows.append(real + [real[-1]] * pad)
            tile_pos.append([positions[r] for r in real] + [positions[real[-1]]] * pad)
            tile_tables.append(s.block_table)
        max_ctx = max(max_ctx, s.start + n)
        if s.sample:
            logits_indices.append(row0 + n - 1)
            sample_ids.append(s.request_id)
    num_key_tiles = -(-max_ctx // KEY_TILE)
    width = num_key_tiles * (KEY_TILE // block_size)
    blocks = torch.full((len(tile_tables), width), NULL_BLOCK, dtype=torch.long)
    for i, table in enumerate(tile_tables):
        blocks[i, : len(table)] = torch.tensor(table[:width], dtype=torch.long)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        tile_rows=torch.tensor(tile_rows, dtype=torch.long).view(-1, QUERY_TILE),
        tile_positions=torch.tensor(tile_pos, dtype=torch.long).view(-1, QUERY_TILE),
        tile_blocks=blocks,
        token_tile_index=torch.tensor(token_tile_index, dtype=torch.long),
        num_key_tiles=num_key_tiles,
    )
    return ForwardBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                        meta, torch.tensor(logits_indices, dtype=torch.long), sample_ids)
