"""ModelConfig from GGUF metadata or an HF config.json, for every supported architecture.

Each source's architecture-specific switches (q/k norms, sliding layers, RoPE bases,
MoE geometry, Gemma's scaling rules) are read here and nowhere else, so model files
only ever see a `ModelConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tierlm.config import FULL_ATTENTION, SLIDING_ATTENTION, ConfigError, ModelConfig, MoEConfig
from tierlm.loader.gguf import GGUFFile


class ConfigReadError(ValueError):
    pass


# llama.cpp hard-codes Gemma 3's pattern: every 6th layer is global, the rest slide.
_GEMMA3_SLIDING_PATTERN = 6


def _pattern_layer_types(num_layers: int, period: int) -> tuple[str, ...]:
    return tuple(SLIDING_ATTENTION if (i + 1) % period else FULL_ATTENTION for i in range(num_layers))


def gguf_config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    hidden = int(g.arch_get("embedding_length"))
    heads = int(g.arch_get("attention.head_count"))
    kv_heads = g.arch_get("attention.head_count_kv", heads)
    layers = int(g.arch_get("block_count"))
    head_dim = int(g.arch_get("attention.key_length", hidden // heads))
    vocab = g.arch_get("vocab_size") or len(g.get("tokenizer.ggml.tokens", []))
    scaling = None
    if "rope_freqs.weight" in g.tensors:  # llama3 GGUFs store the scaled frequency factors
        scaling = {"rope_type": "freq_factors",
                   "factors": g.tensors["rope_freqs.weight"].dequantize().tolist()}
    elif g.arch_get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(g.arch_get("rope.scaling.factor"))}
    eos = [g.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    extra: dict = {}
    if arch == "gemma3":
        extra = dict(
            hidden_act="gelu_tanh", qk_norm=True,
            layer_types=_pattern_layer_types(
                layers, int(g.arch_get("attention.sliding_window_pattern", _GEMMA3_SLIDING_PATTERN))),
            sliding_window=int(g.arch_get("attention.sliding_window")),
            rope_local_theta=10000.0,
            # llama.cpp: the 27B model (62 layers) scales by hidden/heads, the others by head_dim.
            attn_scale=(hidden / heads if layers == 62 else head_dim) ** -0.5,
            final_logit_softcap=g.arch_get("final_logit_softcapping"),
        )
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g.arch_get("feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        max_position_embeddings=int(g.arch_get("context_length", 2048)),
        rms_norm_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g.arch_get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias="blk.0.attn_q.bias" in g.tensors,
        bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted({int(e) for e in eos if e is not None})),
        **extra,
    )


def _rope(params: dict | None) -> tuple[float, dict | None]:
    """HF rope parameters -> (theta, scaling dict or None for plain RoPE)."""
    params = dict(params or {})
    theta = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, (params if kind != "default" else None)


def _moe(c: dict, model_type: str) -> MoEConfig | None:
    if model_type == "mixtral":
        return MoEConfig(num_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"],
                         intermediate_size=c["intermediate_size"], norm_topk_prob=True)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        n, step = c["num_layers"], c.get("decoder_sparse_step", 1)
        skip = set(c.get("mlp_only_layers") or ())
        sparse = tuple(i for i in range(n) if i not in skip and (i + 1) % step == 0)
        return MoEConfig(num_experts=c.get("num_experts") or c["num_local_experts"], top_k=c["num_experts_per_tok"],
                         intermediate_size=c["moe_intermediate_size"],
                         norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                         shared_intermediate_size=c.get("shared_expert_intermediate_size") or 0,
                         sparse_layers=sparse if len(sparse) < n else None)
    return None


def _layer_types(c: dict, model_type: str, num_layers: int) -> tuple[str, ...]:
    window = c.get("sliding_window")
    if c.get("layer_types"):
        return tuple(c["layer_types"])
    if model_type in ("mistral", "mixtral") and window:
        return (SLIDING_ATTENTION,) * num_layers
    if model_type.startswith("qwen") and c.get("use_sliding_window") and window:
        first = c.get("max_window_layers", num_layers)
        return tuple(SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers))
    if model_type == "gemma3_text":
        return _pattern_layer_types(num_layers, c.get("sliding_window_pattern", _GEMMA3_SLIDING_PATTERN))
    return ()


def _read_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigReadError(f"cannot read {path}: {e}") from e
    if not isinstance(c, dict):
        raise ConfigReadError(f"{path} is not a JSON object")
    return c


def hf_architecture(model_dir: Path) -> str:
    """The checkpoint's architecture name, read before anything else so an unsupported
    one fails with the supported list rather than a missing-field error."""
    c = _read_json(model_dir)
    return (c.get("architectures") or [c.get("model_type", "?")])[0]


def hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    c = _read_json(model_dir)
    try:
        return _hf_config(c)
    except KeyError as e:
        raise ConfigReadError(f"{path} lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise ConfigReadError(f"{path}: {e}") from None


def _hf_config(c: dict) -> ModelConfig:
    arch = (c.get("architectures") or [c.get("model_type", "?")])[0]
    model_type = c.get("model_type", "")
    heads = c["num_attention_heads"]
    c["num_layers"] = num_layers = c["num_hidden_layers"]
    eos = c.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    layer_types = _layer_types(c, model_type, num_layers)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    extra: dict = {}
    if model_type == "gemma3_text":
        theta, scaling = _rope(rope.get(FULL_ATTENTION))
        local_theta, _ = _rope(rope.get(SLIDING_ATTENTION))
        # Gemma 3 keeps Gemma 2's attn_logit_softcapping field but no longer applies it
        # (neither the reference nor llama.cpp does), so it is not read.
        extra = dict(hidden_act="gelu_tanh", qk_norm=True, rope_local_theta=local_theta,
                     attn_scale=c.get("query_pre_attn_scalar", 256) ** -0.5,
                     final_logit_softcap=c.get("final_logit_softcapping"))
    else:
        theta, scaling = _rope(rope)
        theta = float(c.get("rope_theta", theta))
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"model config: unsupported hidden_act {act!r} for {arch}")
        extra = dict(qk_norm=model_type in ("qwen3", "qwen3_moe"), moe=_moe(c, model_type))
    bias = c.get("attention_bias", c.get("qkv_bias", model_type in ("qwen2", "qwen2_moe")))
    return ModelConfig(
        architecture=arch,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c.get("intermediate_size") or c.get("moe_intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(bias),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
        layer_types=layer_types,
        sliding_window=c.get("sliding_window") if SLIDING_ATTENTION in layer_types else None,
        **extra,
    )
