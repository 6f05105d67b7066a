"""Admission rules on a mixed-length workload: Past-Future vs greedy.

    .venv/bin/python benchmarks/admission.py [--runs 3] [--requests 48] [--kv-blocks 96]

Chat requests whose answers range from one number to a long story (max_tokens 256,
temperature 0, so the outputs and lengths are the same under both rules) run through
one engine with a KV pool too small for all of them at once. Greedy admission starts
requests while their prompt blocks are free and preempts (recomputes) when the running
ones outgrow the pool; Past-Future admits only when the predicted peak fits. Both start
with no history (it fills as requests finish). Reports preemptions, tokens recomputed
and output tok/s (min/median/max over runs), and checks the outputs are identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from tierlm import LLM, SamplingParams
from tierlm.scheduler.admission import make_admission

SHORT = ["What is {a} plus {b}? Answer with the number only.", "Is {a} larger than {b}? Answer yes or no.",
         "Name the capital of France in one word."]
LONG = ["Write a long story about a {w} who finds a {v}.", "Explain in detail how a {w} works, step by step.",
        "Write a detailed essay about the history of the {w}."]
WORDS = ["lighthouse", "clock", "river", "dragon", "violin", "bicycle", "garden", "robot"]


def workload(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        if i % 3 == 2:
            text = LONG[i % len(LONG)].format(w=WORDS[i % len(WORDS)], v=WORDS[(i * 3 + 1) % len(WORDS)])
        else:
            text = SHORT[i % len(SHORT)].format(a=i * 7 % 50, b=i * 11 % 50)
        out.append([{"role": "user", "content": text}])
    return out


def run(admission: str, convs: list[list[dict]], kv_blocks: int) -> dict:
    llm = LLM("smollm2-135m", num_kv_blocks=kv_blocks, max_num_seqs=16, max_num_batched_tokens=256,
              enable_prefix_caching=False, admission=admission)
    params = SamplingParams(temperature=0, max_tokens=256)
    llm.generate(["Hello"], SamplingParams(max_tokens=2))  # warm-up (not in the history that matters)
    llm.engine.scheduler.admission = make_admission(admission)  # forget the warm-up's output length
    eng = llm.engine
    computed = 0
    t = time.perf_counter()
    for i, conv in enumerate(convs):
        ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(conv), add_special_tokens=False)
        eng.add_request(str(i), {"prompt_token_ids": ids}, params)
    outputs: dict[int, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                outputs[int(out.request_id)] = out.outputs[0].token_ids
        computed += eng.last_step_size[0]
    dt = time.perf_counter() - t
    produced = sum(len(v) for v in outputs.values())
    prompt = sum(len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c), add_special_tokens=False))
                 for c in convs)
    return {"seconds": dt, "output_tokens": produced, "tok_per_s": produced / dt,
            "preemptions": eng.scheduler.num_preemptions,
            "recomputed_tokens": computed - prompt - produced + len(convs),  # the last token is never fed back
            "outputs": [outputs[i] for i in range(len(convs))]}


def summary(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--kv-blocks", type=int, default=96)
    args = ap.parse_args()
    convs = workload(args.requests)
    rows: dict[str, list[dict]] = {"greedy": [], "past_future": []}
    for _ in range(args.runs):  # interleaved: drift on this noisy machine hits both rules alike
        for mode, done in rows.items():
            r = run(mode, convs, args.kv_blocks)
            done.append(r)
            print(f"{mode:12} {r['tok_per_s']:7.1f} tok/s  preemptions {r['preemptions']:4d}  "
                  f"recomputed {r['recomputed_tokens']:6d}  ({r['seconds']:.1f} s)", flush=True)
    same = all(a["outputs"] == b["outputs"] for a, b in zip(rows["greedy"], rows["past_future"]))
    result = {"requests": args.requests, "kv_blocks": args.kv_blocks, "identical_outputs": same,
              "lengths": sorted(len(o) for o in rows["greedy"][0]["outputs"])}
    for mode, rs in rows.items():
        result[mode] = {k: summary(rs, k) for k in ("tok_per_s", "preemptions", "recomputed_tokens", "seconds")}
    result["throughput_ratio_median"] = round(result["past_future"]["tok_per_s"]["median"]
                                              / result["greedy"]["tok_per_s"]["median"], 3)
    print({k: v for k, v in result.items() if k != "lengths"})
    cmd = "benchmarks/admission.py " + " ".join(sys.argv[1:])
    print("recorded:", record("admission", cmd.strip(), result))


if __name__ == "__main__":
    main()
