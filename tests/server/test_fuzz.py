"""A bounded fuzz of the API through a real server: a few hundred requests built from the
request models' fields with plausible, wrong-typed, huge, non-finite and odd-Unicode
values. Never a 5xx, always the OpenAI envelope on errors, no error event inside a
stream, and afterwards the engine serves normally with no KV block in use."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL
from tests.server.test_hardening import assert_alive

ODD_TEXT = st.one_of(st.text(max_size=12),
                     st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e\u0301", "🦙" * 3, "", " " * 50]))
WILD = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                              st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**30, 1e308, -1e308]), ODD_TEXT),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
                    max_leaves=6)
# Output lengths stay small or invalid, so a case never runs long.
SHORT = st.one_of(st.integers(-3, 4), st.integers(min_value=10**6), st.floats(), ODD_TEXT)
PLAUSIBLE = {
    "max_tokens": SHORT, "max_completion_tokens": SHORT, "min_tokens": st.integers(-2, 6),
    "n": st.integers(-1, 70), "best_of": st.integers(-1, 70),
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-3, 100),
    "min_p": st.floats(-0.5, 1.5), "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 200), "length_penalty": st.floats(), "seed": st.integers(),
    "priority": st.integers(), "logprobs": st.one_of(st.booleans(), st.integers(-1, 25)),
    "top_logprobs": st.integers(-1, 25), "prompt_logprobs": st.integers(-1, 25), "echo": st.booleans(),
    "use_beam_search": st.booleans(), "ignore_eos": st.booleans(), "stream": st.booleans(),
    "stop": st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=20)),
    "stop_token_ids": st.lists(st.integers(-5, 60000), max_size=4),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-5, 60000).map(str), ODD_TEXT), st.floats(), max_size=3),
    "prompt": st.one_of(ODD_TEXT, st.lists(ODD_TEXT, max_size=4), st.lists(st.integers(-5, 60000), max_size=8),
                        st.lists(st.lists(st.integers(0, 49000), min_size=1, max_size=4), max_size=3)),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool",
                                                                         "wizard"]),
                                                "content": st.one_of(ODD_TEXT, WILD)}), max_size=3),
    "model": st.one_of(st.just(MODEL), ODD_TEXT), "cache_salt": ODD_TEXT, "session_id": ODD_TEXT,
    "response_format": st.one_of(st.just({"type": "json_object"}), WILD), "guided_regex": ODD_TEXT,
    "guided_choice": st.lists(ODD_TEXT, max_size=3), "tier_mode": ODD_TEXT,
    "max_latency_ms": st.floats(), "max_cost_usd": st.floats(), "tokens": st.lists(st.integers(), max_size=5),
    "add_special_tokens": st.booleans(),
}
BASES = {
    "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 2},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1, 2]},
}


@st.composite
def requests(draw):
    path = draw(st.sampled_from(sorted(BASES)))
    body = dict(BASES[path])
    for name in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=5, unique=True)):
        wild = draw(st.integers(0, 4)) == 0 and name not in ("max_tokens", "max_completion_tokens")
        body[name] = draw(WILD if wild else PLAUSIBLE[name])
    if "max_tokens" in body and "max_completion_tokens" not in body and path.endswith("chat/completions"):
        body["max_completion_tokens"] = 2  # chat's default max is the context: keep it short
    return path, body


def _check_stream(r: httpx.Response) -> None:
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert event.get("error", {}).get("type") != "internal_error", event


@pytest.mark.slow
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=requests())
def test_fuzzed_requests_never_fail_the_server(http, case):
    path, body = case
    data = json.dumps(body).encode()  # NaN/Infinity as Python's JSON writes them
    with http.stream("POST", path, content=data, headers={"content-type": "application/json"}) as r:
        assert r.status_code < 500, (path, body, r.read())
        if r.status_code >= 400:
            err = json.loads(r.read())["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], (path, body, err)
        elif r.headers["content-type"].startswith("text/event-stream"):
            _check_stream(r)
        else:
            r.read()


def test_engine_alive_after_fuzzing(http):  # runs after the fuzz (file order)
    assert_alive(http)
