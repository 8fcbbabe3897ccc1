#!/usr/bin/env bash
# One device call that checks a refactor on the H200: the GPU operator tests, the quick benchmark, the
# MoDA-family rows, and a short training run of the width-384 study model (baseline and MoDA) to see the
# model compile and its step time. Run from the repo root with .whl carried; results under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/moda_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
bash scripts/gpu_check.sh --quick
python3 -m pallas_kernels.benchmark --family --iters 5 --json "$OUT/family.json" 2>&1 | grep -v '^{' | tee "$OUT/family.log"
cp /tmp/moda_out/bench.json "$OUT/quick.json" 2>/dev/null
for depth_kv in none attn_ffn; do
  workdir=/dev/shm/w384_$depth_kv
  timeout 200 python3 train.py --config=configs/width384.py:layers=24,norm=post,depth_kv=$depth_kv --workdir=$workdir \
    --config.total_steps=60 --config.log_every=20 --config.eval_every=0 --config.checkpoint_every=0 \
    --config.progress_bar=False --config.warmup_steps=10 2>&1 | tail -n 3
  cp $workdir/metrics.jsonl "$OUT/w384_$depth_kv.jsonl" 2>/dev/null
  tail -n 1 $workdir/metrics.jsonl
done
