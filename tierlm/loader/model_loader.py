"""Build a ready model + tokenizer from a model argument (name, .gguf or HF dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tierlm.config import ModelConfig
from tierlm.loader import bundled, configs, tokenizer, weights
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


# Checkpoint tensors fused into one of our parameters, by the last two name parts
# (so experts and shared experts fuse like a dense MLP): target -> ordered sources.
_FUSED = {
    "qkv_proj.weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
    "qkv_proj.bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
    "gate_up_proj.weight": ("gate_proj.weight", "up_proj.weight"),
}
_SOURCE_TO_FUSED = {src: (dst, i) for dst, srcs in _FUSED.items() for i, src in enumerate(srcs)}


def _fusion_target(name: str) -> tuple[str, str, int] | None:
    """'layers.0.mlp.experts.3.up_proj.weight' -> (fused name, its leaf, source index)."""
    stem, _, leaf_head = name.rpartition(".")[0].rpartition(".")
    leaf = f"{leaf_head}.{name.rpartition('.')[2]}"
    if leaf not in _SOURCE_TO_FUSED:
        return None
    dst, i = _SOURCE_TO_FUSED[leaf]
    return f"{stem}.{dst}", dst, i


def _fill(model: nn.Module, tensors, dtype: torch.dtype, progress: bool, total: int) -> None:
    params = dict(model.named_parameters())
    pending: dict[str, dict[int, torch.Tensor]] = {}
    seen: set[str] = set()
    from tqdm import tqdm

    for name, t in tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                        disable=not progress, leave=False):
        fused = _fusion_target(name)
        if fused is not None:
            target, leaf, i = fused
            parts = pending.setdefault(target, {})
            parts[i] = t
            if len(parts) < len(_FUSED[leaf]):
                continue
            name, t = target, torch.cat([parts[j] for j in range(len(parts))])
            del pending[target]
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
        cls = model_class(g.architecture)
        cfg = configs.gguf_config(g)
        tok = tokenizer.from_gguf(g, cache_dir)
        tensors, total, source = weights.gguf_weights(g, cfg), len(g.tensors), g
    else:
        cls = model_class(configs.hf_architecture(path))
        cfg = configs.hf_config(path)
        tok = tokenizer.from_hf_dir(path, cfg.eos_token_ids, cfg.bos_token_id)
        tensors, total, source = weights.hf_weights(path), None, None
    stops = tuple(sorted(set(cfg.eos_token_ids) | set(tok.eos_token_ids)))
    if stops != cfg.eos_token_ids:  # the tokenizer knows end-of-turn tokens the config omits
        from dataclasses import replace

        cfg = replace(cfg, eos_token_ids=stops)
    net = cls(cfg, block_size=block_size, deterministic=deterministic)
    _fill(net, tensors, dtype, progress, total)
    net.eval()
    return LoadedModel(net, cfg, tok, path, source)
