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
sit in `running` with nothing to compute until it does. The parts with one job each live
beside it: the queue policy (policy.py, fair.py), admission (admission.py), prefix
adoption (prefix.py), stop rules (stops.py), forks' parking (forks.py) and what the
runner has heard (contract.py), LoRA adapter slots (lora.py). With speculative decoding on, a
decoding request also computes the draft tokens proposed for it before the step
(`Request.draft`, spec/proposer.py) as far as the budget allows; the runner reports how
many it accepted and only those count as computed. The scheduler never touches tensors
or live model state: its output is data (scheduler/output.py), a request's fixed facts
sent once and then only what changed; it is tested with fabricated StepResults.
"""

from __future__ import annotations

import bisect

from tierlm.config import SchedulerConfig
from tierlm.kv_cache.manager import KVCacheManager
from tierlm.outputs import SampledToken, StepResult
from tierlm.request import Request, RequestStatus
from tierlm.scheduler import drafts
from tierlm.scheduler.admission import make_admission
from tierlm.scheduler.contract import RunnerView
from tierlm.scheduler.forks import Parking
from tierlm.scheduler.lora import NO_SLOT, LoRASlotTable
from tierlm.scheduler.output import NewRequest, SchedulerOutput
from tierlm.scheduler.policy import make_policy
from tierlm.scheduler.prefix import adopt_cached_prefix, hash_full_blocks
from tierlm.scheduler.stops import stop_check


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: tuple[int, ...],
                 split_formats: bool = False, max_loras: int = 0) -> None:
        self.config = config
        self.kv = kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self.policy = make_policy(config)
        self.key = self.policy.key
        self.admission = make_admission(config.admission)
        self.chunk = config.long_prefill_chunk or config.max_num_batched_tokens
        # Prompt and generated tokens run on different weight formats: hash their blocks apart.
        self.split_formats = split_formats
        self.waiting: list[Request] = []  # sorted by policy key
        self.running: list[Request] = []  # in admission order
        self.requests: dict[str, Request] = {}
        self.parking = Parking()
        self.runner_view = RunnerView()
        self.lora_slots = LoRASlotTable(max_loras) if max_loras else None
        self.num_preemptions = 0
        self.applied: list[SampledToken] = []  # the last update's tokens that were kept
        self.failed: dict[str, Exception] = {}  # the last update's requests whose own state failed
        self.draft_tokens = 0  # speculative tokens proposed / accepted since start
        self.accepted_tokens = 0
        self.prefix_queries = 0  # tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of which found cached
        self._drafts: dict[str, list[int]] = {}  # this step's draft tokens per request
        self._copies: list[tuple[int, int]] = []  # block copies for the next step

    # ---- queue management ------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.policy.arrive(req, self.waiting)
        bisect.insort(self.waiting, req, key=self.key)

    def add_forks(self, src: Request, children: list[Request]) -> None:
        """Queue `children` (same prompt as `src`, already added) to start from src's prompt KV
        once it is computed; if src ends first they compute it themselves."""
        for c in children:
            self.requests[c.request_id] = c
        self.parking.park(src.request_id, children)

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
        dst.lora_slot = src.lora_slot  # the same adapter, held by src's slot
        dst.status = RequestStatus.RUNNING
        self.running.append(dst)

    def _release_parked(self, src: Request, fork: bool) -> None:
        for child in self.parking.release(src.request_id):
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
            self.parking.discard(req)
        self._release_parked(req, fork=False)
        if status is not RequestStatus.FINISHED_ABORTED and req.sampling_params.max_tokens != 0:
            self.admission.record(req.num_output_tokens)
        if req.session_id is not None:  # the next turn starts from this KV
            self.kv.pin(req.block_hashes[: req.num_computed_tokens // self.kv.block_size])
        self.kv.free(request_id)
        self.runner_view.end(request_id)
        req.status = status
        if stop_reason is not None:
            req.stop_reason = stop_reason
        return req

    @property
    def ended(self) -> list[str]:
        """Requests the runner knew that ended since the last schedule() (it forgets them then)."""
        return self.runner_view.ended

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._drafts.clear()  # drafts of requests preempted before they ran
        budget = self.config.max_num_batched_tokens
        plan: list[tuple[Request, int]] = []
        preempted: list[str] = []
        # Policy "fair": a tenant below its share gets a seat back and its prefill budget first.
        seat, held, paused = self.policy.turn(self.waiting, self.running, budget, self.config.max_num_seqs,
                                              self.chunk)
        if seat is not None:
            self._preempt(seat)
        budget = self._advance(budget - held, plan, preempted, paused) + held
        started = 0
        slot_wait = False  # a request waits for an adapter slot: only base-model requests pass it
        while not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            queue = [r for r in self.waiting if r.lora is None] if slot_wait else self.waiting
            if not queue:
                break
            req = self.policy.next_waiting(queue, self.running)
            slot = self.lora_slots.slot_for(req, self.running) if self.lora_slots is not None else NO_SLOT
            if slot is None:
                slot_wait = True
                continue
            n = self._admit(req, budget, plan, slot)
            if n == 0:
                break  # head-of-line waits: admitting later requests first would starve it
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
        return self._output(plan, preempted)

    def _admit(self, req: Request, budget: int, plan: list[tuple[Request, int]], slot: int = NO_SLOT) -> int:
        """Start a waiting request on its cached prefix and its first chunk (and its adapter
        on `slot`): the tokens planned, or 0 (nothing changed) when admission or the pool
        says it must wait."""
        if not self.admission.fits(req, self.running, self.kv, self.chunk):
            return 0
        hit, hot = adopt_cached_prefix(self.kv, req, self.split_formats)
        n = min(req.num_tokens - req.num_computed_tokens, budget, self.chunk)
        if not self.kv.allocate(req.request_id, req.num_computed_tokens + n, req.num_computed_tokens):
            if hit:  # give the adopted blocks back (they stay cached)
                self.kv.free(req.request_id)
                req.num_computed_tokens = 0
            return 0
        if self.kv.enable_caching:
            self.prefix_queries += req.num_tokens
            self.prefix_hits += hit
            self.kv.hot_block_hits += hot
        if req.num_cached_tokens is None:  # reported as usage.prompt_tokens_details.cached_tokens
            req.num_cached_tokens = hit
        if self.lora_slots is not None:
            self.lora_slots.bind(req, slot)
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        plan.append((req, n))
        return n

    def _output(self, plan: list[tuple[Request, int]], preempted: list[str]) -> SchedulerOutput:
        copies, self._copies = self._copies, []
        for req in self.running:
            req.draft = []  # proposals are for this step only
        new: list[NewRequest] = []
        scheduled = [self.runner_view.scheduled(r, n, self._drafts.pop(r.request_id, []),
                                                self.kv.live_tables(r.request_id), new) for r, n in plan]
        saves, loads = self.kv.take_transfers()
        lora_loads = self.lora_slots.take_loads() if self.lora_slots is not None else []
        return SchedulerOutput(scheduled, preempted, copies, new, self.runner_view.take_ended(), saves, loads,
                               lora_loads)

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
                draft = drafts.take(req, budget - 1, self.config.num_speculative_tokens)
                if draft:
                    self._drafts[req.request_id] = draft
                n += len(draft)
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

    def decoding(self) -> list[Request]:
        """Running requests with exactly one token to compute: those that may take drafts."""
        return [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]

    def draft_limit(self, req: Request) -> int:
        return drafts.limit(req, self.config.num_speculative_tokens)

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
            self.policy.charge(req.tenant, prompt_tokens=s.num_prompt_tokens)  # a recompute is service too
            # Rejected drafts' KV is left behind: later tokens overwrite those positions.
            accepted = result.accepted_drafts.get(s.request_id, 0)
            self.draft_tokens += len(s.draft_token_ids)
            self.accepted_tokens += accepted
            req.num_computed_tokens += len(s.token_ids) - len(s.draft_token_ids) + accepted
            if self.kv.enable_caching:
                hash_full_blocks(req, self.kv.block_size, self.split_formats)
                self.kv.cache_blocks(req.request_id, req.block_hashes, req.num_computed_tokens)
            for pos, lp in result.prompt_logprobs.get(s.request_id, ()):
                req.prompt_logprobs[pos] = lp
            if self.parking.holds_for(req.request_id) and req.num_computed_tokens >= len(req.prompt_token_ids) - 1:
                self._release_parked(req, fork=True)
            if req.sampling_params.max_tokens == 0 and req.num_computed_tokens == req.num_tokens:
                finished.append(self.finish(req.request_id, RequestStatus.FINISHED_LENGTH))  # prompt scored
        # One request's own state (its grammar) failed on its token: it ends alone (the engine says why).
        self.failed = {rid: e for rid, e in result.failed.items() if rid in self.requests}
        for tok in result.sampled:
            req = self.requests.get(tok.request_id)
            if req is None or req.request_id in self.failed:
                continue
            self.policy.charge(req.tenant, output_tokens=1)
            self.applied.append(tok)
            done = self._apply_token(req, tok, tok.request_id in result.grammar_complete)
            if done is not None:
                finished.append(done)
        return finished

    def _apply_token(self, req: Request, tok: SampledToken, grammar_complete: bool) -> Request | None:
        """Append one sampled token to `req` and apply its stop rules (`grammar_complete`:
        its output constraint allows nothing after it); returns `req` if it finished."""
        if req.sampling_params.use_beam_search:
            req.beam_candidates = tok.logprob.top  # the engine picks and appends
            return None
        req.output_token_ids.append(tok.token_id)
        if tok.logprob is not None:
            req.output_logprobs.append(tok.logprob)
        status, reason = stop_check(req, tok.token_id, self.eos_token_ids)
        if status is None and grammar_complete:  # nothing may follow: the output is complete
            status = RequestStatus.FINISHED_STOPPED
        return self.finish(req.request_id, status, reason) if status is not None else None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        assert set(self.kv.tables) <= {r.request_id for r in self.running}
        assert len(self.running) + len(self.waiting) + len(self.parking) == len(self.requests)
        assert self.runner_view.known() <= set(self.requests), "the runner is told of a request that ended"
        for r in self.running:
            for table in self.kv.block_tables(r.request_id):
                assert len(table) * self.kv.block_size >= r.num_computed_tokens
            if r.lora is not None:
                assert self.lora_slots.held[r.lora_slot] == r.lora.key, "a running request's adapter left its slot"
