"""Proposers of draft tokens and the step that asks them.

A proposer maps (request id, all its tokens, at most k) entries to draft tokens and may
keep per-request state it frees on `release`. The engine asks its proposer once per step,
before the scheduler plans, for every decoding request that may take drafts, and
attaches the drafts to the requests (`Request.draft`); the scheduler takes as many as
the step's budget allows and the runner verifies them.
"""

from __future__ import annotations

from typing import Protocol

from tierlm.scheduler.scheduler import Scheduler
from tierlm.spec import ngram

Batch = list[tuple[str, list[int], int]]


class Proposer(Protocol):
    def propose(self, batch: Batch) -> dict[str, list[int]]: ...

    def release(self, request_id: str) -> None: ...


class NgramProposer:
    """Prompt lookup (spec/ngram.py): stateless, no model."""

    def propose(self, batch: Batch) -> dict[str, list[int]]:
        drafts = {rid: ngram.propose(tokens, k) for rid, tokens, k in batch}
        return {rid: d for rid, d in drafts.items() if d}

    def release(self, request_id: str) -> None:
        pass


def attach_drafts(scheduler: Scheduler, proposer: Proposer) -> None:
    """Ask `proposer` for the drafts of every decoding request that may take some."""
    batch = [(r.request_id, r.all_token_ids, k) for r in scheduler.decoding() if (k := scheduler.draft_limit(r)) > 0]
    if not batch:
        return
    drafts = proposer.propose(batch)
    for r in scheduler.decoding():
        r.draft = drafts.get(r.request_id, [])
