"""Grammar overhead: output tok/s with and without a JSON schema at concurrency 8, against
`tierlm serve` (started by this script), same prompts, same run.

    .venv/bin/python benchmarks/structured.py [--concurrency 8] [--requests 32] [--max-tokens 128]

The schema allows long output (an array of short strings), so constrained requests run
to max_tokens like the unconstrained ones and the rates compare like for like.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from benchmarks.serve_bench import free_port, start

SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string", "maxLength": 40}}},
          "required": ["notes"]}


async def run(url: str, concurrency: int, requests: int, max_tokens: int, schema: dict | None) -> dict:
    queue = list(range(requests))
    tokens = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            body = {"model": "smollm2-135m", "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
                    "messages": [{"role": "user", "content": f"Write notes about topic number {i}."}]}
            if schema is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "notes", "schema": schema}}
            r = await client.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"output_tokens": tokens, "wall_s": round(wall, 2), "tok_per_s": round(tokens / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port)], url, "/ready")
    try:
        asyncio.run(run(url, args.concurrency, args.concurrency, 16, SCHEMA))  # warm-up (compiles the schema)
        results = {"concurrency": args.concurrency, "requests": args.requests, "max_tokens": args.max_tokens}
        for name, schema in (("plain", None), ("json_schema", SCHEMA), ("plain_again", None)):
            results[name] = asyncio.run(run(url, args.concurrency, args.requests, args.max_tokens, schema))
            print(name, results[name], flush=True)
    finally:
        proc.terminate()
        proc.wait()
    plain = (results["plain"]["tok_per_s"] + results["plain_again"]["tok_per_s"]) / 2
    results["grammar_overhead_pct"] = round(100 * (1 - results["json_schema"]["tok_per_s"] / plain), 1)
    print("grammar overhead %:", results["grammar_overhead_pct"])
    cmd = "benchmarks/structured.py " + " ".join(sys.argv[1:])
    print("recorded in", record("structured", cmd.strip(), results))


if __name__ == "__main__":
    main()
