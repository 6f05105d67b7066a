"""Tensor-parallel sharding of a loaded Llama-family model: each rank keeps its part.

Megatron's split, done on the loaded model's modules (layers stay plain PyTorch):
- q/k/v and gate/up are column-parallel: a rank keeps the rows of its heads and of its
  slice of the intermediate size, and computes them with no communication;
- o and down are row-parallel: a rank multiplies its heads' (its slice's) inputs by the
  matching columns, and the partial sums are all-reduced (in float32);
- the embedding and the output layer are vocabulary-parallel: a rank holds a contiguous
  slice of the vocabulary; embedding rows outside it are zero before the all-reduce (one
  rank contributes each row, so the sum is exact), and the logits slices are all-gathered.
KV heads are split as evenly as they go (SmolLM2's 3 over 2 ranks: 2 and 1), each with
its query heads, so a rank's attention and KV cache cover only its own heads; with more
ranks than KV heads, a KV head is copied on the ranks sharing its query heads. Every rank
runs the same products in the same order on every step: results are reproducible and a
row's logits do not depend on its batch (the dense kernels are batch-invariant per shape).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tierlm.config import ConfigError, ModelConfig
from tierlm.layers.linear import Linear
from tierlm.layers.mlp import GatedMLP


def split(total: int, size: int, rank: int) -> range:
    """Rank `rank`'s contiguous part of `total` items over `size` ranks (the first ranks one more)."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    size: int
    kv_heads: range
    heads: range
    intermediate: range
    vocab: range
    vocab_part: int  # the widest rank's vocabulary slice (all-gather takes equal sizes)


def plan(cfg: ModelConfig, rank: int, size: int) -> ShardPlan:
    """Rank `rank`'s heads, intermediate slice and vocabulary slice. Up to one rank per KV
    head, the KV heads are split (each with its query heads); beyond, each KV head is copied
    on the ranks sharing its query heads (Gemma-3-270M's one KV head over 2 ranks), which
    needs whole, equal query-head parts within one KV group each."""
    if cfg.moe is not None:
        raise ConfigError("tensor parallelism does not split mixture-of-experts layers")
    group = cfg.num_heads // cfg.num_kv_heads
    if size <= cfg.num_kv_heads:
        kv = split(cfg.num_kv_heads, size, rank)
        heads = range(kv.start * group, kv.stop * group)
    elif size % cfg.num_kv_heads == 0 and cfg.num_heads % size == 0:
        heads = split(cfg.num_heads, size, rank)
        kv = range(heads.start // group, heads.start // group + 1)
    else:
        raise ConfigError(f"tensor parallel size {size} does not divide the model's {cfg.num_heads} attention "
                          f"heads over its {cfg.num_kv_heads} KV heads (up to {cfg.num_kv_heads} ranks, or a "
                          f"multiple of it that divides {cfg.num_heads})")
    return ShardPlan(rank, size, kv, heads, split(cfg.intermediate_size, size, rank),
                     split(cfg.vocab_size, size, rank), -(-cfg.vocab_size // size))


def local_config(cfg: ModelConfig, p: ShardPlan) -> ModelConfig:
    """The model as this rank sees it: its heads and intermediate slice (vocab stays whole:
    logits come back whole)."""
    return replace(cfg, num_heads=len(p.heads), num_kv_heads=len(p.kv_heads), intermediate_size=len(p.intermediate))


def _dense(layer: Linear) -> torch.Tensor:
    if layer.quantized is not None:
        raise ConfigError("tensor parallelism shards dense weights (quantization none)")
    return layer.dense_weight().detach()


def _rows(layer: Linear, index: torch.Tensor) -> Linear:
    """A Linear computing only outputs `index` of `layer`."""
    out = Linear(layer.in_features, len(index), bias=layer.bias is not None, deterministic=layer.deterministic)
    out.weight = nn.Parameter(_dense(layer)[index].clone(), requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach()[index].clone(), requires_grad=False)
    out.dense_dtype = layer.dense_dtype
    return out


def _columns(layer: Linear, index: torch.Tensor) -> Linear:
    """A Linear taking only inputs `index` of `layer` (a partial sum of its outputs)."""
    if layer.bias is not None:
        raise ConfigError("a row-parallel projection with a bias is not supported")
    out = Linear(len(index), layer.out_features, deterministic=layer.deterministic)
    out.weight = nn.Parameter(_dense(layer)[:, index].contiguous(), requires_grad=False)
    out.dense_dtype = layer.dense_dtype
    return out


def _span(r: range, width: int, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset + r.start * width, offset + r.stop * width)


class RowParallel(nn.Module):
    """A projection over this rank's slice of the inputs; partial sums all-reduced in float32."""

    def __init__(self, inner: Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        y = self.inner(x, dense_rows).float()
        dist.all_reduce(y)
        return y.to(x.dtype)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor, vocab: range) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight[vocab.start : vocab.stop].clone(), requires_grad=False)
        self.start = vocab.start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight).float()
        rows[~inside] = 0.0
        dist.all_reduce(rows)  # each row comes from exactly one rank: the sum is that row
        return rows.to(self.weight.dtype)


class VocabParallelHead(nn.Module):
    """This rank's vocabulary slice of the logits, all-gathered into whole rows."""

    quantized = None  # rows_by_format: one format

    def __init__(self, inner: Linear, p: ShardPlan, vocab_size: int) -> None:
        super().__init__()
        self.inner, self.part = inner, p.vocab_part
        self.widths = [len(split(vocab_size, p.size, r)) for r in range(p.size)]  # each rank's slice

    def forward(self, x: torch.Tensor, dense_rows: int | None = 0) -> torch.Tensor:
        y = self.inner(x, dense_rows).float()
        if y.shape[1] < self.part:
            y = torch.cat([y, y.new_zeros(y.shape[0], self.part - y.shape[1])], dim=1)
        parts = [torch.empty_like(y) for _ in self.widths]
        dist.all_gather(parts, y.contiguous())
        return torch.cat([part[:, :width] for part, width in zip(parts, self.widths)], dim=1)


def shard_model(model: nn.Module, cfg: ModelConfig, p: ShardPlan, attention) -> ModelConfig:
    """Replace `model`'s projections, embedding and head by this rank's parts (in place) and
    give its layers `attention`, a backend built for the local head counts; returns the
    local config (its KV cache's shape)."""
    if not hasattr(model, "layers") or not all(hasattr(layer.self_attn, "hkv") for layer in model.layers):
        raise ConfigError("tensor parallelism supports Llama-family models")
    d, heads, kv_heads, inter = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    q = _span(p.heads, d)
    k = _span(p.kv_heads, d, heads * d)
    v = _span(p.kv_heads, d, (heads + kv_heads) * d)
    gate, up = _span(p.intermediate, 1), _span(p.intermediate, 1, inter)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(mlp, GatedMLP):
            raise ConfigError("tensor parallelism needs dense gated MLPs")
        attn.qkv_proj = _rows(attn.qkv_proj, torch.cat([q, k, v]))
        attn.o_proj = RowParallel(_columns(attn.o_proj, q))
        attn.h, attn.hkv = len(p.heads), len(p.kv_heads)
        attn.backend = attention
        mlp.gate_up_proj = _rows(mlp.gate_up_proj, torch.cat([gate, up]))
        mlp.down_proj = RowParallel(_columns(mlp.down_proj, gate))
    model.attention = attention
    vocab = _span(p.vocab, 1)
    model.lm_head = VocabParallelHead(_rows(model.lm_head, vocab), p, cfg.vocab_size)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.weight.detach(), p.vocab)
    return local_config(cfg, p)
