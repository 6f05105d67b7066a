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
from tierlm.engine.load import load_of
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams
from tierlm.scale import cluster
from tierlm.scale.replica import EngineReplica
from tierlm.scale.router import BlockKeys, Decision, PrefixRouter
from tierlm.scale.stats import add_totals, combined
from tierlm.scale.transfer import TransferModel
from tierlm.server.metrics import ReplicaMetrics
from tierlm.tenancy.routing import TierLoad

log = logging.getLogger("tierlm.replicas")

_POLL_S = 0.25  # replica stats and liveness
_STATS_TIMEOUT_S = 30.0  # a replica silent this long (its loop wedged) is treated as dead
_PROBE_BYTES = 16 << 20


@dataclass
class _Run:
    """One request across the replicas it runs on (more than one only if one dies)."""

    prompt_tokens: int
    budget: int  # outstanding tokens it books: prompt + max_tokens per sequence
    timing: RequestTiming
    last: RequestOutput | None = None  # the last output handed to the caller


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
                 on_step: Callable[[EngineStats], None] | None = None, metrics: ReplicaMetrics,
                 max_restarts: int = 3, restart_window_s: float = 300.0) -> None:
        self.config, self.size, self.threads = config, size, threads
        self.routing, self.overload_tokens = routing, overload_tokens
        self.max_queued = max_queued_requests
        self.on_finish = on_finish or (lambda f: None)
        self.on_step = on_step or (lambda s: None)
        self.metrics = metrics
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        gpus = cluster.gpus_per_replica(config)  # one GPU each on CUDA (Ray pins its device)
        self.config = cluster.replica_config(config)
        self._actor_class = ray.remote(EngineReplica).options(num_cpus=threads, num_gpus=gpus, max_restarts=0)
        self.slots = [_Slot(i) for i in range(size)]
        self.router: PrefixRouter | None = None
        self.keys: BlockKeys | None = None
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
        self.keys = BlockKeys(self.info["model_key"], self.info["block_size"], self.info["caching"],
                              self.info["split_formats"])
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
        self.on_step(combined([s.stats for s in live], self._retired))
        for s in live:
            self._observe(s)

    def _observe(self, slot: _Slot) -> None:
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
        add_totals(self._retired, slot.stats)
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
        return load_of(s.step_s, s.idle_step_s, s.prefill_s_per_token, s.running, s.backlog_tokens)

    def cancel_all(self, message: str) -> None:
        for s in self.slots:
            if s.live:
                s.actor.cancel_all.remote(message)

    # ---- requests -----------------------------------------------------------------------
    async def generate(self, request_id: str, ids: list[int], params: SamplingParams, priority: int = 0,
                       cache_salt: str | None = None, session_id: str | None = None, tenant: str = "default",
                       lora: object | None = None) -> AsyncIterator[RequestOutput]:
        """Route a validated request to a replica and yield its outputs (see the module doc
        for what happens when that replica dies)."""
        if lora is not None:
            raise EngineDeadError("LoRA adapters are not served over replicas")
        self.check_admission()
        hashes = self.keys.of_prompt(ids, cache_salt)
        per_seq = params.max_tokens if params.max_tokens is not None else self.info["max_model_len"] - len(ids)
        run = _Run(len(ids), len(ids) + per_seq * params.num_sequences, RequestTiming(time.perf_counter()))
        self._inflight += 1
        tried: set[int] = set()
        try:
            while True:
                slot, actor = await self._route(hashes, session_id, run.budget, frozenset(tried))
                try:
                    # aclosing: a caller that leaves closes the replica's stream now (its abort), not at collection
                    async with contextlib.aclosing(self._follow(slot, run, request_id, ids, params, priority,
                                                                cache_salt, session_id, tenant)) as outs:
                        async for out in outs:
                            yield out
                    return
                except RayActorError:
                    self._lose(slot, "it died while serving", actor)
                    if run.last is not None:  # the caller has part of it: it cannot run again unseen
                        self.metrics.lost(slot.index)
                        raise ReplicaLostError(f"replica {slot.index} died") from None
                    self.metrics.requeued(slot.index)
                    tried.add(slot.index)
        finally:
            self._inflight -= 1
            run.timing.finished = time.perf_counter()
            finished = run.last is not None and run.last.finished
            self.on_finish(FinishedRequest(request_id, len(ids), run.last if finished else None, run.timing,
                                           aborted=not finished, tenant=tenant))

    async def _route(self, hashes: list[bytes], session_id: str | None, budget: int,
                     tried: frozenset[int]) -> tuple[_Slot, object]:
        """Choose a replica (not one the request was lost on), book the request there, and pull
        a longer cached prefix into it when that pays; (its slot, its actor now)."""
        try:
            decision = self.router.choose(hashes, session_id, tried)
        except ValueError:
            raise ReplicaLostError("no replica is serving; replacements are starting") from None
        slot = self.slots[decision.replica]
        self.router.routed(slot.index, hashes, budget, session_id)
        self.metrics.routed(slot.index, decision.reason)
        if decision.holder is not None:
            await self._pull(decision, hashes)
        return slot, slot.actor

    async def _follow(self, slot: _Slot, run: _Run, request_id: str, ids: list[int], params: SamplingParams,
                      priority: int, cache_salt: str | None, *args) -> AsyncIterator[RequestOutput]:
        """The request's outputs from `slot`, keeping its timing and the replica's outstanding
        tokens (whatever is left of its budget is released when this ends, however it ends)."""
        done = 0
        stream = self._stream(slot, request_id, ids, params, priority, cache_salt, *args)
        try:
            async for out in stream:
                new = sum(len(c.delta_token_ids) for c in out.outputs)
                if new and run.timing.first_token is None:
                    run.timing.first_token = time.perf_counter()
                run.timing.num_output_tokens += new
                step = new + (run.prompt_tokens if done == 0 else 0)  # the first output: the prompt is done
                done += step
                self.router.progressed(slot.index, step)
                run.last = out
                yield out
                if out.finished:
                    if len(out.outputs) == 1:  # its output's full blocks are cached there too
                        self.router.record(slot.index, self.keys.of_output(ids, out.outputs[0].token_ids, cache_salt))
                    return
        finally:
            await stream.aclose()
            self.router.progressed(slot.index, run.budget - done)

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

    async def _pull(self, d: Decision, hashes: list[bytes]) -> None:
        """Bring the holder's longer prefix into the chosen replica when that beats prefill."""
        blocks = d.holder_matched - d.matched
        nbytes = blocks * self.info["block_bytes"]
        target, holder = self.slots[d.replica], self.slots[d.holder]
        prefill = target.stats.prefill_s_per_token
        if not self.transfer.worth_it(nbytes, blocks * self.info["block_size"], prefill):
            self.metrics.transfer(d.replica, "skipped")
            return
        t0 = time.perf_counter()
        try:
            pages = holder.actor.export_prefix.remote(hashes[:d.holder_matched])
            taken = await target.actor.import_prefix.remote(pages)
        except (RayActorError, RayTaskError) as e:
            log.warning("KV transfer %d -> %d failed: %s", d.holder, d.replica, _cause(e))
            self.metrics.transfer(d.replica, "failed")
            return
        moved = taken * self.info["block_bytes"]
        self.transfer.observe(moved, time.perf_counter() - t0)
        self.router.record(d.replica, hashes[:d.holder_matched])
        self.metrics.transfer(d.replica, "done", moved)


def _kill(actor) -> None:
    with contextlib.suppress(Exception):  # already gone
        ray.kill(actor, no_restart=True)


def _cause(e: BaseException) -> BaseException:
    """The exception a replica raised (Ray wraps it), or `e` itself."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e
