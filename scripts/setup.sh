#!/usr/bin/env bash
# Build (or refresh) the project's virtual environment in .venv. Idempotent: when the pinned requirement
# files have not changed since the last successful run, it only prints where the environment is.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3.11}
STAMP="$VENV/.mmkd-setup-stamp"
want=$(cat requirements/*.txt setup.py | sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[setup] environment up to date: $VENV"
  exit 0
fi

command -v "$PY" >/dev/null || { echo "[setup] $PY not found: install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 2; }
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
start=$(date +%s)
pip install -q --upgrade pip
pip install -q -r requirements/runtime.txt
# fairseq-fixed declares torchaudio as a requirement; letting pip resolve it would download a second,
# different torch (GBs) next to the pinned one. --no-deps skips that. Its C++ extensions compile against
# the torch installed above, which only works without build isolation (an isolated build env would fetch
# yet another torch). The compile takes ~6 minutes once; pip caches the wheel afterwards.
pip install -q --no-deps --no-build-isolation -r requirements/fairseq.txt
pip install -q -r requirements/test.txt
pip install -q --no-deps -e .
"$VENV/bin/python" -c "import fairseq, fairseq_mmkd, faiss, torch; print('[setup] fairseq', fairseq.__version__, '| torch', torch.__version__)"
echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - start ))s: $VENV"
