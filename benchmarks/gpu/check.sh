#!/usr/bin/env bash
# The GPU check: one device call of at most 8 minutes on one H100/H200.
#
#   builds the extension with its CUDA kernels (sm_90), runs the GPU tests, then prints the
#   performance table of SPEC section 6:
#     - PCC forward+backward, bf16, batch 256, ResNet-50 shapes (channel/sample, pixel/sample,
#       abs and square): fused Triton vs eager naive vs torch.compile of naive, with time, peak
#       extra memory and the roofline floor measured on the card;
#     - a full training step (bf16 autocast, channels_last) without PCC and with the regulariser
#       on all scored layers, Triton backend and torch reference: VGG-16 at batch 256 (32px)
#       and ResNet-50 at 224px batch 128 (target: at most 1.15x the step without PCC);
#     - CI for the VGG-16-CIFAR and ResNet-50 scored shapes: CUDA fast path vs CPU vs brute force,
#       the end-to-end CICollector pass over 640 ResNet-50 images (target under 10 s),
#       and the batched Jacobi eigensolver vs torch.linalg.eigh;
#     - FLOPs removed vs time saved (benchmarks/speedup_table.py): pruned VGG-16, ResNet-56,
#       ResNet-50, MobileNetV2, EfficientNet-B0 vs their originals, with and without round_to,
#       batch 1 and 64, CUDA events, bf16, channels_last.
#
#   usage (from the repository root):  bash benchmarks/gpu/check.sh [--dry-run]
#   Tables and logs go to $OUT when it is set (the device tool's output folder), else to
#   benchmarks/gpu/out/. Copy the printed tables into benchmarks/RESULTS.md with device and date.
#   --dry-run runs every step on the CPU at toy sizes (no build of the CUDA kernels), to check
#   the script itself before spending device time.
#
#   Time: every step has its own limit and all share BUDGET seconds (default 450, leaving the
#   device call's start and transfers inside 8 minutes); a step that would start past the budget
#   is skipped and reported. The quick GPU tests and the benchmarks come first; the exhaustive
#   compiled sweep of tests/triton_cases.py (~500 kernel specialisations to compile) comes last,
#   spread over WORKERS processes (default 8) when pytest-xdist is installed. Rows of the PCC
#   table print as they finish, so a step cut short still leaves its rows in the log.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/gpu/out}
mkdir -p "$OUTDIR"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
status=0
END=$((SECONDS + ${BUDGET:-450}))

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
  local name=$1 limit=$2
  shift 2
  local left=$((END - SECONDS))
  if [[ $left -lt 15 ]]; then
    echo "=== $name: skipped, the budget is spent"
    status=1
    return 0
  fi
  [[ $limit -gt $left ]] && limit=$left
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout --signal=INT "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  [[ $rc -ne 0 ]] && status=1
  return 0
}

if [[ $DRY -eq 1 ]]; then
  step info 60 "$PY" -m pccfast info
  step bench_pcc 300 env TRITON_INTERPRET=1 "$PY" benchmarks/gpu/bench_pcc.py --dry-run
  step bench_ci 300 "$PY" benchmarks/gpu/bench_ci.py --dry-run
  step bench_train_step 300 "$PY" benchmarks/gpu/bench_train_step.py --dry-run
  step bench_train_step_vgg 300 "$PY" benchmarks/gpu/bench_train_step.py --dry-run \
    --model vgg16_cifar
  step speedup_table 300 "$PY" benchmarks/speedup_table.py --dry-run --out "$OUTDIR/speedup.md"
  exit $status
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/device.txt"
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)
export PCCFAST_TEST_WORKERS=${WORKERS:-8}
GPU_TESTS=(tests/test_ci_cuda.py tests/test_pcc_triton.py tests/test_ci_collector.py)
step build 120 env PCCFAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
  "$PY" setup.py build_ext --inplace -q
step info 30 "$PY" -m pccfast info
step gpu_tests 100 "$PY" -m pytest -q -m gpu "${PARALLEL[@]}" -p no:cacheprovider \
  -k "not against_reference_on_gpu" "${GPU_TESTS[@]}"
step bench_pcc 130 "$PY" benchmarks/gpu/bench_pcc.py --reps 5 --shapes 64x56,256x56,2048x7
step bench_train_step 75 "$PY" benchmarks/gpu/bench_train_step.py --model resnet50 --batch 128 \
  --size 224 --backends triton,torch --steps 5 --rounds 2
step bench_train_step_vgg 45 "$PY" benchmarks/gpu/bench_train_step.py --model vgg16_cifar \
  --batch 256 --size 32 --backends triton,torch --steps 8 --rounds 2
step bench_ci 90 "$PY" benchmarks/gpu/bench_ci.py --repeats 2 --brute-images 1 --out "$OUTDIR/ci_gpu.md"
step speedup_table 90 "$PY" benchmarks/speedup_table.py --device cuda --dtype bfloat16 \
  --channels-last --round-to 1,8,32 --out "$OUTDIR/speedup_gpu.md"
step gpu_sweep 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider -k against_reference_on_gpu \
  tests/test_pcc_triton.py
echo "=== done: exit $status after ${SECONDS}s (tables above; logs in $OUTDIR)"
exit $status
