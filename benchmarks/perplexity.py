"""Perplexity of a bundled model on a fixed text, in fixed windows, tierlm vs transformers.

    .venv/bin/python benchmarks/perplexity.py [--model smollm2-135m] [--window 512]
        [--text benchmarks/data/gfdl-1.3.txt]

The text is the GNU Free Documentation License 1.3 (verbatim copying permitted), 23 KB.
Both engines score the same token ids (tierlm's tokenizer, which matches llama.cpp's):
non-overlapping windows (512 tokens by default), every token after a window's first is
predicted. Windows longer than a model's sliding window exercise its local layers.
transformers loads the same GGUF (dequantised to fp32). The bf16 engine also scores every
position in its decode weight format (what generated tokens run on).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from tierlm import LLM
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids) - 1, size) if len(ids[i : i + size]) > 1]


def nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    lp = torch.log_softmax(logits[:-1].float(), dim=-1)
    target = torch.tensor(ids[1:])
    return float(-lp.gather(1, target[:, None]).sum()), len(ids) - 1


def perplexity(score, chunks) -> float:
    total, count = 0.0, 0
    for c in chunks:
        s, n = nll(score(c), c)
        total, count = total + s, count + n
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", default=str(Path(__file__).with_name("data") / "gfdl-1.3.txt"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    text = Path(args.text).read_text()
    results = {"model": args.model, "text": Path(args.text).name, "text_bytes": len(text.encode()),
               "window": args.window}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(args.model, dtype=dtype, max_num_batched_tokens=args.window)
        ids = llm.tokenizer.encode(text)
        chunks = windows(ids, args.window)
        results["tokens"], results["windows"] = len(ids), len(chunks)
        results[f"tierlm_{dtype}"] = round(perplexity(llm.engine.prompt_logits, chunks), 4)
        print(dtype, results[f"tierlm_{dtype}"], flush=True)
    # bf16 again with every position scored as a generated token. On tierlm's kernels (the
    # bundled GGUFs) that is the same format, so the same figure; on the PyTorch path, the
    # decode weight format (int4 from 4-bit blocks, int8 for other quantized tensors).
    results["tierlm_bfloat16_decode_format"] = round(
        perplexity(lambda c: llm.engine.prompt_logits(c, prompt_len=1), chunks), 4)
    print("bfloat16 decode format", results["tierlm_bfloat16_decode_format"], flush=True)
    if not args.no_peer:
        from transformers import AutoModelForCausalLM

        path = resolve(args.model, default_cache_dir())
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            results["transformers_float32"] = round(perplexity(lambda c: hf(torch.tensor([c])).logits[0], chunks), 4)
        print("transformers", results["transformers_float32"])
    cmd = "benchmarks/perplexity.py " + " ".join(sys.argv[1:])
    name = "perplexity" if args.model == "smollm2-135m" else f"perplexity_{args.model}"
    print("recorded in", record(f"{name}_w{args.window}" if args.window != 512 else name, cmd.strip(), results))


if __name__ == "__main__":
    main()
