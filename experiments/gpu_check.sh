#!/usr/bin/env bash
# One device call: correctness on CUDA (bf16 included, outputs poisoned with NaN where the kernel
# must write), the equivalence property per kernel variant, then the benchmark.
# Usage on the device: [PARTS=ab] [EQ_VARIANTS="v2 v3 v3tma"] bash experiments/gpu_check.sh [bench budget s]
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-experiments/results}
BUDGET=${1:-270}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,memory.used --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/nvidia_smi.txt"
BSRDA_TRITON_POISON=1 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_cuda_graphs.py \
  --durations=5 > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; tail -4 "$OUT/pytest_gpu.log"
for variant in ${EQ_VARIANTS:-v3 v3tma}; do
  BSRDA_TRITON_VARIANT=$variant BSRDA_TRITON_POISON=1 HYPOTHESIS_PROFILE=gpu timeout 45 \
    python3 -m experiments.bench_gpu --equivalence --out "$OUT" --examples "${EQ_EXAMPLES:-20}" \
    > "$OUT/equivalence_gpu_$variant.log" 2>&1; echo "equivalence $variant rc=$?"; tail -3 "$OUT/equivalence_gpu_$variant.log"
done
timeout $((BUDGET + 60)) python3 -m experiments.bench_gpu --out "$OUT" --budget-s "$BUDGET" --only "${PARTS:-tiles,main,flexorig,huge}" > "$OUT/bench_gpu.log" 2>&1
echo "bench rc=$?"
grep -v "^\s*$" "$OUT/bench_gpu.log" | tail -60
