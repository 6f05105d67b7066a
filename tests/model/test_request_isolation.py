"""A request whose own state fails inside a step ends alone with an error: its blocks are
freed and the requests batched with it finish exactly as they would have without it."""

from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams

GOOD = SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), dtype="float32")


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]], fault=None) -> dict:
    """Step until done; `fault(engine)` injects a failure into one request's state after adding."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    if fault is not None:
        fault(engine)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def _boom(*args, **kwargs):
    raise RuntimeError("injected fault")


def _break_detokenizer(engine):
    engine.outputs.parents["bad"].detoks["bad"].add = _boom


def _break_beams(engine):
    engine.outputs.parents["bad"].beam.plan = _boom


@pytest.mark.parametrize("bad_params,fault", [
    (SamplingParams(max_tokens=12, temperature=0), _break_detokenizer),
    (SamplingParams(max_tokens=12, temperature=0, use_beam_search=True, best_of=3), _break_beams),
])
def test_failing_request_ends_alone(llm, bad_params, fault):
    engine = llm.engine
    alone = run(engine, {"good": ([5, 6, 7, 8], GOOD)})["good"]
    finals = run(engine, {"good": ([5, 6, 7, 8], GOOD), "bad": ([9, 10, 11], bad_params)}, fault)
    assert finals["bad"].error == "RuntimeError: injected fault" and finals["bad"].outputs == []
    assert finals["good"].error is None
    assert finals["good"].outputs[0].token_ids == alone.outputs[0].token_ids
    engine.scheduler.check_integrity()
    assert engine.kv.usage == 0.0 and not engine.scheduler.requests
