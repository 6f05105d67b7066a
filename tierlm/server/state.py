"""The server's run-time state: its tiers (engine, tokenizer, metrics per model), the LoRA
adapters served over them, and what every handler reads (tenants, the default tier,
readiness)."""

from __future__ import annotations

import dataclasses
import statistics
from collections import deque
from dataclasses import dataclass, field

from tierlm.config import TierConfig
from tierlm.engine.async_engine import AsyncEngine
from tierlm.loader.tokenizer import TextTokenizer
from tierlm.lora.adapter import LoRAAdapter
from tierlm.server.errors import APIError
from tierlm.server.metrics import Metrics, TierMetrics
from tierlm.tenancy.tenants import Tenants

_TYPICAL_OUTPUT = 128  # completion tokens assumed before a tier has finished any request


@dataclass
class Tier:
    """One tier at run time: its engine and what handlers need to serve on it."""

    config: TierConfig
    engine: AsyncEngine
    tokenizer: TextTokenizer
    max_model_len: int
    vocab_size: int
    metrics: TierMetrics
    recent_outputs: deque = field(default_factory=lambda: deque(maxlen=64))  # completion lengths
    # A LoRA adapter over tier `parent`'s engine (one copy of the base weights); `routable`:
    # a TierSet tier `auto` may choose, not an adapter clients name themselves.
    lora: LoRAAdapter | None = None
    parent: str | None = None
    routable: bool = True
    # "generate" (chat, completions) or "embed" (/v1/embeddings: `engine` is then an
    # EmbeddingEngine over `embedder`).
    task: str = "generate"
    embedder: object | None = None

    @property
    def model_name(self) -> str:  # what responses report as `model`
        return self.config.name

    def typical_output(self) -> int:
        """Completion tokens a request without max_tokens is expected to take (latency estimates)."""
        return int(statistics.median(self.recent_outputs)) if self.recent_outputs else _TYPICAL_OUTPUT


@dataclass
class ServerState:
    """What handlers need; owned by the app factory. `tiers` keeps declaration order."""

    tiers: dict[str, Tier]
    tenants: Tenants
    default_tier: str
    metrics: Metrics
    balanced_cost_weight: float = 1.0
    ready: bool = False
    draining: bool = False
    # LoRA adapters by name, each a Tier sharing its base tier's engine (`tiers` holds
    # one entry per engine, so health and load are counted once).
    adapters: dict[str, Tier] = field(default_factory=dict)
    allow_runtime_lora: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    declared_tenants: bool = False  # tenants come from a TierSet file (runtime LoRA: operators only)

    @property
    def default(self) -> Tier:
        return self.tiers[self.default_tier]

    @property
    def healthy(self) -> bool:
        return all(t.engine.healthy for t in self.tiers.values())

    @property
    def restarting(self) -> bool:  # an engine is being rebuilt after a failed step
        return any(t.engine.restarting for t in self.tiers.values())

    @property
    def serving(self) -> bool:
        """Ready for requests: loaded and warmed, healthy, not draining nor rebuilding an engine."""
        return self.ready and not self.draining and self.healthy and not self.restarting

    @property
    def num_inflight(self) -> int:
        return sum(t.engine.num_inflight for t in self.tiers.values())

    def served(self) -> list[Tier]:
        """Every tier and adapter clients may name."""
        return [*self.tiers.values(), *self.adapters.values()]

    def routable(self, task: str = "generate") -> list[Tier]:
        """What `auto` chooses among for `task`: the tiers and the TierSet's adapter tiers."""
        return [t for t in (*self.tiers.values(), *(t for t in self.adapters.values() if t.routable))
                if t.task == task]

    def add_adapter(self, base: str, adapter: LoRAAdapter, config: TierConfig | None = None,
                    routable: bool = False) -> Tier:
        """Serve `adapter` over tier `base`'s engine under the adapter's name."""
        parent = self.tiers[base]
        tier = dataclasses.replace(parent, config=config or dataclasses.replace(parent.config, name=adapter.name),
                                   recent_outputs=deque(maxlen=64), lora=adapter, parent=base, routable=routable)
        self.adapters[tier.model_name] = tier
        return tier

    def resolve(self, model: str) -> Tier:
        """The tier a `model` value names: a tier or adapter name, else the first tier serving that model."""
        tier = (self.tiers.get(model) or self.adapters.get(model)
                or next((t for t in self.tiers.values() if t.config.engine.model == model), None))
        if tier is None:
            names = ", ".join([*self.tiers, *self.adapters])
            raise APIError(404, f"the model '{model}' does not exist; this server serves {names}"
                           + (" and auto" if len(self.tiers) > 1 else ""),
                           param="model", code="model_not_found", type="not_found_error")
        return tier
