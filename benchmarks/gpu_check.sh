#!/usr/bin/env bash
# One prepared GPU session (GPU time is short): build tierlm against the machine's CUDA
# PyTorch, run the `gpu` tests, then the GPU decode benchmark. Everything lands in $OUT
# (default ./gpu-out): gpu-tests.txt, gpu_decode.json, nvidia-smi.txt, versions.txt.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import torch, sys; print(torch.__version__, torch.version.cuda, torch.cuda.is_available()); import triton; print("triton", triton.__version__)' \
  > "$OUT/versions.txt" 2>&1
# The C++ CPU kernels build from source; no dependency is fetched (the machine may be offline).
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.txt"; exit 1; }
timeout 420 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests: exit $?"; tail -15 "$OUT/gpu-tests.txt"
timeout 300 $PY benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json"
echo "benchmark: exit $?"
