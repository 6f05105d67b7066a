"""CPU performance workloads W1-W4 of `tierlm bench`, with llama-cpp-python as the peer in
the same run, on the bundled SmolLM2-135M Q4_1 GGUF.

    .venv/bin/python benchmarks/cpu_perf.py [--w1] [--w2] [--w3] [--w4] [--runs 3] [--no-deterministic]

W1 single stream (32-token prompt, 256 output tokens: output tok/s from request to last
token) and W2 long prompt (1,000 tokens, 16 out: TTFT) run tierlm's engine and
llama-cpp-python's `Llama` in this process, alternating run by run, each run with a
fresh prompt (no prefix-cache or KV reuse on either side); the ratio is taken per run.
W3 (64 requests, 200-token prompts, 128 output tokens, concurrency 1 / 8 / 32) runs
`tierlm bench`'s client against a `tierlm serve` process and reads the server's peak RSS.
W4 (a code listing to reproduce, 128 greedy tokens) compares the engine with n-gram
speculation (4 drafts) to the same engine without, and checks the outputs are identical.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import llama_cpp_model, record
from benchmarks.serve_bench import free_port, start
from tierlm import LLM, SamplingParams
from tierlm.bench import runner
from tierlm.bench.targets import HTTPTarget
from tierlm.bench.workloads import STANDARD, copy_prompt_ids, prompt_ids
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve
from tierlm.loader.model_loader import load_tokenizer


def spread(values: list[float]) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def tierlm_stream(llm: LLM, ids: list[int], n: int) -> tuple[float, float]:
    """(seconds to first token, seconds to last token) for one greedy request."""
    eng = llm.engine
    t0 = time.perf_counter()
    eng.add_request(f"bench-{t0}", {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=n,
                                                                              ignore_eos=True))
    first = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def llama_stream(model, ids: list[int], n: int) -> tuple[float, float]:
    model.reset()
    t0 = time.perf_counter()
    first = None
    for i, _ in enumerate(model.generate(ids, temp=0.0, reset=True)):
        if first is None:
            first = time.perf_counter() - t0
        if i + 1 >= n:
            break
    return first, time.perf_counter() - t0


def single_stream(llm: LLM, peer, workload, runs: int) -> dict:
    rows = []
    for run in range(runs):
        ids = prompt_ids(llm.tokenizer, workload.prompt_tokens, salt=run + 1)
        ours, theirs = tierlm_stream(llm, ids, workload.output_tokens), llama_stream(peer, ids, workload.output_tokens)
        rows.append({"tierlm_ttft_s": ours[0], "tierlm_tok_per_s": workload.output_tokens / ours[1],
                     "llama_cpp_ttft_s": theirs[0], "llama_cpp_tok_per_s": workload.output_tokens / theirs[1]})
        print(workload.name, run, {k: round(v, 4) for k, v in rows[-1].items()}, flush=True)
    out = {k: spread([r[k] for r in rows]) for k in rows[0]}
    out["ratio_tok_per_s"] = spread([r["tierlm_tok_per_s"] / r["llama_cpp_tok_per_s"] for r in rows])
    out["ratio_ttft"] = spread([r["tierlm_ttft_s"] / r["llama_cpp_ttft_s"] for r in rows])
    return out


def speculative(runs: int, deterministic: bool, dense_dtype: str) -> dict:
    """W4: the copy-heavy prompt, greedy, with n-gram speculation (4 drafts) vs without."""
    w = STANDARD["w4"]
    plain = LLM("smollm2-135m", deterministic=deterministic, enable_prefix_caching=False, dense_dtype=dense_dtype)
    spec = LLM("smollm2-135m", deterministic=deterministic, enable_prefix_caching=False, num_speculative_tokens=4,
               dense_dtype=dense_dtype)
    for llm in (plain, spec):  # warm-up
        tierlm_stream(llm, prompt_ids(llm.tokenizer, 64, salt=0), 8)
    rows = []
    for run in range(runs):
        ids = copy_prompt_ids(plain.tokenizer)
        sched = spec.engine.scheduler
        drafted, accepted = sched.draft_tokens, sched.accepted_tokens
        outs = {}
        row = {}
        for name, llm in (("plain", plain), ("spec", spec)):
            t0 = time.perf_counter()
            out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=w.output_tokens,
                                                                          ignore_eos=True))[0].outputs[0]
            row[f"{name}_tok_per_s"] = len(out.token_ids) / (time.perf_counter() - t0)
            outs[name] = out.token_ids
        row["speedup"] = row["spec_tok_per_s"] / row["plain_tok_per_s"]
        row["acceptance"] = (sched.accepted_tokens - accepted) / max(1, sched.draft_tokens - drafted)
        row["identical"] = outs["plain"] == outs["spec"]
        rows.append(row)
        print("w4", run, row, flush=True)
    out = {k: spread([r[k] for r in rows]) for k in ("plain_tok_per_s", "spec_tok_per_s", "speedup", "acceptance")}
    out["identical_all_runs"] = all(r["identical"] for r in rows)
    out["prompt_tokens"] = len(ids)
    out["sample_output"] = spec.tokenizer.decode(outs["spec"])
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def throughput(runs: int, deterministic: bool, requests: int, levels: list[int], quantization: str,
               server_args: list[str]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tierlm.cli", "serve", "--port", str(port), "--max-num-seqs", str(max(levels)),
           "--quantization", quantization, *server_args]
    proc = start(cmd + ([] if deterministic else ["--no-deterministic"]), url, "/ready")
    try:
        tok = load_tokenizer("smollm2-135m", default_cache_dir())
        w = replace(STANDARD["w3"], requests=requests, concurrency=tuple(levels))
        target = HTTPTarget(url, "smollm2-135m", None, tok)

        async def go() -> dict:
            try:
                return await runner.run_all(target, [w], runs)
            finally:
                await target.close()

        result = asyncio.run(go())["w3"]
        result["server_peak_rss_mb"] = round(peak_rss_mb(proc.pid), 1)
        print(runner.table({"w3": result}), flush=True)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--w1", action="store_true")
    ap.add_argument("--w2", action="store_true")
    ap.add_argument("--w3", action="store_true")
    ap.add_argument("--w4", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--w3-requests", type=int, default=64)
    ap.add_argument("--w3-concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--no-deterministic", action="store_true")
    ap.add_argument("--quantization", default="auto", help="tierlm's --quantization (W1-W3)")
    ap.add_argument("--dense-dtype", default="auto", help="tierlm's --dense-dtype (W1-W4)")
    ap.add_argument("--tag", default="", help="suffix for the results file (e.g. the machine kind)")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                    help="extra `tierlm serve` flags for W3, e.g. --kv-cache-gb 0.5 (must come last)")
    args = ap.parse_args()
    chosen = [w for w in ("w1", "w2", "w3", "w4") if getattr(args, w)] or ["w1", "w2", "w3", "w4"]
    results: dict = {"deterministic": not args.no_deterministic, "quantization": args.quantization,
                     "dense_dtype": args.dense_dtype, "runs": args.runs}
    if {"w1", "w2"} & set(chosen):
        llm = LLM("smollm2-135m", deterministic=not args.no_deterministic, enable_prefix_caching=False,
                  quantization=args.quantization, dense_dtype=args.dense_dtype)
        results["dense_dtype_resolved"] = str(llm.engine.dense_dtype).removeprefix("torch.")
        peer = llama_cpp_model(resolve("smollm2-135m", default_cache_dir()), n_ctx=2048,
                               n_threads=torch.get_num_threads())
        tierlm_stream(llm, prompt_ids(llm.tokenizer, 64, salt=0), 8)  # warm-up both
        llama_stream(peer, prompt_ids(llm.tokenizer, 64, salt=0), 8)
        for name in ("w1", "w2"):
            if name in chosen:
                results[name] = single_stream(llm, peer, STANDARD[name], args.runs)
    if "w4" in chosen:
        results["w4"] = speculative(args.runs, not args.no_deterministic, args.dense_dtype)
    if "w3" in chosen:
        results["w3"] = throughput(args.runs, not args.no_deterministic, args.w3_requests, args.w3_concurrency,
                                   args.quantization, ["--dense-dtype", args.dense_dtype, *args.server_args])
        results["server_args"] = args.server_args
    cmd = "benchmarks/cpu_perf.py " + " ".join(sys.argv[1:])
    suffix = "_" + "_".join(chosen) + ("_c" + "_".join(map(str, args.w3_concurrency)) if "w3" in chosen else "")
    suffix += "_nondeterministic" if args.no_deterministic else ""
    suffix += f"_{args.quantization}" if args.quantization != "auto" else ""
    suffix += f"_dense_{args.dense_dtype}" if args.dense_dtype != "auto" else ""
    suffix += "_" + "".join(a.strip("-").replace("-", "_") for a in args.server_args) if args.server_args else ""
    suffix += f"_{args.tag}" if args.tag else ""
    print("recorded in", record("cpu_perf" + suffix, cmd.strip(), results))


if __name__ == "__main__":
    main()
