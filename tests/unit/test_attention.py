"""Paged attention (attention/torch_ref.py): both item layouts against a plain softmax
reference, and a decode's bits alone vs batched with a longer context."""

from __future__ import annotations

import pytest
import torch

from tierlm.attention.tiled_batch import build
from tierlm.attention.torch_ref import TorchPagedAttention, decode_layout
from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput

H, HKV, D, BS = 6, 2, 64, 16


def _decode(rid, pos, table):
    return ScheduledRequest(rid, [1], pos, [table], True, pos)


def _setup(dtype):
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(40, BS, HKV, D, generator=gen).to(dtype)
    v_cache = torch.randn(40, BS, HKV, D, generator=gen).to(dtype)
    k_cache[0] = v_cache[0] = 0  # the null block
    q = torch.randn(2, H, D, generator=gen).to(dtype)
    return k_cache, v_cache, q


def _run(reqs, q, k_cache, v_cache, layout, dtype):
    attn = TorchPagedAttention(H, HKV, D, D**-0.5, BS)
    batch = build(SchedulerOutput(reqs), BS, query_group=H // HKV, dtype=dtype, decode_layout=layout)
    # k/v of the step's own tokens: what the cache already holds at those slots
    slots = batch.attn[0].slot_mapping
    k = k_cache.view(-1, HKV, D)[slots].clone()
    v = v_cache.view(-1, HKV, D)[slots].clone()
    return attn.forward(q[: len(reqs)], k, v, k_cache, v_cache, batch.attn[0])


@pytest.mark.parametrize("whole", [True, False])
def test_layouts_match_softmax_reference(whole):
    dtype = torch.float32
    k_cache, v_cache, q = _setup(dtype)
    tables = [list(range(1, 17)), list(range(20, 24))]
    reqs = [_decode("a", 200, tables[0]), _decode("b", 40, tables[1])]
    out = _run(reqs, q, k_cache, v_cache, (1, whole), dtype)
    for i, (r, table) in enumerate(zip(reqs, tables)):
        ctx = r.start + 1
        keys = k_cache[table].reshape(-1, HKV, D)[:ctx].repeat_interleave(H // HKV, dim=1)
        values = v_cache[table].reshape(-1, HKV, D)[:ctx].repeat_interleave(H // HKV, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i], keys) * D**-0.5
        ref = torch.einsum("ht,thd->hd", scores.softmax(-1), values).reshape(-1)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def test_decode_bits_do_not_depend_on_a_longer_neighbour():
    dtype = torch.bfloat16
    layout = decode_layout(H // HKV, HKV, D, dtype)
    k_cache, v_cache, q = _setup(dtype)
    b = _decode("b", 40, [20, 21, 22])
    alone = _run([b], q[1:], k_cache, v_cache, layout, dtype)
    for pos in (130, 300, 600):  # one to five key tiles longer than b's context
        a = _decode("a", pos, list(range(1, 1 + pos // BS + 1)))
        both = _run([a, b], q, k_cache, v_cache, layout, dtype)
        assert torch.equal(both[1], alone[0]), pos
