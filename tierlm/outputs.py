"""Typed results: TokenLogprob, StepResult (runner -> scheduler) and RequestOutput (engine -> caller)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Logprob of a token, the top-N alternatives (token id, logprob), best first, and the
    token's rank in its distribution (1 = most likely; set for prompt tokens)."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None


@dataclass(frozen=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: TokenLogprob | None  # None unless the request asked for logprobs


@dataclass(frozen=True)
class StepResult:
    """What one model step produced: a token for each request that reached its end, and
    the logprobs of scored prompt tokens: request id -> [(position, logprob)]."""

    sampled: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: dict[str, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)
    # Speculative decoding: request id -> how many of its draft tokens were accepted (its
    # sampled tokens are those drafts and one more: the correction or a bonus token).
    accepted_drafts: dict[str, int] = field(default_factory=dict)
    # Structured output: requests whose grammar the sampled token completed (nothing may
    # follow), and requests whose grammar state failed on it (they end alone, with the error).
    grammar_complete: set[str] = field(default_factory=set)
    failed: dict[str, Exception] = field(default_factory=dict)
    # KV tiers: the pages of the blocks this step's BlockSaves read, by cache key.
    saved_blocks: dict = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    # Text added since the previous RequestOutput for this request (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Per prompt token (None for the first), when the request asked for prompt logprobs.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Set when this request failed inside a step (its own state, not the batch's): it is
    # finished, its blocks are free, and the engine goes on with everyone else.
    error: str | None = None
    # Prompt tokens whose KV came from the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens).
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]


@dataclass(frozen=True)
class EmbeddingRequestOutput:
    """One input's vector (LLM.embed), shaped like vLLM's."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
