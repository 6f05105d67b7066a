"""Adapter slots in the scheduler (fabricated runner outputs): a request runs only with its
adapter in a slot; the least recently used slot that no running request uses is evicted;
requests whose adapter cannot get a slot wait, base-model requests pass them, and the
waiting adapter is not starved by later adapter requests."""

from __future__ import annotations

from dataclasses import dataclass

from tierlm.config import SchedulerConfig
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.outputs import SampledToken, StepResult
from tierlm.request import Request
from tierlm.sampling_params import SamplingParams
from tierlm.scheduler.scheduler import Scheduler

_seq = iter(range(10**9))


@dataclass(frozen=True)
class Adapter:  # what the scheduler reads of an adapter: its name and identity
    name: str

    @property
    def key(self) -> str:
        return f"{self.name}@test"


A, B, C = Adapter("a"), Adapter("b"), Adapter("c")


def make(max_loras=2, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**{"max_num_batched_tokens": 64, **kw}), KVCacheManager(128, 4), (2,),
                     max_loras=max_loras)


def req(rid: str, lora=None, max_tokens=4) -> Request:
    r = Request(rid, list(range(10, 16)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=0,
                arrival_seq=next(_seq), max_total_tokens=6 + max_tokens)
    r.lora = lora
    return r


def step(s: Scheduler):
    out = s.schedule()
    s.update(out, StepResult([SampledToken(x.request_id, 7, None) for x in out.scheduled if x.sample]))
    s.check_integrity()
    return out


def slots_of(out) -> dict[str, int]:
    return {x.request_id: x.lora_slot for x in out.scheduled}


def test_adapters_take_slots_and_load_once():
    s = make()
    for r in (req("base"), req("a1", A), req("b1", B), req("a2", A)):
        s.add(r)
    out = step(s)
    slots = slots_of(out)
    assert slots["base"] == -1 and slots["a1"] == slots["a2"] != slots["b1"]
    assert sorted((slot, ad.name) for slot, ad in out.lora_loads) == sorted([(slots["a1"], "a"), (slots["b1"], "b")])
    out = step(s)  # the same requests decode: nothing to load again
    assert out.lora_loads == [] and slots_of(out) == slots


def test_a_third_adapter_waits_until_a_slot_frees_then_evicts_the_least_recent():
    s = make(max_loras=2)
    s.add(req("a1", A, max_tokens=2))
    s.add(req("b1", B, max_tokens=6))
    step(s)
    s.add(req("c1", C))
    s.add(req("base", max_tokens=2))
    out = step(s)
    assert "c1" not in slots_of(out) and "base" in slots_of(out)  # the base request passes the waiting one
    assert [r.request_id for r in s.waiting] == ["c1"]
    out = step(s)  # a1 finished in the step before: its slot is free of running requests
    loads = {ad.name: slot for slot, ad in out.lora_loads}
    assert loads == {"c": slots_of(out)["c1"]} and s.lora_slots.held[loads["c"]] == C.key
    assert B.key in s.lora_slots.held  # b1 still runs: its adapter stays


def test_a_waiting_adapter_is_not_starved_by_later_adapter_requests():
    s = make(max_loras=1, max_num_seqs=8)
    s.add(req("a1", A, max_tokens=3))
    step(s)
    s.add(req("b1", B))
    s.add(req("a2", A))  # could share a1's slot, but queued behind b1's wait
    out = step(s)
    assert set(slots_of(out)) == {"a1"}
    while "a1" in s.requests:
        step(s)
    out = step(s)
    assert "b1" in slots_of(out) and "a2" not in slots_of(out)


def test_a_preempted_request_gets_its_slot_back_on_return():
    s = make(max_loras=2)
    r = req("a1", A, max_tokens=8)
    s.add(r)
    step(s)
    s._preempt(r)
    out = step(s)
    assert slots_of(out)["a1"] == r.lora_slot and s.lora_slots.held[r.lora_slot] == A.key
