"""Pydantic request models for the OpenAI-compatible API (responses are built as dicts).

Unknown fields are ignored, as OpenAI clients send fields a server may not know. These
models are the boundary's rules: shapes and types, every number finite, every string
valid Unicode (a lone surrogate is a 400 naming the field: it cannot be tokenized or
printed, and replacing it would change the user's text silently), and upper bounds on
everything that multiplies a request's work or memory (`limits` below). Value ranges of
the sampling knobs live in SamplingParams, shared with the offline API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from tierlm.server import limits

_Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
_Count = Annotated[int, Field(ge=0, le=limits.MAX_TOKENS)]  # token counts: context lengths are far below


def _lone_surrogate(value, path: tuple = ()) -> tuple[tuple, str] | None:
    """(path inside `value`, U+XXXX) of the first lone surrogate in a JSON value, else None.
    A bad dict key is reported at the dict."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, f"U+{ord(value[e.start]):04X}"
        return None
    if isinstance(value, dict):
        if (bad := _lone_surrogate(list(value), ())) is not None:
            return path, bad[1]
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    return next((bad for k, v in items if (bad := _lone_surrogate(v, (*path, k))) is not None), None)


class _Base(BaseModel):
    # strict: no coercion, as OpenAI's API ("stream": "yes" or "max_tokens": "2" is a 400
    # naming the field, not true or 2); integers stay integers, an int may stand for a float.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value, info: ValidationInfo):
        bad = _lone_surrogate(value) if not isinstance(value, BaseModel) else None
        if bad is not None:
            path, char = bad
            where = ".".join(str(p) for p in (info.field_name, *path))
            raise PydanticCustomError("lone_surrogate", "{where} contains a lone surrogate ({char}); strings must "
                                      "be valid Unicode", {"where": where, "path": list(path), "char": char})
        return value


class StreamOptions(_Base):
    include_usage: bool = False


class JsonSchemaFormat(_Base):
    name: str | None = None
    schema_: dict | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(_Base):
    model: str = Field(max_length=limits.MAX_NAME_CHARS)
    n: int = Field(1, le=limits.MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None  # counts and lengths: fields.sampling_params
    seed: _Int64 | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = Field(None, max_length=limits.MAX_LOGIT_BIAS)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM names)
    top_k: Annotated[int, Field(le=2**31 - 1)] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: _Count = 0
    stop_token_ids: list[int] | None = Field(None, max_length=limits.MAX_STOP_TOKEN_IDS)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    cache_salt: str | None = Field(None, max_length=limits.MAX_NAME_CHARS)  # prefix-cache entries are shared
    # only between equal salts
    session_id: str | None = Field(None, max_length=limits.MAX_NAME_CHARS)  # keep this conversation's KV warm
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, max_length=limits.MAX_CHOICES)
    guided_grammar: str | None = None  # Lark (llguidance's dialect)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N" (exact, any vocabulary)
    use_beam_search: bool = False  # beam width: best_of (completions) or n
    length_penalty: float = 1.0  # beams rank by cumulative logprob / length ** length_penalty
    # TierSet routing (model "auto"): preferred tier level and budgets (tenancy/routing.py)
    tier_mode: Literal["fixed", "balanced", "deep", "max"] | None = None
    max_latency_ms: float | None = Field(default=None, gt=0)  # end to end
    max_ttft_ms: float | None = Field(default=None, gt=0)
    max_cost_usd: float | None = Field(default=None, gt=0)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]  # counts: completions._prompt_items
    max_tokens: _Count | None = 16
    logprobs: Annotated[int, Field(ge=0, le=limits.MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(le=limits.MAX_N)] | None = None


class TextPart(_Base):
    type: Literal["text"]
    text: str


class FunctionCall(_Base):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(_Base):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # role "tool": the call this message answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(_Base):
    name: str
    description: str | None = None
    parameters: dict | None = None  # JSON schema of the arguments object; None = no arguments
    strict: bool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(max_length=limits.MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=limits.MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto if tools
    parallel_tool_calls: bool = True
    max_tokens: _Count | None = None
    max_completion_tokens: _Count | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=limits.MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    prompt_logprobs: Annotated[int, Field(ge=0, le=limits.MAX_LOGPROBS)] | None = None  # extension: logprob
    # (+ top-N) of each prompt token
    chat_template_kwargs: dict[str, Any] | None = None  # extra template variables, e.g. enable_thinking


class TokenizeRequest(_Base):
    model: str | None = Field(None, max_length=limits.MAX_NAME_CHARS)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=limits.MAX_MESSAGES)
    add_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class EmbeddingRequest(_Base):
    """OpenAI's embeddings request; `truncate_prompt_tokens` (vLLM's) cuts long inputs instead
    of refusing them (-1: at the model's maximum)."""

    model: str = Field(max_length=limits.MAX_NAME_CHARS)
    input: str | list[str] | list[int] | list[list[int]]  # counts: embeddings.create
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=2**20)] | None = None
    user: str | None = Field(None, max_length=limits.MAX_NAME_CHARS)
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=limits.MAX_TOKENS)] | None = None


class LoadLoRAAdapterRequest(_Base):
    """vLLM's runtime adapter loading; `base_model_name` picks the tier (default: the default tier)."""

    lora_name: str = Field(min_length=1, max_length=limits.MAX_NAME_CHARS)
    lora_path: str = Field(min_length=1, max_length=4096)
    base_model_name: str | None = Field(None, max_length=limits.MAX_NAME_CHARS)


class UnloadLoRAAdapterRequest(_Base):
    lora_name: str = Field(min_length=1, max_length=limits.MAX_NAME_CHARS)
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


class DetokenizeRequest(_Base):
    model: str | None = Field(None, max_length=limits.MAX_NAME_CHARS)
    tokens: list[int]
