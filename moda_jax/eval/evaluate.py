"""Evaluates a checkpoint: loss / perplexity per dataset and multiple-choice accuracy per task.

  python -m moda_jax.evaluate --workdir=DIR [--step=N] [--data=a.txt,b.jsonl] [--tasks=hellaswag.jsonl]
                              [--output=PATH]

Datasets: "validation" is the run's own held-out split, evaluated by the trainer's code path (the
same `pipeline.make_pipelines` batches and `train_step.eval_step`), so its loss equals the trainer's
`val_loss` at that step; with `data.val_path`, "validation/<name>" per file equals `val_loss/<name>`.
Each `--data` file (text / jsonl / parquet, read like `data.source="files"`) is scored exhaustively:
every document cut into rows of the run's `seq_len`, every token once.
Tasks: `held_out_continuation` (built from the validation documents) plus each `--tasks` jsonl file.
The report goes to `--output` (default DIR/eval/step_<N>.json) and is printed as a table. Mistakes in
the flags (a workdir without checkpoints, a missing file) print one `error:` line and exit with 2;
`--verbose` shows the libraries' INFO logs.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from moda_jax import cli_errors
from moda_jax.train import checkpoint
from moda_jax.data import pipeline
from moda_jax.data import sources
from moda_jax.eval import mc_tasks
from moda_jax.train import metrics
from moda_jax.train import sharding
from moda_jax.data import tokenizers
from moda_jax.train import step as ts

VALIDATION = "validation"
BUILTIN_TASK = "held_out_continuation"


def eval_mesh(batch_size: int, devices=None) -> jax.sharding.Mesh:
  """A data-parallel mesh over the most local devices that divide `batch_size` rows evenly."""
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  while batch_size % count:
    count -= 1
  return sharding.make_mesh(data=count, devices=devices[:count])


def document_batches(docs: Sequence[str], tokenizer, *, seq_len: int, batch_size: int):
  """Every document (+ end token) cut into rows of `seq_len` next-token pairs, batched; padding rows
  and tails have segment id 0, which the loss ignores. Rows restart positions at 0, as packing does."""
  rows = []
  for doc in docs:
    ids = np.append(tokenizer.encode(doc), np.int32(tokenizer.eos_id)).astype(np.int32)
    for start in range(0, len(ids) - 1, seq_len):
      piece = ids[start:start + seq_len + 1]
      n = len(piece) - 1
      row = {k: np.zeros(seq_len, np.int32) for k in pipeline.BATCH_KEYS}
      row["inputs"][:n], row["targets"][:n] = piece[:-1], piece[1:]
      row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
      rows.append(row)
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    chunk += [{k: np.zeros(seq_len, np.int32) for k in pipeline.BATCH_KEYS}] * (batch_size - len(chunk))
    yield {k: np.stack([r[k] for r in chunk]) for k in pipeline.BATCH_KEYS}


def mean_loss(eval_fn, params, batches, mesh) -> tuple[float, float]:
  """(token-weighted mean cross-entropy, tokens) over host batches, summed as the trainer does."""
  sums = [eval_fn(params, sharding.global_batch(b, mesh)) for b in batches]
  sums = jax.device_get(sums)
  tokens = sum(s["tokens"] for s in sums)
  return sum(s["ce_sum"] for s in sums) / max(tokens, 1.0), float(tokens)


def validation_documents(config) -> list[str]:
  """The run's held-out documents (the trainer's: the data.val_path files or the seeded split)."""
  return pipeline.validation_documents(config)


def _file_documents(config, path: str) -> Sequence[str]:
  file_cfg = ml_collections.ConfigDict(config.data.to_dict())
  file_cfg.source, file_cfg.path, file_cfg.format = "files", path, ""
  return sources.load_documents(file_cfg)


def evaluate(workdir: str, step: int | None = None, *, data_paths: Sequence[str] = (),
             task_paths: Sequence[str] = (), builtin_examples: int = 64,
             task_limit: int | None = None) -> dict:
  """Restores the checkpoint and returns the report dict (see the module docstring)."""
  run_config, step = checkpoint.load_run_config(workdir, step)
  mesh = eval_mesh(run_config.batch_size)
  config, model, params = checkpoint.load_checkpoint(workdir, step, sharding=sharding.replicated(mesh))
  tokenizer = tokenizers.make_tokenizer(config.data.tokenizer, config.data.tokenizer_path,
                                        config.data.eos_token)
  batch_sh = {k: sharding.batch_sharding(mesh) for k in pipeline.BATCH_KEYS}
  chunk = config.get("loss_chunk_len", 0)  # absent from runs saved before it existed
  eval_fn = jax.jit(lambda p, b: ts.eval_step(p, b, model=model, loss_chunk_len=chunk),
                    in_shardings=(None, batch_sh))
  report = {"step": step, "workdir": os.path.abspath(workdir), "devices": mesh.size,
            "datasets": {}, "tasks": {}}

  def record(name, loss, tokens):
    report["datasets"][name] = {"loss": float(loss), "perplexity": metrics.perplexity(loss),
                                "tokens": tokens}

  with sharding.activation_context(mesh):
    pipes = pipeline.make_pipelines(config)
    if pipes.val_batches:
      record(VALIDATION, *mean_loss(eval_fn, params, pipes.val_batches, mesh))
    for name, batches in pipes.val_sets.items():  # data.val_path: each file (the trainer's val_loss/<name>)
      record(f"{VALIDATION}/{name}", *mean_loss(eval_fn, params, batches, mesh))
    for path in data_paths:
      batches = document_batches(_file_documents(config, path), tokenizer, seq_len=config.seq_len,
                                 batch_size=config.batch_size)
      record(os.path.splitext(os.path.basename(path))[0], *mean_loss(eval_fn, params, batches, mesh))

    score_rows = mc_tasks.make_row_scorer(model, config.batch_size)
    tasks = {}
    if builtin_examples > 0:
      tasks[BUILTIN_TASK] = mc_tasks.continuation_task(
          validation_documents(config), num_examples=builtin_examples, seed=config.seed)
    for path in task_paths:
      tasks[os.path.splitext(os.path.basename(path))[0]] = mc_tasks.read_jsonl(path, task_limit)
    for name, examples in tasks.items():
      report["tasks"][name] = mc_tasks.evaluate_task(score_rows, params, examples, tokenizer.encode,
                                                     config.seq_len)
  return report


def format_table(report: dict) -> str:
  lines = [f"step {report['step']}  ({report['workdir']}, {report['devices']} devices)",
           f"{'dataset':28s} {'loss':>9s} {'perplexity':>11s} {'tokens':>9s}"]
  for name, r in report["datasets"].items():
    lines.append(f"{name:28s} {r['loss']:9.4f} {r['perplexity']:11.3f} {r['tokens']:9.0f}")
  lines.append(f"{'task':28s} {'acc':>9s} {'acc_norm':>11s} {'examples':>9s} {'chance':>7s}")
  for name, r in report["tasks"].items():
    lines.append(f"{name:28s} {r['accuracy']:9.4f} {r['accuracy_norm']:11.4f} {r['examples']:9d} "
                 f"{r['chance']:7.3f}")
  return "\n".join(lines)


def write_report(report: dict, output: str | None, workdir: str) -> str:
  path = output or os.path.join(workdir, "eval", f"step_{report['step']}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  return path


def _split(value: str | None) -> list[str]:
  return [p.strip() for p in (value or "").split(",") if p.strip()]


def _check_cli_inputs(flags) -> None:
  """The flags' mistakes as UserErrors, before any checkpoint array or data file is read."""
  checkpoint.load_run_config(flags.workdir, flags.step)  # the workdir holds that finished checkpoint
  for flag, paths in (("--data", _split(flags.data)), ("--tasks", _split(flags.tasks))):
    for path in paths:
      if not glob.glob(os.path.expanduser(path)):
        raise cli_errors.UserError(f"{flag} entry {path!r} matches no file: expected comma-separated "
                                   "existing files.")
  for flag in ("builtin_examples", "task_limit"):
    if flags[flag].value < 0:
      raise cli_errors.UserError(f"--{flag}={flags[flag].value}: expected an int >= 0 (0 = off).")


def main(argv):
  del argv  # cli_errors.run rejects positional arguments
  from absl import logging  # pylint: disable=g-import-not-at-top

  flags = _FLAGS
  if not flags.verbose:
    logging.set_verbosity(logging.WARNING)  # Orbax's INFO lines would bury the table
  with cli_errors.checking_inputs():
    _check_cli_inputs(flags)
  report = evaluate(flags.workdir, flags.step, data_paths=_split(flags.data),
                    task_paths=_split(flags.tasks), builtin_examples=flags.builtin_examples,
                    task_limit=flags.task_limit or None)
  print(format_table(report))
  print(f"wrote {write_report(report, flags.output, flags.workdir)}")


def cli() -> None:
  """Defines the flags and runs `main` (`python -m moda_jax.evaluate`)."""
  global _FLAGS
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  absl_flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
  absl_flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  absl_flags.DEFINE_string("data", "", "Comma-separated text/jsonl/parquet files to score.")
  absl_flags.DEFINE_string("tasks", "", "Comma-separated multiple-choice jsonl files.")
  absl_flags.DEFINE_integer("builtin_examples", 64, "Examples of the held-out continuation task (0: off).")
  absl_flags.DEFINE_integer("task_limit", 0, "Read at most this many examples per task file (0: all).")
  absl_flags.DEFINE_string("output", None, "Report path (default DIR/eval/step_<N>.json).")
  absl_flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs (Orbax, JAX).")
  _FLAGS = absl_flags.FLAGS
  cli_errors.run(main)


if __name__ == "__main__":
  cli()
