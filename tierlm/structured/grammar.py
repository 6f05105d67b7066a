"""Structured output: what a request asks for, the grammar-backend protocol, and the
compiled-grammar cache.

A request's `GuidedSpec` names a constraint (JSON schema, regex, choice list or a Lark
grammar). The engine compiles it once per distinct spec through a `GrammarBackend`
(llguidance by default; another engine is one adapter file), gives each request its
own `GrammarState`, masks the sampler's logits with `allowed()` every step and
advances the state with each accepted token.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

import torch

from tierlm.structured.spec import GuidedSpec


class GrammarError(ValueError):
    """The constraint cannot be compiled; the message is the compiler's."""


class GrammarState(Protocol):
    """One request's position in its grammar."""

    def allowed(self) -> torch.Tensor:
        """Bool mask [vocab]: tokens that keep the output inside the grammar."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False if the grammar rejects it."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        ...

    def is_finished(self) -> bool:
        """True once nothing but the end of the output can follow."""
        ...


def allowed_masks(states: list[GrammarState]) -> torch.Tensor:
    """Bool masks [len(states), vocab], computed together when the backend's state type
    offers `allowed_batch` (llguidance does, on its own threads), else one by one."""
    kind = type(states[0])
    batch = getattr(kind, "allowed_batch", None)
    if batch is not None and all(type(s) is kind for s in states):
        return batch(states)
    return torch.stack([s.allowed() for s in states])


class GrammarBackend(Protocol):
    def compile(self, spec: GuidedSpec) -> Any:
        """A compiled grammar (raises GrammarError with the compiler's message)."""
        ...

    def new_state(self, compiled: Any) -> GrammarState: ...


class GrammarCompiler:
    """Compiles specs through a backend, caching the most recent distinct ones."""

    def __init__(self, backend: GrammarBackend, capacity: int = 256) -> None:
        self.backend = backend
        self.capacity = capacity
        self._cache: OrderedDict[GuidedSpec, Any] = OrderedDict()

    def state_for(self, spec: GuidedSpec) -> GrammarState:
        compiled = self._cache.get(spec)
        if compiled is None:
            compiled = self.backend.compile(spec)
            self._cache[spec] = compiled
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(spec)
        return self.backend.new_state(compiled)
