"""Queue policies: the order waiting requests are admitted in, and (under "fair") which
tenant goes next. A policy's `key` maps a request to a sort key: smaller runs first and is
preempted last. Preempted requests keep their key, so they resume ahead of newcomers.

"fcfs" and "priority" admit the queue head. "fair" (scheduler/fair.py) orders each
tenant's requests by priority and picks the tenant by its virtual token counter, with a
seat and a prefill holdback for a tenant below its share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tierlm.config import SchedulerConfig
from tierlm.request import Request

Key = Callable[[Request], tuple]


def fcfs(r: Request) -> tuple:
    return (r.arrival_seq,)


def priority(r: Request) -> tuple:
    return (r.priority, r.arrival_seq)


POLICIES: dict[str, Key] = {"fcfs": fcfs, "priority": priority, "fair": priority}


# What a policy asks of one step: (a request to give up its seat, tokens of the step's
# budget held back for the next tenant's prefill, tenants whose requests sit the step out).
NO_TURN: tuple[Request | None, int, frozenset[str]] = (None, 0, frozenset())


class QueuePolicy(Protocol):
    key: Key

    def arrive(self, req: Request, waiting: list[Request]) -> None: ...

    def next_waiting(self, waiting: list[Request], running: list[Request]) -> Request: ...

    def turn(self, waiting: list[Request], running: list[Request], budget: int, max_num_seqs: int,
             chunk: int) -> tuple[Request | None, int, frozenset[str]]: ...

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None: ...


class Ordered:
    """fcfs / priority: the head of the queue by `key` goes next; no tenant accounting."""

    def __init__(self, key: Key) -> None:
        self.key = key

    def arrive(self, req: Request, waiting: list[Request]) -> None:
        pass

    def next_waiting(self, waiting: list[Request], running: list[Request]) -> Request:
        return waiting[0]

    def turn(self, waiting: list[Request], running: list[Request], budget: int, max_num_seqs: int,
             chunk: int) -> tuple[Request | None, int, frozenset[str]]:
        return NO_TURN

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        pass


def make_policy(config: SchedulerConfig) -> QueuePolicy:
    if config.policy == "fair":
        from tierlm.scheduler.fair import FairShare

        return FairShare(POLICIES["fair"], dict(config.tenant_weights))
    return Ordered(POLICIES[config.policy])
