"""Device choice and the CUDA path's device-neutral parts, on a machine without CUDA:
`--device` resolution and refusals, the KV budget arithmetic of --gpu-memory-utilization,
CUDA-graph batch sizes and decode-step recognition, the int4 kernel's K tiling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tierlm import LLM
from tierlm.config import CacheConfig, ConfigError, EngineConfig, LoRAConfig
from tierlm.device import CPU, cuda_refusal, engine_device, resolve
from tierlm.layers.quant import cuda_int4_fits, inner_k_tiles
from tierlm.runner.cuda_graphs import capture_sizes
from tierlm.runner.gpu_memory import MemoryProfile, kv_budget

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@no_cuda
def test_auto_and_cpu_resolve_to_the_cpu_and_cuda_is_refused_in_one_line():
    assert resolve("auto") == CPU and resolve("cpu") == CPU
    assert engine_device(EngineConfig()) == CPU and engine_device(EngineConfig(device="auto")) == CPU
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as e:
            resolve(spec)
        assert str(e.value) == f"device {spec}: this PyTorch build has no CUDA (use --device cpu)"
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"):
        resolve("cuda:x")


def test_config_validates_device_memory_share_and_backend():
    for bad, msg in (({"device": "gpu"}, "device must be"), ({"gpu_memory_utilization": 0}, "in \\(0, 1\\]"),
                     ({"gpu_memory_utilization": 1.01}, "in \\(0, 1\\]"), ({"attention_backend": "flash"}, "paged"),
                     ({"gpu_memory_utilization": float("nan")}, "in \\(0, 1\\]"),
                     ({"attention_backend": "paged", "cache": CacheConfig(kv_cache_dtype="int8")},
                      "kv_cache_dtype int8 is not read by attention_backend paged")):
        with pytest.raises(ConfigError, match=msg):
            EngineConfig(**bad)
    assert EngineConfig(device="cuda:3", gpu_memory_utilization=1.0).device == "cuda:3"


def test_options_cuda_does_not_run_are_named():
    base = EngineConfig(device="cuda")
    assert cuda_refusal(base) is None
    cases = [({"tensor_parallel_size": 2, "quantization": "none"}, "--data-parallel-size"),
             ({"lora": LoRAConfig(enabled=True)}, "LoRA"), ({"task": "embed"}, "embedding"),
             ({"draft_model": "x", "scheduler": dataclasses.replace(base.scheduler, num_speculative_tokens=2)}, "draft"),
             ({"quantization": "int8"}, "quantization int8 runs on CPU kernels"),
             ({"quantization": "q4_0"}, "on CUDA use auto, int4 or none")]
    for change, needle in cases:
        assert needle in cuda_refusal(dataclasses.replace(base, **change))
    int8_kv = dataclasses.replace(base, cache=dataclasses.replace(base.cache, kv_cache_dtype="int8"))
    assert "int8 KV cache" in cuda_refusal(int8_kv)


def test_kv_budget_is_what_the_share_leaves():
    gib = 2**30
    profile = MemoryProfile(total=80 * gib, peak=10 * gib, others=gib // 2, activations=2 * gib)
    block = 4 * 2**20
    # 0.9 * 80 = 72 GiB - 10 - 0.5 = 61.5 GiB of KV
    assert kv_budget(profile, 0.9, block) == int(72 * gib - 10.5 * gib) // block
    assert kv_budget(profile, 0.9, block, graph_reserve=profile.activations) == int(72 * gib - 12.5 * gib) // block
    with pytest.raises(ConfigError, match="gpu_memory_utilization 0.1: 8.00 GiB leaves no room"):
        kv_budget(profile, 0.1, block)


def test_graph_sizes_cover_every_batch():
    assert capture_sizes(1) == (1,)
    assert capture_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert capture_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    for top in (1, 7, 32, 48, 256):
        sizes = capture_sizes(top)
        assert all(any(s >= n for s in sizes) for n in range(1, top + 1)) and max(sizes) == top


def test_int4_k_tiling():
    assert inner_k_tiles(576) == 4 and inner_k_tiles(1536) == 8 and inner_k_tiles(640) == 8 and inner_k_tiles(96) == 2
    assert cuda_int4_fits(576, 1536) and not cuda_int4_fits(100, 576) and not cuda_int4_fits(64, 48)


def test_block_quantization_is_refused_off_the_kernels(tiny_checkpoint):
    path, _ = tiny_checkpoint("llama")
    with pytest.raises(ConfigError, match="quantization q8_0 runs on tierlm's CPU kernels, not on device cpu or "
                                          "the paged attention backend"):
        LLM(str(path), quantization="q8_0", attention_backend="paged")


@no_cuda
def test_replicas_take_one_gpu_each_on_cuda():
    from tierlm.scale import cluster

    assert cluster.gpus_per_replica(EngineConfig(device="cpu")) == 0
    assert cluster.gpus_per_replica(EngineConfig(device="auto")) == 0  # on a machine without CUDA
    on_gpu = EngineConfig(device="cuda:1")
    assert cluster.gpus_per_replica(on_gpu) == 1 and cluster.replica_config(on_gpu).device == "cuda"
    assert cluster.replica_config(EngineConfig(device="cpu")).device == "cpu"
    cluster.check_gpus(2, 2.0)
    with pytest.raises(cluster.RayUnavailable, match="3 replicas on CUDA need 3 GPUs \\(one each\\); the Ray cluster has 2"):
        cluster.check_gpus(3, 2.0)


def test_batches_move_whole_to_the_device(tiny_checkpoint):
    """Every tensor of a step reaches the model's device (the meta device stands in for a GPU)."""
    from tierlm.attention.flat_batch import build_flat
    from tierlm.runner.placement import on_device
    from tierlm.scheduler.output import ScheduledRequest, SchedulerOutput

    step = SchedulerOutput([ScheduledRequest("a", [5, 6, 7], 0, [[1]], True, 3),
                            ScheduledRequest("b", [9], 20, [[2, 3]], True, 20)])
    moved = on_device(build_flat(step, 16), torch.device("meta"))
    tensors = [moved.input_ids, moved.positions, moved.logits_indices, moved.row_request]
    for m in moved.attn:
        tensors += [m.slot_mapping, m.tables, m.seq, m.positions]
    assert all(t.device.type == "meta" for t in tensors)


def test_the_profiled_peak_step_runs(tiny_checkpoint):
    """The step --gpu-memory-utilization profiles, run on the CPU on a throwaway pool of just
    enough blocks: the largest prompt chunk the scheduler may send, in every KV group."""
    from tierlm.kv_cache.sizing import kv_dtype
    from tierlm.runner.gpu_memory import peak_step
    from tierlm.runner.model_runner import ModelRunner

    path, _ = tiny_checkpoint("gemma3")
    llm = LLM(str(path), dtype="float32", attention_backend="paged")
    eng = llm.engine
    sizes = []

    def throwaway(num_blocks: int) -> ModelRunner:
        sizes.append(num_blocks)
        return ModelRunner(eng.loaded.model, eng.model_config, num_blocks, 16, torch.float32,
                           kv_dtype=kv_dtype(eng.config.cache, torch.float32))

    logits = peak_step(throwaway, 16, 100)
    assert sizes == [8] and logits.shape == (1, eng.model_config.vocab_size) and torch.isfinite(logits).all()
