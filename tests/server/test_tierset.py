"""A TierSet server (two tiers, six tenants) through the official client: per-tenant
401/403/429 with headers, quota refunds, `auto` routing under budgets and a cost
ceiling, fair scheduling between tenants, and the routing/tenant metrics read with
Prometheus' parser."""

from __future__ import annotations

import functools
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import conftest
from tests.server.conftest import ServerProcess

# Two differently configured engines of the bundled model: same tokenizer, so token
# counts (and so costs) are the same on both tiers.
CONFIG = """\
default_tier = "fast"

[tiers.fast]
model = "smollm2-135m"
quality = 1
prompt_price_per_mtok = 20
completion_price_per_mtok = 40

[tiers.deep]
model = "smollm2-135m"
dtype = "float32"
quality = 2
prompt_price_per_mtok = 100
completion_price_per_mtok = 200
max_num_seqs = 8
num_speculative_tokens = 4

[tenants.alpha]
api_keys = ["key-alpha"]
weight = 2

[tenants.beta]
api_keys = ["key-beta"]
tiers = ["fast"]
requests_per_minute = 3

[tenants.gamma]
api_keys = ["key-gamma"]
tokens_per_minute = 400

[tenants.epsilon]
api_keys = ["key-epsilon"]
cost_ceiling_usd = 0.006

[tenants.delta]
api_keys = ["key-delta"]
max_concurrent = 1

[tenants.zeta]
api_keys = ["key-zeta"]

[tenants.ops]
api_keys = ["key-ops"]
metrics = true

[tenants.theta]
api_keys = ["key-theta"]
prefix_cache_group = "shared"
default_tier = "deep"

[tenants.iota]
api_keys = ["key-iota"]
prefix_cache_group = "shared"
"""
METRICS_KEY = "key-metrics-only"


@pytest.fixture(scope="module")
def tierset(cache_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tierset") / "tierlm.toml"
    path.write_text(CONFIG)
    srv = ServerProcess(cache_dir, "--config", str(path), "--metrics-api-key", METRICS_KEY, model=None)
    yield srv
    srv.stop()


def client(srv, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=120)


def ask(c: openai.OpenAI, model: str, max_tokens: int = 8, **extra):
    return c.completions.with_raw_response.create(model=model, prompt="The capital of France is",
                                                  max_tokens=max_tokens, temperature=0,
                                                  extra_body={"ignore_eos": True, **extra})


def samples(srv, name: str, key: str = "key-ops") -> dict[tuple, float]:
    r = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    text = r.text
    return {tuple(sorted(s.labels.items())): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name}


def test_unknown_or_missing_key_is_401_and_the_server_keeps_serving(tierset):
    with pytest.raises(openai.AuthenticationError) as e:
        client(tierset, "wrong-key").models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(f"{tierset.url}/v1/completions", json={"model": "fast", "prompt": "hi"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"  # no key, no anonymous tenant
    assert ask(client(tierset, "key-alpha"), "fast").parse().choices[0].text


def test_every_route_but_the_probes_needs_a_key(tierset):
    """Tokenize, detokenize, metrics and the schema are refused without a valid key (and
    with the metrics-only key, except /metrics); health and readiness stay open."""
    url = tierset.url
    for method, path, body in (("GET", "/metrics", None), ("POST", "/tokenize", {"prompt": "hi"}),
                               ("POST", "/detokenize", {"tokens": [1, 2]}), ("GET", "/openapi.json", None),
                               ("GET", "/v1/models", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {METRICS_KEY}"}):
            if path == "/metrics" and headers and METRICS_KEY in headers["Authorization"]:
                continue
            r = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    for path in ("/health", "/ready"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 200
    alpha = {"Authorization": "Bearer key-alpha"}
    r = httpx.post(f"{url}/tokenize", json={"model": "fast", "prompt": "hi"}, headers=alpha, timeout=30)
    assert r.status_code == 200 and r.json()["count"] >= 1
    assert httpx.get(f"{url}/openapi.json", headers=alpha, timeout=30).status_code == 200


def test_per_tenant_series_are_shown_only_to_operators(tierset):
    """After alpha and zeta each ran a request, zeta's key sees its own tenant series and no
    other tenant's name; the operator tenant and the metrics key see both."""
    for key in ("key-alpha", "key-zeta"):
        ask(client(tierset, key), "fast", max_tokens=2).parse()
    wait_for(lambda: {"alpha", "zeta"} <= {dict(k).get("tenant") for k in samples(
        tierset, "tierlm:tenant_tokens_total")})
    for key in ("key-ops", METRICS_KEY):
        seen = {dict(k).get("tenant") for k in samples(tierset, "tierlm:tenant_tokens_total", key)}
        assert {"alpha", "zeta"} <= seen, (key, seen)
    r = httpx.get(f"{tierset.url}/metrics", headers={"Authorization": "Bearer key-zeta"}, timeout=30)
    families = list(text_string_to_metric_families(r.text))
    tenants = {s.labels["tenant"] for f in families for s in f.samples if "tenant" in s.labels}
    assert tenants == {"zeta"} and "alpha" not in r.text
    assert any(s.name == "vllm:generation_tokens_total" for f in families for s in f.samples)  # the rest stays


def test_prefix_cache_entries_are_not_shared_across_tenants(tierset):
    """A prompt alpha has cached is recomputed for zeta (its TTFT cannot reveal alpha's
    prompts); tenants of one prefix_cache_group share entries."""
    prompt = " ".join(f"tenant-isolation probe sentence {i}." for i in range(24))

    def cached(key: str) -> int:
        out = client(tierset, key).completions.create(model="fast", prompt=prompt, max_tokens=1, temperature=0)
        details = out.usage.prompt_tokens_details
        return details.cached_tokens if details is not None else 0

    assert cached("key-alpha") == 0
    assert cached("key-alpha") >= 64  # alpha's own entries are reused
    assert cached("key-zeta") == 0 and cached("key-ops") == 0
    assert cached("key-theta") == 0 and cached("key-iota") >= 64  # one group: shared


def test_a_tier_outside_the_tenants_list_is_403(tierset):
    beta = client(tierset, "key-beta")
    assert [m.id for m in beta.models.list().data] == ["fast"]  # no deep, so no choice: no auto
    with pytest.raises(openai.PermissionDeniedError) as e:
        beta.completions.create(model="deep", prompt="hi", max_tokens=1)
    assert e.value.code == "tier_not_allowed" and "deep" in e.value.message
    alpha_models = [m.id for m in client(tierset, "key-alpha").models.list().data]
    assert alpha_models == ["fast", "deep", "auto"]


def test_requests_per_minute_429_with_retry_after_and_ratelimit_headers(tierset):
    beta = client(tierset, "key-beta")
    remaining = []
    for _ in range(3):
        raw = ask(beta, "fast", max_tokens=1)
        assert raw.headers["x-tierlm-tier"] == "fast"
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as e:
        ask(beta, "fast", max_tokens=1)
    h = e.value.response.headers
    assert e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
    assert 1 <= int(h["retry-after"]) <= 20  # one request refills in 60 / 3 s
    assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-limit-requests"] == "3"
    rejected = samples(tierset, "tierlm:tenant_requests_rejected_total")
    assert rejected[(("reason", "requests"), ("tenant", "beta"))] >= 1


def test_token_quota_reserves_the_worst_case_and_refunds_the_rest(tierset):
    gamma = client(tierset, "key-gamma")
    with pytest.raises(openai.BadRequestError) as e:  # prompt + 500 can never fit in 400 per minute
        ask(gamma, "fast", max_tokens=500)
    assert e.value.code == "quota_exceeded_by_request"
    # Reserves prompt + 300, uses prompt + 3: the remaining tokens drop by what was used only.
    t0 = time.monotonic()
    raw = gamma.completions.with_raw_response.create(model="fast", prompt="Count: 1, 2, 3,", max_tokens=300,
                                                     temperature=0, stop=[","], extra_body={})
    refill = (time.monotonic() - t0) * 400 / 60  # the bucket refills while the request runs
    used = raw.parse().usage.total_tokens
    assert raw.parse().usage.completion_tokens < 300
    assert 400 - used - 2 <= int(raw.headers["x-ratelimit-remaining-tokens"]) <= 400 - used + 2 + refill


def test_auto_prefers_quality_then_shifts_to_stay_under_the_cost_ceiling(tierset):
    """epsilon's ceiling is $0.006: deep's worst case here is 6 x $100 + 8 x $200 per 1M ($0.0022),
    fast's $0.00044. auto in deep mode takes deep while it fits, then fast, then refuses;
    the tenant is never charged past the ceiling."""
    epsilon = client(tierset, "key-epsilon")
    spent, tiers = 0.0, []
    for _ in range(12):
        try:
            raw = ask(epsilon, "auto", max_tokens=8, tier_mode="deep")
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota"
            assert int(e.response.headers["retry-after"]) > 60  # the daily period, not a load retry
            tiers.append("429")
            break
        r = raw.parse()
        assert raw.headers["x-tierlm-tier"] == r.model
        price = (20, 40) if r.model == "fast" else (100, 200)
        spent += (r.usage.prompt_tokens * price[0] + r.usage.completion_tokens * price[1]) / 1e6
        tiers.append(r.model)
    assert tiers[:2] == ["deep", "deep"] and "fast" in tiers and tiers[-1] == "429", tiers
    assert spent <= 0.006
    selected = samples(tierset, "tierlm:tier_selected_total")
    assert selected[(("reason", "preferred"), ("tier", "deep"))] >= 2
    assert selected[(("reason", "cost"), ("tier", "fast"))] >= 1


def test_auto_budgets(tierset):
    alpha = client(tierset, "key-alpha")
    raw = ask(alpha, "auto", tier_mode="deep")
    assert raw.parse().model == "deep" and raw.headers["x-tierlm-tier"] == "deep"
    # balanced (the default): deep is 5x the price for 2x the quality -> fast
    assert ask(alpha, "auto").parse().model == "fast"
    cheap = ask(alpha, "auto", max_cost_usd=0.001, tier_mode="deep")  # deep's worst case is $0.0022
    assert cheap.parse().model == "fast"
    with pytest.raises(openai.BadRequestError) as e:
        ask(alpha, "auto", max_cost_usd=1e-6)
    assert e.value.code == "budget_unmet" and e.value.param == "max_cost_usd"
    assert "cheapest is 'fast'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # no tier starts in 1 ms, even idle
        ask(alpha, "auto", max_ttft_ms=1)
    assert e.value.param == "max_ttft_ms" and "fastest is" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        ask(alpha, "fast", tier_mode="max")
    assert e.value.param == "tier_mode"
    with pytest.raises(openai.BadRequestError) as e:
        ask(alpha, "auto", tier_mode="turbo")
    assert e.value.param == "tier_mode"
    assert ask(alpha, "auto", tier_mode="fixed").parse().model == "fast"  # the default tier
    chat = alpha.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        extra_body={"max_cost_usd": 0.001})
    assert chat.parse().model == "fast" and chat.headers["x-tierlm-tier"] == "fast"


def test_max_concurrent_429_while_one_runs(tierset):
    delta = client(tierset, "key-delta")
    started = threading.Event()

    def long_stream():
        stream = delta.completions.create(model="fast", prompt="Once upon a time", max_tokens=200,
                                          temperature=0, stream=True, extra_body={"ignore_eos": True})
        for _ in stream:
            started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(60)
    with pytest.raises(openai.RateLimitError) as e:
        ask(delta, "fast", max_tokens=1)
    assert e.value.type == "concurrency" and int(e.value.response.headers["retry-after"]) >= 1
    t.join(120)
    assert ask(delta, "fast", max_tokens=1).parse().choices  # the slot came back


def test_tenant_tokens_are_counted(tierset):
    before = samples(tierset, "tierlm:tenant_tokens_total")
    r = ask(client(tierset, "key-alpha"), "fast", max_tokens=5).parse()
    deadline = time.time() + 10
    key = (("kind", "completion"), ("tenant", "alpha"))
    while samples(tierset, "tierlm:tenant_tokens_total").get(key, 0) < before.get(key, 0) + 5:
        assert time.time() < deadline
        time.sleep(0.05)
    after = samples(tierset, "tierlm:tenant_tokens_total")
    prompt = (("kind", "prompt"), ("tenant", "alpha"))
    assert after[prompt] - before.get(prompt, 0) == r.usage.prompt_tokens
    assert after[key] - before.get(key, 0) == 5


wait_for = functools.partial(conftest.wait_for, timeout=120.0)


def tier_gauge(srv, name: str, tier: str) -> float:
    return samples(srv, name).get((("model_name", tier),), 0.0)


def test_fair_scheduling_lets_a_light_tenant_past_a_flood(tierset):
    """alpha floods deep (8 seats) with 12 streams: 8 run, 4 queue. zeta's one request
    arrives after them. Under FCFS it would start after the 4 queued flood requests; the
    fair scheduler seats zeta first, so at most 8 flood streams have their first token
    before zeta does (order of first tokens, as the client sees them)."""
    import asyncio

    order: list[str] = []

    async def first_token(c: openai.AsyncOpenAI, name: str) -> None:
        stream = await c.completions.create(model="deep", prompt="Tell me a story.", max_tokens=24, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if name not in order and chunk.choices and chunk.choices[0].text:
                order.append(name)

    async def run():
        alpha = openai.AsyncOpenAI(base_url=f"{tierset.url}/v1", api_key="key-alpha", max_retries=0, timeout=300)
        zeta = openai.AsyncOpenAI(base_url=f"{tierset.url}/v1", api_key="key-zeta", max_retries=0, timeout=300)
        flood = [asyncio.create_task(first_token(alpha, f"flood-{i}")) for i in range(12)]
        while tier_gauge(tierset, "vllm:num_requests_waiting", "deep") < 4:  # the flood is in
            await asyncio.sleep(0.05)
        await first_token(zeta, "light")
        await asyncio.gather(*flood)

    asyncio.run(run())
    assert len(order) == 13 and order.index("light") <= 8, order


@pytest.mark.slow
def test_weighted_tenants_share_a_busy_tier_by_weight(tierset):
    """alpha (weight 2) and zeta (weight 1) each keep 8 streams busy on deep's 8 seats.
    The tokens each is served, counted as they stream, split near 2:1 (the start, when
    both get seats at once, pulls it down a little): far from the 1:1 that serving in
    arrival order gives two equal closed loops."""
    import asyncio

    served = {"alpha": 0, "zeta": 0}
    target = 600

    async def loop(c: openai.AsyncOpenAI, tenant: str) -> None:
        while sum(served.values()) < target:
            stream = await c.completions.create(model="deep", prompt=f"A story for {tenant}:", max_tokens=16,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and sum(served.values()) < target:
                    served[tenant] += 1

    async def run():
        clients = {t: openai.AsyncOpenAI(base_url=f"{tierset.url}/v1", api_key=f"key-{t}", max_retries=0,
                                         timeout=300) for t in served}
        await asyncio.gather(*[loop(clients[t], t) for t in served for _ in range(8)])

    asyncio.run(run())
    ratio = served["alpha"] / served["zeta"]
    assert 1.4 <= ratio <= 2.7, served
    assert "scheduling policy: fair" in tierset.output()  # a file with tenants: fair by default


@pytest.mark.parametrize("mode,tier,reason", [("fixed", "fast", "fixed"), ("max", "deep", "preferred"),
                                              ("deep", "deep", "preferred"), ("balanced", "fast", "preferred"),
                                              (None, "fast", "preferred")])
def test_every_tier_mode_on_an_idle_server(tierset, mode, tier, reason):
    """fixed: the default tier; max and deep: the best quality (both fit); balanced (also
    no mode): quality per cost, and deep's 2x quality at 5x the price loses to fast."""
    before = samples(tierset, "tierlm:tier_selected_total").get((("reason", reason), ("tier", tier)), 0)
    raw = ask(client(tierset, "key-zeta"), "auto", max_tokens=2, **({"tier_mode": mode} if mode else {}))
    assert raw.parse().model == tier and raw.headers["x-tierlm-tier"] == tier
    assert samples(tierset, "tierlm:tier_selected_total")[(("reason", reason), ("tier", tier))] == before + 1


def test_fixed_mode_serves_the_tenants_own_default_tier(tierset):
    """theta's default_tier is deep (the file's is fast): fixed serves deep, budgets checked only."""
    raw = ask(client(tierset, "key-theta"), "auto", max_tokens=2, tier_mode="fixed")
    assert raw.parse().model == "deep"
    with pytest.raises(openai.BadRequestError) as e:  # deep cannot meet it; fast could, but fixed never switches
        ask(client(tierset, "key-theta"), "auto", max_tokens=2, tier_mode="fixed", max_cost_usd=0.0005)
    assert e.value.code == "budget_unmet" and e.value.param == "max_cost_usd"


def test_speculative_tier_reports_drafts_and_acceptance(tierset):
    """deep runs n-gram speculation: a copying prompt drafts tokens and some are accepted."""
    before = samples(tierset, "tierlm:spec_draft_tokens_total")
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    out = client(tierset, "key-zeta").completions.create(
        model="deep", prompt=f"Repeat exactly.\nInput: {text}\nOutput: {text}\nInput: {text}\nOutput:",
        max_tokens=24, temperature=0)
    assert out.usage.completion_tokens > 0
    draft = samples(tierset, "tierlm:spec_draft_tokens_total")
    accepted = samples(tierset, "tierlm:spec_accepted_tokens_total")
    key = (("model_name", "deep"),)
    assert draft[key] > before.get(key, 0) and 0 < accepted[key] <= draft[key]
    assert draft[(("model_name", "fast"),)] == 0  # speculation is per tier


def test_latency_budget_moves_to_a_faster_tier_under_load_then_429(tierset):
    """Budgets from live load: an idle server serves `auto` with max_latency_ms from deep.
    With deep flooded (its queue holds thousands of prompt tokens) the same request goes to
    fast (tier_selected reason "latency"); with fast flooded too it is a 429 + Retry-After
    naming max_latency_ms, not a 400, because an idle server would meet it. Runs last: it
    leaves both tiers busy until its floods are cancelled."""
    import re

    alpha = client(tierset, "key-alpha")

    def idle_latency_ms(tier: str) -> float:
        with pytest.raises(openai.BadRequestError) as e:  # 1 ms is impossible even idle
            ask(alpha, tier, max_latency_ms=1)
        return float(re.search(r"latency (\d+) ms", e.value.message).group(1))

    budget = 3 * max(idle_latency_ms("fast"), idle_latency_ms("deep")) + 300
    assert ask(alpha, "auto", max_latency_ms=budget, tier_mode="deep").headers["x-tierlm-tier"] == "deep"

    import asyncio

    text = "The quick brown fox jumps over the lazy dog. " * 60  # ~600 tokens
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    streams = openai.AsyncOpenAI(base_url=f"{tierset.url}/v1", api_key="key-alpha", max_retries=0, timeout=300)

    async def flood(tier: str, i: int) -> None:
        stream = await streams.completions.create(model=tier, prompt=f"{i} {text}", max_tokens=400, stream=True,
                                                  extra_body={"ignore_eos": True})
        async for _ in stream:
            pass

    # A probe that arrives before the engine has published the flood's backlog is admitted
    # and queues behind it: give up on it after a while and probe again (it is aborted).
    probe = openai.OpenAI(base_url=f"{tierset.url}/v1", api_key="key-alpha", max_retries=0, timeout=15)

    def status(tier: str) -> int:
        try:
            return ask(probe, tier, max_tokens=1, max_latency_ms=budget).status_code
        except openai.APIStatusError as e:
            return e.status_code
        except openai.APITimeoutError:
            return 0

    tasks = []
    try:
        for tier, count in (("deep", 16), ("fast", 40)):  # twice deep's 8 seats; fast's 32 + 8 queued
            tasks += [asyncio.run_coroutine_threadsafe(flood(tier, i), loop) for i in range(count)]
            wait_for(lambda t=tier: status(t) == 429)
            if tier == "deep":
                key = (("reason", "latency"), ("tier", "fast"))
                before = samples(tierset, "tierlm:tier_selected_total").get(key, 0)
                raw = ask(alpha, "auto", max_latency_ms=budget, tier_mode="deep")
                assert raw.headers["x-tierlm-tier"] == "fast"
                assert samples(tierset, "tierlm:tier_selected_total")[key] == before + 1
        with pytest.raises(openai.RateLimitError) as e:
            ask(alpha, "auto", max_latency_ms=budget, tier_mode="deep")
        assert e.value.code == "budget_unmet" and e.value.param == "max_latency_ms"
        assert int(e.value.response.headers["retry-after"]) >= 1 and "fastest is" in e.value.message
    finally:
        async def cancel_floods() -> None:  # closing a stream aborts its request on the server
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await streams.close()

        asyncio.run_coroutine_threadsafe(cancel_floods(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        runner.join()
    wait_for(lambda: all(tier_gauge(tierset, name, t) == 0 for t in ("fast", "deep")
                         for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")))
