"""Batch-invariant GEMM tile probes, run once per machine and remembered on disk.

Probing every linear shape of a model costs ~0.4 s; the result only depends on the
BLAS build, the CPU and the thread count, so it is saved as JSON in the cache dir
under a fingerprint of those and reused by later loads.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from torch import nn

from tierlm.layers import linear


def fingerprint() -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    tiles = ",".join(map(str, linear.CANDIDATE_TILES))  # a new candidate list is probed afresh
    return f"torch={torch.__version__}|threads={torch.get_num_threads()}|isa={isa}|cpu={cpu}|tiles={tiles}"


def ensure_probed(model: nn.Module, dtype: torch.dtype, cache_dir: Path | None) -> None:
    """Probe (or load) tile heights for every Linear shape in `model`."""
    path = cache_dir / "kernel_probes.json" if cache_dir else None
    fp = fingerprint()
    saved: dict = {}
    if path and path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}  # a damaged cache is re-probed, never trusted
    for key, heights in saved.get(fp, {}).items():
        k, n, dt = key.split(",")
        linear.PROBED.setdefault((int(k), int(n), dt), tuple(heights))
    shapes = {(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, linear.Linear) and m.deterministic}
    before = len(linear.PROBED)
    for k, n in sorted(shapes):
        linear.invariant_tiles(k, n, dtype)
    if path and len(linear.PROBED) != before:
        table = {f"{k},{n},{dt}": list(h) for (k, n, dt), h in linear.PROBED.items()}
        saved[fp] = table
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(path)
