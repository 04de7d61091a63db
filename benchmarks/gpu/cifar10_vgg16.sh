#!/usr/bin/env bash
# GPU check: the published VGG-16 / CIFAR-10 recipe (configs/vgg16_cifar10.toml: PCC pre-training,
# CI over 640 images, the rate list [0.51]*7+[0.90]*5, fine-tuning) at reduced epochs, once with
# PCC and once without, on one H100 in under 8 minutes. It records the accuracies (pre-trained,
# pruned, fine-tuned) and the params/FLOPs removed in benchmarks/RESULTS.md.
#
# Data: the CIFAR-10 JPEG copy (54 MiB, /work/shared/data/cifar10_jpeg.npz) is read from
# .data/cifar10_jpeg.npz in the checkout. .data/ is git-ignored (/.data/ in .gitignore), so a
# device call takes it only when `carry` names it:
#     mkdir -p .data && cp /work/shared/data/cifar10_jpeg.npz .data/
#     device run: command "bash benchmarks/gpu/cifar10_vgg16.sh", carry [".data"]
# The tree plus .data must stay under the call's 64 MiB. Results also go to $OUT (when set):
# RESULTS_cifar10_vgg16.md, both runs' summary.json and report.md.
#
# Settings (environment): EPOCHS (pre-training, default 12), FT_EPOCHS (fine-tuning, 8), DATA,
# WIDTH (1.0 = the published network), TRAIN_LIMIT/TEST_LIMIT (subsets), DEVICE (auto), AMP
# (bf16), RUNS_DIR, RESULTS_FILE, BUILD=1 to build the compiled extension first (CUDA kernels need nvcc; without it the
# GPU ops use the Triton/PyTorch backends). A CPU dry run of the logic:
#     EPOCHS=1 FT_EPOCHS=1 WIDTH=0.125 TRAIN_LIMIT=256 TEST_LIMIT=128 DEVICE=cpu AMP=none \
#         bash benchmarks/gpu/cifar10_vgg16.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DATA=${DATA:-.data/cifar10_jpeg.npz}
EPOCHS=${EPOCHS:-12}
FT_EPOCHS=${FT_EPOCHS:-8}
WIDTH=${WIDTH:-1.0}
DEVICE=${DEVICE:-auto}
AMP=${AMP:-bf16}
RUNS=${RUNS_DIR:-runs/gpu_cifar10_vgg16}
RESULTS=${RESULTS_FILE:-benchmarks/RESULTS.md}

if [ ! -f "$DATA" ]; then
    echo "missing $DATA: copy /work/shared/data/cifar10_jpeg.npz into .data/ and carry .data" >&2
    exit 2
fi
if [ "${BUILD:-0}" = 1 ]; then
    if command -v nvcc >/dev/null 2>&1; then export PCCFAST_CUDA=1; fi
    "$PY" setup.py build_ext --inplace -q
fi
"$PY" -m pccfast info || true
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

LIMITS=()
[ -n "${TRAIN_LIMIT:-}" ] && LIMITS+=(--train-limit "$TRAIN_LIMIT")
[ -n "${TEST_LIMIT:-}" ] && LIMITS+=(--test-limit "$TEST_LIMIT")
EXTRA=()
[ "$DEVICE" != cpu ] && EXTRA+=(--channels-last)
# PCC's GPU kernels are the Triton backend; a tree without them uses the PyTorch reference.
"$PY" -c "import pccfast.ops.pcc_triton" 2>/dev/null || EXTRA+=(--set pcc.backend=torch)
COMMON=(--config configs/vgg16_cifar10.toml --data "npz:$DATA" "${LIMITS[@]}" --width "$WIDTH"
        --epochs "$EPOCHS" --finetune-epochs "$FT_EPOCHS" --amp "$AMP" --device "$DEVICE"
        "${EXTRA[@]}" --no-progress)

START=$(date +%s)
"$PY" -m pccfast run "${COMMON[@]}" --out "$RUNS/pcc"
"$PY" -m pccfast run "${COMMON[@]}" --no-pcc --out "$RUNS/no_pcc"
SECONDS_ALL=$(( $(date +%s) - START ))

ROW=$("$PY" - "$RUNS" "$SECONDS_ALL" "$EPOCHS" "$FT_EPOCHS" "$WIDTH" "$AMP" <<'PYEOF'
import json, sys, platform, datetime
import torch
runs, total, epochs, ft, width, amp = sys.argv[1:]
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
def pct(v):
    return "–" if v is None else f"{100 * v:.2f}"
lines = [
    f"### VGG-16 / CIFAR-10 (JPEG copy), {datetime.date.today()}, {dev}, torch {torch.__version__}",
    "",
    f"configs/vgg16_cifar10.toml at width {width}: {epochs} pre-training + {ft} fine-tuning epochs "
    f"(published: 200 + 200), {amp} autocast, rate list [0.51]*7+[0.90]*5; {total} s for both runs.",
    "",
    "| pre-training | pre-trained % | pruned % | fine-tuned % | params removed % | FLOPs removed % | pretrain s | ci s | prune s | finetune s |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for name, label in (("pcc", "with PCC"), ("no_pcc", "without PCC")):
    s = json.load(open(f"{runs}/{name}/summary.json"))
    sec = s.get("seconds", {})
    lines.append(f"| {label} | {pct(s['pcc_acc'])} | {pct(s['pruned_acc'])} | {pct(s['finetuned_acc'])} "
                 f"| {pct(s['params_removed'])} | {pct(s['flops_removed'])} | "
                 + " | ".join(f"{sec.get(k, 0):.1f}" for k in ("pretrain", "ci", "prune", "finetune")) + " |")
lines.append("")
print("\n".join(lines))
PYEOF
)
echo "$ROW"
[ -f "$RESULTS" ] || printf '# Benchmark results\n\n' > "$RESULTS"
printf '%s\n' "$ROW" >> "$RESULTS"
if [ -n "${OUT:-}" ]; then
    printf '%s\n' "$ROW" > "$OUT/RESULTS_cifar10_vgg16.md"
    for run in pcc no_pcc; do
        cp "$RUNS/$run/summary.json" "$OUT/summary_$run.json"
        cp "$RUNS/$run/report.md" "$OUT/report_$run.md"
    done
fi
