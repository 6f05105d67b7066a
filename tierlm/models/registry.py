"""Architecture registry: HF architecture names and GGUF `general.architecture` values
mapped to model classes. An unsupported architecture fails fast, listing the known ones."""

from __future__ import annotations

from torch import nn

from tierlm.models.gemma3 import Gemma3ForCausalLM
from tierlm.models.llama import LlamaForCausalLM

_BY_NAME: dict[str, type[nn.Module]] = {
    # HF config.json "architectures"
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    # GGUF general.architecture
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


class UnsupportedArchitecture(ValueError):
    pass


def supported() -> list[str]:
    return sorted(_BY_NAME)


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return _BY_NAME[architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported())}") from None
