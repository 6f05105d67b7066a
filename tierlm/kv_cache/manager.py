"""KVCacheManager: per-request block tables (one per KV group) on top of one BlockPool.

A request's table in a group covers `ceil(tokens_with_kv / block_size)` positions'
blocks, allocated as its `num_computed_tokens` advances and all released on finish,
abort or preemption. In a sliding-window group, blocks whose positions no future query
can see (all below `num_computed - window + 1`) are released as the request advances and
their table entries become the null block, so table index = position // block_size
holds in every group. Preemption recomputes from position 0 with fresh blocks.

Prefix caching: a new (or recomputing) request adopts the longest run of cached blocks
matching its block hashes that every group can supply (a sliding group only needs the
blocks inside the window of the first position left to compute), sharing them by
reference count; its full blocks are registered as their KV gets computed. At least
one token is always left to compute, so a shared block is never written. With
`tiers` (kv_cache/tiers.py), blocks evicted from the pool may still be found in the
warm or cold tier; adopting them copies them into fresh hot blocks. Those copies are
planned here and carried out by the runner (`take_transfers`, `saved`): this module
never touches a tensor.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from tierlm.kv_cache.block_pool import NULL_BLOCK, BlockPool
from tierlm.kv_cache.tiers import KVTiers

_epochs = itertools.count(1)


@dataclass
class _Tables:
    tables: list[list[int]]
    dropped: list[int] = field(default_factory=list)  # leading entries released, per group
    registered: int = 0  # leading blocks already offered to the prefix cache
    # Which incarnation of the request's tables this is (new after a preemption): a reader
    # following the tables by what was appended knows when to start over.
    epoch: int = field(default_factory=lambda: next(_epochs))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, windows: tuple[int | None, ...] = (None,),
                 enable_caching: bool = False, tiers: KVTiers | None = None, session_ttl: float = 0.0) -> None:
        self.tiers = tiers if enable_caching else None
        self.pool = BlockPool(num_blocks, on_evict=self.tiers.on_evict if self.tiers is not None else None)
        self.block_size = block_size
        self.windows = windows
        self.enable_caching = enable_caching
        self.session_ttl = session_ttl
        self.hot_block_hits = 0  # reused straight from the pool by admitted requests (the scheduler counts)
        self._requests: dict[str, _Tables] = {}

    @property
    def tables(self) -> dict[str, list[list[int]]]:
        return {rid: t.tables for rid, t in self._requests.items()}

    def _needed(self, t: _Tables | None, total_tokens: int) -> int:
        want = -(-total_tokens // self.block_size)
        if t is None:
            return want * len(self.windows)
        return sum(max(0, want - len(table)) for table in t.tables)

    def allocate(self, request_id: str, total_tokens: int, num_computed: int = 0) -> bool:
        """Ensure blocks for `total_tokens` KV entries, the next query being at `num_computed`.

        Returns False (nothing new taken) if the pool is short; blocks out of every future
        query's window are released first either way.
        """
        t = self._requests.get(request_id)
        if t is not None:
            self._release_out_of_window(t, num_computed)
        if self._needed(t, total_tokens) > self.pool.num_free:
            return False
        if t is None:
            t = self._requests[request_id] = _Tables([[] for _ in self.windows], [0] * len(self.windows))
        want = -(-total_tokens // self.block_size)
        for table in t.tables:
            if want > len(table):
                table.extend(self.pool.allocate(want - len(table)))
        return True

    def _release_out_of_window(self, t: _Tables, num_computed: int) -> None:
        for g, window in enumerate(self.windows):
            if window is None:
                continue
            # Blocks before the first one a query at num_computed can read are dead.
            table = t.tables[g]
            dead = min(self._first_needed(window, num_computed), len(table))
            if dead > t.dropped[g]:
                self.pool.free(table[t.dropped[g] : dead])
                table[t.dropped[g] : dead] = [NULL_BLOCK] * (dead - t.dropped[g])
                t.dropped[g] = dead

    def free(self, request_id: str) -> None:
        t = self._requests.pop(request_id, None)
        if t is not None:
            for g, table in enumerate(t.tables):
                self.pool.free(table[t.dropped[g]:][::-1])  # tail first: the shared head is evicted last

    # ---- prefix caching ------------------------------------------------------------------
    def _first_needed(self, window: int | None, num_computed: int) -> int:
        """First block a query at position `num_computed` (or later) can read in a group."""
        return 0 if window is None else max(0, num_computed - window + 1) // self.block_size

    def _prefix_blocks(self, k: int) -> list[tuple[int, int]]:
        """(group, block index) pairs a request starting after k cached blocks must have."""
        return [(g, i) for g, window in enumerate(self.windows)
                for i in range(self._first_needed(window, k * self.block_size), k)]

    def _findable(self, key) -> bool:
        return self.pool.lookup(key) is not None or (self.tiers is not None and self.tiers.has(key))

    def lookup_prefix(self, hashes: list[bytes], max_blocks: int) -> int:
        """How many leading blocks (of `hashes`) the cache tiers can supply to every group
        (blocks restored from warm/cold need free pool blocks, which must be there)."""
        if not self.enable_caching:
            return 0
        k = min(len(hashes), max_blocks)
        for g, window in enumerate(self.windows):
            if window is None:
                i = 0
                while i < k and self._findable((g, hashes[i])):
                    i += 1
                k = i
        while k > 0:
            keys = [(g, hashes[i]) for g, i in self._prefix_blocks(k)]
            if all(self._findable(key) for key in keys):
                hot = [self.pool.lookup(key) for key in keys]
                restores = sum(b is None for b in hot)
                idle_hot = sum(b is not None and self.pool.ref_counts[b] == 0 for b in hot)
                if restores <= self.pool.num_free - idle_hot:
                    return k
            k -= 1
        return 0

    def adopt_prefix(self, request_id: str, hashes: list[bytes], k: int) -> tuple[int, int]:
        """Start a request's tables with k cached blocks (a `lookup_prefix` result).

        Returns (k, blocks found hot), or (0, 0) with nothing adopted if a warm/cold block
        could not be read back.
        """
        assert request_id not in self._requests
        needed = self._prefix_blocks(k)
        missing = [(g, i) for g, i in needed if self.pool.lookup((g, hashes[i])) is None]
        # Take restored pages out of warm/cold before allocating: allocation evicts into warm.
        pages = {}
        for g, i in missing:
            data = self.tiers.take((g, hashes[i]))
            if data is None:  # a cold file failed its checks: recompute instead
                for (pg, pi), d in pages.items():
                    self.tiers.put_warm((pg, hashes[pi]), d)
                return 0, 0
            pages[g, i] = data
        for g, i in needed:
            b = self.pool.lookup((g, hashes[i]))
            if b is not None:
                self.pool.touch(b)
        for (g, i), data, b in zip(pages, pages.values(), self.pool.allocate(len(pages))):
            self.tiers.load(b, (g, hashes[i]), data)
            self.pool.register((g, hashes[i]), b)
        t = _Tables([], [], registered=k)
        for g, window in enumerate(self.windows):
            first = self._first_needed(window, k * self.block_size)
            t.tables.append([NULL_BLOCK] * first + [self.pool.lookup((g, h)) for h in hashes[first:k]])
            t.dropped.append(first)
        self._requests[request_id] = t
        return k, len(needed) - len(pages)

    def fork(self, src_id: str, dst_id: str, num_tokens: int) -> list[tuple[int, int]] | None:
        """Give `dst_id` the KV of `src_id`'s first `num_tokens` positions.

        Blocks those positions fill completely are shared by reference count (neither
        request writes them again); the block holding the last partial run of them is
        copied into a fresh block for `dst_id` (copy-on-write, done eagerly because both
        requests write their next token into it). Returns the (src, dst) block copies the
        runner must make before the next forward, or None (nothing taken) when the pool
        cannot supply the copies.
        """
        src = self._requests[src_id]
        assert dst_id not in self._requests
        full, partial = divmod(num_tokens, self.block_size)
        first = [min(self._first_needed(w, num_tokens), full) for w in self.windows]
        if any(d > f for d, f in zip(src.dropped, first)):
            return None  # src already released blocks these positions still need
        copy_groups = list(range(len(self.windows))) if partial else []
        if len(copy_groups) > self.pool.num_free:
            return None
        t = _Tables([], list(first), registered=min(src.registered, full))
        for g, table in enumerate(src.tables):
            assert len(table) * self.block_size >= num_tokens, "fork beyond the source's blocks"
            shared = table[first[g] : full]
            for b in shared:
                self.pool.touch(b)
            t.tables.append([NULL_BLOCK] * first[g] + shared)
        copies = []
        for g, b in zip(copy_groups, self.pool.allocate(len(copy_groups))):
            copies.append((src.tables[g][full], b))
            t.tables[g].append(b)
        self._requests[dst_id] = t
        return copies

    def pin(self, hashes: list[bytes]) -> None:
        """Keep these blocks (every group) in the warm tier for `session_ttl` seconds."""
        if self.tiers is not None and self.enable_caching:
            self.tiers.pin([(g, h) for g in range(len(self.windows)) for h in hashes], self.session_ttl)

    def cache_blocks(self, request_id: str, hashes: list[bytes], num_computed: int) -> None:
        """Register the request's blocks whose every position's KV is now computed."""
        t = self._requests.get(request_id)
        if t is None or not self.enable_caching:
            return
        full = min(num_computed // self.block_size, len(hashes))
        for g, table in enumerate(t.tables):
            for i in range(max(t.registered, t.dropped[g]), full):
                key = (g, hashes[i])
                self.pool.register(key, table[i])
                if self.tiers is not None and self.pool.lookup(key) == table[i]:
                    self.tiers.superseded(key)  # recomputed while a copy waited in warm
        t.registered = max(t.registered, full)

    def take_transfers(self) -> tuple[list, list]:
        """Block saves and loads planned since the last call (empty without tiers)."""
        return self.tiers.take_transfers() if self.tiers is not None else ([], [])

    def saved(self, pages: dict) -> None:
        """The pages the runner read for this step's saves (see KVTiers.saved)."""
        if self.tiers is not None and pages:
            self.tiers.saved(pages)

    def holds(self, request_id: str) -> bool:
        """Whether the request has block tables (it is running, not waiting or preempted)."""
        return request_id in self._requests

    def live_tables(self, request_id: str) -> tuple[list[list[int]], list[int], int] | None:
        """The request's tables, released-entry counts and epoch, not copied (read only)."""
        t = self._requests.get(request_id)
        return (t.tables, t.dropped, t.epoch) if t else None

    def block_tables(self, request_id: str) -> list[list[int]]:
        t = self._requests.get(request_id)
        return [list(table) for table in t.tables] if t else [[] for _ in self.windows]

    def max_blocks(self, total_tokens: int, chunk: int) -> int:
        """Most blocks one request of `total_tokens` can hold at once (prefill chunks <= chunk)."""
        full = -(-total_tokens // self.block_size)
        need = 0
        for window in self.windows:
            need += full if window is None else min(full, -(-(window + chunk) // self.block_size) + 1)
        return need

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_usable

    def check_integrity(self) -> None:
        """Pool invariants, and every reference is one live table entry (shared blocks
        are referenced once per table holding them, never twice by one table)."""
        self.pool.check_integrity()
        owned: Counter[int] = Counter()
        for t in self._requests.values():
            for g, table in enumerate(t.tables):
                assert all(b == NULL_BLOCK for b in table[: t.dropped[g]]), "a released block is still listed"
                live = table[t.dropped[g]:]
                assert NULL_BLOCK not in live, "a live table entry is the null block"
                assert len(set(live)) == len(live), "a block appears twice in one table"
                owned.update(live)
        assert all(self.pool.ref_counts[b] == n for b, n in owned.items()), "reference counts disagree"
        assert len(owned) == self.pool.num_usable - self.pool.num_free
        if self.tiers is not None:
            assert not set(self.tiers.warm) & set(self.pool.cached), "a block is both hot and warm"
            self.tiers.check_integrity()
