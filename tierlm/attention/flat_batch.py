"""The kernels' batch layout (attention/kernel.py). Pure: lists in, CPU tensors out."""

from __future__ import annotations

import torch

from tierlm.attention.base import AttentionMetadata, ForwardBatch
from tierlm.kv_cache.block_pool import NULL_BLOCK
from tierlm.scheduler.output import SchedulerOutput


def build_flat(out: SchedulerOutput, block_size: int, windows: tuple[int | None, ...] = (None,)) -> ForwardBatch:
    """The layout of models on the kernels: rows in schedule order, each request's tokens
    consecutive, and attention addressed by block tables (attention/kernel.py). Every row
    runs the same arithmetic whatever its role, so there is no prompt/generated split."""
    ids: list[int] = []
    positions: list[int] = []
    seq: list[int] = []
    logits_indices: list[int] = []
    sample_ids: list[str] = []
    offsets: list[int] = []
    starts: list[int] = []
    for si, s in enumerate(out.scheduled):
        n, row = len(s.token_ids), len(ids)
        starts.append(row)
        ids.extend(s.token_ids)
        positions.extend(range(s.start, s.start + n))
        seq.extend([si] * n)
        if s.sample:  # the last known token's row, then each draft's
            d = len(s.draft_token_ids)
            logits_indices.extend(range(row + n - 1 - d, row + n))
            sample_ids.extend([s.request_id] * (d + 1))
            offsets.extend(range(d + 1))
    pos_t = torch.tensor(positions, dtype=torch.long)
    seq_t = torch.tensor(seq, dtype=torch.int32)
    metas = []
    # Plain lists, then one tensor each: a decode step's few rows cost more in tensor-op
    # dispatch than in arithmetic.
    for g, window in enumerate(windows):
        rows = [s.block_tables[g] for s in out.scheduled]
        width = max(len(r) for r in rows)
        tables = torch.tensor([r + [NULL_BLOCK] * (width - len(r)) for r in rows], dtype=torch.int32)
        slots = torch.tensor([rows[q][p // block_size] * block_size + p % block_size for q, p in zip(seq, positions)],
                             dtype=torch.long)
        metas.append(AttentionMetadata(slots, (), _NO_INDEX, window, tables, seq_t, pos_t))
    return ForwardBatch(torch.tensor(ids, dtype=torch.long), pos_t, tuple(metas),
                        torch.tensor(logits_indices, dtype=torch.long), sample_ids, offsets, 0, tuple(starts), seq_t)


_NO_INDEX = torch.empty(0, dtype=torch.long)
