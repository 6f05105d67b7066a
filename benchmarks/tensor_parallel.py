"""Tensor parallelism's cost on this machine: single-stream decode time per token of the
bundled SmolLM2 (float32, dense weights: the path tensor parallelism runs) in one process
on every core vs N ranks on cores / N threads each.

    .venv/bin/python benchmarks/tensor_parallel.py [--sizes 1 2] [--tokens 64]

Each size runs in its own process (one tensor-parallel engine per process); a warm-up
request first, then one greedy request of `--tokens` tokens after a 40-token prompt.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record


def measure(size: int, tokens: int) -> dict:
    from tierlm import LLM, SamplingParams

    llm = LLM(dtype="float32", tensor_parallel_size=size, debug_invariants=False)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(range(100, 140))}], params)  # warm-up: probes, first steps
    t0 = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": list(range(200, 240))}], params)
    seconds = time.perf_counter() - t0
    llm.close()
    return {"tensor_parallel_size": size, "ms_per_token": round(seconds / tokens * 1e3, 1),
            "tokens": len(out[0].outputs[0].token_ids)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child run
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.tokens)))
        return
    runs = []
    for size in args.sizes:
        child = subprocess.run([sys.executable, __file__, "--one", str(size), "--tokens", str(args.tokens)],
                               capture_output=True, text=True, check=True)
        runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(runs[-1], flush=True)
    base = runs[0]["ms_per_token"]
    for r in runs:
        r["vs_first"] = round(base / r["ms_per_token"], 2)
    cmd = "benchmarks/tensor_parallel.py " + " ".join(sys.argv[1:])
    print("recorded in", record("tensor_parallel", cmd.strip(), {"model": "smollm2-135m", "dtype": "float32",
                                                                  "runs": runs}))


if __name__ == "__main__":
    main()
