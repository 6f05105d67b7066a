"""Model load to first token, in a fresh process each run (imports included).

    .venv/bin/python benchmarks/load_time.py [--runs 3]

Run 1 may pay for a cold page cache and tokenizer build; later runs are "warm"
(file pages cached, tokenizer.json cached).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record

CHILD = r"""
import time, json
t0 = time.perf_counter()
from tierlm import LLM, SamplingParams
t_import = time.perf_counter()
llm = LLM("smollm2-135m")
t_load = time.perf_counter()
llm.generate("Hello", SamplingParams(max_tokens=1, temperature=0))
t_first = time.perf_counter()
print(json.dumps({"import_s": round(t_import - t0, 3), "load_s": round(t_load - t_import, 3),
                  "first_token_s": round(t_first - t_load, 3), "total_s": round(t_first - t0, 3)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(i + 1, runs[-1], flush=True)
    warm = runs[1:] or runs
    best = min(r["total_s"] for r in warm)
    cmd = "benchmarks/load_time.py " + " ".join(sys.argv[1:])
    print("recorded in", record("load_time", cmd.strip(), {"runs": runs, "warm_best_total_s": best}))


if __name__ == "__main__":
    main()
