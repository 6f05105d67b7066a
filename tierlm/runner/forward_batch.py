"""Flatten a SchedulerOutput into model inputs. Pure: lists in, CPU tensors out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierlm.attention.base import AttentionMetadata, QueryTiles
from tierlm.attention.torch_ref import GENERATED_TILE, KEY_TILE, PROMPT_TILE
from tierlm.kv_cache.block_pool import NULL_BLOCK
from tierlm.scheduler.output import SchedulerOutput


@dataclass(frozen=True)
class ForwardBatch:
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


class _Tiling:
    """Query tiles of one height as lists: rows, positions, owning request, context end."""

    def __init__(self, height: int) -> None:
        self.height = height
        self.rows: list[list[int]] = []
        self.positions: list[list[int]] = []
        self.request: list[int] = []
        self.max_ctx = 0
        self.min_start: int | None = None

    def add(self, si: int, rows: list[int], positions: list[int], index: list[int], base: int) -> None:
        """Tile one request's consecutive tokens; record each row's place in `index`
        (offset by `base`, where these tiles start in the concatenated output)."""
        h = self.height
        for t0 in range(0, len(rows), h):
            real = rows[t0 : t0 + h]
            pad = h - len(real)
            start = base + len(self.rows) * h
            for k, r in enumerate(real):
                index[r] = start + k
            self.rows.append(real + [real[-1]] * pad)
            self.positions.append(positions[t0 : t0 + h] + [positions[t0 + len(real) - 1]] * pad)
            self.request.append(si)
        if rows:
            self.max_ctx = max(self.max_ctx, positions[-1] + 1)
            self.min_start = positions[0] if self.min_start is None else min(self.min_start, positions[0])


def _key_masks(tile_pos: torch.Tensor, first: int, num_key_tiles: int, window: int | None,
               group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_bias, unseen) of QueryTiles for query tiles at `tile_pos` [Qt, Tq]."""
    nt = num_key_tiles - first
    qt, tq = tile_pos.shape
    key_pos = (first * KEY_TILE + torch.arange(nt * KEY_TILE)).view(1, nt, 1, KEY_TILE)
    qpos = tile_pos.view(qt, 1, tq, 1)
    hidden = key_pos > qpos
    if window is not None:
        hidden |= key_pos <= qpos - window
    hidden = hidden.unsqueeze(3).expand(qt, nt, tq, group, KEY_TILE).reshape(qt * nt, 1, tq * group, KEY_TILE)
    bias = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))
    return bias, hidden.all(dim=-1)


def _query_tiles(tiling: _Tiling, out: SchedulerOutput, g: int, window: int | None, block_size: int,
                 group: int, dtype: torch.dtype) -> QueryTiles:
    num_key_tiles = -(-tiling.max_ctx // KEY_TILE)
    # Tiles wholly behind every query's window are exact no-ops: skip them.
    first = 0 if window is None else max(0, tiling.min_start - window + 1) // KEY_TILE
    lo, hi = first * (KEY_TILE // block_size), num_key_tiles * (KEY_TILE // block_size)
    per_req = torch.full((len(out.scheduled), hi - lo), NULL_BLOCK, dtype=torch.long)
    for si in set(tiling.request):
        table = out.scheduled[si].block_tables[g][lo:hi]
        per_req[si, : len(table)] = torch.tensor(table, dtype=torch.long)
    rows = torch.tensor(tiling.rows, dtype=torch.long).view(-1, tiling.height)
    positions = torch.tensor(tiling.positions, dtype=torch.long).view(-1, tiling.height)
    bias, unseen = _key_masks(positions, first, num_key_tiles, window, group, dtype)
    return QueryTiles(rows, positions, per_req[torch.tensor(tiling.request, dtype=torch.long)], bias, unseen,
                      num_key_tiles, first)


def build(out: SchedulerOutput, block_size: int, windows: tuple[int | None, ...] = (None,),
          query_group: int = 1, dtype: torch.dtype = torch.float32) -> ForwardBatch:
    """`windows` lists the KV groups (their sliding windows) the block tables refer to;
    `query_group` is the number of query heads per KV head (rows of the key masks) and
    `dtype` the KV cache's (the key masks' dtype, so no layer converts them).

    Rows are laid out prompt tokens first (every request's, in schedule order), then
    generated tokens (decodes, and outputs recomputed after a preemption); attention
    addresses rows by index, so one request's tokens may sit in both parts. Prompt
    tokens go into PROMPT_TILE-row query tiles, generated ones into GENERATED_TILE rows.
    """
    counts = [len(s.token_ids) for s in out.scheduled]
    prompt_counts = [s.num_prompt_tokens for s in out.scheduled]
    total, prompt_rows = sum(counts), sum(prompt_counts)
    ids = [0] * total
    positions = [0] * total
    slots: list[list[int]] = [[0] * total for _ in windows]
    token_tile_index = [0] * total  # by row: its place in the tiled attention output
    logits_indices: list[int] = []
    sample_ids: list[str] = []
    offsets: list[int] = []
    prompt_tiles, generated_tiles = _Tiling(PROMPT_TILE), _Tiling(GENERATED_TILE)
    generated_parts = []
    next_prompt, next_gen = 0, prompt_rows
    for si, s in enumerate(out.scheduled):
        n, p = counts[si], prompt_counts[si]
        rows = [*range(next_prompt, next_prompt + p), *range(next_gen, next_gen + n - p)]
        next_prompt, next_gen = next_prompt + p, next_gen + n - p
        pos = list(range(s.start, s.start + n))
        for r, tok, at in zip(rows, s.token_ids, pos):
            ids[r] = tok
            positions[r] = at
        for g, table in enumerate(s.block_tables):
            slot_g = slots[g]
            for r, at in zip(rows, pos):
                slot_g[r] = table[at // block_size] * block_size + at % block_size
        prompt_tiles.add(si, rows[:p], pos[:p], token_tile_index, 0)
        generated_parts.append((si, rows[p:], pos[p:]))
        if s.sample:  # the last known token's row, then each draft's
            d = len(s.draft_token_ids)
            logits_indices.extend(rows[n - 1 - d :])
            sample_ids.extend([s.request_id] * (d + 1))
            offsets.extend(range(d + 1))
    base = len(prompt_tiles.rows) * PROMPT_TILE  # generated tiles follow the prompt tiles
    for si, rows, pos in generated_parts:
        generated_tiles.add(si, rows, pos, token_tile_index, base)
    index_t = torch.tensor(token_tile_index, dtype=torch.long)
    metas = []
    for g, window in enumerate(windows):
        tiles = tuple(_query_tiles(t, out, g, window, block_size, query_group, dtype)
                      for t in (prompt_tiles, generated_tiles) if t.rows)
        metas.append(AttentionMetadata(torch.tensor(slots[g], dtype=torch.long), tiles, index_t, window))
    return ForwardBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                        tuple(metas), torch.tensor(logits_indices, dtype=torch.long), sample_ids, offsets,
                        prompt_rows)
