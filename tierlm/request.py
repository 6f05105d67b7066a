"""Request: one sequence's token ids, progress and lifecycle, owned by the scheduler.

Every request is "num_computed_tokens catching up with its tokens": prefill, chunked
prefill and recompute after preemption all schedule n more tokens of `all_token_ids`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tierlm.outputs import TokenLogprob
from tierlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tierlm.lora.adapter import LoRAAdapter


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # per-request seed; draws depend on (seed, output index) only
    arrival_seq: int
    priority: int = 0
    max_total_tokens: int = 0  # prompt + output cap (context limit), set by the engine
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    cache_root: bytes = b""  # prefix-hash chain start: model identity + tenant salt
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks so far
    session_id: str | None = None  # its KV stays in the warm tier for the session TTL after it ends
    tenant: str = "default"  # whose share of the server it uses (policy "fair")
    # LoRA: the adapter it runs with (lora/adapter.py LoRAAdapter; None: the base model) and
    # the slot the scheduler gave it at admission (scheduler/lora.py; -1: none).
    lora: LoRAAdapter | None = None
    lora_slot: int = -1
    # Speculative decoding: draft tokens proposed for this step (spec/proposer.py), taken by
    # the scheduler when it plans the request's next tokens.
    draft: list[int] = field(default_factory=list)
    # Logprob of each prompt token given the ones before it (entry 0 stays None), filled as
    # prefill computes them; None when not asked for. Written by position, so a recompute
    # after preemption rewrites the same values.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Beam search: (token, logprob) candidates for the next token, best first, set when
    # the last token's logits are computed and cleared when the engine extends the beam.
    beam_candidates: list[tuple[int, float]] | None = None

    def drop_last_output(self) -> None:
        """Take back the last output token (one accepted in the same speculative step as a
        stop string before it)."""
        self.output_token_ids.pop()
        if len(self.output_logprobs) > len(self.output_token_ids):
            self.output_logprobs.pop()

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
