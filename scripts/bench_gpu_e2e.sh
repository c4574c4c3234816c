#!/usr/bin/env bash
# End-to-end GPU benchmark: the seed run through fairseq-hydra-train (bf16, model.compile on and off, GPU
# JPEG decoding), one validation round and the data loader alone, beside bench_gpu.sh's core figures from
# the same run (see scripts/bench_gpu_e2e.py). Installs fairseq from a wheelhouse first when it is missing.
#   bash scripts/bench_gpu_e2e.sh                 # on the GPU machine: ~8 min; results in $OUT (or ./)bench_gpu_e2e.{json,md}
#   bash scripts/bench_gpu_e2e.sh --cpu-tiny      # CPU smoke run of the same path, about a minute
# WHEELHOUSE (default .whl) is the folder scripts/build_wheelhouse.sh wrote for this machine's Python and torch,
# e.g. on a machine with internet: bash scripts/build_wheelhouse.sh --node-freeze scripts/gpu_node_packages.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import fairseq, hydra, omegaconf" >/dev/null 2>&1; then
  WHEELHOUSE=${WHEELHOUSE:-.whl}
  if [[ ! -d "$WHEELHOUSE" ]]; then
    echo "[e2e] fairseq is not installed for $PY and there is no wheelhouse at $WHEELHOUSE: build one on a machine" \
         "with internet (bash scripts/build_wheelhouse.sh --node-freeze FILE) and copy it here" >&2
    exit 2
  fi
  PYTHON="$PY" bash scripts/install_offline.sh "$WHEELHOUSE"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/bench_gpu_e2e.py "$@"
