"""A workdir holds one run: rerunning it with another model stops before any work.

The identity of a run is what its checkpoints hold, so what a resume cannot change:
  - the model: every `ModelConfig` field except those that only choose how the same function is
    computed (`EXECUTION_FIELDS`: remat policy, attention backend, compute dtype, ...);
  - the optimizer state's layout: gradient clipping on or off (`grad_clip_norm > 0` adds a state).
Anything else (steps, learning rate, cadences, batch size, mesh, even the data) may change: the run
resumes and says in one line which settings changed (a changed `seed` or `data.val_fraction` also
draws another held-out split: that line is the warning). `--restart` deletes the run's files
(`RUN_FILES`) and starts over. The config compared is the one saved inside the newest checkpoint.
"""

import dataclasses
import os
import shutil

import jax
from jax.experimental import multihost_utils

from moda_jax.cli_errors import UserError
from moda_jax.model.config import ModelConfig
from moda_jax.train import checkpoint
from moda_jax.train import metrics

EXECUTION_FIELDS = ("remat", "attention_impl", "dtype")
DATA_STATS_JSON = "data_stats.json"
RUN_FILES = (checkpoint.CHECKPOINT_DIR, checkpoint.CONFIG_JSON, metrics.JSONL_NAME,
             metrics.TENSORBOARD_DIR, DATA_STATS_JSON)
_UNSET = "<unset>"
_SHOWN_CHANGES = 6


def _flatten(tree, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value  # as JSON reads it
  return flat


def flat_config(config) -> dict:
  """{"model.num_layers": 24, ...}: a ConfigDict or its JSON dict, flattened to dotted names (tuples as the
  lists JSON reads back)."""
  return _flatten(config.to_dict() if hasattr(config, "to_dict") else config)


def _model_identity_fields() -> dict:
  """model.<field> -> default, for the fields that define the model (a field added since a checkpoint
  was saved takes its default there, so it compares equal when left at it)."""
  return {f"model.{f.name}": (f.default if f.default is not dataclasses.MISSING else _UNSET)
          for f in dataclasses.fields(ModelConfig) if f.name not in EXECUTION_FIELDS}


def _identity(flat: dict) -> dict:
  ident = {name: flat.get(name, default) for name, default in _model_identity_fields().items()}
  ident["gradient clipping (grad_clip_norm > 0)"] = "on" if flat.get("grad_clip_norm", 0) > 0 else "off"
  return ident


def _changes(old: dict, new: dict, names) -> list[str]:
  return [f"{n} {old.get(n, _UNSET)!r} -> {new.get(n, _UNSET)!r}" for n in names
          if old.get(n, _UNSET) != new.get(n, _UNSET)]


def identity_differences(saved_config, config) -> list[str]:
  """'field old -> new' for each identity field that differs (empty: the run may resume)."""
  old, new = _identity(flat_config(saved_config)), _identity(flat_config(config))
  return _changes(old, new, new)


def setting_changes(saved_config, config) -> list[str]:
  """'field old -> new' for the other settings that differ (the run resumes with these)."""
  old, new = flat_config(saved_config), flat_config(config)
  identity_names = set(_model_identity_fields())
  return _changes(old, new, [n for n in sorted(set(old) | set(new)) if n not in identity_names])


def summary(changes: list[str]) -> str:
  shown = ", ".join(changes[:_SHOWN_CHANGES])
  return shown + (f" and {len(changes) - _SHOWN_CHANGES} more" if len(changes) > _SHOWN_CHANGES else "")


def _delete_run(workdir: str) -> list[str]:
  deleted = []
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
    else:
      continue
    deleted.append(name)
  return deleted


def prepare(workdir: str, config, *, restart: bool) -> str | None:
  """Makes `workdir` ready for `config`: raises UserError if it holds another run (unless `restart`,
  which deletes that run first). Returns one line for the user, or None when there is nothing to say."""
  if restart:
    deleted = _delete_run(workdir) if jax.process_index() == 0 else []
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("moda_jax run_identity restart")  # nobody reads a half-deleted dir
    return f"--restart: deleted the previous run in {workdir} ({', '.join(deleted)})" if deleted else None
  saved = checkpoint.latest_run_config(workdir)
  if saved is None:
    return None
  saved_config, step = saved
  differences = identity_differences(saved_config, config)
  if differences:
    raise UserError(f"--workdir={workdir} holds a run of another model (checkpoint at step "
                    f"{step}; {summary(differences)}): pass a new --workdir, or --restart to delete that "
                    "run and start over.")
  changes = setting_changes(saved_config, config)
  message = f"resumed from the checkpoint at step {step}"
  return message + (f" with changed run settings: {summary(changes)}" if changes else "")
