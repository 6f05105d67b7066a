"""Run workloads against a target: levels of concurrency, repeated runs, summaries.

A level sends the workload's requests through `concurrency` workers, each taking the
next request as soon as its last one finished. Throughput is output tokens over the
level's wall time; TTFT and TPOT percentiles are over its requests. Each level runs
`runs` times; the table and JSON give min / median / max over the runs.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time

from tierlm.bench.targets import Timing
from tierlm.bench.workloads import Workload, copy_prompt_ids, prompt_ids

METRICS = ("output_tok_per_s", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def level_metrics(timings: list[Timing], wall: float) -> dict:
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings]
    return {"requests": len(timings), "output_tokens": sum(t.tokens for t in timings), "wall_s": round(wall, 3),
            "output_tok_per_s": round(sum(t.tokens for t in timings) / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 0.5), 4), "ttft_p90_s": round(percentile(ttft, 0.9), 4),
            "tpot_p50_s": round(percentile(tpot, 0.5), 5), "tpot_p90_s": round(percentile(tpot, 0.9), 5)}


async def run_level(target, prompts: list[list[int]], output_tokens: int, concurrency: int) -> dict:
    pending = iter(prompts)
    timings: list[Timing] = []

    async def worker() -> None:
        for ids in pending:  # shared iterator: each worker takes the next prompt
            timings.append(await target.stream(ids, output_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return level_metrics(timings, time.perf_counter() - t0)


def summarise(runs: list[dict]) -> dict:
    return {m: {"min": min(r[m] for r in runs), "median": statistics.median(r[m] for r in runs),
                "max": max(r[m] for r in runs)} for m in METRICS}


async def run_workload(target, w: Workload, runs: int, log=print) -> dict:
    levels = []
    for level, c in enumerate(w.concurrency):
        results = []
        for run in range(runs):
            # Fresh prompts per level and run (salted by both): nothing is served from the
            # prefix cache (except W4, whose fixed copy prompt may be: it measures decoding).
            salt = 1000 * (level * runs + run)
            prompts = [copy_prompt_ids(target.tokenizer) if w.copy else
                       prompt_ids(target.tokenizer, w.prompt_tokens, salt=salt + i) for i in range(w.requests)]
            results.append(await run_level(target, prompts, w.output_tokens, c))
            log(f"{w.name} concurrency {c} run {run + 1}/{runs}: {results[-1]}")
        levels.append({"concurrency": c, "runs": results, "summary": summarise(results)})
    return {"description": w.description, "prompt_tokens": len(prompts[0]), "output_tokens": w.output_tokens,
            "requests": w.requests, "levels": levels}


async def run_all(target, workloads: list[Workload], runs: int, log=print) -> dict:
    await target.stream(prompt_ids(target.tokenizer, 16, salt=-1), 4)  # warm-up: first-use costs
    return {w.name: await run_workload(target, w, runs, log) for w in workloads}


def table(results: dict) -> str:
    """One row per workload level: median [min-max] over the runs."""
    def cell(s: dict, scale: float = 1.0, digits: int = 1) -> str:
        return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]"

    head = f"{'workload':<10}{'conc':>5}  {'output tok/s':<22}{'TTFT p50 ms':<24}{'TTFT p90 ms':<24}{'TPOT p50 ms':<20}"
    lines = [head, "-" * len(head)]
    for name, w in results.items():
        for lv in w["levels"]:
            s = lv["summary"]
            lines.append(f"{name:<10}{lv['concurrency']:>5}  {cell(s['output_tok_per_s']):<22}"
                         f"{cell(s['ttft_p50_s'], 1000, 0):<24}{cell(s['ttft_p90_s'], 1000, 0):<24}"
                         f"{cell(s['tpot_p50_s'], 1000, 1):<20}")
    return "\n".join(lines)
