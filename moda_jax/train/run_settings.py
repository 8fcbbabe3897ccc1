"""Checks a run config and its workdir before any work starts (no data read, nothing compiled).

Every mistake found raises `UserError` naming the field (`config.<name>`, as the `--config.<name>` flag
that sets it), its value and what was expected. Rules that belong to a lower module are asked from it
rather than restated: the model's fields from `ModelConfig`, the learning-rate schedule from
`optimizer`, the mesh from `sharding`, the tokenizer from `tokenizers`. The trainer calls `check` and
`make_workdir` inside `cli_errors.checking_inputs()`; the study tool can call them for each run it plans.
"""

import os

import jax

from moda_jax.cli_errors import UserError
from moda_jax.data import tokenizers
from moda_jax.model.config import ModelConfig
from moda_jax.train import optimizer as optim
from moda_jax.train import sharding

_POSITIVE = ("total_steps", "batch_size", "seq_len", "log_every", "grad_accum_steps")
_NON_NEGATIVE = ("eval_every", "eval_batches", "checkpoint_every")  # 0 turns the cadence off


def _check_int(config, name: str, lowest: int) -> None:
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
    expected = "a positive int" if lowest == 1 else "an int >= 0 (0 = off)"
    raise UserError(f"config.{name}={value!r}: expected {expected}.")


def check(config, devices=None) -> tuple[ModelConfig, jax.sharding.Mesh]:
  """Raises UserError for the first mistake in `config`; returns (the model config, the mesh)."""
  for name in _POSITIVE:
    _check_int(config, name, 1)
  for name in _NON_NEGATIVE:
    _check_int(config, name, 0)
  model_cfg = ModelConfig.from_dict(config.model.to_dict())  # ValueError naming ModelConfig.<field>
  if config.seq_len > model_cfg.max_seq_len:
    raise UserError(f"config.seq_len={config.seq_len}: expected <= config.model.max_seq_len="
                    f"{model_cfg.max_seq_len}.")
  z_loss = config.z_loss_weight
  if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not z_loss >= 0:
    raise UserError(f"config.z_loss_weight={z_loss!r}: expected a number >= 0 (0 = off).")
  chunk = config.loss_chunk_len
  if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
    raise UserError(f"config.loss_chunk_len={chunk!r}: expected an int >= 0 (0 = dense logits, else "
                    "positions per loss chunk).")
  optim.learning_rate_schedule(config)  # ValueError for warmup_steps / learning_rate
  mesh = sharding.mesh_from_config(config, devices)  # ValueError for mesh sizes vs devices
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = config.batch_size // config.grad_accum_steps
  if config.batch_size % config.grad_accum_steps or micro % shards:
    raise UserError(f"config.batch_size={config.batch_size}: expected a multiple of grad_accum_steps="
                    f"{config.grad_accum_steps} whose microbatches of {micro} rows divide over "
                    f"mesh.data * mesh.fsdp = {shards} devices.")
  data = config.data
  vocab = tokenizers.make_tokenizer(data.tokenizer, data.tokenizer_path, data.eos_token).vocab_size
  if model_cfg.vocab_size < vocab:
    raise UserError(f"config.model.vocab_size={model_cfg.vocab_size}: expected >= the tokenizer's "
                    f"{vocab} ids.")
  return model_cfg, mesh


def make_workdir(workdir: str) -> str:
  """Creates `workdir` if needed; UserError if it is a file or cannot be created or written."""
  if not workdir:
    raise UserError("--workdir is empty: expected a directory for checkpoints and logs.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir!r} is a file: expected a directory (existing, or one to create).")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir={workdir!r} cannot be created ({e.strerror}): expected a directory "
                    "whose parent exists or can be created.") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir!r} is not writable: expected a directory this user can write.")
  return workdir
