"""Memory read bandwidth the kernels' pool reaches: the single-stream decode roofline.

    .venv/bin/python benchmarks/bandwidth.py [--threads 2] [--mb 1024] [--reps 7]

Reads a buffer far larger than the caches once per repetition on tierlm's worker pool
(64-bit words, 8 independent lanes per thread) and reports the best and median GB/s.
A model's decode step reads its quantized weights once, so tokens/s <= bandwidth /
weight bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from tierlm import _kernels, kernels


def measure(threads: int, mb: int, reps: int) -> dict:
    kernels.use_threads(threads)
    buf = torch.ones(mb * 2**20 // 8, dtype=torch.int64)  # written once: resident, not zero pages
    _kernels.read_all(buf)
    speeds = []
    for _ in range(reps):
        t = time.perf_counter()
        _kernels.read_all(buf)
        speeds.append(buf.nbytes / (time.perf_counter() - t) / 1e9)
    return {"threads": threads, "mb": mb, "best_gb_s": round(max(speeds), 2),
            "median_gb_s": round(statistics.median(speeds), 2), "runs_gb_s": [round(s, 2) for s in speeds]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    out = measure(args.threads, args.mb, args.reps)
    print(out)
    record("bandwidth" + (f"_{args.tag}" if args.tag else ""), " ".join(["benchmarks/bandwidth.py", *sys.argv[1:]]),
           {"kernels_isa": kernels.isa(), **out})


if __name__ == "__main__":
    main()
