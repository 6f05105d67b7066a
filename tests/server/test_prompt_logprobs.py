"""Prompt logprobs through the real server: `/v1/completions` with echo + logprobs (the
request lm-eval's `local-completions` sends for log-likelihoods) returns the prompt's
logprobs, equal to the engine's own scoring of the same token ids in another process."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.server.conftest import MODEL
from tierlm.llm import LLM

CONTEXT = "Question: What is the capital of France?\nAnswer:"
CHOICES = [" Paris", " Berlin", " a small village"]


@pytest.fixture(scope="module")
def scorer(cache_dir):
    """The engine's own computation: one forward over the whole sequence, log-softmax."""
    llm = LLM(MODEL, cache_dir=cache_dir)

    def score(ids: list[int]) -> list[float]:
        lps = torch.log_softmax(llm.engine.prompt_logits(ids).float(), dim=-1)
        return [lps[p, ids[p + 1]].item() for p in range(len(ids) - 1)]

    yield llm.engine.tokenizer, score
    llm.close()


def test_loglikelihood_request_matches_engine_scoring(client, scorer):
    tok, score = scorer
    ctx = tok.encode(CONTEXT)
    prompts = [ctx + tok.encode(c, add_special_tokens=False) for c in CHOICES]
    # Exactly lm-eval's payload: token ids, max_tokens 1, logprobs 1, echo, temperature 0.
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                                  temperature=0, seed=1234)
    likelihoods = []
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        assert lp.token_logprobs[1 : len(ids)] == score(ids)  # bitwise: batch-invariant kernels
        cont = lp.token_logprobs[len(ctx) : -1]
        likelihoods.append(sum(cont))
        # top-1 is the argmax: never below the actual token (lm-eval's is_greedy test relies on it)
        assert all(max(top.values()) >= t for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
    assert likelihoods.index(max(likelihoods)) == 0  # Paris is the likeliest answer
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)


def test_max_tokens_zero_scores_without_generating(client, scorer):
    tok, score = scorer
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, logprobs=3, echo=True)
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 0
    assert c.text == tok.decode(ids)
    assert c.logprobs.token_logprobs[1:] == score(ids)
    assert all(len(top) <= 3 for top in c.logprobs.top_logprobs[1:])
    assert c.logprobs.text_offset == sorted(c.logprobs.text_offset)


def test_echo_logprobs_with_generation_and_streaming(client):
    kwargs = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "logprobs": 2, "echo": True,
              "temperature": 0}
    full = client.completions.create(**kwargs).choices[0]
    n_prompt = len(full.logprobs.tokens) - 4
    assert full.logprobs.token_logprobs[0] is None and None not in full.logprobs.token_logprobs[1:]
    assert full.text.startswith("Once upon a time")
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].text == "Once upon a time"
    assert chunks[0].choices[0].logprobs.token_logprobs == full.logprobs.token_logprobs[:n_prompt]
    streamed = [x for ch in chunks for x in (ch.choices[0].logprobs.token_logprobs if ch.choices[0].logprobs else [])]
    assert streamed == full.logprobs.token_logprobs
    assert "".join(ch.choices[0].text for ch in chunks) == full.text


def test_max_tokens_zero_needs_echo_and_logprobs(client):
    for extra in ({"echo": True}, {"logprobs": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=0, **extra)
        assert e.value.body["param"] == "max_tokens"
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices[0].finish_reason == "length"


def test_chat_prompt_logprobs_extension(client, http, scorer):
    _, score = scorer
    messages = [{"role": "user", "content": "Say hi."}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 2,
                                                 "temperature": 0, "prompt_logprobs": 2}).json()
    ids = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    entries = r["prompt_logprobs"]
    assert len(entries) == len(ids) == r["usage"]["prompt_tokens"] and entries[0] is None
    assert [e[str(t)]["logprob"] for t, e in zip(ids[1:], entries[1:])] == score(ids)
    for t, e in zip(ids[1:], entries[1:]):
        own = e[str(t)]
        best = max(e.values(), key=lambda x: x["logprob"])
        assert best["rank"] == 1 and (own["rank"] == 1) == (own["logprob"] == best["logprob"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                       extra_body={"prompt_logprobs": 1})
