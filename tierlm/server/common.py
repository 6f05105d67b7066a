"""Pieces shared by the completion and chat endpoints: the server's tiers, sampling
params from a request, running one or many engine requests, client-disconnect handling,
SSE framing."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from tierlm.config import TierConfig
from tierlm.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineRestartingError,
    QueueFullError,
    RequestFailedError,
    ShuttingDownError,
)
from tierlm.engine.llm_engine import InvalidRequest
from tierlm.loader.tokenizer import TextTokenizer
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams, SamplingParamsError
from tierlm.server import limits
from tierlm.server.errors import APIError, ClientDisconnected, bad_request, sse_error
from tierlm.server.metrics import Metrics, TierMetrics
from tierlm.server.protocol import _SamplingFields
from tierlm.structured.spec import GuidedSpec
from tierlm.tenancy.tenants import Tenants

if TYPE_CHECKING:
    from tierlm.server.route import Lease

_DISCONNECT_POLL_S = 0.05


_TYPICAL_OUTPUT = 128  # completion tokens assumed before a tier has finished any request


@dataclass
class Tier:
    """One tier at run time: its engine and what handlers need to serve on it."""

    config: TierConfig
    engine: AsyncEngine
    tokenizer: TextTokenizer
    max_model_len: int
    vocab_size: int
    metrics: TierMetrics
    recent_outputs: deque = field(default_factory=lambda: deque(maxlen=64))  # completion lengths

    @property
    def model_name(self) -> str:  # what responses report as `model`
        return self.config.name

    def typical_output(self) -> int:
        """Completion tokens a request without max_tokens is expected to take (latency estimates)."""
        return int(statistics.median(self.recent_outputs)) if self.recent_outputs else _TYPICAL_OUTPUT


@dataclass
class ServerState:
    """What handlers need; owned by the app factory. `tiers` keeps declaration order."""

    tiers: dict[str, Tier]
    tenants: Tenants
    default_tier: str
    metrics: Metrics
    balanced_cost_weight: float = 1.0
    ready: bool = False
    draining: bool = False

    @property
    def default(self) -> Tier:
        return self.tiers[self.default_tier]

    @property
    def healthy(self) -> bool:
        return all(t.engine.healthy for t in self.tiers.values())

    @property
    def restarting(self) -> bool:  # an engine is being rebuilt after a failed step
        return any(t.engine.restarting for t in self.tiers.values())

    @property
    def num_inflight(self) -> int:
        return sum(t.engine.num_inflight for t in self.tiers.values())

    def resolve(self, model: str) -> Tier:
        """The tier a `model` value names: a tier name, else the first tier serving that model."""
        tier = self.tiers.get(model) or next((t for t in self.tiers.values() if t.config.engine.model == model), None)
        if tier is None:
            names = ", ".join(self.tiers)
            raise APIError(404, f"the model '{model}' does not exist; this server serves {names}"
                           + (" and auto" if len(self.tiers) > 1 else ""),
                           param="model", code="model_not_found", type="not_found_error")
        return tier


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(req: _SamplingFields, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None, best_of: int | None = None) -> SamplingParams:
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        if not -100.0 <= value <= 100.0:
            raise bad_request("logit_bias values must be in [-100, 100]", "logit_bias")
        bias[token] = value
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.MAX_STOPS or any(len(s) > limits.MAX_STOP_CHARS for s in stop):
        raise bad_request(f"stop takes at most {limits.MAX_STOPS} strings of at most {limits.MAX_STOP_CHARS} "
                          "characters", "stop")
    guided = guided_spec(req)
    if req.stream and (req.use_beam_search or (best_of or req.n) > req.n):
        raise bad_request("best_of > n and use_beam_search rank finished sequences: they cannot stream",
                          "stream")
    temperature = req.temperature
    if temperature is None:
        temperature = 0.0 if req.use_beam_search else 1.0
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens,
            temperature=temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=bias, seed=req.seed, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs, guided=guided,
            best_of=best_of, use_beam_search=req.use_beam_search, length_penalty=req.length_penalty)
    except SamplingParamsError as e:
        raise bad_request(str(e), e.param) from None


def guided_spec(req: _SamplingFields) -> GuidedSpec | None:
    """The output constraint from `response_format` or one of the guided_* extensions."""
    specs = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        specs.append(GuidedSpec.json_schema(None))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
        specs.append(GuidedSpec.json_schema(fmt.json_schema.schema_))
    if req.guided_json is not None:
        try:
            schema = json.loads(req.guided_json) if isinstance(req.guided_json, str) else req.guided_json
        except json.JSONDecodeError as e:
            raise bad_request(f"guided_json is not valid JSON: {e}", "guided_json") from None
        specs.append(GuidedSpec.json_schema(schema))
    if req.guided_regex is not None:
        specs.append(GuidedSpec("regex", req.guided_regex))
    if req.guided_choice is not None:
        specs.append(GuidedSpec.choice(req.guided_choice))
    if req.guided_grammar is not None:
        specs.append(GuidedSpec("grammar", req.guided_grammar))
    if len(specs) > 1:
        raise bad_request("use only one of response_format, guided_json, guided_regex, guided_choice and "
                          "guided_grammar", "response_format")
    return specs[0] if specs else None


async def validate(tier: Tier, ids: list[int], params: SamplingParams) -> None:
    """400 unless the engine can serve this. An output constraint is compiled here (once
    per distinct spec), on a worker thread: a large schema must not stall the event loop."""
    try:
        if params.guided is None:
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
        raise _engine_error(e) from None


def _engine_error(e: Exception) -> APIError:
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
    if isinstance(e, RequestFailedError):
        return APIError(500, f"this request failed: {e}", type="internal_error", code="request_failed")
    if isinstance(e, InvalidRequest):
        return bad_request(str(e), e.param, e.code)
    raise e


_ENGINE_ERRORS = (QueueFullError, EngineDeadError, EngineRestartingError, RequestFailedError, ShuttingDownError,
                  InvalidRequest)


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
    args = (params, priority, cache_salt, session_id, tenant.name if tenant is not None else "default")
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
        raise _engine_error(e) from None
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
                raise _engine_error(item) from None
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

    consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(_disconnected(request))
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


async def _disconnected(request: Request) -> None:
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
