"""AsyncEngine: the one place with threads. Runs LLMEngine.step() on a dedicated thread
and feeds each request's outputs to an asyncio queue on the caller's event loop.

The event loop never waits for a step: adds and aborts are commands on a thread-safe
queue that the engine thread applies between steps (so an abort takes effect within
one step), and outputs come back through `loop.call_soon_threadsafe`. Torch releases
the GIL inside its kernels, so HTTP handling proceeds while a step runs.

The engine is also built on that thread: torch keeps a thread pool per calling thread,
and loading on one thread then computing on another ran decode steps ~60% slower here
(two OpenMP teams on two cores).

A request whose own state fails inside a step ends alone (`RequestFailedError`; the
engine guards per-request work). If a whole step raises (a bug), every in-flight request
receives an `EngineDeadError` and the engine is rebuilt on its thread, as a supervisor
would restart it; more than `max_restarts` failures within `restart_window_s` leave it
dead (`healthy` False), and the server then exits non-zero for its supervisor. It never
stays up answering errors to everyone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from tierlm.engine.llm_engine import LLMEngine
from tierlm.engine.load import LoadTracker
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams
from tierlm.tenancy.routing import TierLoad

log = logging.getLogger("tierlm.engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed; the server is unhealthy."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; retry later."""


class EngineRestartingError(RuntimeError):
    """The engine failed and is being rebuilt; retry shortly."""


class ReplicaLostError(RuntimeError):
    """The replica running this request died after it had produced output; retry."""


class RequestFailedError(RuntimeError):
    """This request failed inside a step; the engine serves everyone else."""


class ShuttingDownError(RuntimeError):
    """The server stopped waiting for this request: its drain timeout passed."""


@dataclass
class RequestTiming:
    arrival: float
    first_token: float | None = None
    finished: float | None = None
    num_output_tokens: int = 0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    timing: RequestTiming
    prompt_len: int
    tenant: str
    lora: str | None = None  # the LoRA adapter's name


@dataclass
class EngineStats:
    """Snapshot taken by the engine thread after each step (read by /metrics)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    preemptions: int = 0
    moe_expert_tokens: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens per expert
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found there
    kv_evictions: int = 0  # cached blocks whose memory was reused
    kv_tiers: dict[str, dict[str, int]] = field(default_factory=dict)  # see LLMEngine.kv_tier_stats
    backlog_tokens: int = 0  # prompt tokens queued or part-way through prefill
    step_s: float = 0.0  # recent step time (engine/load.py)
    idle_step_s: float = 0.0
    prefill_s_per_token: float = 0.0
    spec_draft_tokens: int = 0  # speculative decoding: drafts proposed / accepted
    spec_accepted_tokens: int = 0
    # LoRA: adapter slots, the adapters of running and of waiting requests, slot loads so far
    max_lora: int = 0
    lora_running: tuple[str, ...] = ()
    lora_waiting: tuple[str, ...] = ()
    lora_loads: int = 0


@dataclass
class _Add:
    request_id: str
    ids: list[int]
    params: SamplingParams
    priority: int
    cache_salt: str | None = None
    session_id: str | None = None
    tenant: str = "default"
    lora: object | None = None  # a LoRA adapter (lora/adapter.py) or None for the base model


@dataclass
class _Abort:
    request_id: str


@dataclass
class _CancelAll:
    message: str


@dataclass
class _Call:
    """Run `fn(engine)` on the engine thread between steps; its result goes to `future`."""

    fn: Callable[[LLMEngine], object]
    future: asyncio.Future


@dataclass
class FinishedRequest:
    """Handed to `on_finish` once per request (for metrics and request logs)."""

    request_id: str
    prompt_tokens: int
    output: RequestOutput | None
    timing: RequestTiming
    aborted: bool = False
    tenant: str = "default"
    lora: str | None = None  # the LoRA adapter it ran with


class AsyncEngine:
    def __init__(self, engine_factory: Callable[[], LLMEngine], *, max_queued_requests: int = 1024,
                 on_finish: Callable[[FinishedRequest], None] | None = None,
                 on_step: Callable[[EngineStats], None] | None = None, max_restarts: int = 3,
                 restart_window_s: float = 300.0) -> None:
        self._factory = engine_factory
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.restarts: list[float] = []  # monotonic times of recent rebuilds
        self.restarting = False
        self.engine: LLMEngine | None = None
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self.max_queued = max_queued_requests
        self.on_finish = on_finish or (lambda f: None)
        self.on_step = on_step or (lambda s: None)
        self.stats = EngineStats()
        self.load = LoadTracker()  # step times, for tier selection (tenancy/routing.py)
        self.error: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._streams: dict[str, _Stream] = {}  # touched by the engine thread only
        self._inflight = 0  # requests accepted and not yet finished
        # Submitted but not yet in a snapshot (the engine thread takes them between steps):
        # counted at once so that a burst is priced by the requests that arrive with it.
        self._unseen_requests = 0
        self._unseen_tokens = 0
        self._count_lock = threading.Lock()  # these counters change on both threads
        self._thread = threading.Thread(target=self._run, name="tierlm-engine", daemon=True)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_inflight(self) -> int:
        return self._inflight

    def start(self) -> LLMEngine:
        """Start the engine thread, build the engine on it, and return it (load errors re-raised here)."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        return self.engine

    def cancel_all(self, message: str) -> None:
        """End every request in flight with `ShuttingDownError(message)` (thread-safe)."""
        self._commands.put((_CancelAll(message), None))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)  # the engine thread may be flushing KV to the cold tier

    # ---- caller side (event loop) -------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], object]) -> object:
        """`fn(engine)` run on the engine thread between two steps (engine state has one
        owner); its result, or its exception, here."""
        if not self.healthy:
            raise EngineDeadError(self.error or "the engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._commands.put((_Call(fn, future), None))
        self._wake.set()
        return await future

    def prepare(self, ids: list[int], params: SamplingParams) -> None:
        """Validate a request against the model without touching engine state (thread-safe):
        limits, and its output constraint (compiled here, once, so errors are a 400 up front)."""
        self.engine.validate(ids, params)
        if params.guided is not None:
            self.engine.check_guided(params)

    def current_load(self) -> TierLoad:
        """This tier's load for routing: the last step's snapshot plus what was submitted since."""
        stats = self.stats
        with self._count_lock:
            running, backlog = stats.running + self._unseen_requests, stats.backlog_tokens + self._unseen_tokens
        return self.load.load(running, backlog)

    def check_admission(self, count: int = 1) -> None:
        """Raise if `count` new requests would be refused now (engine down or queue full)."""
        if not self.healthy:
            raise EngineDeadError(self.error or "the engine is not running")
        if self.restarting:
            raise EngineRestartingError("the engine is restarting after a failure")
        queued = self._inflight - self.stats.running
        if queued + count > self.max_queued:
            raise QueueFullError(f"{queued} requests are queued; the limit is {self.max_queued}")

    async def generate(self, request_id: str, ids: list[int], params: SamplingParams,
                       priority: int = 0, cache_salt: str | None = None,
                       session_id: str | None = None, tenant: str = "default",
                       lora: object | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a validated request and yield its outputs (with the LoRA adapter `lora`, a
        LoRAAdapter, when given); aborts it if the caller goes away."""
        self.check_admission()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), RequestTiming(time.perf_counter()), len(ids), tenant,
                         getattr(lora, "name", None))
        with self._count_lock:
            self._inflight += 1
            self._unseen_requests += 1
            self._unseen_tokens += len(ids)
        self._commands.put((_Add(request_id, ids, params, priority, cache_salt, session_id, tenant, lora),
                            stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put((_Abort(request_id), None))
                self._wake.set()

    # ---- engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - handed to start() on the caller's thread
            self._load_error = e
            return
        finally:
            self._loaded.set()
        while not self._stop.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                started = time.perf_counter()
                outputs = self.engine.step()
                self.load.observe(time.perf_counter() - started, *self.engine.last_step_size)
            except Exception as e:
                log.exception("engine step failed")
                failure = f"engine step failed: {type(e).__name__}: {e}"
                self._fail_all(EngineDeadError(failure))
                if not self._restart(failure):
                    return
                continue
            self._snapshot()
            now = time.perf_counter()
            for out in outputs:
                self._deliver(out, now)
        self.engine.close()

    def _restart(self, failure: str) -> bool:
        """Rebuild the engine after a failed step; False (and dead) when that fails or
        failures repeat too often for a rebuild to help."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.restart_window_s]
        if len(self.restarts) >= self.max_restarts:
            self.error = f"{failure} ({len(self.restarts) + 1} failures within {self.restart_window_s:.0f} s)"
            return False
        self.restarting = True
        self.restarts.append(now)
        log.warning("rebuilding the engine (restart %d of at most %d in %.0f s)", len(self.restarts),
                    self.max_restarts, self.restart_window_s)
        try:
            self.engine.close()  # what it holds outside this process (tensor-parallel workers) first
        except Exception:  # it failed already; the rebuild is what matters
            log.exception("closing the failed engine")
        try:
            self.engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - a rebuild that fails leaves the engine dead
            self.error = f"{failure}; rebuilding the engine failed: {type(e).__name__}: {e}"
            return False
        finally:
            self.restarting = False
        self._snapshot()
        return True

    def _apply_commands(self) -> None:
        taken, taken_tokens = 0, 0
        while True:
            try:
                cmd, stream = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                taken, taken_tokens = taken + 1, taken_tokens + len(cmd.ids)
                try:
                    self.engine.add_request(cmd.request_id, {"prompt_token_ids": cmd.ids}, cmd.params, cmd.priority,
                                            cmd.cache_salt, cmd.session_id, cmd.tenant, cmd.lora)
                except Exception as e:  # noqa: BLE001 - validated already; report, never crash the loop
                    self._count(-1)
                    _put(stream, e)
                    continue
                self._streams[cmd.request_id] = stream
            elif isinstance(cmd, _Call):
                _settle(cmd.future, cmd.fn, self.engine)
            elif isinstance(cmd, _CancelAll):
                for request_id in list(self._streams):
                    self.engine.abort_request(request_id)
                    self._finish_aborted(request_id, time.perf_counter(), ShuttingDownError(cmd.message))
            elif cmd.request_id in self._streams:  # the caller went away: nobody to tell
                self.engine.abort_request(cmd.request_id)
                self._finish_aborted(cmd.request_id, time.perf_counter())
        self._snapshot()
        with self._count_lock:  # only now: the snapshot counts them (counted twice for a moment, never missed)
            self._unseen_requests -= taken
            self._unseen_tokens -= taken_tokens

    def _deliver(self, out: RequestOutput, now: float) -> None:
        stream = self._streams.get(out.request_id)
        if stream is None:
            return
        if out.error is not None:  # this request alone failed inside the step
            self._finish_aborted(out.request_id, now, RequestFailedError(out.error))
            return
        new = sum(len(c.delta_token_ids) for c in out.outputs)
        if new and stream.timing.first_token is None:
            stream.timing.first_token = now
        stream.timing.num_output_tokens += new
        if out.finished:
            del self._streams[out.request_id]
            self._count(-1)
            stream.timing.finished = now
            self.on_finish(FinishedRequest(out.request_id, stream.prompt_len, out, stream.timing,
                                           tenant=stream.tenant, lora=stream.lora))
        _put(stream, out)

    def _finish_aborted(self, request_id: str, now: float, error: BaseException | None = None) -> None:
        """Forget a request that ends without an output (counted as aborted) and hand its
        caller `error`, if there is a caller left to tell."""
        stream = self._streams.pop(request_id)
        self._count(-1)
        stream.timing.finished = now
        self.on_finish(FinishedRequest(request_id, stream.prompt_len, None, stream.timing, aborted=True,
                                       tenant=stream.tenant, lora=stream.lora))
        if error is not None:
            _put(stream, error)

    def _fail_all(self, err: BaseException) -> None:
        for stream in self._streams.values():
            _put(stream, err)
        self._count(-len(self._streams))
        self._streams.clear()

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self._inflight += delta

    def _snapshot(self) -> None:
        sched = self.engine.scheduler
        self.stats = EngineStats(running=len(sched.running), waiting=len(sched.waiting),
                                 kv_usage=self.engine.kv.usage, preemptions=sched.num_preemptions,
                                 moe_expert_tokens=self.engine.moe_expert_tokens(),
                                 prefix_queries=sched.prefix_queries, prefix_hits=sched.prefix_hits,
                                 kv_evictions=self.engine.kv.pool.num_evictions,
                                 kv_tiers=self.engine.kv_tier_stats(),
                                 backlog_tokens=sum(max(0, r.num_tokens - r.num_computed_tokens - 1)
                                                    for r in sched.requests.values()),
                                 step_s=self.load.step_s, idle_step_s=self.load.idle_step_s,
                                 prefill_s_per_token=self.load.prefill_s_per_token,
                                 spec_draft_tokens=sched.draft_tokens, spec_accepted_tokens=sched.accepted_tokens,
                                 **_lora_stats(sched))
        self.on_step(self.stats)


def _lora_stats(sched) -> dict:
    slots = sched.lora_slots
    if slots is None:
        return {}

    def names(reqs) -> tuple[str, ...]:
        return tuple(sorted({r.lora.name for r in reqs if r.lora is not None}))

    return {"max_lora": len(slots.held), "lora_running": names(sched.running), "lora_waiting": names(sched.waiting),
            "lora_loads": slots.loads_total}


def _settle(future: asyncio.Future, fn: Callable, engine: LLMEngine) -> None:
    """Run `fn(engine)` here (the engine thread) and resolve `future` on its own loop."""
    try:
        result, error = fn(engine), None
    except Exception as e:  # noqa: BLE001 - the caller's to handle
        result, error = None, e
    loop = future.get_loop()

    def resolve() -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _put(stream: _Stream, item) -> None:
    """Hand an output or error to the request's event loop (from the engine thread)."""
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the loop is closed (the server stopped): nobody is waiting any more
        pass
