"""LoRA over the bundled SmolLM2 (GGUF Q4_1 on tierlm's kernels, the fused C++ decoder):
adapters made with peft batch with each other and the base model with every request's
bits unchanged, the compiled decoder equals its Python loop with adapters on, and greedy
output equals transformers running peft's merged model in float32."""

from __future__ import annotations

import pytest

from tests.lora.adapters import make_adapter, smollm2_skeleton
from tierlm import LLM, LoRARequest, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,", "The three laws of"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol-adapters")
    base = smollm2_skeleton()
    specs = [{}, {"targets": ("q_proj", "k_proj", "v_proj", "o_proj")}, {"targets": ("gate_proj", "down_proj"), "r": 16}]
    for i, spec in enumerate(specs):
        make_adapter(base, root / f"s{i}", seed=40 + i, b_scale=0.5, **spec)
    return [LoRARequest(f"s{i}", i + 1, str(root / f"s{i}")) for i in range(len(specs))]


@pytest.fixture(scope="module")
def llm(cache_dir):
    return LLM("smollm2-135m", cache_dir=cache_dir, enable_lora=True, max_loras=3, max_lora_rank=16)


def test_mixed_batch_on_the_fused_decoder_equals_solo_runs(llm, adapters):
    if llm.engine.runner.fused is None:
        pytest.skip("the model is not on the fused kernels")
    requests = [None, *adapters, adapters[0]]
    prompts = [p for p in PROMPTS] + [PROMPTS[0]]
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=3, logprobs=1, ignore_eos=True)
    batch = llm.generate(prompts, params, lora_request=requests)
    firsts = set()
    for prompt, lora, together in zip(prompts, requests, batch):
        alone = llm.generate([prompt], params, lora_request=lora)[0].outputs[0]
        assert alone.token_ids == together.outputs[0].token_ids
        assert alone.logprobs == together.outputs[0].logprobs
    for lora in requests[:4]:  # one prompt under every adapter: each changes the numbers
        out = llm.generate([PROMPTS[0]], params, lora_request=lora)[0].outputs[0]
        firsts.add(round(out.logprobs[0].logprob, 6))
    assert len(firsts) == 4


def test_compiled_decoder_equals_the_python_loop_with_adapters(llm, adapters):
    fused = llm.engine.runner.fused
    if fused is None or fused.native is None:
        pytest.skip("needs the compiled kernels")
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)
    requests = [adapters[0], None, adapters[2]]
    compiled = llm.generate(PROMPTS[:3], params, lora_request=requests)
    native, fused.native = fused.native, None
    try:
        loop = llm.generate(PROMPTS[:3], params, lora_request=requests)
    finally:
        fused.native = native
    for a, b in zip(compiled, loop):
        assert a.outputs[0].logprobs == b.outputs[0].logprobs


@pytest.mark.slow
def test_greedy_equals_transformers_with_the_merged_adapter(cache_dir, hf_gguf, tmp_path):
    from tests.model.test_gguf_vs_transformers import hf_greedy

    hf = hf_gguf("smollm2-135m")
    merged = make_adapter(hf, tmp_path / "m", seed=7, b_scale=0.5).merge_and_unload().eval()
    llm = LLM("smollm2-135m", dtype="float32", cache_dir=cache_dir, enable_lora=True, max_lora_rank=8)
    lora = LoRARequest("m", 1, str(tmp_path / "m"))
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = llm.generate([{"prompt_token_ids": i} for i in ids], greedy, lora_request=lora)
    base = llm.generate([{"prompt_token_ids": ids[0]}], greedy)
    assert base[0].outputs[0].token_ids != ours[0].outputs[0].token_ids  # the adapter matters here
    for i, out in zip(ids, ours):
        assert out.outputs[0].token_ids == hf_greedy(merged, i, 24)
