"""PEFT LoRA adapters made for the tests: over a model with the bundled SmolLM2's shapes, or
over a tiny random transformers checkpoint (with its merged model as the reference)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import peft
import torch

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@functools.cache
def smollm2_skeleton():
    """A transformers Llama with SmolLM2-135M's shapes (random weights: an adapter file
    holds only its own A and B)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    with torch.device("meta"):  # no random init of 135M weights: allocated, never read
        model = transformers.LlamaForCausalLM(cfg)
    return model.to_empty(device="cpu")


def make_adapter(base, out_dir: Path, seed: int, targets=tuple(ALL), r: int = 8, alpha: int = 16,
                 b_scale: float = 1.0, **config):
    """Save a LoRA adapter with random A and B (B times `b_scale`) over `base` to out_dir;
    returns peft's model (merge_and_unload() gives the reference)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        init_lora_weights=False, r=r, lora_alpha=alpha, target_modules=list(targets), **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    model.save_pretrained(out_dir)
    return model
