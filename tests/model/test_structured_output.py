"""Structured output on the bundled model: ten varied JSON schemas (nested objects,
arrays, enums, bounded numbers, optional fields) at temperature 0 and 1 always finish
by stop and validate with jsonschema; constraints leave unconstrained requests in the
same batch bit-for-bit unchanged."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tierlm import LLM, SamplingParams
from tierlm.structured.spec import GuidedSpec

NAME = {"type": "string", "maxLength": 16}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": -10,
                                                                       "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": NAME}, "required": ["ok"],
     "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999}, "roles": {
            "type": "array", "items": {"enum": ["admin", "dev", "guest"]}, "maxItems": 2}},
        "required": ["id", "roles"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                                      "currency": {"enum": ["EUR", "USD"]}},
     "required": ["price", "currency"], "additionalProperties": False},
    {"type": "object", "properties": {"title": NAME, "year": {"type": ["integer", "null"], "minimum": 1900,
                                                              "maximum": 2100}},
     "required": ["title", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["sku", "qty"], "additionalProperties": False}}}, "required": ["items"],
     "additionalProperties": False},
]


@pytest.fixture(scope="module")
def llm(cache_dir):
    return LLM("smollm2-135m", cache_dir=cache_dir, max_num_seqs=40, max_num_batched_tokens=2048)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ten_schemas_always_validate(llm, temperature):
    prompts = [[{"role": "user", "content": f"Return JSON matching this schema: {json.dumps(s)}"}] for s in SCHEMAS]
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=200, guided=GuidedSpec.json_schema(s))
              for i, s in enumerate(SCHEMAS)]
    outs = llm.generate([{"prompt_token_ids": llm.tokenizer.encode(llm.tokenizer.apply_chat_template(p),
                                                                   add_special_tokens=False)} for p in prompts],
                        params)
    for schema, out in zip(SCHEMAS, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
    llm.engine.scheduler.check_integrity()


def test_constrained_neighbours_do_not_change_an_unconstrained_request(llm):
    plain = SamplingParams(temperature=0.9, seed=11, max_tokens=12, logprobs=2)
    alone = llm.generate("The weather today", plain)[0].outputs[0]
    mixed = llm.generate(["Pick one", "The weather today", "A number"],
                         [SamplingParams(max_tokens=5, guided=GuidedSpec.choice(["a", "b"])), plain,
                          SamplingParams(max_tokens=8, guided=GuidedSpec("regex", r"[0-9]{1,4}"))])
    got = mixed[1].outputs[0]
    assert got.token_ids == alone.token_ids
    assert [(lp.logprob, lp.top) for lp in got.logprobs] == [(lp.logprob, lp.top) for lp in alone.logprobs]
    assert mixed[0].outputs[0].text in ("a", "b") and mixed[2].outputs[0].text.isdigit()
