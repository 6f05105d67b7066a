"""layers/moe.py: routing ties, renormalisation, and per-token results independent of
batch composition and token order (module level, random weights, bf16 and fp32)."""

from __future__ import annotations

import pytest
import torch

from tierlm.config import MoEConfig
from tierlm.layers.moe import SparseMoE, route


def test_ties_go_to_the_lowest_expert_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5], [2.0, 2.0, 2.0, 2.0, 2.0]])
    experts, weights = route(logits, 2, renormalize=False)
    assert experts.tolist() == [[1, 2], [0, 1]]
    assert torch.allclose(weights[1], torch.full((2,), 0.2))
    _, renorm = route(logits, 2, renormalize=True)
    assert torch.allclose(renorm.sum(-1), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared", [0, 24])
def test_token_outputs_independent_of_batch_and_order(dtype, shared):
    torch.manual_seed(0)
    moe = SparseMoE(32, MoEConfig(num_experts=8, top_k=2, intermediate_size=16, norm_topk_prob=not shared,
                                  shared_intermediate_size=shared), "silu", deterministic=True)
    for p in moe.parameters():
        p.data = torch.randn_like(p).to(dtype)
    x = torch.randn(40, 32).to(dtype)
    with torch.no_grad():
        full = moe(x)
        perm = torch.randperm(40)
        shuffled = moe(x[perm])
        pieces = torch.cat([moe(x[i : i + n]) for i, n in ((0, 1), (1, 7), (8, 32))])
    assert torch.equal(shuffled, full[perm])
    assert torch.equal(pieces, full)
    assert int(moe.expert_tokens.sum()) == 3 * 40 * 2  # three passes, two experts per token
