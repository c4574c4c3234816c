#!/usr/bin/env bash
# The main job on a built-in, offline default: distil a data2vec2 teacher into a 2-block student on crops of
# scikit-image's bundled photographs, validate by zero-shot retrieval, print teacher vs student.
#   scripts/demo.sh [--teacher base_imagenet.pt] [--updates N] [--out DIR]
# Without --teacher a small randomly initialised data2vec2 ViT is created and used (said so in the output).
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=""; UPDATES=""; OUT=demo_out
while [[ $# -gt 0 ]]; do
  case "$1" in
    --teacher) TEACHER="$2"; shift 2 ;;
    --updates) UPDATES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
PY=.venv/bin/python
start=$(date +%s)
mkdir -p "$OUT"
echo "[demo] preparing data in $OUT/data (scikit-image sample photographs, no download)"
eval "$($PY scripts/demo.py prepare --out "$OUT" ${TEACHER:+--teacher "$TEACHER"})"
if [[ "$RANDOM_TEACHER" == 1 ]]; then
  echo "[demo] teacher: a RANDOMLY INITIALISED data2vec2 ViT ($TEACHER), not a pretrained model;"
  echo "[demo]          pass --teacher base_imagenet.pt to distil the real one"
else
  echo "[demo] teacher: $TEACHER"
fi
rm -rf "$OUT/checkpoints"   # a fresh run each time (the demo is not meant to resume)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/fairseq-hydra-train --config-dir config --config-name kd_image \
  preset=demo task.data="$DATA" task.cifar100_root="$RETRIEVAL" model.teacher_checkpoint="$TEACHER" \
  checkpoint.save_dir="$OUT/checkpoints" ${UPDATES:+optimization.max_update=$UPDATES} \
  > "$OUT/train.out" 2>&1 || { tail -40 "$OUT/train.out"; echo "[demo] training failed, full output: $OUT/train.out" >&2; exit 1; }
$PY scripts/plot_metrics.py "$OUT/checkpoints/hydra/hydra_train.log" --output "$OUT/metrics.png" >/dev/null
$PY scripts/demo.py report --out "$OUT" --seconds $(( $(date +%s) - start )) --random-teacher "$RANDOM_TEACHER"
