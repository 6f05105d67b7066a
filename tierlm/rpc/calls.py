"""What every RPC shares: the caller's tenant from `authorization` metadata, refusal
while draining, and errors as gRPC status codes.

An APIError's HTTP status maps to the gRPC code for the same condition (the mapping
gRPC's HTTP gateways use); its `param`, `code` and `type`, and headers such as
Retry-After and the quota's, travel as trailing metadata (`tierlm-error-param`, ...,
`retry-after`), so a client learns as much as from the HTTP error envelope.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
from pydantic import BaseModel, ValidationError

from tierlm.server.errors import APIError, invalid_body
from tierlm.server.route import Lease
from tierlm.server.state import ServerState
from tierlm.tenancy.tenants import Tenant

log = logging.getLogger("tierlm.server")

CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class Undecodable:
    """A request whose bytes did not parse as its method's message (a proto3 string that is
    not UTF-8, a corrupt wire format): server.py's deserializers return it instead of
    raising, and the handlers below refuse it as the caller's error (INVALID_ARGUMENT), as
    malformed JSON is on HTTP."""

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type, self.error = message_type, error

    def refusal(self) -> APIError:
        return APIError(400, f"the request is not a valid {self.message_type} message: {self.error}",
                        code="invalid_request")


def _parsed(request):
    if isinstance(request, Undecodable):
        raise request.refusal()
    return request


def code_for(status: int) -> grpc.StatusCode:
    return CODES.get(status, grpc.StatusCode.INVALID_ARGUMENT if 400 <= status < 500 else grpc.StatusCode.INTERNAL)


def trailers(e: APIError) -> tuple[tuple[str, str], ...]:
    items = {"tierlm-error-type": e.type, "tierlm-error-code": e.code, "tierlm-error-param": e.param,
             "tierlm-http-status": str(e.status)}
    items.update({k.lower(): v for k, v in (e.headers or {}).items()})
    return tuple((k, str(v)) for k, v in items.items() if v is not None)


def validated(model: type[BaseModel], body: dict) -> BaseModel:
    """`body` as the HTTP API's request `model`, refused with the same 400 the HTTP API gives."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid_body(e.errors(), body) from None


def authenticate(state: ServerState, context: grpc.aio.ServicerContext) -> Tenant:
    """The tenant the call's `authorization` metadata names (as the HTTP API's header)."""
    metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
    tenant = state.tenants.authenticate(metadata.get("authorization", ""))
    if tenant is None:
        raise APIError(401, "missing or invalid API key", code="invalid_api_key")
    return tenant


async def send_headers(context: grpc.aio.ServicerContext, lease: Lease) -> None:
    """The HTTP response's headers (tier, quota state) as the call's initial metadata."""
    await context.send_initial_metadata(tuple((k.lower(), v) for k, v in lease.headers().items()))


def refuse_if_draining(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                       headers={"Retry-After": "5"})


def _count(state: ServerState, method: str, code: grpc.StatusCode) -> None:
    state.metrics.grpc_requests.labels(method, code.name).inc()


async def _end(state: ServerState, method: str, context, e: BaseException) -> None:
    """End a call that raised `e`: counted, and an APIError (or anything unexpected, as
    INTERNAL) turned into its status and trailers. Cancellation (the client cancelled or went
    away) propagates, so gRPC finishes the call."""
    if isinstance(e, APIError):
        _count(state, method, code_for(e.status))
        context.set_trailing_metadata(trailers(e))
        await context.abort(code_for(e.status), e.message)
    if isinstance(e, asyncio.CancelledError):
        _count(state, method, grpc.StatusCode.CANCELLED)
        raise e
    if not isinstance(e, Exception):
        raise e
    log.error("unhandled error in gRPC %s", method, exc_info=e)
    _count(state, method, grpc.StatusCode.INTERNAL)
    await context.abort(grpc.StatusCode.INTERNAL, "internal server error")


def unary(method):
    """An RPC handler whose APIErrors end the call with the mapped status and trailers."""

    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            reply = await method(self, _parsed(request), context)
        except BaseException as e:  # noqa: BLE001 - _end re-raises what is not ours to answer
            await _end(self.state, method.__name__, context, e)
        _count(self.state, method.__name__, grpc.StatusCode.OK)
        return reply

    return handler


def streamed(method):
    """`unary` for a server-streaming handler (an async generator). An error after some
    messages ends the stream with the status, as an error event ends an SSE stream."""

    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            async for reply in method(self, _parsed(request), context):
                yield reply
        except BaseException as e:  # noqa: BLE001 - _end re-raises what is not ours to answer
            await _end(self.state, method.__name__, context, e)
        _count(self.state, method.__name__, grpc.StatusCode.OK)

    return handler
