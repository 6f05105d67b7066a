"""Build a ready model + tokenizer from a model argument (name, .gguf or HF dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tierlm.config import ModelConfig
from tierlm.loader import bundled, tokenizer, weights
from tierlm.loader.gguf import GGUFFile
from tierlm.models.registry import model_class


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: tokenizer.TextTokenizer
    path: Path
    # Kept open for GGUF sources: the raw quantized blocks stay addressable (memory map).
    gguf: GGUFFile | None = None


# Checkpoint tensors fused into one of our parameters: target -> ordered sources.
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_SOURCE_TO_FUSED = {src: (dst, i) for dst, srcs in _FUSED.items() for i, src in enumerate(srcs)}


def _fill(model: nn.Module, tensors, dtype: torch.dtype, progress: bool, total: int) -> None:
    params = dict(model.named_parameters())
    pending: dict[str, dict[int, torch.Tensor]] = {}
    seen: set[str] = set()
    from tqdm import tqdm

    for name, t in tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                        disable=not progress, leave=False):
        prefix, _, rest = name.partition(".")
        if prefix == "layers":
            idx, _, local = rest.partition(".")
            if local in _SOURCE_TO_FUSED:
                dst, i = _SOURCE_TO_FUSED[local]
                parts = pending.setdefault(f"layers.{idx}.{dst}", {})
                parts[i] = t
                if len(parts) == len(_FUSED[dst]):
                    name, t = f"layers.{idx}.{dst}", torch.cat([parts[j] for j in range(len(parts))])
                    del pending[name]
                else:
                    continue
        if name not in params:
            raise weights.WeightsError(f"checkpoint tensor {name!r} has no place in the model")
        if params[name].shape != t.shape:
            raise weights.WeightsError(
                f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(params[name].shape)}")
        params[name].data = t.to(dtype)
        seen.add(name)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(params) - seen - tied
    if missing or pending:
        raise weights.WeightsError(f"checkpoint lacks tensors: {sorted(missing | set(pending))[:5]}")
    if tied:
        model.lm_head.weight = model.embed_tokens.weight


def load(model: str, *, dtype: torch.dtype, block_size: int, deterministic: bool,
         cache_dir: Path, progress: bool = False) -> LoadedModel:
    path = bundled.resolve(model, cache_dir)
    if path.is_file():
        g = GGUFFile(path)
        cfg = weights.gguf_config(g)
        cls = model_class(cfg.architecture)
        tok = tokenizer.from_gguf(g, cache_dir)
        tensors, total, source = weights.gguf_weights(g, cfg), len(g.tensors), g
    else:
        cfg = weights.hf_config(path)
        cls = model_class(cfg.architecture)
        tok = tokenizer.from_hf_dir(path, cfg.eos_token_ids, cfg.bos_token_id)
        tensors, total, source = weights.hf_weights(path), None, None
    if not cfg.eos_token_ids and tok.eos_token_ids:
        from dataclasses import replace

        cfg = replace(cfg, eos_token_ids=tok.eos_token_ids)
    net = cls(cfg, block_size=block_size, deterministic=deterministic)
    _fill(net, tensors, dtype, progress, total)
    net.eval()
    return LoadedModel(net, cfg, tok, path, source)
