"""The compiled whole-step decoder (kernels/csrc/decoder.cpp) against the Python loop of
the same kernels (models/fused.py `_loop`), on both bundled models: the same logits bit
for bit, for prompt rows and generated rows, past Gemma-3's 512-token sliding window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tierlm import LLM

TEXT = (Path(__file__).parents[2] / "benchmarks" / "data" / "gfdl-1.3.txt").read_text()


@pytest.mark.parametrize("model,tokens", [("smollm2-135m", 300),
                                          pytest.param("gemma3-270m", 600, marks=pytest.mark.slow)])
def test_compiled_decoder_equals_the_python_loop(model, tokens, cache_dir):
    llm = LLM(model, cache_dir=cache_dir, max_num_batched_tokens=256)
    fused = llm.engine.runner.fused
    if fused is None or fused.native is None:
        pytest.skip("needs the compiled kernels")
    ids = llm.tokenizer.encode(TEXT)[:tokens]
    compiled = llm.engine.prompt_logits(ids, prompt_len=tokens - 40)
    native, fused.native = fused.native, None
    try:
        loop = llm.engine.prompt_logits(ids, prompt_len=tokens - 40)
    finally:
        fused.native = native
    assert compiled.shape == (tokens, llm.engine.model_config.vocab_size)
    assert torch.equal(compiled, loop)
