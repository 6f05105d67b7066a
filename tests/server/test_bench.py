"""`tierlm bench` end to end: against the real server by URL (its own metrics confirm every
token the benchmark counted) and against a local engine with the PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server.conftest import API_KEY, metric


def bench(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierlm.cli", "bench", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, check=False)


@pytest.mark.slow
def test_bench_against_a_server_url_counts_what_the_server_served(server, http, tmp_path):
    prompt_before = metric(http, "vllm:prompt_tokens_total")
    generated_before = metric(http, "vllm:generation_tokens_total")
    hits_before = metric(http, "vllm:prefix_cache_hits_total")
    r = bench("--url", server.url, "--api-key", API_KEY, "--workloads", "w2", "--runs", "2", "--requests", "1",
              "--concurrency", "2", "1", "--no-plots", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "result.json").read_text())
    levels = doc["workloads"]["w2"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [2, 1]
    for level in levels:
        assert len(level["runs"]) == 2
        for run in level["runs"]:
            assert run["requests"] == 1 and run["output_tokens"] == 16
            assert 0 < run["ttft_p50_s"] <= run["ttft_p90_s"] and run["output_tok_per_s"] > 0
        s = level["summary"]["output_tok_per_s"]
        assert s["min"] <= s["median"] <= s["max"]
    # Warm-up (16-token prompt, 4 tokens) + 4 requests of 1,000 prompt and 16 output tokens,
    # every prompt new to the server (levels and runs never reuse one: no prefix-cache help).
    assert metric(http, "vllm:prompt_tokens_total") - prompt_before == 16 + 4 * 1000
    assert metric(http, "vllm:generation_tokens_total") - generated_before == 4 + 4 * 16
    assert metric(http, "vllm:prefix_cache_hits_total") == hits_before
    assert "w2" in r.stdout and "TTFT p90 ms" in r.stdout  # the table


def test_bench_local_engine_writes_json_and_plots(tmp_path, cache_dir):
    import matplotlib.image

    r = bench("--workloads", "w2", "w1", "--runs", "1", "--requests", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["target"] == "local:smollm2-135m"
    assert [lv["runs"][0]["output_tokens"] for lv in (doc["workloads"]["w1"]["levels"][0],
                                                        doc["workloads"]["w2"]["levels"][0])] == [256, 16]
    for png in ("throughput.png", "latency.png"):
        image = matplotlib.image.imread(tmp_path / png)
        assert image.shape[0] > 200 and image.shape[1] > 200
