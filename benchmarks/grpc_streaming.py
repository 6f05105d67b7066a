"""Streaming overhead per token: tierlm.v1.Generation/Generate over gRPC vs
/v1/completions over HTTP SSE, on one `tierlm serve --grpc-port` process, same requests.

    .venv/bin/python benchmarks/grpc_streaming.py [--concurrency 1 32] [--tokens 64] [--reps 3]

Each level runs `concurrency` streams at once (level 1: 4 streams one after another), each
a 32-token prompt (token ids, so neither protocol tokenizes) and `tokens` greedy output
tokens (ignore_eos). The protocols alternate, `reps` runs each; medians are reported.
Per token: wall time, the server process's CPU time and this client's CPU time (both
share the machine's cores with the engine), and the gap between messages a stream sees.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import make_prompt_ids, record
from benchmarks.serve_bench import free_port, start
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve
from tierlm.loader.gguf import GGUFFile
from tierlm.loader.tokenizer import from_gguf
from tierlm.rpc.proto import generate_pb2, generate_pb2_grpc

MODEL, PROMPT_LEN = "smollm2-135m", 32


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sse_stream(client: httpx.AsyncClient, ids: list[int], tokens: int) -> list[float]:
    body = {"model": MODEL, "prompt": ids, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])  # a client reads each event
                stamps.append(time.perf_counter())
    return stamps


async def grpc_stream(stub, ids: list[int], tokens: int) -> list[float]:
    req = generate_pb2.GenerateRequest(model=MODEL, token_ids=generate_pb2.TokenIds(ids=ids), max_tokens=tokens,
                                       temperature=0, ignore_eos=True)
    stamps = []
    async for _ in stub.Generate(req):
        stamps.append(time.perf_counter())
    return stamps


async def level(proto: str, concurrency: int, prompts: list[list[int]], tokens: int, http_url: str,
                grpc_target: str, pid: int) -> dict:
    async with httpx.AsyncClient(base_url=http_url, timeout=600) as client, \
            grpc.aio.insecure_channel(grpc_target) as channel:
        stub = generate_pb2_grpc.GenerationStub(channel)
        run = (lambda p: sse_stream(client, p, tokens)) if proto == "sse" else (lambda p: grpc_stream(stub, p, tokens))
        await run(prompts[0])  # connection and warm-up
        server0, client0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
        if concurrency == 1:
            streams = [await run(p) for p in prompts[:4]]
        else:
            streams = await asyncio.gather(*(run(p) for p in prompts[:concurrency]))
        wall = time.perf_counter() - t0
        server_cpu, client_cpu = cpu_seconds(pid) - server0, time.process_time() - client0
    n = len(streams) * tokens
    gaps = [b - a for s in streams for a, b in itertools.pairwise(s)]
    return {"tokens": n, "tok_s": n / wall, "server_cpu_us_per_token": 1e6 * server_cpu / n,
            "client_cpu_us_per_token": 1e6 * client_cpu / n, "mean_gap_ms": 1e3 * statistics.mean(gaps),
            "messages_per_stream": statistics.mean(len(s) for s in streams)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cache = default_cache_dir()
    tok = from_gguf(GGUFFile(resolve(MODEL, cache)), cache)
    prompts = [make_prompt_ids(tok, PROMPT_LEN, salt) for salt in range(max(args.concurrency))]
    port, gport = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "tierlm.cli", "serve", "--model", MODEL, "--port", str(port),
                  "--grpc-port", str(gport), "--max-num-seqs", str(max(args.concurrency))], url, "/ready")
    rows = []
    try:
        for c in args.concurrency:
            runs: dict[str, list[dict]] = {"sse": [], "grpc": []}
            for _ in range(args.reps):
                for proto, results in runs.items():
                    results.append(asyncio.run(level(proto, c, prompts, args.tokens, url, f"127.0.0.1:{gport}",
                                                     proc.pid)))
            for proto, results in runs.items():
                row = {"protocol": proto, "concurrency": c, "reps": len(results),
                       **{k: round(statistics.median(r[k] for r in results), 3) for k in results[0]}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    by = {(r["protocol"], r["concurrency"]): r for r in rows}
    summary = []
    for c in args.concurrency:
        s, g = by[("sse", c)], by[("grpc", c)]
        cost = {p: r["server_cpu_us_per_token"] + r["client_cpu_us_per_token"] for p, r in (("sse", s), ("grpc", g))}
        summary.append({"concurrency": c, "tok_s_grpc_over_sse": round(g["tok_s"] / s["tok_s"], 3),
                        "cpu_us_per_token_sse": round(cost["sse"], 1), "cpu_us_per_token_grpc": round(cost["grpc"], 1),
                        "grpc_minus_sse_cpu_us_per_token": round(cost["grpc"] - cost["sse"], 1)})
        print(json.dumps(summary[-1]), flush=True)
    out = record(f"grpc_streaming_{torch.backends.cpu.get_cpu_capability().lower()}",
                 "python benchmarks/grpc_streaming.py " + " ".join(sys.argv[1:]),
                 {"tokens_per_stream": args.tokens, "prompt_tokens": PROMPT_LEN, "rows": rows, "summary": summary})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
