#!/usr/bin/env bash
# pallas_mosaic_gpu on the GPU machine (device tool `run`, kind nvidia-h200), from the repo root:
#   bash scripts/gpu_check_mosaic.sh [--full] [--no-tests] [--no-bench]
# It needs only the image's jax, numpy and pytest (pallas_kernels and tests import nothing else), so no
# wheels; with the usual .whl/ install first (scripts/gpu_check.sh) it runs the same.
# (a) tests/gpu/test_mosaic_gpu_device.py: compiled kernels against the float64 oracle / reference, and three
#     bitwise-identical backward runs (GPU_TEST_FILTER=<pytest -k expression> narrows them);
# (b) the benchmark: cuDNN, pallas_triton and pallas_mosaic_gpu, with and without depth, in one process
#     (--quick shapes unless --full); JSON, logs and the table under $OUT (or /tmp/moda_out).
# Each phase has its own time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds) so that one cannot eat the
# other's share of a 10-minute device command.
set -o pipefail
OUT=${OUT:-/tmp/moda_out}
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
run_tests=1
run_bench=1
shapes=--quick
for arg in "$@"; do
  case "$arg" in
    --no-tests) run_tests=0 ;;
    --no-bench) run_bench=0 ;;
    --full) shapes= ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())' | tee -a "$OUT/device.txt"
status=0
if [ "$run_tests" = 1 ]; then
  timeout "${TEST_TIMEOUT:-330}" python3 -m pytest tests/gpu/test_mosaic_gpu_device.py -q -p no:cacheprovider --maxfail=10 \
    -rfE -k "${GPU_TEST_FILTER:-}" 2>&1 | tee "$OUT/gpu_tests_mosaic.log" | tail -n 40
  status=$?
fi
if [ "$run_bench" = 1 ]; then
  impls=cudnn,pallas_triton,pallas_mosaic_gpu,pallas_triton_nodepth,pallas_mosaic_gpu_nodepth
  timeout "${BENCH_TIMEOUT:-240}" python3 -m pallas_kernels.benchmark $shapes --mosaic --impls "$impls" \
    --json "$OUT/bench_mosaic.json" 2>&1 | tee "$OUT/bench_mosaic.log" | grep -v '^{' | grep -v -i warning
fi
exit $status
