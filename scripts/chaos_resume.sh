#!/usr/bin/env bash
# Crash-safety soak test: an uninterrupted tiny run, then the same run SIGKILLed N times at random moments
# (halfway through a checkpoint write, halfway through the copy onto checkpoint_last.pt, or after a random
# delay) and restarted with the same command each time. Checks that every checkpoint file loads after
# every kill, that every restart resumes from the newest checkpoint_last.pt, and that the final student
# equals the uninterrupted run's. The logic lives in tests/training/test_chaos_resume.py (its pytest test is
# the short version).
#   bash scripts/chaos_resume.sh [--kills 10] [--updates 200] [--save-interval 4] [--seed 0]
#                                [--workdir DIR] [--teacher base_imagenet.pt --data /path/to/images]
# Defaults generate a tiny random teacher and a few images; --workdir keeps the runs for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || { echo "[chaos] $PY not found: run scripts/setup.sh first (or set PYTHON)" >&2; exit 2; }
# tests/ on the path: the soak test shares the suite's helpers (tests/conftest.py)
PYTHONPATH="tests${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" tests/training/test_chaos_resume.py "$@"
