"""Online serving benchmark: TTFT / TPOT percentiles and output tok/s at several concurrencies,
tierlm serve vs llama-cpp-python's server on the same GGUF, both started by this script.

    .venv/bin/python benchmarks/serve_bench.py [--concurrency 1 8 32] [--requests-per-level 2] [--no-peer]

Each level runs `concurrency` streaming clients, each sending requests back to back
(128-token prompts, 128 output tokens, ignore_eos) until the level has sent
concurrency * requests-per-level requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import make_prompt_ids, record
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve
from tierlm.loader.gguf import GGUFFile
from tierlm.loader.tokenizer import from_gguf

PROMPT_LEN, OUTPUT_LEN = 128, 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, probe: str, env: dict | None = None) -> subprocess.Popen:
    """Start a server and wait until `probe` answers 200 (polled every 50 ms, so the wait
    also measures start-to-ready); `env` adds to this process's environment."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + probe, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not start")


def start_tierset(config_text: str) -> tuple[subprocess.Popen, str]:
    """`tierlm serve --config` on a TierSet written to a temporary file; (process, base URL)."""
    cfg = Path(tempfile.mkdtemp()) / "tierset.toml"
    cfg.write_text(config_text)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start([sys.executable, "-m", "tierlm.cli", "serve", "--config", str(cfg), "--port", str(port)], url,
                 "/ready"), url


async def one(client: httpx.AsyncClient, url: str, prompt: str) -> dict:
    body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": OUTPUT_LEN, "temperature": 0,
            "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and '"text": ""' not in line:
                stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError(f"no tokens streamed from {url}")
    ttft = stamps[0] - t0
    tpot = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
    return {"ttft": ttft, "tpot": tpot, "tokens": len(stamps), "end": stamps[-1]}


async def level(url: str, prompts: list[str], concurrency: int, per_client: int) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker(w: int) -> list[dict]:
            return [await one(client, url, prompts[(w * per_client + i) % len(prompts)]) for i in range(per_client)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*[worker(w) for w in range(concurrency)]) for r in rs]
        wall = time.perf_counter() - t0

    def pct(key: str, q: float) -> float:
        values = sorted(r[key] for r in results)
        return round(values[min(len(values) - 1, int(q * len(values)))], 4)

    return {"concurrency": concurrency, "requests": len(results),
            "output_tok_per_s": round(sum(r["tokens"] for r in results) / wall, 1),
            "ttft_p50_s": pct("ttft", 0.5), "ttft_p90_s": pct("ttft", 0.9), "ttft_p99_s": pct("ttft", 0.99),
            "tpot_p50_s": pct("tpot", 0.5), "tpot_p90_s": pct("tpot", 0.9),
            "tpot_mean_s": round(statistics.mean(r["tpot"] for r in results), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-level", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    model = resolve("smollm2-135m", default_cache_dir())
    tok = from_gguf(GGUFFile(model), default_cache_dir())
    # Text prompts (llama-cpp-python's server takes no token ids); both tokenizers agree.
    prompts = [tok.decode(make_prompt_ids(tok, PROMPT_LEN, salt=i)) for i in range(64)]
    servers = {"tierlm": ([sys.executable, "-m", "tierlm.cli", "serve", "--max-num-seqs", str(max(args.concurrency))],
                          "/ready")}
    if not args.no_peer:
        servers["llama_cpp"] = ([sys.executable, str(Path(__file__).with_name("llama_cpp_server.py")), str(model)],
                                "/v1/models")
    out: dict = {"prompt_tokens": PROMPT_LEN, "output_tokens": OUTPUT_LEN}
    for name, (cmd, probe) in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        full = cmd + (["--port", str(port)] if name == "tierlm" else [str(port)])
        proc = start(full, url, probe)
        try:
            asyncio.run(level(url, prompts[:1], 1, 1))  # warm-up
            out[name] = [asyncio.run(level(url, prompts, c, args.requests_per_level)) for c in args.concurrency]
            for row in out[name]:
                print(name, row, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    cmd = "benchmarks/serve_bench.py " + " ".join(sys.argv[1:])
    print("recorded in", record("serve_bench", cmd.strip(), out))


if __name__ == "__main__":
    main()
