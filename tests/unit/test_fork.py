"""KV forks: shared full blocks by reference count, a copied partial block, sliding
groups, pool exhaustion; and the scheduler's parked n > 1 samples and beam requests."""

from __future__ import annotations

from tests.unit.test_scheduler import make, req, step
from tierlm.kv_cache.block_pool import NULL_BLOCK
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.outputs import SampledToken, StepResult, TokenLogprob


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    kv = KVCacheManager(16, 4)
    assert kv.allocate("a", 10)  # blocks for positions 0..9: two full, one partial
    a = kv.block_tables("a")[0]
    copies = kv.fork("a", "b", 10)
    b = kv.block_tables("b")[0]
    assert b[:2] == a[:2] and b[2] != a[2] and copies == [(a[2], b[2])]
    assert [kv.pool.ref_counts[x] for x in a] == [2, 2, 1]
    kv.check_integrity()
    assert kv.fork("a", "c", 8) == [] and kv.block_tables("c")[0] == a[:2]  # block-aligned: nothing to copy
    for rid in ("a", "b", "c"):
        kv.free(rid)
    kv.check_integrity()
    assert kv.pool.num_free == kv.pool.num_usable


def test_fork_in_a_sliding_group_skips_out_of_window_blocks():
    kv = KVCacheManager(32, 4, windows=(None, 6))
    assert kv.allocate("a", 20)
    kv.allocate("a", 20, num_computed=20)  # releases blocks no query at >= 20 can see
    copies = kv.fork("a", "b", 18)  # a query at 18 sees 13..18: blocks 3 and 4 of the window group
    full, window = kv.block_tables("b")
    assert full[:4] == kv.block_tables("a")[0][:4] and len(full) == 5
    assert window[:3] == [NULL_BLOCK] * 3 and window[3] == kv.block_tables("a")[1][3]
    assert len(copies) == 2  # the partial block (positions 16, 17) in both groups
    kv.check_integrity()
    assert kv.fork("a", "c", 8) is None  # a has released blocks a fork at 8 would need


def test_fork_needs_free_blocks_for_the_copy():
    kv = KVCacheManager(4, 4)  # 3 usable
    assert kv.allocate("a", 10)
    assert kv.fork("a", "b", 10) is None and "b" not in kv.tables
    kv.check_integrity()


def test_parked_samples_fork_from_the_first_once_its_prompt_is_computed():
    s = make(max_num_batched_tokens=8)
    first, others = req("r#0", 10, n=3), [req("r#1", 10, n=3), req("r#2", 10, n=3)]
    s.add(first)
    s.add_forks(first, others)
    out, _ = step(s)  # first chunk: 8 of 10 prompt tokens, no fork yet
    assert [x.request_id for x in out.scheduled] == ["r#0"] and len(s.parking.parked["r#0"]) == 2
    out, _ = step(s)  # prompt done: the others fork at 9 tokens and compute token 9 themselves
    assert not s.parking.holds_for("r#0")
    out, _ = step(s)
    by_id = {x.request_id: x for x in out.scheduled}
    assert (by_id["r#1"].start, by_id["r#1"].token_ids) == (9, [19]) and by_id["r#1"].sample
    assert by_id["r#1"].blocks.reset  # new to the runner: its whole tables
    assert by_id["r#1"].blocks.appended[0][:2] == tuple(s.kv.block_tables("r#0")[0][:2])  # shared prompt blocks
    assert len(out.block_copies) == 2  # each fork copied block 2 (positions 8..9)


def test_parked_samples_compute_themselves_if_the_first_finishes_early():
    s = make(max_num_batched_tokens=32)
    first, other = req("r#0", 6, max_tokens=1, n=2), req("r#1", 6, max_tokens=1, n=2)
    s.add(first)
    s.add_forks(first, [other])
    s.abort("r#0")
    assert other in s.waiting
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["r#1"] and out.scheduled[0].start == 0


def test_beam_requests_report_candidates_and_wait_for_the_engine():
    s = make()
    r = req("b", 5, use_beam_search=True, temperature=0.0)
    s.add(r)
    out = s.schedule()
    s.update(out, StepResult([SampledToken("b", 7, TokenLogprob(-0.1, [(7, -0.1), (8, -2.0)]))]))
    assert r.output_token_ids == [] and r.beam_candidates == [(7, -0.1), (8, -2.0)]
    assert s.schedule().scheduled == []  # nothing to compute until a token is chosen
    r.output_token_ids.append(8)
    assert s.schedule().scheduled[0].token_ids == [8]
    s.check_integrity()
