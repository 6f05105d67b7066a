"""Where a runner's tensors live: the KV pool's allocation on its device, and a step's batch
(built on the CPU from the scheduler's lists) moved to the model's device."""

from __future__ import annotations

import dataclasses

import torch

from tierlm.attention.base import ForwardBatch
from tierlm.kv_cache.sizing import lazily_zeroed


def kv_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A KV pool tensor: committed page by page on the CPU, allocated whole on a GPU."""
    return lazily_zeroed(shape, dtype) if device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=device)


def on_device(batch: ForwardBatch, device: torch.device) -> ForwardBatch:
    """The step's tensors moved to `device` (built on the CPU from the scheduler's lists)."""
    def move(t):
        return None if t is None else t.to(device, non_blocking=True)

    metas = tuple(dataclasses.replace(m, slot_mapping=move(m.slot_mapping), tables=move(m.tables), seq=move(m.seq),
                                      positions=move(m.positions)) for m in batch.attn)
    return dataclasses.replace(batch, input_ids=move(batch.input_ids), positions=move(batch.positions), attn=metas,
                               logits_indices=move(batch.logits_indices), row_request=move(batch.row_request))
