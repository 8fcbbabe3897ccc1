#!/usr/bin/env bash
# The one script sent to the GPU machine (device tool `run`, kind nvidia-h200), from the repo root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && bash scripts/gpu_check.sh [--quick] [--tune] [--no-tests]
# GPU_TEST_FILTER=<pytest -k expression> narrows the tests.
# (a) pallas_triton compiled for the GPU against the float64 oracle / the reference backend,
# (b) the benchmark, JSON and log under $OUT (or /tmp/moda_out), the table printed last.
set -o pipefail
OUT=${OUT:-/tmp/moda_out}
mkdir -p "$OUT"
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
bench_args=()
run_tests=1
for arg in "$@"; do
  case "$arg" in
    --no-tests) run_tests=0 ;;
    *) bench_args+=("$arg") ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c 'import jax; print("jax", jax.__version__, jax.devices())'
if [ "$run_tests" = 1 ]; then
  python3 -m pytest tests/gpu -q -x -p no:cacheprovider -k "${GPU_TEST_FILTER:-}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 30
fi
python3 -m pallas_kernels.benchmark --json "$OUT/bench.json" "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log" \
  | grep -v '^{' | grep -v -i warning
