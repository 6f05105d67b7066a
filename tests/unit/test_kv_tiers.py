"""Warm and cold KV tiers without a model: byte budgets hold, session pins outlive LRU
pressure until their deadline, and the disk format rejects corrupt or foreign files."""

from __future__ import annotations

import torch

from tierlm.kv_cache.cold_store import ColdStore
from tierlm.kv_cache.tiers import KVTiers

SHAPE = (2, 4, 1, 8)  # [2 * group_size, block_size, kv_heads, head_dim]
BLOCK_BYTES = 2 * 4 * 8 * 2  # bf16


def page(i: int) -> torch.Tensor:
    return torch.full(SHAPE, float(i), dtype=torch.bfloat16)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def tiers(warm_blocks: int, cold=None, clock=None) -> tuple[KVTiers, dict[int, torch.Tensor]]:
    hot = {b: page(b) for b in range(1, 64)}
    return KVTiers(BLOCK_BYTES, warm_blocks * BLOCK_BYTES, cold, clock or Clock()), hot


def run_transfers(t: KVTiers, hot: dict[int, torch.Tensor]) -> None:
    """What the runner does with a step's planned transfers: saves read, then loads written."""
    saves, loads = t.take_transfers()
    saved = {s.key: hot[s.block].clone() for s in saves}
    for load in loads:
        hot[load.block] = (load.data if load.data is not None else saved[load.key]).clone()
    t.saved(saved)


def evict(t: KVTiers, hot: dict[int, torch.Tensor], key, block: int) -> None:
    t.on_evict(key, block)
    run_transfers(t, hot)


def test_warm_is_bounded_lru_and_moves_pages_back(tmp_path):
    cold = ColdStore(tmp_path, "model-a", SHAPE, torch.bfloat16, max_bytes=10**6)
    t, hot = tiers(3, cold)
    for b in range(1, 9):
        evict(t, hot, (0, bytes([b])), b)
        assert t.warm_bytes_used <= 3 * BLOCK_BYTES
        t.check_integrity()
    assert list(t.warm) == [(0, bytes([b])) for b in (6, 7, 8)]
    assert cold.has((0, bytes([1]))) and t.stats.warm_evictions == 5
    assert torch.equal(t.take((0, bytes([7]))), page(7)) and (0, bytes([7])) not in t.warm
    assert torch.equal(t.take((0, bytes([2]))), page(2))  # from disk
    assert (t.stats.warm_hits, t.stats.cold_hits) == (1, 1)


def test_session_pins_survive_pressure_until_deadline():
    clock = Clock()
    t, hot = tiers(2, clock=clock)
    t.pin([(0, b"s1"), (0, b"s2")], ttl=60)
    evict(t, hot, (0, b"s1"), 1)
    evict(t, hot, (0, b"s2"), 2)
    for b in range(3, 10):  # warm is all pinned: newcomers are not kept (no cold tier)
        evict(t, hot, (0, bytes([b])), b)
    assert set(t.warm) == {(0, b"s1"), (0, b"s2")}
    clock.now = 61  # pins lapse: the LRU may move them out again
    evict(t, hot, (0, b"x"), 3)
    assert (0, b"x") in t.warm and len(t.warm) == 2


def test_cold_store_bounded_and_rejects_corrupt_or_foreign_files(tmp_path):
    store = ColdStore(tmp_path, "model-a", SHAPE, torch.bfloat16, max_bytes=5 * 400)
    for i in range(20):
        store.put((0, bytes([i]) * 16), page(i))
        store.check_integrity()
    assert store.bytes_used <= 5 * 400 and not store.has((0, bytes([0]) * 16)) and store.has((0, bytes([19]) * 16))
    key = (0, bytes([19]) * 16)
    path = store.dir / store._name(key)
    blob = bytearray(path.read_bytes())
    blob[-40] ^= 0xFF  # flip a payload byte
    path.write_bytes(bytes(blob))
    assert store.get(key) is None and store.num_rejected == 1 and not path.exists()
    # A restarted store finds the files that are left; another model never sees them.
    again = ColdStore(tmp_path, "model-a", SHAPE, torch.bfloat16, max_bytes=5 * 400)
    assert torch.equal(again.get((0, bytes([18]) * 16)), page(18))
    other = ColdStore(tmp_path, "model-b", SHAPE, torch.bfloat16, max_bytes=5 * 400)
    assert other.get((0, bytes([18]) * 16)) is None
    # A file copied in from another model's directory fails the fingerprint check.
    foreign = other.dir / store._name((0, bytes([18]) * 16))
    foreign.write_bytes((again.dir / store._name((0, bytes([18]) * 16))).read_bytes())
    other2 = ColdStore(tmp_path, "model-b", SHAPE, torch.bfloat16, max_bytes=5 * 400)
    assert other2.get((0, bytes([18]) * 16)) is None and other2.num_rejected == 1


def test_transfers_are_planned_as_data_and_resolve_within_one_step(tmp_path):
    """Nothing is read or written until the runner carries the plan out: an eviction is a
    BlockSave, a restore a BlockLoad; a key evicted and restored in the same step loads
    the pages its save reads, and one pushed on to cold before its pages arrive reaches
    the disk when they do."""
    cold = ColdStore(tmp_path, "model-a", SHAPE, torch.bfloat16, max_bytes=10**6)
    t, hot = tiers(1, cold)
    t.on_evict((0, b"a"), 5)  # block 5 is about to be reused: planned, not read
    assert [(s.block, s.key) for s in t._saves] == [(5, (0, b"a"))] and not cold.has((0, b"a"))
    pending = t.take((0, b"a"))  # restored in the same step into block 9
    t.load(9, (0, b"a"), pending)
    t.on_evict((0, b"b"), 6)
    t.on_evict((0, b"c"), 7)  # warm holds one block: "b" moves on to cold while still pending
    saves, loads = t.take_transfers()
    assert [s.block for s in saves] == [5, 6, 7] and [(ld.block, ld.data) for ld in loads] == [(9, None)]
    hot[5], hot[6], hot[7] = page(50), page(60), page(70)  # what those blocks held when evicted
    saved = {s.key: hot[s.block].clone() for s in saves}
    for load in loads:
        hot[load.block] = saved[load.key] if load.data is None else load.data
    t.saved(saved)
    assert torch.equal(hot[9], page(50))  # restored from this step's save
    assert torch.equal(cold.get((0, b"b")), page(60)) and torch.equal(t.warm[(0, b"c")], page(70))
    t.check_integrity()
