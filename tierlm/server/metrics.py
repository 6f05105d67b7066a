"""Prometheus metrics. vLLM's names where one exists (dashboards keep working), tierlm's
own under `tierlm:`. Engine gauges are set from the engine thread's per-step snapshot.
Engine series carry `model_name` = the tier's name (the id clients send as `model`);
tier routing and tenants have their own families."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from tierlm.engine.async_engine import EngineStats, FinishedRequest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, model_names: list[str]) -> None:
        disable_created_metrics()  # no *_created series: vLLM dashboards do not use them
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch", lbl, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled", lbl, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)", lbl, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", lbl, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", lbl, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests", lbl + ["finished_reason"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", lbl,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first",
                              lbl, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", lbl,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.preemptions = Gauge("tierlm:num_preemptions", "Preemptions since start", lbl, registry=r)
        self.aborted = Counter("tierlm:requests_aborted", "Requests aborted (client went away)", lbl, registry=r)
        self.rejected = Counter("tierlm:requests_rejected", "Requests refused before admission", lbl + ["reason"],
                                registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      lbl, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", lbl,
                                   registry=r)
        self.kv_evictions = Counter("tierlm:kv_cache_evictions", "Cached KV blocks evicted for reuse", lbl,
                                    registry=r)
        # Speculative decoding: acceptance rate = accepted / draft.
        self.spec_draft = Counter("tierlm:spec_draft_tokens", "Speculative draft tokens proposed", lbl, registry=r)
        self.spec_accepted = Counter("tierlm:spec_accepted_tokens", "Speculative draft tokens accepted", lbl,
                                     registry=r)
        for counter in (self.prefix_queries, self.prefix_hits, self.kv_evictions, self.spec_draft,
                        self.spec_accepted):  # exported from the start, at 0
            for name in model_names:
                counter.labels(name)
        self.tier_hits = Counter("tierlm:prefix_cache_block_hits", "Cached KV blocks reused, by the tier found in",
                                 lbl + ["tier"], registry=r)
        self.tier_moved = Counter("tierlm:kv_tier_bytes_moved", "KV bytes copied between tiers", lbl + ["direction"],
                                  registry=r)
        self.tier_usage = Gauge("tierlm:kv_tier_usage_bytes", "KV bytes held per tier", lbl + ["tier"], registry=r)
        self.moe_tokens = Counter("tierlm:moe_expert_tokens", "Tokens routed to each expert of each MoE layer",
                                  lbl + ["layer", "expert"], registry=r)
        self.step_s = Gauge("tierlm:step_seconds", "Recent engine step time (moving average)", lbl, registry=r)
        self.idle_step_s = Gauge("tierlm:idle_step_seconds", "Step time of one request decoding alone", lbl,
                                 registry=r)
        self.prefill_s = Gauge("tierlm:prefill_seconds_per_token", "Step time per token of prefill-sized steps",
                               lbl, registry=r)
        self.healthy = Gauge("tierlm:engine_healthy", "1 while the engine thread is healthy", lbl, registry=r)
        for name in model_names:
            self.healthy.labels(name).set(1)
        self.grpc_requests = Counter("tierlm:grpc_requests", "gRPC calls finished, by method and status code",
                                     ["method", "code"], registry=r)
        self.tier_selected = Counter("tierlm:tier_selected", "Requests routed to each tier, by why that tier "
                                     "(explicit, fixed, preferred, latency, cost)", ["tier", "reason"], registry=r)
        self.embedding_inputs = Counter("tierlm:embedding_inputs", "Inputs embedded (/v1/embeddings)", lbl,
                                        registry=r)
        self.tenant_tokens = Counter("tierlm:tenant_tokens", "Tokens served per tenant", ["tenant", "kind"],
                                     registry=r)
        self.tenant_rejected = Counter("tierlm:tenant_requests_rejected", "Requests refused per tenant",
                                       ["tenant", "reason"], registry=r)

        # LoRA, as vLLM exports it: one series per model whose labels name the adapters of
        # running and waiting requests (value: when it was last set); per adapter totals.
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on LoRA requests",
                               ["model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                               registry=r)
        self.lora_loads = Counter("tierlm:lora_slot_loads", "LoRA adapters loaded into a slot", lbl, registry=r)
        self.lora_requests = Counter("tierlm:lora_requests", "Finished requests per LoRA adapter",
                                     lbl + ["lora_name"], registry=r)
        self.lora_tokens = Counter("tierlm:lora_tokens", "Tokens served per LoRA adapter",
                                   lbl + ["lora_name", "kind"], registry=r)

        # Data-parallel replicas (tierlm/scale): per replica, and the router's decisions.
        rl = lbl + ["replica"]
        self.replica_up = Gauge("tierlm:replica_up", "1 while the replica serves", rl, registry=r)
        self.replica_running = Gauge("tierlm:replica_requests_running", "Requests running on the replica", rl,
                                     registry=r)
        self.replica_waiting = Gauge("tierlm:replica_requests_waiting", "Requests waiting on the replica", rl,
                                     registry=r)
        self.replica_kv_usage = Gauge("tierlm:replica_kv_cache_usage_perc", "Fraction of the replica's KV "
                                      "blocks in use (0-1)", rl, registry=r)
        self.replica_outstanding = Gauge("tierlm:replica_outstanding_tokens", "Prompt + max_tokens of the "
                                         "requests routed to the replica and not finished", rl, registry=r)
        self.replica_routed = Counter("tierlm:replica_routed", "Requests routed to each replica, by why "
                                      "(session, prefix, balance, round_robin)", rl + ["reason"], registry=r)
        self.replica_prefix_hits = Counter("tierlm:replica_prefix_cache_hits", "Prompt tokens found in the "
                                           "replica's prefix cache", rl, registry=r)
        self.replica_transfers = Counter("tierlm:replica_kv_transfers", "KV prefix pulls into the replica, by "
                                         "outcome (done, skipped: prefill faster, failed)", rl + ["outcome"],
                                         registry=r)
        self.replica_transfer_bytes = Counter("tierlm:replica_kv_transfer_bytes", "KV bytes pulled into the "
                                              "replica from others", rl, registry=r)
        self.replica_restarts = Counter("tierlm:replica_restarts", "Replacements started after the replica "
                                        "died", rl, registry=r)
        self.replica_requeued = Counter("tierlm:replica_requests_requeued", "Requests sent again elsewhere: "
                                        "their replica died before they produced output", rl, registry=r)
        self.replica_lost = Counter("tierlm:replica_requests_lost", "Requests ended with an error: their "
                                    "replica died while they streamed", rl, registry=r)

    def for_tier(self, name: str) -> TierMetrics:
        return TierMetrics(self, name)

    def for_replicas(self, name: str) -> ReplicaMetrics:
        return ReplicaMetrics(self, name)

    def render(self, tenant: str | None = None) -> bytes:
        """The exposition; with `tenant`, samples labelled with another tenant are left out."""
        if tenant is None:
            return generate_latest(self.registry)
        return generate_latest(_OneTenant(self.registry, tenant))


class ReplicaMetrics:
    """One tier's replicas (tierlm/scale/replica_set.py): series labelled with the tier and
    the replica's index (a replacement keeps its slot's index)."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.g, self.m = metrics, name
        self._hits: dict[str, float] = {}  # engine running totals counted, per replica (0 again on replacement)

    def up(self, replica: int, live: bool) -> None:
        self.g.replica_up.labels(self.m, str(replica)).set(1 if live else 0)
        if not live:
            self._hits[str(replica)] = 0

    def observe(self, replica: int, s: EngineStats, outstanding: int) -> None:
        r = str(replica)
        self.g.replica_running.labels(self.m, r).set(s.running)
        self.g.replica_waiting.labels(self.m, r).set(s.waiting)
        self.g.replica_kv_usage.labels(self.m, r).set(s.kv_usage)
        self.g.replica_outstanding.labels(self.m, r).set(outstanding)
        _advance(self._hits, r, self.g.replica_prefix_hits.labels(self.m, r), s.prefix_hits)

    def routed(self, replica: int, reason: str) -> None:
        self.g.replica_routed.labels(self.m, str(replica), reason).inc()

    def transfer(self, replica: int, outcome: str, nbytes: int = 0) -> None:
        self.g.replica_transfers.labels(self.m, str(replica), outcome).inc()
        self.g.replica_transfer_bytes.labels(self.m, str(replica)).inc(nbytes)

    def restarted(self, replica: int) -> None:
        self.g.replica_restarts.labels(self.m, str(replica)).inc()

    def requeued(self, replica: int) -> None:
        self.g.replica_requeued.labels(self.m, str(replica)).inc()

    def lost(self, replica: int) -> None:
        self.g.replica_lost.labels(self.m, str(replica)).inc()


class _OneTenant:
    """A registry view whose tenant-labelled samples are only `tenant`'s."""

    def __init__(self, registry: CollectorRegistry, tenant: str) -> None:
        self.registry, self.tenant = registry, tenant

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if s.labels.get("tenant", self.tenant) == self.tenant]
            yield family


class TierMetrics:
    """One tier's view: its engine's callbacks, labelled with the tier's name."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.g, self.m = metrics, name
        # Engine running totals already counted, per (counter, labels): counters advance by the difference.
        self._seen: dict[tuple, float] = {}
        self._lora_labels: tuple[str, ...] | None = None  # the lora_info series now shown

    def on_step(self, s: EngineStats) -> None:
        self.g.running.labels(self.m).set(s.running)
        self.g.waiting.labels(self.m).set(s.waiting)
        self.g.kv_usage.labels(self.m).set(s.kv_usage)
        self.g.preemptions.labels(self.m).set(s.preemptions)
        self.g.step_s.labels(self.m).set(s.step_s)
        self.g.idle_step_s.labels(self.m).set(s.idle_step_s)
        self.g.prefill_s.labels(self.m).set(s.prefill_s_per_token)
        self._follow(self.g.prefix_queries, (), s.prefix_queries)
        self._follow(self.g.prefix_hits, (), s.prefix_hits)
        self._follow(self.g.kv_evictions, (), s.kv_evictions)
        self._follow(self.g.spec_draft, (), s.spec_draft_tokens)
        self._follow(self.g.spec_accepted, (), s.spec_accepted_tokens)
        for tier, total in s.kv_tiers.get("hits", {}).items():
            self._follow(self.g.tier_hits, (tier,), total)
        for direction, total in s.kv_tiers.get("moved", {}).items():
            self._follow(self.g.tier_moved, (direction,), total)
        for tier, held in s.kv_tiers.get("usage", {}).items():
            self.g.tier_usage.labels(self.m, tier).set(held)
        if s.max_lora:
            labels = (self.m, str(s.max_lora), ",".join(s.lora_running), ",".join(s.lora_waiting))
            if labels != self._lora_labels:
                if self._lora_labels is not None:
                    self.g.lora_info.remove(*self._lora_labels)
                self._lora_labels = labels
                self.g.lora_info.labels(*labels).set(time.time())
            self._follow(self.g.lora_loads, (), s.lora_loads)
        for layer, counts in s.moe_expert_tokens.items():
            for expert, total in enumerate(counts):
                self._follow(self.g.moe_tokens, (str(layer), str(expert)), total)

    def _follow(self, counter: Counter, labels: tuple[str, ...], total: float) -> None:
        _advance(self._seen, (counter, labels), counter.labels(self.m, *labels), total)

    def on_embed(self, tenant: str, prompt_tokens: int, inputs: int) -> None:
        """An embeddings request served (its input tokens are prompt tokens)."""
        self.g.tenant_tokens.labels(tenant, "prompt").inc(prompt_tokens)
        self.g.prompt_tokens.labels(self.m).inc(prompt_tokens)
        self.g.embedding_inputs.labels(self.m).inc(inputs)

    def on_embed_step(self, s) -> None:
        """An embedding engine's batch: its requests and what waits, and its step time."""
        self.g.running.labels(self.m).set(s.running)
        self.g.waiting.labels(self.m).set(s.waiting)
        self.g.step_s.labels(self.m).set(s.step_s)
        self.g.prefill_s.labels(self.m).set(s.prefill_s_per_token)

    def on_finish(self, f: FinishedRequest) -> None:
        t = f.timing
        self.g.tenant_tokens.labels(f.tenant, "prompt").inc(f.prompt_tokens)
        self.g.tenant_tokens.labels(f.tenant, "completion").inc(t.num_output_tokens)
        self.g.prompt_tokens.labels(self.m).inc(f.prompt_tokens)
        self.g.generation_tokens.labels(self.m).inc(t.num_output_tokens)
        if f.lora is not None:
            self.g.lora_requests.labels(self.m, f.lora).inc()
            self.g.lora_tokens.labels(self.m, f.lora, "prompt").inc(f.prompt_tokens)
            self.g.lora_tokens.labels(self.m, f.lora, "completion").inc(t.num_output_tokens)
        if f.aborted:
            self.g.aborted.labels(self.m).inc()
            return
        for c in f.output.outputs:
            self.g.success.labels(self.m, c.finish_reason or "unknown").inc()
        if t.first_token is not None:
            self.g.ttft.labels(self.m).observe(t.first_token - t.arrival)
            if t.num_output_tokens > 1:
                self.g.tpot.labels(self.m).observe((t.finished - t.first_token) / (t.num_output_tokens - 1))
        self.g.e2e.labels(self.m).observe(t.finished - t.arrival)


def _advance(seen: dict, key, child, total: float) -> None:
    """Advance a counter's child to an engine running total (`seen`: the totals counted so
    far; the series exists from its first sight, at 0)."""
    if total > seen.get(key, 0):
        child.inc(total - seen.get(key, 0))
        seen[key] = total
