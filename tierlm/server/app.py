"""FastAPI app factory: routes, and an ASGI guard for size, content type, auth and drain.

The guard is plain ASGI (not BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched. It maps the API key to a tenant (401 when the key
is unknown, or missing and no tenant is anonymous) and hands it to the handlers in the
request state.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tierlm.server import chat, completions, errors
from tierlm.server.common import ServerState
from tierlm.server.errors import envelope
from tierlm.server.metrics import Metrics
from tierlm.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

MAX_BODY_BYTES = 8 * 1024 * 1024


class Guard:
    """Rejects before the app runs: 413 oversized, 415 non-JSON POST, 401 bad key, 503 draining."""

    def __init__(self, app, state: ServerState, max_body_bytes: int) -> None:
        self.app, self.state, self.max_body = app, state, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        problem = None
        if path.startswith("/v1/"):  # first: an unknown caller learns nothing else
            tenant = self.state.tenants.authenticate(headers.get("authorization", ""))
            if tenant is None:
                problem = 401, "missing or invalid API key", "invalid_request_error", "invalid_api_key", {}
            scope.setdefault("state", {})["tenant"] = tenant
        problem = problem or self._check(path, method, headers)
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


def create_app(state: ServerState, metrics: Metrics, max_body_bytes: int = MAX_BODY_BYTES):
    app = FastAPI(title="tierlm", docs_url=None, redoc_url=None)
    errors.install(app)

    @app.post("/v1/completions")
    async def _completions(request: Request, body: CompletionRequest):
        return await completions.create(request, body, state)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request, body: ChatCompletionRequest):
        return await chat.create(request, body, state)

    @app.get("/v1/models")
    async def _models(request: Request):
        """The tiers this key may use (id = tier name), and `auto` when there is a choice."""
        tenant = request.state.tenant
        data = [{"id": t.model_name, "object": "model", "created": 0, "owned_by": "tierlm",
                 "max_model_len": t.max_model_len,
                 "tierlm": {"model": t.config.engine.model, "quality": t.config.quality,
                            "prompt_price_per_mtok": t.config.prompt_price_per_mtok,
                            "completion_price_per_mtok": t.config.completion_price_per_mtok}}
                for t in state.tiers.values() if tenant.may_use(t.model_name)]
        if len(data) > 1:
            data.append({"id": "auto", "object": "model", "created": 0, "owned_by": "tierlm",
                         "max_model_len": min(d["max_model_len"] for d in data)})
        return {"object": "list", "data": data}

    @app.post("/tokenize")
    async def _tokenize(body: TokenizeRequest):
        tier = state.default if body.model is None else state.resolve(body.model)
        if body.messages is not None:
            ids = chat.render(tier, body.messages)
        elif body.prompt is not None:
            ids = tier.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            raise errors.bad_request("give either prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": tier.max_model_len}

    @app.post("/detokenize")
    async def _detokenize(body: DetokenizeRequest):
        tier = state.default if body.model is None else state.resolve(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tier.vocab_size]
        if bad:
            raise errors.bad_request(f"token ids must be in [0, {tier.vocab_size}), got {bad[0]}", "tokens")
        return {"prompt": tier.tokenizer.decode(body.tokens)}

    def _errors() -> dict[str, str]:
        return {t.model_name: t.engine.error or "the engine is not running" for t in state.tiers.values()
                if not t.engine.healthy}

    @app.get("/health")
    async def _health():
        if not state.healthy:
            failed = _errors()
            error = next(iter(failed.values())) if len(state.tiers) == 1 else "; ".join(f"{k}: {v}" for k, v in
                                                                                       failed.items())
            return JSONResponse({"status": "unhealthy", "error": error}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def _ready():
        if state.ready and not state.draining and state.healthy:
            return {"status": "ready"}
        why = "draining" if state.draining else ("unhealthy" if not state.healthy else "loading")
        return JSONResponse({"status": why}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def _metrics():
        for t in state.tiers.values():
            metrics.healthy.labels(t.model_name).set(1 if t.engine.healthy else 0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Guard(app, state, max_body_bytes)
