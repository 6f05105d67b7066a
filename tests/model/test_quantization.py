"""`--quantization int8|int4` on HF checkpoints, against transformers running the very
weights the kernels see (each linear weight replaced by its quantized-then-dequantized
value): prompt rows (dense copies) and generated rows (the int8/int4 kernels) both match
it to bf16 precision, and a multi-turn follow-up reads no KV computed in the other format."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tierlm import LLM, SamplingParams
from tierlm.layers import quant
from tierlm.layers.linear import Linear

TOKENS = torch.randint(3, 320, (48,), generator=torch.Generator().manual_seed(5)).tolist()


def as_kernel_sees(w: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "int8":
        return quant.Int8Weight(w).dequantize()
    if not quant.int4_fits(*w.shape):
        return w  # stays dense (the int4 kernel's shape rules)
    return quant.Int4Weight(quant.quantize_q4(w)).dequantize()


def quantized_reference(hf: nn.Module, kind: str) -> nn.Module:
    ref = copy.deepcopy(hf)
    embed = ref.get_input_embeddings().weight
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear):
            w = m.weight.detach().clone()
            w = as_kernel_sees(w, "int8" if name.endswith("lm_head") else kind)  # output layer: int8
            m.weight = nn.Parameter(w)  # unties lm_head from the embeddings, which stay exact
    assert ref.get_input_embeddings().weight is embed
    return ref.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_prompt_and_generated_rows_match_transformers_on_the_quantized_weights(arch, kind, tiny_checkpoint,
                                                                               monkeypatch):
    path, hf = tiny_checkpoint(arch)
    llm = LLM(str(path), quantization=kind, max_num_batched_tokens=256)
    formats = llm.engine.loaded.formats
    assert formats.get(kind, 0) + formats.get("int8", 0) > 0
    ref_model = quantized_reference(hf, kind)
    with torch.no_grad():
        ref = ref_model(torch.tensor([TOKENS])).logits[0]
        plain = hf(torch.tensor([TOKENS])).logits[0]
    scale = ref.abs().max().item()
    calls = {"dense": 0, "kernel": 0}

    def spy(role, real):  # counts the rows each format runs (a dense layer has only the one)
        def run(self, x):
            if role == "kernel" or self.quantized is not None:
                calls[role] += x.shape[0]
            return real(self, x)
        return run

    monkeypatch.setattr(Linear, "_dense", spy("dense", Linear._dense))
    for cls in (quant.Int4Weight, quant.Int8Weight):
        monkeypatch.setattr(cls, "mm", spy("kernel", cls.mm))
    generated_rows = llm.engine.prompt_logits(TOKENS, prompt_len=0)
    assert calls["dense"] == 0 and calls["kernel"] > 0  # generated rows: quantized kernels only
    calls["kernel"] = 0
    prompt_rows = llm.engine.prompt_logits(TOKENS)
    assert calls["dense"] > 0 and calls["kernel"] == 0  # prompt rows: dense copies only
    for got in (prompt_rows, generated_rows):
        assert (got - ref).abs().max().item() <= 0.015 * scale
    if kind == "int4":  # the reference really differs from the unquantized model
        assert (plain - ref).abs().max().item() > 0.04 * scale


def test_follow_up_turn_reads_no_kv_computed_in_the_decode_format(cache_dir):
    """Turn 2's prompt contains turn 1's output: with prefix caching its blocks must be
    recomputed as prompt tokens, giving exactly what a cache-less engine gives."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=1)
    first_prompt = {"prompt_token_ids": TOKENS[:21]}

    def turns(llm):
        out = llm.generate(first_prompt, params)[0].outputs[0]
        follow = {"prompt_token_ids": TOKENS[:21] + out.token_ids + TOKENS[:5]}
        second = llm.generate(follow, params)[0].outputs[0]
        return out.token_ids, second.token_ids, [lp.logprob for lp in second.logprobs]

    cached = LLM("smollm2-135m", cache_dir=cache_dir)
    assert turns(cached) == turns(LLM("smollm2-135m", cache_dir=cache_dir, enable_prefix_caching=False))
    assert cached.engine.scheduler.prefix_hits > 0  # the first turn's prompt blocks were reused
