"""Running a request on a tier's engine: validation and admission up front, one or
many engine requests merged into one stream, client-disconnect handling, SSE framing,
and the engine's errors as API errors."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from tierlm.engine.async_engine import (
    EngineDeadError,
    EngineRestartingError,
    QueueFullError,
    ReplicaLostError,
    RequestFailedError,
    ShuttingDownError,
)
from tierlm.engine.llm_engine import InvalidRequest
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams
from tierlm.server.errors import APIError, ClientDisconnected, bad_request, sse_error
from tierlm.server.route import Lease
from tierlm.server.state import Tier

_DISCONNECT_POLL_S = 0.05


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def validate(tier: Tier, ids: list[int], params: SamplingParams) -> None:
    """400 unless the engine can serve this. An output constraint is compiled here (once
    per distinct spec), on a worker thread: a large schema must not stall the event loop."""
    try:
        if params.guided is None and not getattr(tier.engine, "remote", False):
            tier.engine.prepare(ids, params)
        else:
            await asyncio.to_thread(tier.engine.prepare, ids, params)
    except InvalidRequest as e:
        raise bad_request(str(e), e.param, e.code) from None


def admit(tier: Tier, count: int = 1) -> None:
    """Refuse up front (503 queue full or engine down) before any response starts: room for
    all `count` engine requests of this HTTP request, or none of them."""
    try:
        tier.engine.check_admission(count)
    except (QueueFullError, EngineDeadError, EngineRestartingError) as e:
        raise engine_error(e) from None


def engine_error(e: Exception) -> APIError:
    if isinstance(e, QueueFullError):
        return APIError(503, f"the server is busy: {e}", type="server_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(e, EngineRestartingError):
        return APIError(503, str(e), type="server_error", code="engine_restarting", headers={"Retry-After": "5"})
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), type="internal_error", code="engine_dead")
    if isinstance(e, ShuttingDownError):
        return APIError(503, f"the server is shutting down: {e}", type="server_error", code="shutting_down",
                        headers={"Retry-After": "5"})
    if isinstance(e, ReplicaLostError):
        return APIError(503, f"this request was lost with its replica: {e}", type="server_error",
                        code="replica_lost", headers={"Retry-After": "1"})
    if isinstance(e, RequestFailedError):
        return APIError(500, f"this request failed: {e}", type="internal_error", code="request_failed")
    if isinstance(e, InvalidRequest):
        return bad_request(str(e), e.param, e.code)
    raise e


_ENGINE_ERRORS = (QueueFullError, EngineDeadError, EngineRestartingError, RequestFailedError, ShuttingDownError,
                  InvalidRequest, ReplicaLostError)


async def merged(tier: Tier, request_id: str, prompts: list[list[int]], params: SamplingParams,
                 priority: int, cache_salt: str | None = None, session_id: str | None = None,
                 lease: Lease | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run one engine request per prompt; yield (prompt index, output) as they arrive.

    Closing this generator (client gone) cancels every sub-request, which aborts it. The
    tenant's quota `lease` learns the tokens generated and is settled when this ends.
    """
    tenant = lease.tenant.config if lease is not None else None
    if tenant is not None and tenant.cache_group:  # tenants share cached prefixes only within a group
        cache_salt = f"{tenant.cache_group}\x1f{cache_salt or ''}"
    args = (params, priority, cache_salt, session_id, tenant.name if tenant is not None else "default", tier.lora)
    # One prompt (the common case) is read directly: no task and queue hop per token.
    outputs = _one(tier, request_id, prompts[0], *args) if len(prompts) == 1 else _fan_in(tier, request_id,
                                                                                            prompts, *args)
    try:
        async for i, out in outputs:
            if out.finished:
                tier.recent_outputs.extend(len(c.token_ids) for c in out.outputs)
            if lease is not None:
                lease.completion_tokens[i] = sum(len(c.token_ids) for c in out.outputs)
            yield i, out
    finally:
        await outputs.aclose()
        if lease is not None:
            lease.settle()


async def _one(tier: Tier, request_id: str, ids: list[int], *args) -> AsyncIterator[tuple[int, RequestOutput]]:
    gen = tier.engine.generate(request_id, ids, *args)
    try:
        async for out in gen:
            yield 0, out
    except _ENGINE_ERRORS as e:
        raise engine_error(e) from None
    finally:
        await gen.aclose()  # now, not at garbage collection: an unfinished request is aborted


async def _fan_in(tier: Tier, request_id: str, prompts: list[list[int]],
                  *args) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Several prompts: one task each, outputs interleaved as they come; closing cancels all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, ids: list[int]) -> None:
        try:
            async for out in tier.engine.generate(f"{request_id}-{i}", ids, *args):
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, ids)) for i, ids in enumerate(prompts)]
    remaining = len(prompts)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise engine_error(item) from None
            if item.finished:
                remaining -= 1
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect(request: Request, gen: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
    """Final output per prompt; aborts everything if the client disconnects first."""
    finals: dict[int, RequestOutput] = {}

    async def consume() -> None:
        async for i, out in gen:
            if out.finished:
                finals[i] = out

    consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(disconnected(request))
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await gen.aclose()
    if consumer not in done:
        raise ClientDisconnected
    consumer.result()  # re-raise an APIError from the engine
    return finals


async def disconnected(request: Request) -> None:
    """Return once the client has gone away."""
    while not await request.is_disconnected():
        await asyncio.sleep(_DISCONNECT_POLL_S)


async def framed(events: AsyncIterator[str], gen: AsyncIterator) -> AsyncIterator[str]:
    """An SSE body: `events`, then [DONE]. An APIError raised mid-stream (the status line is
    already sent) becomes an error event. Closes `events` and the engine generator `gen`.

    A client that leaves mid-stream: Starlette's StreamingResponse listens for the ASGI
    disconnect and cancels the body, which closes these generators and so aborts the
    engine requests (within one step) at no per-chunk cost."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield sse_error(e)
    finally:
        await events.aclose()
        await gen.aclose()
    yield SSE_DONE


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens whose KV the prefix cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def now() -> int:
    return int(time.time())
