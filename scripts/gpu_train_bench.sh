#!/usr/bin/env bash
# Training throughput of the 700M-shaped MoDA model and its OLMo2 baseline on one GPU (issue 5).
# Run from the repo root on the GPU machine (device tool; carry .whl). Writes metrics to $OUT.
# Usage: bash scripts/gpu_train_bench.sh [STEPS] [moda|baseline|both]
set -uo pipefail
steps=${1:-30}
models=${2:-both}
out=${OUT:-/tmp/train_bench}
mkdir -p "$out"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

run() {  # name config [extra flags...]: trains, then prints the last logged step and peak memory
  local name=$1 config=$2; shift 2
  local workdir=/dev/shm/bench_$name
  rm -rf "$workdir"
  timeout 280 python3 scripts/train_and_report_memory.py --config="$config" --workdir="$workdir" "$@" \
    | grep PEAK_GIB
  cp "$workdir/metrics.jsonl" "$out/$name.jsonl" 2>/dev/null
  echo "== $name"; tail -n 1 "$workdir/metrics.jsonl"
  rm -rf "$workdir"
}

common=(--config.batch_size=8 --config.grad_accum_steps=1 --config.total_steps="$steps"
        --config.warmup_steps=5 --config.log_every=10 --config.eval_every=0
        --config.checkpoint_every=100000 --config.checkpoint_async=False --config.progress_bar=False
        --config.model.remat=full)
[[ $models == baseline ]] || run moda_700m configs/moda_700m.py "${common[@]}"
[[ $models == moda ]] || run baseline_700m configs/baseline_700m.py "${common[@]}"
