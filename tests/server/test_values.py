"""Server results are the offline engine's results: for the same SamplingParams and seed
a `tierlm serve` request returns the token ids (vLLM's `return_tokens_as_token_ids`) and
logprob values that `LLM.generate` / `LLM.chat` compute in this process, bitwise (the
engine is deterministic whatever the batch). And each sampling extension is shown to act,
against a rule computed here from the model's raw logits."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch

from tests.server.conftest import API_KEY, MODEL
from tierlm import SamplingParams

PROMPT = "The three primary colors are"
REPEAT = "one two three one two three one two three one two three one two"


def ids_of(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.removeprefix("token_id:")) for t in tokens]


def completion(client, prompt=PROMPT, **kw):
    """A completion whose logprobs name token ids; returns the choices in index order."""
    extra = {"return_tokens_as_token_ids": True, **kw.pop("extra_body", {})}
    r = client.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **kw)
    return sorted(r.choices, key=lambda c: c.index)


def legacy_view(out) -> tuple:
    """An offline CompletionOutput as the server's legacy logprobs object shows it."""
    return (out.token_ids, [lp.logprob for lp in out.logprobs],
            [{f"token_id:{i}": v for i, v in lp.top} for lp in out.logprobs], out.text, out.finish_reason)


def server_view(choice) -> tuple:
    lp = choice.logprobs
    return (ids_of(lp.tokens), lp.token_logprobs, lp.top_logprobs, choice.text, choice.finish_reason)


def greedy_ids(client, prompt=PROMPT, n=8, **extra) -> list[int]:
    (c,) = completion(client, prompt, max_tokens=n, temperature=0, logprobs=0, extra_body=extra)
    return ids_of(c.logprobs.tokens)


def test_sampled_request_with_every_extension_equals_offline(client, offline):
    kw = dict(temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=42, n=2, logprobs=2,
              max_tokens=12, logit_bias={"11": 5.0})
    ext = dict(top_k=20, min_p=0.05, repetition_penalty=1.1, min_tokens=4, stop_token_ids=[2], priority=1)
    got = completion(client, **kw, extra_body=ext)
    params = SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3, seed=42, n=2,
                            logprobs=2, max_tokens=12, logit_bias={11: 5.0}, top_k=20, min_p=0.05,
                            repetition_penalty=1.1, min_tokens=4, stop_token_ids=[2])
    want = offline.generate(PROMPT, params)[0].outputs
    assert [server_view(c) for c in got] == [legacy_view(o) for o in want]
    assert got[0].text != got[1].text  # two seeded samples, not one repeated


def test_chat_logprobs_equal_offline_and_chosen_is_top1(client, offline):
    messages = [{"role": "user", "content": "Name a fruit."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3,
                                       extra_body={"return_tokens_as_token_ids": True})
    (out,) = offline.chat(messages, SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0].outputs
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == out.text
    assert [int(t.token.removeprefix("token_id:")) for t in content] == out.token_ids
    assert [t.logprob for t in content] == [lp.logprob for lp in out.logprobs]
    assert [[(x.token, x.logprob) for x in t.top_logprobs] for t in content] == \
        [[(f"token_id:{i}", v) for i, v in lp.top] for lp in out.logprobs]
    for t in content:  # greedy: the chosen token is the top-1, with the same value
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)


def test_greedy_completion_logprobs_are_top1_and_equal_offline(client, offline):
    (c,) = completion(client, max_tokens=10, temperature=0, logprobs=3)
    (out,) = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, logprobs=3))[0].outputs
    assert server_view(c) == legacy_view(out)
    for token, value, top in zip(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert max(top, key=top.get) == token and top[token] == value
    assert c.logprobs.text_offset[0] == 0 and "".join(offline.tokenizer.token_text(t) for t in out.token_ids) == c.text


def test_logit_bias_acts(client):
    forced = 504
    assert greedy_ids(client, n=5, logit_bias={str(forced): 100}, ignore_eos=True) == [forced] * 5
    (c,) = completion(client, max_tokens=1, temperature=0, logprobs=2)
    top1, top2 = sorted(c.logprobs.top_logprobs[0], key=c.logprobs.top_logprobs[0].get, reverse=True)
    banned = int(top1.removeprefix("token_id:"))
    assert greedy_ids(client, n=1, logit_bias={str(banned): -100}) == [int(top2.removeprefix("token_id:"))]


def test_stop_token_ids_end_at_that_token(client, offline):
    free = greedy_ids(client, n=8, ignore_eos=True)
    k = next(i for i in range(2, 8) if free[i] not in free[:i])  # the first token not seen before it
    (c,) = completion(client, max_tokens=8, temperature=0, logprobs=0, extra_body={"stop_token_ids": [free[k]]})
    assert c.finish_reason == "stop" and c.stop_reason == free[k]
    (out,) = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, logprobs=0,
                                                     stop_token_ids=[free[k]]))[0].outputs
    assert ids_of(c.logprobs.tokens) == out.token_ids == free[: k + 1] and c.text == out.text


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"top_p": 1e-9}])
def test_truncation_to_one_token_is_greedy(client, extra):
    """top_k 1 and a tiny top_p each leave only the most likely token (ties go to the lowest
    id, as greedy's): sampling at temperature 1 then returns the greedy tokens, any seed."""
    greedy = greedy_ids(client, n=8, ignore_eos=True)
    top_p = extra.pop("top_p", None)
    for seed in (1, 2):
        kw = {"top_p": top_p} if top_p else {}
        (c,) = completion(client, max_tokens=8, temperature=1.0, seed=seed, logprobs=0,
                          extra_body={"ignore_eos": True, **extra}, **kw)
        assert ids_of(c.logprobs.tokens) == greedy


def test_min_p_keeps_only_tokens_near_the_top(client):
    """At temperature 1 with nothing else applied the raw logprobs are the sampling
    distribution: every drawn token has p >= min_p x p(top-1), and some are not the top-1."""
    choices = completion(client, "Once upon a time", n=4, max_tokens=16, temperature=1.0, seed=3, logprobs=1,
                         extra_body={"min_p": 0.3, "ignore_eos": True})
    below_top = 0
    for c in choices:
        for value, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
            best = max(top.values())
            assert math.exp(value) >= 0.3 * math.exp(best) * (1 - 1e-6)
            below_top += value < best
    assert below_top > 0


def test_repetition_penalty_follows_its_rule(client, offline):
    """The first greedy token under repetition_penalty 1.8 is the argmax of the raw logits
    with every seen token's logit divided (if > 0) or multiplied (if < 0) by 1.8."""
    ids = offline.tokenizer.encode(REPEAT)
    logits = offline.engine.prompt_logits(ids)[-1].float()
    seen = torch.tensor(sorted(set(ids)))
    penalised = logits.clone()
    penalised[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)
    assert int(penalised.argmax()) != int(logits.argmax())  # the prompt makes the rule matter
    assert greedy_ids(client, REPEAT, n=1) == [int(logits.argmax())]
    assert greedy_ids(client, REPEAT, n=1, repetition_penalty=1.8) == [int(penalised.argmax())]


def test_presence_and_frequency_penalties_act_and_equal_offline(client, offline):
    plain = greedy_ids(client, REPEAT, n=12, ignore_eos=True)
    for kw, params in (({"presence_penalty": 2.0}, {"presence_penalty": 2.0}),
                       ({"frequency_penalty": 2.0}, {"frequency_penalty": 2.0})):
        (c,) = completion(client, REPEAT, max_tokens=12, temperature=0, logprobs=0, extra_body={"ignore_eos": True},
                          **kw)
        (out,) = offline.generate(REPEAT, SamplingParams(temperature=0, max_tokens=12, logprobs=0, ignore_eos=True,
                                                         **params))[0].outputs
        got = ids_of(c.logprobs.tokens)
        assert got == out.token_ids and got != plain
        # A penalty on generated tokens: the penalised run repeats its own tokens less.
        assert len(set(got)) > len(set(plain))


def test_min_tokens_and_ignore_eos(client):
    messages = [{"role": "user", "content": "Say OK."}]
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 30
    longer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                            extra_body={"min_tokens": n + 5})
    assert longer.usage.completion_tokens >= n + 5
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 40 and full.choices[0].finish_reason == "length"


def test_best_of_returns_the_sample_with_the_highest_cumulative_logprob(client):
    kw = dict(max_tokens=8, temperature=1.0, seed=11)
    samples = completion(client, "My favourite fruit is", n=4, logprobs=0, **kw)
    totals = [sum(c.logprobs.token_logprobs) for c in samples]
    assert len({c.text for c in samples}) > 1
    (best,) = completion(client, "My favourite fruit is", n=1, best_of=4, **kw)
    assert best.text == samples[totals.index(max(totals))].text
    two = completion(client, "My favourite fruit is", n=2, best_of=4, **kw)
    ranked = sorted(range(4), key=lambda i: -totals[i])[:2]
    assert [c.text for c in two] == [samples[i].text for i in ranked]


def test_beam_search_equals_offline_beams(client, offline):
    prompt = "My favourite fruit is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, n=3,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.5})
    params = SamplingParams(n=3, best_of=3, use_beam_search=True, length_penalty=0.5, max_tokens=6, temperature=0)
    beams = offline.generate(prompt, params)[0].outputs
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [b.text for b in beams]
    scores = [b.cumulative_logprob / len(b.token_ids) ** 0.5 for b in beams]
    assert scores == sorted(scores, reverse=True) and len({b.text for b in beams}) == 3
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, n=2,
                                          extra_body={"use_beam_search": True})
    beams = offline.chat(messages, SamplingParams(n=2, best_of=2, use_beam_search=True, max_tokens=5,
                                                  temperature=0))[0].outputs
    assert [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)] == [b.text for b in beams]


def test_content_parts_equal_the_plain_string(client):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]
    kw = dict(model=MODEL, max_tokens=12, temperature=0, logprobs=True,
              extra_body={"return_tokens_as_token_ids": True})
    a = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kw)
    b = client.chat.completions.create(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert [(t.token, t.logprob) for t in a.choices[0].logprobs.content] == \
        [(t.token, t.logprob) for t in b.choices[0].logprobs.content]
    assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)
    # b's prompt is a's token for token: every whole block of it comes from the prefix cache
    assert b.usage.prompt_tokens_details.cached_tokens == _cacheable(b.usage.prompt_tokens, b.usage.prompt_tokens)


def test_concurrent_async_clients_equal_sequential_runs(server, client):
    questions = [f"Count to {i}" for i in range(6)]

    def ask(i: int) -> dict:
        return dict(model=MODEL, messages=[{"role": "user", "content": questions[i]}], max_tokens=10,
                    temperature=0.9, seed=i, logprobs=True, extra_body={"return_tokens_as_token_ids": True})

    def view(r):
        return r.choices[0].message.content, [(t.token, t.logprob) for t in r.choices[0].logprobs.content]

    sequential = [view(client.chat.completions.create(**ask(i))) for i in range(6)]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*[aclient.chat.completions.create(**ask(i)) for i in range(6)])

    assert [view(r) for r in asyncio.run(main())] == sequential


def _chat_ids(server, messages) -> list[int]:
    import httpx

    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _cacheable(shared: int, prompt_len: int, block: int = 16) -> int:
    """Prompt tokens a prefix-cache hit covers: whole blocks of the shared prefix, leaving
    at least one prompt token to compute."""
    return min(shared, prompt_len - 1) // block * block


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_next_chat_turn_reuses_the_previous_prompt_and_reply(server, client):
    """Turn k of a chat reuses turn k-1's prompt and reply KV (every token runs one numeric
    format, so a generated token's KV is the KV its re-read as prompt would compute): the
    usage's cached_tokens count the whole blocks of the shared prefix, the reply's included."""
    messages = [{"role": "user", "content": "Describe a lighthouse keeper's morning in four sentences."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                           logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    ids1 = _chat_ids(server, messages)
    reply = ids_of([t.token for t in first.choices[0].logprobs.content])
    assert first.usage.prompt_tokens == len(ids1)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the evening?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    ids2 = _chat_ids(server, messages)
    expected = _cacheable(_common(ids2, ids1 + reply), len(ids2))
    assert expected >= _cacheable(len(ids1), len(ids2)) + 16  # at least one block of the reply
    assert second.usage.prompt_tokens_details.cached_tokens == expected
    # The stream's usage chunk reports it too.
    messages += [{"role": "assistant", "content": second.choices[0].message.content},
                 {"role": "user", "content": "Thanks."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    ids3 = _chat_ids(server, messages)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= _cacheable(_common(ids3, ids2), len(ids3))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= expected
