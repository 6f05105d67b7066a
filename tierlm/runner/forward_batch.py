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
    # Rows [0, prompt_rows) hold prompt-position tokens, the rest generated ones, so a
    # token's weight format can follow its role (see layers/linear.py).
    prompt_rows: int = 0


def _key_masks(tile_pos: torch.Tensor, first: int, num_key_tiles: int, window: int | None,
               group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_bias, unseen) of AttentionMetadata for query tiles at `tile_pos` [Qt, Tq]."""
    nt = num_key_tiles - first
    qt, tq = tile_pos.shape
    key_pos = (first * KEY_TILE + torch.arange(nt * KEY_TILE)).view(1, nt, 1, KEY_TILE)
    qpos = tile_pos.view(qt, 1, tq, 1)
    hidden = key_pos > qpos
    if window is not None:
        hidden |= key_pos <= qpos - window
    hidden = hidden.unsqueeze(3).expand(qt, nt, tq, group, KEY_TILE).reshape(qt * nt, 1, tq * group, KEY_TILE)
    bias = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
    return bias, hidden.all(dim=-1)


def build(out: SchedulerOutput, block_size: int, windows: tuple[int | None, ...] = (None,),
          query_group: int = 1) -> ForwardBatch:
    """`windows` lists the KV groups (their sliding windows) the block tables refer to;
    `query_group` is the number of query heads per KV head (rows of the key masks).

    Rows are laid out prompt tokens first (every request's, in schedule order), then
    generated tokens (decodes, and outputs recomputed after a preemption); attention
    addresses rows by index, so one request's tokens may sit in both parts."""
    counts = [len(s.token_ids) for s in out.scheduled]
    prompt_counts = [min(max(len(s.prompt_token_ids) - s.start, 0), n) for s, n in zip(out.scheduled, counts)]
    total, prompt_rows = sum(counts), sum(prompt_counts)
    ids = [0] * total
    positions = [0] * total
    slots: list[list[int]] = [[0] * total for _ in windows]
    tile_rows: list[list[int]] = []
    tile_pos: list[list[int]] = []
    tile_req: list[int] = []  # index into out.scheduled of each tile
    token_tile_index = [0] * total  # by row: its place in the tiled attention output
    logits_indices: list[int] = []
    sample_ids: list[str] = []
    max_ctx = 0
    min_start = None
    next_prompt, next_gen = 0, prompt_rows
    for si, s in enumerate(out.scheduled):
        n, p = counts[si], prompt_counts[si]
        rows = [*range(next_prompt, next_prompt + p), *range(next_gen, next_gen + n - p)]
        next_prompt, next_gen = next_prompt + p, next_gen + n - p
        pos = range(s.start, s.start + n)
        for r, tok, at in zip(rows, s.token_ids, pos):
            ids[r] = tok
            positions[r] = at
        for g, table in enumerate(s.block_tables):
            slot_g = slots[g]
            for r, at in zip(rows, pos):
                slot_g[r] = table[at // block_size] * block_size + at % block_size
        for t0 in range(0, n, QUERY_TILE):
            real = rows[t0 : t0 + QUERY_TILE]
            pad = QUERY_TILE - len(real)
            base = len(tile_rows) * QUERY_TILE
            for k, r in enumerate(real):
                token_tile_index[r] = base + k
            tile_rows.append(real + [real[-1]] * pad)
            tile_pos.append([positions[r] for r in real] + [positions[real[-1]]] * pad)
            tile_req.append(si)
        max_ctx = max(max_ctx, s.start + n)
        min_start = s.start if min_start is None else min(min_start, s.start)
        if s.sample:
            logits_indices.append(rows[-1])
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
        bias, unseen = _key_masks(pos_t, first, num_key_tiles, window, query_group)
        metas.append(AttentionMetadata(
            slot_mapping=torch.tensor(slots[g], dtype=torch.long), tile_rows=rows_t, tile_positions=pos_t,
            tile_blocks=blocks, token_tile_index=index_t, num_key_tiles=num_key_tiles,
            first_key_tile=first, window=window, key_bias=bias, unseen=unseen))
    return ForwardBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                        tuple(metas), torch.tensor(logits_indices, dtype=torch.long), sample_ids, prompt_rows)
