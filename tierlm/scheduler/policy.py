"""Queue orderings. A policy maps a request to a sort key: smaller runs first and is
preempted last. Preempted requests keep their key, so they resume ahead of newcomers.
"fair" orders each tenant's requests by priority; which tenant goes next is the virtual
token counter's choice (scheduler/fair.py)."""

from __future__ import annotations

from collections.abc import Callable

from tierlm.request import Request

Policy = Callable[[Request], tuple]


def fcfs(r: Request) -> tuple:
    return (r.arrival_seq,)


def priority(r: Request) -> tuple:
    return (r.priority, r.arrival_seq)


POLICIES: dict[str, Policy] = {"fcfs": fcfs, "priority": priority, "fair": priority}
