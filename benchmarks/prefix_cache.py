"""Multi-turn chat TTFT with prefix caching off, hot only, hot + warm, and cold after a restart.

    .venv/bin/python benchmarks/prefix_cache.py [--conversations 16] [--turns 6] [--system-tokens 1000]

Each conversation shares one long system prompt (GFDL text, ~1,000 tokens) and adds a
user question per turn; the assistant's reply (16 greedy tokens) is appended to the
history, so turn t's prompt extends turn t-1's. All conversations run concurrently,
turns in order, against a `tierlm serve` started per mode with `session_id` set:

  off         --no-prefix-caching
  hot         default 1 GiB KV cache, no warm tier
  small-hot   0.1 GiB KV cache, no warm tier (the pool evicts under this load)
  small-warm  0.1 GiB KV cache + 1 GiB warm tier
  cold        0.1 GiB KV cache, no warm, a disk tier; measured after a priming run and a restart
"""

from __future__ import annotations

import argparse
import json
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record  # noqa: E402
from benchmarks.serve_bench import free_port, start  # noqa: E402

MODES = {
    "off": ["--no-prefix-caching"],
    "hot": ["--kv-warm-gb", "0"],
    "small-hot": ["--kv-cache-gb", "0.1", "--kv-warm-gb", "0"],
    "small-warm": ["--kv-cache-gb", "0.1", "--kv-warm-gb", "1"],
    "cold": ["--kv-cache-gb", "0.1", "--kv-warm-gb", "0"],  # + --kv-cold-dir
}


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
    finally:
        proc.terminate()
        proc.wait()
    all_ttft = sorted(x for conv in per_conv for x in conv)
    later = sorted(x for conv in per_conv for x in conv[1:])
    p90 = lambda xs: xs[int(0.9 * (len(xs) - 1))]  # noqa: E731
    return {"server_args": extra, "wall_s": round(wall, 1),
            "ttft_mean_s": round(statistics.mean(all_ttft), 3), "ttft_p90_s": round(p90(all_ttft), 3),
            "ttft_turn2plus_mean_s": round(statistics.mean(later), 3),
            "ttft_first_turn_mean_s": round(statistics.mean(conv[0] for conv in per_conv), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    system = system_prompt(args.system_tokens)
    results = {"conversations": args.conversations, "turns": args.turns, "system_chars": len(system), "modes": {}}
    for name in args.modes:
        results["modes"][name] = run_mode(name, args, system)
        print(name, results["modes"][name], flush=True)
    cmd = "benchmarks/prefix_cache.py " + " ".join(sys.argv[1:])
    print("recorded in", record("prefix_cache", cmd.strip(), results))


if __name__ == "__main__":
    main()
