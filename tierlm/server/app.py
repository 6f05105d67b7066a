"""FastAPI app factory: routes, and an ASGI guard for size, content type, auth and drain.

The guard is plain ASGI (not BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tierlm.server import chat, completions, errors
from tierlm.server.common import ServerState, check_model
from tierlm.server.errors import envelope
from tierlm.server.metrics import Metrics
from tierlm.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

MAX_BODY_BYTES = 8 * 1024 * 1024


class Guard:
    """Rejects before the app runs: 413 oversized, 415 non-JSON POST, 401 bad key, 503 draining."""

    def __init__(self, app, state: ServerState, api_keys: list[str], max_body_bytes: int) -> None:
        self.app, self.state, self.max_body = app, state, max_body_bytes
        self.keys = [k.encode() for k in api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        problem = self._check(path, method, headers)
        if problem is not None:
            status, message, kind, code, extra = problem
            body = json.dumps(envelope(message, kind, None, code)).encode()
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            hdrs += [(k.encode(), v.encode()) for k, v in extra.items()]
            await send({"type": "http.response.start", "status": status, "headers": hdrs})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _check(self, path: str, method: str, headers: dict):
        if path.startswith("/v1/") and self.keys:
            auth = headers.get("authorization", "")
            token = auth[7:].encode() if auth.lower().startswith("bearer ") else b""
            if not any(hmac.compare_digest(token, k) for k in self.keys):
                return 401, "missing or invalid API key", "invalid_request_error", "invalid_api_key", {}
        if method == "POST":
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                length = 0
            if length > self.max_body:
                return 413, f"request body over {self.max_body} bytes", "invalid_request_error", None, {}
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return 415, "Content-Type must be application/json", "invalid_request_error", None, {}
            if self.state.draining and (path.startswith("/v1/") or path in ("/tokenize", "/detokenize")):
                return 503, "the server is shutting down", "server_error", "shutting_down", {"Retry-After": "5"}
        return None


def create_app(state: ServerState, metrics: Metrics, api_keys: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    app = FastAPI(title="tierlm", docs_url=None, redoc_url=None)
    errors.install(app)

    @app.post("/v1/completions")
    async def _completions(request: Request, body: CompletionRequest):
        return await completions.create(request, body, state)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request, body: ChatCompletionRequest):
        return await chat.create(request, body, state)

    @app.get("/v1/models")
    async def _models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                             "owned_by": "tierlm", "max_model_len": state.max_model_len}]}

    @app.post("/tokenize")
    async def _tokenize(body: TokenizeRequest):
        if body.model is not None:
            check_model(state, body.model)
        if body.messages is not None:
            ids = chat.render(state, body.messages)
        elif body.prompt is not None:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise errors.bad_request("give either prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def _detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < state.vocab_size]
        if bad:
            raise errors.bad_request(f"token ids must be in [0, {state.vocab_size}), got {bad[0]}", "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/health")
    async def _health():
        if not state.engine.healthy:
            return JSONResponse({"status": "unhealthy", "error": state.engine.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def _ready():
        if state.ready and not state.draining and state.engine.healthy:
            return {"status": "ready"}
        why = "draining" if state.draining else ("unhealthy" if not state.engine.healthy else "loading")
        return JSONResponse({"status": why}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def _metrics():
        metrics.healthy.labels(state.model_name).set(1 if state.engine.healthy else 0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Guard(app, state, api_keys or [], max_body_bytes)
