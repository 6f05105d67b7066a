"""Prefix caching end to end: outputs (tokens and logprobs) bitwise identical with the
cache off, cold and hot; and a seeded random workload of shared-prefix requests, aborts,
evictions and preemptions that never reads stale KV (checked against a no-cache run and
with `check_integrity()` after every step)."""

from __future__ import annotations

import random

import pytest

from tierlm import LLM, SamplingParams

SYSTEM = ("You are a careful assistant. Answer in one short paragraph, cite no sources, and say "
          "so plainly when you do not know. ") * 3
QUESTIONS = ["What is a prime number?", "Why is the sky blue?", "Name three rivers in Europe."]
PARAMS = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=12, seed=99, logprobs=2)


def result(out):
    o = out.outputs[0]
    return o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs]


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
        reqs.append((ids, SamplingParams(temperature=0.8, max_tokens=rng.randrange(1, 12), seed=i, logprobs=1,
                                         ignore_eos=True)))
    return reqs


# A tight pool (evictions, preemptions): tiny Gemma 3 has four one-layer KV groups.
@pytest.mark.parametrize("arch,blocks", [("llama", 24), ("gemma3", 64)])  # full attention; sliding + global
def test_random_workload_never_reads_stale_kv(arch, blocks, tiny_checkpoint):
    path, _ = tiny_checkpoint(arch)
    rng = random.Random(1234)
    reqs = _workload(rng, 40)
    ref_llm = LLM(str(path), dtype="float32", enable_prefix_caching=False)
    expected = [result(o) for o in ref_llm.generate([{"prompt_token_ids": ids} for ids, _ in reqs],
                                                     [p for _, p in reqs])]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=blocks, max_num_batched_tokens=48, max_num_seqs=6)
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
    assert sched.prefix_hits > 0 and sched.num_preemptions > 0 and eng.kv.pool.num_evictions > 0
    assert aborted and len(done) == len(reqs) - len(aborted)
    mismatched = [i for i, r in done.items() if r != expected[i]]
    assert not mismatched, f"requests {mismatched} differ from the no-cache run"
