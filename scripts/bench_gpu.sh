#!/usr/bin/env bash
# Single-GPU benchmark of the distillation core (KD update, validation embedding and search); see
# scripts/bench_gpu.py. Needs only python3 with torch (no fairseq, faiss, omegaconf or hydra, no pip install).
#   bash scripts/bench_gpu.sh              # on the GPU machine: ~5-7 min; results in $OUT (or ./)bench_gpu.{json,md}
#   bash scripts/bench_gpu.sh --cpu-tiny   # CPU smoke run of the same code path, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" scripts/bench_gpu.py "$@"
