"""`auto` routing under a latency budget: the switch to the faster tier when the
preferred one is loaded, and back when it is idle again.

    .venv/bin/python benchmarks/routing.py [--load 24]

One `tierlm serve` with the bundled models as tiers (fast = SmolLM2-135M, deep =
Gemma-3-270M, quality 1 and 2). The budget is 1.5x deep's measured idle latency for the
probe request, so an idle server routes `auto` (tier_mode deep) to deep. Then `--load` streams flood deep
(by name) and the same `auto` requests should move to fast, within budget; once the flood
ends they return to deep. Records each probe's tier and latency against the budget, and
one probe sent to deep by name under the flood (what `auto` avoided).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import record
from benchmarks.serve_bench import start_tierset

CONFIG = """
[tiers.fast]
model = "smollm2-135m"
quality = 1
prompt_price_per_mtok = 0.02
completion_price_per_mtok = 0.08
[tiers.deep]
model = "gemma3-270m"
quality = 2
prompt_price_per_mtok = 0.10
completion_price_per_mtok = 0.40
"""
PROBE = "Explain in two sentences why the sky is blue."
PROBE_TOKENS = 32


async def probe(c: openai.AsyncOpenAI, model: str, budget_ms: float | None = None) -> dict:
    extra = {"ignore_eos": True}
    if budget_ms is not None:  # `auto` in deep mode: the best quality that fits the budget
        extra["max_latency_ms"] = budget_ms
        extra["tier_mode"] = "deep"
    t0 = time.perf_counter()
    try:
        raw = await c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROBE}], max_tokens=PROBE_TOKENS, temperature=0,
            extra_body=extra)
    except openai.APIStatusError as e:  # no tier fits: the refusal is a result too
        return {"tier": str(e.status_code), "latency_ms": round((time.perf_counter() - t0) * 1e3),
                "message": e.message}
    latency = (time.perf_counter() - t0) * 1e3
    return {"tier": raw.headers["x-tierlm-tier"], "latency_ms": round(latency)}


async def flood(c: openai.AsyncOpenAI, streams: int, stop: asyncio.Event) -> None:
    async def loop(i: int) -> None:
        while not stop.is_set():
            await c.completions.create(model="deep", prompt=f"Story {i}: once upon a time", max_tokens=96,
                                       temperature=0, extra_body={"ignore_eos": True})

    await asyncio.gather(*(loop(i) for i in range(streams)))


def selected(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {f"{s.labels['tier']}/{s.labels['reason']}": s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "tierlm:tier_selected_total"}


async def run(url: str, args) -> dict:
    c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    for model in ("fast", "deep"):
        await probe(c, model)  # warm both paths
    idle = {m: [(await probe(c, m))["latency_ms"] for _ in range(3)] for m in ("fast", "deep")}
    budget = round(1.5 * max(idle["deep"]))
    phases: dict[str, list[dict]] = {"idle": [], "deep_loaded": [], "after": []}
    for _ in range(args.probes):
        phases["idle"].append(await probe(c, "auto", budget))
    stop = asyncio.Event()
    task = asyncio.create_task(flood(c, args.load, stop))
    await asyncio.sleep(8)  # the flood is running and queued
    for _ in range(args.probes):
        phases["deep_loaded"].append(await probe(c, "auto", budget))
    phases["deep_loaded_by_name"] = [await probe(c, "deep")]  # what auto avoided
    stop.set()
    await task
    await asyncio.sleep(2)
    for _ in range(args.probes):
        phases["after"].append(await probe(c, "auto", budget))
    return {"idle_latency_ms": idle, "budget_ms": budget, "phases": phases,
            "within_budget": {p: sum(r["latency_ms"] <= budget for r in rows if r["tier"] in ("fast", "deep"))
                              for p, rows in phases.items()},
            "tier_selected_total": selected(url)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", type=int, default=24)
    ap.add_argument("--probes", type=int, default=5)
    args = ap.parse_args()
    proc, url = start_tierset(CONFIG)
    try:
        result = asyncio.run(run(url, args))
    finally:
        proc.terminate()
        proc.wait(60)
    for phase, rows in result["phases"].items():
        print(f"{phase:12} " + "  ".join(f"{r['tier']}:{r['latency_ms']}ms" for r in rows))
    print({k: v for k, v in result.items() if k != "phases"})
    cmd = "benchmarks/routing.py " + " ".join(sys.argv[1:])
    print("recorded:", record("routing", cmd.strip(), {"load_streams": args.load, **result}))


if __name__ == "__main__":
    main()
