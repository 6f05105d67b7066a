"""Prefix caching end to end: outputs (tokens and logprobs) bitwise identical with the
cache off, cold and hot; and a seeded random workload of shared-prefix requests (some
with forked samples or beams), aborts, evictions and preemptions that never reads stale
KV (checked against a no-cache run and with `check_integrity()` after every step)."""

from __future__ import annotations

import random

import pytest

from tierlm import LLM, SamplingParams

SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite no sources, and say "
          "so plainly when you do not know. ") * 3
QUESTIONS = ["What is a prime number?", "Why is the sky blue?", "Name three rivers in Europe."]
PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=99, logprobs=2)


def result(out):
    return [(o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs or []], o.cumulative_logprob)
            for o in out.outputs]


def test_outputs_identical_with_cache_off_cold_and_hot(cache_dir):
    prompts = [SYSTEM + q for q in QUESTIONS]
    off = LLM("smollm2-135m", cache_dir=cache_dir, enable_prefix_caching=False)
    expected = [result(o) for o in off.generate(prompts, PARAMS)]
    assert off.engine.scheduler.prefix_hits == 0

    llm = LLM("smollm2-135m", cache_dir=cache_dir)
    cold = result(llm.generate(prompts[0], PARAMS)[0])
    hot = [result(o) for o in llm.generate(prompts, PARAMS)]  # prompt 0 again, then two sharing SYSTEM
    sched = llm.engine.scheduler
    system_blocks = len(llm.tokenizer.encode(SYSTEM)) // llm.engine.kv.block_size
    assert sched.prefix_hits >= 3 * (system_blocks - 1) * llm.engine.kv.block_size
    assert cold == expected[0] and hot == expected
    llm.engine.kv.check_integrity()


def _workload(rng: random.Random, n: int) -> list[tuple[list[int], SamplingParams]]:
    prefixes = [[rng.randrange(3, 320) for _ in range(rng.randrange(20, 60))] for _ in range(3)]
    reqs = []
    for i in range(n):
        ids = rng.choice(prefixes) + [rng.randrange(3, 320) for _ in range(rng.randrange(0, 30))]
        max_tokens = rng.randrange(1, 12)
        if i % 6 == 4:  # samples forked from one prompt, ranked by best_of
            params = SamplingParams(temperature=0.8, max_tokens=max_tokens, seed=i, n=2, best_of=rng.choice([2, 3]),
                                    logprobs=1, ignore_eos=True)
        elif i % 6 == 5:  # beams forked and pruned every step
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, n=2, best_of=rng.choice([2, 3]),
                                    use_beam_search=True, ignore_eos=True)
        else:
            params = SamplingParams(temperature=0.8, max_tokens=max_tokens, seed=i, logprobs=1, ignore_eos=True)
        reqs.append((ids, params))
    return reqs


# A tight pool (evictions, preemptions): tiny Gemma 3 has four one-layer KV groups.
@pytest.mark.parametrize("admission", ["greedy", "past_future"])
@pytest.mark.parametrize("arch,blocks", [("llama", 20), ("gemma3", 56)])  # full attention; sliding + global
def test_random_workload_never_reads_stale_kv(arch, blocks, admission, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)
    rng = random.Random(1234)
    reqs = _workload(rng, 40)
    ref_llm = LLM(str(path), dtype="float32", enable_prefix_caching=False)
    expected = [result(o) for o in ref_llm.generate([{"prompt_token_ids": ids} for ids, _ in reqs],
                                                     [p for _, p in reqs])]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=blocks, max_num_batched_tokens=48, max_num_seqs=6,
              admission=admission)
    eng = llm.engine
    pending = list(enumerate(reqs))
    done: dict[int, tuple] = {}
    aborted: set[int] = set()
    live: set[int] = set()
    while pending or eng.has_unfinished_requests():
        for _ in range(rng.randrange(0, 3)):
            if pending:
                i, (ids, p) = pending.pop(0)
                eng.add_request(str(i), {"prompt_token_ids": ids}, p)
                live.add(i)
        if live and rng.random() < 0.05:
            victim = rng.choice(sorted(live))
            eng.abort_request(str(victim))
            live.discard(victim)
            aborted.add(victim)
        for out in eng.step():
            if out.finished:
                done[int(out.request_id)] = result(out)
                live.discard(int(out.request_id))
        eng.scheduler.check_integrity()
    assert eng.kv.pool.num_free == eng.kv.pool.num_usable
    sched = eng.scheduler
    assert sched.prefix_hits > 0 and eng.kv.pool.num_evictions > 0
    assert sched.num_preemptions > 0 or admission == "past_future"  # greedy must have exercised preemption
    assert aborted and len(done) == len(reqs) - len(aborted)
    mismatched = [i for i, r in done.items() if r != expected[i]]
    assert not mismatched, f"requests {mismatched} differ from the no-cache run"


def test_outputs_identical_after_warm_and_cold_restores(cache_dir, tmp_path):
    """A 12-block pool: other prompts push the first prompt's blocks to the warm tier, and
    with no warm room to the cold tier on disk, read back after a restart. Same bits."""
    prompt = SYSTEM + QUESTIONS[0]
    fillers = [f"Filler request {i}: " + "describe a different subject at length. " * 8 for i in range(3)]
    off = LLM("smollm2-135m", cache_dir=cache_dir, enable_prefix_caching=False)
    expected = result(off.generate(prompt, PARAMS)[0])

    warm = LLM("smollm2-135m", cache_dir=cache_dir, num_kv_blocks=12)
    tiers = warm.engine.kv.tiers
    assert result(warm.generate(prompt, PARAMS)[0]) == expected
    warm.generate(fillers, SamplingParams(max_tokens=1))
    assert tiers.stats.bytes_hot_to_warm > 0
    assert result(warm.generate(prompt, PARAMS)[0]) == expected
    assert tiers.stats.warm_hits > 0
    warm.engine.kv.check_integrity()

    cold_dir = tmp_path / "cold"
    first = LLM("smollm2-135m", cache_dir=cache_dir, num_kv_blocks=12, kv_warm_gb=0, kv_cold_dir=cold_dir)
    first.generate(prompt, PARAMS)
    first.generate(fillers, SamplingParams(max_tokens=1))
    assert first.engine.kv.tiers.stats.bytes_to_cold > 0
    first.close()  # also flushes what is still hot
    restarted = LLM("smollm2-135m", cache_dir=cache_dir, num_kv_blocks=12, kv_warm_gb=0, kv_cold_dir=cold_dir)
    assert result(restarted.generate(prompt, PARAMS)[0]) == expected
    stats = restarted.engine.kv.tiers.stats
    assert stats.cold_hits >= len(off.tokenizer.encode(SYSTEM)) // 16 - 1 and stats.warm_hits == 0


@pytest.mark.parametrize("session", [None, "conv-1"])
def test_session_keeps_a_conversation_prefix_warm(session, cache_dir):
    """A warm tier of 8 blocks under pressure from fillers: the first turn's prefix survives
    for the next turn only when the request carried a session id."""
    block_bytes = 2 * 30 * 16 * 3 * 64 * 2  # K+V, 30 layers, 16 positions, 3 kv heads x 64, bf16
    llm = LLM("smollm2-135m", cache_dir=cache_dir, num_kv_blocks=12, kv_warm_gb=8 * block_bytes / 2**30)
    eng = llm.engine
    assert eng.kv.tiers.warm_capacity == 8
    turn1 = llm.tokenizer.encode(SYSTEM + QUESTIONS[0])
    eng.add_request("t1", {"prompt_token_ids": turn1}, SamplingParams(max_tokens=4, temperature=0),
                    session_id=session)
    while eng.has_unfinished_requests():
        eng.step()
    full_blocks = len(turn1) // 16
    assert len(eng.kv.tiers.pins) == (full_blocks if session else 0)
    for i in range(4):  # pushes well over 8 blocks through the warm tier
        llm.generate([f"Unrelated filler {i} " * 30], SamplingParams(max_tokens=1))
    hits = eng.scheduler.prefix_hits
    llm.generate({"prompt_token_ids": turn1 + [12, 13, 14]}, SamplingParams(max_tokens=1))
    found = (eng.scheduler.prefix_hits - hits) // 16
    assert found == full_blocks if session else found < full_blocks
    eng.kv.check_integrity()
