"""Tenant fairness on one `tierlm serve` (policy "fair": weighted virtual token counters).

    .venv/bin/python benchmarks/fairness.py [--window 60] [--flood 48]

1. Light tenant alone: sequential streaming requests, TTFT p90 (its solo value).
2. The same while a flooding tenant keeps `--flood` streams busy (closed loop, more than
   the server's 32 seats, so requests queue; 16-80 output tokens each): the light
   tenant's TTFT p90 / solo p90 (goal: <= 2).
3. Two flooding tenants with weights 2 and 1, the same request shape, `--flood` streams
   each for `--window` seconds: tokens each was served inside the window (counted as they
   stream) and the split against the 2:1 weights (goal: within 10%).
The official openai client drives every request; the three phases run `--runs` times on
one server and the ratios are reported as min / median / max.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import openai

from benchmarks.common import record
from benchmarks.serve_bench import start_tierset

CONFIG = """
[tiers.fast]
model = "smollm2-135m"
max_num_seqs = 32
max_num_batched_tokens = 256  # shorter steps: a newcomer waits less for the running one
[tenants.light]
api_keys = ["key-light"]
[tenants.flood]
api_keys = ["key-flood"]
[tenants.heavy2]
api_keys = ["key-heavy2"]
weight = 2
[tenants.heavy1]
api_keys = ["key-heavy1"]
weight = 1
"""
SENTENCE = "Write a short story about a lighthouse keeper who finds a message in a bottle. "
PROMPT = SENTENCE * 3  # --prompt-repeat sets it
LIGHT_TOKENS, FLOOD_TOKENS = 16, (16, 80)  # flood lengths vary (seeded), so seats free up unevenly
_serial = iter(range(10**9))


def prompt() -> str:
    """Every request its own prompt (numbered first): no tenant rides on the prefix cache."""
    return f"Request {next(_serial)}. {PROMPT}"


def client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)


async def ttft(c: openai.AsyncOpenAI, max_tokens: int) -> float:
    t0 = time.perf_counter()
    first = None
    stream = await c.completions.create(model="fast", prompt=prompt(), max_tokens=max_tokens, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
    return first


async def light_ttfts(c: openai.AsyncOpenAI, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(await ttft(c, LIGHT_TOKENS))
        await asyncio.sleep(0.5)  # a light tenant: one request now and then
    return out


async def flood(c: openai.AsyncOpenAI, streams: int, stop: asyncio.Event, served: list[float]) -> None:
    """`streams` closed-loop streams; the arrival time of every received token goes to `served`."""

    rng = random.Random(streams)

    async def loop() -> None:
        while not stop.is_set():
            stream = await c.completions.create(model="fast", prompt=prompt(), max_tokens=rng.randint(*FLOOD_TOKENS),
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    served.append(time.perf_counter())

    await asyncio.gather(*(loop() for _ in range(streams)))


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else xs[0]


async def run(url: str, args) -> dict:
    light = client(url, "key-light")
    await light_ttfts(light, 2)  # warm the path
    solo = await light_ttfts(light, args.light)
    stop, sink = asyncio.Event(), []
    task = asyncio.create_task(flood(client(url, "key-flood"), args.flood, stop, sink))
    await asyncio.sleep(10)  # the flood fills the seats and the queue
    loaded = await light_ttfts(light, args.light)
    stop.set()
    await task
    served: dict[str, list[float]] = {"heavy2": [], "heavy1": []}
    stop2 = asyncio.Event()
    tasks = [asyncio.create_task(flood(client(url, f"key-{t}"), args.flood, stop2, served[t])) for t in served]
    await asyncio.sleep(10)  # past the start, both tenants backlogged
    t0 = time.perf_counter()
    await asyncio.sleep(args.window)
    t1 = time.perf_counter()
    stop2.set()
    await asyncio.gather(*tasks)
    tokens = {t: sum(t0 <= at < t1 for at in log) for t, log in served.items()}
    split = tokens["heavy2"] / max(1, tokens["heavy1"])
    return {"light_solo_ttft_s": [round(x, 3) for x in solo], "light_flooded_ttft_s": [round(x, 3) for x in loaded],
            "light_solo_p90_s": round(p90(solo), 3), "light_flooded_p90_s": round(p90(loaded), 3),
            "ttft_p90_ratio": round(p90(loaded) / p90(solo), 2),
            "ttft_median_ratio": round(statistics.median(loaded) / statistics.median(solo), 2),
            "window_s": args.window, "tokens_in_window": tokens, "weighted_split": round(split, 3),
            "split_error_vs_2to1": round(abs(split - 2) / 2, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=float, default=60)
    ap.add_argument("--flood", type=int, default=48)
    ap.add_argument("--light", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-repeat", type=int, default=10, help="prompt = this many 17-token sentences")
    args = ap.parse_args()
    global PROMPT
    PROMPT = SENTENCE * args.prompt_repeat
    proc, url = start_tierset(CONFIG)
    runs = []
    try:
        for _ in range(args.runs):
            runs.append(asyncio.run(run(url, args)))
            print(runs[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    summary = {key: {"min": min(r[key] for r in runs), "median": statistics.median(r[key] for r in runs),
                     "max": max(r[key] for r in runs)}
               for key in ("ttft_p90_ratio", "ttft_median_ratio", "weighted_split", "split_error_vs_2to1")}
    print(summary)
    cmd = "benchmarks/fairness.py " + " ".join(sys.argv[1:])
    print("recorded:", record("fairness", cmd.strip(), {"flood_streams": args.flood,
                                                        "prompt_sentences": args.prompt_repeat,
                                                        "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
