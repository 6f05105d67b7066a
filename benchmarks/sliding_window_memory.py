"""KV memory held by one long Gemma-3-270M request, with out-of-window blocks released.

    .venv/bin/python benchmarks/sliding_window_memory.py [--prompt-tokens 4000] [--chunk 512]

Gemma 3 has 15 sliding-window layers (window 512) and 3 global layers. The engine
steps one request with a long prompt (the GFDL text, repeated as needed) and records
the most KV blocks it held at once, against what the same request needs when every
layer keeps its whole context (the classic paged layout).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from tierlm import LLM, SamplingParams
from tierlm.kv_cache.sizing import kv_block_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=16)
    args = ap.parse_args()
    llm = LLM("gemma3-270m", max_num_batched_tokens=args.chunk)
    eng = llm.engine
    text = (Path(__file__).with_name("data") / "gfdl-1.3.txt").read_text()
    ids = llm.tokenizer.encode(text)
    while len(ids) < args.prompt_tokens:
        ids += ids
    ids = ids[: args.prompt_tokens]
    eng.add_request("long", {"prompt_token_ids": ids},
                    SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True))
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, eng.kv.pool.num_usable - eng.kv.pool.num_free)
    cfg, layout = eng.model_config, eng.runner.layout
    block_bytes = kv_block_bytes(cfg, eng.kv.block_size, eng.config.torch_dtype)
    total = args.prompt_tokens + args.output_tokens
    full_blocks = -(-total // eng.kv.block_size) * len(layout.groups)  # every group keeps everything
    results = {
        "model": "gemma3-270m", "dtype": eng.config.dtype, "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens, "chunk": args.chunk, "sliding_window": cfg.sliding_window,
        "kv_groups": [{"window": g.window, "layers": list(g.layers)} for g in layout.groups],
        "block_bytes": block_bytes,
        "peak_blocks_held": peak, "peak_mib_held": round(peak * block_bytes / 2**20, 2),
        "blocks_without_release": full_blocks, "mib_without_release": round(full_blocks * block_bytes / 2**20, 2),
        "saving_ratio": round(full_blocks / peak, 2),
    }
    for k, v in results.items():
        print(f"{k}: {v}")
    cmd = "benchmarks/sliding_window_memory.py " + " ".join(sys.argv[1:])
    print("recorded in", record("sliding_window_memory", cmd.strip(), results))


if __name__ == "__main__":
    main()
