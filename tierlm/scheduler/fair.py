"""Weighted Virtual Token Counter: which tenant's request to admit next.

In the spirit of "Fairness in Serving Large Language Models" (Sheng et al., OSDI'24):
every tenant has a counter of the service it received, in weighted tokens (prompt
tokens x `prompt_weight` + output tokens x `output_weight`, divided by the tenant's
fair-share weight). Admission always picks the backlogged tenant with the smallest
counter, so a tenant flooding the queue is served at its share while a light tenant is
never starved. A tenant that goes idle and comes back is lifted to the smallest counter
among the backlogged tenants: idle time is not banked as credit. Pure bookkeeping; the
scheduler charges it as tokens are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VirtualTokenCounter:
    prompt_weight: float = 1.0
    output_weight: float = 2.0  # a generated token costs more than a prefilled one
    shares: dict[str, float] = field(default_factory=dict)  # tenant -> fair-share weight (default 1)
    counters: dict[str, float] = field(default_factory=dict)

    def arrive(self, tenant: str, backlogged: set[str]) -> None:
        """A request of `tenant` joins the queue; `backlogged` are the tenants already waiting."""
        if tenant in backlogged:
            return
        others = [self.counters.get(t, 0.0) for t in backlogged]
        floor = min(others) if others else max(self.counters.values(), default=0.0)
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = self.prompt_weight * prompt_tokens + self.output_weight * output_tokens
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.shares.get(tenant, 1.0)

    def pick(self, backlogged: set[str], seats: dict[str, int] | None = None) -> str:
        """The backlogged tenant to serve next. Ties (a newcomer is lifted to the smallest
        counter) go to the tenant holding fewer `seats` in the batch, then by name, so the
        choice is deterministic."""
        seats = seats or {}
        return min(backlogged, key=lambda t: (self.counters.get(t, 0.0), seats.get(t, 0), t))
