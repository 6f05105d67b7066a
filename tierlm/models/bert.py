"""BERT encoder (all-MiniLM-L6-v2 and the other sentence-transformers BERTs).

Post-norm blocks of bidirectional attention and a GELU MLP over absolute position and
token-type embeddings. Plain PyTorch over a flat batch like the decoders: every input's
tokens are one [T] row of ids, and each input attends only to itself in its own
attention call, so there is no padding, no mask, and no KV cache (an encoder reads its
whole input at once). Projections run on the batch-invariant `Linear`, norms are per
row and activations run in row tiles, so an input's embedding has the same bits in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.config import ConfigError
from tierlm.layers.activation import row_tiled
from tierlm.layers.linear import Linear

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, hf: dict) -> BertConfig:
        """From a checkpoint's config.json (ConfigError for what this encoder does not run)."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"BERT position_embedding_type {hf['position_embedding_type']!r} is not supported "
                              "(only 'absolute')")
        act = hf.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ConfigError(f"BERT hidden_act {act!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
        try:
            cfg = cls(hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"],
                      hf["intermediate_size"], hf["max_position_embeddings"], hf.get("type_vocab_size", 2),
                      float(hf.get("layer_norm_eps", 1e-12)), act)
        except KeyError as e:
            raise ConfigError(f"BERT config.json lacks {e.args[0]!r}") from None
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"BERT hidden_size {cfg.hidden_size} is not a multiple of "
                              f"num_attention_heads {cfg.num_heads}")
        return cfg


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, deterministic: bool) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.qkv = Linear(h, 3 * h, bias=True, deterministic=deterministic)  # query, key, value rows
        self.attn_out = Linear(h, h, bias=True, deterministic=deterministic)
        self.attn_norm = nn.LayerNorm(h, cfg.layer_norm_eps)
        self.up = Linear(h, cfg.intermediate_size, bias=True, deterministic=deterministic)
        self.down = Linear(cfg.intermediate_size, h, bias=True, deterministic=deterministic)
        self.out_norm = nn.LayerNorm(h, cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, lens: list[int]) -> torch.Tensor:
        t, h = x.shape
        q, k, v = self.qkv(x).view(t, 3, self.heads, self.head_dim).unbind(1)
        outs, start = [], 0
        for n in lens:  # one call per input: its keys are its own tokens, all of them
            span = slice(start, start + n)
            o = F.scaled_dot_product_attention(q[span].transpose(0, 1), k[span].transpose(0, 1),
                                               v[span].transpose(0, 1))
            outs.append(o.transpose(0, 1).reshape(n, h))
            start += n
        x = self.attn_norm(x + self.attn_out(torch.cat(outs)))
        up = self.up(x)
        # Row tiles: an elementwise kernel split across threads by tensor size gives the
        # elements at a split other last bits (layers/activation.py).
        return self.out_norm(x + self.down(row_tiled(self.act, up, up.shape[-1])))


class BertEncoder(nn.Module):
    """Token ids of several inputs, flat -> their last hidden states [T, hidden] (float32)."""

    def __init__(self, cfg: BertConfig, deterministic: bool = True) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h, _weight=torch.empty(cfg.vocab_size, h))
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h,
                                                _weight=torch.empty(cfg.max_position_embeddings, h))
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h, _weight=torch.empty(cfg.type_vocab_size, h))
        self.embed_norm = nn.LayerNorm(h, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg, deterministic) for _ in range(cfg.num_layers))
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, lens: list[int]) -> torch.Tensor:
        positions = torch.cat([torch.arange(n) for n in lens])
        # Every input is one segment (type 0), as sentence-transformers encodes a sentence.
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, lens)
        return x


# Checkpoint tensor name (after the encoder prefix) -> ours; q/k/v are fused into qkv.
_RENAMES = {
    "embeddings.word_embeddings.weight": "word_embeddings.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
}
_LAYER_RENAMES = {
    "attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "out_norm",
}
_QKV = ("attention.self.query", "attention.self.key", "attention.self.value")


def load_weights(model: BertEncoder, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `model` from a checkpoint's tensors (names with or without a `bert.` prefix);
    every parameter must be found (ConfigError naming the first one missing)."""
    tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
    state: dict[str, torch.Tensor] = {ours: tensors[theirs] for theirs, ours in _RENAMES.items() if theirs in tensors}
    for i in range(model.config.num_layers):
        pre = f"encoder.layer.{i}."
        for theirs, ours in _LAYER_RENAMES.items():
            for leaf in ("weight", "bias"):
                if pre + f"{theirs}.{leaf}" in tensors:
                    state[f"layers.{i}.{ours}.{leaf}"] = tensors[pre + f"{theirs}.{leaf}"]
        for leaf in ("weight", "bias"):
            parts = [tensors.get(pre + f"{name}.{leaf}") for name in _QKV]
            if all(p is not None for p in parts):
                state[f"layers.{i}.qkv.{leaf}"] = torch.cat(parts)
    params = dict(model.named_parameters())
    missing = [name for name in params if name not in state]
    if missing:
        raise ConfigError(f"the BERT checkpoint lacks weights for {missing[0]} ({len(missing)} missing)")
    for name, p in params.items():
        src = state[name]
        if src.shape != p.shape:
            raise ConfigError(f"BERT weight {name}: shape {tuple(src.shape)}, the config needs {tuple(p.shape)}")
        p.data = src.to(torch.float32).contiguous()
