"""Rotary embeddings: the sign-folded half swap gives HF's rotate-half result bit for bit."""

from __future__ import annotations

import pytest
import torch

from tierlm.layers.rotary import RotaryEmbedding


def _hf_rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotation_matches_rotate_half_bitwise(dtype):
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(64, 512, 10000.0, None)
    pos = torch.randint(0, 512, (37,), generator=gen)
    q, k = torch.randn(37, 9, 64, generator=gen).to(dtype), torch.randn(37, 3, 64, generator=gen).to(dtype)
    got_q, got_k = rope(pos, q, k)
    cos, sin = rope.cos[pos].unsqueeze(1).to(dtype), rope.sin[pos].unsqueeze(1).to(dtype)
    assert torch.equal(got_q, _hf_rotate(q, cos, sin)) and torch.equal(got_k, _hf_rotate(k, cos, sin))
