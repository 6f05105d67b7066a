"""OutputProcessor: the caller's side of requests. A caller's request (a parent) fans out
into sequences: one, n / best_of samples (forked from the first's prompt KV), or beams.
Here each kept token is detokenized and checked against stop strings, best_of samples are
ranked at the end, beams are grown and pruned each round (engine/beam.py holds the rule),
and RequestOutputs are made. Per-request work is guarded: a request whose own state fails
(stop strings, detokenizer, beams, grammar) ends alone with an error.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from tierlm.engine import beam
from tierlm.engine.detokenizer import IncrementalDetokenizer
from tierlm.outputs import CompletionOutput, RequestOutput, SampledToken
from tierlm.request import Request, RequestStatus
from tierlm.scheduler.scheduler import Scheduler

log = logging.getLogger("tierlm.engine")


@dataclass
class Parent:
    """A caller's request: its sequences (one, n / best_of samples, or beams) and their text."""

    prompt: str | None
    prompt_token_ids: list[int]
    children: list[str]
    requests: dict[str, Request]
    detoks: dict[str, IncrementalDetokenizer]
    finished: set[str] = field(default_factory=set)
    new_tokens: dict[str, list[int]] = field(default_factory=dict)
    n: int = 1  # sequences returned (of len(children) generated)
    hide_logprobs: bool = False  # logprobs were only computed to rank best_of samples
    beam: beam.BeamState | None = None


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler, eos_token_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # stop strings finish sequences, beams fork and drop them
        self.eos_token_ids = eos_token_ids
        self.parents: dict[str, Parent] = {}
        self.child_parent: dict[str, str] = {}

    def add(self, request_id: str, parent: Parent, reqs: list[Request]) -> None:
        for req in reqs:
            self._track(parent, req, request_id)
        self.parents[request_id] = parent

    def has(self, request_id: str) -> bool:
        return request_id in self.parents

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def abort(self, request_id: str) -> bool:
        """Abort a caller's request (every sequence); False if it is unknown or over."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return False
        for child in parent.requests:
            self.scheduler.abort(child)
            self.child_parent.pop(child, None)
        return True

    def _track(self, parent: Parent, req: Request, parent_id: str) -> None:
        if parent.beam is None:
            parent.detoks[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, req.sampling_params.stop,
                req.sampling_params.skip_special_tokens, req.sampling_params.include_stop_str_in_output)
        self.child_parent[req.request_id] = parent_id
        parent.requests[req.request_id] = req

    def process(self, finished: list[Request], applied: list[SampledToken],
                failed: dict[str, Exception]) -> list[RequestOutput]:
        """Outputs for every caller's request a step changed: `finished` sequences, the
        sampled tokens the scheduler kept (`applied`, in order) and sequences whose own
        state `failed`."""
        # Per-request work from here on is guarded: a request whose own state fails (its
        # stop strings, detokenizer, beams, grammar) ends alone with an error.
        failures: dict[str, Exception] = {}
        for rid, e in failed.items():
            if rid in self.child_parent:
                failures.setdefault(self.child_parent[rid], e)
        # Requests that end without a token (max_tokens 0: the prompt is scored) report too.
        touched: dict[str, None] = {self.child_parent[r.request_id]: None for r in finished
                                    if r.request_id in self.child_parent}
        beams: dict[str, None] = {}
        stopped: set[str] = set()
        for tok in applied:  # the sampled tokens the scheduler kept, in order
            pid = self.child_parent.get(tok.request_id)
            if pid is None or pid in failures:
                continue
            try:
                kind = self._apply_output_token(self.parents[pid], tok, stopped)
            except Exception as e:  # noqa: BLE001 - see above
                failures[pid] = e
                continue
            if kind == "beam":
                beams[pid] = None
            elif kind == "text":
                touched[pid] = None
        outputs = []
        for pid in beams:
            outputs += self._guarded(pid, failures, lambda p: self._beam_output(p) if self._beam_round(p) else None)
        for pid in touched:
            outputs += self._guarded(pid, failures, self._output)
        outputs += [self._fail(pid, e) for pid, e in failures.items() if pid in self.parents]
        return outputs

    def check_integrity(self) -> None:
        live = {c for p in self.parents.values() for c in p.requests}
        assert set(self.scheduler.requests) <= live, "the scheduler holds a request no caller owns"
        assert set(self.child_parent) == live, "child -> parent index disagrees with the parents"

    def _apply_output_token(self, parent: Parent, tok, stopped: set[str]) -> str | None:
        """Detokenize one kept token and apply stop strings. Returns "beam" (the round
        decides), "text" (the parent has news) or None (a draft after a stop string)."""
        if tok.request_id in stopped:  # a draft after a stop string: not part of the output
            parent.requests[tok.request_id].drop_last_output()
            return None
        if parent.beam is not None:
            return "beam"
        detok = parent.detoks[tok.request_id]
        detok.add(tok.token_id)
        parent.new_tokens.setdefault(tok.request_id, []).append(tok.token_id)
        if detok.stopped_on is not None and tok.request_id in self.scheduler.requests:
            self.scheduler.finish(tok.request_id, RequestStatus.FINISHED_STOPPED, detok.stopped_on)
            stopped.add(tok.request_id)
        return "text"

    def _guarded(self, pid: str, failures: dict[str, Exception], make) -> list[RequestOutput]:
        """`make(pid)` as a list (empty for None); a failure is recorded for `pid` instead."""
        if pid in failures or pid not in self.parents:
            return []
        try:
            out = make(pid)
        except Exception as e:  # noqa: BLE001 - one request's failure is that request's alone
            failures[pid] = e
            return []
        return [out] if out is not None else []

    def _fail(self, pid: str, error: Exception) -> RequestOutput:
        """End request `pid` with an error: its sequences are aborted and their blocks freed."""
        log.error("request %s failed: %s: %s", pid, type(error).__name__, error,
                  exc_info=(type(error), error, error.__traceback__))
        parent = self.parents[pid]
        self.abort(pid)
        return RequestOutput(pid, parent.prompt, parent.prompt_token_ids, [], True,
                             error=f"{type(error).__name__}: {error}")

    def _output(self, pid: str) -> RequestOutput | None:
        """The request's state now; None while best_of > n samples are still running (only
        the finished set can be ranked)."""
        parent = self.parents[pid]
        outs = []
        for i, child in enumerate(parent.children):
            req = parent.requests[child]
            detok = parent.detoks[child]
            done = req.status.finished
            delta = detok.delta(final=done)
            lps = req.sampling_params.logprobs is not None
            outs.append(CompletionOutput(
                index=i, text=detok.text[: detok.emitted], token_ids=list(req.output_token_ids),
                logprobs=list(req.output_logprobs) if lps and not parent.hide_logprobs else None,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                cumulative_logprob=sum(lp.logprob for lp in req.output_logprobs) if lps else None,
                delta_text=delta, delta_token_ids=parent.new_tokens.pop(child, [])))
            if done:
                parent.finished.add(child)
        finished = len(parent.finished) == len(parent.children)
        if len(outs) > parent.n:
            if not finished:
                return None
            outs = sorted(outs, key=lambda o: (-o.cumulative_logprob, o.index))[: parent.n]
            for i, o in enumerate(outs):
                o.index = i
        if finished:
            self._forget(pid)
        first = parent.requests[parent.children[0]]
        scored = first.prompt_logprobs
        return RequestOutput(pid, parent.prompt, parent.prompt_token_ids, outs, finished,
                             list(scored) if scored is not None else None,
                             num_cached_tokens=first.num_cached_tokens or 0)

    def _forget(self, pid: str) -> None:
        parent = self.parents.pop(pid)
        for child in parent.requests:
            self.child_parent.pop(child, None)

    # ---- beam search -------------------------------------------------------------------
    def _beam_round(self, pid: str) -> bool:
        """Once every live beam has its candidates: keep the best extensions (forking a
        beam that continues more than one way), drop the rest. Returns True when done."""
        parent = self.parents[pid]
        st = parent.beam
        reqs = [parent.requests[c] for c in st.live]
        if any(r.beam_candidates is None for r in reqs):
            return False
        p = reqs[0].sampling_params
        eos = set() if p.ignore_eos else set(self.eos_token_ids)
        at_limit = ((p.max_tokens is not None and reqs[0].num_output_tokens + 1 >= p.max_tokens)
                    or reqs[0].num_tokens + 1 >= reqs[0].max_total_tokens)
        live = st.plan([r.output_token_ids for r in reqs], [r.beam_candidates for r in reqs],
                       eos | set(p.stop_token_ids), eos, at_limit)
        targets, used = [], set()
        for e in live:  # forks first: they copy their source before it grows
            src = reqs[e.source]
            if e.source in used:
                st.next_id += 1
                dst = dataclasses.replace(src, request_id=f"{pid}#b{st.next_id}",
                                          output_token_ids=list(src.output_token_ids), block_hashes=[],
                                          num_computed_tokens=0, beam_candidates=None)
                self._track(parent, dst, pid)
                self.scheduler.fork(src, dst, src.num_computed_tokens)
                src = dst
            used.add(e.source)
            targets.append((src, e))
        st.live = {}
        for req, e in targets:
            req.output_token_ids.append(e.token)
            req.beam_candidates = None
            st.live[req.request_id] = e.cum_logprob
        for r in reqs:
            if r.request_id not in st.live:
                self.scheduler.finish(r.request_id, RequestStatus.FINISHED_ABORTED)
                del parent.requests[r.request_id]
                self.child_parent.pop(r.request_id, None)
        parent.children = list(st.live)
        return not st.live

    def _beam_output(self, pid: str) -> RequestOutput:
        parent = self.parents[pid]
        st = parent.beam
        self._forget(pid)
        best = beam.ranked(st.finished, st.length_penalty)[: parent.n]
        outs = [CompletionOutput(index=i, text=self.tokenizer.decode(h.token_ids, st.skip_special_tokens),
                                 token_ids=list(h.token_ids), logprobs=None, finish_reason=h.finish_reason,
                                 stop_reason=h.stop_reason, cumulative_logprob=h.cum_logprob)
                for i, h in enumerate(best)]
        return RequestOutput(pid, parent.prompt, parent.prompt_token_ids, outs, True)
