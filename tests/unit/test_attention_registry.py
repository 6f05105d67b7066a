"""Attention backends plug in through attention/registry.py: the model files receive a
backend in their constructor and never name one."""

from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams
from tierlm.attention import registry
from tierlm.attention.kernel import KernelPagedAttention
from tierlm.attention.torch_ref import TorchPagedAttention


class CountingAttention(TorchPagedAttention):
    """A third backend: the reference's arithmetic, counting the layers it served."""

    name = "counting"
    calls = 0

    def forward(self, *args, **kwargs):
        CountingAttention.calls += 1
        return super().forward(*args, **kwargs)


def test_a_new_backend_serves_a_model_without_touching_its_file(tiny_llama, monkeypatch):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    plain = LLM(str(tiny_llama[0]), dtype="float32").generate(prompt, params)[0].outputs[0].token_ids
    monkeypatch.setitem(registry.BACKENDS, "torch", CountingAttention)
    llm = LLM(str(tiny_llama[0]), dtype="float32")
    assert isinstance(llm.engine.runner.attention, CountingAttention)
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == plain
    assert CountingAttention.calls >= 6 * 3  # every step, every layer (3 in the tiny model)


def test_the_choice_follows_the_weights_and_the_device():
    assert registry.BACKENDS[registry.choose(on_kernels=True)] is KernelPagedAttention
    assert registry.BACKENDS[registry.choose(on_kernels=False)] is TorchPagedAttention
    assert registry.choose(on_kernels=False, device="cuda") == "paged"
    assert registry.choose(on_kernels=True, asked="paged") == "paged"
    with pytest.raises(ValueError, match="no attention backend for device 'mps'"):
        registry.choose(on_kernels=False, device="mps")
