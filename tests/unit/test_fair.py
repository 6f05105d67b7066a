"""Weighted VTC ordering: the least-served backlogged tenant goes first, service splits
by fair-share weights, and idle time is not banked."""

from __future__ import annotations

from tierlm.scheduler.fair import VirtualTokenCounter


def simulate(vtc: VirtualTokenCounter, steps: int, tokens_per_pick: int = 10) -> dict[str, int]:
    served = {t: 0 for t in vtc.shares}
    for _ in range(steps):
        t = vtc.pick(set(vtc.shares))
        vtc.charge(t, output_tokens=tokens_per_pick)
        served[t] += tokens_per_pick
    return served


def test_service_splits_by_weight_when_everyone_is_backlogged():
    vtc = VirtualTokenCounter(shares={"a": 1.0, "b": 3.0})
    served = simulate(vtc, 400)
    assert served["b"] == 3 * served["a"]


def test_least_served_goes_first_and_ties_break_by_name():
    vtc = VirtualTokenCounter()
    assert vtc.pick({"b", "a"}) == "a"
    vtc.charge("a", prompt_tokens=100)
    assert vtc.pick({"a", "b"}) == "b"
    vtc.charge("b", prompt_tokens=40, output_tokens=30)  # 40 + 2 x 30 = 100: tie again
    assert vtc.pick({"a", "b"}) == "a"


def test_a_returning_tenant_does_not_bank_idle_time():
    vtc = VirtualTokenCounter()
    vtc.arrive("flood", set())
    for _ in range(50):
        vtc.charge("flood", output_tokens=100)
    vtc.arrive("light", {"flood"})  # joins at the flooder's level, not at zero
    assert vtc.counters["light"] == vtc.counters["flood"]
    picks = []
    for _ in range(6):
        t = vtc.pick({"flood", "light"})
        vtc.charge(t, output_tokens=100)
        picks.append(t)
    assert picks == ["flood", "light"] * 3  # alternate, instead of light running 50 times in a row
    vtc.arrive("light", {"flood", "light"})  # already backlogged: unchanged
    assert vtc.counters["light"] == vtc.counters["flood"]
