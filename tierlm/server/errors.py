"""OpenAI error envelope and the exception handlers that produce it for every failure."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierlm.loader.tokenizer import TokenizerInputError

log = logging.getLogger("tierlm.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class ClientDisconnected(Exception):
    """The client went away before its response: the request was aborted (one log line)."""


def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(envelope(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def sse_error(e: APIError) -> str:
    """An error delivered inside an already-started event stream."""
    return f"data: {json.dumps(envelope(e.message, e.type, e.param, e.code))}\n\n"


def _real_path(error: dict, body) -> list[str]:
    """The error's location without pydantic's union-member tags ("str", "list[int]", a
    model's name): only the keys and indices that exist in the request body (and a missing
    field's name), so `param` names the field as the client wrote it."""
    loc = [p for p in error.get("loc", ()) if p != "body"]
    if not isinstance(body, (dict, list)):
        return [str(p) for p in loc]
    path, node = [], body
    for i, part in enumerate(loc):
        exists = part in node if isinstance(node, dict) else (
            isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node))
        if exists:
            node = node[part]
        elif not (i == len(loc) - 1 and error.get("type") == "missing"):
            continue  # a union member's tag
        path.append(str(part))
    return path


def invalid_body(errors: list[dict], body) -> APIError:
    """The 400 for a body that failed validation (pydantic's `errors`), naming the field as
    the client wrote it."""
    message, param = _validation_message(errors, body)
    return bad_request(message, param)


def _validation_message(errors: list[dict], body) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = _real_path(first, body)
    if first.get("type") == "lone_surrogate":  # the validator saw the whole field: point inside it
        loc += [str(p) for p in first.get("ctx", {}).get("path", ())]
        return str(first.get("msg")), ".".join(loc)
    param = ".".join(loc) or None
    # A union field fails once per member: say every form it could have taken.
    messages = []
    for e in errors:
        if (".".join(_real_path(e, body)) or None) == param:
            text = str(e.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's wrapper text
            if messages:
                text = text.removeprefix("Input should be ")
            if text not in messages:
                messages.append(text)
    where = f" ({param})" if param else ""
    return f"{' or '.join(messages)}{where}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(invalid_body(exc.errors(), getattr(exc, "body", None)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(envelope(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(TokenizerInputError)
    async def _tokenizer(request: Request, exc: TokenizerInputError):
        return error_response(bad_request(str(exc)))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        log.info("client disconnected: %s %s aborted", request.method, request.url.path)
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(envelope("internal server error", "internal_error"), status_code=500)
