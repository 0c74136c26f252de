#!/usr/bin/env bash
# One device call of the GPU checks and benchmarks (experiments/NOTES_gpu.md), steps chosen by STEPS:
#   env       nvidia-smi, torch and triton versions
#   tests     the CUDA tests of tests/ (triton outputs poisoned with NaN where the kernel must write)
#   suite     the whole equivalence suite under HYPOTHESIS_PROFILE=gpu, every verdict recorded and summarized
#   ncu       Nsight Compute on our kernel variants and compiled flex (experiments/profile_kernels.py); the
#             binary profile.ncu-rep stays out of git (.gitignore), its exported text pages are what to commit
#   bench     experiments/bench_gpu.py with --only "$PARTS" (tiles, main, flexorig, huge, ab)
#   ring      experiments/bench_ring.py (the in-process ring against P)
#   backward  experiments/bench_backward.py (forward + backward against the SDPA and flex peers, backward kernels)
#   training  experiments/training.py --preset gpu (both models, the length curriculum), as recall_h200.json
#   baseline  the GPU pytest-benchmark suite (experiments/benchmarks/test_bench_gpu.py), saved as gpu_baseline.json
#             (experiments/baselines/gpu.json)
# Copy a run's files into experiments/results/runN/ and add its row to experiments/results/INDEX.md.
# Usage on the device: STEPS="env tests ncu bench" PARTS=ab BENCH_BUDGET=200 BSRDA_GIT_COMMIT=<commit> \
#   bash experiments/gpu_check.sh
# (the device's copy of .git was seen stale, so the commit is handed in from here and recorded as given)
# SUITE_WORKERS=N runs the suite in N pytest-xdist processes sharing the GPU (compiling flex is CPU-bound);
# SUITE_SELECT="expr" runs only the suite's tests that pytest -k selects (the record says which ran).
# Results go to $OUT/run and are packed into $OUT/results.tar.gz after every step, so a step cut short
# by its timeout still leaves the earlier ones (the device returns at most 8 files).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/gpu_check}
RUN="$OUT/run"
mkdir -p "$RUN"
STEPS=${STEPS:-env tests suite ncu bench ring baseline}
PYTEST="python3 -m pytest -p no:cacheprovider"
pack() { tar czf "$OUT/results.tar.gz" -C "$RUN" . ; }
started=$(date +%s)
for step in $STEPS; do
  t0=$(date +%s)
  case $step in
    env)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,memory.used --format=csv \
        > "$RUN/nvidia_smi.txt"
      python3 -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'python', sys.version.split()[0])" \
        >> "$RUN/nvidia_smi.txt"
      echo "commit ${BSRDA_GIT_COMMIT:-unknown} (as handed in); git here says $(git rev-parse --short HEAD 2>/dev/null)" \
        >> "$RUN/nvidia_smi.txt"
      cat "$RUN/nvidia_smi.txt" ;;
    tests)
      BSRDA_TRITON_POISON=1 timeout "${TESTS_TIMEOUT:-240}" $PYTEST -q --timeout 120 --durations=5 \
        ${TESTS:-tests/test_triton_backend.py tests/test_cuda_graphs.py tests/test_flex_backend.py tests/test_module.py \
        tests/test_weights.py tests/test_dispatch.py tests/test_input_layout.py equivalence_tests/test_gradients.py} --junitxml "$RUN/pytest_cuda.xml" > "$RUN/pytest_cuda.log" 2>&1
      echo "tests rc=$?"; tail -3 "$RUN/pytest_cuda.log" ;;
    suite)
      rm -f "$RUN/verdicts.jsonl"
      # Each worker gets its share of the cores: the float64 reference runs on the CPU, and six workers of
      # 16 threads each slowed the torch tests past the per-test timeout (run 8).
      EQUIVALENCE_RECORD="$RUN/verdicts.jsonl" HYPOTHESIS_PROFILE=gpu BSRDA_TRITON_POISON=1 \
        OMP_NUM_THREADS=$(( $(nproc) / ${SUITE_WORKERS:-1} )) \
        timeout "${SUITE_TIMEOUT:-420}" $PYTEST -q --timeout "${SUITE_TEST_TIMEOUT:-300}" --durations=10 \
        ${SUITE_WORKERS:+-n $SUITE_WORKERS} ${SUITE_SELECT:+-k "$SUITE_SELECT"} \
        equivalence_tests \
        --junitxml "$RUN/equivalence_suite.xml" > "$RUN/equivalence_suite.log" 2>&1
      echo "suite rc=$?"; tail -3 "$RUN/equivalence_suite.log"
      HYPOTHESIS_PROFILE=gpu python3 -m experiments.equivalence_record "$RUN/verdicts.jsonl" \
        --junit "$RUN/equivalence_suite.xml" --out "$RUN/equivalence_suite_gpu.json" > "$RUN/equivalence_summary.txt"
      gzip -f "$RUN/verdicts.jsonl"; head -1 "$RUN/equivalence_summary.txt" ;;
    ncu)
      timeout "${NCU_TIMEOUT:-200}" ncu --clock-control none --kernel-name regex:'_forward_kernel|triton_tem' --launch-count 24 \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section InstructionStats -f -o "$RUN/profile" \
        python3 -m experiments.profile_kernels ${PROFILE_ARGS:-} > "$RUN/ncu.log" 2>&1
      echo "ncu rc=$?"; grep "launch group" "$RUN/ncu.log" | tail -2
      ncu --import "$RUN/profile.ncu-rep" --page details --csv > "$RUN/ncu_details.csv" 2>&1
      ncu --import "$RUN/profile.ncu-rep" --page raw --csv > "$RUN/ncu_raw.csv" 2>&1
      ncu --import "$RUN/profile.ncu-rep" --page details --print-details all > "$RUN/ncu_details.txt" 2>&1
      grep -E "launch group|Error|error" "$RUN/ncu.log" | tail -20 ;;
    bench)
      timeout $((${BENCH_BUDGET:-270} + 90)) python3 -m experiments.bench_gpu --out "$RUN" \
        --budget-s "${BENCH_BUDGET:-270}" --only "${PARTS:-main,huge}" > "$RUN/bench_gpu.log" 2>&1
      echo "bench rc=$?"; grep -v "^\s*$" "$RUN/bench_gpu.log" | tail -45 ;;
    backward)
      timeout $((${BACKWARD_BUDGET:-200} + 120)) python3 -m experiments.bench_backward --out "$RUN" \
        --budget-s "${BACKWARD_BUDGET:-200}" ${BACKWARD_ARGS:-} > "$RUN/bench_backward.log" 2>&1
      echo "backward rc=$?"; grep -v "^\s*$" "$RUN/bench_backward.log" | tail -25 ;;
    ring)
      timeout "${RING_TIMEOUT:-150}" python3 -m experiments.bench_ring --out "$RUN" > "$RUN/bench_ring.log" 2>&1
      echo "ring rc=$?"; tail -8 "$RUN/bench_ring.log" ;;
    training)
      timeout "${TRAINING_TIMEOUT:-240}" python3 -m experiments.training --preset gpu --log-every 250 \
        --out "$RUN/recall_h200.json" > "$RUN/training.log" 2>&1
      echo "training rc=$?"; tail -6 "$RUN/training.log" ;;
    baseline)
      timeout "${BASELINE_TIMEOUT:-150}" $PYTEST -q experiments/benchmarks/test_bench_gpu.py --benchmark-enable \
        --benchmark-json "$RUN/gpu_baseline.json" > "$RUN/baseline.log" 2>&1
      echo "baseline rc=$?"; tail -3 "$RUN/baseline.log" ;;
    *) echo "unknown step $step" ;;
  esac
  echo "== $step took $(( $(date +%s) - t0 )) s (total $(( $(date +%s) - started )) s)"
  pack
done
