"""Building an engine: load the model (and its one-off kernel probes), size the KV cache,
and make each part with what it needs in its constructor: the KV tiers and cache
manager, the scheduler, the structured-output manager, the model runner and the draft
proposer. `LLMEngine` receives them ready; nothing is wired by mutation afterwards.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tierlm import kernels
from tierlm.config import CacheConfig, EngineConfig, ModelConfig
from tierlm.device import CPU, describe, engine_device
from tierlm.embed.head import strip_head
from tierlm.kv_cache.cold_store import ColdStore
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.kv_cache.sizing import kv_block_bytes, kv_dtype, kv_page_shape, layout_for, num_kv_blocks
from tierlm.kv_cache.tiers import KVTiers
from tierlm.loader import model_loader
from tierlm.lora.registry import AdapterRegistry
from tierlm.lora.slots import LoRASlots
from tierlm.runner import gpu_memory, kernel_probe
from tierlm.runner.model_runner import ModelRunner
from tierlm.scheduler.scheduler import Scheduler
from tierlm.spec.draft import DraftModelProposer
from tierlm.spec.proposer import NgramProposer, Proposer
from tierlm.structured.manager import StructuredOutputs

log = logging.getLogger("tierlm.engine")


@dataclass(frozen=True)
class EngineParts:
    loaded: model_loader.LoadedModel
    model_key: str  # what a block's KV depends on besides its tokens (prefix-cache hashes)
    kv: KVCacheManager
    scheduler: Scheduler
    runner: ModelRunner
    structured: StructuredOutputs
    proposer: Proposer | None
    load_seconds: float
    adapters: AdapterRegistry | None = None  # LoRA adapters by name (None: LoRA not enabled)


def default_cache_dir() -> Path:
    """Where tokenizers, assembled bundled models and kernel probes are kept:
    $TIERLM_CACHE_DIR, else ~/.cache/tierlm."""
    env = os.environ.get("TIERLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tierlm"


def model_key(path: Path, config: EngineConfig, dense_dtype: torch.dtype, on_kernels: bool = False,
              device: torch.device = CPU) -> str:
    """What a block's KV depends on besides its tokens: the weights (files by name, size
    and mtime), the compute dtypes, the KV cache's dtype, the kernel mode, the attention
    backend and the device type (a GPU's KV differs in its last bits from the CPU's). Part of
    every prefix-cache hash (and so of the cold store's directory)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return (f"{path.resolve()}|{stamp}|{config.dtype}|quantization={config.quantization}"
            f"|dense={str(dense_dtype).removeprefix('torch.')}|deterministic={config.deterministic}"
            + ("|kv=int8" if config.cache.kv_cache_dtype == "int8" else "")
            + (f"|tp={config.tensor_parallel_size}" if config.tensor_parallel_size > 1 else "")
            + (f"|device={device.type}" if device.type != "cpu" else "")
            + ("|attention=paged" if config.attention_backend == "paged" else "")
            # every compiled path computes the same bits; the PyTorch reference does not
            + (f"|kernels={'reference' if kernels.isa() == 'reference' else 'compiled'}" if on_kernels else ""))


def kv_tiers(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, key: str) -> KVTiers:
    """The warm (and, with a directory, cold) tiers behind the prefix cache; `dtype`: the cache's."""
    cold = None
    if cache.kv_cold_dir:
        cold = ColdStore(Path(cache.kv_cold_dir), key, kv_page_shape(cfg, cache.block_size, dtype), dtype,
                         int(cache.kv_cold_gb * 2**30))
    return KVTiers(kv_block_bytes(cfg, cache.block_size, dtype), int(cache.kv_warm_gb * 2**30), cold)


def build_parts(config: EngineConfig, *, cache_dir: Path | None = None, progress: bool = False) -> EngineParts:
    t0 = time.perf_counter()
    cache_dir = cache_dir or default_cache_dir()
    device = engine_device(config)  # a device that is not there is refused before any worker starts
    tp = _tensor_group(config, cache_dir)
    try:
        return _build_parts(config, device, tp, cache_dir, progress, t0)
    except BaseException:
        if tp is not None:  # the workers wait for orders: stop them
            tp.close()
        raise


def _load(config: EngineConfig, cache_dir: Path, progress: bool = False,
          device: torch.device = CPU) -> model_loader.LoadedModel:
    """The model with its one-off probes (CPU GEMMs only); tensor parallelism shards dense weights."""
    def probe() -> torch.dtype:  # asked only for a model off the kernels (they have no dense products)
        if device.type != "cpu":
            return config.torch_dtype
        return kernel_probe.dense_dtype(config.dense_dtype, config.torch_dtype, cache_dir)

    quantization = "none" if config.tensor_parallel_size > 1 else config.quantization
    loaded = model_loader.load(config.model, dtype=config.torch_dtype, block_size=config.cache.block_size,
                               deterministic=config.deterministic, cache_dir=cache_dir, progress=progress,
                               quantization=quantization, dense_dtype=probe, device=device,
                               attention_backend=config.attention_backend)
    if config.task == "embed":  # its output is its last hidden states, not logits (embed/decoder.py)
        strip_head(loaded.model)
    if config.deterministic and not loaded.kernels and device.type == "cpu":
        kernel_probe.ensure_probed(loaded.model, cache_dir)
    return loaded


def _build_parts(config: EngineConfig, device: torch.device, tp, cache_dir: Path, progress: bool,
                 t0: float) -> EngineParts:
    loaded = _load(config, cache_dir, progress, device)
    load_seconds = time.perf_counter() - t0
    cfg, cache, dtype = loaded.config, config.cache, config.torch_dtype
    kv_type = kv_dtype(cache, dtype)
    # Under tensor parallelism rank 0 holds the most KV heads: its pool size fits every rank.
    local = _shard(loaded.model, cfg, 0, config) if tp else cfg
    graphs = _graph_shape(config, cfg, device)
    if device.type == "cuda" and cache.num_blocks is None:
        blocks = _gpu_kv_blocks(config, loaded, kv_type, device, graphs is not None)
    else:
        blocks = num_kv_blocks(local, cache, kv_type)
    key = model_key(loaded.path, config, loaded.dense_dtype, loaded.kernels, device)
    # A rank's warm/cold copies would hold only its heads' pages: hot prefix caching only.
    tiers = kv_tiers(cfg, cache, kv_type, key) if cache.enable_prefix_caching and not tp else None
    kv = KVCacheManager(blocks, cache.block_size, layout_for(cfg).windows,
                        enable_caching=cache.enable_prefix_caching, tiers=tiers, session_ttl=cache.session_ttl)
    # Prompt and generated rows on different weight formats: their blocks are hashed apart.
    split_formats = config.deterministic and not loaded.kernels and any(k != "dense" for k in loaded.formats)
    lora = config.lora
    scheduler = Scheduler(config.scheduler, kv, cfg.eos_token_ids, split_formats,
                          max_loras=lora.max_loras if lora.enabled else 0)
    structured = StructuredOutputs(loaded.tokenizer, cfg.vocab_size)
    slots = LoRASlots(loaded.model, lora.max_loras, lora.max_lora_rank) if lora.enabled else None
    if tp:
        tp.send("start", blocks)  # the workers build their runners on their shards meanwhile
    runner = ModelRunner(loaded.model, local, blocks, cache.block_size, dtype, config.deterministic,
                         kernels=loaded.kernels, structured=structured, lora=slots, kv_dtype=kv_type, tp=tp,
                         device=device, graphs=graphs)
    if device.type == "cuda":
        _announce(runner, loaded.path.name, blocks * kv_block_bytes(cfg, cache.block_size, kv_type))
    adapters = None
    if slots is not None:
        adapters = AdapterRegistry(slots.where, lora.max_lora_rank)
        for name, path in lora.modules:
            adapters.add(name, path)
    proposer: Proposer | None = NgramProposer() if config.scheduler.num_speculative_tokens else None
    if config.draft_model:  # its KV pool: a quarter of the target's (committed only as written)
        proposer = DraftModelProposer(config.draft_model, vocab_size=cfg.vocab_size, dtype=dtype,
                                      block_size=cache.block_size, kv_cache_gb=cache.kv_cache_gb / 4,
                                      cache_dir=cache_dir, quantization=config.quantization,
                                      dense_dtype=loaded.dense_dtype)
    return EngineParts(loaded, key, kv, scheduler, runner, structured, proposer, load_seconds, adapters)


def _announce(runner: ModelRunner, name: str, pool_bytes: int) -> None:
    """One startup line for a model on a GPU: device, KV pool, graph capture time."""
    graphs = runner.graphs
    note = (f"decode CUDA graphs for batch {', '.join(map(str, graphs.sizes))} captured in "
            f"{graphs.capture_seconds:.2f} s" if graphs else "eager (no CUDA graphs)")
    log.info("%s on %s: KV pool %.2f GiB, %s", name, describe(runner.device), pool_bytes / 2**30, note)


def _graph_shape(config: EngineConfig, cfg: ModelConfig, device: torch.device) -> tuple[int, int] | None:
    """(largest decode batch, widest block table) to capture CUDA graphs for; None: eager."""
    if device.type != "cuda" or config.enforce_eager:
        return None
    return config.scheduler.max_num_seqs, -(-config.max_model_len(cfg) // config.cache.block_size)


def _gpu_kv_blocks(config: EngineConfig, loaded, kv_type: torch.dtype, device: torch.device, graphs: bool) -> int:
    """The KV pool's blocks on a GPU: `gpu_memory_utilization` after a profiled peak step."""
    cfg, cache = loaded.config, config.cache

    def throwaway(num_blocks: int) -> ModelRunner:
        return ModelRunner(loaded.model, cfg, num_blocks, cache.block_size, config.torch_dtype, config.deterministic,
                           kv_dtype=kv_type, device=device)

    profile = gpu_memory.profile_step(throwaway, cache.block_size, config.scheduler.max_num_batched_tokens, device)
    return gpu_memory.kv_budget(profile, config.gpu_memory_utilization, kv_block_bytes(cfg, cache.block_size, kv_type),
                                profile.activations if graphs else 0)


def _tensor_group(config: EngineConfig, cache_dir: Path):
    """Start the tensor-parallel workers (None without tensor parallelism); each rank,
    this one included, runs on cores / size threads. A size the model cannot be split by
    is refused before any worker starts."""
    if config.tensor_parallel_size == 1:
        return None
    from tierlm.parallel import shard
    from tierlm.parallel.group import TensorGroup

    shard.plan(model_loader.load_config(config.model, cache_dir), 0, config.tensor_parallel_size)

    return TensorGroup(config, max(1, kernels.usable_cpus() // config.tensor_parallel_size))


def _shard(model, cfg: ModelConfig, rank: int, config: EngineConfig) -> ModelConfig:
    """Keep rank `rank`'s part of `model`; returns its local config (heads, KV heads)."""
    from tierlm.attention import registry
    from tierlm.parallel import shard

    p = shard.plan(cfg, rank, config.tensor_parallel_size)
    local = shard.local_config(cfg, p)
    attention = registry.make(registry.choose(on_kernels=False), local, config.cache.block_size)
    return shard.shard_model(model, cfg, p, attention)


def load_shard(config: EngineConfig, rank: int, cache_dir: Path | None = None):
    """A tensor-parallel worker's model: loaded whole (dense), then cut to rank `rank`'s part."""
    loaded = _load(config, cache_dir or default_cache_dir())
    return loaded.model, _shard(loaded.model, loaded.config, rank, config)


def shard_runner(config: EngineConfig, model, local: ModelConfig, num_blocks: int) -> ModelRunner:
    """A worker's runner: its shard and KV cache, stepping on rank 0's contracts, never sampling."""
    kv_type = kv_dtype(config.cache, config.torch_dtype)
    return ModelRunner(model, local, num_blocks, config.cache.block_size, config.torch_dtype,
                       config.deterministic, kv_dtype=kv_type, samples=False)


def build_engine(config: EngineConfig, *, cache_dir: Path | None = None, progress: bool = False):
    """A ready LLMEngine for `config` (the model loaded, every part made)."""
    from tierlm.engine.llm_engine import LLMEngine

    return LLMEngine(config, build_parts(config, cache_dir=cache_dir, progress=progress))
