#!/usr/bin/env bash
# The main job on a built-in, offline default: distil a data2vec2 teacher into a 2-block student, validate by
# zero-shot retrieval, print teacher vs student.
#   scripts/demo.sh [--modality image|text|audio|all|image-text] [--teacher CKPT] [--updates N] [--out DIR]
#   --updates N trains N updates with a warmup of N/5 (the presets: a few hundred updates, 30-40 of warmup).
# image (default): crops of scikit-image's bundled photographs; text: Python's standard-library docstrings;
# audio: synthesised sounds; all: the three at once, three teachers distilled into one student (kd_multimodal);
# image-text: captioned pictures, a random image and text teacher aligned by one student (kd_image_text).
# Without --teacher a small randomly initialised data2vec2 model is created and used (said so in the output).
set -euo pipefail
cd "$(dirname "$0")/.."
MODALITY=image; TEACHER=""; UPDATES=""; OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --modality) MODALITY="$2"; shift 2 ;;
    --teacher) TEACHER="$2"; shift 2 ;;
    --updates) UPDATES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ -n $UPDATES && ! $UPDATES =~ ^[1-9][0-9]*$ ]]; then
  echo "--updates must be a positive number of updates, got '$UPDATES'" >&2; exit 2
fi
case "$MODALITY" in
  image) CONFIG=kd_image; PRESET=demo; DATA_NOTE="scikit-image sample photographs"; RETRIEVAL_ARG=task.cifar100_root ;;
  text) CONFIG=kd_text; PRESET=demo_text; DATA_NOTE="Python standard-library docstrings, fairseq-preprocess"; RETRIEVAL_ARG=task.retrieval_folder ;;
  audio) CONFIG=kd_audio; PRESET=demo_audio; DATA_NOTE="synthesised 16 kHz sounds"; RETRIEVAL_ARG=task.retrieval_folder ;;
  all) CONFIG=kd_multimodal; PRESET=demo_all; DATA_NOTE="the image, text and audio demos' data" ;;
  image-text) CONFIG=kd_image_text; PRESET=demo_image_text; DATA_NOTE="pictures of coloured shapes with captions" ;;
  *) echo "--modality must be image, text, audio, all or image-text, got $MODALITY" >&2; exit 2 ;;
esac
OUT=${OUT:-demo_out$([[ $MODALITY == image ]] || echo "_${MODALITY//-/_}")}
bash scripts/setup.sh
PY=.venv/bin/python
start=$(date +%s)
mkdir -p "$OUT"
echo "[demo] preparing $MODALITY data in $OUT/data ($DATA_NOTE, no download)"
PREPARED=$($PY scripts/demo.py prepare --modality "$MODALITY" --out "$OUT" ${TEACHER:+--teacher "$TEACHER"})
eval "$PREPARED"
if [[ $MODALITY == image-text ]]; then
  TRAIN_ARGS=(task.pairs="$PAIRS" task.valid_pairs="$VALID_PAIRS" task.text_dict="$TEXT_DICT"
              task.cifar10_root="$CIFAR" model.image_teacher="$IMAGE_TEACHER" model.text_teacher="$TEXT_TEACHER")
elif [[ $MODALITY == all ]]; then
  TRAIN_ARGS=(task.image_data="$IMAGE_DATA" task.text_data="$TEXT_DATA" task.audio_data="$AUDIO_DATA"
              task.cifar100_root="$IMAGE_RETRIEVAL" task.text_retrieval_folder="$TEXT_RETRIEVAL"
              task.audio_retrieval_folder="$AUDIO_RETRIEVAL" model.image_teacher="$IMAGE_TEACHER"
              model.text_teacher="$TEXT_TEACHER" model.audio_teacher="$AUDIO_TEACHER")
else
  TRAIN_ARGS=(task.data="$DATA" "$RETRIEVAL_ARG=$RETRIEVAL" model.teacher_checkpoint="$TEACHER")
fi
if [[ $MODALITY == image-text ]]; then
  echo "[demo] teachers: RANDOMLY INITIALISED data2vec2 image and text models of one width ($TEACHER), unaligned;"
  echo "[demo]           for real ones run kd_image_text (README)"
elif [[ $MODALITY == all ]]; then
  echo "[demo] teachers: RANDOMLY INITIALISED data2vec2 image, text and audio models of one width ($TEACHER),"
  echo "[demo]           not pretrained ones; for real ones run kd_multimodal (README)"
elif [[ "$RANDOM_TEACHER" == 1 ]]; then
  echo "[demo] teacher: a RANDOMLY INITIALISED data2vec2 $MODALITY model ($TEACHER), not a pretrained one;"
  echo "[demo]          pass --teacher CKPT to distil a real one"
else
  echo "[demo] teacher: $TEACHER"
fi
rm -rf "$OUT/checkpoints"   # a fresh run each time (the demo is not meant to resume)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/fairseq-hydra-train --config-dir config --config-name "$CONFIG" \
  preset="$PRESET" "${TRAIN_ARGS[@]}" checkpoint.save_dir="$OUT/checkpoints" \
  ${UPDATES:+optimization.max_update=$UPDATES lr_scheduler.warmup_updates=$(( UPDATES / 5 ))} \
  > "$OUT/train.out" 2>&1 || { tail -40 "$OUT/train.out"; echo "[demo] training failed, full output: $OUT/train.out" >&2; exit 1; }
$PY scripts/plot_metrics.py "$OUT/checkpoints/hydra/hydra_train.log" --output "$OUT/metrics.png" >/dev/null
$PY scripts/demo.py report --modality "$MODALITY" --out "$OUT" --seconds $(( $(date +%s) - start )) \
  --random-teacher "$RANDOM_TEACHER"
