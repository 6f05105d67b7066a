"""The default path (bf16 activations, the GGUF's quantized weights) against an
independent reference: transformers in fp32 on the same GGUF and the same token ids,
scoring every position of 512 tokens of a fixed text (128 on the slow dense PyTorch path), computed as prompt rows and as generated rows. Targets: perplexity within 1% of the reference, the same top-1 token
at >= 95% of positions. On tierlm's kernels (the bundled GGUFs' default) both ways give
the same bits: one numeric format for every token. quantization="none" (dense bf16 on
the file's dequantized weights) runs the PyTorch path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tierlm import LLM

TEXT = (Path(__file__).parents[2] / "benchmarks" / "data" / "gfdl-1.3.txt").read_text()
WINDOW, WINDOWS = 512, 1

def totals(logits: torch.Tensor, ref: torch.Tensor, ids: list[int]) -> tuple[float, int, int]:
    """(negative log-likelihood, positions, positions whose top-1 equals the reference's)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    return nll, len(ids) - 1, int((logits[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())


@pytest.mark.parametrize("model,quantization", [
    ("smollm2-135m", "auto"),
    ("gemma3-270m", "auto"),
    ("gemma3-270m", "none"),
])
@pytest.mark.slow
def test_bf16_path_tracks_fp32_transformers(model, quantization, cache_dir, hf_gguf):
    # The dense path runs PyTorch's GEMMs (minutes for 1,024 rows on an AVX2 CPU): a shorter text.
    window, windows = (WINDOW, WINDOWS) if quantization == "auto" else (WINDOW // 4, 1)
    llm = LLM(model, cache_dir=cache_dir, quantization=quantization, max_num_batched_tokens=window)
    ids = llm.tokenizer.encode(TEXT)
    hf = hf_gguf(model)
    sums = {"reference": [0.0, 0, 0], "prompt rows": [0.0, 0, 0], "generated rows": [0.0, 0, 0]}
    for i in range(windows):
        chunk = ids[i * window:(i + 1) * window]
        with torch.no_grad():
            ref = hf(torch.tensor([chunk])).logits[0].float()
        as_prompt, as_generated = llm.engine.prompt_logits(chunk), llm.engine.prompt_logits(chunk, prompt_len=1)
        if llm.engine.loaded.kernels:
            assert torch.equal(as_prompt, as_generated)
        for name, logits in (("reference", ref), ("prompt rows", as_prompt), ("generated rows", as_generated)):
            for k, v in enumerate(totals(logits, ref, chunk)):
                sums[name][k] += v
    ref_ppl = math.exp(sums["reference"][0] / sums["reference"][1])
    for name in ("prompt rows", "generated rows"):
        nll, n, agree = sums[name]
        ppl = math.exp(nll / n)
        assert abs(ppl / ref_ppl - 1) <= 0.01, (name, ppl, ref_ppl)
        assert agree / n >= 0.95, (name, agree / n)
