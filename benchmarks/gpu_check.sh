#!/usr/bin/env bash
# One prepared GPU session (GPU time is short): the `gpu` tests, then the GPU decode
# benchmark, from the source tree with the machine's own PyTorch and Triton. Results land in
# $OUT (default ./gpu-out): versions.txt, nvidia-smi.txt, gpu-tests.txt, gpu_decode.json.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Nothing is built or fetched: the CUDA path needs none of the C++ CPU kernels (without
# them tierlm logs one warning and the CPU path would run their PyTorch reference), and the
# tests and benchmark make their models on the spot (tiny transformers checkpoints; a 1.2B
# random bf16 Llama), needing only torch, triton, tokenizers, safetensors, jinja2, numpy,
# tqdm, pytest and transformers. Packages missing there can travel as wheels in ./.whl.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
"triton", triton.__version__)' 2>&1 | tee "$OUT/versions.txt"
timeout 360 $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/gpu-tests.txt" 2>&1
echo "gpu tests: exit $?"; tail -25 "$OUT/gpu-tests.txt"
timeout 200 $PY benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json" 2>&1 | tail -8
echo "benchmark: exit ${PIPESTATUS[0]}"
