"""Fuzz a running `tierlm serve` and count statuses: our own request fuzzer (the suite's
strategy from tests/server/test_fuzz.py, many more cases), then schemathesis against the
server's /openapi.json when its CLI is given. Prints a JSON summary; any 5xx is a defect.

    .venv/bin/tierlm serve --port 8013 --max-model-len 256 &
    .venv/bin/python benchmarks/fuzz_api.py --url http://127.0.0.1:8013 --cases 3000 \
        --schemathesis /path/to/venv/bin/schemathesis --examples 1000

`--max-model-len 256` bounds the work of a schema-valid request (schemathesis sends the
largest max_tokens the schema allows). schemathesis runs in its own virtual environment
(it pins versions of our test dependencies). Its `positive_data_acceptance` check is left
out: the schema states types and single-field ranges, not cross-field rules (min_tokens
<= max_tokens, token ids below the vocabulary size), so valid-looking data may get a 400.
A schema-valid chat request may generate 64 x 256 tokens: each request may take 300 s.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def own_fuzzer(url: str, cases: int) -> dict:
    from hypothesis import HealthCheck, given, settings

    from tests.server.test_fuzz import requests

    counts: collections.Counter = collections.Counter()
    client = httpx.Client(base_url=url, timeout=120)

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=requests())
    def run(case):
        path, body = case
        r = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        counts[r.status_code] += 1
        if r.status_code >= 500:
            print(f"5xx: {path} {json.dumps(body)[:300]} -> {r.text[:300]}", file=sys.stderr)

    started = time.perf_counter()
    run()
    return {"cases": sum(counts.values()), "statuses": dict(sorted(counts.items())),
            "seconds": round(time.perf_counter() - started, 1)}


def schemathesis(cli: str, url: str, examples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        har = Path(tmp) / "run.har"
        cmd = [cli, "run", f"{url}/openapi.json", "-n", str(examples), "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--continue-on-failure",
               "--request-timeout", "300", "--generation-deterministic",
               "--report", "har", "--report-har-path", str(har)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # failures are reported
        entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    counts = collections.Counter(e["response"]["status"] for e in entries)
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("- ", "___"))]
    return {"command": " ".join(cmd[1:]), "cases": len(entries), "statuses": dict(sorted(counts.items())),
            "exit_code": proc.returncode, "check_failures": failures[:40],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--cases", type=int, default=3000, help="cases for our own fuzzer")
    ap.add_argument("--schemathesis", default=None, help="path to the schemathesis CLI (skipped if absent)")
    ap.add_argument("--examples", type=int, default=1000, help="schemathesis examples per operation")
    args = ap.parse_args()
    summary = {"own_fuzzer": own_fuzzer(args.url, args.cases)}
    if args.schemathesis:
        summary["schemathesis"] = schemathesis(args.schemathesis, args.url, args.examples)
    health = httpx.get(f"{args.url}/health", timeout=10)
    summary["health_after"] = health.status_code
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
