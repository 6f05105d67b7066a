"""int8 KV cache vs the default (bf16) cache on the bundled models, same process:

1. perplexity over the GFDL text in 512-token windows (every window, bf16 compute);
2. capacity: KV blocks in a 1 GiB pool, and the most 1,000-token requests (500-token
   prompts, all different, + 500 output tokens) running at once when more are submitted
   than fit (max_num_seqs 256): the scheduler admits a request only when its whole
   1,000 tokens fit, so the running set grows to what the pool holds and stays there; the
   run stops once no request has been admitted for 20 steps with some still waiting.

    .venv/bin/python benchmarks/kv_int8.py [--models smollm2-135m gemma3-270m] [--requests 128]

W3 throughput at c=32 comes from benchmarks/cpu_perf.py (`--w3 --w3-concurrency 32`, with
`--server-args --kv-cache-dtype int8` for int8).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import make_prompt_ids, record
from benchmarks.perplexity import perplexity, windows
from tierlm import LLM, SamplingParams

TEXT = Path(__file__).with_name("data") / "gfdl-1.3.txt"


def capacity(model: str, kind: str, requests: int) -> dict:
    llm = LLM(model, kv_cache_dtype=kind, kv_cache_gb=1.0, max_num_seqs=256, max_num_batched_tokens=512,
              enable_prefix_caching=False)
    eng, sched = llm.engine, llm.engine.scheduler
    params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)
    for i in range(requests):
        eng.add_request(f"r{i}", {"prompt_token_ids": make_prompt_ids(llm.tokenizer, 500, salt=i)}, params)
    peak, still, t0 = 0, 0, time.perf_counter()
    while sched.waiting and still < 20:
        before = len(sched.waiting)
        eng.step()
        peak = max(peak, len(sched.running))
        still = still + 1 if len(sched.waiting) == before else 0
    out = {"blocks": eng.kv.pool.num_blocks, "peak_running_1000_token_requests": peak,
           "all_admitted": not sched.waiting, "preemptions": sched.num_preemptions,
           "seconds": round(time.perf_counter() - t0, 1)}
    llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--requests", type=int, default=160)
    args = ap.parse_args()
    text = TEXT.read_text()
    rows = []
    for model in args.models:
        for kind in ("auto", "int8"):
            llm = LLM(model, kv_cache_dtype=kind, max_num_batched_tokens=512)
            chunks = windows(llm.tokenizer.encode(text), 512)
            ppl = perplexity(llm.engine.prompt_logits, chunks)
            llm.close()
            row = {"model": model, "kv_cache_dtype": kind, "perplexity": round(ppl, 4),
                   "windows": len(chunks), **capacity(model, kind, args.requests)}
            rows.append(row)
            print(row, flush=True)
    summary = []
    for model in args.models:
        a, b = (next(r for r in rows if r["model"] == model and r["kv_cache_dtype"] == k) for k in ("auto", "int8"))
        summary.append({"model": model, "perplexity_change_pct": round(100 * (b["perplexity"] / a["perplexity"] - 1), 3),
                        "blocks_ratio": round(b["blocks"] / a["blocks"], 3),
                        "concurrent_ratio": round(b["peak_running_1000_token_requests"]
                                                  / a["peak_running_1000_token_requests"], 3)})
        print(summary[-1], flush=True)
    out = record(f"kv_int8_{torch.backends.cpu.get_cpu_capability().lower()}",
                 "python benchmarks/kv_int8.py " + " ".join(sys.argv[1:]), {"rows": rows, "summary": summary})
    print("recorded in", out)


if __name__ == "__main__":
    main()
