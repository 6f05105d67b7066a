"""The default path (bf16 activations, the GGUF's quantized weights) against an
independent reference: transformers in fp32 on the same GGUF and the same token ids.
Both of a layer's formats are checked: prompt rows (dense copies) and generated rows
(the int4 / int8 kernels), each scoring every position of 2 x 512 tokens of a fixed
text. Targets: perplexity within 1% of the reference, the same top-1 token at >= 95%
of positions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tierlm import LLM

TEXT = (Path(__file__).parents[2] / "benchmarks" / "data" / "gfdl-1.3.txt").read_text()
WINDOW, WINDOWS = 512, 2

# Measured on the AVX-512 machine: Gemma's Q5_0, Q6_K and Q8_0 tensors (most projections,
# and the tied embedding / output layer) run requantized to int8 per output channel, and
# its Q4_K blocks with bf16 scales; that loses top-1 agreement (~94% on generated rows, 92-97% per window on
# both formats), while the same bf16 compute on the file's exact weights
# (quantization="none", below) agrees at 96-98%. The own-kernels work runs the GGUF
# blocks as they are and must turn this xfail into a pass (strict: a pass fails here).
GEMMA_REQUANTIZED = pytest.mark.xfail(strict=True, reason="int8 requantization of Q5_0 / Q6_K / Q8_0 "
                                                          "tensors and bf16 Q4_K scales cost top-1 "
                                                          "agreement on Gemma-3")


def totals(logits: torch.Tensor, ref: torch.Tensor, ids: list[int]) -> tuple[float, int, int]:
    """(negative log-likelihood, positions, positions whose top-1 equals the reference's)."""
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    nll = -float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    return nll, len(ids) - 1, int((logits[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())


@pytest.mark.parametrize("model,quantization", [
    ("smollm2-135m", "auto"),
    pytest.param("gemma3-270m", "auto", marks=GEMMA_REQUANTIZED),
    ("gemma3-270m", "none"),
])
def test_bf16_path_tracks_fp32_transformers(model, quantization, cache_dir, hf_gguf):
    llm = LLM(model, cache_dir=cache_dir, quantization=quantization, max_num_batched_tokens=WINDOW)
    ids = llm.tokenizer.encode(TEXT)
    hf = hf_gguf(model)
    sums = {"reference": [0.0, 0, 0], "prompt rows": [0.0, 0, 0], "generated rows": [0.0, 0, 0]}
    for i in range(WINDOWS):
        chunk = ids[i * WINDOW:(i + 1) * WINDOW]
        with torch.no_grad():
            ref = hf(torch.tensor([chunk])).logits[0].float()
        for name, logits in (("reference", ref), ("prompt rows", llm.engine.prompt_logits(chunk)),
                             ("generated rows", llm.engine.prompt_logits(chunk, prompt_len=1))):
            for k, v in enumerate(totals(logits, ref, chunk)):
                sums[name][k] += v
    ref_ppl = math.exp(sums["reference"][0] / sums["reference"][1])
    for name in ("prompt rows", "generated rows"):
        nll, n, agree = sums[name]
        ppl = math.exp(nll / n)
        assert abs(ppl / ref_ppl - 1) <= 0.01, (name, ppl, ref_ppl)
        assert agree / n >= 0.95, (name, agree / n)
