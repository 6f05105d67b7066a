"""Structured output through the official openai client against a real server:
response_format json_schema / json_object and the guided_* extensions; bad constraints
are a 400 with the compiler's message, and the server keeps serving."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_response_validates(client, temperature):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=80,
        temperature=temperature, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_regex_and_choice(client):
    ask = 'Reply with the JSON object {"answer": 42} and nothing else.'
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask}], max_tokens=120,
                                       temperature=0.8, seed=1, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=0,
                                  extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert __import__("re").fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    r = client.completions.create(model=MODEL, prompt="Is water wet?", max_tokens=5, temperature=1.0, seed=1, n=3,
                                  extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert len(r.choices) == 3 and all(c.text in ("yes", "no", "maybe") for c in r.choices)


def test_streamed_constrained_output_parses(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person, as JSON"}], max_tokens=80, temperature=0.8,
        seed=5, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_guided_json_and_guided_grammar_constrain_the_output(client):
    """vLLM's extensions on completions and chat: guided_json output validates against the
    schema; guided_grammar (Lark) output is in the grammar's language, here checked with
    an equivalent regular expression."""
    r = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=80, temperature=0.9, seed=2,
                                  extra_body={"guided_json": PERSON})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a person."}],
                                       max_tokens=80, temperature=0, extra_body={"guided_json": json.dumps(PERSON)})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]{0,2}/'
    for seed in (1, 2, 3):
        r = client.completions.create(model=MODEL, prompt="What is 6 times 7?", max_tokens=20, temperature=1.0,
                                      seed=seed, extra_body={"guided_grammar": grammar})
        assert r.choices[0].finish_reason == "stop"
        assert __import__("re").fullmatch(r"The answer is [1-9][0-9]{0,2}\.", r.choices[0].text), r.choices[0].text


@pytest.mark.parametrize("extra,needle", [
    ({"guided_regex": "[a-"}, "regex"),
    ({"guided_json": {"type": "nonsense"}}, "nonsense"),
    ({"guided_grammar": "start: missing_rule"}, "missing_rule"),
    ({"guided_choice": []}, "choices"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "only one"),
])
def test_bad_constraints_are_400_and_server_keeps_serving(client, extra, needle):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body=extra)
    assert needle in str(e.value)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
