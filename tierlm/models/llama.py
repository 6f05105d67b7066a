"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2): RoPE, RMSNorm, SwiGLU, GQA.

Plain PyTorch over a flat batch: a step's tokens from every request are one [T] row
of ids, positions give each its place, and the attention backend reads the paged KV
cache through the metadata. Quantization and kernel choice live in the layers.
"""

from __future__ import annotations

import torch
from torch import nn

from tierlm.attention.base import AttentionMetadata
from tierlm.attention.torch_ref import TorchPagedAttention
from tierlm.config import ModelConfig
from tierlm.layers.activation import silu_and_mul
from tierlm.layers.linear import Linear
from tierlm.layers.norm import RMSNorm
from tierlm.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, backend: TorchPagedAttention,
                 deterministic: bool) -> None:
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.h + 2 * self.hkv) * self.d
        self.qkv_proj = Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias, deterministic=deterministic)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, deterministic=deterministic)
        self.rope = rope
        self.backend = backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(-1, self.h, self.d)
        k = k.view(-1, self.hkv, self.d)
        v = v.view(-1, self.hkv, self.d)
        q, k = self.rope(positions, q, k)
        return self.o_proj(self.backend.forward(q, k, v, kv[0], kv[1], meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, deterministic: bool) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, deterministic=deterministic)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, deterministic=deterministic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, backend: TorchPagedAttention,
                 deterministic: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rope, backend, deterministic)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg, deterministic)

    def forward(self, x, positions, kv, meta):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Parameters are named after HF's (with fused qkv_proj / gate_up_proj)."""

    def __init__(self, cfg: ModelConfig, block_size: int, deterministic: bool = True) -> None:
        super().__init__()
        self.config = cfg
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        backend = TorchPagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                      cfg.head_dim ** -0.5, block_size)
        # _weight=empty skips the random init: the loader fills every parameter.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rope, backend, deterministic)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, deterministic=deterministic)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                logits_indices: torch.Tensor) -> torch.Tensor:
        """Run one step; returns float32 logits [len(logits_indices), vocab] for the rows asked."""
        x = self.embed_tokens(input_ids)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, positions, kv, meta)
        x = self.norm(x[logits_indices])
        return self.lm_head(x).float()
