"""What the runner has heard of each request: its fixed facts are sent once (NewRequest)
the first step it is scheduled, then only the output tokens appended since and the
blocks its tables gained or released; the ids of requests that ended are listed once so
the runner forgets them (scheduler/output.py)."""

from __future__ import annotations

from tierlm.request import Request
from tierlm.scheduler.output import BlockDelta, NewRequest, ScheduledRequest


class RunnerView:
    def __init__(self) -> None:
        self._heard: dict[str, int] = {}  # request id -> output tokens the runner has
        self._tables: dict[str, tuple[int, list[int]]] = {}  # request id -> (epoch, entries sent per group)
        self.ended: list[str] = []  # known requests that ended since the last take_ended()

    def _blocks(self, rid: str, tables: list[list[int]], dropped: list[int], epoch: int) -> BlockDelta:
        seen = self._tables.get(rid)
        reset = seen is None or seen[0] != epoch
        sent = [0] * len(tables) if reset else seen[1]
        self._tables[rid] = (epoch, [len(t) for t in tables])
        return BlockDelta(tuple(tuple(t[k:]) for t, k in zip(tables, sent)), tuple(dropped), reset)

    def scheduled(self, req: Request, n: int, draft: list[int],
                  tables: tuple[list[list[int]], list[int], int], new: list[NewRequest]) -> ScheduledRequest:
        """The step's data for `req` computing `n` tokens (the last len(draft) of them drafts;
        `tables`: its live block tables, released counts and epoch); the first time the
        runner sees it, its fixed facts go to `new`."""
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
        return ScheduledRequest(rid, tokens, start, None,
                                sample=end == req.num_tokens and req.sampling_params.max_tokens != 0,
                                prompt_len=len(prompt), new_output_token_ids=tuple(outputs[heard:]),
                                draft_token_ids=tuple(draft),
                                prompt_logprobs=req.sampling_params.prompt_logprobs if scoring else None,
                                blocks=self._blocks(rid, *tables), lora_slot=req.lora_slot)

    def end(self, request_id: str) -> None:
        self._tables.pop(request_id, None)
        if self._heard.pop(request_id, None) is not None:
            self.ended.append(request_id)

    def take_ended(self) -> list[str]:
        out, self.ended = self.ended, []
        return out

    def known(self) -> set[str]:
        return set(self._heard)
