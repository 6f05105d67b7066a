"""FastAPI app factory: routes, and an ASGI guard for size, content type, auth and drain.

The guard is plain ASGI (not BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched. It maps the API key to a tenant (401 when the key
is unknown, or missing and no tenant is anonymous) and hands it to the handlers in the
request state. It reads a POST body itself before the app sees it: over the size limit
(counted as it arrives, with or without Content-Length) is a 413 without reading the
rest, and a body that has not arrived within `body_timeout_s` is a 408. Anything that
still escapes the app (a Rust panic from the tokenizer is a BaseException) becomes the
OpenAI envelope with a 500, never a bare text response.
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tierlm.server import chat, completions, embeddings, errors, limits, lora_routes, schemas
from tierlm.server.errors import envelope
from tierlm.server.metrics import Metrics
from tierlm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from tierlm.server.state import ServerState

log = logging.getLogger("tierlm.server")


POST_ROUTES = (frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize", "/detokenize"})
               | lora_routes.ROUTES)
# Probes need no key; every other route (the API, tokenize, metrics, the schema) does
# whenever a key is configured.
OPEN_ROUTES = frozenset({"/health", "/ready"})


class _BodyTooLarge(Exception):
    pass


class Guard:
    """Rejects before the app runs: 413 oversized, 415 non-JSON POST, 401 bad key, 503 draining,
    408 a body that does not arrive in time."""

    def __init__(self, app, state: ServerState, max_body_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app, self.state, self.max_body, self.body_timeout_s = app, state, max_body_bytes, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._guarded(scope, receive, tracked_send)
        except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - the last line: envelope, never text
            await self._last_resort(e, started, send)
        except BaseException as e:
            if not _is_panic(e):  # cancellation, SystemExit, KeyboardInterrupt: not ours to stop
                raise
            await self._last_resort(e, started, send)

    async def _last_resort(self, e: BaseException, started: bool, send) -> None:
        log.error("unhandled error: %s: %s", type(e).__name__, e, exc_info=(type(e), e, e.__traceback__))
        if not started:
            await _send_error(send, 500, "internal server error", "internal_error", None, {})

    async def _guarded(self, scope, receive, send):
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        problem = None
        if path not in OPEN_ROUTES:  # first: an unknown caller learns nothing else
            authorization = headers.get("authorization", "")
            metrics_all = path == "/metrics" and self.state.tenants.metrics_key(authorization)
            tenant = None if metrics_all else self.state.tenants.authenticate(authorization)
            if tenant is None and not metrics_all:
                problem = 401, "missing or invalid API key", "invalid_request_error", "invalid_api_key", {}
            scope.setdefault("state", {}).update(tenant=tenant, metrics_all=metrics_all)
        problem = problem or self._check(path, method, headers)
        if problem is None and method == "POST" and path in POST_ROUTES:
            try:
                body = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
            except _BodyTooLarge:
                problem = 413, f"request body over {self.max_body} bytes", "invalid_request_error", None, {}
            except TimeoutError:
                problem = (408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                           "invalid_request_error", "request_timeout", {"Connection": "close"})
            else:
                receive = _replay(body, receive)
        if problem is not None:
            await _send_error(send, *problem)
            return
        await self.app(scope, receive, send)

    async def _read_body(self, receive) -> bytes:
        """The whole body, counting bytes as they arrive (chunked bodies have no Content-Length)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _check(self, path: str, method: str, headers: dict):
        if method == "POST" and path in POST_ROUTES:  # elsewhere the router answers 404 / 405
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                length = 0
            if length > self.max_body:
                return 413, f"request body over {self.max_body} bytes", "invalid_request_error", None, {}
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return 415, "Content-Type must be application/json", "invalid_request_error", None, {}
            if self.state.draining:
                return 503, "the server is shutting down", "server_error", "shutting_down", {"Retry-After": "5"}
        return None


def _replay(body: bytes, receive):
    """A `receive` that yields the already-read body once, then waits on the client again
    (so disconnects are still seen)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send, status: int, message: str, kind: str, code: str | None, extra: dict) -> None:
    body = json.dumps(envelope(message, kind, None, code)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _is_panic(e: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (`pyo3_runtime.PanicException`, not importable by name)."""
    return type(e).__name__ == "PanicException"


def _names(state: ServerState, task: str) -> list[str]:
    """What `model` may be on `task`'s endpoints: its tiers' and adapters' names, the models
    they serve, and `auto` when the server has several tiers."""
    served = [t for t in state.served() if t.task == task]
    names = [t.model_name for t in served]
    models = sorted({t.config.engine.model for t in served if t.lora is None} - set(state.tiers) - set(state.adapters))
    return names + models + (["auto"] if len(state.tiers) > 1 and served else [])


def create_app(state: ServerState, metrics: Metrics, max_body_bytes: int = limits.MAX_BODY_BYTES,
               body_timeout_s: float = 30.0):
    app = FastAPI(title="tierlm", docs_url=None, redoc_url=None)
    errors.install(app)

    @app.post("/v1/completions", responses={**schemas.streamed(schemas.CompletionResponse),
                                            **schemas.GENERATE_ERRORS})
    async def _completions(request: Request, body: CompletionRequest):
        return await completions.create(request, body, state)

    @app.post("/v1/chat/completions", responses={**schemas.streamed(schemas.ChatCompletionResponse),
                                                 **schemas.GENERATE_ERRORS})
    async def _chat(request: Request, body: ChatCompletionRequest):
        return await chat.create(request, body, state)

    @app.post("/v1/embeddings", response_model=schemas.EmbeddingResponse, responses=schemas.GENERATE_ERRORS)
    async def _embeddings(request: Request, body: EmbeddingRequest):
        return await embeddings.create(request, body, state)

    @app.get("/v1/models", response_model=schemas.ModelList, responses=schemas.errors(401))
    async def _models(request: Request):
        """The tiers and LoRA adapters this key may use (id = the name to send as `model`; an
        adapter's `parent` is its base tier), and `auto` when there is a choice."""
        tenant = request.state.tenant
        data = [{"id": t.model_name, "object": "model", "created": 0, "owned_by": "tierlm",
                 "max_model_len": t.max_model_len,
                 "root": str(t.lora.path) if t.lora is not None else t.config.engine.model, "parent": t.parent,
                 "tierlm": {"model": t.config.engine.model, "quality": t.config.quality,
                            "prompt_price_per_mtok": t.config.prompt_price_per_mtok,
                            "completion_price_per_mtok": t.config.completion_price_per_mtok}}
                for t in state.served() if tenant.may_use(t.model_name)]
        if len([t for t in state.routable() if tenant.may_use(t.model_name)]) > 1:
            data.append({"id": "auto", "object": "model", "created": 0, "owned_by": "tierlm",
                         "max_model_len": min(d["max_model_len"] for d in data)})
        return {"object": "list", "data": data}

    @app.post("/tokenize", response_model=schemas.TokenizeResponse, responses=schemas.TOKENIZE_ERRORS)
    async def _tokenize(body: TokenizeRequest):
        tier = state.default if body.model is None else state.resolve(body.model)
        if body.messages is not None and tier.task == "embed":
            raise errors.bad_request(f"'{tier.model_name}' is an embedding model: it has no chat template", "messages")
        if body.messages is not None:
            ids = await asyncio.to_thread(chat.render, tier, body.messages,  # off the event loop: CPU work
                                          template_kwargs=body.chat_template_kwargs)
        elif body.prompt is not None:
            ids = await asyncio.to_thread(tier.tokenizer.encode, body.prompt, body.add_special_tokens)
        else:
            raise errors.bad_request("give either prompt or messages", "prompt")
        # JSONResponse directly: FastAPI's encoder walks a million-id list in Python for seconds.
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": tier.max_model_len})

    @app.post("/detokenize", response_model=schemas.DetokenizeResponse, responses=schemas.TOKENIZE_ERRORS)
    async def _detokenize(body: DetokenizeRequest):
        tier = state.default if body.model is None else state.resolve(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tier.vocab_size]
        if bad:
            raise errors.bad_request(f"token ids must be in [0, {tier.vocab_size}), got {bad[0]}", "tokens")
        return {"prompt": await asyncio.to_thread(tier.tokenizer.decode, body.tokens)}

    def _errors() -> dict[str, str]:
        return {t.model_name: t.engine.error or "the engine is not running" for t in state.tiers.values()
                if not t.engine.healthy}

    @app.get("/health", response_model=schemas.Status, response_model_exclude_none=True,
             responses={503: {"model": schemas.Status}})
    async def _health():
        if not state.healthy:
            failed = _errors()
            error = next(iter(failed.values())) if len(state.tiers) == 1 else "; ".join(f"{k}: {v}" for k, v in
                                                                                       failed.items())
            return JSONResponse({"status": "unhealthy", "error": error}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", response_model=schemas.Status, response_model_exclude_none=True,
             responses={503: {"model": schemas.Status}})
    async def _ready():
        """Ready or not (503); with replicas, how many of each tier's serve (fewer than
        configured while one is being replaced: reduced capacity, still ready)."""
        capacity = {t.model_name: dict(zip(("serving", "configured"), t.engine.capacity()))
                    for t in state.tiers.values() if hasattr(t.engine, "capacity")}
        extra = {"replicas": capacity} if capacity else {}
        if state.serving:
            return {"status": "ready", **extra}
        why = ("draining" if state.draining else "unhealthy" if not state.healthy
               else "restarting" if state.restarting else "loading")
        return JSONResponse({"status": why, **extra}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def _metrics(request: Request):
        """Every series to operators (a tenant with `metrics = true`, or `--metrics-api-key`);
        other callers see per-tenant series for their own tenant only."""
        for t in state.tiers.values():
            metrics.healthy.labels(t.model_name).set(1 if t.engine.healthy else 0)
        tenant = request.state.tenant
        everything = request.state.metrics_all or not state.tenants.keyed or tenant.config.operator
        return Response(metrics.render(None if everything else tenant.name),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    lora_routes.install(app, state)
    schemas.install_openapi(app, {"generate": _names(state, "generate"), "embed": _names(state, "embed")})
    return Guard(app, state, max_body_bytes, body_timeout_s)
