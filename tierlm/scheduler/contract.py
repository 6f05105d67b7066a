"""What the runner has heard of each request: its fixed facts are sent once (NewRequest)
the first step it is scheduled, then only the output tokens appended since; the ids of
requests that ended are listed once so the runner forgets them (scheduler/output.py)."""

from __future__ import annotations

from tierlm.request import Request
from tierlm.scheduler.output import NewRequest, ScheduledRequest


class RunnerView:
    def __init__(self) -> None:
        self._heard: dict[str, int] = {}  # request id -> output tokens the runner has
        self.ended: list[str] = []  # known requests that ended since the last take_ended()

    def scheduled(self, req: Request, n: int, draft: list[int], block_tables: list[list[int]],
                  new: list[NewRequest]) -> ScheduledRequest:
        """The step's data for `req` computing `n` tokens (the last len(draft) of them drafts);
        the first time the runner sees it, its fixed facts go to `new`."""
        rid = req.request_id
        start = req.num_computed_tokens
        prompt, outputs = req.prompt_token_ids, req.output_token_ids
        end = start + n - len(draft)  # known tokens computed this step
        tokens = (prompt[start:end] if end <= len(prompt) else req.all_token_ids[start:end]) + draft
        heard = self._heard.get(rid)
        if heard is None:
            new.append(NewRequest(rid, prompt, list(outputs), req.sampling_params, req.seed))
            heard = len(outputs)
        self._heard[rid] = len(outputs)
        scoring = req.prompt_logprobs is not None and start < len(prompt) - 1
        return ScheduledRequest(rid, tokens, start, block_tables,
                                sample=end == req.num_tokens and req.sampling_params.max_tokens != 0,
                                prompt_len=len(prompt), new_output_token_ids=tuple(outputs[heard:]),
                                draft_token_ids=tuple(draft),
                                prompt_logprobs=req.sampling_params.prompt_logprobs if scoring else None)

    def end(self, request_id: str) -> None:
        if self._heard.pop(request_id, None) is not None:
            self.ended.append(request_id)

    def take_ended(self) -> list[str]:
        out, self.ended = self.ended, []
        return out

    def known(self) -> set[str]:
        return set(self._heard)
