"""Per-tenant quotas: token buckets for requests and tokens per minute, a concurrency cap
and a cost ceiling per period. Pure bookkeeping with an injected clock (no I/O, no
threads): the server reserves at admission and settles when the request ends.

A reservation takes one request, the request's worst case in tokens (prompt +
max_tokens) and cost, and one concurrency slot, all or nothing. Settling returns the
slot and refunds the unused tokens and cost, so a tenant is charged for what it used.
Buckets refill continuously at rate/60 per second up to one minute's worth; the cost
ceiling resets at fixed period boundaries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from tierlm.config import QuotaLimits


class QuotaExceeded(Exception):
    """A reservation does not fit: `limit` names the binding quota, `retry_after` says
    when it would (math.inf: never, the request alone exceeds the limit)."""

    def __init__(self, limit: str, retry_after: float, message: str) -> None:
        super().__init__(message)
        self.limit, self.retry_after = limit, retry_after


class TokenBucket:
    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self.clock = clock
        self._level = per_minute
        self._at = clock()

    @property
    def level(self) -> float:
        now = self.clock()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    def wait_for(self, n: float) -> float:
        """Seconds until n fit (0 = now; inf if n is more than the bucket holds)."""
        if n > self.capacity:
            return math.inf
        return max(0.0, (n - self.level) / self.rate)

    def take(self, n: float) -> None:
        self._level = self.level - n

    def give_back(self, n: float) -> None:
        self._level = min(self.capacity, self.level + n)

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate


@dataclass
class Reservation:
    tokens: int
    cost_usd: float
    period: int  # cost period the cost was charged to
    settled: bool = False


class TenantQuota:
    def __init__(self, limits: QuotaLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.requests = TokenBucket(limits.requests_per_minute, clock) if limits.requests_per_minute else None
        self.tokens = TokenBucket(limits.tokens_per_minute, clock) if limits.tokens_per_minute else None
        self.in_flight = 0
        self._period = self._current_period()
        self.spent_usd = 0.0

    def _current_period(self) -> int:
        return int(self.clock() // self.limits.cost_period_s)

    def _roll_period(self) -> None:
        period = self._current_period()
        if period != self._period:
            self._period, self.spent_usd = period, 0.0

    def reserve(self, tokens: int, cost_usd: float = 0.0) -> Reservation:
        """Take one request, `tokens` and `cost_usd` now, or raise QuotaExceeded (taking nothing)."""
        lim = self.limits
        self._roll_period()
        if lim.max_concurrent is not None and self.in_flight >= lim.max_concurrent:
            raise QuotaExceeded("concurrency", 1.0, f"{lim.max_concurrent} requests are already running")
        if self.requests is not None and (wait := self.requests.wait_for(1)) > 0:
            raise QuotaExceeded("requests", wait, f"over {lim.requests_per_minute:g} requests per minute")
        if self.tokens is not None and (wait := self.tokens.wait_for(tokens)) > 0:
            why = "more than the per-minute limit in one request" if math.isinf(wait) else "over the limit"
            raise QuotaExceeded("tokens", wait,
                                f"{tokens} tokens (prompt + max_tokens) is {why} of {lim.tokens_per_minute:g} "
                                "tokens per minute")
        if lim.cost_ceiling_usd is not None and self.spent_usd + cost_usd > lim.cost_ceiling_usd:
            period_end = (self._period + 1) * lim.cost_period_s
            wait = math.inf if cost_usd > lim.cost_ceiling_usd else period_end - self.clock()
            raise QuotaExceeded("cost", wait, f"${cost_usd:.6f} more would pass the ceiling of "
                                              f"${lim.cost_ceiling_usd:g} per {lim.cost_period_s:g} s")
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(tokens)
        self.spent_usd += cost_usd
        self.in_flight += 1
        return Reservation(tokens, cost_usd, self._period)

    def settle(self, r: Reservation, used_tokens: int, used_cost_usd: float = 0.0) -> None:
        """Release the slot and refund what the request did not use (once)."""
        if r.settled:
            return
        r.settled = True
        self.in_flight -= 1
        if self.tokens is not None:
            self.tokens.give_back(max(0, r.tokens - used_tokens))
        self._roll_period()
        if r.period == self._period:  # a new period already started from zero
            self.spent_usd = max(0.0, self.spent_usd - max(0.0, r.cost_usd - used_cost_usd))

    def cost_left(self) -> float | None:
        """What the cost ceiling still allows in this period (None: no ceiling)."""
        if self.limits.cost_ceiling_usd is None:
            return None
        self._roll_period()
        return max(0.0, self.limits.cost_ceiling_usd - self.spent_usd)

    def period_left(self) -> float:
        """Seconds until the cost period ends (and the ceiling starts again from zero)."""
        return (self._current_period() + 1) * self.limits.cost_period_s - self.clock()

    def headers(self) -> dict[str, str]:
        """OpenAI-style x-ratelimit-* headers for the limits that are set."""
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{kind}"] = f"{bucket.capacity:g}"
                out[f"x-ratelimit-remaining-{kind}"] = str(int(bucket.level))
                out[f"x-ratelimit-reset-{kind}"] = f"{bucket.reset_in():.3f}s"
        return out
