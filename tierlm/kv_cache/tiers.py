"""Hot / warm / cold KV tiers for cached prefix blocks.

Hot blocks live in the block pool (device memory; host memory on CPU). When the pool
evicts a cached block, its pages are copied into the warm tier: a byte-bounded LRU in
host memory. When warm needs room, its oldest unpinned entries move to the cold tier
(disk, cold_store.py) if one is configured, else they are dropped. A prefix hit on a
warm or cold block copies it back into a fresh hot block. A key lives in exactly one
of hot and warm; the cold tier is a persistent copy (it outlives restarts).

This module only plans the copies; it never reads or writes the pool's tensors. An
eviction records a BlockSave and holds the key in warm as pending; a restore records a
BlockLoad (the pages from warm or cold, or "this step's save of that key" when the key
was evicted earlier in the same step). The scheduler hands both lists to the runner in
its output; the runner carries them out before the forward (saves, then loads) and
returns the pages it saved, which `saved()` puts in place of the pending entries.

Sessions pin their blocks' keys until a deadline: pinned warm entries are not moved
out by the LRU, so the next turn of a conversation finds its prefix. When warm holds
only pinned entries, newcomers go straight to cold (or are dropped). On CPU-only
machines hot and warm are both host memory but keep separate budgets and accounting,
so the same code path runs here and on CUDA.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tierlm.kv_cache.block_pool import CacheKey
from tierlm.kv_cache.cold_store import ColdStore
from tierlm.kv_cache.transfers import BlockLoad, BlockSave


class _Pending:
    """Pages a BlockSave of this step will read (the block still holds them)."""

    __slots__ = ("to_cold",)

    def __init__(self) -> None:
        self.to_cold = False  # moved on to the cold tier before the pages arrived


@dataclass
class TierStats:
    warm_hits: int = 0  # blocks restored from warm
    cold_hits: int = 0  # blocks restored from cold
    bytes_hot_to_warm: int = 0
    bytes_warm_to_hot: int = 0
    bytes_to_cold: int = 0
    bytes_from_cold: int = 0
    warm_evictions: int = 0  # warm entries moved to cold or dropped


class KVTiers:
    def __init__(self, block_bytes: int, warm_bytes: int, cold: ColdStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_bytes = block_bytes
        self.warm_capacity = warm_bytes // block_bytes  # blocks
        self.cold = cold
        self.clock = clock
        self.warm: OrderedDict[CacheKey, torch.Tensor | _Pending] = OrderedDict()
        self.pins: dict[CacheKey, float] = {}  # key -> deadline
        self.stats = TierStats()
        self._saves: list[BlockSave] = []  # planned since the last take_transfers()
        self._loads: list[BlockLoad] = []
        self._pending: dict[CacheKey, _Pending] = {}  # saves not yet carried out

    @property
    def warm_bytes_used(self) -> int:
        return len(self.warm) * self.block_bytes

    def has(self, key: CacheKey) -> bool:
        return key in self.warm or (self.cold is not None and self.cold.has(key))

    def on_evict(self, key: CacheKey, block: int) -> None:
        """Pool callback: a cached hot block is about to be reused; plan to keep its pages."""
        pending = _Pending()
        self._pending[key] = pending
        self._saves.append(BlockSave(block, key))
        self.put_warm(key, pending)
        self.stats.bytes_hot_to_warm += self.block_bytes

    def load(self, block: int, key: CacheKey, data: torch.Tensor | _Pending) -> None:
        """Plan a restore of `key`'s pages (what `take` returned) into the hot `block`."""
        self._loads.append(BlockLoad(block, key, None if isinstance(data, _Pending) else data))

    def take_transfers(self) -> tuple[list[BlockSave], list[BlockLoad]]:
        """The saves and loads planned since the last call, for the runner to carry out."""
        out = self._saves, self._loads
        self._saves, self._loads = [], []
        return out

    def saved(self, pages: dict[CacheKey, torch.Tensor]) -> None:
        """The runner read these blocks' pages (the saves it was handed): they replace the
        pending entries, in warm or on their way to cold (a key dropped meanwhile is not kept)."""
        for key, data in pages.items():
            pending = self._pending.pop(key, None)
            if pending is None:
                continue
            if self.warm.get(key) is pending:
                self.warm[key] = data
            elif pending.to_cold and self.cold is not None:
                self.cold.put(key, data)

    def put_warm(self, key: CacheKey, data: torch.Tensor | _Pending) -> None:
        if self.warm_capacity == 0:
            self._to_cold(key, data)
            return
        while len(self.warm) >= self.warm_capacity:
            victim = self._unpinned_oldest()
            if victim is None:  # warm is all pinned sessions
                self._to_cold(key, data)
                return
            self._to_cold(victim, self.warm.pop(victim))
            self.stats.warm_evictions += 1
        self.warm[key] = data

    def take(self, key: CacheKey) -> torch.Tensor | _Pending | None:
        """Remove a block's pages from warm (or read them from cold) for a hot restore
        (pending: evicted this step; the load then uses this step's save)."""
        data = self.warm.pop(key, None)
        if data is not None:
            self.stats.warm_hits += 1
            self.stats.bytes_warm_to_hot += self.block_bytes
            return data
        data = self.cold.get(key) if self.cold is not None else None
        if data is not None:
            self.stats.cold_hits += 1
            self.stats.bytes_from_cold += self.block_bytes
        return data

    def superseded(self, key: CacheKey) -> None:
        """The key was computed again into a hot block: drop the warm copy (a key lives in
        one of hot and warm; the cold copy stays, it is the persistent one)."""
        self.warm.pop(key, None)

    def flush_to_cold(self, hot: dict[CacheKey, int], read_block: Callable[[int], torch.Tensor]) -> int:
        """Copy every cached block (hot ones given as key -> block, read with `read_block`,
        and warm) to the cold tier unless already there, so a restart can replay them.
        Returns blocks written. Only between steps (nothing pending)."""
        if self.cold is None:
            return 0
        written = 0
        for key, block in hot.items():
            if not self.cold.has(key):
                self._to_cold(key, read_block(block))
                written += 1
        for key, data in self.warm.items():
            if not self.cold.has(key):
                self._to_cold(key, data)
                written += 1
        return written

    def pin(self, keys: list[CacheKey], ttl: float) -> None:
        now = self.clock()
        if len(self.pins) > 2 * self.warm_capacity + 1024:  # forget lapsed pins
            self.pins = {k: d for k, d in self.pins.items() if d > now}
        deadline = now + ttl
        for key in keys:
            self.pins[key] = max(self.pins.get(key, 0.0), deadline)

    def _unpinned_oldest(self) -> CacheKey | None:
        now = self.clock()
        for key in self.warm:
            deadline = self.pins.get(key)
            if deadline is None or deadline <= now:
                self.pins.pop(key, None)
                return key
        return None

    def _to_cold(self, key: CacheKey, data: torch.Tensor | _Pending) -> None:
        if self.cold is not None:
            if isinstance(data, _Pending):
                data.to_cold = True  # written when the save's pages arrive
            else:
                self.cold.put(key, data)
            self.stats.bytes_to_cold += self.block_bytes

    def check_integrity(self) -> None:
        """Budgets hold, and every pending entry has its save planned (for the next step)."""
        assert len(self.warm) <= max(self.warm_capacity, 0), "warm tier over its budget"
        assert set(self._pending) == {s.key for s in self._saves}, "a pending block has no planned save"
        assert all(ld.data is not None or ld.key in self._pending for ld in self._loads), "a load has no source"
        if self.cold is not None:
            self.cold.check_integrity()
