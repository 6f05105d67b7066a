"""BlockPool: ownership and reference counts of the KV cache's fixed-size blocks.

Block 0 is the null block: never handed out, its contents stay zero, and block
tables are padded with it (attention masks those positions). Free blocks sit in an
insertion-ordered dict, so taking the oldest, returning, and removing any block are
all O(1) (the LRU order prefix caching evicts in).
"""

from __future__ import annotations

from collections import OrderedDict

NULL_BLOCK = 0


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (ref count 1 each). Caller checks `num_free` first."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        for b in blocks:
            assert self.ref_counts[b] > 0, f"double free of KV block {b}"
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def check_integrity(self) -> None:
        """free + used == usable, and a block is free exactly when its ref count is 0."""
        assert NULL_BLOCK not in self._free and self.ref_counts[NULL_BLOCK] == 0
        used = sum(1 for b in range(1, self.num_blocks) if self.ref_counts[b] > 0)
        assert used + len(self._free) == self.num_usable, (used, len(self._free), self.num_usable)
        for b in self._free:
            assert self.ref_counts[b] == 0, f"free block {b} has references"
