#!/usr/bin/env bash
# The Table 6 analog (issue 16) on one H200, a resumable piece per device call.
#
# Once, on the CPU machine, in the repo root (both folders are ignored by git):
#   mkdir -p data_cache && cp /work/shared/corpus/*.txt.xz data_cache/
#   .whl/: the wheels the GPU image lacks or has in other versions (pip download --no-deps, README of the device
#   tool): grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 tensorboardX==2.6.4
#   flax==0.12.12 orbax-checkpoint==0.12.8 optax==0.2.8 chex==0.1.92 (6.8 MB), e.g. `python3 -m pip download
#   --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#   --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl grain==0.2.18 ...`.
# Each device call (kind nvidia-h200, carry [".whl", "data_cache"], timeout_s 600):
#   bash scripts/gpu_study.sh [--max_minutes=7] [--jobs=2] [--order=entry] [--only=none,attn_ffn] [--no_depth_mass]
# (--jobs=2: two runs share the GPU; on the H200 (2026-12-01) two `none` runs took 176 ms/step each, about
# what they take one after the other, so the default is one at a time and the report times only runs alone.
# --order=entry: an entry's seeds in a row reuse its compiled programs.)
# then, here: mkdir -p benchmarks/results/study_table6 && tar xzf <files_at>/study_table6.tar.gz -C "$_"
# and commit that folder.
# Runs already under benchmarks/results/study_table6 (status "done") are not trained again; so the calls add
# runs until the grid is complete. A run cut off at the budget is checkpointed in workdir_study/ (ignored), which
# survives only while the machine stays warm (a call within ~30 s of the last); on a fresh machine it restarts.
# --max_minutes bounds the training phase: no run starts that the finished runs' wall time says cannot end in it.
# After it: the depth attention share of the runs with checkpoints here (merged into depth_mass.json), the report.
# STUDY_GRID / STUDY_RESULTS / STUDY_WORK / STUDY_SKIP_WHEELS=1 / JAX_PLATFORMS=cpu: another grid or a dry run.
# The peers grid, its baseline and MoDA rows copied from the Table 6 runs of the same config (--reuse;
# their study.json says so):
#   STUDY_GRID=configs/studies/peers_small.py STUDY_RESULTS=benchmarks/results/study_peers \
#     STUDY_WORK=workdir_study/peers bash scripts/gpu_study.sh --order=entry --no_depth_mass \
#     --reuse=benchmarks/results/study_table6
# then untar <files_at>/study_peers.tar.gz into benchmarks/results/study_peers. Two attention-residual or
# depth-attention runs share the GPU well (--jobs=2: 402 s for both against 283 s for one alone); an HC or
# mHC run needs ~97 GiB at the study's remat=none (four streams saved per sublayer), so it runs alone.
# The pre-norm grid: STUDY_GRID=configs/studies/peers_prenorm.py, results in study_peers_prenorm.
set -uo pipefail
GRID=${STUDY_GRID:-configs/studies/table6_small.py}
RESULTS=${STUDY_RESULTS:-benchmarks/results/study_table6}
WORK=${STUDY_WORK:-workdir_study/table6}
OUT=${OUT:-/tmp/study_out}
max_minutes=7
depth_mass=1
run_args=()
for arg in "$@"; do
  case "$arg" in
    --max_minutes=*) max_minutes=${arg#*=} ;;
    --no_depth_mass) depth_mass=0 ;;
    --jobs=*|--only=*|--max_runs=*|--order=*|--retry_failed|--reuse=*) run_args+=("$arg") ;;
    *) echo "gpu_study.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT" "$WORK" "$RESULTS"
if [[ -d .whl && -z "${STUDY_SKIP_WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
missing=$(python3 - <<'EOF'
import importlib.util
names = ["grain", "ml_collections", "tensorboardX", "tokenizers", "flax", "orbax.checkpoint", "optax"]
print(" ".join(n for n in names if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)
[[ -z "$missing" ]] || { echo "missing Python packages: $missing (carry them in .whl)" >&2; exit 1; }
python3 - "$GRID" <<'EOF' || exit 1
import glob, sys
from moda_jax.eval import study
grid = study.load_grid(sys.argv[1])
data = grid.config(next(iter(grid.entries)), grid.seeds[0]).data
files = [p for p in f"{data.path},{data.get('val_path', '')},{data.tokenizer_path}".split(",") if p]
missing = [p for p in files if not glob.glob(p)]
if missing:
  sys.exit(f"missing {missing}: copy the corpus into data_cache/ and carry it")
EOF
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=$PWD/workdir_study/jax_cache
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null
python3 -c 'import jax, flax, grain; print("jax", jax.__version__, "flax", flax.__version__,
  "grain", grain.__version__, jax.devices())'

# Finished runs from earlier calls: their files, so the runner skips them (and the report counts them).
for dir in "$RESULTS"/*/seed*/; do
  [[ -f "$dir/study.json" ]] || continue
  rel=${dir#"$RESULTS"/}
  [[ -f "$WORK/$rel/study.json" ]] && continue
  mkdir -p "$WORK/$rel" && cp "$dir"/* "$WORK/$rel/"
done
[[ -f "$RESULTS/depth_mass.json" && ! -f "$WORK/depth_mass.json" ]] && cp "$RESULTS/depth_mass.json" "$WORK/"

start=$(date +%s)
python3 -m moda_jax.study run "$GRID" --out="$WORK" --max_minutes="$max_minutes" --progress_every=60 \
  "${run_args[@]}" 2>&1 | tee "$OUT/study_run.log"
echo "training phase: $(( $(date +%s) - start )) s"
report_args=()
[[ $depth_mass == 1 ]] && report_args+=(--depth_mass --depth_mass_tokens=1024)
python3 -m moda_jax.study report "$WORK" "${report_args[@]}" 2>&1 | tail -n 5 | tee -a "$OUT/study_run.log"
# One file back: the finished runs' small files (no checkpoints, TensorBoard events, unfinished runs) + the report.
python3 -m moda_jax.study pack "$WORK" --out="$OUT/$(basename "$RESULTS").tar.gz"
ls -l "$OUT"
grep -A 8 '^| entry | overrides' "$WORK/report.md"
echo "total: $(( $(date +%s) - start )) s"
