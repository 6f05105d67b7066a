"""Per request: which tier serves it and the tenant's quota lease while it runs.

`choose` turns `model` (a tier name, a model name or `auto`) into a tier: it checks the
tenant may use it (403), tokenizes the prompt for every candidate (tokenizers differ),
and asks the pure selector (tenancy/routing.py) with the tiers' live load, the request's
budgets and what the tenant's cost ceiling still allows. `reserve` then takes the
request's worst case (prompt + every token it may generate, and that at the tier's
prices) from the tenant's quota, or refuses with 429 + Retry-After; the lease is settled
with what was actually used when the request ends, however it ends.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tierlm.sampling_params import SamplingParams
from tierlm.server.errors import APIError, bad_request
from tierlm.server.state import ServerState, Tier
from tierlm.tenancy import routing
from tierlm.tenancy.quotas import QuotaExceeded, Reservation
from tierlm.tenancy.tenants import Tenant


@dataclass
class Routed:
    tier: Tier
    prompts: list[list[int]]  # token ids on the chosen tier's tokenizer


@dataclass
class Lease:
    """A tenant's quota reservation for one request, settled once with the tokens used."""

    tenant: Tenant
    tier: Tier
    reservation: Reservation | None
    prompt_tokens: int
    completion_tokens: dict[int, int] = field(default_factory=dict)  # per prompt, updated as it generates

    def settle(self) -> None:
        if self.reservation is None or self.reservation.settled:
            return
        used = sum(self.completion_tokens.values())
        self.tenant.quota.settle(self.reservation, self.prompt_tokens + used,
                                 self.tier.config.cost_usd(self.prompt_tokens, used))

    def __del__(self) -> None:  # a response whose body never ran still gives its slot back
        self.settle()

    def headers(self) -> dict[str, str]:
        return {"x-tierlm-tier": self.tier.model_name, **self.tenant.quota.headers()}


def tenant_of(request) -> Tenant:
    return request.state.tenant  # set by the app's Guard from the API key


def candidates(state: ServerState, tenant: Tenant, model: str, task: str = "generate"
               ) -> tuple[list[Tier], str | None]:
    """The tiers `model` may mean for this tenant and task (403/404/400 when none), and the
    tier's name when `model` names one."""
    if model == "auto":
        served = state.routable(task)
        allowed = [t for t in served if tenant.may_use(t.model_name)]
        what = "an embedding" if task == "embed" else "a text generation"
        if not served:
            raise bad_request(f"no tier of this server is {what} model", "model", "model_not_supported")
        if not allowed:
            raise APIError(403, f"this API key may not use any tier that is {what} model", param="model",
                           code="tier_not_allowed", type="permission_error")
        return allowed, None
    tier = permitted(tenant, state.resolve(model))
    if tier.task != task:
        served = "/v1/embeddings" if tier.task == "embed" else "/v1/completions and /v1/chat/completions"
        raise bad_request(f"'{tier.model_name}' is {'an embedding' if tier.task == 'embed' else 'a text generation'} "
                          f"model: it serves {served}", "model", "model_not_supported")
    return [tier], tier.model_name


def permitted(tenant: Tenant, tier: Tier) -> Tier:
    """`tier`, or 403 when this tenant may not use it."""
    if not tenant.may_use(tier.model_name):
        raise APIError(403, f"this API key may not use tier '{tier.model_name}'", param="model",
                       code="tier_not_allowed", type="permission_error")
    return tier


async def choose(state: ServerState, tenant: Tenant, body, params: SamplingParams,
                 prompts_for: Callable[[Tier], list[list[int]]]) -> Routed:
    """The tier for this request, with its prompts tokenized for it (4xx if none fits).
    Tokenizing (and chat rendering) runs on a worker thread: a long prompt must not stall
    the event loop that serves every other client."""
    tiers, fixed = candidates(state, tenant, body.model)
    if fixed is not None and body.tier_mode is not None:
        raise bad_request("tier_mode applies to model 'auto' only", "tier_mode")
    prompts = await asyncio.to_thread(lambda: {t.model_name: prompts_for(t) for t in tiers})
    seqs = params.num_sequences
    prompt_tokens, output, max_output = {}, {}, {}
    for t in tiers:
        lens = [len(p) for p in prompts[t.model_name]]
        prompt_tokens[t.model_name] = sum(lens)
        output[t.model_name] = params.max_tokens or t.typical_output()
        max_output[t.model_name] = seqs * sum(_max_output(t, n, params) for n in lens)
    budgets = routing.Budgets(body.max_latency_ms, body.max_ttft_ms, body.max_cost_usd, tenant.quota.cost_left())
    # Every engine, not only the candidates: they all share the cores (routing.shared_cores);
    # an adapter runs on its base tier's engine and carries that load.
    engine_loads = routing.shared_cores({t.model_name: t.engine.current_load() for t in state.tiers.values()})
    loads = {t.model_name: engine_loads[t.parent or t.model_name] for t in tiers}
    try:
        choice = routing.select([t.config for t in tiers], loads,
                                routing.Demand(prompt_tokens, output, max_output), budgets,
                                body.tier_mode or "balanced", fixed, tenant.config.default_tier or state.default_tier,
                                state.balanced_cost_weight)
    except routing.NoTierFits as e:
        state.metrics.tenant_rejected.labels(tenant.name, "budget").inc()
        ceiling = e.param == "cost_ceiling"
        retry = tenant.quota.period_left() if ceiling else e.retry_after
        raise APIError(e.status, str(e), param=None if ceiling else e.param,
                       code="insufficient_quota" if ceiling else "budget_unmet",
                       type="insufficient_quota" if ceiling else "invalid_request_error",
                       headers=_retry_headers(retry, tenant)) from None
    state.metrics.tier_selected.labels(choice.tier, choice.reason).inc()
    return Routed(next(t for t in tiers if t.model_name == choice.tier), prompts[choice.tier])


def _max_output(tier: Tier, prompt_len: int, params: SamplingParams) -> int:
    room = max(0, tier.max_model_len - prompt_len)
    return room if params.max_tokens is None else min(params.max_tokens, room)


def reserve(state: ServerState, tenant: Tenant, routed: Routed, params: SamplingParams) -> Lease:
    """Take the request's worst case from the tenant's quota (429/400 if it does not fit)."""
    tier = routed.tier
    lens = [len(p) for p in routed.prompts]
    worst = params.num_sequences * sum(_max_output(tier, n, params) for n in lens)
    return reserve_tokens(state, tenant, tier, sum(lens), worst)


def reserve_tokens(state: ServerState, tenant: Tenant, tier: Tier, prompt: int, worst: int) -> Lease:
    """Take `prompt` tokens and at most `worst` generated ones (and their price) from the quota."""
    try:
        r = tenant.quota.reserve(prompt + worst, tier.config.cost_usd(prompt, worst))
    except QuotaExceeded as e:
        state.metrics.tenant_rejected.labels(tenant.name, e.limit).inc()
        if math.isinf(e.retry_after):  # this request alone is over the limit: retrying cannot help
            raise APIError(400, f"{e}; lower max_tokens or the prompt", param="max_tokens",
                           code="quota_exceeded_by_request", headers=tenant.quota.headers()) from None
        kind = "insufficient_quota" if e.limit == "cost" else e.limit
        raise APIError(429, f"rate limit for tenant '{tenant.name}': {e}", type=kind,
                       code="insufficient_quota" if e.limit == "cost" else "rate_limit_exceeded",
                       headers=_retry_headers(e.retry_after, tenant)) from None
    return Lease(tenant, tier, r, prompt)


def _retry_headers(retry_after: float | None, tenant: Tenant) -> dict[str, str]:
    headers = dict(tenant.quota.headers())
    if retry_after is not None and math.isfinite(retry_after):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return headers
