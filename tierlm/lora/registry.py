"""The adapters an engine knows by name, read and checked against its model once.

`LoRARequest` is vLLM's offline handle (name, integer id, path): the first request that
names an adapter loads it from its path; later ones reuse it. The server registers its
`--lora-modules` at start and those loaded at run time (`/v1/load_lora_adapter`). An
adapter is held in host memory from registration to removal; which adapters are resident
in the runner's slots is the scheduler's business (scheduler/lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tierlm.lora.adapter import LoRAAdapter, LoRAError, load_adapter
from tierlm.lora.slots import Target, check


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for one request, as vLLM's offline API names it."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


class AdapterRegistry:
    def __init__(self, where: dict[str, Target], max_rank: int) -> None:
        self.where = where  # the model's adaptable modules (lora/slots.py `LoRASlots.where`)
        self.max_rank = max_rank
        self.adapters: dict[str, LoRAAdapter] = {}

    def add(self, name: str, path: str | Path) -> LoRAAdapter:
        """Read, check and register an adapter; LoRAError (one line) if it cannot serve,
        or if `name` is taken."""
        if not name or not isinstance(name, str):
            raise LoRAError("an adapter needs a non-empty name")
        if name in self.adapters:
            raise LoRAError(f"an adapter named {name!r} is already loaded")
        adapter = load_adapter(path, name, self.max_rank)
        check(adapter, self.where)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> LoRAAdapter:
        """Forget an adapter (requests already running with it finish with it); KeyError if unknown."""
        return self.adapters.pop(name)

    def get(self, name: str) -> LoRAAdapter | None:
        return self.adapters.get(name)

    def resolve(self, lora: str | LoRARequest | LoRAAdapter) -> LoRAAdapter:
        """The adapter a request names: a registered name, or a LoRARequest (loaded on first use)."""
        if isinstance(lora, LoRAAdapter):
            return lora
        if isinstance(lora, LoRARequest):
            known = self.adapters.get(lora.lora_name)
            if known is not None and Path(known.path).resolve() == Path(lora.lora_path).resolve():
                return known
            if known is not None:
                raise LoRAError(f"adapter {lora.lora_name!r} is already loaded from {known.path}, "
                                f"not {lora.lora_path}")
            return self.add(lora.lora_name, lora.lora_path)
        known = self.adapters.get(lora)
        if known is None:
            raise KeyError(lora)
        return known

    def names(self) -> list[str]:
        return list(self.adapters)
