"""`tierlm.v1.Generation/Generate`: one prompt (text, token ids or chat messages) in, a
stream of deltas out.

The message becomes the HTTP API's request (completions, or chat for messages) and is
validated by the same rules, so a field refused over HTTP is refused here with the same
message and `param`; routing, quotas, admission and the engine path are the HTTP API's
too. The tier and quota state go out as initial metadata (`x-tierlm-tier`,
`x-ratelimit-*`). Cancelling the call closes the engine stream, which aborts the
request within one step.
"""

from __future__ import annotations

import numpy

from tierlm.rpc import calls
from tierlm.rpc.proto import generate_pb2, generate_pb2_grpc
from tierlm.server import chat, fields, route, streaming
from tierlm.server.errors import bad_request
from tierlm.server.protocol import ChatCompletionRequest, CompletionRequest
from tierlm.server.state import ServerState

# Fields copied as they are when set (proto3 `optional` / non-empty repeated).
_PLAIN = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "seed", "guided_json", "guided_regex", "guided_grammar", "session_id",
          "cache_salt", "tier_mode", "max_latency_ms", "max_ttft_ms", "max_cost_usd")
_LISTS = ("stop", "stop_token_ids", "guided_choice")
_FLOAT32 = {"temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}


def request_body(msg: generate_pb2.GenerateRequest) -> tuple[dict, bool]:
    """The HTTP API's JSON body for this message, and whether it is a chat request."""
    body: dict = {"model": msg.model, "priority": msg.priority, "ignore_eos": msg.ignore_eos,
                  "min_tokens": msg.min_tokens}
    for name in _PLAIN:
        if msg.HasField(name):
            value = getattr(msg, name)
            # float32 fields read back as binary fractions (0.7 -> 0.699999988...): their
            # shortest decimal form is what the client wrote.
            body[name] = float(str(numpy.float32(value))) if name in _FLOAT32 else value
    for name in _LISTS:
        if getattr(msg, name):
            body[name] = list(getattr(msg, name))
    which = msg.WhichOneof("prompt")
    if which is None:
        body["prompt"] = None  # refused by validation, naming `prompt`
    elif which == "text":
        body["prompt"] = msg.text
    elif which == "token_ids":
        body["prompt"] = list(msg.token_ids.ids)
    else:
        body["messages"] = [{"role": m.role, "content": m.content} for m in msg.chat.messages]
        return body, True
    return body, False


class Generation(generate_pb2_grpc.GenerationServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @calls.streamed
    async def Generate(self, msg: generate_pb2.GenerateRequest, context):
        state = self.state
        tenant = calls.authenticate(state, context)
        calls.refuse_if_draining(state)
        body, is_chat = request_body(msg)
        if is_chat:
            req = calls.validated(ChatCompletionRequest, body)
            prompts_for = lambda t: [chat.render(t, req.messages)]
        else:
            req = calls.validated(CompletionRequest, body)
            if isinstance(req.prompt, str):
                prompts_for = lambda t: [t.tokenizer.encode(req.prompt)]
            else:
                if req.model == "auto" and len(state.tiers) > 1:
                    raise bad_request("token-id prompts belong to one tokenizer: name a tier instead of "
                                            "'auto'", "prompt")
                prompts_for = lambda t: [list(req.prompt)]
        if req.max_tokens is not None and req.max_tokens < 1:
            raise bad_request("max_tokens must be >= 1", "max_tokens")
        params = fields.sampling_params(req, max_tokens=req.max_tokens, logprobs=None)
        routed = await route.choose(state, tenant, req, params, prompts_for)
        tier, ids = routed.tier, routed.prompts[0]
        await streaming.validate(tier, ids, params)
        streaming.admit(tier)
        lease = route.reserve(state, tenant, routed, params)
        await calls.send_headers(context, lease)
        rid = streaming.new_id("gen")
        gen = streaming.merged(tier, rid, [ids], params, req.priority, req.cache_salt, req.session_id, lease)
        try:
            async for _, out in gen:
                c = out.outputs[0]
                if not (c.delta_text or c.delta_token_ids or c.finish_reason):
                    continue
                reply = generate_pb2.GenerateResponse(id=rid, model=tier.model_name, text=c.delta_text,
                                                      token_ids=c.delta_token_ids,
                                                      finish_reason=c.finish_reason or "")
                if c.finish_reason:
                    reply.usage.prompt_tokens = len(ids)
                    reply.usage.completion_tokens = len(c.token_ids)
                    reply.usage.cached_tokens = out.num_cached_tokens
                yield reply
        finally:
            await gen.aclose()  # a cancelled call aborts its engine request now
