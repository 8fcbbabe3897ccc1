#!/usr/bin/env bash
# Fresh machine to a trained tiny model in one command (CPU is enough; a few minutes on 2 cores):
#   bash scripts/quickstart.sh [WORKDIR]        (default ./workdir_tiny)
# Finds a working Python 3.12 (pyenv's included, as .ci/run does), builds .venv in the repository,
# installs the pinned requirements and this repository (editable), then trains configs/tiny.py on the
# embedded English text into WORKDIR. Rerunning resumes the same run (Ctrl-C saves first).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-workdir_tiny}

source .ci/find_python312.sh
if ! PY=$(find_python312); then
  echo "$NO_PYTHON312" >&2
  exit 1
fi

if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  echo "building .venv with $PY ($("$PY" --version 2>&1))"
  rm -rf .venv
  "$PY" -m venv .venv
fi
echo "installing requirements.txt and this repository into .venv (a minute or two the first time)"
# -qq: pip's errors only (its warnings about a machine's index settings would bury them).
.venv/bin/python -m pip install -qq --upgrade pip
.venv/bin/python -m pip install -qq -r requirements.txt
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -qq --no-deps -e .  # (setuptools warns about editables)

echo "training configs/tiny.py into $WORKDIR"
.venv/bin/python train.py --config=configs/tiny.py --workdir="$WORKDIR"

cat <<DONE

done: the run is in $(cd "$WORKDIR" && pwd)
  checkpoints/    Orbax checkpoints (the newest three); rerunning this script resumes an interrupted run
  metrics.jsonl   loss, val_loss, learning rate and throughput per logged step
  tensorboard/    TensorBoard events
  config.json     the run's config
next:
  loss curves   .venv/bin/python -m moda_jax.eval.plot $WORKDIR --out=$WORKDIR/loss.png
  evaluation    .venv/bin/python -m moda_jax.evaluate --workdir=$WORKDIR
  generation    .venv/bin/python -m moda_jax.generate --workdir=$WORKDIR --prompt="The module"
  TensorBoard   .venv/bin/tensorboard --logdir $WORKDIR
  the tests     bash .ci/run
  (or 'source .venv/bin/activate' once, then python / tensorboard as in the README)
DONE
