"""Every bad request gets the OpenAI error envelope with the right status; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL

OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_envelope(r: httpx.Response, status: int, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize("patch,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -5}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"suffix": "tail"}, "suffix"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop_token_ids": [10**8]}, "stop_token_ids"), ({"top_k": -2}, "top_k"),
    ({"max_tokens": "many"}, "max_tokens"), ({"temperature": "hot"}, "temperature"), ({"prompt": 12}, "prompt"),
    # strict types, as OpenAI's API: no string-to-bool or -number coercion, integers stay integers
    ({"stream": "yes"}, "stream"), ({"max_tokens": "2"}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"), ({"echo": 1}, "echo"), ({"seed": True}, "seed"),
])
def test_completion_bad_values(http, patch, param):
    r = http.post("/v1/completions", json={**OK, **patch})
    assert_envelope(r, 400, param)


@pytest.mark.parametrize("patch,param", [
    ({"messages": []}, "messages"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"messages": [{"role": "wizard", "content": "x"}]},
                                                               "messages.0.role"),
])
def test_chat_bad_values(http, patch, param):
    r = http.post("/v1/chat/completions", json={**CHAT, **patch})
    assert_envelope(r, 400, param)


def test_strict_types_still_take_what_json_means(http):
    """An integer where a number is asked for is a number; nested objects parse as before."""
    r = http.post("/v1/chat/completions", json={**CHAT, "temperature": 0, "top_p": 1, "stream": False,
                                               "stream_options": None, "response_format": {"type": "text"}})
    assert r.status_code == 200, r.text
    assert_envelope(http.post("/v1/chat/completions", json={**CHAT, "logprobs": "true"}), 400, "logprobs")


def test_context_length(http):
    r = http.post("/v1/completions", json={**OK, "prompt": "hello " * 9000})
    assert_envelope(r, 400, "prompt", "context_length_exceeded")
    r = http.post("/v1/completions", json={**OK, "max_tokens": 9000})
    assert_envelope(r, 400, "max_tokens", "context_length_exceeded")


def test_malformed_bodies_and_content_type(http):
    assert_envelope(http.post("/v1/completions", content=b"{not json",
                              headers={"content-type": "application/json"}), 400)
    assert_envelope(http.post("/v1/completions", json=[1, 2, 3]), 400)
    assert_envelope(http.post("/v1/completions", json="just a string"), 400)
    assert_envelope(http.post("/v1/completions", json={"model": MODEL}), 400, "prompt")
    assert_envelope(http.post("/v1/completions", content=b"prompt=hi",
                              headers={"content-type": "application/x-www-form-urlencoded"}), 415)


def test_unknown_model_and_route(http):
    assert_envelope(http.post("/v1/completions", json={**OK, "model": "gpt-9"}), 404, "model", "model_not_found")
    assert_envelope(http.get("/v1/nothing-here"), 404)


def test_auth(server):
    assert_envelope(httpx.post(f"{server.url}/v1/completions", json=OK), 401, code="invalid_api_key")
    assert_envelope(httpx.post(f"{server.url}/v1/completions", json=OK,
                               headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_oversized_body(http):
    assert_envelope(http.post("/v1/completions", json={**OK, "prompt": "x" * (9 * 1024 * 1024)}), 413)


def test_still_serving_after_bad_requests(http):
    r = http.post("/v1/completions", json={**OK, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None


def test_a_union_field_names_itself_and_every_form_it_takes(http):
    """`prompt` is a string, strings, token ids or lists of them: a number fails every
    form, and the error names the field (not pydantic's member tags) and the forms."""
    r = http.post("/v1/completions", json={**OK, "prompt": 12})
    assert_envelope(r, 400, "prompt")
    assert r.json()["error"]["message"] == "Input should be a valid string or a valid list (prompt)"
    assert_envelope(http.post("/v1/completions", json={**OK, "prompt": [1, "x"]}), 400, "prompt")
