"""Offline throughput: output tokens/s at 1, 8 and 32 concurrent sequences
(128-token prompts, 128 output tokens each), tierlm vs llama-cpp-python on the same GGUF.

    .venv/bin/python benchmarks/offline_throughput.py [--concurrency 1 8 32] [--no-peer]

llama-cpp-python's Python API runs one sequence at a time, so its "concurrent" figure is
the same prompts served back to back: what a user of that API gets.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import llama_cpp_model, make_prompt_ids, record
from tierlm import LLM, SamplingParams
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve

PROMPT_LEN, OUTPUT_LEN = 128, 128


def bench_tierlm(llm: LLM, prompts: list[list[int]]) -> dict:
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 1)}


def bench_llama_cpp(model, prompts: list[list[int]]) -> dict:
    model.reset()
    t = time.perf_counter()
    n = 0
    for p in prompts:
        model.reset()
        for i, _ in enumerate(model.generate(p, temp=0.0, reset=True)):
            if i + 1 >= OUTPUT_LEN:
                break
        n += OUTPUT_LEN
    dt = time.perf_counter() - t
    return {"output_tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-deterministic", action="store_true", help="plain F.linear (batch-variant) kernels")
    args = ap.parse_args()
    llm = LLM("smollm2-135m", dtype=args.dtype, max_num_seqs=max(args.concurrency), max_num_batched_tokens=512,
              deterministic=not args.no_deterministic)
    peer = None
    if not args.no_peer:
        path = resolve("smollm2-135m", default_cache_dir())
        peer = llama_cpp_model(path, n_ctx=512, n_threads=torch.get_num_threads())
    rows = []
    for c in args.concurrency:
        prompts = [make_prompt_ids(llm.tokenizer, PROMPT_LEN, salt=i) for i in range(c)]
        row = {"concurrency": c, "tierlm": bench_tierlm(llm, prompts)}
        if peer is not None:
            row["llama_cpp"] = bench_llama_cpp(peer, prompts)
            row["ratio_tierlm_over_llama_cpp"] = round(row["tierlm"]["tok_per_s"] / row["llama_cpp"]["tok_per_s"], 2)
        rows.append(row)
        print(row, flush=True)
    cmd = "benchmarks/offline_throughput.py " + " ".join(sys.argv[1:])
    name = f"offline_throughput_{args.dtype}" + ("_nondeterministic" if args.no_deterministic else "")
    print("recorded in", record(name, cmd.strip(), {"rows": rows}))


if __name__ == "__main__":
    main()
