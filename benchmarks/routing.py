"""TierSet routing under rising load: a mixed workload of the four `tier_mode`s, the tiers
they choose, the latency budgets they meet and what each request costs.

    .venv/bin/python benchmarks/routing.py [--levels 1 4 8 16 32] [--rounds 2]

One `tierlm serve --config` with the bundled models as tiers, priced as in
configs/tierset.toml (fast = SmolLM2-135M, quality 1; deep = Gemma-3-270M, quality 2, 5x
dearer; `balanced_cost_weight` 1, so balanced wants deep only when it is over 5x better).
The latency budget is 1.5x deep's idle latency for the probe request (a 32-token chat
answer), measured first. At each load level, that many clients each send `--rounds`
rounds of one request per mode (`model: "auto"`, `max_latency_ms` = the budget), the
modes rotated per client so that all four are in flight together. Per level and mode:
the tiers chosen, requests refused (429: no tier fits the load now; 400: none ever could),
served requests within the budget, latency percentiles, and the cost per served request
from its usage at the tier's prices.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import record
from benchmarks.serve_bench import start_tierset

PRICES = {"fast": (0.02, 0.08), "deep": (0.10, 0.40)}  # USD per million prompt / completion tokens
CONFIG = f"""
default_tier = "fast"
balanced_cost_weight = 1.0
[tiers.fast]
model = "smollm2-135m"
quality = 1
prompt_price_per_mtok = {PRICES['fast'][0]}
completion_price_per_mtok = {PRICES['fast'][1]}
max_num_seqs = 32
[tiers.deep]
model = "gemma3-270m"
quality = 2
prompt_price_per_mtok = {PRICES['deep'][0]}
completion_price_per_mtok = {PRICES['deep'][1]}
max_num_seqs = 16
"""
MODES = ("fixed", "max", "deep", "balanced")
PROBE = "Explain in two sentences why the sky is blue."
PROBE_TOKENS = 32


async def ask(c: openai.AsyncOpenAI, model: str, mode: str | None = None, budget_ms: float | None = None) -> dict:
    extra: dict = {"ignore_eos": True}
    if mode is not None:
        extra.update(tier_mode=mode, max_latency_ms=budget_ms)
    t0 = time.perf_counter()
    try:
        raw = await c.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": PROBE}], max_tokens=PROBE_TOKENS, temperature=0,
            extra_body=extra)
    except openai.APIStatusError as e:  # no tier fits: the refusal is a result too
        return {"status": e.status_code, "latency_ms": (time.perf_counter() - t0) * 1e3}
    latency = (time.perf_counter() - t0) * 1e3
    tier, usage = raw.headers["x-tierlm-tier"], raw.parse().usage
    prompt_price, completion_price = PRICES[tier]
    cost = (usage.prompt_tokens * prompt_price + usage.completion_tokens * completion_price) / 1e6
    return {"status": 200, "tier": tier, "latency_ms": latency, "cost_usd": cost}


def summarize(rows: list[dict], budget_ms: float) -> dict:
    served = [r for r in rows if r["status"] == 200]
    lat = sorted(r["latency_ms"] for r in served)
    out = {"requests": len(rows),
           "tiers": {t: sum(r.get("tier") == t for r in served) for t in PRICES},
           "refused": {str(s): sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows} - {200})},
           "served_within_budget": sum(x <= budget_ms for x in lat), "served": len(served)}
    if served:
        out["latency_ms_p50"] = round(statistics.median(lat))
        out["latency_ms_p90"] = round(lat[min(len(lat) - 1, int(0.9 * len(lat)))])
        out["cost_usd_per_served_request"] = sum(r["cost_usd"] for r in served) / len(served)
    return out


async def level(c: openai.AsyncOpenAI, clients: int, rounds: int, budget_ms: float) -> dict:
    async def client(i: int) -> list[tuple[str, dict]]:
        order = MODES[i % 4:] + MODES[:i % 4]  # every mode in flight at once
        return [(mode, await ask(c, "auto", mode, budget_ms)) for _ in range(rounds) for mode in order]

    t0 = time.perf_counter()
    results = [row for rows in await asyncio.gather(*(client(i) for i in range(clients))) for row in rows]
    wall = time.perf_counter() - t0
    return {"clients": clients, "wall_s": round(wall, 1),
            "modes": {m: summarize([r for mode, r in results if mode == m], budget_ms) for m in MODES}}


def selected(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {f"{s.labels['tier']}/{s.labels['reason']}": s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == "tierlm:tier_selected_total"}


async def run(url: str, args) -> dict:
    c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    for tier in PRICES:
        await ask(c, tier)  # warm both tiers (and their step-time estimates)
    idle = {t: [round((await ask(c, t))["latency_ms"]) for _ in range(3)] for t in PRICES}
    budget = round(1.5 * max(idle["deep"]))
    levels = []
    for clients in args.levels:
        levels.append(await level(c, clients, args.rounds, budget))
        print(table_rows(levels[-1], budget), flush=True)
        await asyncio.sleep(2)  # the tiers drain: the next level starts from idle
    return {"idle_latency_ms": idle, "budget_ms": budget, "rounds": args.rounds, "levels": levels,
            "tier_selected_total": selected(url)}


def table_rows(lv: dict, budget: float) -> str:
    lines = []
    for mode, s in lv["modes"].items():
        tiers = ", ".join(f"{t} {n}" for t, n in s["tiers"].items() if n) or "-"
        refused = ", ".join(f"{k} x{v}" for k, v in s["refused"].items()) or "-"
        cost = f"{s['cost_usd_per_served_request'] * 1e6:.2f}" if s["served"] else "-"
        lines.append(f"| {lv['clients']} | {mode} | {tiers} | {refused} | {s['served_within_budget']}/{s['served']} "
                     f"| {s.get('latency_ms_p50', '-')} / {s.get('latency_ms_p90', '-')} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="concurrent clients per level")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the four modes per client and level")
    args = ap.parse_args()
    proc, url = start_tierset(CONFIG)
    try:
        result = asyncio.run(run(url, args))
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"idle latency (ms) {result['idle_latency_ms']}; budget {result['budget_ms']} ms")
    print("| clients | mode | tiers chosen | refused | served within budget | latency p50 / p90 (ms) "
          "| USD per million served requests |")
    for lv in result["levels"]:
        print(table_rows(lv, result["budget_ms"]))
    print("tier_selected_total", result["tier_selected_total"])
    cmd = "benchmarks/routing.py " + " ".join(sys.argv[1:])
    print("recorded:", record("routing", cmd.strip(), result))


if __name__ == "__main__":
    main()
