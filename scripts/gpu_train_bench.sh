#!/usr/bin/env bash
# Training throughput of the 700M-shaped MoDA model and its OLMo2 baseline on one GPU (issues 5, 18).
# Run from the repo root on the GPU machine (device tool; carry .whl). Writes metrics to $OUT.
# Usage: bash scripts/gpu_train_bench.sh [STEPS] [moda|baseline|both|w384|peers] [FLAGS... [:: FLAGS...]...]
#   w384: instead of the 700M pair, the width-384 24-layer post-norm pair of the Table 6 study (baseline,
#   then MoDA attn_ffn) at the study's batch 32 x 1024 and 16K vocabulary.
#   peers: the same shape for every entry of configs/studies/peers_small.py (its overrides as flags):
#   the peers table's cost column with every entry in one call, at one remat policy.
#   FLAGS: train.py flags for both models, after the defaults below (so they override them), e.g.
#     --config.model.remat=full --config.loss_chunk_len=0
#   "::" separates settings that run one after the other in the same call (each model once per setting).
#   NAME=VALUE among FLAGS (an upper-case name) is an environment variable for that setting's runs, e.g.
#     "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false" or XLA_PYTHON_CLIENT_MEM_FRACTION=0.95.
#   Without FLAGS: both models at their best measured settings: remat save_dots_and_attention at both
#   shapes (the fastest policy of each model in the sweeps of BENCHMARKS.md §0d; the width-384 study
#   configs themselves keep remat=none, which does not change their losses), each config's own
#   loss_chunk_len; at 700M unscanned layers for both (7% faster than the scan, §0i; same losses); at
#   width 384 the baseline's attention on pallas_triton (cuDNN's packed path is 7% slower per step
#   there, §0j) and MoDA's on its default (pallas_mosaic_gpu on Hopper).
#   BENCH_RUN_TIMEOUT (seconds, default 280) bounds each run, compilation included: SIGTERM, which the trainer
#   answers after its current step (so a run still compiling would go on), then SIGKILL 20 s later.
#   Unscanned 700M runs take ~90 s to their first step (8-9 s of state init, 70-75 s of compilation).
# Each run prints its peak memory and last metrics line; $OUT/summary.tsv has one row per run.
# One-step profile (issue 18: top ops and categories by device time; scripts/profile_train_step.py), after the
# .whl install below (same PYTHONPATH), one model per call; prints the tables, writes them to --out:
#   f="--config.batch_size=8 --config.grad_accum_steps=1 --config.model.remat=save_dots_and_attention"
#   python3 scripts/profile_train_step.py --config=configs/baseline_700m.py --workdir=/dev/shm/prof_base $f \
#     --out=$OUT/profile_baseline_700m
#   python3 scripts/profile_train_step.py --config=configs/moda_700m.py --workdir=/dev/shm/prof_moda $f \
#     --out=$OUT/profile_moda_700m
set -uo pipefail
steps=${1:-30}
models=${2:-both}
shift $(( $# < 2 ? $# : 2 ))
out=${OUT:-/tmp/train_bench}
run_timeout=${BENCH_RUN_TIMEOUT:-280}
mkdir -p "$out"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
printf 'run\tflags\tpeak_gib\tstep_time_s\tmfu\tloss\n' > "$out/summary.tsv"

run() {  # name config [extra flags...]: trains, then prints the last logged step and peak memory
  local name=$1 config=$2; shift 2
  local workdir=/dev/shm/bench_$name
  rm -rf "$workdir"
  echo "== $name: ${run_env[*]} ${*:${#common[@]}+1}"
  env "${run_env[@]}" timeout -k 20 "$run_timeout" python3 scripts/train_and_report_memory.py --config="$config" --workdir="$workdir" "$@" \
    > "$out/$name.log" 2>&1
  local rc=$?
  grep PEAK_GIB "$out/$name.log" || echo "FAILED (exit $rc): $(grep -v '^\s*$' "$out/$name.log" | tail -n 1)"
  cp "$workdir/metrics.jsonl" "$out/$name.jsonl" 2>/dev/null && tail -n 1 "$out/$name.jsonl"
  python3 - "$name" "${run_env[*]} ${*:${#common[@]}+1}" "$out" >> "$out/summary.tsv" <<'EOF'
import json, os, re, sys
name, flags, out = sys.argv[1:]
log = open(os.path.join(out, name + ".log")).read()
peak = re.findall(r"PEAK_GIB_PER_DEVICE \[([0-9.]+)", log)
path = os.path.join(out, name + ".jsonl")
last = json.loads(open(path).read().splitlines()[-1]) if os.path.exists(path) else {}
cells = [peak[0] if peak else "failed"] + [last.get(k, "") for k in ("step_time_s", "mfu", "loss")]
print("\t".join([name, flags.strip() or "(defaults)"] + [f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells]))
EOF
  rm -rf "$workdir"
}

common=(--config.batch_size=8 --config.grad_accum_steps=1 --config.total_steps="$steps"
        --config.warmup_steps=5 --config.log_every=10 --config.eval_every=0
        --config.checkpoint_every=100000 --config.checkpoint_async=False --config.progress_bar=False
        --config.model.remat=save_dots_and_attention --config.model.scan_layers=False)

settings=()  # one string per setting, its flags separated by newlines
current=""
for arg in "$@"; do
  if [[ $arg == "::" ]]; then settings+=("$current"); current=""; else current+="$arg"$'\n'; fi
done
settings+=("$current")

w384=(--config.batch_size=32 --config.grad_accum_steps=1 --config.model.vocab_size=16384
      --config.total_steps="$steps" --config.warmup_steps=5 --config.log_every=10 --config.eval_every=0
      --config.checkpoint_every=100000 --config.checkpoint_async=False --config.progress_bar=False
      --config.model.remat=save_dots_and_attention)

# "name --config.k=v ..." per entry of the (post-norm) peers grid (the study's own overrides).
peer_entries='
from configs.studies import peers_small
for name, overrides in peers_small.get_grid()["entries"].items():
  print(name, " ".join(f"--config.{key}={value}" for key, value in overrides.items()))'

for i in "${!settings[@]}"; do
  mapfile -t extra < <(printf '%s' "${settings[$i]}")
  run_env=() flags=()
  for arg in "${extra[@]}"; do
    if [[ $arg =~ ^[A-Z][A-Z0-9_]*= ]]; then run_env+=("$arg"); else flags+=("$arg"); fi
  done
  extra=("${flags[@]}")
  suffix=$([[ ${#settings[@]} -gt 1 ]] && echo "_$i" || echo "")
  if [[ $models == w384 ]]; then
    common=("${w384[@]}")
    run "w384_none$suffix" configs/width384.py:layers=24,norm=post,depth_kv=none "${common[@]}" \
      --config.model.attention_impl=pallas_triton "${extra[@]}"
    run "w384_attn_ffn$suffix" configs/width384.py:layers=24,norm=post,depth_kv=attn_ffn "${common[@]}" "${extra[@]}"
    continue
  fi
  if [[ $models == peers ]]; then
    common=("${w384[@]}")
    while read -r entry overrides; do
      read -ra entry_flags <<< "$overrides"
      run "w384_$entry$suffix" configs/width384.py:layers=24 "${common[@]}" "${entry_flags[@]}" "${extra[@]}" < /dev/null
    done < <(python3 -c "$peer_entries")
    continue
  fi
  [[ $models == baseline ]] || run "moda_700m$suffix" configs/moda_700m.py "${common[@]}" "${extra[@]}"
  [[ $models == moda ]] || run "baseline_700m$suffix" configs/baseline_700m.py "${common[@]}" "${extra[@]}"
done
echo "== summary"; column -t -s $'\t' "$out/summary.tsv" 2>/dev/null || cat "$out/summary.tsv"
