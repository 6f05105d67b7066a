"""BlockPool: ownership, reference counts and the prefix-cache index of the KV blocks.

Block 0 is the null block: never handed out, its contents stay zero, and block
tables are padded with it (attention masks those positions). Free blocks sit in an
insertion-ordered dict, so taking the oldest, returning, and removing any block are
all O(1).

Prefix caching: a full block whose KV is computed may be registered under a key
(KV group, chained block hash). It keeps that key while free, so a later request can
take it back (`touch`) until the pool needs the memory: `allocate` takes the least
recently freed block first and only then drops its key (lazy LRU eviction). A
registered block is never written again: sharers only append after it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

NULL_BLOCK = 0

CacheKey = tuple[int, bytes]  # (KV group, block hash)


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[CacheKey, int], None] | None = None) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.cached: dict[CacheKey, int] = {}
        self.key_of: dict[int, CacheKey] = {}
        # Called with (key, block) just before an evicted block's memory is reused
        # (the warm tier copies it out there).
        self.on_evict = on_evict
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks with no reference, cached ones included (they are reclaimable)."""
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (ref count 1 each), evicting cache entries. Caller checks `num_free`."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            key = self.key_of.pop(b, None)
            if key is not None:
                del self.cached[key]
                self.num_evictions += 1
                if self.on_evict is not None:
                    self.on_evict(key, b)
            self.ref_counts[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero join the free list's
        recent end, in the order given (callers pass a request's tail first, so its
        shareable head is evicted last)."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of KV block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def lookup(self, key: CacheKey) -> int | None:
        return self.cached.get(key)

    def touch(self, block: int) -> None:
        """Take one more reference to a cached block (reviving it if it was free)."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def register(self, key: CacheKey, block: int) -> None:
        """Index a full, computed, referenced block under `key` (first one wins)."""
        if key not in self.cached and block not in self.key_of:
            self.cached[key] = block
            self.key_of[block] = key

    def check_integrity(self) -> None:
        """free + used == usable, a block is free exactly when its ref count is 0, and
        the cache index is a bijection between keys and real blocks."""
        assert NULL_BLOCK not in self._free and self.ref_counts[NULL_BLOCK] == 0
        assert NULL_BLOCK not in self.key_of
        used = sum(1 for b in range(1, self.num_blocks) if self.ref_counts[b] > 0)
        assert used + len(self._free) == self.num_usable, (used, len(self._free), self.num_usable)
        for b in self._free:
            assert self.ref_counts[b] == 0, f"free block {b} has references"
        assert len(self.cached) == len(self.key_of)
        for key, b in self.cached.items():
            assert self.key_of[b] == key, f"cache index disagrees for block {b}"
