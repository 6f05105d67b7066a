"""`tierlm serve`: load the TierSet's models, bind, serve with uvicorn, warm up, drain on SIGTERM.

Each tier runs its own engine thread. Under a tenant config the engines schedule with
the "fair" policy and the tenants' weights. Warm-up runs one request per tier before
the server reports ready; it also seeds each tier's step-time measurements.

Startup failures (bad model, port in use) raise user errors the CLI turns into one
line and a non-zero exit. SIGTERM/SIGINT flips readiness to 503, refuses new requests,
lets in-flight ones finish for up to `shutdown_timeout` seconds, then exits 0; a second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass

import uvicorn

from tierlm.config import EngineConfig, TierConfig, TierSetConfig
from tierlm.engine.async_engine import AsyncEngine, FinishedRequest
from tierlm.engine.llm_engine import LLMEngine
from tierlm.sampling_params import SamplingParams
from tierlm.server.app import create_app
from tierlm.server.common import ServerState, Tier
from tierlm.server.metrics import Metrics
from tierlm.tenancy.tenants import Tenants

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
    tierset: TierSetConfig | None = None  # --config: tiers and tenants (else one tier, api_keys)


def _log_request(tier: str, f: FinishedRequest) -> None:
    t = f.timing
    line = {"event": "request", "id": f.request_id, "tier": tier, "tenant": f.tenant, "prompt_tokens": f.prompt_tokens,
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
        log.info("draining: %d requests in flight", self.state.num_inflight)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: self._spawn(self._drain()))

    def _spawn(self, coro) -> None:
        task = asyncio.get_event_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm_up(self) -> None:
        for tier in self.state.tiers.values():  # one at a time: each measures its own step times
            ids = tier.tokenizer.encode(" ".join(["Hello, world."] * 16))[:64]
            async for _ in tier.engine.generate(f"warmup-{tier.model_name}", ids,
                                                SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
                pass
            tier.recent_outputs.clear()
        self.state.ready = True
        host, port = self.config.host, self.config.port
        names = ", ".join(self.state.tiers)
        print(f"tierlm: serving {names} on http://{host}:{port} (ready)", file=sys.stderr, flush=True)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.num_inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def tierset_for(config: EngineConfig, opts: ServeOptions) -> tuple[TierSetConfig, Tenants]:
    """The tiers and tenants to serve: the config file's (a file without tenants serves
    everyone as one open tenant), or one tier named after the model with one tenant (open,
    or behind --api-key)."""
    if opts.tierset is not None:
        ts = opts.tierset
        weights = tuple((t.name, t.weight) for t in ts.tenants)
        tiers = tuple(dataclasses.replace(t, engine=dataclasses.replace(
            t.engine, scheduler=dataclasses.replace(t.engine.scheduler, policy="fair", tenant_weights=weights)))
            for t in ts.tiers)
        return dataclasses.replace(ts, tiers=tiers), Tenants(ts.tenants) if ts.tenants else Tenants.open()
    name = opts.served_model_name or config.model
    tenants = Tenants.with_keys(opts.api_keys) if opts.api_keys else Tenants.open()
    return TierSetConfig((TierConfig(name, config),), tuple(t.config for t in tenants.all.values()), name), tenants


def serve(config: EngineConfig, opts: ServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    tierset, tenants = tierset_for(config, opts)
    sock = _bind(opts.host, opts.port)  # before loading: a busy port fails in milliseconds
    metrics = Metrics([t.name for t in tierset.tiers])
    tiers: dict[str, Tier] = {}
    try:
        for tc in tierset.tiers:
            tiers[tc.name] = _start_tier(tc, metrics, opts)
    except BaseException:
        for t in tiers.values():
            t.engine.shutdown()
        sock.close()
        raise
    state = ServerState(tiers, tenants, tierset.default_tier, metrics)
    app = create_app(state, metrics)
    uv_config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                               timeout_graceful_shutdown=2, lifespan="off")
    server = _Server(uv_config, state, opts.shutdown_timeout)
    try:
        server.run(sockets=[sock])
    finally:
        for t in tiers.values():
            t.engine.shutdown()
        sock.close()


def _start_tier(tc: TierConfig, metrics: Metrics, opts: ServeOptions) -> Tier:
    tm = metrics.for_tier(tc.name)

    def on_finish(f: FinishedRequest) -> None:
        tm.on_finish(f)
        _log_request(tc.name, f)

    engine = AsyncEngine(lambda: LLMEngine(tc.engine, progress=sys.stderr.isatty()),
                         max_queued_requests=opts.max_queued_requests, on_finish=on_finish, on_step=tm.on_step)
    llm = engine.start()
    return Tier(tc, engine, llm.tokenizer, llm.max_model_len, llm.model_config.vocab_size, tm)
