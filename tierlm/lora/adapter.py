"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`
(or `adapter_model.bin`), read into per-module (A, B, scale) in Hugging Face's layout.

A module's output gains `scale * B @ (A @ x)`: A is [r, in], B is [out, r], scale is
`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA; `rank_pattern` and
`alpha_pattern` give single modules their own rank and alpha, as PEFT matches them
(the pattern, as a regular expression, ends the module's dotted name). Targets: the
attention projections q/k/v/o and the MLP's gate/up/down (experts' included). The
loader keeps every GGUF tensor in Hugging Face's row layout (loader/weights.py undoes
llama.cpp's q/k permutation), so an adapter's rows apply as they are.

Anything else PEFT can describe is refused with one line naming it: DoRA, adapters on
the embedding or the output layer, `modules_to_save`, trained biases, other PEFT types.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class LoRAError(ValueError):
    """The adapter cannot be served as given (one line: what and where)."""


@dataclass(frozen=True)
class LoRAModule:
    a: torch.Tensor  # [r, in], float32
    b: torch.Tensor  # [out, r], float32
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """scale * B @ A: what the adapter adds to the module's weight."""
        return self.scale * (self.b @ self.a)


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    name: str
    path: Path
    modules: dict[str, LoRAModule]  # "layers.{i}.self_attn.q_proj" ... (the loader's names, unfused)
    digest: str = ""  # sha256 of its config and weight files: what its outputs depend on

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def key(self) -> str:
        """Its identity in slots and prefix-cache hashes: the name and the files' digest (the
        same name loaded again from other files is another adapter)."""
        return f"{self.name}@{self.digest[:16]}"


def _matches(pattern: str, module: str) -> bool:
    return re.fullmatch(rf"(.*\.)?(?:{pattern})", module) is not None


def _config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoRAError(f"{path}: no adapter_config.json (a PEFT LoRA adapter directory is expected)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{cfg_path}: not valid JSON ({e})") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    if cfg.get("use_dora"):
        raise LoRAError(f"{cfg_path}: DoRA adapters (use_dora) are not supported")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"{cfg_path}: modules_to_save ({', '.join(cfg['modules_to_save'])}) is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{cfg_path}: trained biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("fan_in_fan_out"):
        raise LoRAError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not supported")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise LoRAError(f"{cfg_path}: r must be a positive integer, got {cfg.get('r')!r}")
    return cfg


def _weights_file(path: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            return path / name
    raise LoRAError(f"{path}: no adapter_model.safetensors or adapter_model.bin")


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line refusal
        raise LoRAError(f"{file}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _digest(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def load_adapter(path: str | Path, name: str, max_rank: int | None = None) -> LoRAAdapter:
    """Read and check a PEFT LoRA adapter; LoRAError (one line) for anything unsupported
    or unreadable (a name too long, no permission: the file system's own reason)."""
    path = Path(path)
    try:
        return _load(path, name, max_rank)
    except OSError as e:
        raise LoRAError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _load(path: Path, name: str, max_rank: int | None) -> LoRAAdapter:
    if not path.is_dir():
        raise LoRAError(f"{path}: not a directory (a PEFT LoRA adapter directory is expected)")
    cfg = _config(path)
    weights = _weights_file(path)
    tensors = _tensors(weights)
    if any("lora_embedding" in key for key in tensors):
        raise LoRAError(f"{path}: embedding adapters not supported (LoRA on {', '.join(TARGETS)} only)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue
        module = m["module"]
        if module.rsplit(".", 1)[-1] not in TARGETS:
            raise LoRAError(f"{path}: an adapter on {module!r} is not supported (LoRA on {', '.join(TARGETS)} only)")
        pairs.setdefault(module, {})[m["ab"]] = t.float()
    extra = sorted(key for key in tensors if _KEY.match(key) is None)
    if extra:  # whole layers saved beside the adapter (embeddings, modules_to_save)
        raise LoRAError(f"{path}: the adapter carries full weights ({extra[0]}"
                        f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}); not supported")
    if not pairs:
        raise LoRAError(f"{path}: the adapter holds no LoRA weights")
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{path}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise LoRAError(f"{path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not pair")
        if max_rank is not None and r > max_rank:
            raise LoRAError(f"{path}: {module} has rank {r}, over --max-lora-rank {max_rank}")
        alpha = next((v for p, v in cfg.get("alpha_pattern", {}).items() if _matches(p, module)),
                     cfg.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        modules[module] = LoRAModule(a.contiguous(), b.contiguous(), float(scale))
    return LoRAAdapter(name, path, modules, _digest(path / "adapter_config.json", weights))
