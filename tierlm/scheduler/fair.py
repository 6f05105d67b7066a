"""Weighted Virtual Token Counter: which tenant's request to admit next.

In the spirit of "Fairness in Serving Large Language Models" (Sheng et al., OSDI'24):
every tenant has a counter of the service it received, in weighted tokens (prompt
tokens x `prompt_weight` + output tokens x `output_weight`, divided by the tenant's
fair-share weight). Admission always picks the backlogged tenant with the smallest
counter, so a tenant flooding the queue is served at its share while a light tenant is
never starved. A tenant that goes idle and comes back is lifted to the smallest counter
among the backlogged tenants: idle time is not banked as credit. Pure bookkeeping; the
scheduler charges it as tokens are computed. `FairShare` is the scheduler's "fair" queue
policy (scheduler/policy.py) built on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.scheduler.policy import NO_TURN


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


class FairShare:
    """Policy "fair": tenants take turns by their virtual token counters; requests of one
    tenant go by `key` (priority). See `turn` for the seat and prefill holdback."""

    def __init__(self, key, shares: dict[str, float]) -> None:
        self.key = key
        self.vtc = VirtualTokenCounter(shares=shares)

    def arrive(self, req, waiting: list) -> None:
        self.vtc.arrive(req.tenant, {r.tenant for r in waiting})

    def next_waiting(self, waiting: list, running: list):
        """The first waiting request of the least-served waiting tenant."""
        tenant = self.vtc.pick({r.tenant for r in waiting}, seats(running))
        return next(r for r in waiting if r.tenant == tenant)

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        self.vtc.charge(tenant, prompt_tokens, output_tokens)

    def turn(self, waiting: list, running: list, budget: int, max_num_seqs: int, chunk: int):
        """When the tenant next in line holds fewer seats than its weighted share: (a
        request to give up its seat when every seat is taken, tokens of the step's budget
        held back for the newcomer's prefill, tenants whose requests sit this step out).
        The seat comes from the last (by policy) request of the tenant furthest over its
        share, one per step, never from a tenant at or below its share: two busy tenants
        settle at their shares instead of trading seats. A tenant with nothing running (a
        light one) also gets a step without the decodes of tenants over their share, so
        its first token costs about what it costs alone; they lose one step."""
        if not waiting:
            return NO_TURN
        held = seats(running)
        backlogged = {r.tenant for r in waiting}
        nxt = self.vtc.pick(backlogged, held)
        weights = {t: self.vtc.shares.get(t, 1.0) for t in backlogged | set(held)}
        total = sum(weights.values())

        def excess(t: str) -> float:
            return held.get(t, 0) - max_num_seqs * weights[t] / total

        if excess(nxt) + 1 > 0:
            return NO_TURN
        victim = None
        if len(running) >= max_num_seqs:
            over = max((t for t in held if t != nxt), key=lambda t: (excess(t), t), default=None)
            if over is None or excess(over) < 1:
                return NO_TURN
            victim = max((r for r in running if r.tenant == over), key=self.key)
        paused = frozenset(t for t in held if t != nxt and excess(t) >= 1) if not held.get(nxt) else frozenset()
        head = next(r for r in waiting if r.tenant == nxt)
        decodes = sum(1 for r in running if r.tenant not in paused and r is not victim)
        return victim, max(0, min(head.num_tokens - head.num_computed_tokens, chunk, budget - decodes)), paused


def seats(running: list) -> dict[str, int]:
    """Running requests per tenant."""
    out: dict[str, int] = {}
    for r in running:
        out[r.tenant] = out.get(r.tenant, 0) + 1
    return out
