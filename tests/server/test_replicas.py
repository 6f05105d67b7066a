"""Data-parallel replicas (--data-parallel-size 2, one kernel thread each) on a local Ray
instance the server starts and stops: prefix-aware routing and session stickiness, a KV
transfer between replicas giving the recomputed output bit for bit, quotas held by the one
front end, and a replica killed under load losing no queued request."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerProcess, http_client, wait_for

pytest.importorskip("ray")

CONFIG = """\
default_tier = "text"

[tiers.text]
model = "smollm2-135m"
max_num_seqs = 2

[tenants.ops]
api_keys = ["key-ops"]
metrics = true

[tenants.small]
api_keys = ["key-small"]
tokens_per_minute = 100
"""
TEXT = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps, watching the "
        "gulls circle the rocks below and the fishing boats return to the harbour before dark. ")


@pytest.fixture(scope="module")
def server(cache_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("replicas") / "tiers.toml"
    path.write_text(CONFIG)
    s = ServerProcess(cache_dir, "--config", str(path), "--data-parallel-size", "2", "--replica-threads", "1",
                      "--dp-overload-tokens", "64", model=None)
    yield s
    s.stop()
    assert s.proc.returncode == 0, s.output()
    assert not _replica_pids(), "the replicas outlived the server"


@pytest.fixture(scope="module")
def ops(server):
    with http_client(server, "key-ops") as c:
        yield c


def _samples(client: httpx.Client) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _routed(samples: dict) -> dict[tuple[str, str], float]:
    """(replica, reason) -> requests routed so far."""
    return {(dict(k)["replica"], dict(k)["reason"]): v for (n, k), v in samples.items()
            if n == "tierlm:replica_routed_total"}


def _one_routing(client, before: dict) -> tuple[str, str]:
    after = _routed(_samples(client))
    moved = [k for k, v in after.items() if v > before.get(k, 0)]
    assert len(moved) == 1, moved
    return moved[0]


def _complete(client, prompt: str, max_tokens: int = 8, **extra) -> dict:
    r = client.post("/v1/completions", json={"model": "text", "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::EngineReplica"], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def test_ready_reports_replicas_and_metrics_per_replica(server, ops):
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready",
                                                       "replicas": {"text": {"serving": 2, "configured": 2}}}
    s = _samples(ops)
    assert {dict(k)["replica"]: v for (n, k), v in s.items() if n == "tierlm:replica_up"} == {"0": 1.0, "1": 1.0}


def test_shared_prefix_goes_to_its_holder_and_sessions_stick(ops):
    prompt = TEXT * 3
    before = _routed(_samples(ops))
    first = _complete(ops, prompt + "Question one:")
    holder, _ = _one_routing(ops, before)
    for i, suffix in enumerate(("Question two:", "Question three:")):
        before = _routed(_samples(ops))
        out = _complete(ops, prompt + suffix)
        assert _one_routing(ops, before) == (holder, "prefix")
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64, (i, out["usage"])
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # A session binds to the replica of its first request, whatever its next prompt shares.
    _complete(ops, prompt + "Question four:", session_id="conv-1")
    before = _routed(_samples(ops))
    _complete(ops, "An unrelated prompt about tea.", session_id="conv-1")
    assert _one_routing(ops, before) == (holder, "session")


def test_a_transfer_gives_cached_tokens_and_the_recomputed_output(server, ops):
    prompt = TEXT * 4 + "Summary:"
    _complete(ops, prompt, max_tokens=1)  # its blocks now live on one replica
    started = threading.Event()

    def long_request() -> None:  # keeps the holder busy: over the 64-token overload margin
        with ops.stream("POST", "/v1/completions", json={"model": "text", "prompt": prompt + " Long:",
                                                        "max_tokens": 150, "temperature": 0,
                                                        "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(120)
    before = _samples(ops)
    pulled = _complete(ops, prompt + " Short:", max_tokens=24)
    after = _samples(ops)
    thread.join()
    done = {dict(k)["replica"]: v - before.get((n, k), 0) for (n, k), v in after.items()
            if n == "tierlm:replica_kv_transfers_total" and dict(k)["outcome"] == "done"}
    receiver = [r for r, v in done.items() if v == 1]
    assert len(receiver) == 1, done
    moved = [v - before.get((n, k), 0) for (n, k), v in after.items()
             if n == "tierlm:replica_kv_transfer_bytes_total" and dict(k)["replica"] == receiver[0]]
    assert moved and moved[0] > 0
    assert pulled["usage"]["prompt_tokens_details"]["cached_tokens"] >= 128
    fresh = _complete(ops, prompt + " Short:", max_tokens=24, cache_salt="recompute")
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert pulled["choices"][0]["text"] == fresh["choices"][0]["text"]


def test_a_client_gone_mid_stream_aborts_on_its_replica(ops):
    def running() -> float:
        return sum(v for (n, _), v in _samples(ops).items() if n == "tierlm:replica_requests_running")

    with ops.stream("POST", "/v1/completions", json={"model": "text", "prompt": "Count slowly:", "max_tokens": 400,
                                                    "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 3:
                break
    # 400 tokens take a replica on one thread well over 10 s: stopping within 5 s is the abort.
    wait_for(lambda: running() == 0, 5)


def test_quota_is_one_across_replicas(server, ops):
    with http_client(server, "key-small") as small:
        before = _routed(_samples(ops))
        for word in ("alpha", "beta"):  # different prompts, idle replicas: round robin
            r = small.post("/v1/completions", json={"model": "text", "prompt": f"Say {word}.", "max_tokens": 40,
                                                    "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
        after = _routed(_samples(ops))
        used = {rep for (rep, _), v in after.items() if v > before.get((rep, _), 0)}
        assert used == {"0", "1"}
        r = small.post("/v1/completions", json={"model": "text", "prompt": "Say gamma.", "max_tokens": 40})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text


def test_a_replica_killed_under_load_loses_no_queued_request(server, ops):
    prompts = [f"Story {i}: {TEXT[: 40 + 7 * i]}" for i in range(8)]
    results: dict[int, dict] = {}
    first_tokens = threading.Semaphore(0)

    def stream(i: int) -> None:
        text, error = "", None
        with ops.stream("POST", "/v1/completions", json={"model": "text", "prompt": prompts[i], "max_tokens": 48,
                                                        "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]
                    continue
                if not text:
                    first_tokens.release()
                text += event["choices"][0]["text"]
        results[i] = {"text": text, "error": error}

    before = _samples(ops)
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for _ in range(4):  # two running on each replica (max_num_seqs 2), the rest queued there
        assert first_tokens.acquire(timeout=120)
    pids = _replica_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: httpx.get(f"{server.url}/ready").json()["replicas"]["text"]["serving"] == 1, 30)
    for t in threads:
        t.join(timeout=180)
    after = _samples(ops)

    def delta(name: str) -> float:
        return sum(v - before.get((n, k), 0) for (n, k), v in after.items() if n == name)

    failed = {i for i, r in results.items() if r["error"] is not None}
    assert len(results) == 8 and len(failed) <= 2, results
    for i in failed:  # only a request already streaming from the dead replica ends early, and says why
        assert results[i]["text"] and results[i]["error"]["code"] == "replica_lost", results[i]
    assert delta("tierlm:replica_requests_requeued_total") >= 1
    assert delta("tierlm:replica_requests_lost_total") == len(failed)
    for i in set(results) - failed:  # everything else ran to the end, as if nothing had happened
        assert results[i]["text"] == _complete(ops, prompts[i], max_tokens=48, ignore_eos=True)["choices"][0]["text"]
    # The slot is filled again and serves.
    wait_for(lambda: httpx.get(f"{server.url}/ready").json()["replicas"]["text"]["serving"] == 2, 120)
    assert sum(v for (n, _), v in _samples(ops).items() if n == "tierlm:replica_restarts_total") == 1
