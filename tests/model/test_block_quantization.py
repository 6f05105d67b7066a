"""`--quantization q8_0|q4_0`: an HF checkpoint quantized on load to GGUF blocks (by gguf's
reference quantizer) and run on tierlm's kernels, as a GGUF file of those formats runs.

Against transformers running the very weights the kernels see (every projection replaced
by its blocks' dequantized values, embedding and output layer by their Q8_0 values): the
logits agree to what int8 activations cost, prompt and generated rows give the same bits,
a row's logits do not depend on its batch, and bad input is one clear error."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import nn

from tierlm import LLM, SamplingParams
from tierlm.config import ConfigError
from tierlm.loader import weights

TOKENS = torch.randint(3, 320, (48,), generator=torch.Generator().manual_seed(5)).tolist()
TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def round_trip(w: torch.Tensor, ggml_type: GGMLQuantizationType) -> torch.Tensor:
    raw = quantize(w.detach().float().numpy(), ggml_type)
    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, ggml_type))).reshape(w.shape)


def as_kernels_see(hf: nn.Module, kind: str) -> nn.Module:
    """transformers on the blocks' values: projections in `kind`, embedding and head Q8_0."""
    ref = copy.deepcopy(hf)
    head_type = GGMLQuantizationType.Q8_0
    embed = ref.get_input_embeddings()
    tied = ref.get_output_embeddings().weight is embed.weight
    embed.weight = nn.Parameter(round_trip(embed.weight, head_type))
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in weights._PROJECTIONS:
            m.weight = nn.Parameter(round_trip(m.weight, TYPES[kind]))
    if tied:
        ref.get_output_embeddings().weight = embed.weight
    else:
        head = ref.get_output_embeddings()
        head.weight = nn.Parameter(round_trip(head.weight, head_type))
    return ref.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_hf_checkpoint_on_the_kernels_matches_transformers_on_its_blocks(arch, kind, tiny_checkpoint):
    path, hf = tiny_checkpoint(arch)
    llm = LLM(str(path), quantization=kind, max_num_batched_tokens=256)
    loaded = llm.engine.loaded
    assert loaded.kernels and set(loaded.formats) == {"gguf-blocks"} and llm.engine.runner.fused is not None
    ref_model = as_kernels_see(hf, kind)
    with torch.no_grad():
        ref = ref_model(torch.tensor([TOKENS])).logits[0]
        plain = hf(torch.tensor([TOKENS])).logits[0]
    scale = ref.abs().max().item()
    prompt_rows = llm.engine.prompt_logits(TOKENS)
    generated_rows = llm.engine.prompt_logits(TOKENS, prompt_len=1)
    assert torch.equal(prompt_rows, generated_rows)  # one format for every row
    # What int8 activations (per 32 values) cost; Gemma's four norms per layer, GELU and
    # sqrt(hidden) embedding scale amplify it (its bundled file stays within 1% perplexity
    # of fp32 on the same kernels: test_reference_quality).
    assert (prompt_rows - ref).abs().max().item() <= (0.045 if arch == "gemma3" else 0.015) * scale
    assert (prompt_rows.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    if kind == "q4_0":  # the reference really differs from the unquantized model
        assert (plain - ref).abs().max().item() > 0.02 * scale


def test_a_row_has_the_same_bits_alone_and_in_a_batch(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    llm = LLM(str(path), quantization="q4_0", max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": TOKENS[i:i + 9 + i]} for i in range(6)]
    batched = llm.generate(prompts, params)
    for prompt, together in zip(prompts, batched):
        alone = llm.generate(prompt, params)[0].outputs[0]
        assert alone.token_ids == together.outputs[0].token_ids
        assert [lp.logprob for lp in alone.logprobs] == [lp.logprob for lp in together.outputs[0].logprobs]


def test_a_gguf_file_is_refused(cache_dir):
    with pytest.raises(ConfigError, match="a GGUF file runs its own block formats"):
        LLM("smollm2-135m", cache_dir=cache_dir, quantization="q8_0")


def test_rows_that_are_not_whole_blocks_are_one_clear_error(tiny_checkpoint):
    path, _ = tiny_checkpoint("qwen2_moe")  # experts' down projections take rows of 48 values
    with pytest.raises(weights.WeightsError, match="rows of 48 values.*multiple of 32"):
        LLM(str(path), quantization="q8_0")
