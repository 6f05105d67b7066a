"""Llama-family decoder: Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Mixtral, Qwen2/3-MoE.

These share one structure (pre-norm blocks of RoPE attention with GQA and a gated MLP)
and differ only in switches read from the config: q/k/v bias (Qwen2), per-head q/k
RMSNorm before RoPE (Qwen3), sliding-window layers (Mistral, Qwen2/3 when enabled;
the window arrives in the attention metadata) and sparse MoE feed-forward blocks
(layers/moe.py). Plain PyTorch over a flat batch: a step's tokens from every request
are one [T] row of ids, positions give each its place, and the attention backend
reads the paged KV cache through per-layer metadata.
"""

from __future__ import annotations

import torch
from torch import nn

from tierlm.attention.base import AttentionBackend, AttentionMetadata
from tierlm.config import ModelConfig
from tierlm.layers.linear import Linear, rows_by_format
from tierlm.layers.mlp import GatedMLP
from tierlm.layers.moe import SparseMoE
from tierlm.layers.norm import RMSNorm
from tierlm.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, backend: AttentionBackend,
                 deterministic: bool) -> None:
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.h + 2 * self.hkv) * self.d
        self.qkv_proj = Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias, deterministic=deterministic)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, deterministic=deterministic)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = rope
        self.backend = backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, dense_rows: int | None) -> torch.Tensor:
        qkv = self.qkv_proj(x, dense_rows)
        q, k, v = qkv.split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(-1, self.h, self.d)
        k = k.view(-1, self.hkv, self.d)
        v = v.view(-1, self.hkv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(positions, q, k)
        return self.o_proj(self.backend.forward(q, k, v, kv[0], kv[1], meta), dense_rows)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding, backend: AttentionBackend,
                 deterministic: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rope, backend, deterministic)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_sparse_layer(layer):
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe, cfg.hidden_act, deterministic)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, deterministic)

    def forward(self, x, positions, kv, meta, dense_rows):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv, meta, dense_rows)
        return x + self.mlp(self.post_attention_layernorm(x), dense_rows)


class LlamaForCausalLM(nn.Module):
    """Parameters are named after HF's (with fused qkv_proj / gate_up_proj)."""

    def __init__(self, cfg: ModelConfig, attention: AttentionBackend, deterministic: bool = True) -> None:
        super().__init__()
        self.config = cfg
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        backend = self.attention = attention  # one instance, shared by every layer (attention/registry.py)
        # _weight=empty skips the random init: the loader fills every parameter.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rope, backend, deterministic)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, deterministic=deterministic)
        if cfg.tie_word_embeddings:
            self.lm_head.tie(self.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], metas: list[AttentionMetadata],
                logits_indices: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        """Run one step; returns float32 logits [len(logits_indices), vocab] for the rows asked.

        `kv_caches[i]` and `metas[i]` are layer i's cache pages and attention metadata;
        `dense_rows` picks each row's weight format (see Linear).
        """
        x = self.embed_tokens(input_ids)
        for layer, kv, meta in zip(self.layers, kv_caches, metas):
            x = layer(x, positions, kv, meta, dense_rows)
        x = self.norm(x[logits_indices])
        dense = logits_indices < (dense_rows or 0)
        return rows_by_format(self.lm_head, x, dense, dense_rows).float()
