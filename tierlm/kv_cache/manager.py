"""KVCacheManager: per-request block tables on top of the BlockPool.

A request owns `ceil(tokens_with_kv / block_size)` blocks, allocated as its
`num_computed_tokens` advances and all released on finish, abort or preemption.
"""

from __future__ import annotations

from tierlm.kv_cache.block_pool import BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}

    def blocks_needed(self, request_id: str, total_tokens: int) -> int:
        have = len(self.tables.get(request_id, ()))
        return max(0, -(-total_tokens // self.block_size) - have)

    def allocate(self, request_id: str, total_tokens: int) -> bool:
        """Ensure blocks for `total_tokens` KV entries; False (nothing taken) if the pool is short."""
        need = self.blocks_needed(request_id, total_tokens)
        if need > self.pool.num_free:
            return False
        self.tables.setdefault(request_id, []).extend(self.pool.allocate(need))
        return True

    def free(self, request_id: str) -> None:
        self.pool.free(self.tables.pop(request_id, []))

    def block_table(self, request_id: str) -> list[int]:
        return self.tables.get(request_id, [])

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_usable

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        owned = [b for t in self.tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a KV block is in two block tables"
        assert all(self.pool.ref_counts[b] == 1 for b in owned)
        assert len(owned) == self.pool.num_usable - self.pool.num_free
