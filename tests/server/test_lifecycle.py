"""Cancellation, metrics, queue limits, drain on SIGTERM and startup failures."""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import conftest
from tests.server.conftest import API_KEY, MODEL, ServerProcess, metric

LONG = {"model": MODEL, "prompt": "Write a very long story about the sea.", "max_tokens": 1500,
        "ignore_eos": True, "temperature": 0.8}


wait_for = functools.partial(conftest.wait_for, timeout=30.0)


def wait_idle(http, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (metric(http, "vllm:num_requests_running") == 0 and metric(http, "vllm:num_requests_waiting") == 0
                and metric(http, "vllm:kv_cache_usage_perc") == 0):
            return True
        time.sleep(0.1)
    return False


def test_disconnect_mid_stream_frees_kv(http):
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(http, "vllm:kv_cache_usage_perc") > 0
    assert wait_idle(http, timeout=3.0)  # aborted: its 1,500 tokens would take longer than that


def test_disconnect_mid_request_frees_kv(server, http):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=1.5)
    assert wait_idle(http)


def test_abandoned_storm_is_aborted_not_served(server, http):
    """24 clients give up at once: every one of their requests is aborted (none runs to its
    1,500 tokens), the engine goes idle, and the next request is served."""
    aborted = metric(http, "tierlm:requests_aborted_total")
    generated = metric(http, "vllm:generation_tokens_total")

    def abandon():
        try:
            httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=0.5,
                       headers={"Authorization": f"Bearer {API_KEY}"})
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=abandon) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: metric(http, "tierlm:requests_aborted_total") == aborted + 24)
    assert wait_idle(http)
    assert metric(http, "vllm:generation_tokens_total") - generated < 24 * LONG["max_tokens"] / 10
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert metric(http, "tierlm:requests_aborted_total") == aborted + 24


def test_metrics_parse_and_count(http):
    before = metric(http, "vllm:generation_tokens_total")
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 5, "ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    for name in ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens", "vllm:generation_tokens"):
        assert name in families, name
    assert metric(http, "vllm:generation_tokens_total") == before + 5
    assert metric(http, "vllm:e2e_request_latency_seconds_count") >= 1


def test_queue_full_and_sigterm_drain(cache_dir):
    srv = ServerProcess(cache_dir, "--max-num-seqs", "1", "--max-queued-requests", "1", "--shutdown-timeout", "60")
    try:
        results = {}
        watch = httpx.Client(base_url=srv.url, timeout=30)

        def run(name, body):
            results[name] = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)

        # Long enough that the first request still holds the only seat while the others arrive.
        body = {"model": MODEL, "prompt": "Tell me about rivers.", "max_tokens": 200, "ignore_eos": True}
        first = threading.Thread(target=run, args=("first", body))
        first.start()
        wait_for(lambda: metric(watch, "vllm:num_requests_running") == 1)
        second = threading.Thread(target=run, args=("second", body))
        second.start()
        wait_for(lambda: metric(watch, "vllm:num_requests_waiting") == 1)
        full = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
        assert full.status_code == 503 and full.headers.get("retry-after")
        assert full.json()["error"]["code"] == "queue_full"

        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{srv.url}/ready").status_code == 503)
        refused = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        first.join()
        second.join()
        assert results["first"].status_code == 200 and results["second"].status_code == 200
        assert results["second"].json()["usage"]["completion_tokens"] == 200
        assert srv.proc.wait(timeout=60) == 0
        log = srv.output()
        assert '"event": "request"' in log and "Tell me about rivers" not in log  # no prompt text logged
    finally:
        srv.stop()


def test_requests_still_running_after_the_shutdown_timeout_end_with_503(cache_dir):
    """SIGTERM with --shutdown-timeout 1 while two 1,500-token requests run: after the
    timeout the plain one gets a 503 `shutting_down` envelope and the stream an error
    event then [DONE] (not a cut connection), and the process exits 0 without a traceback."""
    srv = ServerProcess(cache_dir, "--shutdown-timeout", "1")
    try:
        watch = httpx.Client(base_url=srv.url, timeout=30)
        results = {}

        def plain():
            results["plain"] = httpx.post(f"{srv.url}/v1/completions", json=LONG, timeout=120)

        def stream():
            with httpx.stream("POST", f"{srv.url}/v1/completions", json={**LONG, "stream": True},
                              timeout=120) as r:
                results["stream"] = [line for line in r.iter_lines() if line]

        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        wait_for(lambda: metric(watch, "vllm:num_requests_running") == 2)
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        assert srv.proc.wait(timeout=60) == 0
        r = results["plain"]
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "shutting_down" and "drain timeout" in r.json()["error"]["message"]
        events = results["stream"]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["code"] == "shutting_down"
        assert all("error" not in json.loads(e.removeprefix("data: ")) for e in events[:-2])  # tokens before it
        log = srv.output()
        assert "ending 2 requests in flight" in log and "Traceback" not in log
    finally:
        srv.stop()


def test_startup_failures_one_line(cache_dir):
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "serve", "--model", "no-such-model", "--port", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "unknown model" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "cannot listen" in r.stderr


def test_prefix_cache_hits_counted_and_salted(http):
    """A repeated prompt hits the prefix cache (vLLM's counters); another cache_salt does not."""
    prompt = "Shared context for the cache test. " * 12  # several full blocks
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    http.post("/v1/completions", json=body)
    hits = metric(http, "vllm:prefix_cache_hits_total")
    queries = metric(http, "vllm:prefix_cache_queries_total")
    first = http.post("/v1/completions", json={**body, "max_tokens": 3, "temperature": 0}).json()
    wait_for(lambda: metric(http, "vllm:prefix_cache_hits_total") > hits)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert metric(http, "vllm:prefix_cache_hits_total") - hits >= prompt_tokens - 16
    assert metric(http, "vllm:prefix_cache_queries_total") - queries == prompt_tokens
    hits = metric(http, "vllm:prefix_cache_hits_total")
    queries = metric(http, "vllm:prefix_cache_queries_total")
    salted = http.post("/v1/completions", json={**body, "max_tokens": 3, "temperature": 0,
                                                 "cache_salt": "tenant-b"}).json()
    wait_for(lambda: metric(http, "vllm:prefix_cache_queries_total") == queries + prompt_tokens)
    assert metric(http, "vllm:prefix_cache_hits_total") == hits  # other salt: no sharing
    assert salted["choices"][0]["text"] == first["choices"][0]["text"]  # and the same output
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    hot = [s for s in families["tierlm:prefix_cache_block_hits"].samples if s.labels["tier"] == "hot"]
    assert hot and hot[0].value > 0
    usage = {s.labels["tier"] for s in families["tierlm:kv_tier_usage_bytes"].samples}
    assert usage == {"hot", "warm", "cold"}


def test_cold_tier_replays_a_prompt_after_restart(cache_dir, tmp_path):
    """Shutdown flushes cached KV to --kv-cold-dir; the restarted server reuses it."""
    args = ("--kv-cold-dir", str(tmp_path / "cold"), "--kv-warm-gb", "0")
    body = {"model": MODEL, "prompt": "A long shared system prompt, repeated. " * 20, "max_tokens": 6,
            "temperature": 0}
    srv = ServerProcess(cache_dir, *args)
    try:
        before = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).json()
    finally:
        srv.stop()
    assert list((tmp_path / "cold").rglob("*.kvb"))
    srv = ServerProcess(cache_dir, *args)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            after = c.post("/v1/completions", json=body).json()
            wait_for(lambda: metric(c, "vllm:prefix_cache_queries_total") >= after["usage"]["prompt_tokens"])
            families = {f.name: f for f in text_string_to_metric_families(c.get("/metrics").text)}
    finally:
        srv.stop()
    cold = [s.value for s in families["tierlm:prefix_cache_block_hits"].samples if s.labels["tier"] == "cold"]
    assert cold and cold[0] >= 8
    assert after["choices"][0]["text"] == before["choices"][0]["text"]
