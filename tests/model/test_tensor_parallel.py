"""Tensor parallelism on the bundled SmolLM2 (its 3 KV heads split 2 + 1 over 2 ranks, one
thread each): logits within 1e-4 of one process in float32, greedy tokens equal, and within
N=2 reproducible and batch-invariant; the shard plan and the refusals."""

from __future__ import annotations

import pytest
import torch

from tierlm.config import ConfigError, EngineConfig, ModelConfig
from tierlm.llm import LLM
from tierlm.parallel.shard import plan, split
from tierlm.sampling_params import SamplingParams

PROMPTS = [list(range(100, 164)), list(range(2000, 2013)), list(range(500, 531))]
GREEDY = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)


def _run(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [(list(o.outputs[0].token_ids), [(t.logprob, t.top) for t in o.outputs[0].logprobs]) for o in outs]


@pytest.fixture(scope="module")
def single():
    llm = LLM(dtype="float32", debug_invariants=False)
    logits = llm.engine.prompt_logits(PROMPTS[0])
    tokens = [t for t, _ in _run(llm, PROMPTS)]
    llm.close()
    return logits, tokens


@pytest.fixture(scope="module")
def tp2():
    llm = LLM(dtype="float32", tensor_parallel_size=2)  # debug invariants on: every step checked
    yield llm
    llm.close()


@pytest.mark.parametrize(("arch", "size"), [("qwen2", 2), ("gemma3", 2), ("gemma3", 4)])
def test_other_architectures_match_transformers(arch, size, tiny_checkpoint):
    """q/k/v bias and tied embeddings (Qwen2); q/k norms, sliding windows, soft-capping (Gemma 3);
    4 ranks over 2 KV heads: each KV head copied on the two ranks of its query heads."""
    path, hf = tiny_checkpoint(arch)
    ids = torch.randint(3, 320, (80,), generator=torch.Generator().manual_seed(7)).tolist()
    # before the module's TP=2 engine opens (one tensor-parallel engine per process)
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=size, max_num_batched_tokens=256)
    try:
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert (llm.engine.prompt_logits(ids) - ref).abs().max().item() <= 1e-4
    finally:
        llm.close()


def test_an_impossible_split_is_refused_before_any_worker_starts():
    with pytest.raises(ConfigError, match="does not divide the model's 9 attention heads"):
        LLM(dtype="float32", tensor_parallel_size=4)
    assert not torch.distributed.is_initialized()  # no group, no worker started


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_refused_before_any_worker_starts(monkeypatch):
    from tierlm.parallel import group

    def started(*args, **kwargs):
        raise AssertionError("tensor-parallel workers were started")

    monkeypatch.setattr(group.TensorGroup, "__init__", started)
    with pytest.raises(ConfigError, match="device cuda: this PyTorch build has no CUDA"):
        LLM(dtype="float32", tensor_parallel_size=2, device="cuda")


def test_logits_match_one_process_within_1e4(single, tp2):
    logits, tokens = single
    sharded = tp2.engine.prompt_logits(PROMPTS[0])
    assert sharded.shape == logits.shape == (len(PROMPTS[0]), 49152)
    assert (sharded - logits).abs().max().item() <= 1e-4
    assert [t for t, _ in _run(tp2, PROMPTS)] == tokens


def test_reproducible_and_batch_invariant(tp2):
    together = _run(tp2, PROMPTS)
    assert _run(tp2, PROMPTS) == together  # run to run: bit for bit (logprobs as floats)
    assert _run(tp2, [PROMPTS[1]]) == [together[1]]  # alone == batched (with a longer and a shorter one)


def test_the_plan_splits_kv_heads_with_their_query_heads():
    cfg = ModelConfig("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192)
    a, b = plan(cfg, 0, 2), plan(cfg, 1, 2)
    assert (a.kv_heads, a.heads, b.kv_heads, b.heads) == (range(2), range(6), range(2, 3), range(6, 9))
    assert (a.intermediate, b.intermediate, a.vocab, b.vocab) == (range(768), range(768, 1536),
                                                                  range(24576), range(24576, 49152))
    assert [len(split(10, 3, r)) for r in range(3)] == [4, 3, 3]
    with pytest.raises(ConfigError, match="does not divide the model's 9 attention heads over its 3 KV heads"):
        plan(cfg, 0, 4)
    # More ranks than KV heads: each KV head copied where its query heads go (Gemma-3-270M: 4 heads, 1 KV head).
    gemma = ModelConfig("gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18,
                        num_heads=4, num_kv_heads=1, head_dim=256, max_position_embeddings=32768)
    assert [(plan(gemma, r, 2).heads, plan(gemma, r, 2).kv_heads) for r in range(2)] == [(range(2), range(1)),
                                                                                         (range(2, 4), range(1))]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
    ({"tensor_parallel_size": 2, "quantization": "int8"}, "quantization must be auto or none"),
    ({"tensor_parallel_size": 2, "task": "embed"}, "text generation"),
])
def test_bad_tensor_parallel_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_a_second_tensor_parallel_engine_in_one_process_is_refused(tp2):
    with pytest.raises(ConfigError, match="one tensor-parallel engine per process"):
        LLM(dtype="float32", tensor_parallel_size=2)
