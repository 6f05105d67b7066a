"""Model weights from GGUF files or HF checkpoint directories.

Both sources are normalised to one form: float32 tensors (or, for GGUF 4-bit blocks
when asked, `quant.Q4` codes that map onto the int4 kernel unchanged) under HF-style names
without the "model." prefix (embed_tokens.weight, layers.N.self_attn.q_proj.weight,
..., norm.weight, lm_head.weight), with GGUF's conversion-time edits undone (llama
q/k row permutation, Gemma's +1 on norm weights) and legacy expert names (Mixtral's
w1/w2/w3) renamed, so one model file serves every source.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tierlm.config import ModelConfig
from tierlm.kernels import Blocks
from tierlm.kernels import reference as ref
from tierlm.kernels.reference import FORMATS as kernel_formats
from tierlm.layers import quant
from tierlm.layers.quant import Q4
from tierlm.loader.gguf import BF16, F16, F32, GGUFFile


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
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma puts a norm after attention and around the MLP; its "ffn_norm" is the pre-MLP one.
_GGUF_GEMMA_NAMES = {
    **_GGUF_LAYER_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _unpermute(w: torch.Tensor | Q4 | Blocks, n_heads: int) -> torch.Tensor | Q4 | Blocks:
    """Undo llama.cpp's convert-time permute (interleaved -> rotate-half rows): a row
    permutation, so it applies to quantized rows (whole 32-element groups) alike."""
    rows = w.shape[0]
    order = torch.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).swapaxes(1, 2).reshape(rows)
    return w.rows(order) if isinstance(w, (Q4, Blocks)) else w[order]


def gguf_weights(g: GGUFFile, cfg: ModelConfig, keep_q4: bool = False,
                 lossy: set[str] | None = None, keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | Q4]]:
    """Yield (name, float32 tensor) one at a time so peak memory stays one tensor; with
    `keep_q4`, 2-D tensors stored as Q4_0/Q4_1/Q4_K come as `Q4` instead. The names of
    tensors the file stores quantized (any type but F32/F16/BF16) are added to `lossy`."""
    permute = cfg.architecture == "llama"
    gemma = cfg.architecture.startswith("gemma")
    names = _GGUF_GEMMA_NAMES if gemma else _GGUF_LAYER_NAMES
    for gname, t in g.tensors.items():
        if gname == "rope_freqs.weight":
            continue
        parts = gname.split(".", 2)
        local = parts[2] if parts[0] == "blk" and len(parts) == 3 else ""
        if gname in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[gname]
        elif local in names:
            name = f"layers.{parts[1]}.{names[local]}"
        else:
            raise WeightsError(f"unexpected tensor {gname!r} in GGUF file")
        if keep_blocks and len(t.shape) == 2 and t.ggml_type in kernel_formats:
            with warnings.catch_warnings():  # read-only file pages: packing copies what it keeps
                warnings.simplefilter("ignore", UserWarning)
                w = Blocks(torch.from_numpy(np.asarray(t.raw)), t.ggml_type, *t.shape)
        else:
            w = (quant.gguf_q4(t.raw, t.ggml_type, t.shape) if keep_q4 else None) or t.dequantize()
        if lossy is not None and t.ggml_type not in (F32, F16, BF16):
            lossy.add(name)
        if permute and local.startswith("attn_q."):
            w = _unpermute(w, cfg.num_heads)
        elif permute and local.startswith("attn_k."):
            w = _unpermute(w, cfg.num_kv_heads)
        if gemma and gname.endswith("norm.weight"):
            w = w - 1  # llama.cpp's converter stores Gemma's (1 + w); the model adds the 1 itself
        yield name, w


# The matrices `block_weights` quantizes: every linear projection (experts' too); the
# embedding and the output layer. A MoE router (`mlp.gate`) stays float.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK_QUANTIZATIONS = {"q8_0": ref.Q8_0, "q4_0": ref.Q4_0}  # --quantization -> GGUF type


def block_weights(tensors: Iterator[tuple[str, torch.Tensor]], quantization: str
                  ) -> Iterator[tuple[str, torch.Tensor | Blocks]]:
    """An HF checkpoint's float tensors with its linear projections quantized to GGUF
    blocks of `quantization` (q8_0 | q4_0) by gguf's reference quantizer, the same bytes
    llama.cpp's converter writes; the embedding and output layer as Q8_0 (the most
    sensitive matrices, as llama.cpp keeps them finer). Other tensors pass unchanged."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    low = BLOCK_QUANTIZATIONS[quantization]
    for name, t in tensors:
        leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
        head = name in ("embed_tokens.weight", "lm_head.weight")
        if t.dim() != 2 or not (head or leaf in _PROJECTIONS):
            yield name, t
            continue
        if t.shape[1] % 32:
            raise WeightsError(f"--quantization {quantization}: {name} has rows of {t.shape[1]} values; "
                               f"GGUF blocks hold 32, so every row length must be a multiple of 32")
        ggml_type = ref.Q8_0 if head else low
        raw = quantize(t.float().numpy(), GGMLQuantizationType(ggml_type))
        yield name, Blocks(torch.from_numpy(raw), ggml_type, *t.shape)


def hf_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"{model_dir} has no .safetensors files")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                yield _hf_name(name), f.get_tensor(name).float()


# Mixtral's legacy expert layout -> the gated-MLP names every other model uses.
_HF_RENAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
               (".w2.", ".down_proj."))


def _hf_name(name: str) -> str:
    name = name.removeprefix("model.")
    if ".block_sparse_moe." in name:
        for old, new in _HF_RENAMES:
            name = name.replace(old, new)
    return name
