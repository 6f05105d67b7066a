"""Engine configuration: frozen dataclasses holding every default and its validation.

Nothing deeper in the code reads environment variables or guesses from file names;
whatever changes behaviour is a field here, validated in `__post_init__`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("auto", "none", "int8", "int4", "q8_0", "q4_0")
DENSE_DTYPES = ("auto", "bfloat16", "float32")
TASKS = ("auto", "generate", "embed")
ATTENTION_BACKENDS = ("auto", "paged")
DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")  # tierlm/device.py resolves it
POOLINGS = ("last", "mean", "cls", "max", "mean_sqrt_len")
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # vLLM's names (server/reasoning.py)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def debug_invariants_default() -> bool:
    """TIERLM_DEBUG_INVARIANTS=1: the entry points' (CLI, `LLM`) default for `debug_invariants`."""
    return os.environ.get("TIERLM_DEBUG_INVARIANTS") == "1"


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class MoEConfig:
    """Sparse feed-forward blocks (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per routed expert
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    shared_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0 = none
    sparse_layers: tuple[int, ...] | None = None  # None = every layer is sparse

    def __post_init__(self) -> None:
        _require(self.num_experts > 0 and 0 < self.top_k <= self.num_experts,
                 "model config: MoE top_k must be in [1, num_experts]")
        _require(self.intermediate_size > 0, "model config: MoE intermediate_size must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters, filled from GGUF metadata or an HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style dict, e.g. {"rope_type": "llama3", ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # gated-MLP activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    qk_norm: bool = False  # RMSNorm over each q/k head before RoPE (Qwen3, Gemma 3)
    # Per layer FULL_ATTENTION or SLIDING_ATTENTION; () = every layer full.
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None  # a sliding layer's query at p sees keys in (p - window, p]
    rope_local_theta: float | None = None  # RoPE base of sliding layers when it differs (Gemma 3)
    attn_scale: float | None = None  # None = head_dim ** -0.5
    final_logit_softcap: float | None = None  # tanh soft-capping of output logits
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            _require(getattr(self, name) > 0, f"model config: {name} must be > 0")
        _require(self.num_heads % self.num_kv_heads == 0,
                 "model config: num_heads must be a multiple of num_kv_heads")
        _require(self.head_dim % 2 == 0, "model config: head_dim must be even (RoPE)")
        _require(self.hidden_act in ("silu", "gelu_tanh"),
                 f"model config: unsupported activation {self.hidden_act!r} (supported: silu, gelu_tanh)")
        _require(not self.layer_types or len(self.layer_types) == self.num_layers,
                 "model config: layer_types must name every layer")
        _require(set(self.layer_types) <= {FULL_ATTENTION, SLIDING_ATTENTION},
                 f"model config: layer types must be {FULL_ATTENTION!r} or {SLIDING_ATTENTION!r}")
        _require(SLIDING_ATTENTION not in self.layer_types or (self.sliding_window or 0) > 0,
                 "model config: sliding layers need sliding_window > 0")

    def layer_window(self, layer: int) -> int | None:
        """Keys a layer's query can see back (itself included); None = the whole context."""
        if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    def is_sparse_layer(self, layer: int) -> bool:
        return self.moe is not None and (self.moe.sparse_layers is None or layer in self.moe.sparse_layers)


KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache geometry. `num_blocks=None` sizes the pool from `kv_cache_gb`.

    `enable_prefix_caching` reuses the KV of full blocks shared with earlier requests
    (same tokens from position 0, same `cache_salt`); outputs are bitwise the same either way.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gb: float = 1.0
    enable_prefix_caching: bool = True
    kv_warm_gb: float = 0.5  # host-memory tier for cached blocks the pool evicts
    kv_cold_dir: str | None = None  # disk tier for warm evictions; survives restarts
    kv_cold_gb: float = 4.0
    session_ttl: float = 600.0  # seconds a finished session request's KV stays pinned in warm
    # "auto": K/V in the model's compute dtype; "int8": per-token, per-head int8 with a
    # float32 scale each (about twice the tokens in the same memory; kv_cache/sizing.py).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
                 "cache config: block_size must be a power of two")
        _require(self.num_blocks is None or self.num_blocks > 0, "cache config: num_blocks must be > 0")
        _require(self.kv_cache_gb > 0, "cache config: kv_cache_gb must be > 0")
        _require(self.kv_warm_gb >= 0, "cache config: kv_warm_gb must be >= 0")
        _require(self.kv_cold_gb > 0, "cache config: kv_cold_gb must be > 0")
        _require(self.session_ttl >= 0, "cache config: session_ttl must be >= 0")
        _require(self.kv_cache_dtype in KV_CACHE_DTYPES,
                 f"cache config: kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits.

    `max_num_batched_tokens` is the per-step token budget; prompts longer than the budget
    are prefilled in chunks of at most `long_prefill_chunk` tokens (0 = the whole budget).
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None = the model's context length
    long_prefill_chunk: int = 0
    # "fcfs", "priority" (lower value first, then arrival) or "fair": tenants take turns by
    # weighted virtual token counter (scheduler/fair.py), priority order within a tenant.
    policy: str = "fcfs"
    tenant_weights: tuple[tuple[str, float], ...] = ()  # fair-share weights (default 1)
    # "past_future": admit only if the predicted peak KV use fits the pool (scheduler/admission.py);
    # "greedy": whenever the first chunk's blocks are free (growth may force preemptions later).
    admission: str = "past_future"
    # Speculative decoding: up to this many n-gram draft tokens per decoding request and
    # step (spec/ngram.py), verified in the same forward; 0 = off.
    num_speculative_tokens: int = 0

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "scheduler config: max_num_seqs must be > 0")
        _require(0 <= self.num_speculative_tokens <= 16,
                 "scheduler config: num_speculative_tokens must be in [0, 16]")
        _require(self.max_num_batched_tokens > 0, "scheduler config: max_num_batched_tokens must be > 0")
        _require(self.max_model_len is None or self.max_model_len > 0,
                 "scheduler config: max_model_len must be > 0")
        _require(self.long_prefill_chunk >= 0, "scheduler config: long_prefill_chunk must be >= 0")
        _require(self.policy in ("fcfs", "priority", "fair"),
                 "scheduler config: policy must be 'fcfs', 'priority' or 'fair'")
        _require(all(w > 0 for _, w in self.tenant_weights), "scheduler config: tenant weights must be > 0")
        _require(self.admission in ("greedy", "past_future"),
                 "scheduler config: admission must be 'greedy' or 'past_future'")


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (tierlm/lora): adapters over the base model, batched together.

    `max_loras` adapters are resident at once (slots, least recently used evicted when no
    running request uses it); every adapter's rank must be at most `max_lora_rank` (each
    slot is that wide). `modules` are the adapters known from the start (name, path).
    """

    enabled: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    modules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _require(self.max_loras > 0, "lora config: max_loras must be > 0")
        _require(0 < self.max_lora_rank <= 512, "lora config: max_lora_rank must be in [1, 512]")
        _require(self.enabled or not self.modules, "lora modules need LoRA enabled (--enable-lora)")
        names = [n for n, _ in self.modules]
        _require(len(set(names)) == len(names), "lora modules: each adapter name once")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an `LLMEngine` needs besides the model files themselves.

    `dtype` is the compute dtype of weights and activations; logits and sampling are
    always float32. `deterministic` makes every request's numbers independent of its
    batch neighbours and of chunking (batch-invariant kernels, see layers/linear.py).
    `quantization` is the weight format of the linear layers for decode: "auto" keeps a
    GGUF file's 4-bit blocks as int4, runs its other quantized tensors as int8 and float
    weights dense; "int8" / "int4" also quantize the dense ones on load (HF checkpoints);
    "q8_0" / "q4_0" quantize an HF checkpoint's linear layers on load to those GGUF block
    formats (embedding and output layer Q8_0) and run it on tierlm's kernels, as a GGUF
    file of those formats runs; "none" runs every layer dense.
    The int8/int4 kernels take bf16 activations, so those need dtype bfloat16 (and "auto"
    under float32 means dense).
    `dense_dtype` is the dtype of dense products (prefill rows, unquantized layers):
    "auto" measures whether this CPU multiplies bf16 or float32 faster (bf16 matrix units
    or not) and remembers it per machine; float32 activations always use float32.
    `draft_model` (a model argument with the same vocabulary) drafts the speculative
    tokens instead of n-gram lookup (spec/draft.py); it needs num_speculative_tokens > 0.
    `debug_invariants` checks the scheduler's and KV cache's invariants after every step
    (a violation fails the step loudly instead of corrupting later ones); the test suite
    runs with it on (TIERLM_DEBUG_INVARIANTS=1 is the default of the CLI flag and of `LLM`).
    `lora` enables LoRA adapters over the model (LoRAConfig).
    `task`: "generate" (text), "embed" (vectors: /v1/embeddings, LLM.embed) or "auto" (embed
    for encoder models, which can do nothing else; generate for decoders). `pooling` makes a
    vector of a decoder's last hidden states ("last" token by default, or "mean"); for an
    encoder it overrides the pooling its sentence-transformers config names.
    `device`: cpu (the default until the CUDA path has run on a GPU), cuda, cuda:N or auto (CUDA
    when PyTorch sees one and the config runs there; tierlm/device.py).
    On CUDA, `gpu_memory_utilization` is the share of the GPU's memory the engine may use:
    the KV pool gets what is left of it after the weights and a profiled peak step
    (kv_cache_gb is then ignored); `enforce_eager` runs decode steps op by op instead of
    replaying CUDA graphs captured at start. `attention_backend`: auto (the device's and
    weights' choice, attention/registry.py) or paged (the device-neutral paged attention
    that CUDA runs, also on the CPU for models off tierlm's kernels).
    """

    model: str = "smollm2-135m"
    dtype: str = "bfloat16"
    deterministic: bool = True
    quantization: str = "auto"
    dense_dtype: str = "auto"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    draft_model: str | None = None
    debug_invariants: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    task: str = "auto"
    pooling: str | None = None
    tensor_parallel_size: int = 1  # ranks sharing the model (parallel/): worker processes, torch.distributed
    device: str = "cpu"  # auto once the CUDA path has run on a GPU (README "GPU")
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        self._check_tensor_parallel()
        _require(bool(DEVICE_SPEC.match(self.device)),
                 f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        _require(0 < self.gpu_memory_utilization <= 1,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.attention_backend in ATTENTION_BACKENDS,
                 f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}")
        _require(self.attention_backend != "paged" or self.cache.kv_cache_dtype != "int8",
                 "kv_cache_dtype int8 is not read by attention_backend paged (its K/V stay in the compute dtype)")
        _require(self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _require(self.pooling is None or self.pooling in POOLINGS,
                 f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        _require(self.pooling is None or self.task != "generate", "pooling applies to embedding models (task embed)")
        _require(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        _require(self.quantization in QUANTIZATIONS,
                 f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        _require(self.quantization in ("auto", "none", "q8_0", "q4_0") or self.dtype == "bfloat16",
                 f"quantization {self.quantization} needs dtype bfloat16 (its kernels take bf16 activations)")
        _require(self.dense_dtype in DENSE_DTYPES,
                 f"dense_dtype must be one of {', '.join(DENSE_DTYPES)}, got {self.dense_dtype!r}")
        _require(self.dtype != "float32" or self.dense_dtype != "bfloat16",
                 "dense_dtype bfloat16 needs dtype bfloat16 (it would round float32 activations)")
        _require(self.draft_model is None or self.scheduler.num_speculative_tokens > 0,
                 "a draft model needs num_speculative_tokens > 0")

    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_parallel_size
        _require(tp >= 1, f"tensor_parallel_size must be >= 1, got {tp}")
        if tp == 1:
            return
        _require(self.quantization in ("auto", "none"),
                 "tensor parallelism shards dense weights: quantization must be auto or none")
        _require(not self.lora.enabled, "LoRA adapters are not served with tensor parallelism")
        _require(self.task != "embed", "tensor parallelism serves text generation (task generate)")
        _require(self.cache.kv_cold_dir is None, "the cold KV tier is not supported with tensor parallelism")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def max_model_len(self, model: ModelConfig) -> int:
        """The longest sequence served: scheduler.max_model_len, capped at the model's context."""
        ctx = model.max_position_embeddings
        return min(self.scheduler.max_model_len or ctx, ctx)


@dataclass(frozen=True)
class TierConfig:
    """One model tier of a TierSet: an engine, its price and its quality score.

    Prices are USD per million tokens; `quality` only orders tiers (higher = better
    answers, usually slower): `auto` routing prefers the best quality that fits a budget.
    A tier may be a LoRA adapter (`lora_path`) over tier `lora_base`'s engine: it then
    shares that engine (and its `engine` config) instead of loading a model of its own.
    `reasoning_parser` moves a reasoning model's think block into `reasoning_content`.
    """

    name: str
    engine: EngineConfig
    quality: float = 1.0
    prompt_price_per_mtok: float = 0.0
    completion_price_per_mtok: float = 0.0
    lora_base: str | None = None
    lora_path: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        _require(self.reasoning_parser in (None, *REASONING_PARSERS),
                 f"tier {self.name!r}: reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                 f"got {self.reasoning_parser!r}")
        _require(bool(self.name) and self.name != "auto", "tier names must be non-empty and not 'auto'")
        _require(self.prompt_price_per_mtok >= 0 and self.completion_price_per_mtok >= 0,
                 f"tier {self.name!r}: prices must be >= 0")
        _require((self.lora_base is None) == (self.lora_path is None),
                 f"tier {self.name!r}: an adapter tier needs both its base tier and its adapter path")

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt_price_per_mtok + completion_tokens * self.completion_price_per_mtok) / 1e6


@dataclass(frozen=True)
class QuotaLimits:
    """A tenant's quotas (tenancy/quotas.py enforces them); None = unlimited."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_concurrent: int | None = None
    cost_ceiling_usd: float | None = None
    cost_period_s: float = 86_400.0

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent", "cost_ceiling_usd"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{name} must be > 0 (or unset for no limit)")
        _require(self.cost_period_s > 0, "cost_period_s must be > 0")


@dataclass(frozen=True)
class TenantConfig:
    """Who may call the server: API keys (held as SHA-256 digests only), the tiers it may
    use (empty = all), its quotas and its fair-share weight. An `anonymous` tenant serves
    requests that carry no key; without one, a key is required. An `operator` tenant sees
    every tenant's series on /metrics (others see only their own). Prefix-cache entries
    are shared only among tenants of one `cache_group` (empty: no salt, the open server's
    single tenant)."""

    name: str
    key_hashes: tuple[bytes, ...] = ()
    tiers: tuple[str, ...] = ()
    weight: float = 1.0
    limits: QuotaLimits = field(default_factory=QuotaLimits)
    anonymous: bool = False
    operator: bool = False
    cache_group: str = ""
    default_tier: str | None = None  # `tier_mode: fixed`'s tier (else the file's default_tier)

    def __post_init__(self) -> None:
        _require(bool(self.name), "tenant names must be non-empty")
        _require(self.weight > 0, f"tenant {self.name!r}: weight must be > 0")
        _require(self.anonymous or bool(self.key_hashes), f"tenant {self.name!r}: give api_keys or anonymous = true")


@dataclass(frozen=True)
class TierSetConfig:
    """The tiers one server hosts (in declaration order) and its tenants."""

    tiers: tuple[TierConfig, ...]
    tenants: tuple[TenantConfig, ...]
    default_tier: str
    balanced_cost_weight: float = 1.0  # `balanced` routing: value = quality / cost ** this

    def __post_init__(self) -> None:
        names = [t.name for t in self.tiers]
        _require(bool(names), "a TierSet needs at least one tier")
        _require(len(set(names)) == len(names), "tier names must be unique")
        engines = {t.name: t for t in self.tiers if t.lora_base is None}
        for t in self.tiers:
            if t.lora_base is not None:
                base = engines.get(t.lora_base)
                _require(base is not None, f"tier {t.name!r}: base {t.lora_base!r} is not a model tier")
                _require(base.engine.lora.enabled, f"tier {t.name!r}: base {t.lora_base!r} does not enable LoRA")
        _require(self.default_tier in names, f"default_tier {self.default_tier!r} is not a tier")
        _require(sum(t.anonymous for t in self.tenants) <= 1, "at most one tenant may be anonymous")
        for tenant in self.tenants:
            unknown = sorted(set(tenant.tiers) - set(names))
            _require(not unknown, f"tenant {tenant.name!r}: unknown tiers {unknown}")

    def tier(self, name: str) -> TierConfig:
        return next(t for t in self.tiers if t.name == name)
