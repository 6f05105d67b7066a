"""Which draft tokens a decoding request computes this step (speculative decoding): the
proposer's drafts (`Request.draft`, attached before the step) cut to what the request
may take and the step's budget leaves."""

from __future__ import annotations

from tierlm.request import Request


def limit(req: Request, num_speculative_tokens: int) -> int:
    """How many draft tokens a decoding request may take: none without speculative
    decoding, for beams, constrained outputs or prompt scoring, and never past max_tokens
    or the context (the last sampled token would have nowhere to go)."""
    p = req.sampling_params
    if not num_speculative_tokens or p.use_beam_search or p.guided is not None or req.prompt_logprobs is not None:
        return 0
    k = min(num_speculative_tokens, req.max_total_tokens - req.num_tokens - 1)
    if p.max_tokens is not None:
        k = min(k, p.max_tokens - req.num_output_tokens - 1)
    return k


def take(req: Request, room: int, num_speculative_tokens: int) -> list[int]:
    """The drafts `req` computes this step, with `room` tokens of budget left after its own."""
    return req.draft[: max(0, min(limit(req, num_speculative_tokens), room))]
