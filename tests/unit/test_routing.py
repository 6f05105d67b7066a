"""Tier selection as a pure function: budgets, modes, ties, no feasible tier."""

import pytest

from tierlm.config import EngineConfig, TierConfig
from tierlm.tenancy.routing import Budgets, Demand, NoTierFits, TierLoad, select

FAST = TierConfig("fast", EngineConfig(), quality=1, prompt_price_per_mtok=1, completion_price_per_mtok=2)
DEEP = TierConfig("deep", EngineConfig(), quality=2, prompt_price_per_mtok=10, completion_price_per_mtok=20)
TIERS = [FAST, DEEP]
IDLE = {"fast": TierLoad(0.01, 0.01, 0.001), "deep": TierLoad(0.03, 0.03, 0.003)}


def demand(prompt=100, out=50, max_out=50):
    names = [t.name for t in TIERS]
    return Demand({n: prompt for n in names}, {n: out for n in names}, {n: max_out for n in names})


def test_best_quality_when_everything_fits():
    c = select(TIERS, IDLE, demand(), Budgets(), "balanced")
    assert (c.tier, c.reason) == ("deep", "preferred")
    # deep: ttft 0.03 + 100 x 0.003 = 0.33 s; latency + 49 x 0.03 = 1.8 s; cost 100x10 + 50x20 per 1M
    assert c.estimate.ttft_s == pytest.approx(0.33)
    assert c.estimate.latency_s == pytest.approx(1.8)
    assert c.estimate.cost_usd == pytest.approx(2000 / 1e6)


def test_latency_budget_shifts_to_the_faster_tier_only_under_load():
    budget = Budgets(max_latency_ms=2500)
    assert select(TIERS, IDLE, demand(), budget).tier == "deep"
    loaded = {**IDLE, "deep": TierLoad(0.08, 0.03, 0.003, backlog_tokens=2000)}
    c = select(TIERS, loaded, demand(), budget)
    assert (c.tier, c.reason) == ("fast", "latency")


def test_cost_budget_and_ceiling_pick_the_cheaper_tier():
    c = select(TIERS, IDLE, demand(), Budgets(max_cost_usd=0.001), "max")
    assert (c.tier, c.reason) == ("fast", "cost")
    c = select(TIERS, IDLE, demand(), Budgets(cost_left_usd=0.0005), "max")
    assert (c.tier, c.reason) == ("fast", "cost")
    assert c.estimate.cost_usd <= 0.0005


def test_no_tier_fits_static_budget_is_400_naming_cheapest():
    with pytest.raises(NoTierFits) as e:
        select(TIERS, IDLE, demand(), Budgets(max_cost_usd=1e-6))
    assert e.value.status == 400 and e.value.param == "max_cost_usd"
    assert "cheapest is 'fast'" in str(e.value) and "$0.000200" in str(e.value)


def test_no_tier_fits_under_load_is_429_naming_fastest():
    loaded = {"fast": TierLoad(0.5, 0.01, 0.001, backlog_tokens=5000),
              "deep": TierLoad(0.9, 0.03, 0.003, backlog_tokens=5000)}
    with pytest.raises(NoTierFits) as e:
        select(TIERS, loaded, demand(), Budgets(max_ttft_ms=1000))
    assert e.value.status == 429 and e.value.param == "max_ttft_ms" and e.value.retry_after == 1.0
    assert "fastest is 'fast'" in str(e.value)
    with pytest.raises(NoTierFits) as e:  # even idle the deep tier cannot start in 10 ms, nor can fast
        select(TIERS, IDLE, demand(), Budgets(max_ttft_ms=10))
    assert e.value.status == 400


def test_ceiling_only_is_429_without_a_load_retry():
    with pytest.raises(NoTierFits) as e:
        select(TIERS, IDLE, demand(), Budgets(cost_left_usd=0.0))
    assert e.value.status == 429 and e.value.param == "cost_ceiling" and e.value.retry_after is None


def test_modes_fixed_and_explicit():
    assert select(TIERS, IDLE, demand(), Budgets(), "fixed").tier == "fast"  # the first (default) tier
    assert select(TIERS, IDLE, demand(), Budgets(), fixed="deep").reason == "explicit"
    with pytest.raises(NoTierFits):  # a named tier never falls back
        select(TIERS, IDLE, demand(), Budgets(max_cost_usd=0.001), fixed="deep")
    # "balanced" prefers a tier of that name over the best quality
    mid = TierConfig("balanced", EngineConfig(), quality=1.5)
    three = [FAST, mid, DEEP]
    loads = {**IDLE, "balanced": TierLoad(0.02, 0.02, 0.002)}
    d = Demand({n: 10 for n in ("fast", "balanced", "deep")}, {n: 5 for n in ("fast", "balanced", "deep")},
               {n: 5 for n in ("fast", "balanced", "deep")})
    assert select(three, loads, d, Budgets(), "balanced").tier == "balanced"
    assert select(three, loads, d, Budgets(), "max").tier == "deep"
    with pytest.raises(NoTierFits) as e:
        select(three, loads, d, Budgets(), "turbo")
    assert e.value.status == 400 and e.value.param == "tier_mode"


def test_ties_break_by_latency_then_cost_then_name_deterministically():
    a = TierConfig("b-tier", EngineConfig(), quality=1, prompt_price_per_mtok=1)
    b = TierConfig("a-tier", EngineConfig(), quality=1, prompt_price_per_mtok=1)
    loads = {"a-tier": TierLoad(0.01, 0.01, 0.001), "b-tier": TierLoad(0.01, 0.01, 0.001)}
    d = Demand({"a-tier": 10, "b-tier": 10}, {"a-tier": 5, "b-tier": 5}, {"a-tier": 5, "b-tier": 5})
    picks = {select([a, b], loads, d, Budgets(), "max").tier for _ in range(5)}
    picks |= {select([b, a], loads, d, Budgets(), "max").tier for _ in range(5)}
    assert picks == {"a-tier"} or picks == {"b-tier"}  # one answer, whatever the order given
    slower = {**loads, "a-tier": TierLoad(0.02, 0.01, 0.001)}
    assert select([a, b], slower, d, Budgets(), "max").tier == "b-tier"
