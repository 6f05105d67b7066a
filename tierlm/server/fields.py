"""A request's sampling parameters and output constraint from its OpenAI fields
(completions and chat share them); 400s name the field at fault."""

from __future__ import annotations

import json

from tierlm.sampling_params import SamplingParams, SamplingParamsError
from tierlm.server import limits
from tierlm.server.errors import bad_request
from tierlm.server.protocol import _SamplingFields
from tierlm.structured.spec import GuidedSpec


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
