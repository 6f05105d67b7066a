"""Tool calling through the official openai client against a real server: forced calls
(required, named) validate against their schemas, calls the model writes itself are read
back (auto), streamed calls add up to the non-streamed ones, tool results reach the
prompt, and bad tool requests are a 400 after which the server keeps serving."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.server.conftest import MODEL

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                         "parameters": CITY}}
TOOLS = [WEATHER, TIME]
BOTH = [{"role": "user", "content": "What is the weather and the time in Paris?"}]


def weather_call(call_id: str, city: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


# One earlier turn in which the assistant called a tool: the 135M model then does the same.
ONE_SHOT = [{"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [weather_call("call_1", "Rome")]},
            {"role": "user", "content": "Weather in Paris?"}]


def calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def accumulate(stream) -> list:
    state = ChatCompletionStreamState()
    for chunk in stream:
        state.handle_chunk(chunk)
    return state.get_final_completion().choices


def test_required_returns_valid_calls_and_respects_parallel(client):
    r = client.chat.completions.create(model=MODEL, messages=BOTH, tools=TOOLS, tool_choice="required",
                                       max_tokens=60, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert calls(c.message) and all(name in ("get_weather", "get_time") for name, _ in calls(c.message))
    for name, arguments in calls(c.message):
        jsonschema.validate(arguments, CITY)
    assert all(t.id.startswith("call_") and t.type == "function" for t in c.message.tool_calls)
    # Parallel calls: the grammar lets the model add a second call in the same turn (which
    # the 135M model does for some seeds), and never with parallel_tool_calls=False.
    counts = {}
    for parallel in (True, False):
        for seed in range(6):
            r = client.chat.completions.create(model=MODEL, messages=BOTH, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=parallel, max_tokens=200, temperature=1.0,
                                               seed=seed)
            assert r.choices[0].finish_reason == "tool_calls"
            counts.setdefault(parallel, []).append(len(r.choices[0].message.tool_calls))
    assert max(counts[True]) >= 2 and set(counts[False]) == {1}, counts


def test_named_choice_calls_that_function(client):
    r = client.chat.completions.create(model=MODEL, messages=BOTH, tools=TOOLS, max_tokens=30, temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    (name, arguments), = calls(r.choices[0].message)
    assert name == "get_time" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(arguments, CITY)


def test_auto_reads_the_models_own_tool_call(client):
    r = client.chat.completions.create(model=MODEL, messages=ONE_SHOT, tools=TOOLS, max_tokens=40, temperature=0)
    c = r.choices[0]
    assert calls(c.message) == [("get_weather", {"city": "Paris"})]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    # "none": the same text is left as content.
    r = client.chat.completions.create(model=MODEL, messages=ONE_SHOT, tools=TOOLS, tool_choice="none",
                                       max_tokens=40, temperature=0)
    assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content


# Forces the model's text into two call blocks around some content: the auto parser is under test.
TWO_BLOCKS = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,6}"\}\}\n'
              r'</tool_call>\n<tool_call>\n\{"name": "get_time", "arguments": \{"city": "[A-Z][a-z]{2,6}"\}\}\n'
              r'</tool_call>')


def test_auto_parses_parallel_calls_and_keeps_one_when_asked(client):
    kw = {"model": MODEL, "messages": BOTH, "tools": TOOLS, "max_tokens": 100, "temperature": 0,
          "extra_body": {"guided_regex": TWO_BLOCKS}}
    c = client.chat.completions.create(**kw).choices[0]
    assert [name for name, _ in calls(c.message)] == ["get_weather", "get_time"]
    assert c.message.content == "Checking.\n\n" and c.finish_reason == "tool_calls"
    assert len({t.id for t in c.message.tool_calls}) == 2
    streamed, = accumulate(client.chat.completions.create(**kw, stream=True))
    assert calls(streamed.message) == calls(c.message) and streamed.message.content == c.message.content
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert calls(one.message) == calls(c.message)[:1]


@pytest.mark.parametrize("kw", [
    {"messages": ONE_SHOT, "temperature": 0},
    {"messages": BOTH, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0},
    {"messages": BOTH, "tool_choice": "required", "n": 2, "temperature": 0.9, "seed": 7},
], ids=["auto", "named", "required-n2"])
def test_streamed_calls_equal_non_streamed(client, kw):
    full = client.chat.completions.create(model=MODEL, tools=TOOLS, max_tokens=60, **kw)
    streamed = accumulate(client.chat.completions.create(model=MODEL, tools=TOOLS, max_tokens=60, stream=True, **kw))
    assert len(streamed) == len(full.choices)
    for a, b in zip(full.choices, sorted(streamed, key=lambda c: c.index)):
        assert calls(a.message) and calls(a.message) == calls(b.message)
        assert a.message.content == b.message.content and a.finish_reason == b.finish_reason == "tool_calls"


def test_tool_results_reach_the_prompt_and_the_conversation_goes_on(client, http):
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [weather_call("call_9", "Paris")]},
             {"role": "tool", "tool_call_id": "call_9", "content": "sunny, 24 C"}]
    ids = http.post("/tokenize", json={"messages": turns}).json()["tokens"]
    prompt = http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "user\n<tool_response>\nsunny, 24 C\n</tool_response>" in prompt
    r = client.chat.completions.create(model=MODEL, messages=turns, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kw,needle", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "get_stock"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "must match"),
    ({"tools": [WEATHER, WEATHER]}, "defined twice"),
    ({"tool_choice": "required"}, "requires tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "nonsense"}}}}}]}, "nonsense"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
], ids=["undefined-choice", "bad-name", "duplicate", "required-without-tools", "with-response-format",
        "bad-schema", "tool-without-id"])
def test_bad_tool_requests_are_400_and_server_keeps_serving(client, kw, needle):
    kw = {"messages": BOTH, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, **kw)
    assert needle in str(e.value) and e.value.body["type"] == "invalid_request_error"
    r = client.chat.completions.create(model=MODEL, messages=BOTH, tools=TOOLS, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
