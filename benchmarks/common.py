"""Helpers shared by the benchmark scripts: the llama.cpp peer and prompt making."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def disable_llama_cpp_extra_bufts() -> None:
    """llama.cpp's extra (AMX) buffer types crash inside this VM: switch them off for every model."""
    import llama_cpp

    default = llama_cpp.llama_cpp.llama_model_default_params
    if getattr(default, "tierlm_patched", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params.tierlm_patched = True
    llama_cpp.llama_cpp.llama_model_default_params = params


def llama_cpp_model(path: Path, n_ctx: int, n_threads: int):
    """llama-cpp-python's Llama on `path` (the benchmark peer)."""
    import llama_cpp

    disable_llama_cpp_extra_bufts()
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, n_batch=512, verbose=False)


def make_prompt_ids(tokenizer, n_tokens: int, salt: int) -> list[int]:
    """A prompt of exactly n_tokens ids from varied text (salted so prompts differ)."""
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing", "matches", "in", "distant", "valleys", "of", "ancient", "kingdoms", "near", "rivers"]
    text = " ".join(words[(i * 7 + salt) % len(words)] for i in range(n_tokens * 2))
    return tokenizer.encode(f"Story {salt}: {text}")[:n_tokens]


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "isa": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d")}


def record(name: str, command: str, results: dict) -> Path:
    out = Path(__file__).with_name("results") / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": machine(), **results}, indent=1))
    return out
