"""`tierlm serve`: load the TierSet's models, bind, serve with uvicorn, warm up, drain on SIGTERM.

Each tier runs its own engine thread, or with --data-parallel-size N (or --ray-address)
N engine replicas as Ray actors behind the same front end (tierlm/scale). Under a tenant config the engines schedule with
the "fair" policy and the tenants' weights unless `--scheduling-policy` says
otherwise. Warm-up runs one request per tier before
the server reports ready; it also seeds each tier's step-time measurements.

Startup failures (bad model, port in use) raise user errors the CLI turns into one
line and a non-zero exit. SIGTERM/SIGINT flips readiness to 503, refuses new requests,
lets in-flight ones finish for up to `shutdown_timeout` seconds, then exits 0; a second
signal exits at once. An engine that dies for good (it rebuilds itself after a failed
step, up to a limit) makes the server exit non-zero, for a supervisor to restart it.

Connections are bounded: a request head must arrive within `header_timeout` seconds of
the connection opening (or of the previous response plus the keep-alive time), a body
within `body_timeout` seconds (the app's guard), idle keep-alive connections close after
`keep_alive_timeout`, and past `max_connections` new requests get 503.
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
from uvicorn.protocols.http.h11_impl import H11Protocol

from tierlm import kernels
from tierlm.config import EngineConfig, TierConfig, TierSetConfig
from tierlm.embed.builder import build_embedder, task_of
from tierlm.embed.engine import EmbeddingEngine
from tierlm.engine.async_engine import AsyncEngine, FinishedRequest
from tierlm.engine.builder import build_engine, default_cache_dir
from tierlm.sampling_params import SamplingParams
from tierlm.server.app import create_app
from tierlm.server.metrics import Metrics
from tierlm.server.state import ServerState, Tier
from tierlm.tenancy.tenants import Tenants

log = logging.getLogger("tierlm.server")
request_log = logging.getLogger("tierlm.requests")


class StartupError(RuntimeError):
    """The server cannot start (message is shown as one line)."""


class EngineFailed(StartupError):
    """An engine died for good while serving: the server exits non-zero (one line)."""


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    metrics_api_keys: tuple[str, ...] = ()  # read all of /metrics (every tenant's series), nothing else
    scheduling_policy: str | None = None  # --scheduling-policy; None: fair with a file's tenants, else fcfs
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0
    served_model_name: str | None = None
    tierset: TierSetConfig | None = None  # --config: tiers and tenants (else one tier, api_keys)
    keep_alive_timeout: float = 5.0  # idle seconds before a kept-alive connection is closed
    header_timeout: float = 10.0  # seconds for a request head to arrive
    body_timeout: float = 30.0  # seconds for a request body to arrive
    max_connections: int = 1024  # open connections (and in-flight requests) before 503
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter, /v1/unload_lora_adapter
    reasoning_parser: str | None = None  # --reasoning-parser (one tier; a --config gives it per tier)
    grpc_port: int | None = None  # --grpc-port: the gRPC services beside HTTP (tierlm/rpc)
    # Data-parallel replicas (tierlm/scale): per generation tier, on Ray.
    data_parallel_size: int = 1
    ray_address: str | None = None  # an existing cluster; None: a local instance when replicas are asked for
    replica_threads: int | None = None  # None: cores / data_parallel_size
    dp_routing: str = "prefix"
    dp_overload_tokens: int = 2048

    @property
    def replicated(self) -> bool:
        return self.data_parallel_size > 1 or self.ray_address is not None

    def __post_init__(self) -> None:
        for name in ("keep_alive_timeout", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise StartupError(f"--{name.replace('_', '-')} must be > 0")
        if self.max_connections < 1:
            raise StartupError("--max-connections must be >= 1")
        if self.grpc_port is not None and not (1 <= self.grpc_port <= 65535 and self.grpc_port != self.port):
            raise StartupError("--grpc-port must be a port in [1, 65535] other than --port")
        if self.data_parallel_size < 1:
            raise StartupError("--data-parallel-size must be >= 1")
        if self.replica_threads is not None and self.replica_threads < 1:
            raise StartupError("--replica-threads must be >= 1")
        if self.dp_overload_tokens < 0:
            raise StartupError("--dp-overload-tokens must be >= 0")


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


def _timed_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing connections whose request head is late
    (uvicorn only times out idle keep-alive connections, not silent or trickling ones)."""

    class TimedH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm(header_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self._head_timer.cancel()  # the head has arrived; the guard times the body
                self._head_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is None or self.cycle.response_complete:  # waiting for the next head
                self._arm(self.timeout_keep_alive + header_timeout)

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm(self, seconds: float) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._late)

        def _late(self) -> None:
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return TimedH11


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float,
                 grpc_port: int | None = None) -> None:
        super().__init__(config)
        self.state, self.drain_timeout, self.grpc_port = state, drain_timeout, grpc_port
        self._tasks: set[asyncio.Task] = set()
        self.failure: str | None = None  # why an engine died, when it made the server exit
        self.grpc_error: str | None = None  # the gRPC port could not be bound after all
        self._grpc = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.grpc_port is not None:
            from tierlm.rpc import server as rpc  # grpcio only when asked for

            try:
                self._grpc = await rpc.start(self.state, self.config.host, self.grpc_port,
                                             self.config.limit_concurrency)
            except rpc.BindError as e:
                self.grpc_error = str(e)
                self.should_exit = True
                return
        self._spawn(self._warm_up())
        self._spawn(self._watch_engines())
        for tier in self.state.tiers.values():
            if hasattr(tier.engine, "supervise"):  # replicas: liveness and stats polling
                self._spawn(tier.engine.supervise())

    async def shutdown(self, sockets=None) -> None:
        if self._grpc is not None:  # in-flight calls ended with the drain; stop the rest
            await self._grpc.stop(grace=1)
        await super().shutdown(sockets=sockets)

    async def _watch_engines(self) -> None:
        """Exit (non-zero, see serve) once an engine is dead for good: answering 5xx to
        everyone is worse than a restart by the supervisor."""
        while not self.should_exit:
            if not self.state.healthy:
                self.failure = "; ".join(f"{t.model_name}: {t.engine.error or 'the engine stopped'}"
                                         for t in self.state.tiers.values() if not t.engine.healthy)
                log.error("engine failed, exiting: %s", self.failure)
                self.should_exit = True
                return
            await asyncio.sleep(0.25)

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
            if tier.task == "embed":
                await tier.engine.embed([tier.embedder.encode("Hello, world. " * 8)])
                continue
            ids = tier.tokenizer.encode(" ".join(["Hello, world."] * 16))[:64]
            async for _ in tier.engine.generate(f"warmup-{tier.model_name}", ids,
                                                SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
                pass
            tier.recent_outputs.clear()
        self.state.ready = True
        host, port = self.config.host, self.config.port
        names = ", ".join(self.state.tiers)
        grpc = f" and grpc://{host}:{self.grpc_port}" if self.grpc_port is not None else ""
        print(f"tierlm: serving {names} on http://{host}:{port}{grpc} (ready)", file=sys.stderr, flush=True)

    async def _drain(self) -> None:
        """In-flight requests finish until the drain timeout; those still running then end
        with a 503 `shutting_down` (an error event on a stream), never a cut connection."""
        deadline = time.monotonic() + self.drain_timeout
        while self.state.num_inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.num_inflight > 0:
            log.warning("drain timeout (%.0f s): ending %d requests in flight", self.drain_timeout,
                        self.state.num_inflight)
            for tier in self.state.tiers.values():
                tier.engine.cancel_all(f"it did not finish within the drain timeout ({self.drain_timeout:g} s)")
            ended = time.monotonic() + 5
            while self.state.num_inflight > 0 and time.monotonic() < ended:
                await asyncio.sleep(0.05)
        self.should_exit = True


def tierset_for(config: EngineConfig, opts: ServeOptions) -> tuple[TierSetConfig, Tenants]:
    """The tiers and tenants to serve: the config file's (a file without tenants serves
    everyone as one open tenant), or one tier named after the model with one tenant (open,
    or behind --api-key)."""
    if opts.tierset is not None:
        ts = opts.tierset
        weights = tuple((t.name, t.weight) for t in ts.tenants)
        policy = opts.scheduling_policy or ("fair" if ts.tenants else "fcfs")
        tiers = tuple(dataclasses.replace(t, engine=dataclasses.replace(
            t.engine, scheduler=dataclasses.replace(t.engine.scheduler, policy=policy, tenant_weights=weights)))
            for t in ts.tiers)
        tenants = (Tenants(ts.tenants, metrics_keys=opts.metrics_api_keys) if ts.tenants
                   else Tenants.open(opts.metrics_api_keys))
        return dataclasses.replace(ts, tiers=tiers), tenants
    name = opts.served_model_name or config.model
    tenants = (Tenants.with_keys(opts.api_keys, opts.metrics_api_keys) if opts.api_keys
               else Tenants.open(opts.metrics_api_keys))
    return TierSetConfig((TierConfig(name, config, reasoning_parser=opts.reasoning_parser),), tenants.configs,
                         name), tenants


def serve(config: EngineConfig, opts: ServeOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    tierset, tenants = tierset_for(config, opts)
    sock = _bind(opts.host, opts.port)  # before loading: a busy port fails in milliseconds
    if opts.grpc_port is not None:
        _bind(opts.host, opts.grpc_port).close()  # the same for gRPC's (bound again once serving)
    metrics = Metrics([t.name for t in tierset.tiers if t.lora_base is None])  # engine series: one per engine
    if opts.replicated:
        _start_ray(tierset, opts)
    tiers: dict[str, Tier] = {}
    state = ServerState(tiers, tenants, tierset.default_tier, metrics, tierset.balanced_cost_weight,
                        allow_runtime_lora=opts.allow_runtime_lora,
                        declared_tenants=bool(opts.tierset is not None and opts.tierset.tenants))
    try:
        for tc in tierset.tiers:
            if tc.lora_base is None:
                tiers[tc.name] = _start_tier(tc, metrics, opts)
        _add_adapters(state, tierset)
    except BaseException:
        for t in tiers.values():
            t.engine.shutdown()
        sock.close()
        if opts.replicated:
            from tierlm.scale import cluster

            cluster.disconnect()
        raise
    log.info("scheduling policy: %s", ", ".join(sorted({t.engine.scheduler.policy for t in tierset.tiers})))
    app = create_app(state, metrics, body_timeout_s=opts.body_timeout)
    uv_config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=False,
                               timeout_graceful_shutdown=2, lifespan="off", http=_timed_protocol(opts.header_timeout),
                               timeout_keep_alive=opts.keep_alive_timeout, limit_concurrency=opts.max_connections)
    server = _Server(uv_config, state, opts.shutdown_timeout, opts.grpc_port)
    try:
        server.run(sockets=[sock])
    finally:
        for t in tiers.values():
            t.engine.shutdown()
        sock.close()
        if opts.replicated:
            from tierlm.scale import cluster

            cluster.disconnect()
    if server.grpc_error is not None:
        raise StartupError(server.grpc_error)
    if server.failure is not None:
        raise EngineFailed(f"the engine failed: {server.failure}")


def _add_adapters(state: ServerState, tierset: TierSetConfig) -> None:
    """Serve the adapters each engine loaded (--lora-modules) and the TierSet's adapter tiers."""
    for name, tier in list(state.tiers.items()):
        if tier.task == "embed" or tier.engine.engine is None:  # embedding tiers, replicas: no adapters
            continue
        registry = tier.engine.engine.adapters
        for adapter in registry.adapters.values() if registry is not None else ():
            if adapter.name in state.tiers:
                raise StartupError(f"LoRA adapter {adapter.name!r}: a tier has that name")
            state.add_adapter(name, adapter)
    for tc in tierset.tiers:
        if tc.lora_base is not None:
            adapter = state.tiers[tc.lora_base].engine.engine.adapters.add(tc.name, tc.lora_path)
            state.add_adapter(tc.lora_base, adapter, config=tc, routable=True)
    for name, tier in state.adapters.items():
        log.info("LoRA adapter %s (rank %d) over %s: %s", name, tier.lora.rank, tier.parent, tier.lora.path)


def _start_tier(tc: TierConfig, metrics: Metrics, opts: ServeOptions) -> Tier:
    tm = metrics.for_tier(tc.name)
    if task_of(tc.engine, default_cache_dir()) == "embed":
        embedding = EmbeddingEngine(lambda: build_embedder(tc.engine, progress=sys.stderr.isatty()),
                                    max_queued_requests=opts.max_queued_requests,
                                    max_batch_tokens=tc.engine.scheduler.max_num_batched_tokens,
                                    on_step=tm.on_embed_step)
        embedder = embedding.start()
        return Tier(tc, embedding, embedder.tokenizer, embedder.spec.max_input_tokens, embedder.vocab_size, tm,
                    task="embed", embedder=embedder)

    def on_finish(f: FinishedRequest) -> None:
        tm.on_finish(f)
        _log_request(tc.name, f)

    if opts.replicated:
        return _start_replicas(tc, tm, on_finish, opts)
    engine = AsyncEngine(lambda: build_engine(tc.engine, progress=sys.stderr.isatty()),
                         max_queued_requests=opts.max_queued_requests, on_finish=on_finish, on_step=tm.on_step)
    llm = engine.start()
    return Tier(tc, engine, llm.tokenizer, llm.max_model_len, llm.model_config.vocab_size, tm)


def _replica_threads(opts: ServeOptions) -> int:
    return opts.replica_threads or max(1, kernels.usable_cpus() // opts.data_parallel_size)


def _start_ray(tierset: TierSetConfig, opts: ServeOptions) -> None:
    """Connect to (or start) Ray for the replicas; LoRA is not served over replicas yet."""
    from tierlm.scale import cluster

    lora = [t.name for t in tierset.tiers if t.lora_base is not None or t.engine.lora.enabled]
    if lora:
        raise StartupError(f"LoRA adapters are not served over replicas (--data-parallel-size): {', '.join(lora)}")
    if any(t.engine.tensor_parallel_size > 1 for t in tierset.tiers):
        raise StartupError("replicas of a tensor-parallel model are not supported: use --data-parallel-size or "
                           "--tensor-parallel-size")
    cores = kernels.usable_cpus()
    gpus = opts.data_parallel_size * sum(cluster.gpus_per_replica(t.engine) for t in tierset.tiers)
    try:
        cluster.connect(opts.ray_address, max(cores, opts.data_parallel_size * _replica_threads(opts)))
        if gpus:
            import ray

            cluster.check_gpus(gpus, ray.cluster_resources().get("GPU", 0))
    except cluster.RayUnavailable as e:
        cluster.disconnect()
        raise StartupError(str(e)) from None


def _start_replicas(tc: TierConfig, tm, on_finish, opts: ServeOptions) -> Tier:
    from tierlm.scale.replica_set import ReplicaSet

    replicas = ReplicaSet(tc.engine, size=opts.data_parallel_size, threads=_replica_threads(opts),
                          routing=opts.dp_routing, overload_tokens=opts.dp_overload_tokens,
                          max_queued_requests=opts.max_queued_requests, on_finish=on_finish, on_step=tm.on_step,
                          metrics=tm.g.for_replicas(tc.name))
    info = replicas.start()
    log.info("%s: %d replicas x %d threads", tc.name, opts.data_parallel_size, replicas.threads)
    return Tier(tc, replicas, info["tokenizer"], info["max_model_len"], info["vocab_size"], tm)
