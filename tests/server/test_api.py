"""Endpoints and parameters through the official openai client (sync and async) and httpx."""

from __future__ import annotations

import asyncio

import openai

from tests.server.conftest import API_KEY, MODEL

PROMPT = "The three primary colors are"


def test_models_and_health(client, http, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    import httpx

    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_completion_basic_usage_and_choices(client, http):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    n_prompt = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert r.object == "text_completion" and len(r.choices) == 1
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop") and c.text
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_prompt_forms(client, http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    a = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    b = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    many = client.completions.create(model=MODEL, prompt=[PROMPT, "Dogs are"], max_tokens=8, temperature=0)
    many_ids = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert a.choices[0].text == b.choices[0].text == many.choices[0].text == many_ids.choices[1].text
    assert sorted(c.index for c in many.choices) == [0, 1]
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT


def test_echo_n_seed_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert r.choices[0].text.startswith(PROMPT)
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=42, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and sorted(c.index for c in a.choices) == [0, 1, 2]
    lp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    info = lp.choices[0].logprobs
    assert len(info.tokens) == len(info.token_logprobs) == len(info.top_logprobs) == 5
    assert all(len(t) == 3 for t in info.top_logprobs)
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(info.top_logprobs, info.token_logprobs))
    assert "".join(info.tokens) == lp.choices[0].text


def test_stop_strings_end_the_text_before_them(client):
    """Sampling extensions are checked value by value in test_values.py."""
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = free.strip().split()[1]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].stop_reason == stop
    assert r.choices[0].text == free[: free.index(stop)]


def test_chat_logprobs_and_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}],
                                       max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert len(c.logprobs.content) == r.usage.completion_tokens <= 6
    assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_streaming_matches_non_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the sun?"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert "".join(ch.choices[0].text for ch in stream) == plain.choices[0].text


def test_64_concurrent_streams_equal_solo(server, client):
    prompts = [f"Write one sentence about the number {i}." for i in range(16)]
    solo = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
            for p in prompts}

    async def one(aclient, p):
        text = ""
        async for ch in await aclient.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0,
                                                         stream=True):
            text += ch.choices[0].text
        return p, text

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*[one(aclient, prompts[i % 16]) for i in range(64)])

    results = asyncio.run(main())
    assert len(results) == 64
    assert all(text == solo[p] for p, text in results)
