"""POST /v1/chat/completions: the model's chat template (with `chat_template_kwargs`), n,
logprobs + top_logprobs, tool calls (request side in `tools`, reading them back in
`tool_parser`), reasoning output (a tier's reasoning parser moves the think block into
`reasoning_content`; tool calls and structured output then apply to the content after
it), streaming deltas (role first, then reasoning, content or tool calls) with optional
usage chunk."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from tierlm.loader.chat_template import ChatTemplateError, references
from tierlm.outputs import CompletionOutput, RequestOutput, TokenLogprob
from tierlm.server import fields, reasoning, route, streaming, tool_parser, tools
from tierlm.server.errors import APIError, bad_request
from tierlm.server.protocol import ChatCompletionRequest, ChatMessage
from tierlm.server.state import ServerState, Tier
from tierlm.server.streaming import sse
from tierlm.server.tool_parser import ChoiceStream
from tierlm.server.tools import ToolPlan
from tierlm.structured.spec import GuidedSpec


def render(tier: Tier, messages: list[ChatMessage], add_generation_prompt: bool = True,
           tool_plan: ToolPlan = tools.NO_TOOLS, template_kwargs: dict | None = None) -> list[int]:
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    native = references(tier.tokenizer.chat_template_source, "tools")
    plain, shown = tools.template_input(messages, tool_plan, native)
    try:
        text = tier.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tools=shown,
                                                  extra=template_kwargs)
    except ChatTemplateError as e:
        raise bad_request(str(e), "chat_template_kwargs" if "chat_template_kwargs" in str(e) else "messages") from None
    return tier.tokenizer.encode(text, add_special_tokens=False)


def _logprobs(tier: Tier, token_ids: list[int], lps: list[TokenLogprob], as_ids: bool = False) -> dict:
    """`as_ids` (vLLM's return_tokens_as_token_ids) names tokens "token_id:N" instead of text."""
    def entry(token: int, logprob: float) -> dict:
        text = tier.tokenizer.token_text(token)
        return {"token": f"token_id:{token}" if as_ids else text, "logprob": logprob,
                "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for t, lp in zip(token_ids, lps)]}


async def create(request: Request, req: ChatCompletionRequest, state: ServerState):
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise bad_request("top_logprobs must be in [0, 20]", "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens < 1:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise bad_request("max_tokens must be >= 1", param)
    tool_plan = tools.plan(req)
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not supported with stream", "prompt_logprobs")
    params = fields.sampling_params(req, max_tokens=max_tokens,
                                    logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                                    prompt_logprobs=req.prompt_logprobs)
    if tool_plan.forced:
        if params.guided is not None:
            raise bad_request("tool_choice 'required' or a named function cannot be combined with "
                              "response_format or guided_*", "tool_choice")
        params.guided = tools.guided(tool_plan)
    tenant = route.tenant_of(request)
    routed = await route.choose(state, tenant, req, params,
                                lambda t: [render(t, req.messages, req.add_generation_prompt, tool_plan,
                                                  req.chat_template_kwargs)])
    tier, ids = routed.tier, routed.prompts[0]
    fmt = reasoning.PARSERS.get(tier.config.reasoning_parser or "")
    if fmt is not None and params.guided is not None:
        params.guided = _after_reasoning(tier, params.guided)
    try:
        await streaming.validate(tier, ids, params)
    except APIError as e:
        if tool_plan.forced and e.param == "response_format":  # the constraint came from the tools
            e.param = "tools"
        raise
    streaming.admit(tier)
    lease = route.reserve(state, tenant, routed, params)
    rid = streaming.new_id("chatcmpl")
    gen = streaming.merged(tier, rid, [ids], params, req.priority, req.cache_salt, req.session_id, lease)
    base = {"id": rid, "object": "chat.completion", "created": streaming.now(), "model": tier.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _stream(tier, req, tool_plan, fmt, gen, {**base, "object": "chat.completion.chunk"}, len(ids),
                         include_usage)
        body = streaming.framed(events, gen)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers=lease.headers())
    out = (await streaming.collect(request, gen))[0]
    as_ids = req.return_tokens_as_token_ids
    choices = [{"index": c.index, **_reply(tool_plan, c, fmt),
                "logprobs": _logprobs(tier, c.token_ids, c.logprobs or [], as_ids) if req.logprobs else None,
                "stop_reason": c.stop_reason} for c in out.outputs]
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    body = {**base, "choices": choices, "usage": streaming.usage(len(ids), completion_tokens, out.num_cached_tokens)}
    if req.prompt_logprobs is not None:
        body["prompt_logprobs"] = _prompt_logprobs(tier, ids, out.prompt_logprobs)
    return JSONResponse(body, headers=lease.headers())


def _prompt_logprobs(tier: Tier, ids: list[int], lps: list[TokenLogprob | None]) -> list[dict | None]:
    """vLLM's shape: per prompt token (null for the first) {token id: {logprob, rank,
    decoded_token}} for the token itself and its top-N alternatives."""
    text = tier.tokenizer.token_text
    out: list[dict | None] = []
    for t, lp in zip(ids, lps):
        if lp is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": text(t)}}
        for rank, (i, v) in enumerate(lp.top, start=1):
            entry.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": text(i)})
        out.append(entry)
    return out


def _after_reasoning(tier: Tier, guided: GuidedSpec) -> GuidedSpec:
    """The constraint, starting once the model has closed its reasoning (it shapes the content only)."""
    end = tier.tokenizer.single_token(reasoning.END)
    if end is None:
        raise bad_request(f"structured output with the {tier.config.reasoning_parser} reasoning parser needs "
                          f"{reasoning.END} to be one token of this model's vocabulary", "response_format")
    return dataclasses.replace(guided, after_token=end)


def _reply(p: ToolPlan, c: CompletionOutput, fmt: reasoning.ReasoningFormat | None) -> dict:
    """A choice's message and finish_reason: the reasoning moved out, any tool calls read out
    of the content."""
    thought, text = reasoning.split(c.text, fmt) if fmt is not None else (None, c.text)
    extra = {"reasoning_content": thought} if fmt is not None else {}
    if p.mode == "none":
        return {"message": {"role": "assistant", "content": text, **extra}, "finish_reason": c.finish_reason}
    if p.mode == "named":  # the grammar made the whole content the arguments object
        parsed = tool_parser.Parsed(None, [tool_parser.Call(p.function, text or "")])
    else:
        parsed = tool_parser.parse(text or "", p.names, p.parallel)
    return {"message": {**tool_parser.message(parsed.content, parsed.calls), **extra},
            "finish_reason": tool_parser.finish_reason(c.finish_reason, bool(parsed.calls))}


def _deltas(view: ChoiceStream, thinking: reasoning.ReasoningStream | None, text: str, final: bool) -> list[dict]:
    """A choice's chat deltas for new output text: reasoning first, then content or tool calls."""
    if thinking is None:
        return view.feed(text, final=final)
    out, content = [], ""
    for kind, piece in thinking.feed(text, final):
        if kind == "reasoning":
            out.append({"reasoning_content": piece})
        else:
            content += piece
    return out + view.feed(content, final=final)


async def _stream(tier: Tier, req: ChatCompletionRequest, p: ToolPlan, fmt: reasoning.ReasoningFormat | None,
                  gen: AsyncIterator[tuple[int, RequestOutput]], base: dict, prompt_tokens: int, include_usage: bool):
    completion_tokens = cached = 0
    views = [ChoiceStream(p.mode, p.names, p.function, p.parallel) for _ in range(req.n)]
    thinking = [reasoning.ReasoningStream(fmt) if fmt is not None else None for _ in range(req.n)]
    for k in range(req.n):
        # With tools the reply may be calls only, whose content is null, not "".
        first = {"role": "assistant", "content": "" if p.mode == "none" else None}
        yield sse({**base, "choices": [{"index": k, "delta": first, "logprobs": None, "finish_reason": None}]})
    async for _, out in gen:
        cached = out.num_cached_tokens
        for c in out.outputs:
            if not (c.delta_text or c.delta_token_ids or c.finish_reason):
                continue
            lp = None
            if req.logprobs and c.delta_token_ids:
                lp = _logprobs(tier, c.delta_token_ids, c.logprobs[len(c.logprobs) - len(c.delta_token_ids):],
                               req.return_tokens_as_token_ids)
            view = views[c.index]
            deltas = _deltas(view, thinking[c.index], c.delta_text, final=c.finish_reason is not None)
            finish = tool_parser.finish_reason(c.finish_reason, view.called)
            if not deltas and lp is None and finish is None and (p.mode != "none" or fmt is not None):
                continue  # text held back while it may be a tool call or a think marker
            deltas = deltas or [{}]
            for j, delta in enumerate(deltas):
                yield sse({**base, "choices": [{"index": c.index, "delta": delta, "logprobs": lp if j == 0 else None,
                                                "finish_reason": finish if j == len(deltas) - 1 else None}]})
            if c.finish_reason:
                completion_tokens += len(c.token_ids)
    if include_usage:
        yield sse({**base, "choices": [], "usage": streaming.usage(prompt_tokens, completion_tokens, cached)})
