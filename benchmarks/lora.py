"""Multi-LoRA throughput: output tokens/s at 8 and 32 concurrent sequences with four
adapters mixed (round robin over the requests) vs the base model alone, SmolLM2 on
tierlm's kernels; peft's mixed-adapter batch (`adapter_names`, transformers in float32 on
the same GGUF) as the peer in the same run.

    .venv/bin/python benchmarks/lora.py [--concurrency 8 32] [--rank 16] [--no-peer]

Adapters are made with peft (random A and B, rank --rank, on q/k/v/o/gate/up/down: the
most work an adapter can add). Target: LoRA costs <= 25% of throughput at c=32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import make_prompt_ids, record
from tests.lora.adapters import make_adapter, smollm2_skeleton
from tierlm import LLM, LoRARequest, SamplingParams, kernels
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve

PROMPT_LEN, OUTPUT_LEN, ADAPTERS = 64, 128, 4


def bench_tierlm(llm: LLM, prompts: list[list[int]], loras: list[LoRARequest | None]) -> dict:
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompts[0]}] * len(set(loras)), SamplingParams(max_tokens=2),
                 lora_request=list(dict.fromkeys(loras)))  # warm-up: every adapter in a slot
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=loras)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 1)}


def bench_peft(model, prompts: list[list[int]], names: list[str]) -> dict:
    """peft's mixed-adapter batch: one generate call over all prompts (equal lengths)."""
    ids = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(ids[:1], max_new_tokens=2, do_sample=False, adapter_names=names[:1])
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_LEN,
                             min_new_tokens=OUTPUT_LEN, do_sample=False, adapter_names=names)
        dt = time.perf_counter() - t
    n = (out.shape[1] - ids.shape[1]) * len(prompts)
    return {"output_tokens": n, "seconds": round(dt, 2), "tok_per_s": round(n / dt, 1)}


def peft_peer(dirs: list[Path]):
    import peft
    import transformers

    path = resolve("smollm2-135m", default_cache_dir())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                          dtype=torch.float32).eval()
    model = peft.PeftModel.from_pretrained(hf, str(dirs[0]), adapter_name="l0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(str(d), adapter_name=f"l{i}")
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tierlm-lora-bench-"))
    base = smollm2_skeleton()
    dirs = [tmp / f"l{i}" for i in range(ADAPTERS)]
    for i, d in enumerate(dirs):
        make_adapter(base, d, seed=100 + i, r=args.rank, alpha=2 * args.rank, b_scale=0.3)
    adapters = [LoRARequest(f"l{i}", i + 1, str(d)) for i, d in enumerate(dirs)]
    c_max = max(args.concurrency)
    plain = LLM("smollm2-135m", max_num_seqs=c_max, max_num_batched_tokens=512)
    lora = LLM("smollm2-135m", max_num_seqs=c_max, max_num_batched_tokens=512, enable_lora=True,
               max_loras=ADAPTERS, max_lora_rank=args.rank)
    peer = None if args.no_peer else peft_peer(dirs)
    rows = []
    for c in args.concurrency:
        prompts = [make_prompt_ids(plain.tokenizer, PROMPT_LEN, salt=i) for i in range(c)]
        mixed = [adapters[i % ADAPTERS] for i in range(c)]
        row = {"concurrency": c, "base_alone": bench_tierlm(plain, prompts, [None] * c),
               "base_on_lora_engine": bench_tierlm(lora, prompts, [None] * c),
               "four_adapters_mixed": bench_tierlm(lora, prompts, mixed)}
        row["lora_cost"] = round(1 - row["four_adapters_mixed"]["tok_per_s"] / row["base_alone"]["tok_per_s"], 3)
        if peer is not None:
            row["peft_four_adapters_mixed"] = bench_peft(peer, prompts, [f"l{i % ADAPTERS}" for i in range(c)])
            row["ratio_tierlm_over_peft"] = round(row["four_adapters_mixed"]["tok_per_s"]
                                                  / row["peft_four_adapters_mixed"]["tok_per_s"], 2)
        rows.append(row)
        print(row, flush=True)
    cmd = "benchmarks/lora.py " + " ".join(sys.argv[1:])
    print("recorded in", record(f"lora_{kernels.isa()}", cmd.strip(),
                                {"kernels_isa": kernels.isa(), "kernel_threads": kernels.use_threads(),
                                 "rank": args.rank, "prompt_len": PROMPT_LEN,
                                 "output_len": OUTPUT_LEN, "rows": rows}))


if __name__ == "__main__":
    main()
