"""Tenant quotas with an injected clock: token buckets refill at their rate, reservations
are all-or-nothing with the binding limit and Retry-After, settling refunds unused
tokens and cost, the cost ceiling resets per period."""

from __future__ import annotations

import math

import pytest

from tierlm.config import QuotaLimits
from tierlm.tenancy.quotas import QuotaExceeded, TenantQuota


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_bucket_refills_continuously():
    clock = Clock()
    q = TenantQuota(QuotaLimits(requests_per_minute=2), clock)
    for _ in range(2):
        q.settle(q.reserve(10), 10)
    with pytest.raises(QuotaExceeded) as e:
        q.reserve(10)
    assert e.value.limit == "requests" and e.value.retry_after == pytest.approx(30.0)
    clock.t += 30.0
    q.reserve(10)  # one request's worth came back


def test_tokens_reserved_at_admission_and_unused_part_refunded():
    clock = Clock()
    q = TenantQuota(QuotaLimits(tokens_per_minute=1000), clock)
    r = q.reserve(800)
    with pytest.raises(QuotaExceeded) as e:
        q.reserve(300)
    assert e.value.limit == "tokens" and e.value.retry_after == pytest.approx(100 / (1000 / 60))
    q.settle(r, used_tokens=200)  # 600 refunded
    q.reserve(300)
    assert q.headers()["x-ratelimit-remaining-tokens"] == "500"
    with pytest.raises(QuotaExceeded) as e:
        q.reserve(1001)
    assert math.isinf(e.value.retry_after)


def test_failed_reservation_takes_nothing_and_concurrency_is_released_once():
    clock = Clock()
    q = TenantQuota(QuotaLimits(requests_per_minute=10, tokens_per_minute=100, max_concurrent=1), clock)
    r = q.reserve(50)
    with pytest.raises(QuotaExceeded) as e:
        q.reserve(10)
    assert e.value.limit == "concurrency"
    q.settle(r, 50)
    q.settle(r, 50)  # idempotent
    assert q.in_flight == 0
    with pytest.raises(QuotaExceeded):
        q.reserve(60)  # tokens short: the request bucket must not be charged for it
    assert q.requests.level == pytest.approx(9.0)


def test_cost_ceiling_per_period():
    clock = Clock()
    q = TenantQuota(QuotaLimits(cost_ceiling_usd=1.0, cost_period_s=100.0), clock)
    r = q.reserve(10, cost_usd=0.8)
    with pytest.raises(QuotaExceeded) as e:
        q.reserve(10, cost_usd=0.3)
    assert e.value.limit == "cost" and e.value.retry_after == pytest.approx(100.0)  # period [1000, 1100)
    q.settle(r, 10, used_cost_usd=0.5)
    q.reserve(10, cost_usd=0.3)
    clock.t = 1100.0
    assert q.reserve(10, cost_usd=0.9)  # a new period starts from zero
    with pytest.raises(QuotaExceeded) as e:
        q.reserve(1, cost_usd=2.0)
    assert math.isinf(e.value.retry_after)


def test_limits_are_validated():
    with pytest.raises(ValueError):
        QuotaLimits(tokens_per_minute=0)
    with pytest.raises(ValueError):
        QuotaLimits(cost_period_s=-1)
