"""Gemma 3 text decoder (Gemma-3-270M and up, GGUF or HF `Gemma3ForCausalLM`).

Differs from the Llama family in ways that are the architecture, not switches:
embeddings scaled by sqrt(hidden) (rounded to the weight dtype, as the reference
does), RMSNorms that scale by (1 + weight), a norm after attention and around the
MLP as well as before, q/k RMSNorm per head, GeGLU with tanh GELU, and interleaved
sliding-window (local RoPE base) and global (global base, optional scaling) layers.
The window itself arrives in each layer's attention metadata.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tierlm.attention.base import AttentionBackend, AttentionMetadata
from tierlm.config import ModelConfig
from tierlm.layers.activation import row_tiled
from tierlm.layers.linear import Linear, rows_by_format
from tierlm.layers.mlp import GatedMLP
from tierlm.layers.norm import GemmaRMSNorm
from tierlm.layers.rotary import RotaryEmbedding


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, backend: AttentionBackend,
                 deterministic: bool) -> None:
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.h + 2 * self.hkv) * self.d, bias=cfg.attention_bias,
                               deterministic=deterministic)
        self.o_proj = Linear(self.h * self.d, cfg.hidden_size, deterministic=deterministic)
        self.q_norm = GemmaRMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.d, cfg.rms_norm_eps)
        self.rope = rope
        self.backend = backend

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, dense_rows: int | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x, dense_rows).split([self.h * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = self.q_norm(q.reshape(-1, self.h, self.d))
        k = self.k_norm(k.reshape(-1, self.hkv, self.d))
        q, k = self.rope(positions, q, k)
        attn = self.backend.forward(q, k, v.reshape(-1, self.hkv, self.d), kv[0], kv[1], meta)
        return self.o_proj(attn, dense_rows)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, backend: AttentionBackend,
                 deterministic: bool) -> None:
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(dim, eps)
        self.self_attn = Gemma3Attention(cfg, rope, backend, deterministic)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps)
        self.mlp = GatedMLP(dim, cfg.intermediate_size, cfg.hidden_act, deterministic)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps)

    def forward(self, x, positions, kv, meta, dense_rows):
        attn = self.self_attn(self.input_layernorm(x), positions, kv, meta, dense_rows)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), dense_rows))


class Gemma3ForCausalLM(nn.Module):
    """Parameters are named after HF's (with fused qkv_proj / gate_up_proj)."""

    def __init__(self, cfg: ModelConfig, attention: AttentionBackend, deterministic: bool = True) -> None:
        super().__init__()
        self.config = cfg
        ctx = cfg.max_position_embeddings
        global_rope = RotaryEmbedding(cfg.head_dim, ctx, cfg.rope_theta, cfg.rope_scaling)
        local_rope = RotaryEmbedding(cfg.head_dim, ctx, cfg.rope_local_theta or cfg.rope_theta, None)
        backend = self.attention = attention  # one instance, shared by every layer (attention/registry.py)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_scale = math.sqrt(cfg.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, local_rope if cfg.layer_window(i) else global_rope, backend, deterministic)
            for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, deterministic=deterministic)
        if cfg.tie_word_embeddings:
            self.lm_head.tie(self.embed_tokens.weight)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], metas: list[AttentionMetadata],
                logits_indices: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        """One step -> float32 logits [len(logits_indices), vocab] (see LlamaForCausalLM.forward)."""
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        for layer, kv, meta in zip(self.layers, kv_caches, metas):
            x = layer(x, positions, kv, meta, dense_rows)
        dense = logits_indices < (dense_rows or 0)
        logits = rows_by_format(self.lm_head, self.norm(x[logits_indices]), dense, dense_rows).float()
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = row_tiled(lambda v: torch.tanh(v / cap) * cap, logits, logits.shape[-1])
        return logits
