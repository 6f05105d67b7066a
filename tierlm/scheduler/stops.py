"""Stop rules applied to each token appended to a request (stop strings are the
detokenizer's: engine/detokenizer.py)."""

from __future__ import annotations

from tierlm.request import Request, RequestStatus


def stop_check(req: Request, token: int, eos_token_ids: frozenset[int]) -> tuple[RequestStatus | None, int | None]:
    """(status, stop reason) if `token`, just appended, ends `req`; (None, None) if not."""
    p = req.sampling_params
    n_out = req.num_output_tokens
    if n_out >= p.min_tokens:
        if token in eos_token_ids and not p.ignore_eos:
            return RequestStatus.FINISHED_STOPPED, None
        if token in p.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token
    if (p.max_tokens is not None and n_out >= p.max_tokens) or req.num_tokens >= req.max_total_tokens:
        return RequestStatus.FINISHED_LENGTH, None
    return None, None
