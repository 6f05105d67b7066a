"""Offline LLM API on the bundled model: outputs, n, stop strings, chat, errors, abort."""

from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams
from tierlm.engine.llm_engine import InvalidRequest


@pytest.fixture(scope="module")
def llm(cache_dir):
    return LLM("smollm2-135m", cache_dir=cache_dir, max_model_len=256)


def test_generate_shapes_and_order(llm):
    prompts = ["The sky is", {"prompt_token_ids": llm.tokenizer.encode("Water is")}, "Cats are"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, logprobs=2))
    assert [o.prompt for o in outs] == ["The sky is", None, "Cats are"]
    for o in outs:
        c = o.outputs[0]
        assert o.finished and len(c.token_ids) <= 8 and c.finish_reason in ("stop", "length")
        assert c.text == llm.tokenizer.decode(c.token_ids)
        assert len(c.logprobs) == len(c.token_ids) and all(len(lp.top) == 2 for lp in c.logprobs)
        assert all(lp.logprob <= lp.top[0][1] + 1e-6 for lp in c.logprobs)


def test_n_samples_differ_and_are_seeded(llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=7)
    a = llm.generate("Tell me a story:", p)[0]
    b = llm.generate("Tell me a story:", p)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    assert [c.index for c in a.outputs] == [0, 1, 2]


def test_stop_string_truncates(llm):
    free = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].text
    stop = free[3:6]
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free[: free.index(stop)]


def test_chat(llm):
    """chat() is generate() on the chat template's tokens; the greedy answer is the model's.
    (France is a near tie for this model under int8 activations: llama.cpp and tierlm both
    start "L'Étoile", fp32 transformers "The capital": Germany is not.)"""
    messages = [{"role": "user", "content": "What is the capital of Germany?"}]
    params = SamplingParams(temperature=0, max_tokens=16)
    out = llm.chat(messages, params)[0].outputs[0]
    ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    assert out.token_ids == llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    assert "Berlin" in out.text


@pytest.mark.parametrize("prompt,params,param", [
    ("", SamplingParams(), "prompt"),
    ({"prompt_token_ids": [1, 999999]}, SamplingParams(), "prompt"),
    ("x " * 300, SamplingParams(), "prompt"),
    ("hi", SamplingParams(max_tokens=400), "max_tokens"),
    ("hi", SamplingParams(logit_bias={10**7: 1.0}), "logit_bias"),
])
def test_invalid_requests(llm, prompt, params, param):
    with pytest.raises(InvalidRequest) as e:
        llm.generate(prompt, params)
    assert e.value.param == param


def test_abort_frees_blocks(llm):
    eng = llm.engine
    eng.add_request("long", "Write a long essay about the sea.", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.kv.pool.num_free < eng.kv.pool.num_usable
    eng.abort_request("long")
    assert not eng.has_unfinished_requests()
    eng.kv.check_integrity()
    assert eng.kv.pool.num_free == eng.kv.pool.num_usable
