"""A Rust panic inside `tokenizers` (pyo3's PanicException, a BaseException) never escapes as
a bare text 500: the tokenizer turns it into a refusal of the input, and the app's guard
turns anything that still escapes into the OpenAI envelope."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tierlm.loader.tokenizer import TokenizerInputError
from tierlm.server.app import Guard


class PanicException(BaseException):
    """The shape pyo3 gives a Rust panic: `pyo3_runtime.PanicException(BaseException)`
    (created lazily inside the extension, so not importable to raise here)."""


PanicException.__module__ = "pyo3_runtime"


def _panic(*args, **kwargs):
    raise PanicException("index out of bounds: the len is 3 but the index is 7")


def test_tokenizer_panic_is_an_input_error(tiny_llama):
    from tierlm import LLM

    tok = LLM(str(tiny_llama[0]), dtype="float32").tokenizer
    assert tok.encode("Hello") == tok.encode("Hello")  # works before the fault
    tok._encode_batch = _panic  # the injected fault
    with pytest.raises(TokenizerInputError, match="could not encode this input"):
        tok.encode("Hello")
    tok._tok.decode = _panic
    with pytest.raises(TokenizerInputError, match="could not decode"):
        tok.decode([1, 2])


def test_guard_turns_an_escaping_panic_into_the_envelope():
    async def app(scope, receive, send):
        _panic()

    async def call():
        transport = httpx.ASGITransport(app=Guard(app, state=None, max_body_bytes=1024))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/health")

    r = asyncio.run(call())
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": {"message": "internal server error", "type": "internal_error", "param": None,
                                  "code": None}}


def test_guard_lets_cancellation_through():
    async def app(scope, receive, send):
        raise asyncio.CancelledError

    async def call():
        transport = httpx.ASGITransport(app=Guard(app, state=None, max_body_bytes=1024))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/health")

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call())
