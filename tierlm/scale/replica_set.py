"""ReplicaSet: N engine replicas (Ray actors, replica.py) serving one tier, shown to the
server as one engine (the AsyncEngine surface handlers use: prepare, check_admission,
generate, current_load, cancel_all, shutdown, healthy, restarting).

Each request is routed by router.py. A replica chosen without the longest cached prefix
first pulls the missing blocks from the replica believed to hold them, when transfer.py
expects that to beat the prefill; a failed pull only costs the prefill. A replica that
dies leaves routing at once: its requests that had produced nothing yet run again on
another replica (the caller sees only latency), those already streaming end with
ReplicaLostError (503 with Retry-After, or an SSE error event), and a replacement starts in
its slot (at most `max_restarts` within `restart_window_s` per slot; then the slot stays
empty). The set is healthy while some replica serves or is being replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from tierlm.config import EngineConfig
from tierlm.engine.async_engine import (
    EngineDeadError,
    EngineRestartingError,
    EngineStats,
    FinishedRequest,
    QueueFullError,
    ReplicaLostError,
    RequestTiming,
)
from tierlm.kv_cache import prefix_hash
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams
from tierlm.scale.replica import EngineReplica
from tierlm.scale.router import Decision, PrefixRouter
from tierlm.scale.transfer import TransferModel
from tierlm.tenancy.routing import TierLoad

log = logging.getLogger("tierlm.replicas")

_POLL_S = 0.25  # replica stats and liveness
_STATS_TIMEOUT_S = 30.0  # a replica silent this long (its loop wedged) is treated as dead
_PROBE_BYTES = 16 << 20


@dataclass
class _Slot:
    index: int
    actor: object | None = None
    live: bool = False  # loaded and in routing
    pid: int = 0
    stats: EngineStats = field(default_factory=EngineStats)
    restarts: list[float] = field(default_factory=list)  # monotonic times of replacements
    replacing: bool = False
    failed: str | None = None  # why the slot is empty for good


class ReplicaSet:
    engine = None  # no engine in this process (runtime LoRA routes see none)
    remote = True  # prepare() waits on a replica: callers run it off the event loop

    def __init__(self, config: EngineConfig, *, size: int, threads: int, routing: str = "prefix",
                 overload_tokens: int = 2048, max_queued_requests: int = 1024,
                 on_finish: Callable[[FinishedRequest], None] | None = None,
                 on_step: Callable[[EngineStats], None] | None = None, metrics=None,
                 max_restarts: int = 3, restart_window_s: float = 300.0) -> None:
        self.config, self.size, self.threads = config, size, threads
        self.routing, self.overload_tokens = routing, overload_tokens
        self.max_queued = max_queued_requests
        self.on_finish = on_finish or (lambda f: None)
        self.on_step = on_step or (lambda s: None)
        self.metrics = metrics  # server/metrics.py ReplicaMetrics, or None
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self._actor_class = ray.remote(EngineReplica).options(num_cpus=threads, max_restarts=0)
        self.slots = [_Slot(i) for i in range(size)]
        self.router: PrefixRouter | None = None
        self.transfer: TransferModel | None = None
        self.info: dict = {}
        self._retired = EngineStats()  # running totals of replicas that died (counters stay monotonic)
        self._inflight = 0
        self._closed = False
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> dict:
        """Load every replica (in parallel) and probe the transfer bandwidth; returns what the
        server needs of the model (tokenizer, max_model_len, vocab_size). Load errors re-raised."""
        try:
            infos = ray.get([self._launch(s) for s in self.slots])
        except RayTaskError as e:
            self._kill_all()
            raise _cause(e) from None
        for slot, info in zip(self.slots, infos):
            slot.live, slot.pid = True, info["pid"]
        self.info = infos[0]
        self.router = PrefixRouter(self.size, self.info["capacity_blocks"], routing=self.routing,
                                   overload_tokens=self.overload_tokens)
        if self.size > 1:
            self.transfer = self._probe()
            log.info("replicas: KV transfer %.0f MB/s + %.1f ms between replicas", self.transfer.bytes_per_s / 1e6,
                     self.transfer.latency_s * 1e3)
        for slot in self.slots:
            self._observe(slot)
        return self.info

    def _launch(self, slot: _Slot):
        slot.actor = self._actor_class.remote(self.config, self.threads, self.max_queued)
        return slot.actor.start.remote()

    def _probe(self) -> TransferModel:
        a, b = self.slots[0].actor, self.slots[1].actor
        times = []
        for nbytes in (1, _PROBE_BYTES, 1, _PROBE_BYTES):  # the second pair: warm
            t0 = time.perf_counter()
            ray.get(b.sink.remote(a.blob.remote(nbytes)))
            times.append(time.perf_counter() - t0)
        return TransferModel.from_probe(times[2], times[3], _PROBE_BYTES)

    async def supervise(self) -> None:
        """Poll replicas for their stats and liveness until shutdown (a task on the server's loop)."""
        while not self._closed:
            await asyncio.gather(*(self._poll(s) for s in self.slots if s.live))
            self._publish()
            await asyncio.sleep(_POLL_S)

    async def _poll(self, slot: _Slot) -> None:
        try:
            stats, healthy, error = await asyncio.wait_for(slot.actor.stats.remote(), _STATS_TIMEOUT_S)
        except (TimeoutError, RayActorError) as e:
            self._lose(slot, f"{type(e).__name__}")
            return
        slot.stats = stats
        if not healthy:
            self._lose(slot, error or "its engine stopped")

    def _publish(self) -> None:
        live = [s for s in self.slots if s.live]
        self.on_step(_combined([s.stats for s in live], self._retired))
        for s in live:
            self._observe(s)

    def _observe(self, slot: _Slot) -> None:
        if self.metrics is not None:
            self.metrics.up(slot.index, slot.live)
            if slot.live:
                self.metrics.observe(slot.index, slot.stats, self.router.outstanding(slot.index))

    def _lose(self, slot: _Slot, why: str, actor=None) -> None:
        """Take a dead (or wedged) replica out of routing and start its replacement (`actor`:
        the one that failed, when known: a stale failure never takes down its replacement)."""
        if not slot.live or (actor is not None and actor is not slot.actor):
            return
        log.warning("replica %d (pid %d) is gone: %s", slot.index, slot.pid, why)
        slot.live = False
        self.router.lost(slot.index)
        _add_totals(self._retired, slot.stats)
        slot.stats = EngineStats()
        self._observe(slot)
        _kill(slot.actor)
        now = time.monotonic()
        slot.restarts = [t for t in slot.restarts if now - t < self.restart_window_s]
        if self._closed:
            return
        if len(slot.restarts) >= self.max_restarts:
            slot.failed = f"replica {slot.index} died {len(slot.restarts) + 1} times within {self.restart_window_s:.0f} s"
            log.error("%s; its slot stays empty", slot.failed)
            return
        slot.restarts.append(now)
        slot.replacing = True
        self._spawn(self._replace(slot))

    async def _replace(self, slot: _Slot) -> None:
        try:
            info = await self._launch(slot)
        except Exception as e:  # noqa: BLE001 - a failed replacement leaves the slot empty
            slot.failed = f"replica {slot.index}'s replacement failed: {_cause(e)}"
            log.error("%s", slot.failed)
            return
        finally:
            slot.replacing = False
        if self._closed:
            return
        slot.live, slot.pid = True, info["pid"]
        self.router.joined(slot.index)
        if self.metrics is not None:
            self.metrics.restarted(slot.index)
        self._observe(slot)
        log.info("replica %d replaced (pid %d)", slot.index, slot.pid)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shutdown(self) -> None:
        """Stop every replica (each flushes cached KV to its cold tier, if configured)."""
        self._closed = True
        live = [s for s in self.slots if s.actor is not None]
        try:
            ray.get([s.actor.shutdown.remote() for s in live], timeout=60)
        except (RayActorError, RayTaskError, GetTimeoutError):
            pass
        self._kill_all()

    def _kill_all(self) -> None:
        for s in self.slots:
            if s.actor is not None:
                _kill(s.actor)
            s.actor, s.live = None, False

    # ---- what the server asks of an engine ------------------------------------------------
    @property
    def healthy(self) -> bool:
        return not self._closed and any(s.live or s.replacing for s in self.slots)

    @property
    def restarting(self) -> bool:  # nothing serves, a replacement is on its way
        return not any(s.live for s in self.slots) and any(s.replacing for s in self.slots)

    @property
    def error(self) -> str | None:
        return None if self.healthy else "; ".join(s.failed for s in self.slots if s.failed) or "no replica"

    @property
    def num_inflight(self) -> int:
        return self._inflight

    def capacity(self) -> tuple[int, int]:
        """(replicas serving, replicas configured)."""
        return sum(s.live for s in self.slots), self.size

    def prepare(self, ids: list[int], params: SamplingParams) -> None:
        """Validate on a replica (limits and the output constraint are the model's): blocking,
        the server calls it on a worker thread."""
        for slot in [s for s in self.slots if s.live]:
            try:
                ray.get(slot.actor.prepare.remote(ids, params))
                return
            except RayTaskError as e:
                raise _cause(e) from None
            except RayActorError:
                continue  # it died meanwhile: ask another
        self.check_admission()  # none left: the reason as an engine error
        raise ReplicaLostError("no replica is serving")

    def check_admission(self, count: int = 1) -> None:
        if not self.healthy:
            raise EngineDeadError(self.error)
        if self.restarting:
            raise EngineRestartingError("every replica died; replacements are starting")
        live = [s for s in self.slots if s.live]
        queued = self._inflight - sum(s.stats.running for s in live)
        if queued + count > self.max_queued * len(live):
            raise QueueFullError(f"{queued} requests are queued; the limit is {self.max_queued * len(live)}")

    def current_load(self) -> TierLoad:
        """The load a new request meets: the least loaded live replica's."""
        live = [s for s in self.slots if s.live]
        if not live:
            return TierLoad(1.0, 1.0, 0.01, 0, busy=True)
        s = min(live, key=lambda s: (self.router.outstanding(s.index), s.index)).stats
        return TierLoad(s.step_s if s.running else s.idle_step_s, s.idle_step_s, s.prefill_s_per_token,
                        s.backlog_tokens, busy=s.running > 0)

    def cancel_all(self, message: str) -> None:
        for s in self.slots:
            if s.live:
                s.actor.cancel_all.remote(message)

    # ---- requests -----------------------------------------------------------------------
    def _hashes(self, ids: list[int], cache_salt: str | None) -> list[bytes]:
        if not self.info.get("caching"):
            return []
        hashes: list[bytes] = []
        prefix_hash.extend(hashes, ids, self.info["block_size"], self._root(cache_salt))
        return hashes

    def _root(self, cache_salt: str | None) -> bytes:
        return prefix_hash.root_hash(self.info["model_key"], cache_salt or "")

    async def generate(self, request_id: str, ids: list[int], params: SamplingParams, priority: int = 0,
                       cache_salt: str | None = None, session_id: str | None = None, tenant: str = "default",
                       lora: object | None = None) -> AsyncIterator[RequestOutput]:
        """Route a validated request to a replica and yield its outputs (see the module doc
        for what happens when that replica dies)."""
        if lora is not None:
            raise EngineDeadError("LoRA adapters are not served over replicas")
        self.check_admission()
        hashes = self._hashes(ids, cache_salt)
        per_seq = params.max_tokens if params.max_tokens is not None else self.info["max_model_len"] - len(ids)
        budget = len(ids) + per_seq * params.num_sequences
        timing = RequestTiming(time.perf_counter())
        self._inflight += 1
        last: RequestOutput | None = None
        tried: set[int] = set()
        try:
            while True:
                try:
                    decision = self.router.choose(hashes, session_id, frozenset(tried))
                except ValueError:
                    raise ReplicaLostError("no replica is serving; replacements are starting") from None
                slot = self.slots[decision.replica]
                actor = slot.actor
                self.router.routed(slot.index, hashes, budget, session_id)
                if self.metrics is not None:
                    self.metrics.routed(slot.index, decision.reason)
                if decision.holder is not None:
                    await self._pull(decision, hashes)
                done = 0  # of the budget
                try:
                    async for out in self._stream(slot, request_id, ids, params, priority, cache_salt, session_id,
                                                  tenant):
                        new = sum(len(c.delta_token_ids) for c in out.outputs)
                        if new and timing.first_token is None:
                            timing.first_token = time.perf_counter()
                        timing.num_output_tokens += new
                        step = new + (len(ids) if done == 0 else 0)  # the first output: the prompt is done
                        done += step
                        self.router.progressed(slot.index, step)
                        last = out
                        yield out
                        if out.finished:
                            self._learn(slot.index, ids, out, cache_salt)
                            return
                except RayActorError:
                    self._lose(slot, "it died while serving", actor)
                    if last is not None:
                        if self.metrics is not None:
                            self.metrics.lost(slot.index)
                        raise ReplicaLostError(f"replica {slot.index} died") from None
                    if self.metrics is not None:
                        self.metrics.requeued(slot.index)
                    tried.add(slot.index)
                    continue
                finally:
                    self.router.progressed(slot.index, budget - done)
        finally:
            self._inflight -= 1
            timing.finished = time.perf_counter()
            finished = last is not None and last.finished
            self.on_finish(FinishedRequest(request_id, len(ids), last if finished else None, timing,
                                           aborted=not finished, tenant=tenant))

    async def _stream(self, slot: _Slot, request_id: str, ids: list[int], params: SamplingParams,
                      *args) -> AsyncIterator[RequestOutput]:
        """One replica's outputs for the request; an error raised there is re-raised here as
        itself; leaving early cancels the replica's task (which aborts the request there)."""
        gen = slot.actor.generate.options(num_returns="streaming").remote(request_id, ids, params, *args)
        finished = False
        try:
            async for ref in gen:
                try:
                    out = await ref
                except RayTaskError as e:
                    raise _cause(e) from None
                finished = out.finished
                yield out
        finally:
            if not finished:
                with contextlib.suppress(Exception):  # the replica is gone or the task done
                    ray.cancel(gen)

    def _learn(self, replica: int, ids: list[int], out: RequestOutput, cache_salt: str | None) -> None:
        """A finished single-sequence request leaves its output's full blocks cached too."""
        if len(out.outputs) != 1 or not self.info.get("caching"):
            return
        tokens = ids + list(out.outputs[0].token_ids)[:-1]  # the last token's KV is never computed
        hashes: list[bytes] = []
        generated_from = len(ids) if self.info.get("split_formats") else None
        prefix_hash.extend(hashes, tokens, self.info["block_size"], self._root(cache_salt), generated_from)
        self.router.record(replica, hashes)

    async def _pull(self, d: Decision, hashes: list[bytes]) -> None:
        """Bring the holder's longer prefix into the chosen replica when that beats prefill."""
        blocks = d.holder_matched - d.matched
        nbytes = blocks * self.info["block_bytes"]
        target, holder = self.slots[d.replica], self.slots[d.holder]
        prefill = target.stats.prefill_s_per_token
        if not self.transfer.worth_it(nbytes, blocks * self.info["block_size"], prefill):
            if self.metrics is not None:
                self.metrics.transfer(d.replica, "skipped")
            return
        t0 = time.perf_counter()
        try:
            pages = holder.actor.export_prefix.remote(hashes[:d.holder_matched])
            taken = await target.actor.import_prefix.remote(pages)
        except (RayActorError, RayTaskError) as e:
            log.warning("KV transfer %d -> %d failed: %s", d.holder, d.replica, _cause(e))
            if self.metrics is not None:
                self.metrics.transfer(d.replica, "failed")
            return
        moved = taken * self.info["block_bytes"]
        self.transfer.observe(moved, time.perf_counter() - t0)
        self.router.record(d.replica, hashes[:d.holder_matched])
        if self.metrics is not None:
            self.metrics.transfer(d.replica, "done", moved)


def _kill(actor) -> None:
    with contextlib.suppress(Exception):  # already gone
        ray.kill(actor, no_restart=True)


def _cause(e: BaseException) -> BaseException:
    """The exception a replica raised (Ray wraps it), or `e` itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


_COUNTERS = ("preemptions", "prefix_queries", "prefix_hits", "kv_evictions", "spec_draft_tokens",
             "spec_accepted_tokens")


def _add_totals(into: EngineStats, s: EngineStats) -> None:
    """Add `s`'s running totals (counters, KV tier hits and bytes moved) to `into`."""
    for name in _COUNTERS:
        setattr(into, name, getattr(into, name) + getattr(s, name))
    for group in ("hits", "moved"):
        mine = into.kv_tiers.setdefault(group, {})
        for k, v in s.kv_tiers.get(group, {}).items():
            mine[k] = mine.get(k, 0) + v


def _combined(live: list[EngineStats], retired: EngineStats) -> EngineStats:
    """The tier's stats: live replicas' gauges summed (KV usage and step times averaged),
    running totals over every replica that ever served."""
    n = max(1, len(live))
    out = EngineStats(running=sum(s.running for s in live), waiting=sum(s.waiting for s in live),
                      backlog_tokens=sum(s.backlog_tokens for s in live),
                      kv_usage=sum(s.kv_usage for s in live) / n, step_s=sum(s.step_s for s in live) / n,
                      idle_step_s=sum(s.idle_step_s for s in live) / n,
                      prefill_s_per_token=sum(s.prefill_s_per_token for s in live) / n)
    for s in [*live, retired]:
        _add_totals(out, s)
    usage: dict[str, int] = {}
    for s in live:
        for k, v in s.kv_tiers.get("usage", {}).items():
            usage[k] = usage.get(k, 0) + v
    if usage:
        out.kv_tiers["usage"] = usage
    return out
