"""POST /v1/embeddings, as OpenAI defines it: `input` a string, token ids, or a list of
either (at most 2,048 inputs); `encoding_format` float or base64 (little-endian float32
bytes, what OpenAI's client decodes); `dimensions` where the model allows it (Matryoshka
models; otherwise only its native length); usage counts the input tokens.

`model` names an embedding tier, or is `auto` (the first embedding tier the key may use).
The tenant's quota is charged the input tokens. The request waits for its vectors; if
the client goes away first, work not yet started is dropped.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable

import torch
from fastapi import Request
from fastapi.responses import JSONResponse

from tierlm.embed import pooling
from tierlm.embed.encoder import InputTooLong
from tierlm.embed.inputs import check_dimensions, token_lists, truncation
from tierlm.engine.async_engine import EngineDeadError, QueueFullError, ShuttingDownError
from tierlm.server import limits, route, streaming
from tierlm.server.errors import ClientDisconnected, bad_request
from tierlm.server.protocol import EmbeddingRequest
from tierlm.server.route import Lease
from tierlm.server.state import ServerState, Tier
from tierlm.tenancy.tenants import Tenant


def _count(req: EmbeddingRequest) -> None:
    n = 1 if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)) else len(req.input)
    if n == 0:
        raise bad_request("input is empty", "input")
    if n > limits.MAX_EMBED_INPUTS:
        raise bad_request(f"at most {limits.MAX_EMBED_INPUTS} inputs per request, got {n}", "input")


def _encode(v: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(v.contiguous().numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


async def create(request: Request, req: EmbeddingRequest, state: ServerState):
    _count(req)
    tenant = route.tenant_of(request)
    tiers, _ = route.candidates(state, tenant, req.model, task="embed")
    tier = tiers[0]
    embedder = tier.embedder
    try:
        check_dimensions(embedder.spec, req.dimensions)
    except ValueError as e:
        raise bad_request(str(e), "dimensions") from None
    try:
        limit = truncation(embedder, req.truncate_prompt_tokens)
    except ValueError as e:
        raise bad_request(str(e), "truncate_prompt_tokens") from None
    try:  # tokenizing a large request is CPU work: off the event loop
        ids = await asyncio.to_thread(token_lists, embedder, req.input, limit)
    except InputTooLong as e:
        raise bad_request(str(e), "input", "context_length_exceeded") from None
    except ValueError as e:
        raise bad_request(str(e), "input") from None
    vectors, lease = await charged(state, tenant, tier, ids, lambda work: _until_disconnect(request, work))
    vectors = pooling.shorten(vectors, req.dimensions, embedder.spec.normalize)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    prompt_tokens = sum(len(i) for i in ids)
    return JSONResponse({"object": "list", "data": data, "model": tier.model_name,
                         "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}},
                        headers=lease.headers())


async def charged(state: ServerState, tenant: Tenant, tier: Tier, ids: list[list[int]],
                  wait: Callable[[Awaitable], Awaitable] | None = None) -> tuple[torch.Tensor, Lease]:
    """Vectors for checked inputs: admitted (503 when full), the input tokens charged to the
    tenant's quota (429), counted in the metrics. `wait` awaits the engine's work (the HTTP
    API's also watches for the client leaving)."""
    streaming.admit(tier)
    prompt_tokens = sum(len(i) for i in ids)
    lease = route.reserve_tokens(state, tenant, tier, prompt_tokens, 0)
    try:
        work = tier.engine.embed(ids)
        vectors = await (wait(work) if wait is not None else work)
    except (QueueFullError, EngineDeadError, ShuttingDownError) as e:
        raise streaming.engine_error(e) from None
    finally:
        lease.settle()
    tier.metrics.on_embed(tenant.name, prompt_tokens, len(ids))
    return vectors, lease


async def _until_disconnect(request: Request, coro: Awaitable) -> torch.Tensor:
    """The vectors, or ClientDisconnected (the queued work dropped) if the client leaves first."""
    work = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(streaming.disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        raise ClientDisconnected
    return work.result()
