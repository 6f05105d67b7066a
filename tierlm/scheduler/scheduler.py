"""Scheduler: continuous batching under a per-step token budget.

Each step, running requests advance first (decode: one token; prefill: a chunk),
then waiting requests are admitted in policy order while the budget, `max_num_seqs`
and free KV blocks allow. When a running request cannot get blocks, the request that
sorts last under the policy is preempted: its blocks are freed and it recomputes later
from scratch (its sampled tokens are kept, and draws depend only on seed and index, so
the output is unchanged). A request admitted from the queue first adopts the longest
cached prefix of its tokens (kv_cache/manager.py), so it starts with those counted as
computed; blocks are offered to the cache as their KV is computed.

Forks: a request may start from another's KV (`fork`): full blocks are shared by
reference count and the partial last block is copied (the copy travels to the runner in
the next SchedulerOutput). The samples of an n > 1 / best_of request are parked until the
first one has computed its prompt, then forked from it. Beam-search requests report
their candidate tokens instead of appending one (the engine chooses and appends), and
sit in `running` with nothing to compute until it does. With speculative decoding on, a
decoding request also computes the draft tokens proposed for it before the step
(`Request.draft`, spec/proposer.py) as far as the budget allows; the runner reports how
many it accepted and only those count as computed. The scheduler never touches tensors
or live model state: its output is data (scheduler/output.py), a request's fixed facts
sent once and then only what changed; it is tested with fabricated StepResults.
"""

from __future__ import annotations

import bisect

from tierlm.config import SchedulerConfig
from tierlm.kv_cache import prefix_hash
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.outputs import SampledToken, StepResult
from tierlm.request import Request, RequestStatus
from tierlm.scheduler.admission import OutputLengthHistory, peak_blocks
from tierlm.scheduler.fair import VirtualTokenCounter
from tierlm.scheduler.output import NewRequest, ScheduledRequest, SchedulerOutput
from tierlm.scheduler.policy import POLICIES


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: tuple[int, ...]) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self.key = POLICIES[config.policy]
        self.chunk = config.long_prefill_chunk or config.max_num_batched_tokens
        self.waiting: list[Request] = []  # sorted by policy key
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # Prompt and generated tokens run on different weight formats: hash their blocks apart.
        self.split_formats = False
        self._drafts: dict[str, list[int]] = {}  # this step's draft tokens per request
        self._sent: dict[str, int] = {}  # requests the runner knows -> output tokens it has heard of
        self._finished: list[str] = []  # ended since the last SchedulerOutput (the runner forgets them)
        self.applied: list[SampledToken] = []  # the last update's tokens that were kept
        self.failed: dict[str, Exception] = {}  # the last update's requests whose own state failed
        self.draft_tokens = 0  # speculative tokens proposed / accepted since start
        self.accepted_tokens = 0
        self.prefix_queries = 0  # tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of which found cached
        self.vtc = VirtualTokenCounter(shares=dict(config.tenant_weights)) if config.policy == "fair" else None
        self.parked: dict[str, list[Request]] = {}  # source id -> requests to fork from its prompt
        self.history = OutputLengthHistory()  # finished output lengths, for past_future admission
        self._copies: list[tuple[int, int]] = []  # block copies for the next step

    # ---- queue management ------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        if self.vtc is not None:
            self.vtc.arrive(req.tenant, {r.tenant for r in self.waiting})
        bisect.insort(self.waiting, req, key=self.key)

    def _next_waiting(self) -> Request:
        """The request to admit next: the queue head, or under "fair" the first request of
        the least-served waiting tenant."""
        if self.vtc is None:
            return self.waiting[0]
        tenant = self.vtc.pick({r.tenant for r in self.waiting}, self._seats())
        return next(r for r in self.waiting if r.tenant == tenant)

    def add_forks(self, src: Request, children: list[Request]) -> None:
        """Queue `children` (same prompt as `src`, already added) to start from src's prompt KV
        once it is computed; if src ends first they compute it themselves."""
        for c in children:
            self.requests[c.request_id] = c
        self.parked[src.request_id] = children

    def fork(self, src: Request, dst: Request, num_tokens: int) -> None:
        """Add `dst` computed up to `num_tokens`, sharing src's KV; if src holds no KV (or the
        pool cannot copy its partial block, or the batch is full) dst recomputes instead."""
        self.requests[dst.request_id] = dst
        copies = None
        if self.kv.holds(src.request_id) and len(self.running) < self.config.max_num_seqs:
            copies = self.kv.fork(src.request_id, dst.request_id, num_tokens)
        if copies is None:
            dst.num_computed_tokens = 0
            bisect.insort(self.waiting, dst, key=self.key)
            return
        self._copies.extend(copies)
        dst.num_computed_tokens = num_tokens
        dst.block_hashes = src.block_hashes[: num_tokens // self.kv.block_size]
        dst.status = RequestStatus.RUNNING
        self.running.append(dst)

    def _release_parked(self, src: Request, fork: bool) -> None:
        for child in self.parked.pop(src.request_id, []):
            if fork:
                self.fork(src, child, len(src.prompt_token_ids) - 1)  # it computes the last prompt token
            else:
                bisect.insort(self.waiting, child, key=self.key)

    def abort(self, request_id: str) -> Request | None:
        return self.finish(request_id, RequestStatus.FINISHED_ABORTED)

    def finish(self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None) -> Request | None:
        """End a request (stop string, abort...) and free its blocks. Unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            for children in self.parked.values():
                if req in children:
                    children.remove(req)
        self._release_parked(req, fork=False)
        if status is not RequestStatus.FINISHED_ABORTED and req.sampling_params.max_tokens != 0:
            self.history.record(req.num_output_tokens)
        if req.session_id is not None:  # the next turn starts from this KV
            self.kv.pin(req.block_hashes[: req.num_computed_tokens // self.kv.block_size])
        self.kv.free(request_id)
        if self._sent.pop(request_id, None) is not None:
            self._finished.append(request_id)
        req.status = status
        if stop_reason is not None:
            req.stop_reason = stop_reason
        return req

    @property
    def ended(self) -> list[str]:
        """Requests the runner knew that ended since the last schedule() (it forgets them then)."""
        return self._finished

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._drafts.clear()  # drafts of requests preempted before they ran
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Request, int]] = []
        preempted: list[str] = []
        # Policy "fair": a tenant below its share gets a seat back and its prefill budget first.
        seat, held, paused = self._fair_turn(budget)
        if seat is not None:
            self._preempt(seat)
        budget = self._advance(budget - held, plan, preempted, paused)
        budget += held
        started = 0
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self._next_waiting()
            if self.config.admission == "past_future" and self.running and not self._future_fits(req):
                break  # head-of-line waits, as below
            hit, hot = self._adopt_cached_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget, self.chunk)
            if not self.kv.allocate(req.request_id, req.num_computed_tokens + n, req.num_computed_tokens):
                if hit:  # give the adopted blocks back (they stay cached)
                    self.kv.free(req.request_id)
                    req.num_computed_tokens = 0
                break  # head-of-line waits: admitting later requests first would starve it
            if self.kv.enable_caching:
                self.prefix_queries += req.num_tokens
                self.prefix_hits += hit
                self.kv.hot_block_hits += hot
            if req.num_cached_tokens is None:  # reported as usage.prompt_tokens_details.cached_tokens
                req.num_cached_tokens = hit
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.append((req, n))
            budget -= n
            started += 1
        if paused and not started:  # nobody new started: no reason to pause anyone
            budget = self._advance(budget, plan, preempted)
        if not plan and self.waiting and not preempted:
            # Only beams waiting for their siblings' candidates are running, and those
            # siblings cannot get blocks: make room (the idle beams keep their candidates).
            for req in [r for r in self.running if r.num_computed_tokens == r.num_tokens]:
                self._preempt(req)
                preempted.append(req.request_id)
        if seat is not None:
            preempted.append(seat.request_id)
        copies, self._copies = self._copies, []
        for req in self.running:
            req.draft = []  # proposals are for this step only
        new: list[NewRequest] = []
        scheduled = [self._scheduled(r, n, new) for r, n in plan]
        finished, self._finished = self._finished, []
        saves, loads = self.kv.take_transfers()
        return SchedulerOutput(scheduled, preempted, copies, new, finished, saves, loads)

    def _advance(self, budget: int, plan: list[tuple[Request, int]], preempted: list[str],
                 skip: frozenset[str] = frozenset()) -> int:
        """Plan the running requests' next tokens (a decode token or a prefill chunk) within
        `budget`, preempting the last by policy when blocks run out; requests of tenants in
        `skip`, and requests already planned, wait. Returns the budget left."""
        planned = {r.request_id for r, _ in plan}
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget, self.chunk)
            if n == 0 or req.tenant in skip or req.request_id in planned:  # n == 0: a beam awaiting its token
                i += 1
                continue
            if n == 1 and self.config.num_speculative_tokens:
                n += self._draft(req, budget - 1)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n, req.num_computed_tokens):
                victim = max((r for r in self.running[i:] if r.request_id not in planned), key=self.key)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                plan.append((req, n))
                planned.add(req.request_id)
                budget -= n
                i += 1
        return budget

    def _fair_turn(self, budget: int) -> tuple[Request | None, int, frozenset[str]]:
        """Policy "fair": when the tenant next in line holds fewer seats than its weighted
        share, (a request to give up its seat when every seat is taken, tokens of the step's
        budget held back for the newcomer's prefill, tenants whose requests sit this step
        out). The seat comes from the last (by policy) request of the tenant furthest over
        its share, one per step, never from a tenant at or below its share: two busy
        tenants settle at their shares instead of trading seats. A tenant with nothing
        running (a light one) also gets a step without the decodes of tenants over their
        share, so its first token costs about what it costs alone; they lose one step."""
        nothing = None, 0, frozenset()
        if self.vtc is None or not self.waiting:
            return nothing
        seats = self._seats()
        waiting = {r.tenant for r in self.waiting}
        nxt = self.vtc.pick(waiting, seats)
        weights = {t: self.vtc.shares.get(t, 1.0) for t in waiting | set(seats)}
        total = sum(weights.values())

        def excess(t: str) -> float:
            return seats.get(t, 0) - self.config.max_num_seqs * weights[t] / total

        if excess(nxt) + 1 > 0:
            return nothing
        victim = None
        if len(self.running) >= self.config.max_num_seqs:
            over = max((t for t in seats if t != nxt), key=lambda t: (excess(t), t), default=None)
            if over is None or excess(over) < 1:
                return nothing
            victim = max((r for r in self.running if r.tenant == over), key=self.key)
        paused = frozenset(t for t in seats if t != nxt and excess(t) >= 1) if not seats.get(nxt) else frozenset()
        head = next(r for r in self.waiting if r.tenant == nxt)
        decodes = sum(1 for r in self.running if r.tenant not in paused and r is not victim)
        return victim, max(0, min(head.num_tokens - head.num_computed_tokens, self.chunk, budget - decodes)), paused

    def _seats(self) -> dict[str, int]:
        """Running requests per tenant."""
        seats: dict[str, int] = {}
        for r in self.running:
            seats[r.tenant] = seats.get(r.tenant, 0) + 1
        return seats

    def _remaining(self, req: Request) -> int:
        """Predicted further output tokens of `req` (admission.py)."""
        p = req.sampling_params
        cap = req.max_total_tokens - req.num_tokens
        if p.max_tokens is not None:
            cap = min(cap, p.max_tokens - req.num_output_tokens)
        return self.history.remaining(req.num_output_tokens, cap)

    def _future_fits(self, req: Request) -> bool:
        """Past-Future rule: the predicted peak KV use with `req` admitted fits the pool."""
        seqs = [(r.num_tokens, self._remaining(r)) for r in self.running]
        seqs.append((req.num_tokens, self._remaining(req)))
        return peak_blocks(seqs, lambda n: self.kv.max_blocks(n, self.chunk)) <= self.kv.pool.num_usable

    def _adopt_cached_prefix(self, req: Request) -> tuple[int, int]:
        """Start `req` (nothing computed yet) on its longest cached prefix.

        Returns (its tokens, blocks of it found in the hot pool)."""
        if not self.kv.enable_caching or req.prompt_logprobs is not None:  # scoring needs every position
            return 0, 0
        bs = self.kv.block_size
        self._hash_full_blocks(req)
        k = self.kv.lookup_prefix(req.block_hashes, (req.num_tokens - 1) // bs)  # leave >= 1 to compute
        hot = 0
        if k:
            k, hot = self.kv.adopt_prefix(req.request_id, req.block_hashes, k)
            req.num_computed_tokens = k * bs
        return k * bs, hot

    def _hash_full_blocks(self, req: Request) -> None:
        """Extend `req.block_hashes` to its full blocks (no token-list copy when nothing is new)."""
        bs = self.kv.block_size
        if req.num_tokens // bs > len(req.block_hashes):
            generated_from = len(req.prompt_token_ids) if self.split_formats else None
            prefix_hash.extend(req.block_hashes, req.all_token_ids, bs, req.cache_root, generated_from)

    def decoding(self) -> list[Request]:
        """Running requests with exactly one token to compute: those that may take drafts."""
        return [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]

    def draft_limit(self, req: Request) -> int:
        """How many draft tokens a decoding request may take: none without speculative
        decoding, for beams, constrained outputs or prompt scoring, and never past
        max_tokens or the context (the last sampled token would have nowhere to go)."""
        p = req.sampling_params
        if (not self.config.num_speculative_tokens or p.use_beam_search or p.guided is not None
                or req.prompt_logprobs is not None):
            return 0
        k = min(self.config.num_speculative_tokens, req.max_total_tokens - req.num_tokens - 1)
        if p.max_tokens is not None:
            k = min(k, p.max_tokens - req.num_output_tokens - 1)
        return k

    def _draft(self, req: Request, room: int) -> int:
        """Take the request's proposed drafts as far as `room` and its limit allow (kept for
        this step); returns how many."""
        k = min(self.draft_limit(req), room)
        if k <= 0:
            return 0
        draft = req.draft[:k]
        if draft:
            self._drafts[req.request_id] = draft
        return len(draft)

    def _scheduled(self, req: Request, n: int, new: list[NewRequest]) -> ScheduledRequest:
        """The step's data for `req`; the first time the runner sees it, its fixed facts go to `new`."""
        rid = req.request_id
        start = req.num_computed_tokens
        draft = self._drafts.pop(rid, [])
        prompt, outputs = req.prompt_token_ids, req.output_token_ids
        end = start + n - len(draft)  # known tokens computed this step
        tokens = (prompt[start:end] if end <= len(prompt) else req.all_token_ids[start:end]) + draft
        heard = self._sent.get(rid)
        if heard is None:
            new.append(NewRequest(rid, prompt, list(outputs), req.sampling_params, req.seed))
            heard = len(outputs)
        self._sent[rid] = len(outputs)
        scoring = req.prompt_logprobs is not None and start < len(prompt) - 1
        return ScheduledRequest(rid, tokens, start, self.kv.block_tables(rid),
                                sample=end == req.num_tokens and req.sampling_params.max_tokens != 0,
                                prompt_len=len(prompt), new_output_token_ids=tuple(outputs[heard:]),
                                draft_token_ids=tuple(draft),
                                prompt_logprobs=req.sampling_params.prompt_logprobs if scoring else None)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        bisect.insort(self.waiting, req, key=self.key)

    def update(self, out: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply stop rules.

        Returns the requests that finished in this step (their blocks already freed).
        """
        finished = []
        self.applied = []
        self.kv.saved(result.saved_blocks)
        for s in out.scheduled:
            req = self.requests.get(s.request_id)
            if req is None:
                continue
            if self.vtc is not None:  # prompt tokens computed (a recompute is service too)
                self.vtc.charge(req.tenant, prompt_tokens=s.num_prompt_tokens)
            # Rejected drafts' KV is left behind: later tokens overwrite those positions.
            accepted = result.accepted_drafts.get(s.request_id, 0)
            self.draft_tokens += len(s.draft_token_ids)
            self.accepted_tokens += accepted
            req.num_computed_tokens += len(s.token_ids) - len(s.draft_token_ids) + accepted
            if self.kv.enable_caching:
                self._hash_full_blocks(req)
                self.kv.cache_blocks(req.request_id, req.block_hashes, req.num_computed_tokens)
            for pos, lp in result.prompt_logprobs.get(s.request_id, ()):
                req.prompt_logprobs[pos] = lp
            if req.request_id in self.parked and req.num_computed_tokens >= len(req.prompt_token_ids) - 1:
                self._release_parked(req, fork=True)
            if req.sampling_params.max_tokens == 0 and req.num_computed_tokens == req.num_tokens:
                finished.append(self.finish(req.request_id, RequestStatus.FINISHED_LENGTH))  # prompt scored
        # One request's own state (its grammar) failed on its token: it ends alone (the engine says why).
        self.failed = {rid: e for rid, e in result.failed.items() if rid in self.requests}
        for tok in result.sampled:
            req = self.requests.get(tok.request_id)
            if req is None or req.request_id in self.failed:
                continue
            if self.vtc is not None:
                self.vtc.charge(req.tenant, output_tokens=1)
            self.applied.append(tok)
            done = self._apply_token(req, tok, tok.request_id in result.grammar_complete)
            if done is not None:
                finished.append(done)
        return finished

    def _apply_token(self, req: Request, tok, grammar_complete: bool) -> Request | None:
        """Append one sampled token to `req` and apply its stop rules (`grammar_complete`:
        its output constraint allows nothing after it); returns `req` if it finished."""
        if req.sampling_params.use_beam_search:
            req.beam_candidates = tok.logprob.top  # the engine picks and appends
            return None
        req.output_token_ids.append(tok.token_id)
        if tok.logprob is not None:
            req.output_logprobs.append(tok.logprob)
        status, reason = self._stop_check(req, tok.token_id)
        if status is None and grammar_complete:  # nothing may follow: the output is complete
            status = RequestStatus.FINISHED_STOPPED
        return self.finish(req.request_id, status, reason) if status is not None else None

    def _stop_check(self, req: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        p = req.sampling_params
        n_out = req.num_output_tokens
        if n_out >= p.min_tokens:
            if token in self.eos_token_ids and not p.ignore_eos:
                return RequestStatus.FINISHED_STOPPED, None
            if token in p.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if (p.max_tokens is not None and n_out >= p.max_tokens) or req.num_tokens >= req.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        assert set(self._sent) <= set(self.requests), "the runner is told of a request that ended"
        assert set(self.kv.tables) <= {r.request_id for r in self.running}
        parked = sum(len(c) for c in self.parked.values())
        assert len(self.running) + len(self.waiting) + parked == len(self.requests)
        for r in self.running:
            for table in self.kv.block_tables(r.request_id):
                assert len(table) * self.kv.block_size >= r.num_computed_tokens
