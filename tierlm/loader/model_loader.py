"""Build a ready model + tokenizer from a model argument (name, .gguf or HF dir)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tierlm import kernels
from tierlm.attention import registry
from tierlm.config import ConfigError, ModelConfig
from tierlm.device import CPU
from tierlm.kernels import BlockEmbedding, Blocks, BlockWeight
from tierlm.kernels.reference import FORMATS as kernel_formats
from tierlm.layers import quant
from tierlm.layers.linear import Linear
from tierlm.layers.quant import Q4
from tierlm.loader import bundled, configs, tokenizer, weights
from tierlm.loader.gguf import BF16, F16, F32, GGUFFile
from tierlm.models.registry import model_class


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: tokenizer.TextTokenizer
    path: Path
    # Linear layers per decode weight format, e.g. {"int4": 210, "dense": 1}.
    formats: dict[str, int] = field(default_factory=dict)
    # Whether it runs on tierlm's kernels (GGUF blocks, kernel attention): one numeric
    # format for every row, so no role-based split anywhere downstream.
    kernels: bool = False
    dense_dtype: torch.dtype | None = None  # what its dense products run in


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


def _join(parts: list) -> torch.Tensor | Q4 | list[Blocks]:
    """Concatenate fused sources by rows; quantized only if every part is (GGUF blocks
    stay a list of parts: a fused q/k/v may mix formats)."""
    if all(isinstance(p, Blocks) for p in parts):
        return Blocks.join(parts)
    if all(isinstance(p, Q4) for p in parts):
        return Q4.cat(parts)
    return torch.cat([p.dequantize() if isinstance(p, Q4) else p for p in parts])


def _quantized(layer: Linear, t: torch.Tensor | Q4, quantization: str, lossy: bool, device: torch.device
               ) -> tuple[quant.QuantizedWeight, torch.Tensor | None] | None:
    """The layer's decode-time weight format for checkpoint tensor `t` and its weight as
    that kernel sees it (float32, the prompt rows' dense copy), or None for dense.

    "auto" keeps 4-bit blocks as int4 and runs other quantized GGUF types (Q8_0, Q5_0,
    Q6_K, ...; `lossy`) as int8 per output channel: no torch kernel reads those blocks,
    and int8 holds their 5-8 bit values more finely than bf16 holds a float's range.
    The dense copy is made here from the codes: from a built int4 kernel it would cost a
    GEMM of K rows per layer (~5 s for SmolLM2 on AVX2, on the first request)."""
    if isinstance(t, (Blocks, list)):  # the file's own blocks, run by tierlm.kernels for every row
        return BlockWeight(t if isinstance(t, list) else [t]), None
    if device.type == "cuda":
        return _cuda_quantized(layer, t, quantization, device)
    fits = quant.int4_fits(layer.out_features, layer.in_features)
    q4 = None
    if isinstance(t, Q4) and fits:
        q4 = t
    elif quantization == "int8" or (quantization == "auto" and (lossy or isinstance(t, Q4))):
        q8 = quant.Int8Weight(t.dequantize() if isinstance(t, Q4) else t)
        return q8, q8.dequantize()
    elif quantization == "int4" and fits:
        q4 = quant.quantize_q4(t)
    if q4 is None:
        return None
    return quant.Int4Weight(q4), quant.Int4Weight.kernel_view(q4)


def _cuda_quantized(layer: Linear, t: torch.Tensor | Q4, quantization: str, device: torch.device
                    ) -> tuple[quant.QuantizedWeight, None] | None:
    """On CUDA: 4-bit blocks (and `int4`'s quantized dense weights) on PyTorch's int4 kernel,
    everything else dense in the compute dtype (no CUDA kernel reads GGUF's other blocks).
    No dense copy is kept: deterministic steps run every row on the int4 kernel, others
    build the copy on first use."""
    if not quant.cuda_int4_fits(layer.out_features, layer.in_features):
        return None
    if isinstance(t, Q4):  # asked only when quantization is not none
        return quant.CudaInt4Weight(t, device), None
    if quantization == "int4":
        return quant.CudaInt4Weight(quant.quantize_q4(t), device), None
    return None


def _fill(model: nn.Module, tensors, dtype: torch.dtype, progress: bool, total: int,
          quantization: str, lossy: set[str], device: torch.device) -> dict[str, int]:
    """Put every checkpoint tensor in its place; returns layer counts per weight format.
    `lossy`: names of the tensors the file stores quantized; `device`: where quantized
    kernels run (dense tensors are placed on the CPU and moved with the model)."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    pending: dict[str, dict[int, torch.Tensor | Q4]] = {}
    seen: set[str] = set()
    formats: dict[str, int] = {}
    head_blocks = None  # the embedding's GGUF blocks: a tied output layer runs on them
    from tqdm import tqdm

    for name, t in tqdm(tensors, total=total, desc="loading weights", unit="tensor",
                        disable=not progress, leave=False):
        fused = _fusion_target(name)
        if fused is not None:
            target, leaf, i = fused
            parts = pending.setdefault(target, {})
            parts[i] = t
            if name in lossy:
                lossy.add(target)
            if len(parts) < len(_FUSED[leaf]):
                continue
            name, t = target, _join([parts[j] for j in range(len(parts))])
            del pending[target]
        if name not in params:
            raise weights.WeightsError(f"checkpoint tensor {name!r} has no place in the model")
        if isinstance(t, list):
            shape = (sum(p.shape[0] for p in t), t[0].shape[1])
        else:
            shape = tuple(t.shape)
        if params[name].shape != shape:
            raise weights.WeightsError(
                f"{name}: checkpoint shape {shape} != model {tuple(params[name].shape)}")
        owner = modules.get(name.removesuffix(".weight"))
        q = None
        if isinstance(owner, Linear) and name.endswith(".weight") and quantization != "none":
            # int8 for the output layer even under int4: it is the most sensitive one.
            mode = "int8" if quantization == "int4" and name == "lm_head.weight" else quantization
            q = _quantized(owner, t, mode, name in lossy, device)
        if name == "embed_tokens.weight" and isinstance(t, Blocks):
            # The table stays the file's blocks (looked up row by row); a tied output layer shares them.
            head_blocks = BlockWeight([t])
            model.embed_tokens = BlockEmbedding(head_blocks, dtype)
        elif q is not None:
            owner.set_quantized(*q)
            _count(formats, f"int{q[0].bits}" if q[0].bits else "gguf-blocks")
        else:
            params[name].data = (t.dequantize() if isinstance(t, (Q4, Blocks)) else t).to(dtype)
            if isinstance(owner, Linear):
                _count(formats, "dense")
        seen.add(name)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = set(params) - seen - tied
    if missing or pending:
        raise weights.WeightsError(f"checkpoint lacks tensors: {sorted(missing | set(pending))[:5]}")
    if tied and head_blocks is not None:
        model.lm_head.shares_weight = False  # drops the placeholder table it was tied to
        model.lm_head.set_quantized(head_blocks)
        _count(formats, "gguf-blocks")
    elif tied:
        model.lm_head.tie(model.embed_tokens.weight)
        quantize_head = device.type == "cpu" and (
            quantization in ("int8", "int4") or (quantization == "auto" and "embed_tokens.weight" in lossy))
        if quantize_head:  # int8 even under int4, as above
            model.lm_head.set_quantized(quant.Int8Weight(model.embed_tokens.weight))
            _count(formats, "int8" if quantize_head else "dense")
        else:
            _count(formats, "dense")
    return formats


def _count(formats: dict[str, int], key: str) -> None:
    formats[key] = formats.get(key, 0) + 1


def load_tokenizer(model: str, cache_dir: Path) -> tokenizer.TextTokenizer:
    """Only the tokenizer of a model argument (name, .gguf or HF dir), as `load` builds it."""
    path = bundled.resolve(model, cache_dir)
    if path.is_file():
        return tokenizer.from_gguf(GGUFFile(path), cache_dir)
    cfg = configs.hf_config(path)
    return tokenizer.from_hf_dir(path, cfg.eos_token_ids, cfg.bos_token_id)


def load_config(model: str, cache_dir: Path) -> ModelConfig:
    """Only the architecture of a model argument (name, .gguf or HF dir), as `load` reads it."""
    path = bundled.resolve(model, cache_dir)
    return configs.gguf_config(GGUFFile(path)) if path.is_file() else configs.hf_config(path)


def load(model: str, *, dtype: torch.dtype, block_size: int, deterministic: bool,
         cache_dir: Path, progress: bool = False, quantization: str = "auto",
         dense_dtype: torch.dtype | Callable[[], torch.dtype] | None = None,
         device: torch.device = CPU, attention_backend: str = "auto") -> LoadedModel:
    """`quantization`: see EngineConfig (the int4/int8 kernels need dtype bfloat16);
    `dense_dtype`: the dtype every Linear's dense products run in (None: `dtype`), or a
    function giving it, called only for a model off the kernels (they have no dense products).
    `device`: where the model runs (tierlm/device.py); off the CPU, or with the paged
    attention backend asked for, a GGUF file runs on PyTorch's ops, not tierlm's kernels."""
    path = bundled.resolve(model, cache_dir)
    lossy: set[str] = set()
    kernel_device = device.type == "cpu" and attention_backend == "auto"
    if dtype != torch.bfloat16 and quantization == "auto":
        quantization = "none"  # float32 asks for precision: dense throughout
    if path.is_file() and quantization in weights.BLOCK_QUANTIZATIONS:
        raise ConfigError(f"quantization {quantization} quantizes a Hugging Face checkpoint on load; "
                          f"a GGUF file runs its own block formats (quantization auto)")
    if path.is_file():
        g = GGUFFile(path)
        cls = model_class(g.architecture)
        cfg = configs.gguf_config(g)
        tok = tokenizer.from_gguf(g, cache_dir)
        blocks = quantization == "auto" and kernel_device and on_kernels(g, block_size)
        tensors = weights.gguf_weights(g, cfg, keep_q4=quantization != "none", lossy=lossy, keep_blocks=blocks)
        if blocks:
            kernels.use_threads()
        total = len(g.tensors)
    else:
        cls = model_class(configs.hf_architecture(path))
        cfg = configs.hf_config(path)
        tok = tokenizer.from_hf_dir(path, cfg.eos_token_ids, cfg.bos_token_id)
        tensors, total = weights.hf_weights(path), None
        blocks = quantization in weights.BLOCK_QUANTIZATIONS
        if blocks and not kernel_device:
            raise ConfigError(f"quantization {quantization} runs on tierlm's CPU kernels, not on device "
                              f"{device.type} or the paged attention backend (use int4 or none)")
        if blocks:
            if block_size % 16:
                raise ConfigError(f"quantization {quantization} runs on tierlm's kernels, whose attention "
                                  f"needs a block size that is a multiple of 16, got {block_size}")
            tensors = weights.block_weights(tensors, quantization)
            kernels.use_threads()
    stops = tuple(sorted(set(cfg.eos_token_ids) | set(tok.eos_token_ids)))
    if stops != cfg.eos_token_ids:  # the tokenizer knows end-of-turn tokens the config omits
        from dataclasses import replace

        cfg = replace(cfg, eos_token_ids=stops)
    if callable(dense_dtype):
        dense_dtype = dtype if blocks else dense_dtype()
    attention = registry.make(registry.choose(on_kernels=blocks, device=device.type, asked=attention_backend),
                              cfg, block_size)
    # Batch-invariant tiled GEMMs are probed for the CPU's BLAS; on CUDA, cuBLAS runs as it is (README "GPU").
    net = cls(cfg, attention, deterministic=deterministic and device.type == "cpu")
    for m in net.modules():
        if isinstance(m, Linear):
            m.dense_dtype = dense_dtype
    formats = _fill(net, tensors, dtype, progress, total, quantization, lossy, device)
    net.to(device)
    net.eval()
    _return_freed_memory()
    # The GGUF memory map is not kept: every weight now lives in our own tensors, and its
    # touched file pages (~0.1 GB for SmolLM2) would otherwise stay resident.
    return LoadedModel(net, cfg, tok, path, formats, kernels=blocks, dense_dtype=dense_dtype or dtype)


def _return_freed_memory() -> None:
    """Give the allocator's freed pages back to the OS (glibc keeps large freed chunks
    in its heap: the load's transient copies would stay resident for the process's life)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def on_kernels(g: GGUFFile, block_size: int) -> bool:
    """Whether a GGUF model runs on tierlm's kernels: every quantized matrix in a format
    they compute (else the PyTorch path runs it whole, never a mix of the two), and cache
    blocks of whole 16-key chunks for their attention."""
    quantized = {t.ggml_type for t in g.tensors.values() if len(t.shape) == 2 and t.ggml_type not in (F32, F16, BF16)}
    return block_size % 16 == 0 and quantized <= set(kernel_formats)
