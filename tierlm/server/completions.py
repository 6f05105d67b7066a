"""POST /v1/completions: string, list-of-strings and token-id prompts; echo, logprobs, n,
streaming with optional usage chunk. `echo` with `logprobs` scores the prompt too (its
first token has no logprob), and `max_tokens: 0` then scores without generating: the
request shape evaluation harnesses use for log-likelihoods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tierlm.outputs import RequestOutput, TokenLogprob
from tierlm.server import fields, limits, route, streaming
from tierlm.server.errors import bad_request
from tierlm.server.protocol import CompletionRequest
from tierlm.server.state import ServerState, Tier
from tierlm.server.streaming import sse


def _prompt_items(req: CompletionRequest, sequences: int) -> list[str | list[int]]:
    """The request's prompts as a list: each a string or a list of token ids (each will run
    `sequences` engine sequences: their total is bounded)."""
    p = req.prompt
    if isinstance(p, str):
        items: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise bad_request("the prompt is empty", "prompt")
    if len(items) > limits.MAX_PROMPTS:
        raise bad_request(f"at most {limits.MAX_PROMPTS} prompts per request, got {len(items)}", "prompt")
    if len(items) * sequences > limits.MAX_SEQUENCES:
        raise bad_request(f"{len(items)} prompts x {sequences} sequences each is over the limit of "
                          f"{limits.MAX_SEQUENCES} sequences per request", "n")
    return items


def _logprobs(tier: Tier, token_ids: list[int], lps: list[TokenLogprob | None], offset: int,
              as_ids: bool = False) -> dict:
    """OpenAI's legacy logprobs object; a None entry (the first prompt token) stays null.
    `as_ids` (vLLM's return_tokens_as_token_ids) names tokens "token_id:N" instead of text."""
    text = tier.tokenizer.token_text
    label = (lambda t: f"token_id:{t}") if as_ids else text
    offsets, pos = [], offset
    for t in token_ids:
        offsets.append(pos)
        pos += len(text(t))
    return {"tokens": [label(t) for t in token_ids], "token_logprobs": [lp.logprob if lp else None for lp in lps],
            "top_logprobs": [{label(i): v for i, v in lp.top} if lp else None for lp in lps],
            "text_offset": offsets}


def _merge(a: dict, b: dict) -> dict:
    """Two logprobs objects, b's text following a's."""
    return {k: a[k] + b[k] for k in a}


async def create(request: Request, req: CompletionRequest, state: ServerState):
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    scoring = req.echo and req.logprobs is not None
    as_ids = req.return_tokens_as_token_ids
    if req.max_tokens is not None and req.max_tokens < (0 if scoring else 1):
        raise bad_request("max_tokens must be >= 1 (0 is allowed with echo and logprobs, to score the prompt)",
                          "max_tokens")
    params = fields.sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                    prompt_logprobs=req.logprobs if scoring else None, best_of=req.best_of)
    items = _prompt_items(req, params.num_sequences)
    if req.model == "auto" and len(state.tiers) > 1 and not all(isinstance(i, str) for i in items):
        raise bad_request("token-id prompts belong to one tokenizer: name a tier instead of 'auto'", "prompt")
    tenant = route.tenant_of(request)
    routed = await route.choose(state, tenant, req, params,
                                lambda t: [t.tokenizer.encode(i) if isinstance(i, str) else list(i) for i in items])
    tier, ids = routed.tier, routed.prompts
    for p in ids:
        await streaming.validate(tier, p, params)  # checks token ids too, so decoding below is safe
    texts = await asyncio.to_thread(lambda: [i if isinstance(i, str) else tier.tokenizer.decode(p)
                                             for i, p in zip(items, ids)])
    streaming.admit(tier, len(ids))
    lease = route.reserve(state, tenant, routed, params)
    rid = streaming.new_id("cmpl")
    gen = streaming.merged(tier, rid, ids, params, req.priority, req.cache_salt, req.session_id, lease)
    base = {"id": rid, "object": "text_completion", "created": streaming.now(), "model": tier.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        body = streaming.framed(_stream(tier, req, gen, base, ids, texts, include_usage), gen)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers=lease.headers())
    finals = await streaming.collect(request, gen)
    choices, completion_tokens = [], 0
    for pi in range(len(ids)):
        prefix = texts[pi] if req.echo else ""
        head = _logprobs(tier, ids[pi], finals[pi].prompt_logprobs, 0, as_ids) if scoring else None
        for c in finals[pi].outputs:
            lp = None
            if req.logprobs is not None:
                lp = _logprobs(tier, c.token_ids, c.logprobs or [], len(prefix), as_ids)
                if head is not None:
                    lp = _merge(head, lp)
            choices.append({"index": pi * req.n + c.index, "text": prefix + c.text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            completion_tokens += len(c.token_ids)
    prompt_tokens = sum(len(p) for p in ids)
    cached = sum(f.num_cached_tokens for f in finals.values())
    usage = streaming.usage(prompt_tokens, completion_tokens, cached)
    return JSONResponse({**base, "choices": choices, "usage": usage}, headers=lease.headers())


async def _stream(tier: Tier, req: CompletionRequest, gen: AsyncIterator[tuple[int, RequestOutput]],
                  base: dict, ids: list[list[int]], texts: list[str], include_usage: bool):
    offsets: dict[int, int] = {}
    completion_tokens = 0
    cached: dict[int, int] = {}  # per prompt
    scoring = req.echo and req.logprobs is not None
    as_ids = req.return_tokens_as_token_ids
    if req.echo and not scoring:
        for pi, text in enumerate(texts):
            for k in range(req.n):
                offsets[pi * req.n + k] = len(text)
                yield sse({**base, "choices": [{"index": pi * req.n + k, "text": text, "logprobs": None,
                                                "finish_reason": None}]})
    echoed: set[int] = set()
    async for pi, out in gen:
        cached[pi] = out.num_cached_tokens
        if scoring and pi not in echoed:  # the prompt's logprobs exist once its prefill is done
            echoed.add(pi)
            head = _logprobs(tier, ids[pi], out.prompt_logprobs, 0, as_ids)
            for k in range(req.n):
                offsets[pi * req.n + k] = len(texts[pi])
                yield sse({**base, "choices": [{"index": pi * req.n + k, "text": texts[pi], "logprobs": head,
                                                "finish_reason": None}]})
        for c in out.outputs:
            index = pi * req.n + c.index
            if not (c.delta_text or c.delta_token_ids or c.finish_reason):
                continue
            lp = None
            if req.logprobs is not None and c.delta_token_ids:
                new = c.logprobs[len(c.logprobs) - len(c.delta_token_ids):]
                lp = _logprobs(tier, c.delta_token_ids, new, offsets.get(index, 0), as_ids)
            offsets[index] = offsets.get(index, 0) + len(c.delta_text)
            yield sse({**base, "choices": [{"index": index, "text": c.delta_text, "logprobs": lp,
                                            "finish_reason": c.finish_reason,
                                            "stop_reason": c.stop_reason if c.finish_reason else None}]})
            if c.finish_reason:
                completion_tokens += len(c.token_ids)
    if include_usage:
        yield sse({**base, "choices": [], "usage": streaming.usage(sum(len(p) for p in ids), completion_tokens,
                                                               sum(cached.values()))})
