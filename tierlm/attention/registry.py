"""Attention backends by name, and which one a model gets.

"kernels": tierlm's own paged attention (attention/kernel.py), for models whose weights
run on the kernels (one numeric path for every row); "torch": PyTorch's CPU flash kernel
in batch-invariant tiles (attention/torch_ref.py), for every other model on the CPU;
"paged": the device-neutral paged attention (attention/paged.py), a Triton kernel on CUDA,
chosen on the CPU only when asked. Model files only receive the backend in their constructor.
"""

from __future__ import annotations

from tierlm.attention.base import AttentionBackend
from tierlm.attention.kernel import KernelPagedAttention
from tierlm.attention.paged import PagedAttention
from tierlm.attention.torch_ref import TorchPagedAttention
from tierlm.config import ModelConfig

BACKENDS: dict[str, type] = {"torch": TorchPagedAttention, "kernels": KernelPagedAttention,
                              "paged": PagedAttention}


def choose(*, on_kernels: bool, device: str = "cpu", asked: str = "auto") -> str:
    """The backend for a model on `device` (a torch device type) whose weights do (or do
    not) run on the kernels; `asked`: EngineConfig.attention_backend."""
    if device == "cuda" or asked == "paged":
        return "paged"  # the loader keeps such a model off the kernels
    if device != "cpu":
        raise ValueError(f"no attention backend for device {device!r}")
    return "kernels" if on_kernels else "torch"


def make(name: str, cfg: ModelConfig, block_size: int) -> AttentionBackend:
    """One backend instance for a model (shared by its layers)."""
    return BACKENDS[name](cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attn_scale or cfg.head_dim ** -0.5,
                          block_size)
