"""Which task a model runs (text or vectors) and building the embedder for the second:
an `Encoder` for encoder checkpoints, a `DecoderEncoder` for decoders started with task embed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tierlm.config import ConfigError, EngineConfig
from tierlm.device import engine_device
from tierlm.embed.decoder import DecoderEncoder
from tierlm.embed.encoder import Encoder, is_encoder
from tierlm.loader import bundled
from tierlm.runner import kernel_probe


def task_of(config: EngineConfig, cache_dir: Path) -> str:
    """"generate" or "embed" for `config` (its "auto" resolved from the model's architecture)."""
    encoder = is_encoder(bundled.resolve(config.model, cache_dir))
    if encoder and config.task == "generate":
        raise ConfigError(f"{config.model} is an encoder model: it embeds (task embed) and cannot generate text")
    task = "embed" if encoder or config.task == "embed" else "generate"
    if task == "generate" and config.pooling is not None:
        raise ConfigError("pooling applies to embedding models (task embed)")
    return task


def build_embedder(config: EngineConfig, *, cache_dir: Path | None = None,
                   progress: bool = False) -> Encoder | DecoderEncoder:
    """A ready embedder for `config` (whose task resolves to embed)."""
    from tierlm.engine.builder import build_engine, default_cache_dir

    cache_dir = cache_dir or default_cache_dir()
    path = bundled.resolve(config.model, cache_dir)
    if config.lora.enabled:
        raise ConfigError("LoRA adapters are not supported on an embedding model")
    engine_device(dataclasses.replace(config, task="embed"))  # embeddings run on the CPU: cuda is refused
    if is_encoder(path):
        enc = Encoder(path, config.deterministic)
        if config.pooling is not None:
            enc.spec = dataclasses.replace(enc.spec, pooling=config.pooling)
        if config.deterministic:
            kernel_probe.ensure_probed(enc.model, cache_dir)
        return enc
    if config.scheduler.num_speculative_tokens:
        raise ConfigError("speculative decoding does not apply to an embedding model")
    engine = build_engine(dataclasses.replace(config, task="embed"), cache_dir=cache_dir, progress=progress)
    return DecoderEncoder(engine, config.pooling or "last")
