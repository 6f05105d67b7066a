"""Tiny random Llama / Qwen2 checkpoints: our safetensors path vs transformers, fp32."""

from __future__ import annotations

import pytest
import torch

from tierlm import LLM, SamplingParams


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """Plain argmax loop over transformers' full forward (no EOS handling, like ignore_eos)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_logits_and_greedy_match_transformers(fixture, request):
    path, hf = request.getfixturevalue(fixture)
    ids = torch.randint(3, 320, (64,), generator=torch.Generator().manual_seed(7)).tolist()
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=256)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = llm.engine.prompt_logits(ids)
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4, f"max |logit diff| {diff}"

    hf_out = hf_greedy(hf, ids, 32)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert out[0].outputs[0].token_ids == hf_out


def test_sharded_checkpoint_and_tokenizer_load(tiny_llama):
    path, _ = tiny_llama
    assert len(list(path.glob("*.safetensors"))) > 1  # the loader really walks several shards
    llm = LLM(str(path), dtype="float32")
    ids = llm.tokenizer.encode("hello world")
    assert ids[0] == 1 and llm.tokenizer.decode(ids) == "hello world"
