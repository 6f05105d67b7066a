#!/usr/bin/env bash
# One prepared GPU session (GPU time is short): install tierlm against the machine's CUDA
# PyTorch, run the `gpu` tests, then the GPU decode benchmark. Results land in $OUT
# (default ./gpu-out): versions.txt, nvidia-smi.txt, install.txt, gpu-tests.txt, gpu_decode.json.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# An offline GPU machine installs tierlm's dependencies from ./wheels when it is there
# (prepare it beforehand: pip download -d wheels . pytest transformers). Without a build of
# the C++ CPU kernels tierlm runs their PyTorch reference, which the CUDA path does not use.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())
import triton; print("triton", triton.__version__)' > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
FIND=(); [ -d wheels ] && FIND=(--no-index --find-links wheels)
$PY -m pip install -q "${FIND[@]}" --no-build-isolation -e '.[test]' > "$OUT/install.txt" 2>&1 \
  || $PY -m pip install -q "${FIND[@]}" --no-build-isolation --no-deps -e . >> "$OUT/install.txt" 2>&1 \
  || echo "install failed (running from the source tree)"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 420 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests: exit $?"; tail -15 "$OUT/gpu-tests.txt"
timeout 300 $PY benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json"
echo "benchmark: exit $?"
