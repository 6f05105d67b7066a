"""Tier selection as a pure function: budgets, modes, ties, no feasible tier."""

import math

import pytest

from tierlm.config import EngineConfig, TierConfig
from tierlm.engine.load import LoadTracker
from tierlm.tenancy.routing import Budgets, Demand, NoTierFits, TierLoad, select, shared_cores, value

FAST = TierConfig("fast", EngineConfig(), quality=1, prompt_price_per_mtok=1, completion_price_per_mtok=2)
DEEP = TierConfig("deep", EngineConfig(), quality=2, prompt_price_per_mtok=10, completion_price_per_mtok=20)
TIERS = [FAST, DEEP]
IDLE = {"fast": TierLoad(0.01, 0.01, 0.001), "deep": TierLoad(0.03, 0.03, 0.003)}


def demand(prompt=100, out=50, max_out=50):
    names = [t.name for t in TIERS]
    return Demand({n: prompt for n in names}, {n: out for n in names}, {n: max_out for n in names})


def test_best_quality_when_everything_fits():
    c = select(TIERS, IDLE, demand(), Budgets(), "deep")
    assert (c.tier, c.reason) == ("deep", "preferred")
    # deep: ttft 0.03 + 100 x 0.003 = 0.33 s; latency + 49 x 0.03 = 1.8 s; cost 100x10 + 50x20 per 1M
    assert c.estimate.ttft_s == pytest.approx(0.33)
    assert c.estimate.latency_s == pytest.approx(1.8)
    assert c.estimate.cost_usd == pytest.approx(2000 / 1e6)


def test_latency_budget_shifts_to_the_faster_tier_only_under_load():
    budget = Budgets(max_latency_ms=2500)
    assert select(TIERS, IDLE, demand(), budget, "deep").tier == "deep"
    loaded = {**IDLE, "deep": TierLoad(0.08, 0.03, 0.003, backlog_tokens=2000)}
    c = select(TIERS, loaded, demand(), budget, "deep")
    assert (c.tier, c.reason) == ("fast", "latency")


def test_cost_budget_and_ceiling_pick_the_cheaper_tier():
    c = select(TIERS, IDLE, demand(), Budgets(max_cost_usd=0.001), "deep")
    assert (c.tier, c.reason) == ("fast", "cost")
    c = select(TIERS, IDLE, demand(), Budgets(cost_left_usd=0.0005), "deep")
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


# Four tiers whose names mean nothing to the policies (one is even called "balanced",
# another "deep"). Worst-case cost of demand(): (100 x prompt + 50 x completion) / 1e6.
SMALL = TierConfig("balanced", EngineConfig(), quality=1, prompt_price_per_mtok=1, completion_price_per_mtok=2)
MID = TierConfig("deep", EngineConfig(), quality=2, prompt_price_per_mtok=2, completion_price_per_mtok=4)
LARGE = TierConfig("large", EngineConfig(), quality=4, prompt_price_per_mtok=10, completion_price_per_mtok=20)
HUGE = TierConfig("huge", EngineConfig(), quality=5, prompt_price_per_mtok=50, completion_price_per_mtok=100)
LOADS = {"balanced": TierLoad(0.01, 0.01, 0.001), "deep": TierLoad(0.02, 0.02, 0.002),
         "large": TierLoad(0.03, 0.03, 0.003), "huge": TierLoad(0.06, 0.06, 0.006)}
# value = quality / cost: SMALL 1/200e-6 = 5000, MID 2/400e-6 = 5000 (tie: quality wins),
# LARGE 4/2000e-6 = 2000, HUGE 5/10000e-6 = 500.


def demand_for(tiers, prompt=100, out=50):
    return Demand({t.name: prompt for t in tiers}, {t.name: out for t in tiers}, {t.name: out for t in tiers})


@pytest.mark.parametrize("tiers, want", [
    ([SMALL, LARGE], {"fixed": "balanced", "max": "large", "deep": "large", "balanced": "balanced"}),
    ([SMALL, MID, LARGE], {"fixed": "balanced", "max": "large", "deep": "large", "balanced": "deep"}),
    ([LARGE, HUGE, SMALL, MID], {"fixed": "large", "max": "huge", "deep": "huge", "balanced": "deep"}),
])
def test_each_mode_is_a_policy_over_any_tiers(tiers, want):
    got = {mode: select(tiers, LOADS, demand_for(tiers), Budgets(), mode).tier for mode in want}
    assert got == want
    for mode in ("max", "deep", "balanced"):
        assert select(tiers, LOADS, demand_for(tiers), Budgets(), mode).reason == "preferred"


@pytest.mark.parametrize("tiers", [[SMALL, LARGE], [SMALL, MID, LARGE], [SMALL, MID, LARGE, HUGE]])
def test_fixed_serves_the_tenants_default_and_only_checks_budgets(tiers):
    d = demand_for(tiers)
    c = select(tiers, LOADS, d, Budgets(), "fixed", default="large")
    assert (c.tier, c.reason) == ("large", "fixed")
    # a default this tenant may not use (the file's): its first allowed tier
    assert select(tiers, LOADS, d, Budgets(), "fixed", default="elsewhere").tier == tiers[0].name
    with pytest.raises(NoTierFits) as e:  # never a silent switch to a tier that fits
        select(tiers, LOADS, d, Budgets(max_cost_usd=0.001), "fixed", default="large")
    assert e.value.status == 400 and e.value.param == "max_cost_usd"
    assert select(tiers, LOADS, d, Budgets(), fixed="balanced").reason == "explicit"


@pytest.mark.parametrize("tiers", [[SMALL, LARGE], [SMALL, MID, LARGE], [SMALL, MID, LARGE, HUGE]])
def test_max_checks_budgets_deep_steps_down_balanced_keeps_value(tiers):
    d = demand_for(tiers)
    top = max(tiers, key=lambda t: t.quality)
    cheap_enough = Budgets(max_cost_usd=0.0015)  # SMALL and MID fit, LARGE and HUGE do not
    with pytest.raises(NoTierFits) as e:
        select(tiers, LOADS, d, cheap_enough, "max")
    assert e.value.status == 400 and top.name in {"large", "huge"}
    c = select(tiers, LOADS, d, cheap_enough, "deep")
    assert (c.tier, c.reason) == ("deep" if MID in tiers else "balanced", "cost")
    assert select(tiers, LOADS, d, cheap_enough, "balanced").tier == ("deep" if MID in tiers else "balanced")
    # a latency budget under load: the top tier is too slow now, not idle -> deep steps down, max is 429
    slow = {**LOADS, top.name: TierLoad(0.5, LOADS[top.name].idle_step_s, 0.006, backlog_tokens=3000)}
    with pytest.raises(NoTierFits) as e:
        select(tiers, slow, d, Budgets(max_latency_ms=4000), "max")
    assert e.value.status == 429
    c = select(tiers, slow, d, Budgets(max_latency_ms=4000), "deep")
    assert c.tier != top.name and c.reason == "latency"


def test_balanced_cost_weight_is_the_one_knob():
    tiers = [SMALL, MID, LARGE, HUGE]
    d = demand_for(tiers)
    pick = {w: select(tiers, LOADS, d, Budgets(), "balanced", cost_weight=w).tier for w in (1.0, 0.3, 0.0)}
    # weight 0.3: values 1/200e-6**0.3 = 12.9, 20.9, 25.8, 19.9 -> large; weight 0: quality alone
    assert pick == {1.0: "deep", 0.3: "large", 0.0: "huge"}
    free = [TierConfig(t.name, EngineConfig(), quality=t.quality) for t in tiers]
    assert select(free, LOADS, d, Budgets(), "balanced").tier == "huge"  # all free: quality decides
    assert select(tiers, LOADS, d, Budgets(), "balanced", cost_weight=10.0).tier == "balanced"  # cost rules
    assert value(1, 1e-9, 40.0) == math.inf  # cost ** weight underflows: weighed as free, never a crash
    some_free = [SMALL, TierConfig("deep", EngineConfig(), quality=2), LARGE]
    assert select(some_free, LOADS, d, Budgets(), "balanced").tier == "deep"  # free beats any price


def test_unknown_mode_is_400():
    with pytest.raises(NoTierFits) as e:
        select(TIERS, IDLE, demand(), Budgets(), "turbo")
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


def test_an_idle_tier_beside_busy_ones_is_estimated_at_their_shared_pace():
    """Tiers share the cores: deep idle next to a busy fast steps about twice as slowly, so
    a budget it meets alone is not promised under fast's load; that is load (429), never
    an impossible budget (400). A busy tier's own measurements are taken as they are."""
    loads = {"fast": TierLoad(0.02, 0.01, 0.001, busy=True), "deep": TierLoad(0.03, 0.03, 0.003)}
    shared = shared_cores(loads)
    assert shared["fast"] == loads["fast"] and shared["deep"].contention == 2.0
    alone = select([DEEP], IDLE, demand(), Budgets(), "deep").estimate
    beside = select([DEEP], shared, demand(), Budgets(), "deep").estimate
    assert beside.latency_s == pytest.approx(2 * alone.latency_s)
    assert beside.idle_latency_s == pytest.approx(alone.idle_latency_s)
    with pytest.raises(NoTierFits) as e:
        select([DEEP], shared, demand(), Budgets(max_latency_ms=2500), "fixed", default="deep")
    assert e.value.status == 429
    assert shared_cores({"deep": loads["deep"]})["deep"].contention == 1.0  # nobody else busy


def test_the_idle_step_is_the_best_case_not_the_latest():
    """A slower single-request step (another tier on the same cores) barely moves the idle
    estimate; a faster one replaces it at once."""
    t = LoadTracker()
    t.observe(0.010, tokens=1, requests=1)
    assert t.idle_step_s == 0.010
    for _ in range(5):
        t.observe(0.030, tokens=1, requests=1)
    assert 0.010 < t.idle_step_s < 0.013
    t.observe(0.008, tokens=1, requests=1)
    assert t.idle_step_s == 0.008
