"""SchedulerOutput: the behaviour-free contract from scheduler to model runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tierlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    """Compute `token_ids` at positions start..start+len-1 for one request.

    `block_tables` holds one table per KV group (see kv_cache/layout.py).
    `sample` is set when these tokens reach the end of the request's known tokens, so
    the last one's logits produce its next token (draw index `num_output_tokens`); with
    drafts, the last known token's and every draft's logits are sampled.
    """

    request_id: str
    token_ids: list[int]
    start: int
    block_tables: list[list[int]]
    sample: bool
    sampling_params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    grammar: Any = None  # the request's GrammarState when its output is constrained
    # Draft tokens (speculative decoding) after the last known token: `token_ids` ends with
    # them, and the runner samples at every one of those positions to verify them.
    draft_token_ids: tuple[int, ...] = ()

    @property
    def num_prompt_tokens(self) -> int:
        """How many of `token_ids` sit at prompt positions (the rest are generated tokens)."""
        return min(max(len(self.prompt_token_ids) - self.start, 0), len(self.token_ids))
    prompt_logprobs: int | None = None  # score the prompt tokens in this chunk (top-N alternatives)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # (src, dst) KV blocks to copy before this step's forward: the partial last block of
    # a forked request (copy-on-write; see KVCacheManager.fork).
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)
