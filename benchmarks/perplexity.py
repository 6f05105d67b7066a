"""Perplexity of the bundled SmolLM2 on a fixed text, 512-token windows, tierlm vs transformers.

    .venv/bin/python benchmarks/perplexity.py [--text benchmarks/data/gfdl-1.3.txt]

The text is the GNU Free Documentation License 1.3 (verbatim copying permitted), 23 KB.
Both engines score the same token ids (tierlm's tokenizer, which matches llama.cpp's):
non-overlapping 512-token windows, every token after a window's first is predicted.
transformers loads the same GGUF (dequantised to fp32).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record  # noqa: E402
from tierlm import LLM  # noqa: E402
from tierlm.engine.llm_engine import default_cache_dir  # noqa: E402
from tierlm.loader.bundled import resolve  # noqa: E402

WINDOW = 512


def windows(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i : i + WINDOW]) > 1]


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
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    text = Path(args.text).read_text()
    results = {"text": Path(args.text).name, "text_bytes": len(text.encode()), "window": WINDOW}
    for dtype in ("float32", "bfloat16"):
        llm = LLM("smollm2-135m", dtype=dtype, max_num_batched_tokens=WINDOW)
        ids = llm.tokenizer.encode(text)
        chunks = windows(ids)
        results["tokens"], results["windows"] = len(ids), len(chunks)
        results[f"tierlm_{dtype}"] = round(perplexity(llm.engine.prompt_logits, chunks), 4)
        print(dtype, results[f"tierlm_{dtype}"], flush=True)
    if not args.no_peer:
        from transformers import AutoModelForCausalLM

        path = resolve("smollm2-135m", default_cache_dir())
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            results["transformers_float32"] = round(perplexity(lambda c: hf(torch.tensor([c])).logits[0], chunks), 4)
        print("transformers", results["transformers_float32"])
    cmd = "benchmarks/perplexity.py " + " ".join(sys.argv[1:])
    print("recorded in", record("perplexity", cmd.strip(), results))


if __name__ == "__main__":
    main()
