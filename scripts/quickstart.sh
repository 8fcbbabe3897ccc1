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
echo "installing requirements.txt and this repository into .venv (quiet; takes a minute or two the first time)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .

echo "training configs/tiny.py into $WORKDIR"
.venv/bin/python train.py --config=configs/tiny.py --workdir="$WORKDIR"

cat <<DONE

done. In $WORKDIR:
  checkpoints/     Orbax checkpoints (the newest three; rerun this script to resume or extend the run)
  metrics.jsonl    loss, val_loss, learning rate, throughput per logged step
  tensorboard/     TensorBoard events:  .venv/bin/tensorboard --logdir $WORKDIR
  config.json      the run's config
Next:
  .venv/bin/python -m moda_jax.eval.plot $WORKDIR --out=$WORKDIR/loss.png     # loss curves as a PNG
  .venv/bin/python -m moda_jax.evaluate --workdir=$WORKDIR                     # loss, perplexity, accuracy
  .venv/bin/python -m moda_jax.generate --workdir=$WORKDIR --prompt="The module"
  bash .ci/run                                                                 # the test suite
DONE
