"""`tierlm serve`: load the model, bind, serve with uvicorn, warm up, drain on SIGTERM.

Startup failures (bad model, port in use) raise user errors the CLI turns into one
line and a non-zero exit. SIGTERM/SIGINT flips readiness to 503, refuses new requests,
lets in-flight ones finish for up to `shutdown_timeout` seconds, then exits 0; a second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass

import uvicorn

from tierlm.config import EngineConfig
from tierlm.engine.async_engine import AsyncEngine, FinishedRequest
from tierlm.engine.llm_engine import LLMEngine
from tierlm.sampling_params import SamplingParams
from tierlm.server.app import create_app
from tierlm.server.common import ServerState
from tierlm.server.metrics import Metrics

log = logging.getLogger("tierlm.server")
request_log = logging.getLogger("tierlm.requests")


class StartupError(RuntimeError):
    """The server cannot start (message is shown as one line)."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0
    served_model_name: str | None = None


def _log_request(f: FinishedRequest) -> None:
    t = f.timing
    line = {"event": "request", "id": f.request_id, "prompt_tokens": f.prompt_tokens,
            "completion_tokens": t.num_output_tokens,
            "ttft_s": round(t.first_token - t.arrival, 4) if t.first_token else None,
            "latency_s": round((t.finished or t.arrival) - t.arrival, 4),
            "finish_reason": "abort" if f.aborted else [c.finish_reason for c in f.output.outputs]}
    request_log.info(json.dumps(line))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self._tasks: set[asyncio.Task] = set()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self._spawn(self._warm_up())

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:  # second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self.state.draining = True
        log.info("draining: %d requests in flight", self.state.engine.num_inflight)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: self._spawn(self._drain()))

    def _spawn(self, coro) -> None:
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm_up(self) -> None:
        ids = self.state.tokenizer.encode("Hello")
        async for _ in self.state.engine.generate("warmup", ids, SamplingParams(max_tokens=2, temperature=0)):
            pass
        self.state.ready = True
        host, port = self.config.host, self.config.port
        print(f"tierlm: serving {self.state.model_name} on http://{host}:{port} (ready)", file=sys.stderr, flush=True)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.engine.num_inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def serve(config: EngineConfig, opts: ServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    sock = _bind(opts.host, opts.port)  # before loading: a busy port fails in milliseconds
    name = opts.served_model_name or config.model
    metrics = Metrics(name)

    def on_finish(f: FinishedRequest) -> None:
        metrics.on_finish(f)
        _log_request(f)

    async_engine = AsyncEngine(lambda: LLMEngine(config, progress=sys.stderr.isatty()),
                               max_queued_requests=opts.max_queued_requests,
                               on_finish=on_finish, on_step=metrics.on_step)
    try:
        engine = async_engine.start()
    except BaseException:
        sock.close()
        raise
    state = ServerState(async_engine, engine.tokenizer, name, engine.max_model_len,
                        engine.model_config.vocab_size)
    app = create_app(state, metrics, list(opts.api_keys))
    uv_config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                               timeout_graceful_shutdown=2, lifespan="off")
    server = _Server(uv_config, state, opts.shutdown_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        async_engine.shutdown()
        sock.close()
