"""The quantized-matmul kernels (tierlm/kernels) on every weight matrix of a bundled model
they cover, against the aten int4 / int8 kernels the engine runs today and the machine's
measured read bandwidth.

    .venv/bin/python benchmarks/quant_matmul.py [--model smollm2-135m|gemma3-270m] [--rows 1 4 32]

SmolLM2: all 211 matrices (Q4_1 projections, Q8_0 embedding / output). Gemma-3: all 127
(Q5_0, Q4_K, Q6_K, Q8_0; the embedding / output is Q8_0). For each ISA path and row
count: the time of one pass over the matrices (what one decode step multiplies), the
weight bytes streamed per second, and the share of the measured read bandwidth (torch.sum
over 1 GiB, same threads). The aten baseline runs the same matrices as the engine does for
generated rows: Q4_1 through `_weight_int4pack_mm_for_cpu`, the others through
`_weight_int8pack_mm` (requantized per output channel).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from tierlm import kernels
from tierlm.engine.builder import default_cache_dir
from tierlm.kernels import reference
from tierlm.layers.quant import Int4Weight, Int8Weight, gguf_q4
from tierlm.loader.bundled import resolve
from tierlm.loader.gguf import GGUFFile


def read_bandwidth() -> float:
    big = torch.ones(2**28)  # 1 GiB of float32
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    return big.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    g = GGUFFile(resolve(args.model, default_cache_dir()))
    packed, aten = [], []
    for t in g.tensors.values():
        if t.ggml_type in reference.FORMATS and len(t.shape) == 2:
            n, k = t.shape
            raw = torch.from_numpy(np.asarray(t.raw).copy())
            packed.append(kernels.pack(raw, t.ggml_type, n, k))
            aten.append(Int4Weight(gguf_q4(t.raw, t.ggml_type, t.shape)) if t.ggml_type == reference.Q4_1
                        else Int8Weight(t.dequantize()))
    weight_bytes = sum(w.nbytes() for w in packed)
    bandwidth = read_bandwidth()
    results = {"model": args.model, "isa_paths": kernels.supported(), "weight_matrices": len(packed), "weight_mb": weight_bytes / 1e6,
               "read_bandwidth_gb_s": round(bandwidth, 1), "threads": torch.get_num_threads(), "runs": []}
    print(f"{len(packed)} matrices, {weight_bytes / 1e6:.1f} MB; read bandwidth {bandwidth:.1f} GB/s")
    for rows in args.rows:
        xs = {w.in_features: torch.randn(rows, w.in_features) for w in packed}
        quantized = {k: kernels.quantize_rows(x) for k, x in xs.items()}
        cases = {"aten": lambda xs=xs: [w.mm(xs[w.in_features].bfloat16()) for w in aten]}
        for path in kernels.supported():
            if path not in ("reference", "scalar"):
                cases[path] = lambda p=path, q=quantized: [kernels.gemm(q[w.in_features], w, path=p) for w in packed]
        for name, fn in cases.items():
            fn()
            times = sorted(_timed(fn) for _ in range(args.repeats))
            best, median = times[0], statistics.median(times)
            run = {"rows": rows, "kernel": name, "median_ms": round(median * 1e3, 2), "best_ms": round(best * 1e3, 2),
                   "weight_gb_s": round(weight_bytes / median / 1e9, 1),
                   "bandwidth_share": round(weight_bytes / median / 1e9 / bandwidth, 3)}
            results["runs"].append(run)
            print(f"rows {rows:3} {name:12} {run['median_ms']:8.2f} ms  {run['weight_gb_s']:5.1f} GB/s  "
                  f"{100 * run['bandwidth_share']:5.1f}% of read bandwidth")
    cmd = "benchmarks/quant_matmul.py " + " ".join(sys.argv[1:])
    name = "kernels" if args.model == "smollm2-135m" else f"kernels_{args.model}"
    print("recorded in", record(name, cmd.strip(), results))


if __name__ == "__main__":
    main()
