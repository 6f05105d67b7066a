"""Which device an engine runs on: `--device auto|cpu|cuda|cuda:N` resolved to a torch.device.

auto is CUDA when PyTorch sees a CUDA device and every option of the config runs there,
else the CPU (with a log line saying why). Asking for CUDA where there is none, for a
device index past the last one, or for an option CUDA does not run (`cuda_refusal`) is a
ConfigError at startup, never a silent run on the CPU. What runs on CUDA (README "GPU"):
dense or int4 weights on PyTorch's CUDA ops, paged attention on a Triton kernel
(attention/paged.py), the hot KV pool in GPU memory, decode steps replayed from CUDA
graphs (runner/cuda_graphs.py).
"""

from __future__ import annotations

import logging

import torch

from tierlm.config import DEVICE_SPEC, ConfigError

CPU = torch.device("cpu")
log = logging.getLogger("tierlm.device")


def resolve(spec: str) -> torch.device:
    """The device `spec` names on this machine (ConfigError if it is not there)."""
    if not DEVICE_SPEC.match(spec):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return CPU
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError(f"device {spec}: {why} (use --device cpu)")
    device = torch.device("cuda" if spec == "auto" else spec)
    index = device.index or 0
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {spec}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """'cpu', or 'cuda:0 (NVIDIA H100 80GB HBM3, 79.2 GiB)' for logs and /ready."""
    if device.type != "cuda":
        return "cpu"
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"


def engine_device(config) -> torch.device:
    """An EngineConfig's device. An explicit cuda with an option CUDA does not run is a
    ConfigError; auto then picks the CPU and logs why."""
    device = resolve(config.device)
    if device.type != "cuda":
        return device
    why = cuda_refusal(config)
    if why is None:
        return device
    if config.device == "auto":
        log.warning("device auto: running on the CPU: %s", why)
        return CPU
    raise ConfigError(f"device {config.device}: {why}")


def cuda_refusal(config) -> str | None:
    """Why this build cannot run `config` (an EngineConfig) on CUDA, or None."""
    refusals = (
        (config.tensor_parallel_size > 1,
         "tensor parallelism runs on the CPU (gloo) only; one replica per GPU: --data-parallel-size"),
        (config.lora.enabled, "LoRA adapters are served on the CPU only"),
        (config.task == "embed", "embedding models run on the CPU only"),
        (config.cache.kv_cache_dtype == "int8", "the int8 KV cache runs on the CPU kernels only"),
        (config.draft_model is not None, "draft-model speculative decoding runs on the CPU only"),
        (config.quantization in ("int8", "q8_0", "q4_0"),
         f"quantization {config.quantization} runs on CPU kernels; on CUDA use auto, int4 or none"),
    )
    return next((why for refused, why in refusals if refused), None)
