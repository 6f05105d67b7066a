"""README features end to end through real `tierlm serve` processes: sessions and their
TTL, the KV tier metrics, Past-Future admission against greedy (preemptions), speculative
decoding with n-gram and draft-model drafts, the priority policy, --no-deterministic,
Gemma 3 behind the sample TierSet file, the metric names, and a request log that never
holds the API key. Outputs are compared with the offline engine by token id."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import API_KEY, MODEL, ServerProcess, wait_for
from tierlm import LLM, SamplingParams

# One KV block of SmolLM2-135M: K+V x 30 layers x 16 positions x 3 kv heads x 64 dims, bf16.
BLOCK_BYTES = 2 * 30 * 16 * 3 * 64 * 2
SESSION_TTL = 6.0
COPY = ("def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n"
        "    return 2 * (width + height)\n")


def gb(blocks: int) -> str:
    return repr(blocks * BLOCK_BYTES / 2**30)


def series(url: str, name: str, headers: dict | None = None) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    return {tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name}


def value(url: str, name: str, **labels) -> float:
    return series(url, name).get(tuple(sorted(labels.items())), 0.0)


def complete(url: str, headers: dict | None = None, **body) -> dict:
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "temperature": 0, "return_tokens_as_token_ids": True,
                                                   "logprobs": 0, **body}, headers=headers, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(choice: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def tokenize(url: str, text: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]


# ---- a small KV cache: sessions, tier metrics, admission ---------------------------------
SMALL = ("--kv-cache-gb", gb(12), "--kv-warm-gb", gb(8), "--session-ttl", str(SESSION_TTL), "--max-num-seqs", "8")


@pytest.fixture(scope="module")
def small(cache_dir):
    srv = ServerProcess(cache_dir, *SMALL)
    yield srv
    srv.stop()


def test_session_keeps_its_prefix_warm_until_the_ttl(small):
    """12 hot and 8 warm blocks. A session's first turn is pinned in the warm tier: after
    fillers push 30+ blocks through both tiers, the next turn still finds its whole prefix
    there. Once --session-ttl has passed, the same fillers push it out."""
    url = small.url
    turn1 = tokenize(url, "You are a helpful assistant who answers briefly. " * 6 + "What is the sea?")
    blocks = len(turn1) // 16
    fillers = [tokenize(url, f"Unrelated filler number {i}: " + "describe a subject at length. " * 16)
               for i in range(4)]

    def push_through():
        for f in fillers:
            complete(url, prompt=f, max_tokens=1)

    def next_turn() -> tuple[float, float]:
        """Prefix-cache tokens and warm blocks the next turn found."""
        hits, warm = value(url, "vllm:prefix_cache_hits_total"), value(url, "tierlm:prefix_cache_block_hits_total",
                                                                         tier="warm")
        queries = value(url, "vllm:prefix_cache_queries_total")
        r = complete(url, prompt=turn1 + [504, 3136], max_tokens=1)
        wait_for(lambda: value(url, "vllm:prefix_cache_queries_total") == queries + r["usage"]["prompt_tokens"])
        return (value(url, "vllm:prefix_cache_hits_total") - hits,
                value(url, "tierlm:prefix_cache_block_hits_total", tier="warm") - warm)

    moved = series(url, "tierlm:kv_tier_bytes_moved_total")
    evictions = value(url, "tierlm:kv_cache_evictions_total")
    complete(url, prompt=turn1, max_tokens=4, session_id="conv-1")
    pinned_at = time.monotonic()
    push_through()
    assert next_turn() == (blocks * 16, blocks)  # the whole prefix, restored from warm
    after = series(url, "tierlm:kv_tier_bytes_moved_total")
    assert after[(("direction", "warm_to_hot"),)] - moved.get((("direction", "warm_to_hot"),), 0) == \
        blocks * BLOCK_BYTES
    assert after[(("direction", "hot_to_warm"),)] > moved.get((("direction", "hot_to_warm"),), 0)
    assert value(url, "tierlm:kv_cache_evictions_total") > evictions
    assert time.monotonic() - pinned_at < SESSION_TTL, "the machine is too slow for this TTL"
    time.sleep(max(0.0, pinned_at + SESSION_TTL + 0.5 - time.monotonic()))
    push_through()
    hits, warm = next_turn()
    assert warm == 0 and hits < blocks * 16  # unpinned, the LRU dropped it


@pytest.fixture(scope="module")
def small_greedy(cache_dir):
    srv = ServerProcess(cache_dir, *SMALL, "--admission", "greedy")
    yield srv
    srv.stop()


def run_together(url: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        results[i] = token_ids(complete(url, prompt=prompts[i], max_tokens=max_tokens, ignore_eos=True)["choices"][0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(prompts))]


def test_past_future_admission_avoids_the_preemptions_greedy_makes(small, small_greedy, offline):
    """Four requests that together need ~20 blocks of a 12-block cache. Greedy admission
    starts them all and preempts as they grow; Past-Future, once it has seen such requests
    finish, admits only what will fit. Same tokens either way, equal to the offline engine."""
    prompts = [tokenize(small.url, f"Write a long list of animals, number {i}:") for i in range(4)]
    want = [o.outputs[0].token_ids for o in offline.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))]
    preemptions = {}
    for name, srv in (("past_future", small), ("greedy", small_greedy)):
        run_together(srv.url, prompts, 60)  # history: requests of this shape run 60 tokens
        before = value(srv.url, "tierlm:num_preemptions")
        assert run_together(srv.url, prompts, 60) == want
        preemptions[name] = value(srv.url, "tierlm:num_preemptions") - before
    assert preemptions["greedy"] > 0 and preemptions["past_future"] == 0, preemptions


# ---- speculative decoding, the priority policy -------------------------------------------
@pytest.fixture(scope="module")
def ngram_priority(cache_dir):
    srv = ServerProcess(cache_dir, "--speculative", "ngram", "--num-speculative-tokens", "4",
                        "--scheduling-policy", "priority", "--max-num-seqs", "1")
    yield srv
    srv.stop()


def test_ngram_speculation_serves_the_plain_tokens_and_accepts_drafts(ngram_priority, offline):
    url = ngram_priority.url
    prompt = tokenize(url, f"Copy this code exactly.\n\n{COPY}\nCopy:\n\n{COPY[:30]}")
    drafted, accepted = (value(url, "tierlm:spec_draft_tokens_total"),
                         value(url, "tierlm:spec_accepted_tokens_total"))
    got = token_ids(complete(url, prompt=prompt, max_tokens=40, ignore_eos=True)["choices"][0])
    want = offline.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=40,
                                                                         ignore_eos=True))[0].outputs[0].token_ids
    assert got == want
    wait_for(lambda: value(url, "tierlm:spec_accepted_tokens_total") > accepted)
    assert value(url, "tierlm:spec_accepted_tokens_total") - accepted <= \
        value(url, "tierlm:spec_draft_tokens_total") - drafted


def test_priority_policy_serves_the_urgent_request_first(ngram_priority):
    """One seat, held by a long request: a low-priority request queues, then an urgent one.
    The urgent one finishes first (the request log is in finish order)."""
    url = ngram_priority.url
    ids: dict[str, str] = {}

    def send(name: str, priority: int, max_tokens: int) -> None:
        ids[name] = complete(url, prompt=f"Request {name}:", max_tokens=max_tokens, ignore_eos=True,
                             priority=priority)["id"]

    holder = threading.Thread(target=send, args=("holder", 0, 500))  # long enough to queue behind
    holder.start()
    wait_for(lambda: value(url, "vllm:num_requests_running") == 1)
    low = threading.Thread(target=send, args=("low", 10, 2))
    low.start()
    wait_for(lambda: value(url, "vllm:num_requests_waiting") == 1)
    urgent = threading.Thread(target=send, args=("urgent", -10, 2))
    urgent.start()
    wait_for(lambda: value(url, "vllm:num_requests_waiting") == 2)
    for t in (holder, low, urgent):
        t.join()
    order = [json.loads(line)["id"] for line in ngram_priority.output().splitlines()
             if line.startswith('{"event": "request"')]
    assert order.index(ids["holder"]) < order.index(ids["urgent"]) < order.index(ids["low"])
    assert "scheduling policy: priority" in ngram_priority.output()


@pytest.fixture(scope="module")
def draft_nondeterministic(cache_dir):
    srv = ServerProcess(cache_dir, "--speculative", "draft", "--draft-model", MODEL, "--num-speculative-tokens", "3",
                        "--no-deterministic")
    yield srv
    srv.stop()


def test_draft_model_speculation_without_determinism_equals_offline(draft_nondeterministic, cache_dir):
    """The model as its own draft: every draft is its greedy token, so nearly all are
    accepted; the served tokens equal offline plain decoding in the same kernel mode."""
    url = draft_nondeterministic.url
    drafted, accepted = (value(url, "tierlm:spec_draft_tokens_total"),
                         value(url, "tierlm:spec_accepted_tokens_total"))
    prompt = tokenize(url, "The three primary colors are")
    got = token_ids(complete(url, prompt=prompt, max_tokens=24, ignore_eos=True)["choices"][0])
    plain = LLM(MODEL, cache_dir=cache_dir, deterministic=False)
    want = plain.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=24,
                                                                       ignore_eos=True))[0].outputs[0].token_ids
    assert got == want
    wait_for(lambda: value(url, "tierlm:spec_draft_tokens_total") > drafted)
    assert value(url, "tierlm:spec_accepted_tokens_total") - accepted >= \
        0.9 * (value(url, "tierlm:spec_draft_tokens_total") - drafted)


# ---- the sample TierSet: Gemma 3 as the deep tier ----------------------------------------
@pytest.mark.slow
def test_sample_tierset_serves_gemma3_as_its_deep_tier(cache_dir):
    config = Path(__file__).parents[2] / "configs" / "tierset.toml"
    srv = ServerProcess(cache_dir, "--config", str(config), model=None)
    try:
        key = {"Authorization": "Bearer sk-team-a-change-me"}
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        body = {"messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True,
                "return_tokens_as_token_ids": True}
        deep = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "model": "deep"}, headers=key,
                          timeout=300)
        auto = httpx.post(f"{srv.url}/v1/chat/completions", json={**body, "model": "auto", "tier_mode": "deep"},
                          headers=key, timeout=300)
        assert deep.status_code == auto.status_code == 200, deep.text
        assert auto.headers["x-tierlm-tier"] == "deep"  # deep mode: the best quality that fits
        gemma = LLM("gemma3-270m", cache_dir=cache_dir)
        (out,) = gemma.chat(messages, SamplingParams(temperature=0, max_tokens=12))[0].outputs
        for r in (deep, auto):
            choice = r.json()["choices"][0]
            assert r.json()["model"] == "deep" and choice["message"]["content"] == out.text
            assert [int(t["token"].removeprefix("token_id:")) for t in choice["logprobs"]["content"]] == \
                out.token_ids
        models = httpx.get(f"{srv.url}/v1/models", headers=key, timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["fast", "deep", "auto"]
    finally:
        srv.stop()


# ---- the metric names the README promises; the request log -------------------------------
def test_readme_metrics_move_with_requests(server, http):
    def snapshot() -> dict[str, float]:
        out = {}
        for fam in text_string_to_metric_families(http.get("/metrics").text):
            for s in fam.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    before = snapshot()
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 5, "ignore_eos": True})
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    wait_for(lambda: snapshot()["vllm:e2e_request_latency_seconds_count"] == before[
        "vllm:e2e_request_latency_seconds_count"] + 2)
    after = snapshot()
    assert after["vllm:time_to_first_token_seconds_count"] - before["vllm:time_to_first_token_seconds_count"] == 2
    # one TPOT observation per request with more than one token
    assert after["vllm:time_per_output_token_seconds_count"] - before["vllm:time_per_output_token_seconds_count"] == 1
    assert after["tierlm:step_seconds"] > 0 and after["tierlm:prefill_seconds_per_token"] > 0
    for name in ("tierlm:kv_tier_bytes_moved_total", "tierlm:kv_cache_evictions_total",
                 "tierlm:kv_tier_usage_bytes", "tierlm:prefix_cache_block_hits_total", "tierlm:num_preemptions",
                 "tierlm:spec_draft_tokens_total", "tierlm:spec_accepted_tokens_total"):
        assert name in after, name


def test_request_log_never_holds_the_api_key(server, http):
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"},
               headers={"Authorization": "Bearer sk-not-a-real-key-42"}, timeout=30)
    log = server.output()
    assert '"event": "request"' in log
    assert API_KEY not in log and "sk-not-a-real-key-42" not in log
