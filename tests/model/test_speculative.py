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


def steps_to_finish(llm, request_id: str, ids: list[int], params: SamplingParams) -> int:
    """Engine steps one request takes from prompt to its last token, alone."""
    eng, n = llm.engine, 0
    eng.add_request(request_id, {"prompt_token_ids": ids}, params)
    while eng.has_unfinished_requests():
        eng.step()
        n += 1
    return n


def test_copying_accepts_most_drafts_and_saves_steps(engines):
    plain, spec = engines
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    sched = spec.engine.scheduler
    drafted, accepted = sched.draft_tokens, sched.accepted_tokens
    steps = {name: steps_to_finish(llm, name, llm.tokenizer.encode(COPY), params)
             for name, llm in (("plain", plain), ("spec", spec))}
    rate = (sched.accepted_tokens - accepted) / (sched.draft_tokens - drafted)
    assert rate > 0.5 and steps["spec"] < steps["plain"] / 1.5, (rate, steps)


# ---- draft-model proposer (spec/draft.py) -------------------------------------------------
DRAFT_PROMPTS = ["hello world, the quick", "the lazy dog jumps over the brown fox and", "fox"]


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint, cache_dir):
    """A tiny Llama target decoding plainly, with a different tiny model (Qwen2, same
    vocabulary) as its draft, and with itself as its draft."""
    target, _ = tiny_checkpoint("llama")
    draft, _ = tiny_checkpoint("qwen2")
    kw = {"dtype": "float32", "cache_dir": cache_dir}
    return (LLM(str(target), **kw), LLM(str(target), num_speculative_tokens=3, draft_model=str(draft), **kw),
            LLM(str(target), num_speculative_tokens=3, draft_model=str(target), **kw))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=40, logprobs=2, ignore_eos=True),
    SamplingParams(temperature=1.0, top_k=20, max_tokens=30, seed=11, n=2, logprobs=1, ignore_eos=True),
])
def test_draft_model_output_identical_to_plain_decoding(tiny_pair, params):
    plain, other, itself = tiny_pair
    want = results(plain.generate(DRAFT_PROMPTS, params))
    for spec in (other, itself):
        sched = spec.engine.scheduler
        before = sched.draft_tokens
        assert results(spec.generate(DRAFT_PROMPTS, params)) == want
        assert sched.draft_tokens > before  # the draft model really proposed
        sched.check_integrity()
        assert not sched.requests
        assert not spec.engine.proposer._held  # finished requests released their draft KV
        assert spec.engine.proposer.kv.pool.num_free == spec.engine.proposer.kv.pool.num_usable


def test_a_faithful_draft_model_is_accepted_and_saves_steps(tiny_pair):
    """The target as its own draft proposes its own greedy tokens: nearly all accepted."""
    plain, _, itself = tiny_pair
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    sched = itself.engine.scheduler
    drafted, accepted = sched.draft_tokens, sched.accepted_tokens
    steps = {name: steps_to_finish(llm, name, [1, 40, 41, 42, 43], params)
             for name, llm in (("plain", plain), ("self", itself))}
    assert (sched.accepted_tokens - accepted) >= 0.9 * (sched.draft_tokens - drafted)
    assert steps["self"] * 3 < steps["plain"]

def test_draft_model_stops_drafting_at_its_own_context(tiny_pair, tiny_checkpoint, cache_dir):
    """Near the draft model's context end it drafts fewer tokens (2, 1, then 0), none past
    its last position, and the drafts are the draft model's own greedy tokens."""
    _, other, _ = tiny_pair
    draft_path, _ = tiny_checkpoint("qwen2")
    reference = LLM(str(draft_path), dtype="float32", cache_dir=cache_dir)
    proposer = other.engine.proposer
    limit = proposer.config.max_position_embeddings
    for length, want in ((limit - 2, 2), (limit - 1, 1), (limit, 0)):
        ids = [3 + i % 300 for i in range(length)]
        drafts = proposer.propose([("edge", ids, 3)]).get("edge", [])
        proposer.release("edge")
        assert len(drafts) == want, (length, drafts)
        if want:
            greedy = reference.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=want,
                                                                                 ignore_eos=True))
            assert drafts == greedy[0].outputs[0].token_ids
    assert proposer.kv.pool.num_free == proposer.kv.pool.num_usable
