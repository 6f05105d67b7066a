"""Two engines in one process (a TierSet's tiers), both busy: is each engine thread driving
torch's 2-thread intra-op pool on 2 cores oversubscription that costs throughput?

    .venv/bin/python benchmarks/tier_threads.py [--runs 3]

Each configuration runs in its own process (the intra-op thread count is per process):
  concurrent  - both engines step at once from their own threads, 2 intra-op threads each
                (what `tierlm serve --config` does);
  serialized  - the same, with a process-wide lock so one forward runs at a time;
  one_thread  - concurrent, 1 intra-op thread per process.
Each engine generates 8 requests of 100 prompt / 64 output tokens; output tok/s of both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(mode: str, runs: int) -> list[float]:
    import torch

    if mode == "one_thread":
        torch.set_num_threads(1)
    from tierlm import LLM, SamplingParams
    from tierlm.bench.workloads import prompt_ids
    from tierlm.runner import model_runner

    if mode == "serialized":
        lock, forward = threading.Lock(), model_runner.ModelRunner._forward

        def locked(self, *a, **k):
            with lock:
                return forward(self, *a, **k)

        model_runner.ModelRunner._forward = locked
    engines = [LLM(enable_prefix_caching=False), LLM(enable_prefix_caching=False)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

    def work(llm: LLM, salt: int) -> None:
        llm.generate([{"prompt_token_ids": prompt_ids(llm.tokenizer, 100, salt=salt + i)} for i in range(8)], params)

    work(engines[0], -100)  # warm-up (dense copies built on first prefill)
    work(engines[1], -200)
    rates = []
    for run in range(runs):
        threads = [threading.Thread(target=work, args=(llm, 1000 * run + 100 * i)) for i, llm in enumerate(engines)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates.append(2 * 8 * 64 / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.runs)))
        return
    from benchmarks.common import record

    results = {}
    for mode in ("concurrent", "serialized", "one_thread"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--runs", str(args.runs)],
                             capture_output=True, text=True, check=True)
        rates = json.loads(out.stdout.strip().splitlines()[-1])
        results[mode] = {"min": round(min(rates), 1), "median": round(statistics.median(rates), 1),
                         "max": round(max(rates), 1)}
        print(mode, results[mode], flush=True)
    print("recorded in", record("tier_threads", f"benchmarks/tier_threads.py --runs {args.runs}", results))


if __name__ == "__main__":
    main()
