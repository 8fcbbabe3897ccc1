"""Orbax checkpoints: train state, data-iterator position and run config saved together.

Layout: DIR/checkpoints/<step>/{state, data, config}. `state` holds params, optimizer state, step and
RNG; `data` the Grain iterator state of every process; `config` the full run config as JSON, so
evaluation can rebuild the model from the checkpoint alone (`load_checkpoint`). Saves are async;
only finished ones count as `latest_step`, so a run killed mid-save resumes from the previous one.
"""

import json
import logging
import os

import flax.linen as nn
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from moda_jax.cli_errors import UserError
from moda_jax.model.config import ModelConfig
from moda_jax.model.transformer import Transformer

CHECKPOINT_DIR = "checkpoints"
CONFIG_JSON = "config.json"


def _state_dict(state) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


class Checkpointer:
  """One run's CheckpointManager (keep the newest `keep`)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep}; expected at least 1.")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict) -> None:
    if step in self._manager.all_steps():
      return  # e.g. the final save right after a periodic save of the same step
    args = ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              config=ocp.args.JsonSave(config.to_dict()))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores onto the shardings in `abstract_state` (any mesh); sets `data_iterator`'s position."""
    target = _state_dict(abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return type(abstract_state)(**restored["state"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract_tree, sharding_tree):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, sharding_tree)


def write_config_json(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A human-readable copy next to the checkpoints (the checkpoint itself holds the authoritative one)."""
  with open(os.path.join(workdir, CONFIG_JSON), "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)


def _finished_step(mngr: ocp.CheckpointManager, step: int | None, directory: str) -> int:
  available = list(mngr.all_steps())
  if not available:
    raise UserError(f"{directory} holds no finished checkpoint yet: expected a run that saved one "
                    "(train.py saves every config.checkpoint_every steps, at the end and on Ctrl-C).")
  step = mngr.latest_step() if step is None else step
  if step not in available:
    raise UserError(f"--step={step} is not a finished checkpoint in {directory}: expected one of "
                    f"{available}.")
  return step


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    missing = "" if os.path.isdir(workdir) else " (no such directory)"
    raise UserError(f"--workdir={workdir!r} has no {CHECKPOINT_DIR}/{missing}: expected a training workdir "
                    "with a finished checkpoint (train.py writes one every config.checkpoint_every steps).")
  # Options a read-only manager would reset anyway (with a warning each); its "directory is read only"
  # warning says what we asked for, so it is dropped too.
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  quiet = _DropMessage("Given directory is read only")
  logging.getLogger("absl").addFilter(quiet)
  try:
    return ocp.CheckpointManager(directory, options=options)
  finally:
    logging.getLogger("absl").removeFilter(quiet)


class _DropMessage(logging.Filter):
  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._prefix)


def _restore_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def load_run_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """(run config, step) of the checkpoint at `step` (default: the latest), reading no arrays."""
  with _read_only_manager(workdir) as mngr:
    step = _finished_step(mngr, step, str(mngr.directory))
    return _restore_config(mngr, step), step


def latest_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, int] | None:
  """(run config, step) of the newest finished checkpoint in `workdir`, or None if it has none."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    return None
  with _read_only_manager(workdir) as mngr:
    step = mngr.latest_step()
    return None if step is None else (_restore_config(mngr, step), step)


def load_checkpoint(workdir: str, step: int | None = None, sharding=None):
  """Returns (config, model, params) of the checkpoint at `step` (default: the latest) in `workdir`.

  Only the parameters are read (not the optimizer state). `sharding`: a `jax.sharding.Sharding`
  for every parameter (default: the first local device).
  """
  with _read_only_manager(workdir) as mngr:
    step = _finished_step(mngr, step, str(mngr.directory))
    config = _restore_config(mngr, step)
    model = Transformer(ModelConfig.from_dict(config.model.to_dict()))
    tokens = jax.numpy.zeros((1, min(config.seq_len, 8)), jax.numpy.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens)["params"])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            nn.meta.unbox(abstract))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args=ocp.checkpoint_utils.construct_restore_args(
            {"params": abstract}), partial_restore=True)))
  return config, model, restored["state"]["params"]
