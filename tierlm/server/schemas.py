"""Response shapes for the OpenAPI document, and the document itself.

Handlers build their responses as dicts (JSONResponse, SSE); these models describe them so
that clients and fuzzers can rely on /openapi.json: every route lists the statuses it
really answers with (the OpenAI error envelope for each), the 200 body's schema, and
`model` is an enum of what this server serves (anything else is a 404).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: dict[str, str]  # name, arguments (a JSON object as text)


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict[str, Any]] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    root: str | None = None  # the model it serves (an adapter: its path)
    parent: str | None = None  # a LoRA adapter's base model (tier)
    tierlm: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class Capacity(BaseModel):
    serving: int  # replicas in routing now
    configured: int  # --data-parallel-size


class Status(BaseModel):
    status: str
    error: str | None = None
    replicas: dict[str, Capacity] | None = None  # per tier served by replicas


_MESSAGES = {400: "invalid request (the envelope's param names the field)", 401: "missing or invalid API key",
             403: "this key may not use that tier", 404: "unknown model", 408: "the body arrived too slowly",
             413: "body over the size limit", 415: "Content-Type is not application/json",
             429: "over a quota, or a budget under load (Retry-After)", 500: "this request failed inside the engine",
             503: "queue full, engine restarting or draining (Retry-After)"}


def errors(*statuses: int) -> dict[int | str, dict]:
    """`responses=` entries: each status with the OpenAI error envelope."""
    return {s: {"model": ErrorResponse, "description": _MESSAGES[s]} for s in statuses}


GENERATE_ERRORS = errors(400, 401, 403, 404, 408, 413, 415, 429, 500, 503)
TOKENIZE_ERRORS = errors(400, 404, 408, 413, 415, 503)


def streamed(model: type[BaseModel]) -> dict[int | str, dict]:
    """A 200 that is JSON, or server-sent events when the request sets `stream`."""
    return {200: {"model": model, "content": {"text/event-stream": {"schema": {"type": "string"}}},
                  "description": "the result; with `stream: true`, SSE chunks ending in `data: [DONE]`"}}


def install_openapi(app: FastAPI, model_names: dict[str, list[str]]) -> None:
    """Serve the document with validation errors as the 400s they are (FastAPI lists 422,
    which this server never sends) and `model` restricted to what each endpoint serves
    (`model_names` by task: "generate" for completions and chat, "embed" for embeddings)."""

    def build() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for name, task in (("CompletionRequest", "generate"), ("ChatCompletionRequest", "generate"),
                               ("EmbeddingRequest", "embed")):
                if name in components and model_names[task]:  # none served: any name is a 4xx
                    components[name]["properties"]["model"] = {"type": "string", "enum": model_names[task],
                                                              "title": "Model"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build
