"""SchedulerOutput: the behaviour-free contract from scheduler to model runner.

Data only: ids, token ids, block numbers and sampling settings, never a live object. A
request's fixed facts (prompt, sampling settings, seed) travel once, in `new_requests`,
the first step it is scheduled; after that each step carries only what changed: the
tokens to compute, the output tokens appended since, the blocks its tables gained or
released. The runner keeps
its own per-request state from these (sampling history, grammar state) and drops it
for the ids in `finished`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.kv_cache.transfers import BlockLoad, BlockSave
from tierlm.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """What the runner keeps for a request from its first scheduled step on."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before it first ran here (a forked beam's)
    sampling_params: SamplingParams
    seed: int


@dataclass(frozen=True)
class BlockDelta:
    """How a request's block tables changed since the runner last saw them: per KV group,
    the entries appended and how many leading entries are now released (the null block).
    `reset`: the tables were made anew (a preempted request restarting, or the first
    step): `appended` is then all of them."""

    appended: tuple[tuple[int, ...], ...]
    dropped: tuple[int, ...]
    reset: bool = False


@dataclass(frozen=True)
class ScheduledRequest:
    """Compute `token_ids` at positions start..start+len-1 for one request.

    `block_tables` holds one table per KV group (see kv_cache/layout.py): the scheduler
    sends only `blocks` (what changed) and leaves it None; the runner fills it in from
    its own copy before the forward (callers outside the scheduler may give it whole).
    Positions below `prompt_len` are prompt positions. `sample` is set when these tokens reach the end of
    the request's known tokens, so the last one's logits produce its next token (draw
    index: the number of output tokens); with drafts, the last known token's and every
    draft's logits are sampled. `new_output_token_ids` were appended to the request's
    output since the runner last heard of it (sampling history: penalties, draws).
    """

    request_id: str
    token_ids: list[int]
    start: int
    block_tables: list[list[int]] | None
    sample: bool
    prompt_len: int
    new_output_token_ids: tuple[int, ...] = ()
    # Draft tokens (speculative decoding) after the last known token: `token_ids` ends with
    # them, and the runner samples at every one of those positions to verify them.
    draft_token_ids: tuple[int, ...] = ()
    prompt_logprobs: int | None = None  # score the prompt tokens in this chunk (top-N alternatives)
    blocks: BlockDelta | None = None
    lora_slot: int = -1  # the LoRA adapter slot its rows use (-1: the base model)

    @property
    def num_prompt_tokens(self) -> int:
        """How many of `token_ids` sit at prompt positions (the rest are generated tokens)."""
        return min(max(self.prompt_len - self.start, 0), len(self.token_ids))


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # (src, dst) KV blocks to copy before this step's forward: the partial last block of
    # a forked request (copy-on-write; see KVCacheManager.fork).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)  # ids the runner may forget (before new_requests)
    # KV tier traffic, in this order before copies and the forward: saves, then loads.
    block_saves: list[BlockSave] = field(default_factory=list)
    block_loads: list[BlockLoad] = field(default_factory=list)
    # (slot, adapter) LoRA adapters to load into slots before the forward (scheduler/lora.py);
    # the adapter is its read-only weights (lora/adapter.py LoRAAdapter), loaded once per slot.
    lora_loads: list[tuple[int, object]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)
