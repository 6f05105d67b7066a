"""A decoder step on tierlm's fused kernels: ~8 calls per layer instead of ~60 PyTorch ops.

Built from a loaded Llama-family or Gemma-3 model whose every projection runs on the
kernels (GGUF blocks, `tierlm.kernels.BlockWeight`), it reads the modules' weights once
and runs a step as: residual add + RMSNorm, fused q/k/v projection, q/k norm + RoPE +
K/V write + paged attention, output projection, residual + norm, gate/up projection,
gated activation, down projection. With the compiled kernels the layers run in one C++
call per step (`kernels.decoder`, GIL released once); the loop here is the same sequence
of the same kernels, run where they are the PyTorch reference and in tests as the
C++ decoder's oracle. The residual stream stays float32 between layers
(the module path rounds it to bf16 at every op); each kernel computes a row whole, in a
fixed order, so a token's logits do not depend on the batch, its role or the threads.
Models it does not cover (sparse MoE blocks, dense projections) run their modules.
LoRA adapter slots (lora/slots.py) attach per projection: each row adds its own
adapter's product right after the base product (`kernels.lora_add`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tierlm import kernels
from tierlm.attention.base import AttentionMetadata
from tierlm.kernels import BlockEmbedding, BlockWeight
from tierlm.layers.linear import Linear
from tierlm.layers.mlp import GatedMLP
from tierlm.layers.norm import GemmaRMSNorm, RMSNorm


def _weight(norm: nn.Module | None) -> torch.Tensor | None:
    """A norm's effective fp32 scale: w (RMSNorm) or 1 + w (Gemma's)."""
    if norm is None:
        return None
    w = norm.weight.detach().float()
    return (1.0 + w).contiguous() if isinstance(norm, GemmaRMSNorm) else w.contiguous()


def _parts(layer: Linear) -> kernels.Parts:
    return layer.quantized.kernel_parts


def _bias(layer: Linear) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().float()


@dataclass
class _Layer:
    in_norm: torch.Tensor
    qkv: kernels.Parts
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    o: kernels.Parts
    post_attn: torch.Tensor | None  # Gemma: the attention branch's own norm before the add
    pre_mlp: torch.Tensor
    gate_up: kernels.Parts
    down: kernels.Parts
    post_mlp: torch.Tensor | None  # Gemma
    lora: tuple = (None, None, None, None)  # adapter slots of qkv, o, gate_up, down (lora/slots.py)


class FusedDecoder:
    def __init__(self, model: nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 layer_group: list[int], lora=None) -> None:
        """`kv_caches[i]` is layer i's (K, V) pages, `layer_group[i]` its KV group (the
        index of its attention inputs in a step); `lora` the model's adapter slots
        (lora/slots.py `LoRASlots`), run after each base product they target."""
        cfg = model.config
        self.cfg = cfg
        self.gemma = hasattr(model, "embed_scale")
        self.embed = model.embed_tokens
        self.embed_scale = getattr(model, "embed_scale", None)
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.eps = cfg.rms_norm_eps
        self.act = cfg.hidden_act
        self.heads = cfg.num_heads
        self.scale = model.layers[0].self_attn.backend.scale
        self.layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                in_norm=_weight(layer.input_layernorm), qkv=_parts(attn.qkv_proj), qkv_bias=_bias(attn.qkv_proj),
                q_norm=_weight(attn.q_norm), k_norm=_weight(attn.k_norm),
                cos=attn.rope.cos.contiguous(), sin=attn.rope.sin.contiguous(), o=_parts(attn.o_proj),
                post_attn=_weight(layer.post_attention_layernorm) if self.gemma else None,
                pre_mlp=_weight(layer.pre_feedforward_layernorm if self.gemma else layer.post_attention_layernorm),
                gate_up=_parts(mlp.gate_up_proj), down=_parts(mlp.down_proj),
                post_mlp=_weight(layer.post_feedforward_layernorm) if self.gemma else None))
        self.final_norm = _weight(model.norm)
        self.head = _parts(model.lm_head)
        self.softcap = getattr(cfg, "final_logit_softcap", None)
        self.kv_caches, self.layer_group = kv_caches, layer_group
        self.native = kernels.decoder(self.heads, self.eps, self.scale, self.act)
        if self.native is not None:
            for layer, (k_cache, v_cache), group in zip(self.layers, kv_caches, layer_group):
                self.native.add_layer(layer.in_norm, layer.qkv.args, layer.qkv_bias, layer.q_norm, layer.k_norm,
                                      layer.cos, layer.sin, layer.o.args, layer.post_attn, layer.pre_mlp,
                                      layer.gate_up.args, layer.down.args, layer.post_mlp, k_cache, v_cache, group)
            self.native.set_head(self.final_norm, self.head.args)
        self.lora = lora
        if lora is not None:
            self._attach(lora)

    def _attach(self, slots) -> None:
        """Each layer's adapter slots, in the Python loop and the C++ decoder."""
        for i, layer in enumerate(self.layers):
            projs = tuple(slots.projections.get(f"layers.{i}.{name}")
                          for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))
            layer.lora = projs
            if self.native is not None:
                for k, p in enumerate(projs):
                    if p is not None:
                        self.native.set_lora(i, k, p.A, p.B, p.ends, p.active)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Every projection on the kernels, dense gated MLPs, the norms this file knows, and an
        output layer (a model that embeds has none: its last hidden states are its output)."""
        layers = getattr(model, "layers", None)
        if layers is None or not isinstance(getattr(model, "lm_head", None), Linear):
            return False
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        norms_ok = all(isinstance(m, (RMSNorm, GemmaRMSNorm)) for name, m in model.named_modules()
                       if name.endswith("norm") or name.endswith("layernorm"))
        qkv = {id(layer.self_attn.qkv_proj) for layer in layers}
        return (norms_ok and all(isinstance(m.quantized, BlockWeight) for m in linears)
                and all(isinstance(layer.mlp, GatedMLP) for layer in layers)
                and model.config.hidden_act in kernels.GATED
                and all(m.bias is None for m in linears if id(m) not in qkv))

    def forward(self, input_ids: torch.Tensor, groups: list[AttentionMetadata], logits_indices: torch.Tensor,
                loop: bool = False) -> torch.Tensor:
        """One step -> float32 logits [len(logits_indices), vocab] (as the model's forward;
        called inside the runner's inference mode). `groups`: each KV group's attention
        inputs; `loop` runs the Python loop even where the C++ decoder exists."""
        x = self.embed.rows(input_ids) if isinstance(self.embed, BlockEmbedding) else self.embed(input_ids).float()
        if self.embed_scale is not None:  # the scale rounded to the model dtype, as the reference rounds it
            x = x * float(torch.tensor(self.embed_scale, dtype=self.dtype))
        x = x.contiguous()
        rows = self.lora.rows if self.lora is not None else None
        if self.native is not None and not loop:
            logits = self.native.forward(x, [(g.tables, g.seq, g.positions, g.window or 0) for g in groups],
                                         logits_indices, kernels.isa_index(), rows)
        else:
            logits = self._loop(x, [groups[g] for g in self.layer_group], logits_indices)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _loop(self, x: torch.Tensor, metas: list[AttentionMetadata], logits_indices: torch.Tensor) -> torch.Tensor:
        h = kernels.residual_norm(x, None, None, self.layers[0].in_norm, self.eps)
        for i, (layer, (k_cache, v_cache), meta) in enumerate(zip(self.layers, self.kv_caches, metas)):
            lq, lo, lgu, ld = layer.lora
            qkv = _project(h, layer.qkv, lq)
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            a = kernels.rope_attention(qkv, self.heads, layer.cos, layer.sin, layer.q_norm, layer.k_norm, self.eps,
                                       k_cache, v_cache, meta.tables, meta.seq, meta.positions, meta.window or 0,
                                       self.scale)
            h = kernels.residual_norm(x, _project(a, layer.o, lo), layer.post_attn, layer.pre_mlp, self.eps)
            m = kernels.gated(_project(h, layer.gate_up, lgu), self.act)
            following = self.layers[i + 1].in_norm if i + 1 < len(self.layers) else self.final_norm
            h = kernels.residual_norm(x, _project(m, layer.down, ld), layer.post_mlp, following, self.eps)
        return kernels.linear(h.index_select(0, logits_indices), self.head)


def _project(x: torch.Tensor, parts: kernels.Parts, lora) -> torch.Tensor:
    """The base product on the kernels, then each row's adapter product when slots attach."""
    y = kernels.linear(x, parts)
    return y if lora is None else lora.apply(x, y)
