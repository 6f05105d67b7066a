"""best_of and beam search through the official openai client against a real server."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL


def test_best_of_and_beam_search(client):
    r = client.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=6, n=1, best_of=3,
                                  seed=11, temperature=1.0)
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.usage.completion_tokens > 0
    r = client.completions.create(model=MODEL, prompt="My favourite fruit is", max_tokens=6, n=3,
                                  extra_body={"use_beam_search": True, "length_penalty": 0.0})
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                       max_tokens=5, n=2, extra_body={"use_beam_search": True})
    assert len({c.message.content for c in r.choices}) == 2


@pytest.mark.parametrize("kwargs,param", [
    ({"best_of": 2, "n": 3}, "best_of"),
    ({"best_of": 2, "stream": True}, "stream"),
    ({"extra_body": {"use_beam_search": True}, "stream": True}, "stream"),
    ({"extra_body": {"use_beam_search": True}, "temperature": 0.7}, "temperature"),
    ({"extra_body": {"use_beam_search": True}, "stop": ["."]}, "stop"),
])
def test_invalid_best_of_and_beam_requests_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, **kwargs)
        list(r) if kwargs.get("stream") else None
    assert e.value.body["param"] == param
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].text is not None
