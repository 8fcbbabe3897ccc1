"""Train a MoDA (or baseline) language model.

  python train.py --config=configs/tiny.py --workdir=/tmp/moda_tiny [--config.model.num_layers=8]

Rerunning the same command resumes from the newest checkpoint in --workdir (other run settings, e.g.
--config.total_steps, may change; a workdir holding another model's run stops with an error, see
--restart). Ctrl-C or SIGTERM saves a checkpoint at the next step and exits; a second Ctrl-C exits at
once. Mistakes in flags or config fields print one `error: ...` line and exit with status 2.

Multi-host runs call `jax.distributed.initialize()`: automatically under SLURM / Open MPI / Kubernetes /
Cloud TPU, or explicitly with --coordinator_address, --num_processes and --process_id (or the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables).
"""

import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from moda_jax import cli_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_RESTART = flags.DEFINE_bool("restart", False, "Delete the run already in --workdir (checkpoints, "
                             "metrics, TensorBoard events) and start over.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                   "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None,
                                      "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", -1)),
                                   "This process' index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])

# Launchers that jax.distributed.initialize() detects by itself when they run more than one task.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _maybe_initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value < 0:
      raise cli_errors.UserError(f"--coordinator_address={_COORDINATOR.value}: expected --num_processes "
                                 "and --process_id with it.")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(os.environ.get(v, "1") not in ("", "1") for v in _CLUSTER_SIZE_VARS):
    jax.distributed.initialize()


def main(argv):
  del argv  # cli_errors.run rejects positional arguments
  if not flags.FLAGS["verbosity"].present:
    # Library INFO logs (Orbax, XLA) would bury the progress bar; --verbosity=0 brings them back.
    logging.set_verbosity(logging.WARNING)
  _maybe_initialize_distributed()
  from moda_jax.train import trainer  # pylint: disable=g-import-not-at-top

  logging.info("config:\n%s", _CONFIG.value)
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value)


if __name__ == "__main__":
  cli_errors.run(main)
