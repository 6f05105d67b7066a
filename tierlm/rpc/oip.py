"""KServe's Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`).

Health (ServerLive, ServerReady, ModelReady) answers without a key, as /health and /ready
do; metadata and inference take the tenant's key like every other call. A model is a
tier or LoRA adapter name (or a model name a tier serves, or `auto`), one version each
(`version` empty). Tensors, as oip_v2.proto describes them: `text_input` BYTES [N] in;
`text_output` and `finish_reason` BYTES [N] out of a text tier, `embedding` FP32 [N, D]
out of an embedding tier. Outputs come as raw contents (what Triton sends: BYTES
elements length-prefixed, FP32 little-endian); inputs may be raw or typed contents.
"""

from __future__ import annotations

import asyncio
import math
import struct

import tierlm
from tierlm.embed.encoder import InputTooLong
from tierlm.embed.inputs import token_lists
from tierlm.rpc import calls
from tierlm.rpc.proto import oip_v2_pb2 as pb
from tierlm.rpc.proto import oip_v2_pb2_grpc
from tierlm.server import fields, limits, route, streaming
from tierlm.server.embeddings import charged
from tierlm.server.errors import APIError, bad_request
from tierlm.server.protocol import CompletionRequest
from tierlm.server.state import ServerState, Tier
from tierlm.tenancy.tenants import Tenant

INPUT = "text_input"
# Request parameters a text tier takes (the completions API's fields of those names).
GENERATE_PARAMETERS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                                 "ignore_eos", "priority", "min_tokens", "presence_penalty", "frequency_penalty",
                                 "repetition_penalty"})
_OUTPUTS = {"generate": ("text_output", "finish_reason"), "embed": ("embedding",)}


def _tensor(name: str, datatype: str, shape: list[int]) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


def _bytes_elements(raw: bytes) -> list[bytes]:
    """BYTES tensor elements from raw contents: each a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad_request(f"raw contents of {INPUT} are cut short: BYTES elements are each a 4-byte "
                              "length then that many bytes", INPUT)
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise bad_request(f"raw contents of {INPUT} are cut short: an element claims {n} bytes", INPUT)
        out.append(raw[pos:pos + n])
        pos += n
    return out


def _raw_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def texts(request: pb.ModelInferRequest, most: int) -> list[str]:
    """The prompts of `text_input` (400 naming what is wrong)."""
    names = [t.name for t in request.inputs]
    if names != [INPUT]:
        raise bad_request(f"this model takes one input tensor, {INPUT} (BYTES [N]); got {names or 'none'}", INPUT)
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise bad_request(f"{INPUT} must be BYTES, got {tensor.datatype or 'no datatype'}", INPUT)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise bad_request("raw_input_contents must have one entry per input tensor", INPUT)
        elements = _bytes_elements(request.raw_input_contents[0])
    else:
        elements = list(tensor.contents.bytes_contents)
    if not tensor.shape or any(d < 0 for d in tensor.shape) or math.prod(tensor.shape) != len(elements):
        raise bad_request(f"{INPUT} has shape {list(tensor.shape)} but {len(elements)} elements", INPUT)
    if not elements:
        raise bad_request(f"{INPUT} is empty", INPUT)
    if len(elements) > most:
        raise bad_request(f"at most {most} inputs per request, got {len(elements)}", INPUT)
    try:
        return [e.decode("utf-8") for e in elements]
    except UnicodeDecodeError:
        raise bad_request(f"{INPUT} elements must be UTF-8 text", INPUT) from None


def parameters(request: pb.ModelInferRequest) -> dict:
    """The request's parameters as plain values; unknown names are a 400."""
    out = {}
    for name, p in request.parameters.items():
        if name not in GENERATE_PARAMETERS:
            raise bad_request(f"unknown parameter {name!r}; a text model takes {', '.join(sorted(GENERATE_PARAMETERS))}",
                              name)
        which = p.WhichOneof("parameter_choice")
        if which is None:
            raise bad_request(f"parameter {name!r} has no value", name)
        out[name] = getattr(p, which)
    return out


def _requested(request: pb.ModelInferRequest, tier: Tier) -> tuple[str, ...]:
    known = _OUTPUTS[tier.task]
    names = tuple(o.name for o in request.outputs) or known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise bad_request(f"unknown output {unknown[0]!r}; this model gives {', '.join(known)}", "outputs")
    return names


class InferenceService(oip_v2_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @calls.unary
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @calls.unary
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.serving)

    @calls.unary
    async def ModelReady(self, request, context):
        tier = self._model(request.name, request.version)
        engine = self.state.tiers[tier.parent or tier.model_name].engine
        return pb.ModelReadyResponse(ready=self.state.serving and engine.healthy)

    @calls.unary
    async def ServerMetadata(self, request, context):
        calls.authenticate(self.state, context)
        return pb.ServerMetadataResponse(name="tierlm", version=tierlm.__version__)

    @calls.unary
    async def ModelMetadata(self, request, context):
        tenant = calls.authenticate(self.state, context)
        tier = route.permitted(tenant, self._model(request.name, request.version))
        if tier.task == "embed":
            outputs = [_tensor("embedding", "FP32", [-1, tier.embedder.spec.dimensions])]
        else:
            outputs = [_tensor("text_output", "BYTES", [-1]), _tensor("finish_reason", "BYTES", [-1])]
        return pb.ModelMetadataResponse(name=tier.model_name, platform=f"tierlm_{tier.task}",
                                        inputs=[_tensor(INPUT, "BYTES", [-1])], outputs=outputs)

    @calls.unary
    async def ModelInfer(self, request: pb.ModelInferRequest, context):
        state = self.state
        tenant = calls.authenticate(state, context)
        calls.refuse_if_draining(state)
        if request.model_version:
            raise self._no_version(request.model_name)
        task = "embed" if request.model_name != "auto" and self._model(request.model_name, "").task == "embed" \
            else "generate"
        if task == "embed":
            return await self._embed(tenant, request, context)
        return await self._generate(tenant, request, context)

    async def _embed(self, tenant: Tenant, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        tier = route.candidates(self.state, tenant, request.model_name, task="embed")[0][0]
        if request.parameters:
            raise bad_request("an embedding model takes no parameters", next(iter(request.parameters)))
        wanted = _requested(request, tier)
        prompts = texts(request, limits.MAX_EMBED_INPUTS)
        try:
            ids = await asyncio.to_thread(token_lists, tier.embedder, prompts)
        except InputTooLong as e:
            raise bad_request(str(e), INPUT, "context_length_exceeded") from None
        except ValueError as e:
            raise bad_request(str(e), INPUT) from None
        vectors, lease = await charged(self.state, tenant, tier, ids)
        await calls.send_headers(context, lease)
        reply = self._reply(request, tier, sum(len(i) for i in ids))
        array = vectors.float().contiguous().numpy().astype("<f4")
        for name in wanted:
            reply.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            reply.raw_output_contents.append(array.tobytes())
        return reply

    async def _generate(self, tenant: Tenant, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        prompts = texts(request, limits.MAX_PROMPTS)
        body = {"model": request.model_name, "prompt": prompts, **parameters(request)}
        req = calls.validated(CompletionRequest, body)
        if req.max_tokens is not None and req.max_tokens < 1:
            raise bad_request("max_tokens must be >= 1", "max_tokens")
        params = fields.sampling_params(req, max_tokens=req.max_tokens, logprobs=None)
        routed = await route.choose(self.state, tenant, req, params,
                                    lambda t: [t.tokenizer.encode(p) for p in prompts])
        tier, ids = routed.tier, routed.prompts
        wanted = _requested(request, tier)
        for p in ids:
            await streaming.validate(tier, p, params)
        streaming.admit(tier, len(ids))
        lease = route.reserve(self.state, tenant, routed, params)
        await calls.send_headers(context, lease)
        gen = streaming.merged(tier, request.id or streaming.new_id("infer"), ids, params, req.priority,
                               lease=lease)
        finals = {}
        try:
            async for i, out in gen:
                if out.finished:
                    finals[i] = out.outputs[0]
        finally:
            await gen.aclose()  # a cancelled call aborts its engine requests now
        outs = [finals[i] for i in range(len(ids))]
        reply = self._reply(request, tier, sum(len(p) for p in ids))
        reply.parameters["completion_tokens"].int64_param = sum(len(c.token_ids) for c in outs)
        columns = {"text_output": [c.text.encode() for c in outs],
                   "finish_reason": [(c.finish_reason or "").encode() for c in outs]}
        for name in wanted:
            reply.outputs.add(name=name, datatype="BYTES", shape=[len(outs)])
            reply.raw_output_contents.append(_raw_bytes(columns[name]))
        return reply

    def _reply(self, request: pb.ModelInferRequest, tier: Tier, prompt_tokens: int) -> pb.ModelInferResponse:
        reply = pb.ModelInferResponse(model_name=tier.model_name, id=request.id)
        reply.parameters["prompt_tokens"].int64_param = prompt_tokens
        return reply

    def _model(self, name: str, version: str) -> Tier:
        tier = self.state.resolve(name)  # 404 naming what this server serves
        if version:
            raise self._no_version(name)
        return tier

    @staticmethod
    def _no_version(name: str) -> APIError:
        return APIError(404, f"model '{name}' has one version: leave version empty", param="model_version",
                        code="model_not_found", type="not_found_error")

