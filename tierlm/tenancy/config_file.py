"""`tierlm serve --config FILE`: the TOML file that declares a TierSet (tiers + tenants).

The file is checked completely at startup; every problem is reported as
`FILE:LINE: dotted.key: what is wrong`, pointing at the offending key (or at its table
when a key is missing). Engine settings a tier does not give come from the command
line's engine flags, so `--kv-cache-gb 2` sets every tier's default. API keys are
hashed (SHA-256) as they are read; the plain text is never kept.

    default_tier = "fast"                 # optional: the first tier otherwise
    balanced_cost_weight = 1.0            # tier_mode "balanced": value = quality / cost ** this

    [tiers.fast]
    model = "smollm2-135m"                # bundled name, .gguf file or HF directory
    quality = 1                           # higher = better answers (orders `auto` routing)
    prompt_price_per_mtok = 0.02          # USD per million prompt tokens
    completion_price_per_mtok = 0.08
    max_num_seqs = 32                     # + dtype, quantization, dense_dtype, deterministic,
                                          #   reasoning_parser ("deepseek_r1" | "qwen3"),
                                          #   max_model_len, max_num_batched_tokens, kv_cache_gb,
                                          #   kv_cache_dtype ("auto" | "int8"), device ("cpu" |
                                          #   "cuda:1" | ...), gpu_memory_utilization, enforce_eager, ...

    [tiers.embed]
    model = "all-minilm-l6-v2"            # an encoder: serves /v1/embeddings (task = "embed" and
                                          #   pooling = "last" | "mean" make a decoder embed)

    [tenants.acme]
    api_keys = ["sk-acme-1"]              # or api_key_sha256 = ["<hex digest>"]
    tiers = ["fast", "deep"]              # allowed tiers (default: all)
    default_tier = "deep"                 # tier_mode "fixed" serves this one (default: the file's)
    weight = 2                            # fair-share weight in the scheduler
    requests_per_minute = 600             # quotas: all optional
    tokens_per_minute = 200000
    max_concurrent = 16
    cost_ceiling_usd = 5.0
    cost_period_s = 86400
    metrics = true                        # operator: sees every tenant's series on /metrics
    prefix_cache_group = "acme"           # share cached prompt prefixes with tenants of this group
                                          #   (default: none shared, so no tenant can time another's)

    [tenants.public]
    anonymous = true                      # serves requests without a key
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tierlm.config import (
    DEVICE_SPEC,
    ConfigError,
    EngineConfig,
    QuotaLimits,
    TenantConfig,
    TierConfig,
    TierSetConfig,
)

_CACHE_KEYS = ("kv_cache_gb", "kv_warm_gb", "kv_cold_dir", "kv_cold_gb", "session_ttl", "kv_cache_dtype")
_SCHED_KEYS = ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "long_prefill_chunk",
               "num_speculative_tokens")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Tier(_Strict):
    model: str | None = Field(None, min_length=1)
    adapter: str | None = Field(None, min_length=1)  # a LoRA adapter (PEFT directory) over tier `base`
    base: str | None = Field(None, min_length=1)
    max_loras: int | None = Field(None, gt=0)  # adapter slots of a base tier (default: its adapter tiers)
    max_lora_rank: int | None = Field(None, gt=0, le=512)
    quality: float = 1.0
    prompt_price_per_mtok: float = Field(0.0, ge=0)
    completion_price_per_mtok: float = Field(0.0, ge=0)
    task: Literal["auto", "generate", "embed"] | None = None  # embed: serves /v1/embeddings
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = None
    pooling: Literal["last", "mean", "cls", "max", "mean_sqrt_len"] | None = None
    dtype: Literal["bfloat16", "float32"] | None = None
    quantization: Literal["auto", "none", "int8", "int4"] | None = None
    dense_dtype: Literal["auto", "bfloat16", "float32"] | None = None
    deterministic: bool | None = None
    prefix_caching: bool | None = None
    max_num_seqs: int | None = Field(None, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    num_speculative_tokens: int | None = Field(None, ge=0, le=16)  # drafts per step, 0 = off
    draft_model: str | None = Field(None, min_length=1)  # drafts from this model instead of n-gram lookup
    max_model_len: int | None = Field(None, gt=0)
    long_prefill_chunk: int | None = Field(None, ge=0)
    kv_cache_gb: float | None = Field(None, gt=0)
    kv_warm_gb: float | None = Field(None, ge=0)
    kv_cold_dir: str | None = None
    kv_cold_gb: float | None = Field(None, gt=0)
    session_ttl: float | None = Field(None, ge=0)
    kv_cache_dtype: Literal["auto", "int8"] | None = None
    # Tiers may sit on different devices; on one GPU the share is the process's: a later
    # tier's KV pool gets what the earlier tiers left of it.
    device: str | None = Field(None, pattern=DEVICE_SPEC.pattern)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool | None = None


class _Tenant(_Strict):
    api_keys: list[str] = []
    api_key_sha256: list[str] = []
    anonymous: bool = False
    tiers: list[str] = []
    weight: float = Field(1.0, gt=0)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)
    cost_ceiling_usd: float | None = Field(None, gt=0)
    cost_period_s: float = Field(86_400.0, gt=0)
    default_tier: str | None = None  # tier_mode "fixed" serves this tier (default: the file's)
    metrics: bool = False  # an operator: sees every tenant's series on /metrics
    prefix_cache_group: str | None = Field(None, min_length=1)  # tenants naming one group share cached prefixes


class _File(_Strict):
    default_tier: str | None = None
    balanced_cost_weight: float = Field(1.0, ge=0, le=10)  # beyond 10, cost ** weight under/overflows
    tiers: dict[str, _Tier] = Field(min_length=1)
    tenants: dict[str, _Tenant] = {}


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def load(path: str | Path, base: EngineConfig) -> TierSetConfig:
    """Read and check a TierSet file; ConfigError with FILE:LINE on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"(.*) \(at line (\d+), column (\d+)\)$", str(e))
        where, what = (f"{m.group(2)}", f"{m.group(1)} (column {m.group(3)})") if m else ("1", str(e))
        raise ConfigError(f"{path}:{where}: invalid TOML: {what}") from None
    try:
        spec = _File.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise _located(path, text, first["loc"], first["msg"] + more) from None
    return _build(path, text, spec, base)


def _build(path: Path, text: str, spec: _File, base: EngineConfig) -> TierSetConfig:
    tiers = []
    for name, t in spec.tiers.items():
        try:
            tiers.append(_tier(name, t, base, spec))
        except ConfigError as e:
            raise _located(path, text, ("tiers", name), str(e)) from None
    names = list(spec.tiers)
    default = spec.default_tier or names[0]
    if default not in spec.tiers:
        raise _located(path, text, ("default_tier",), f"{default!r} is not a tier (tiers: {', '.join(names)})")
    tenants, owner = [], {}
    for name, t in spec.tenants.items():
        for i, tier in enumerate(t.tiers):
            if tier not in spec.tiers:
                raise _located(path, text, ("tenants", name, "tiers", i),
                               f"{tier!r} is not a tier (tiers: {', '.join(names)})")
        usable = t.tiers or names
        if t.default_tier is not None and t.default_tier not in usable:
            raise _located(path, text, ("tenants", name, "default_tier"),
                           f"{t.default_tier!r} is not a tier this tenant may use")
        hashes = [hash_key(k) for k in t.api_keys]
        for i, digest in enumerate(t.api_key_sha256):
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                raise _located(path, text, ("tenants", name, "api_key_sha256", i),
                               "must be a SHA-256 hex digest (64 hex digits)")
            hashes.append(bytes.fromhex(digest))
        for h in hashes:
            if h in owner:  # never echo the key itself
                raise _located(path, text, ("tenants", name), f"uses an API key of tenant {owner[h]!r}")
            owner[h] = name
        if t.anonymous and hashes:
            raise _located(path, text, ("tenants", name, "anonymous"), "an anonymous tenant takes no API keys")
        if not t.anonymous and not hashes:
            raise _located(path, text, ("tenants", name), "give api_keys (or api_key_sha256), or anonymous = true")
        limits = QuotaLimits(requests_per_minute=t.requests_per_minute, tokens_per_minute=t.tokens_per_minute,
                             max_concurrent=t.max_concurrent, cost_ceiling_usd=t.cost_ceiling_usd,
                             cost_period_s=t.cost_period_s)
        # Own salt by default; a named group's tenants share one (the prefixes keep the two apart).
        group = f"group:{t.prefix_cache_group}" if t.prefix_cache_group else f"tenant:{name}"
        tenants.append(TenantConfig(name, tuple(hashes), tuple(t.tiers), t.weight, limits, t.anonymous,
                                    operator=t.metrics, cache_group=group, default_tier=t.default_tier))
    if sum(t.anonymous for t in tenants) > 1:
        second = [t.name for t in tenants if t.anonymous][1]
        raise _located(path, text, ("tenants", second, "anonymous"), "only one tenant may be anonymous")
    return TierSetConfig(tuple(tiers), tuple(tenants), default, spec.balanced_cost_weight)


def _adapter_tier(name: str, t: _Tier, spec: _File, base: EngineConfig) -> TierConfig:
    """A LoRA adapter over another tier: that tier's engine, its own name, quality and prices."""
    engine_keys = [k for k in _Tier.model_fields if k not in ("adapter", "base", "quality", "prompt_price_per_mtok",
                                                                "completion_price_per_mtok")]
    own = [k for k in engine_keys if getattr(t, k) is not None]
    if own:
        raise ConfigError(f"an adapter tier runs on its base tier's engine: drop {', '.join(own)}")
    parent = spec.tiers.get(t.base)
    if parent is None or parent.adapter is not None:
        raise ConfigError(f"base {t.base!r} is not a model tier (tiers: {', '.join(spec.tiers)})")
    path = Path(t.adapter).expanduser()
    return TierConfig(name, _tier(t.base, parent, base, spec).engine, t.quality, t.prompt_price_per_mtok,
                      t.completion_price_per_mtok, lora_base=t.base, lora_path=str(path),
                      reasoning_parser=t.reasoning_parser or parent.reasoning_parser)


def _tier(name: str, t: _Tier, base: EngineConfig, spec: _File) -> TierConfig:
    """The tier's engine: the command line's engine settings with the tier's overrides (and
    LoRA slots when adapter tiers name it as their base)."""
    if (t.adapter is None) != (t.base is None):
        raise ConfigError("an adapter tier needs both adapter (its PEFT directory) and base (a model tier)")
    if t.adapter is not None:
        return _adapter_tier(name, t, spec, base)
    if t.model is None:
        raise ConfigError("give model (or adapter and base for a LoRA adapter tier)")
    over = sum(1 for other in spec.tiers.values() if other.base == name)
    lora = base.lora
    if over or t.max_loras or t.max_lora_rank:
        lora = dataclasses.replace(lora, enabled=True, modules=(),
                                   max_loras=t.max_loras or max(over, lora.max_loras),
                                   max_lora_rank=t.max_lora_rank or lora.max_lora_rank)
    cache = {k: getattr(t, k) for k in _CACHE_KEYS if getattr(t, k) is not None}
    if t.prefix_caching is not None:
        cache["enable_prefix_caching"] = t.prefix_caching
    sched = {k: getattr(t, k) for k in _SCHED_KEYS if getattr(t, k) is not None}
    engine = dataclasses.replace(
        base, model=t.model, dtype=t.dtype or base.dtype, quantization=t.quantization or base.quantization,
        dense_dtype=t.dense_dtype or base.dense_dtype,
        deterministic=base.deterministic if t.deterministic is None else t.deterministic,
        cache=dataclasses.replace(base.cache, **cache) if cache else base.cache,
        scheduler=dataclasses.replace(base.scheduler, **sched) if sched else base.scheduler,
        draft_model=t.draft_model,  # per tier only: a draft model must share its tier's vocabulary
        lora=lora, task=t.task or "auto", pooling=t.pooling, device=t.device or base.device,
        gpu_memory_utilization=t.gpu_memory_utilization or base.gpu_memory_utilization,
        enforce_eager=base.enforce_eager if t.enforce_eager is None else t.enforce_eager)
    return TierConfig(name, engine, t.quality, t.prompt_price_per_mtok, t.completion_price_per_mtok,
                      reasoning_parser=t.reasoning_parser)


def _located(path: Path, text: str, loc: tuple, message: str) -> ConfigError:
    key = ".".join(str(part) for part in loc if not isinstance(part, int))
    return ConfigError(f"{path}:{locate(text, loc)}: {key}: {message}")


_HEADER = re.compile(r"\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"\s*((?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*'))*)\s*=")


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(p.strip().strip("\"'") for p in re.split(r"\.(?=(?:[^\"']*[\"'][^\"']*[\"'])*[^\"']*$)", dotted))


def locate(text: str, loc: tuple) -> int:
    """The line that defines `loc` (a key path) in TOML `text`: the key's own line, else
    the line of its longest defined prefix (a missing key points at its table); 1 if none."""
    want = tuple(str(p) for p in loc if not isinstance(p, int))
    best, best_len, table = 1, 0, ()
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(line):
            table = _parts(m.group(1))
            path = table
        elif m := _KEY.match(line):
            path = table + _parts(m.group(1))
        else:
            continue
        n = len(path)
        if n > best_len and want[:n] == path:
            best, best_len = number, n
    return best
