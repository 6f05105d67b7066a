"""Scheduler with fabricated runner outputs: budgets, chunking, preemption, abort, stop rules."""

from __future__ import annotations

import random

from tierlm.config import SchedulerConfig
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.outputs import SampledToken, StepResult
from tierlm.request import Request, RequestStatus
from tierlm.sampling_params import SamplingParams
from tierlm.scheduler.scheduler import Scheduler
from tierlm.spec.proposer import NgramProposer, attach_drafts

EOS = 2


def make(num_blocks=64, block_size=4, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**kw), KVCacheManager(num_blocks, block_size), (EOS,))


_seq = iter(range(10**9))


def req(rid: str, n_prompt: int, max_tokens=8, priority=0, **params) -> Request:
    return Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens, **params), seed=0,
                   arrival_seq=next(_seq), priority=priority, max_total_tokens=n_prompt + max_tokens)


def step(s: Scheduler, token=7):
    out = s.schedule()
    sampled = [SampledToken(x.request_id, token, None) for x in out.scheduled if x.sample]
    finished = s.update(out, StepResult(sampled))
    s.check_integrity()
    return out, finished


def test_chunked_prefill_respects_budget_and_positions():
    s = make(max_num_batched_tokens=8)
    s.add(req("a", 20))
    starts = []
    for _ in range(3):
        out, _ = step(s)
        assert out.num_tokens <= 8
        starts.append((out.scheduled[0].start, len(out.scheduled[0].token_ids), out.scheduled[0].sample))
    assert starts == [(0, 8, False), (8, 8, False), (16, 4, True)]
    out, _ = step(s)
    assert out.scheduled[0].start == 20 and out.scheduled[0].token_ids == [7]  # decode of the sampled token


def test_decodes_go_first_and_max_num_seqs_holds():
    s = make(max_num_batched_tokens=16, max_num_seqs=2)
    for i in range(3):
        s.add(req(f"r{i}", 6))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["r0", "r1"]
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["r0", "r1"] and out.num_tokens == 2


def test_preemption_frees_blocks_and_recomputes_everything():
    # 6 usable blocks = 24 tokens; greedy admission lets both start, so one must yield later
    s = make(num_blocks=7, block_size=4, max_num_batched_tokens=64, admission="greedy")
    s.add(req("old", 10, max_tokens=12))
    s.add(req("new", 10, max_tokens=12))
    preempted = []
    for _ in range(40):
        out, _ = step(s)
        preempted += out.preempted
        if not s.has_unfinished():
            break
    assert preempted and preempted[0] == "new"  # the later arrival yields
    assert not s.has_unfinished()
    assert s.kv.pool.num_free == 6


def test_preempted_request_resumes_with_its_tokens():
    s = make(num_blocks=5, block_size=4, max_num_batched_tokens=64, admission="greedy")
    s.add(req("a", 6, max_tokens=6))
    s.add(req("b", 6, max_tokens=6))
    seen_restart = False
    for _ in range(60):
        out, _ = step(s)
        for x in out.scheduled:
            outputs = s.requests[x.request_id].output_token_ids if x.request_id in s.requests else []
            if x.start == 0 and outputs:  # recompute covers prompt + sampled tokens
                seen_restart = True
                assert x.token_ids == list(range(10, 16)) + outputs[: len(x.token_ids) - 6]
        if not s.has_unfinished():
            break
    assert seen_restart and not s.has_unfinished()


def test_priority_policy_orders_waiting_and_picks_victim():
    s = make(max_num_batched_tokens=4, max_num_seqs=1, policy="priority")
    s.add(req("low", 4, priority=5))
    s.add(req("high", 4, priority=-1))
    out, _ = step(s)
    assert out.scheduled[0].request_id == "high"
    # Both run, then blocks run out: the low-priority request yields although it came first
    # (FCFS would preempt the later arrival, as test_preemption_frees_blocks... shows).
    s = make(num_blocks=7, block_size=4, max_num_batched_tokens=64, admission="greedy", policy="priority")
    s.add(req("low", 10, max_tokens=12, priority=5))
    s.add(req("high", 10, max_tokens=12, priority=-1))
    preempted = []
    while s.has_unfinished():
        out, _ = step(s)
        preempted += out.preempted
    assert preempted and set(preempted) == {"low"}
    assert s.kv.pool.num_free == 6


def test_abort_at_any_point_frees_every_block():
    rng = random.Random(0)
    s = make(num_blocks=20, block_size=4, max_num_batched_tokens=12)
    ids = [f"r{i}" for i in range(12)]
    for rid in ids:
        s.add(req(rid, rng.randint(1, 15), max_tokens=rng.randint(1, 10)))
    while s.has_unfinished():
        step(s)
        if rng.random() < 0.3 and s.requests:
            victim = s.abort(rng.choice(sorted(s.requests)))
            assert victim.status == RequestStatus.FINISHED_ABORTED
            s.check_integrity()
    assert s.kv.pool.num_free == 19


def test_stop_rules():
    s = make()
    s.add(req("eos", 3, max_tokens=5))
    _, fin = step(s, token=EOS)
    assert fin[0].status == RequestStatus.FINISHED_STOPPED and fin[0].stop_reason is None
    s.add(req("min", 3, max_tokens=5, min_tokens=2))
    _, fin = step(s, token=EOS)
    assert not fin  # min_tokens not reached: EOS does not stop
    s.add(req("ign", 3, max_tokens=2, ignore_eos=True))
    s.add(req("sti", 3, max_tokens=5, stop_token_ids=[9]))
    results = {}
    for _ in range(4):
        _, fin = step(s, token=9 if not results else EOS)
        results.update({r.request_id: r for r in fin})
    assert results["sti"].stop_reason == 9 and results["sti"].finish_reason == "stop"
    assert results["ign"].finish_reason == "length" and results["ign"].num_output_tokens == 2


def test_fair_policy_lets_a_light_tenant_through_a_flood():
    s = make(max_num_batched_tokens=64, max_num_seqs=1, policy="fair")
    for i in range(6):
        r = req(f"flood{i}", 6, max_tokens=2)
        r.tenant = "flood"
        s.add(r)
    order = []
    for _ in range(3):  # flood0 runs and finishes (prefill + 2 tokens)
        out, _ = step(s)
        order += [x.request_id for x in out.scheduled if x.start == 0]
    for i in range(2):
        r = req(f"light{i}", 6, max_tokens=2)
        r.tenant = "light"
        s.add(r)
    while s.has_unfinished():
        out, _ = step(s)
        order += [x.request_id for x in out.scheduled if x.start == 0]
    # FCFS would run all six flood requests first; the fair policy alternates.
    assert order == ["flood0", "flood1", "light0", "flood2", "light1", "flood3", "flood4", "flood5"]


def test_past_future_admission_waits_instead_of_preempting():
    """Same pool and requests as the greedy preemption test: with history saying requests
    run to max_tokens, "new" waits for room and nothing is preempted."""
    s = make(num_blocks=7, block_size=4, max_num_batched_tokens=64)  # admission="past_future" by default
    for _ in range(8):
        s.admission.record(12)
    s.add(req("old", 10, max_tokens=12))
    s.add(req("new", 10, max_tokens=12))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["old"]  # 2 x 22 tokens would need 12 blocks > 6
    preempted = []
    for _ in range(40):
        out, _ = step(s)
        preempted += out.preempted
        if not s.has_unfinished():
            break
    assert not preempted and not s.has_unfinished() and s.kv.pool.num_free == 6


def test_past_future_admits_on_short_predicted_outputs():
    """History of short outputs predicts both fit: both start at once (greedy's throughput)."""
    s = make(num_blocks=7, block_size=4, max_num_batched_tokens=64)
    for _ in range(8):
        s.admission.record(2)
    s.add(req("a", 8, max_tokens=12))
    s.add(req("b", 8, max_tokens=12))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["a", "b"]


def _tenant_req(rid: str, tenant: str, n_prompt=6, max_tokens=30) -> Request:
    r = req(rid, n_prompt, max_tokens=max_tokens)
    r.tenant = tenant
    return r


def test_fair_policy_takes_a_seat_back_for_a_tenant_below_its_share():
    s = make(num_blocks=256, max_num_batched_tokens=256, max_num_seqs=4, policy="fair")
    for i in range(6):
        s.add(_tenant_req(f"flood{i}", "flood"))
    step(s)
    assert {r.request_id for r in s.running} == {"flood0", "flood1", "flood2", "flood3"}
    s.add(_tenant_req("light0", "light"))
    out, _ = step(s)  # light is due half the seats: the last flood request yields one now
    assert out.preempted == ["flood3"] and "light0" in [x.request_id for x in out.scheduled]
    for _ in range(5):  # flood keeps 3 seats: light holds 1 of its 2, the others are not over share
        out, _ = step(s)
        assert not out.preempted


def test_fair_seats_settle_at_the_weights_without_trading_back_and_forth():
    s = make(num_blocks=512, max_num_batched_tokens=512, max_num_seqs=8, policy="fair",
             tenant_weights=(("a", 3.0), ("b", 1.0)))
    for i in range(12):
        s.add(_tenant_req(f"b{i}", "b", max_tokens=200))
    step(s)
    for i in range(12):
        s.add(_tenant_req(f"a{i}", "a", max_tokens=200))
    preemptions = []
    for _ in range(30):
        out, _ = step(s)
        preemptions.append(len(out.preempted))
    seats = sorted(r.tenant for r in s.running)
    assert seats.count("a") == 6 and seats.count("b") == 2  # 3:1 of 8 seats
    assert sum(preemptions) == 6 and not any(preemptions[10:])  # b gave back 6 seats, then quiet


def test_fair_newcomer_prefill_is_not_squeezed_behind_other_tenants_chunks():
    s = make(num_blocks=256, max_num_batched_tokens=16, max_num_seqs=4, policy="fair")
    for i in range(2):
        s.add(_tenant_req(f"flood{i}", "flood", n_prompt=40))
    step(s)  # flood0 takes the whole budget with a prefill chunk
    s.add(_tenant_req("light0", "light", n_prompt=10))
    out, _ = step(s)
    light = [x for x in out.scheduled if x.request_id == "light0"]
    assert light and (light[0].start, len(light[0].token_ids)) == (0, 10)  # its whole prompt, this step
    assert out.num_tokens <= 16


def test_fair_light_tenant_gets_a_step_without_the_floods_decodes():
    s = make(num_blocks=256, max_num_batched_tokens=64, max_num_seqs=4, policy="fair")
    for i in range(4):
        s.add(_tenant_req(f"flood{i}", "flood"))
    step(s)
    step(s)  # four flood requests decoding
    s.add(_tenant_req("light0", "light", n_prompt=10))
    out, _ = step(s)
    assert [x.request_id for x in out.scheduled] == ["light0"] and out.preempted == ["flood3"]
    out, _ = step(s)  # then everyone runs: light decodes next to the three flood requests left
    assert sorted(x.request_id for x in out.scheduled) == ["flood0", "flood1", "flood2", "light0"]


def test_fair_pause_is_dropped_when_the_newcomer_cannot_start():
    # The light request needs more blocks than are free: the flood keeps decoding, no empty step.
    s = make(num_blocks=12, block_size=4, max_num_batched_tokens=64, max_num_seqs=2, policy="fair",
             admission="greedy")
    for i in range(2):
        s.add(_tenant_req(f"flood{i}", "flood", n_prompt=12, max_tokens=8))
    step(s)
    s.add(_tenant_req("light0", "light", n_prompt=40))  # 10 blocks; 7 free once flood1 gives its seat
    out, _ = step(s)
    assert out.preempted == ["flood1"] and [x.request_id for x in out.scheduled] == ["flood0"]


def test_drafts_respect_max_tokens_and_count_only_accepted_tokens_as_computed():
    s = make(num_speculative_tokens=4)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    s.add(Request("a", prompt, SamplingParams(max_tokens=3), seed=0, arrival_seq=next(_seq),
                          max_total_tokens=len(prompt) + 3))
    out = s.schedule()
    s.update(out, StepResult([SampledToken("a", 3, None)]))  # prefill -> first token 3
    attach_drafts(s, NgramProposer())
    out = s.schedule()
    (sched,) = out.scheduled
    # "2 3" recurs, followed by "1 2": one draft only, as the step may add 2 tokens at most
    # (the draft and the token after it) before max_tokens.
    assert sched.draft_token_ids == (1,)
    assert sched.token_ids == [3, 1] and sched.sample
    computed = s.requests["a"].num_computed_tokens
    # Row 0 sampled 1 (= the draft: accepted), row 1 sampled 9 (the bonus token).
    s.update(out, StepResult([SampledToken("a", 1, None), SampledToken("a", 9, None)], accepted_drafts={"a": 1}))
    assert not s.requests  # three tokens: max_tokens reached
    assert s.draft_tokens == 1 and s.accepted_tokens == 1 and computed == len(prompt)


def test_rejected_drafts_do_not_count_as_computed():
    s = make(num_speculative_tokens=3)
    prompt = [4, 5, 6, 7, 4, 5]
    s.add(Request("b", prompt, SamplingParams(max_tokens=20), seed=0, arrival_seq=next(_seq),
                  max_total_tokens=len(prompt) + 20))
    s.update(s.schedule(), StepResult([SampledToken("b", 6, None)]))
    attach_drafts(s, NgramProposer())
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids == (7, 4, 5)  # after "5 6": what followed "4 5 6"
    s.update(out, StepResult([SampledToken("b", 8, None)], accepted_drafts={"b": 0}))  # first draft wrong
    r = s.requests["b"]
    assert r.output_token_ids == [6, 8] and r.num_computed_tokens == r.num_tokens - 1
    s.check_integrity()


def test_the_runner_hears_a_requests_fixed_facts_once_then_only_what_changed():
    """Data-only contract: prompt, settings and seed travel in new_requests on the first
    scheduled step; later steps carry the output tokens appended since; a preempted
    request stays known (nothing resent); an ended one is listed once in `finished`."""
    s = make(num_blocks=64, max_num_batched_tokens=64)
    s.add(req("a", 5, max_tokens=3))
    out = s.schedule()
    (new,) = out.new_requests
    assert (new.request_id, new.prompt_token_ids, new.output_token_ids) == ("a", list(range(10, 15)), [])
    assert new.sampling_params.max_tokens == 3 and out.scheduled[0].new_output_token_ids == ()
    s.update(out, StepResult([SampledToken("a", 7, None)]))
    out = s.schedule()
    assert out.new_requests == [] and out.scheduled[0].new_output_token_ids == (7,)
    assert out.scheduled[0].token_ids == [7] and out.scheduled[0].prompt_len == 5
    s.update(out, StepResult([SampledToken("a", 8, None)]))
    s._preempt(s.requests["a"])  # recomputes from scratch: the runner keeps what it knows
    out = s.schedule()
    assert out.new_requests == [] and out.scheduled[0].new_output_token_ids == (8,)
    assert out.scheduled[0].token_ids == list(range(10, 15)) + [7, 8]
    s.update(out, StepResult([SampledToken("a", 9, None)]))  # max_tokens: finished
    assert not s.requests and s.ended == ["a"]
    out = s.schedule()
    assert out.finished == ["a"] and s.ended == []
    s.check_integrity()


def test_a_request_that_never_ran_is_not_reported_finished():
    s = make(num_blocks=64)
    s.add(req("w", 4))
    s.abort("w")
    assert s.schedule().finished == []


def test_block_tables_travel_as_deltas_the_runner_can_follow():
    """Replaying every step's BlockDelta rebuilds exactly the KV manager's tables, through
    growth, sliding-window release (null entries) and a preemption (a reset)."""
    from tierlm.runner.model_runner import _apply_blocks, _RequestState

    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8, admission="greedy"),
                  KVCacheManager(12, 4, windows=(None, 6)), (EOS,))
    s.add(req("a", 10, max_tokens=12))
    mirror = _RequestState([], [], SamplingParams(), 0)
    resets = 0
    for i in range(40):
        if i == 4:  # between steps, as the scheduler does when the pool runs dry
            s._preempt(s.requests["a"])
        out = s.schedule()
        for x in out.scheduled:
            _apply_blocks(mirror, x.blocks)
            resets += x.blocks.reset
            assert mirror.tables == s.kv.block_tables("a")
        s.update(out, StepResult([SampledToken(x.request_id, 7, None) for x in out.scheduled if x.sample]))
        s.check_integrity()
        if not s.has_unfinished():
            break
    assert not s.has_unfinished() and resets == 2  # the first step and the restart
    assert any(b == 0 for b in mirror.tables[1])  # the sliding group released blocks
