"""Data-parallel replicas on a multi-turn, shared-prefix chat workload.

    .venv/bin/python benchmarks/replicas.py [--systems 8] [--users 4] [--turns 3] [--concurrency 16]

`systems` system prompts (different parts of the GFDL text, ~600 tokens each) x `users`
conversations each; every conversation runs `turns` turns in order (its reply, 32 greedy
tokens, joins the history), `concurrency` conversations at a time. No session ids: the
routing sees only the prompts. Modes, one server each, on this machine's cores:

  dp2-prefix  --data-parallel-size 2 (1 thread each), prefix-aware routing (the default)
  dp2-rr      the same replicas, --dp-routing round_robin
  dp1         one engine on every core (no Ray)

Per mode: prefix hit rate (cached / prompt tokens, from each response's usage), TTFT
p50/p90, output tok/s over the run, and the router's counters (routed by reason, KV
transfers and bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from benchmarks.serve_bench import free_port, start

MODES = {
    "dp2-prefix": ["--data-parallel-size", "2", "--replica-threads", "1"],
    "dp2-rr": ["--data-parallel-size", "2", "--replica-threads", "1", "--dp-routing", "round_robin"],
    "dp1": [],
}
OUTPUT_TOKENS = 32


def systems(n: int, tokens: int) -> list[str]:
    text = (Path(__file__).with_name("data") / "gfdl-1.3.txt").read_text()
    step = max(1, (len(text) - tokens * 4) // n)
    return [f"You answer questions about this text.\n\n{text[i * step : i * step + tokens * 4]}" for i in range(n)]


async def conversation(client: httpx.AsyncClient, url: str, system: str, user: int, turns: int,
                       gate: asyncio.Semaphore) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    out = []
    async with gate:
        for t in range(turns):
            messages.append({"role": "user", "content": f"User {user}, question {t}: what does part {t} mean?"})
            body = {"model": "smollm2-135m", "messages": messages, "max_tokens": OUTPUT_TOKENS, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, text, usage = None, [], None
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices", []):
                        if choice["delta"].get("content"):
                            first = first or time.perf_counter()
                            text.append(choice["delta"]["content"])
            out.append({"ttft": (first or time.perf_counter()) - t0, "usage": usage})
            messages.append({"role": "assistant", "content": "".join(text)})
    return out


async def workload(url: str, prompts: list[str], users: int, turns: int, concurrency: int) -> list[dict]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900) as client:
        convs = [conversation(client, url, system, u, turns, gate) for u in range(users) for system in prompts]
        return [turn for conv in await asyncio.gather(*convs) for turn in conv]


def router_counters(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "tierlm:replica_routed_total":
                key = f"routed_{s.labels['reason']}"
            elif s.name == "tierlm:replica_kv_transfers_total":
                key = f"transfers_{s.labels['outcome']}"
            elif s.name == "tierlm:replica_kv_transfer_bytes_total":
                key = "transfer_bytes"
            else:
                continue
            out[key] = out.get(key, 0) + int(s.value)
    return out


def run_mode(name: str, args, prompts: list[str]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t_start = time.perf_counter()
    proc = start([sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), *MODES[name]], url, "/ready")
    ready_s = time.perf_counter() - t_start
    try:
        t0 = time.perf_counter()
        turns = asyncio.run(workload(url, prompts, args.users, args.turns, args.concurrency))
        wall = time.perf_counter() - t0
        counters = router_counters(url)
    finally:
        proc.terminate()
        proc.wait()
    ttft = sorted(t["ttft"] for t in turns)
    prompt = sum(t["usage"]["prompt_tokens"] for t in turns)
    cached = sum(t["usage"]["prompt_tokens_details"]["cached_tokens"] for t in turns)
    output = sum(t["usage"]["completion_tokens"] for t in turns)
    q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))]
    return {"server_args": MODES[name], "ready_s": round(ready_s, 1), "requests": len(turns),
            "wall_s": round(wall, 1), "prefix_hit_rate": round(cached / prompt, 3),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p90_s": round(q(0.9), 3),
            "output_tok_s": round(output / wall, 1), **counters}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", type=int, default=8)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=600)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    prompts = systems(args.systems, args.system_tokens)
    results = {"systems": args.systems, "users": args.users, "turns": args.turns,
               "concurrency": args.concurrency, "output_tokens": OUTPUT_TOKENS, "modes": {}}
    for name in args.modes:
        results["modes"][name] = run_mode(name, args, prompts)
        print(name, results["modes"][name], flush=True)
    modes = results["modes"]
    if {"dp2-prefix", "dp2-rr"} <= modes.keys():
        results["prefix_vs_rr_output_tok_s"] = round(modes["dp2-prefix"]["output_tok_s"]
                                                     / modes["dp2-rr"]["output_tok_s"], 2)
    if {"dp2-prefix", "dp1"} <= modes.keys():
        results["dp2_vs_dp1_output_tok_s"] = round(modes["dp2-prefix"]["output_tok_s"] / modes["dp1"]["output_tok_s"], 2)
    cmd = "benchmarks/replicas.py " + " ".join(sys.argv[1:])
    print("recorded in", record("replicas", cmd.strip(), results))


if __name__ == "__main__":
    main()
