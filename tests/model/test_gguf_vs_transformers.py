"""Bundled GGUFs (SmolLM2: Llama arch, byte-level BPE; Gemma 3: sliding/global layers,
SentencePiece vocab): greedy output identical to transformers loading the same file (fp32)."""

from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Translate to French: I love reading books."]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_greedy_matches_transformers(model, cache_dir, hf_gguf):
    hf_model = hf_gguf(model)
    llm = LLM(model, dtype="float32", cache_dir=cache_dir)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    ours = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ids, out in zip(prompts, ours):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, ids, 32)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Argmax decoding with transformers' KV cache, ignoring EOS (as ignore_eos does)."""
    out_ids = []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            out_ids.append(tok)
            out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return out_ids
