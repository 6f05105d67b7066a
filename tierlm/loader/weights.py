"""Model weights and config from GGUF files or HF checkpoint directories.

Both sources are normalised to one form: a `ModelConfig` and a dict of float32
tensors under HF-style names without the "model." prefix (embed_tokens.weight,
layers.N.self_attn.q_proj.weight, ..., norm.weight, lm_head.weight), with GGUF's
llama q/k row permutation undone so one model file serves both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tierlm.config import ModelConfig
from tierlm.loader.gguf import GGUFFile


class WeightsError(ValueError):
    pass


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_config(g: GGUFFile) -> ModelConfig:
    arch = g.architecture
    hidden = int(g.arch_get("embedding_length"))
    heads = int(g.arch_get("attention.head_count"))
    kv_heads = g.arch_get("attention.head_count_kv", heads)
    vocab = g.arch_get("vocab_size") or len(g.get("tokenizer.ggml.tokens", []))
    scaling = None
    if "rope_freqs.weight" in g.tensors:  # llama3 GGUFs store the scaled frequency factors
        scaling = {"rope_type": "freq_factors",
                   "factors": g.tensors["rope_freqs.weight"].dequantize().tolist()}
    eos = [g.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g.arch_get("feed_forward_length")),
        num_layers=int(g.arch_get("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(g.arch_get("attention.key_length", hidden // heads)),
        max_position_embeddings=int(g.arch_get("context_length", 2048)),
        rms_norm_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g.arch_get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias="blk.0.attn_q.bias" in g.tensors,
        bos_token_id=g.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted({int(e) for e in eos if e is not None})),
    )


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permute (interleaved -> rotate-half rows)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(g: GGUFFile, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, float32 tensor) one at a time so peak memory stays one tensor."""
    permute = cfg.architecture == "llama"
    for gname, t in g.tensors.items():
        if gname in _GGUF_GLOBAL_NAMES:
            yield _GGUF_GLOBAL_NAMES[gname], t.dequantize()
            continue
        if gname == "rope_freqs.weight":
            continue
        parts = gname.split(".", 2)
        if parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
            raise WeightsError(f"unexpected tensor {gname!r} in GGUF file")
        w = t.dequantize()
        if permute and parts[2].startswith("attn_q."):
            w = _unpermute(w, cfg.num_heads)
        elif permute and parts[2].startswith("attn_k."):
            w = _unpermute(w, cfg.num_kv_heads)
        yield f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}", w


def hf_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from e
    archs = c.get("architectures") or [c.get("model_type", "?")]
    heads = c["num_attention_heads"]
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    eos = c.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return ModelConfig(
        architecture=archs[0],
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(c.get("attention_bias", archs[0] == "Qwen2ForCausalLM")),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
    )


def hf_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"{model_dir} has no .safetensors files")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                yield name.removeprefix("model."), f.get_tensor(name).float()
