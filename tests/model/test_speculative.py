"""N-gram speculative decoding on the bundled model: outputs (tokens, logprobs, finish
reasons, stop strings) identical to decoding without drafts, greedy and seeded sampling,
alone and batched, while drafts are really accepted."""

from __future__ import annotations

import pytest

from tierlm import LLM, SamplingParams

CODE = '''def area(width, height):
    """Area of a rectangle."""
    return width * height


def perimeter(width, height):
    """Perimeter of a rectangle."""
    return 2 * (width + height)
'''
COPY = f"Copy this code exactly.\n\n{CODE}\nCopy:\n\n{CODE[:40]}"
PROMPTS = [COPY, "The three most important things in life are", "List the days of the week: Monday, Tuesday,"]


def results(outs):
    return [[(o.token_ids, o.text, o.finish_reason, o.stop_reason,
              [(lp.logprob, lp.top) for lp in o.logprobs or []]) for o in out.outputs] for out in outs]


@pytest.fixture(scope="module")
def engines(cache_dir):
    return (LLM("smollm2-135m", cache_dir=cache_dir),
            LLM("smollm2-135m", cache_dir=cache_dir, num_speculative_tokens=4))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=60, logprobs=2),
    SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, seed=7, n=2, logprobs=1),
    SamplingParams(temperature=0, max_tokens=57, stop=["perimeter"], repetition_penalty=1.1),
])
def test_outputs_identical_with_and_without_drafts(engines, params):
    plain, spec = engines
    before = spec.engine.scheduler.accepted_tokens
    assert results(spec.generate(PROMPTS, params)) == results(plain.generate(PROMPTS, params))
    assert spec.engine.scheduler.accepted_tokens > before  # drafts were accepted, not just proposed
    spec.engine.scheduler.check_integrity()
    assert not spec.engine.scheduler.requests


def test_copying_accepts_most_drafts_and_saves_steps(engines):
    plain, spec = engines
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    sched = spec.engine.scheduler
    drafted, accepted = sched.draft_tokens, sched.accepted_tokens
    steps = {}
    for name, llm in (("plain", plain), ("spec", spec)):
        eng, n = llm.engine, 0
        eng.add_request(name, {"prompt_token_ids": llm.tokenizer.encode(COPY)}, params)
        while eng.has_unfinished_requests():
            eng.step()
            n += 1
        steps[name] = n
    rate = (sched.accepted_tokens - accepted) / (sched.draft_tokens - drafted)
    assert rate > 0.5 and steps["spec"] < steps["plain"] / 1.5, (rate, steps)
