"""EmbeddingEngine: embedding requests from the event loop, batched on one worker thread.

The server's tier interface of an engine (health, load for routing, admission, drain),
for an encoder. Requests queue; the worker takes everything queued, up to a token
budget per forward pass, and answers each request with its own rows. Because the
encoder is batch-invariant, how requests happen to be grouped never changes a vector.
A failed forward fails the requests in it (the error reaches their callers) and the
worker goes on with the next batch: an encoder keeps no state a failure could corrupt.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tierlm.embed.encoder import Encoder
from tierlm.engine.async_engine import EngineDeadError, QueueFullError, ShuttingDownError
from tierlm.engine.load import LoadTracker
from tierlm.tenancy.routing import TierLoad


@dataclass
class EmbedStats:
    """What metrics read after each batch."""

    running: int = 0  # requests in the batch just run
    waiting: int = 0  # requests queued behind it
    step_s: float = 0.0
    prefill_s_per_token: float = 0.0


@dataclass
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    inputs: list[list[int]]
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(len(i) for i in self.inputs)

    def resolve(self, value) -> None:
        def set_once() -> None:
            if self.future.done():  # the caller went away (cancelled)
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        self.loop.call_soon_threadsafe(set_once)


class EmbeddingEngine:
    """Batches embedding requests for one `Encoder` (built by `factory` on `start`)."""

    restarting = False  # nothing to rebuild: a failed batch fails only its requests

    def __init__(self, factory: Callable[[], Encoder], *, max_queued_requests: int = 1024,
                 max_batch_tokens: int = 8192, on_step: Callable[[EmbedStats], None] | None = None) -> None:
        self._factory = factory
        self.max_queued, self.max_batch_tokens = max_queued_requests, max_batch_tokens
        self.on_step = on_step
        self.encoder: Encoder | None = None
        self.error: str | None = None
        self.load = LoadTracker()
        self.stats = EmbedStats()
        self._queue: deque[_Job] = deque()
        self._lock = threading.Condition()
        self._stop = False
        self._inflight = 0
        self._backlog_tokens = 0
        self._thread = threading.Thread(target=self._run, name="tierlm-embed", daemon=True)

    # ---- tier interface (event loop) ------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_inflight(self) -> int:
        return self._inflight

    def start(self) -> Encoder:
        """Load the encoder (errors raised here) and start the worker."""
        self.encoder = self._factory()
        self._thread.start()
        return self.encoder

    def current_load(self) -> TierLoad:
        with self._lock:
            running, backlog = self._inflight, self._backlog_tokens
        return self.load.load(running, backlog)

    def check_admission(self, count: int = 1) -> None:
        if not self.healthy:
            raise EngineDeadError(self.error or "the embedding engine is not running")
        if len(self._queue) + count > self.max_queued:
            raise QueueFullError(f"{len(self._queue)} requests are queued; the limit is {self.max_queued}")

    async def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """Vectors [len(inputs), dimensions] of checked inputs; cancelled callers' work is dropped
        if it has not started."""
        self.check_admission()
        loop = asyncio.get_running_loop()
        job = _Job(loop, loop.create_future(), inputs)
        with self._lock:
            self._inflight += 1
            self._backlog_tokens += job.tokens
            self._queue.append(job)
            self._lock.notify()
        try:
            return await job.future
        finally:
            with self._lock:
                self._inflight -= 1

    def cancel_all(self, message: str) -> None:
        """Fail every queued request with ShuttingDownError(message)."""
        with self._lock:
            jobs = list(self._queue)
            self._queue.clear()
            self._backlog_tokens -= sum(job.tokens for job in jobs)  # a running batch's are its own
        for job in jobs:
            job.resolve(ShuttingDownError(message))

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    # ---- worker thread ------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """Queued jobs up to the token budget (at least one), or None to stop."""
        with self._lock:
            while not self._queue and not self._stop:
                self._lock.wait()
            if self._stop:
                return None
            batch, tokens = [], 0
            while self._queue and (not batch or tokens + self._queue[0].tokens <= self.max_batch_tokens):
                job = self._queue.popleft()
                if job.future.done():  # cancelled while queued
                    self._backlog_tokens -= job.tokens
                    continue
                batch.append(job)
                tokens += job.tokens
            return batch

    def _run(self) -> None:
        try:
            while (batch := self._take()) is not None:
                if batch:
                    self._step(batch)
        except BaseException as e:  # noqa: BLE001 - an engine fault: reported through `healthy`
            self.error = f"{type(e).__name__}: {e}"
            self.cancel_all(f"the embedding engine failed: {self.error}")

    def _step(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        inputs = [ids for job in batch for ids in job.inputs]
        tokens = sum(job.tokens for job in batch)
        try:
            vectors = self.encoder.embed(inputs, self.max_batch_tokens)
        except Exception as e:  # noqa: BLE001 - handed to each request in the batch
            for job in batch:
                job.resolve(e)
            vectors = None
        seconds = time.perf_counter() - t0
        with self._lock:
            self._backlog_tokens -= tokens
            waiting = len(self._queue)
        if vectors is not None:
            start = 0
            for job in batch:
                job.resolve(vectors[start:start + len(job.inputs)])
                start += len(job.inputs)
        # An embedding pass is all prompt: it prices prompt tokens like a prefill step.
        self.load.observe(seconds, tokens, len(batch))
        self.stats = EmbedStats(len(batch), waiting, self.load.step_s, self.load.prefill_s_per_token)
        if self.on_step is not None:
            self.on_step(self.stats)
