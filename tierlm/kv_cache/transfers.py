"""Block transfers between the KV tiers, as data: what the runner must copy before a
step's forward (kv_cache/tiers.py plans them, the scheduler's output carries them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockSave:
    """Keep a cached block's pages before the block is reused: read `block` (this step,
    before anything writes it) and hand the pages to the warm tier under `key`."""

    block: int
    key: tuple


@dataclass(frozen=True)
class BlockLoad:
    """Write a cached block's pages into `block` before the forward: `data` (from the warm
    or cold tier), or, when None, the pages this step's BlockSave of `key` read."""

    block: int
    key: tuple
    data: object = None  # a host tensor, [2 * group_size, page elements]
