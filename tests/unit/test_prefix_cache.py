"""Prefix caching below the model: chained hashes, the pool's lazy LRU cache index, the
manager's lookup/adopt (full and sliding groups), and the scheduler starting requests on
their cached prefix (fabricated runner outputs)."""

from __future__ import annotations

from tierlm.config import SchedulerConfig
from tierlm.kv_cache import prefix_hash
from tierlm.kv_cache.block_pool import NULL_BLOCK, BlockPool
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.outputs import SampledToken, StepResult
from tierlm.request import Request
from tierlm.sampling_params import SamplingParams
from tierlm.scheduler.scheduler import Scheduler

ROOT = prefix_hash.root_hash("model", "")


def hashes(tokens, bs=4, root=ROOT):
    out: list[bytes] = []
    prefix_hash.extend(out, tokens, bs, root)
    return out


def test_hashes_chain_cover_full_blocks_only_and_depend_on_salt():
    a = hashes(list(range(10)))
    assert len(a) == 2  # 10 tokens = 2 full blocks of 4
    assert hashes(list(range(8)) + [99, 98]) == a  # the partial tail is not hashed
    assert hashes([0, 1, 2, 3, 9, 9, 9, 9])[0] == a[0] and hashes([0, 1, 2, 3, 9, 9, 9, 9])[1] != a[1]
    assert hashes([5, 1, 2, 3, 4, 5, 6, 7])[1] != a[1]  # a different first block changes every later hash
    assert hashes(list(range(10)), root=prefix_hash.root_hash("model", "tenant-b")) != a
    grown = hashes(list(range(6)))
    prefix_hash.extend(grown, list(range(13)), 4, ROOT)  # incremental == one shot
    assert grown == hashes(list(range(13)))


def test_pool_keeps_freed_cached_blocks_until_needed_then_evicts_oldest_first():
    evicted = []
    pool = BlockPool(5, on_evict=lambda key, b: evicted.append((key, b)))
    a, b, _ = pool.allocate(3)
    pool.register((0, b"a"), a)
    pool.register((0, b"b"), b)
    pool.free([b, a])  # b then a join the free list after block 4
    assert pool.num_free == 3 and pool.lookup((0, b"a")) == a
    pool.touch(a)  # revived from the free list
    assert pool.ref_counts[a] == 1 and pool.num_free == 2
    pool.check_integrity()
    assert pool.allocate(1) == [4] and not evicted  # uncached free blocks go first
    assert pool.allocate(1) == [b] and evicted == [((0, b"b"), b)]
    assert pool.lookup((0, b"b")) is None and pool.num_evictions == 1
    pool.check_integrity()


def test_manager_adopts_and_shares_cached_prefix():
    kv = KVCacheManager(32, 4, enable_caching=True)
    toks = list(range(20))
    h = hashes(toks)
    assert kv.allocate("a", 20)
    kv.cache_blocks("a", h, 18)  # 4 full blocks computed
    assert kv.lookup_prefix(h, max_blocks=5) == 4
    assert kv.lookup_prefix(h, max_blocks=2) == 2
    assert kv.adopt_prefix("b", h, 4) == (4, 4)
    assert kv.block_tables("b")[0] == kv.block_tables("a")[0][:4]
    kv.check_integrity()  # shared blocks: reference count 2 each
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_free == kv.pool.num_usable and kv.lookup_prefix(h, 5) == 4  # still cached
    kv.check_integrity()


def test_sliding_group_needs_only_blocks_inside_the_window():
    kv = KVCacheManager(64, 4, windows=(None, 6), enable_caching=True)
    toks = list(range(24))
    h = hashes(toks)
    assert kv.allocate("a", 24)
    kv.cache_blocks("a", h, 24)
    assert kv.allocate("a", 25, 24)  # position 24 sees keys > 18: sliding blocks 0..3 released (stay cached)
    (full, sliding) = kv.block_tables("a")
    assert sliding[:4] == [NULL_BLOCK] * 4 and NULL_BLOCK not in full
    kv.check_integrity()
    kv.free("a")
    assert kv.lookup_prefix(h, 6) == 6
    assert kv.adopt_prefix("b", h, 5) == (5, 7)  # next query at 20 sees keys > 14: sliding blocks 3, 4
    full, sliding = kv.block_tables("b")
    assert len(full) == 5 and NULL_BLOCK not in full and sliding[:3] == [NULL_BLOCK] * 3
    kv.check_integrity()
    kv.free("b")
    assert kv.allocate("c", 4 * 30)  # 60 of 63 blocks: evicts cached ones, oldest first
    kv.check_integrity()
    assert kv.lookup_prefix(h, 6) < 6


def test_scheduler_starts_a_repeat_prompt_after_its_cached_blocks():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(64, 4, enable_caching=True), (2,))
    prompt = list(range(10, 30))  # 20 tokens: 5 full blocks

    def run(rid):
        s.add(Request(rid, prompt, SamplingParams(max_tokens=2), seed=0, arrival_seq=0, cache_root=ROOT))
        first = None
        while s.has_unfinished():
            out = s.schedule()
            first = first or out.scheduled[0]
            s.update(out, StepResult([SampledToken(x.request_id, 7, None) for x in out.scheduled if x.sample]))
            s.check_integrity()
        return first

    cold = run("a")
    assert cold.start == 0 and len(cold.token_ids) == 20
    hot = run("b")  # at most (20 - 1) // 4 = 4 blocks: the last token's block is recomputed
    assert hot.start == 16 and hot.token_ids == prompt[16:]
    assert s.prefix_queries == 40 and s.prefix_hits == 16
