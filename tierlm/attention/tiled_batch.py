"""The PyTorch backend's batch layout (attention/torch_ref.py). Pure: lists in, CPU tensors out.

Rows are laid out prompt tokens first, then generated ones, so each token's weight format
can follow its role (layers/linear.py); queries are cut into tiles of a height set by
their role, and every tile's visible keys into items (see torch_ref.py).
"""

from __future__ import annotations

import itertools

import torch

from tierlm.attention.base import AttentionMetadata, ForwardBatch, QueryTiles
from tierlm.kv_cache.block_pool import NULL_BLOCK
from tierlm.scheduler.output import SchedulerOutput

PROMPT_TILE = 64  # query rows per prompt tile
KEY_TILE = 128  # key positions per span


class _Tiling:
    """Query tiles of one height as lists: rows, positions, owning request."""

    def __init__(self, height: int) -> None:
        self.height = height
        self.rows: list[list[int]] = []
        self.positions: list[list[int]] = []
        self.request: list[int] = []

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


def _query_tiles(tiling: _Tiling, out: SchedulerOutput, g: int, window: int | None, block_size: int,
                 group: int, dtype: torch.dtype, whole_context: bool) -> QueryTiles:
    """Items of `tiling`'s tiles: one per tile over its whole context (`whole_context`), or
    one per key tile a tile can see (see attention/torch_ref.py)."""
    positions = torch.tensor(tiling.positions, dtype=torch.long).view(-1, tiling.height)
    qt, tq = positions.shape
    hi = positions.amax(dim=1)  # last query position per tile
    if whole_context:  # full attention only: every span starts at 0
        item_tile = torch.arange(qt)
        start = torch.zeros(qt, dtype=torch.long)
        length = -(-(int(hi.max()) + 1) // KEY_TILE) * KEY_TILE
        counts = None
    else:
        # The first key tile each tile can see (sliding windows), through its last query's.
        first = torch.zeros(qt, dtype=torch.long) if window is None else \
            (positions[:, 0] - window + 1).clamp(min=0) // KEY_TILE
        counts = hi // KEY_TILE - first + 1
        item_tile = torch.repeat_interleave(torch.arange(qt), counts)
        offsets = torch.cumsum(counts, 0) - counts
        start = (first[item_tile] + torch.arange(len(item_tile)) - offsets[item_tile]) * KEY_TILE
        length = KEY_TILE
    # Each item's blocks, from its requests' tables (NULL past a table's end).
    request = torch.tensor(tiling.request, dtype=torch.long)[item_tile]
    nb = length // block_size
    cols = (start // block_size).unsqueeze(1) + torch.arange(nb)
    tables = torch.full((len(out.scheduled), int(cols.max()) + 1), NULL_BLOCK, dtype=torch.long)
    for si in set(tiling.request):
        table = out.scheduled[si].block_tables[g][: tables.shape[1]]
        tables[si, : len(table)] = torch.tensor(table, dtype=torch.long)
    item_blocks = tables[request.unsqueeze(1), cols]
    # Masks: [N, 1, Tq * G, length], a query's row repeated for each of its KV head's G heads.
    key_pos = start.view(-1, 1, 1) + torch.arange(length).view(1, 1, length)
    qpos = positions[item_tile].unsqueeze(2)
    hidden = key_pos > qpos
    if window is not None:
        hidden |= key_pos <= qpos - window
    n = len(item_tile)
    hidden = hidden.unsqueeze(2).expand(n, tq, group, length).reshape(n, 1, tq * group, length)
    bias = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))
    rows = torch.tensor(tiling.rows, dtype=torch.long).view(-1, tiling.height)
    if counts is None:
        return QueryTiles(rows, rows, item_blocks, bias, None, None)
    width = int(counts.max())
    combine = torch.full((qt, width), n, dtype=torch.long)
    combine[torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)] = torch.arange(n)
    return QueryTiles(rows, rows[item_tile], item_blocks, bias, hidden.all(dim=-1), combine)


def build(out: SchedulerOutput, block_size: int, windows: tuple[int | None, ...] = (None,),
          query_group: int = 1, dtype: torch.dtype = torch.float32,
          decode_layout: tuple[int, bool] = (4, False)) -> ForwardBatch:
    """`windows` lists the KV groups (their sliding windows) the block tables refer to;
    `query_group` is the number of query heads per KV head (rows of the key masks) and
    `dtype` the KV cache's (the key masks' dtype, so no layer converts them);
    `decode_layout` is (rows per generated tile, whether each gets one item over its whole
    context in full-attention groups), see attention/torch_ref.py `decode_layout`.

    Rows are laid out prompt tokens first (every request's, in schedule order), then
    generated tokens (decodes, and outputs recomputed after a preemption); attention
    addresses rows by index, so one request's tokens may sit in both parts. Prompt
    tokens go into PROMPT_TILE-row query tiles, generated ones into shorter tiles.
    """
    counts = [len(s.token_ids) for s in out.scheduled]
    prompt_counts = [s.num_prompt_tokens for s in out.scheduled]
    total, prompt_rows = sum(counts), sum(prompt_counts)
    ids = [0] * total
    positions = [0] * total
    row_request = [0] * total
    slots: list[list[int]] = [[0] * total for _ in windows]
    token_tile_index = [0] * total  # by row: its place in the tiled attention output
    logits_indices: list[int] = []
    sample_ids: list[str] = []
    offsets: list[int] = []
    prompt_tiles, generated_tiles = _Tiling(PROMPT_TILE), _Tiling(decode_layout[0])
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
            row_request[r] = si
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
        tiles = tuple(_query_tiles(t, out, g, window, block_size, query_group, dtype,
                                   decode_layout[1] and window is None and t is generated_tiles)
                      for t in (prompt_tiles, generated_tiles) if t.rows)
        metas.append(AttentionMetadata(torch.tensor(slots[g], dtype=torch.long), tiles, index_t, window))
    starts = tuple(itertools.accumulate(prompt_counts, initial=0))[:-1]
    return ForwardBatch(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                        tuple(metas), torch.tensor(logits_indices, dtype=torch.long), sample_ids, offsets,
                        prompt_rows, starts, torch.tensor(row_request, dtype=torch.int32))
