#!/usr/bin/env bash
# GPU study: benchmarks/accuracy/study_gpu_vgg16.toml (VGG-16 full width on CIFAR-10, the
# published recipe, the paired design) reduced to fit one device call of at most 10 minutes on
# one H100: one seed, arms no_pcc and pcc, EPOCHS pre-training epochs, CI and random pruning at
# 84.6% FLOPs removed under the fixed allocation, FT_EPOCHS fine-tuning epochs, the feature
# record (PCC and CI share per layer); data on the GPU, bf16 autocast, channels_last.
#
#   mkdir -p .data && cp /work/shared/data/cifar10_jpeg.npz .data/
#   device run: command "bash benchmarks/gpu/study_vgg16.sh", carry [".data"], timeout_s 600
#   bash benchmarks/gpu/study_vgg16.sh --dry-run      # the same logic on the CPU at toy sizes
#
# The study stops cleanly after LIMIT_S seconds (default 480) with every finished cell in
# study.csv; running the script again in the same RUNS_DIR resumes it. study.csv, study.md and the
# plot go to $OUT when it is set: copy the table into benchmarks/RESULTS.md with device and date.
# Settings (environment): EPOCHS (20), FT_EPOCHS (10), DATA (.data/cifar10_jpeg.npz), RUNS_DIR,
# LIMIT_S, SEEDS ([0]), TARGETS ([0.846]).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RUNS=${RUNS_DIR:-runs/gpu_study_vgg16}
DATA=${DATA:-.data/cifar10_jpeg.npz}
EPOCHS=${EPOCHS:-20}
FT_EPOCHS=${FT_EPOCHS:-10}
SETS=(--set "study.seeds=${SEEDS:-[0]}" --set "study.targets=${TARGETS:-[0.846]}"
      --set 'study.criteria=["ci", "random"]' --set "study.finetune_targets=[0.846]")
if [[ "${1:-}" == "--dry-run" ]]; then
  SETS+=(--set data.spec=digits --set model.width=0.0625 --set data.train_limit=256
         --set data.test_limit=128 --set pretrain.epochs=1 --set finetune.epochs=1
         --set pretrain.amp=none --set finetune.amp=none --set pretrain.channels_last=false
         --set finetune.channels_last=false --set ci.images=64 --set prune.bn_images=128
         --set pretrain.batch_size=64 --set finetune.batch_size=64 --set run.device=cpu
         --set data.val_images=64 --set study.feature_images=32)
else
  if [[ ! -f "$DATA" ]]; then
    echo "missing $DATA: copy /work/shared/data/cifar10_jpeg.npz into .data/ and carry .data" >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  SETS+=(--set "data.spec=npz:$DATA" --set "pretrain.epochs=$EPOCHS"
         --set "finetune.epochs=$FT_EPOCHS" --set "pretrain.eval_every=$EPOCHS"
         --set "finetune.eval_every=$FT_EPOCHS")
fi
"$PY" -m pccfast info || true
START=$SECONDS
timeout --signal=INT "${LIMIT_S:-480}" "$PY" -m pccfast study \
  --config benchmarks/accuracy/study_gpu_vgg16.toml --out "$RUNS" --no-progress "${SETS[@]}"
rc=$?
echo "=== study: exit $rc after $((SECONDS - START))s (124: stopped at LIMIT_S; run again to resume)"
[[ -f "$RUNS/study.md" ]] && cat "$RUNS/study.md"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  for f in study.csv features.csv study.md plots/accuracy_vs_flops.png plots/features.png \
           plots/paired_differences.png; do
    [[ -f "$RUNS/$f" ]] && cp "$RUNS/$f" "$OUT/"
  done
fi
[[ $rc -eq 0 || $rc -eq 124 ]]
