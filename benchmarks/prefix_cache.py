"""Multi-turn chat TTFT with prefix caching off, hot only, hot + warm, and cold after a restart.

    .venv/bin/python benchmarks/prefix_cache.py [--conversations 16] [--turns 6] [--system-tokens 1000]

Each conversation shares one long system prompt (GFDL text, ~1,000 tokens) and adds a
user question per turn; the assistant's reply (16 greedy tokens) is appended to the
history, so turn t's prompt extends turn t-1's. All conversations run concurrently,
turns in order, against a `tierlm serve` started per mode with `session_id` set:

  off         --no-prefix-caching
  hot         default 1 GiB KV cache, no warm tier
  small-hot   --small-kv-gb KV cache (default 0.03 GiB: the pool evicts under this load), no warm
  small-warm  the same small KV cache + 1 GiB warm tier
  cold        the same small KV cache, no warm, a disk tier; measured after a priming run and a restart

Per mode it also records the server's tier metrics (blocks reused from each tier, evictions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from benchmarks.serve_bench import free_port, start

MODES = {
    "off": ["--no-prefix-caching"],
    "hot": ["--kv-warm-gb", "0"],
    "small-hot": ["--kv-warm-gb", "0"],  # + --kv-cache-gb small
    "small-warm": ["--kv-warm-gb", "1"],
    "cold": ["--kv-warm-gb", "0"],  # + --kv-cache-gb small, --kv-cold-dir
}


def tier_metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "tierlm:prefix_cache_block_hits_total":
                out[f"block_hits_{s.labels['tier']}"] = int(s.value)
            elif s.name in ("tierlm:kv_cache_evictions_total", "tierlm:num_preemptions"):
                out[s.name.split(":")[1]] = int(s.value)
    return out


def system_prompt(tokens: int) -> str:
    text = (Path(__file__).with_name("data") / "gfdl-1.3.txt").read_text()
    return "Answer questions about this license.\n\n" + text[: tokens * 4]  # ~4 characters per token


async def conversation(client: httpx.AsyncClient, url: str, i: int, turns: int, system: str) -> list[float]:
    messages = [{"role": "system", "content": system}]
    ttfts = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Conversation {i}, question {t}: what does section {t} say?"})
        body = {"model": "smollm2-135m", "messages": messages, "max_tokens": 16, "temperature": 0,
                "stream": True, "session_id": f"conv-{i}"}
        t0 = time.perf_counter()
        first, text = None, []
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    first = first or time.perf_counter()
                    text.append(delta)
        ttfts.append((first or time.perf_counter()) - t0)
        messages.append({"role": "assistant", "content": "".join(text)})
    return ttfts


async def workload(url: str, conversations: int, turns: int, system: str) -> list[list[float]]:
    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(conversation(client, url, i, turns, system) for i in range(conversations)))


def serve(extra: list[str]):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start([sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), *extra], url, "/ready"), url


def run_mode(name: str, args, system: str) -> dict:
    extra = list(MODES[name])
    if name.startswith("small") or name == "cold":
        extra += ["--kv-cache-gb", str(args.small_kv_gb)]
    if name == "cold":
        extra += ["--kv-cold-dir", tempfile.mkdtemp(prefix="tierlm-cold-")]
        proc, url = serve(extra)
        asyncio.run(workload(url, args.conversations, args.turns, system))  # priming run
        proc.terminate()
        proc.wait()
    proc, url = serve(extra)
    try:
        t0 = time.perf_counter()
        per_conv = asyncio.run(workload(url, args.conversations, args.turns, system))
        wall = time.perf_counter() - t0
        tiers = tier_metrics(url)
    finally:
        proc.terminate()
        proc.wait()
    all_ttft = sorted(x for conv in per_conv for x in conv)
    later = sorted(x for conv in per_conv for x in conv[1:])
    p90 = lambda xs: xs[int(0.9 * (len(xs) - 1))]
    return {"server_args": extra, "wall_s": round(wall, 1),
            "ttft_mean_s": round(statistics.mean(all_ttft), 3), "ttft_p90_s": round(p90(all_ttft), 3),
            "ttft_turn2plus_mean_s": round(statistics.mean(later), 3),
            "ttft_first_turn_mean_s": round(statistics.mean(conv[0] for conv in per_conv), 3), **tiers}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--small-kv-gb", type=float, default=0.03)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    system = system_prompt(args.system_tokens)
    out = Path(__file__).with_name("results") / "prefix_cache.json"
    previous = json.loads(out.read_text()).get("modes", {}) if out.exists() else {}
    results = {"conversations": args.conversations, "turns": args.turns, "system_chars": len(system),
               "modes": previous}  # modes not rerun keep their last recorded figures
    for name in args.modes:
        results["modes"][name] = run_mode(name, args, system)
        print(name, results["modes"][name], flush=True)
    cmd = "benchmarks/prefix_cache.py " + " ".join(sys.argv[1:])
    print("recorded in", record("prefix_cache", cmd.strip(), results))


if __name__ == "__main__":
    main()
