"""Per-machine GEMM probes, run once and remembered on disk: the dtype dense products
run fastest in, and the batch-invariant tile heights of every linear shape.

The results only depend on the BLAS build, the CPU and the thread count, so they are
saved as JSON in the cache dir under a fingerprint of those and reused by later loads
(probing a model's shapes costs ~0.4 s). Remembering the dtype also keeps a machine's
numbers, and so its prefix-cache hashes, the same from one start to the next.
"""

from __future__ import annotations

import json
import os
import platform
import time
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
    # a new candidate list (or cap) is probed afresh
    tiles = ",".join(map(str, linear.CANDIDATE_TILES)) + f"<{linear.MAX_TILE_ELEMENTS}"
    # MKL's reproducibility mode changes its GEMM paths (tierlm/__init__.py sets it).
    cbwr = os.environ.get("MKL_CBWR", "")
    return (f"torch={torch.__version__}|threads={torch.get_num_threads()}|isa={isa}|cpu={cpu}|tiles={tiles}"
            f"|mkl_cbwr={cbwr}")


def _load(path: Path | None) -> dict:
    if path and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache is re-probed, never trusted
    return {}


def _save(path: Path | None, saved: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(path)


def _probe_path(cache_dir: Path | None) -> Path | None:
    return cache_dir / "kernel_probes.json" if cache_dir else None


# A prefill-sized product of a small model's MLP: big enough to reach the GEMM's steady
# speed (AMX bf16 vs AVX2 float32 differ ~6x either way), ~0.1 s on the slower dtype.
_DENSE_PROBE = (256, 576, 1536)


def _gemm_seconds(dtype: torch.dtype, act: torch.dtype) -> float:
    """Best of four timed calls (the first also warms the kernel up): x (in `act`)
    widened or narrowed to `dtype`, multiplied, rounded back."""
    m, k, n = _DENSE_PROBE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(act)
    w = torch.randn(n, k, generator=gen).to(dtype)
    best = float("inf")
    for _ in range(4):  # the first call warms the kernel up
        t0 = time.perf_counter()
        torch.nn.functional.linear(x.to(dtype), w).to(act)
        best = min(best, time.perf_counter() - t0)
    return best


def dense_dtype(choice: str, act: torch.dtype, cache_dir: Path | None) -> torch.dtype:
    """The dtype dense GEMMs run in: `choice` ("bfloat16" / "float32"), or for "auto"
    the faster of the activation dtype and float32 on this machine (float32 activations
    stay float32)."""
    if choice != "auto":
        return getattr(torch, choice)
    if act == torch.float32:
        return act
    path = _probe_path(cache_dir)
    saved = _load(path)
    key = f"dense|{str(act).removeprefix('torch.')}|{fingerprint()}"
    if key not in saved:
        saved[key] = "float32" if _gemm_seconds(torch.float32, act) < _gemm_seconds(act, act) else \
            str(act).removeprefix("torch.")
        _save(path, saved)
    return getattr(torch, saved[key])


def ensure_probed(model: nn.Module, cache_dir: Path | None) -> None:
    """Probe (or load) tile heights for every Linear shape in `model`, in the dtype its
    dense products run in."""
    path = _probe_path(cache_dir)
    fp = fingerprint()
    saved = _load(path)
    for key, heights in saved.get(fp, {}).items():
        k, n, dt = key.split(",")
        linear.PROBED.setdefault((int(k), int(n), dt), tuple(heights))
    shapes = {(m.in_features, m.out_features, m.dense_weight().dtype) for m in model.modules()
              if isinstance(m, linear.Linear) and m.deterministic}
    before = len(linear.PROBED)
    for k, n, dt in sorted(shapes, key=str):
        linear.invariant_tiles(k, n, dt)
    if len(linear.PROBED) != before:
        saved[fp] = {f"{k},{n},{dt}": list(h) for (k, n, dt), h in linear.PROBED.items()}
        _save(path, saved)
