"""LoRA numerics against peft: each adapter's greedy output equals peft's merged model
(W + scale * B A) in float32, and a request's tokens and logprobs are the same bits alone
and in a batch with other adapters (and none), through slot eviction."""

from __future__ import annotations

import pytest
import torch

from tests.lora.adapters import make_adapter
from tierlm import LLM, LoRARequest, SamplingParams

PROMPT = [5, 9, 33, 100, 7, 8, 200, 17, 44, 45, 46, 3, 99, 120, 18, 64, 65, 66, 67, 1]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Three adapters over the tiny Llama (one on q/v only, one with rsLoRA and per-module
    ranks): (LoRARequest, peft's merged model) each."""
    _, hf = tiny_llama
    root = tmp_path_factory.mktemp("adapters")
    configs = [{}, {"targets": ("q_proj", "v_proj"), "r": 4}, {"use_rslora": True, "rank_pattern": {"down_proj": 2}}]
    out = []
    for i, cfg in enumerate(configs):
        model = make_adapter(hf, root / f"a{i}", seed=20 + i, b_scale=2.0, **cfg)
        out.append((LoRARequest(f"a{i}", i + 1, str(root / f"a{i}")), model.merge_and_unload().eval()))
    return out


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8)


def _greedy_logprobs(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    toks, lps = [], []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            tok = int(logits.argmax())
            toks.append(tok)
            lps.append(float(torch.log_softmax(logits, -1)[tok]))
            seq.append(tok)
    return toks, lps


PARAMS = SamplingParams(max_tokens=12, temperature=0, logprobs=0, ignore_eos=True)


def test_each_adapter_equals_peft_merged_model(llm, adapters, tiny_llama):
    requests = [None] + [r for r, _ in adapters]
    models = [tiny_llama[1]] + [m for _, m in adapters]
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * len(requests), PARAMS, lora_request=requests)
    texts = set()
    for out, model in zip(outs, models):
        want_toks, want_lps = _greedy_logprobs(model, PROMPT, 12)
        got = out.outputs[0]
        assert got.token_ids == want_toks
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in got.logprobs]), torch.tensor(want_lps),
                                   rtol=1e-4, atol=1e-4)
        texts.add(tuple(got.token_ids))
    assert len(texts) == len(requests)  # every adapter really changes the output


def test_mixed_batch_equals_solo_runs_through_eviction(llm, adapters):
    requests = [None, adapters[0][0], adapters[1][0], adapters[2][0], None, adapters[0][0]]
    prompts = [{"prompt_token_ids": PROMPT[: 8 + i]} for i in range(len(requests))]
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=7, logprobs=2, ignore_eos=True)
    batch = llm.generate(prompts, sampled, lora_request=requests)  # 3 adapters, 2 slots: one waits
    for prompt, lora, together in zip(prompts, requests, batch):
        alone = llm.generate([prompt], sampled, lora_request=lora)[0].outputs[0]
        assert alone.token_ids == together.outputs[0].token_ids
        assert alone.logprobs == together.outputs[0].logprobs  # bit for bit, alternatives included
    assert llm.engine.scheduler.lora_slots.loads_total >= 3


def test_prefix_cache_is_keyed_by_adapter(llm, adapters):
    prompt = {"prompt_token_ids": list(range(40, 120))}
    one = SamplingParams(max_tokens=1, temperature=0)
    a, b = adapters[0][0], adapters[1][0]
    assert llm.generate([prompt], one, lora_request=a)[0].num_cached_tokens == 0
    assert llm.generate([prompt], one, lora_request=b)[0].num_cached_tokens == 0  # A's KV is not B's
    assert llm.generate([prompt], one)[0].num_cached_tokens == 0  # nor the base model's
    assert llm.generate([prompt], one, lora_request=a)[0].num_cached_tokens >= 64


def test_offline_errors_are_clear(tiny_llama, llm, adapters, tmp_path):
    from tierlm.engine.llm_engine import InvalidRequest

    plain = LLM(str(tiny_llama[0]), dtype="float32", kv_cache_gb=0.05)
    with pytest.raises(InvalidRequest, match="not enabled"):
        plain.generate([PROMPT], PARAMS, lora_request=adapters[0][0])
    with pytest.raises(InvalidRequest, match="not a directory"):
        llm.generate([PROMPT], PARAMS, lora_request=LoRARequest("missing", 9, str(tmp_path / "nope")))
    with pytest.raises(InvalidRequest, match="already loaded from"):
        llm.generate([PROMPT], PARAMS, lora_request=LoRARequest("a0", 1, adapters[1][0].lora_path))
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate([PROMPT, PROMPT], PARAMS, lora_request=[None])


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "qwen3", "mistral"])
def test_other_architectures_equal_peft_merged_models(tiny_checkpoint, tmp_path, arch):
    """Gemma 3 (sliding layers, its norms), Qwen2 (q/k/v bias), Qwen3 (q/k norms), Mistral."""
    path, hf = tiny_checkpoint(arch)
    merged = make_adapter(hf, tmp_path / "a", seed=3, b_scale=2.0).merge_and_unload().eval()
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_lora_rank=8, kv_cache_gb=0.05)
    lora = LoRARequest("a", 1, str(tmp_path / "a"))
    got = llm.generate([{"prompt_token_ids": PROMPT}], PARAMS, lora_request=lora)[0].outputs[0].token_ids
    assert got == _greedy_logprobs(merged, PROMPT, 12)[0]
    assert got != llm.generate([{"prompt_token_ids": PROMPT}], PARAMS)[0].outputs[0].token_ids
