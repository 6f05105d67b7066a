"""Hot / warm / cold KV tiers for cached prefix blocks.

Hot blocks live in the block pool (device memory; host memory on CPU). When the pool
evicts a cached block, its pages are copied into the warm tier: a byte-bounded LRU in
host memory. When warm needs room, its oldest unpinned entries move to the cold tier
(disk, cold_store.py) if one is configured, else they are dropped. A prefix hit on a
warm or cold block copies it back into a fresh hot block. A key lives in exactly one
of hot and warm; the cold tier is a persistent copy (it outlives restarts).

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
    def __init__(self, read_block: Callable[[int], torch.Tensor], write_block: Callable[[int, torch.Tensor], None],
                 block_bytes: int, warm_bytes: int, cold: ColdStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.read_block, self.write_block = read_block, write_block
        self.block_bytes = block_bytes
        self.warm_capacity = warm_bytes // block_bytes  # blocks
        self.cold = cold
        self.clock = clock
        self.warm: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self.pins: dict[CacheKey, float] = {}  # key -> deadline
        self.stats = TierStats()

    @property
    def warm_bytes_used(self) -> int:
        return len(self.warm) * self.block_bytes

    def has(self, key: CacheKey) -> bool:
        return key in self.warm or (self.cold is not None and self.cold.has(key))

    def on_evict(self, key: CacheKey, block: int) -> None:
        """Pool callback: a cached hot block is about to be reused; keep its pages."""
        self.put_warm(key, self.read_block(block))
        self.stats.bytes_hot_to_warm += self.block_bytes

    def put_warm(self, key: CacheKey, data: torch.Tensor) -> None:
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

    def take(self, key: CacheKey) -> torch.Tensor | None:
        """Remove a block's pages from warm (or read them from cold) for a hot restore."""
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

    def flush_to_cold(self, hot: dict[CacheKey, int]) -> int:
        """Copy every cached block (hot ones given as key -> block, and warm) to the cold
        tier unless already there, so a restart can replay them. Returns blocks written."""
        if self.cold is None:
            return 0
        written = 0
        for key, block in hot.items():
            if not self.cold.has(key):
                self._to_cold(key, self.read_block(block))
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

    def _to_cold(self, key: CacheKey, data: torch.Tensor) -> None:
        if self.cold is not None:
            self.cold.put(key, data)
            self.stats.bytes_to_cold += self.block_bytes

    def check_integrity(self) -> None:
        assert len(self.warm) <= max(self.warm_capacity, 0), "warm tier over its budget"
        if self.cold is not None:
            self.cold.check_integrity()
