"""Orbax checkpoints: train state, data-iterator position and run config saved together.

Layout: DIR/checkpoints/<step>/{state, data, config}. `state` holds params, optimizer state, step and
RNG; `data` the Grain iterator state of every process; `config` the full run config as JSON, so
evaluation can rebuild the model from the checkpoint alone (`load_checkpoint`). Saves are async;
only finished ones count as `latest_step`, so a run killed mid-save resumes from the previous one.
"""

import json
import os

import flax.linen as nn
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

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
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise ValueError(f"step={step} is not a finished checkpoint in {directory}; available: "
                     f"{list(mngr.all_steps())}.")
  return step


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise ValueError(f"workdir={workdir!r} has no {CHECKPOINT_DIR}/ directory.")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))


def _restore_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def load_run_config(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """(run config, step) of the checkpoint at `step` (default: the latest), reading no arrays."""
  with _read_only_manager(workdir) as mngr:
    step = _finished_step(mngr, step, str(mngr.directory))
    return _restore_config(mngr, step), step


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
