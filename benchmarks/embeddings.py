"""Embedding throughput: sentences per second at batch 1 and 64, all-MiniLM-L6-v2 on
tierlm (LLM.embed: the batch-invariant encoder) vs sentence-transformers (its own padded
batches, float32) on the same sentences in the same run, with the cosine between the two.

    .venv/bin/python benchmarks/embeddings.py [--batch 1 64] [--sentences 512] [--threads 2]

Sentences: varied lengths (5-60 words) drawn from a fixed word list, seeded.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from tierlm import LLM, kernels
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve

WORDS = ["the", "a", "man", "woman", "child", "dog", "cat", "horse", "plays", "eats", "runs", "over", "under", "quickly", "slowly", "bread", "music", "river", "city", "market", "train", "station", "morning", "evening", "bright", "dark", "small", "large", "ancient", "modern", "computer", "garden", "reads", "writes", "builds", "paints", "table", "window", "mountain", "ocean", "forest", "road"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))).capitalize() + "." for _ in range(n)]


def timed(fn, texts: list[str], batch: int) -> tuple[float, list]:
    fn(texts[:batch])  # warm-up
    out = []
    t = time.perf_counter()
    for i in range(0, len(texts), batch):
        out.extend(fn(texts[i:i + batch]))
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sentence_transformers import SentenceTransformer

    llm = LLM("all-minilm-l6-v2")
    st = SentenceTransformer(str(resolve("all-minilm-l6-v2", default_cache_dir())), device="cpu")
    texts = sentences(args.sentences)
    rows = []
    for b in args.batch:
        n = min(len(texts), 64 if b == 1 else len(texts))  # batch 1 is slow for both: fewer sentences
        ours_s, ours = timed(lambda x: [o.outputs.embedding for o in llm.embed(x)], texts[:n], b)
        ref_s, ref = timed(lambda x, b=b: list(st.encode(x, batch_size=b, convert_to_tensor=True)), texts[:n], b)
        cos = F.cosine_similarity(torch.tensor(ours), torch.stack(ref).float()).min().item()
        row = {"batch": b, "sentences": n, "tierlm_per_s": round(n / ours_s, 1),
               "sentence_transformers_per_s": round(n / ref_s, 1), "ratio": round(ref_s / ours_s, 2),
               "min_cosine": round(cos, 6)}
        rows.append(row)
        print(row, flush=True)
    cmd = "benchmarks/embeddings.py " + " ".join(sys.argv[1:])
    print("recorded in", record(f"embeddings_{kernels.isa()}", cmd.strip(),
                                {"kernels_isa": kernels.isa(), "torch_threads": torch.get_num_threads(),
                                 "rows": rows}))


if __name__ == "__main__":
    main()
