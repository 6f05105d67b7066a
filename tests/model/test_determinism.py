"""Bitwise batch invariance on the bundled model: the same request + seed gives identical
tokens and logprobs alone, among 32 other requests, under any chunked-prefill size, and
after preemption; for bf16 (default) and fp32."""

from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams

TARGET = "The history of the printing press begins in"
OTHERS = [f"Request {i}: describe topic number {i * 7} in detail, " + "with more words " * (i % 6) for i in range(32)]
PARAMS = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=20, seed=1234, logprobs=3)


def result(out):
    o = out.outputs[0]
    return o.token_ids, [(lp.logprob, lp.top) for lp in o.logprobs]


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def reference(request, cache_dir):
    dtype = request.param
    llm = LLM("smollm2-135m", dtype=dtype, cache_dir=cache_dir, max_num_batched_tokens=1024, max_num_seqs=40)
    return dtype, llm, result(llm.generate(TARGET, PARAMS)[0])


@pytest.mark.slow
def test_alone_vs_batch_of_32(reference):
    _, llm, alone = reference
    mixed = [SamplingParams(temperature=0.8, max_tokens=24, seed=i) if i % 2 else
             SamplingParams(temperature=0, max_tokens=12) for i in range(32)]
    outs = llm.generate(OTHERS[:16] + [TARGET] + OTHERS[16:], mixed[:16] + [PARAMS] + mixed[16:])
    assert result(outs[16]) == alone


@pytest.mark.parametrize("chunk", [pytest.param(3, marks=pytest.mark.slow), 16,
                                   pytest.param(29, marks=pytest.mark.slow)])
def test_chunked_prefill_sizes(reference, chunk, cache_dir):
    dtype, _, alone = reference
    llm = LLM("smollm2-135m", dtype=dtype, cache_dir=cache_dir, max_num_batched_tokens=chunk)
    outs = llm.generate(OTHERS[:2] + [TARGET], [PARAMS] * 3)
    assert result(outs[2]) == alone


def test_after_preemption(reference, cache_dir):
    dtype, _, alone = reference
    llm = LLM("smollm2-135m", dtype=dtype, cache_dir=cache_dir, num_kv_blocks=14, max_num_batched_tokens=64,
              admission="greedy")  # admits past what the pool can grow into: preemptions follow
    outs = llm.generate(OTHERS[:6] + [TARGET], [PARAMS] * 7)
    assert llm.engine.scheduler.num_preemptions > 0
    assert result(outs[6]) == alone
    llm.engine.kv.check_integrity()
    assert llm.engine.kv.pool.num_free == llm.engine.kv.pool.num_usable


def test_decoded_tokens_scored_in_one_forward_repeat_their_logprobs(cache_dir):
    """80 greedy tokens decoded one per step, then scored as generated rows of one forward
    (80 decode items in one attention call): bitwise the same logprobs. On an AVX2 CPU
    with MKL's default (non-reproducible) mode, token 30 of this copy-heavy prompt got
    other bits: the thread that computed an attention item mattered (tierlm/__init__.py)."""
    import torch

    from tierlm.bench.workloads import copy_prompt_ids

    llm = LLM("smollm2-135m", cache_dir=cache_dir, enable_prefix_caching=False)
    ids = copy_prompt_ids(llm.tokenizer)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True,
                                                                 logprobs=0))[0].outputs[0]
    scored = torch.log_softmax(llm.engine.prompt_logits(ids + out.token_ids, prompt_len=len(ids)), dim=-1)
    again = [float(scored[len(ids) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert again == [lp.logprob for lp in out.logprobs]
