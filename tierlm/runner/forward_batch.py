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
    attn: tuple[AttentionMetadata, ...]  # one per KV group
    logits_indices: torch.Tensor  # [R] row of the last token of each sampling request
    sample_request_ids: list[str]


def build(out: SchedulerOutput, block_size: int, windows: tuple[int | None, ...] = (None,)) -> ForwardBatch:
    """`windows` lists the KV groups (their sliding windows) the block tables refer to."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[list[int]] = [[] for _ in windows]
    tile_rows: list[list[int]] = []
    tile_pos: list[list[int]] = []
    tile_req: list[int] = []  # index into out.scheduled of each tile
    token_tile_index: list[int] = []
    logits_indices: list[int] = []
    sample_ids: list[str] = []
    max_ctx = 0
    min_start = None
    for si, s in enumerate(out.scheduled):
        row0 = len(ids)
        n = len(s.token_ids)
        ids.extend(s.token_ids)
        pos = range(s.start, s.start + n)
        positions.extend(pos)
        for g, table in enumerate(s.block_tables):
            slots[g].extend(table[p // block_size] * block_size + p % block_size for p in pos)
        for t0 in range(0, n, QUERY_TILE):
            real = list(range(row0 + t0, row0 + min(t0 + QUERY_TILE, n)))
            pad = QUERY_TILE - len(real)
            token_tile_index.extend(len(tile_rows) * QUERY_TILE + k for k in range(len(real)))
            tile_rows.append(real + [real[-1]] * pad)
            tile_pos.append([positions[r] for r in real] + [positions[real[-1]]] * pad)
            tile_req.append(si)
        max_ctx = max(max_ctx, s.start + n)
        min_start = s.start if min_start is None else min(min_start, s.start)
        if s.sample:
            logits_indices.append(row0 + n - 1)
            sample_ids.append(s.request_id)
    num_key_tiles = -(-max_ctx // KEY_TILE)
    rows_t = torch.tensor(tile_rows, dtype=torch.long).view(-1, QUERY_TILE)
    pos_t = torch.tensor(tile_pos, dtype=torch.long).view(-1, QUERY_TILE)
    index_t = torch.tensor(token_tile_index, dtype=torch.long)
    req_t = torch.tensor(tile_req, dtype=torch.long)
    metas = []
    for g, window in enumerate(windows):
        # Tiles wholly behind every query's window are exact no-ops: skip them.
        first = 0 if window is None or min_start is None else max(0, min_start - window + 1) // KEY_TILE
        lo, hi = first * (KEY_TILE // block_size), num_key_tiles * (KEY_TILE // block_size)
        per_req = torch.full((len(out.scheduled), hi - lo), NULL_BLOCK, dtype=torch.long)
        for si, s in enumerate(out.scheduled):
            table = s.block_tables[g][lo:hi]
            per_req[si, : len(table)] = torch.tensor(table, dtype=torch.long)
        blocks = per_req[req_t]
        metas.append(AttentionMetadata(
            slot_mapping=torch.tensor(slots[g], dtype=torch.long), tile_rows=rows_t, tile_positions=pos_t,
            tile_blocks=blocks, token_tile_index=index_t, num_key_tiles=num_key_tiles,
            first_key_tile=first, window=window))
    return ForwardBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                        tuple(metas), torch.tensor(logits_indices, dtype=torch.long), sample_ids)
