"""Beam search and best_of on the bundled model: width 1 is greedy, width 4 gives 4
distinct sequences ranked by score whose cumulative logprobs equal the engine's own
scoring of each full sequence (so forked KV is right), and no block leaks."""

from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams
from tierlm.engine.beam import score

PROMPTS = ["The three most important things in life are", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def llm(cache_dir):
    llm = LLM("smollm2-135m", cache_dir=cache_dir)
    yield llm
    llm.close()


def logprob_of(llm, prompt_ids: list[int], output: list[int]) -> float:
    ids = prompt_ids + output
    lps = torch.log_softmax(llm.engine.prompt_logits(ids, len(prompt_ids)).float(), dim=-1)
    return sum(lps[p - 1, ids[p]].item() for p in range(len(prompt_ids), len(ids)))


def test_width_one_is_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20))
    beam = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, use_beam_search=True, best_of=1))
    assert [o.outputs[0].token_ids for o in beam] == [o.outputs[0].token_ids for o in greedy]
    assert [o.outputs[0].finish_reason for o in beam] == [o.outputs[0].finish_reason for o in greedy]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_width_four_returns_distinct_sequences_by_score(llm, length_penalty):
    params = SamplingParams(temperature=0, max_tokens=16, n=4, use_beam_search=True, length_penalty=length_penalty)
    out = llm.generate(PROMPTS[:1], params)[0]
    seqs = [o.token_ids for o in out.outputs]
    assert len(seqs) == 4 and len({tuple(s) for s in seqs}) == 4
    scores = [score(o.cumulative_logprob, len(o.token_ids), length_penalty) for o in out.outputs]
    assert scores == sorted(scores, reverse=True)
    for o in out.outputs:  # every beam's KV (shared blocks, copied partial blocks) was right
        assert o.cumulative_logprob == pytest.approx(logprob_of(llm, out.prompt_token_ids, o.token_ids), abs=1e-3)
        assert o.text == llm.tokenizer.decode(o.token_ids)
    eng = llm.engine
    eng.scheduler.check_integrity()
    assert eng.kv.pool.num_free == eng.kv.pool.num_usable and not eng.scheduler.requests


def test_best_of_keeps_the_likeliest_samples(llm):
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=7, n=2, best_of=4)
    best = llm.generate(PROMPTS[:1], params)[0].outputs
    alone = [llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=10, seed=7 + i, logprobs=0))[0]
             .outputs[0] for i in range(4)]
    alone.sort(key=lambda o: -o.cumulative_logprob)
    assert [o.token_ids for o in best] == [o.token_ids for o in alone[:2]]
    assert [o.index for o in best] == [0, 1] and best[0].logprobs is None  # not asked for
    assert llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_usable


def test_forked_samples_equal_independent_requests(llm):
    n3 = llm.generate(PROMPTS[1:], SamplingParams(temperature=0.9, max_tokens=12, seed=3, n=3, logprobs=1))[0]
    for i, o in enumerate(n3.outputs):
        alone = llm.generate(PROMPTS[1:], SamplingParams(temperature=0.9, max_tokens=12, seed=3 + i, logprobs=1))
        assert o.token_ids == alone[0].outputs[0].token_ids
        assert [lp.logprob for lp in o.logprobs] == [lp.logprob for lp in alone[0].outputs[0].logprobs]
