"""Helpers for tests that run `python train.py` in subprocesses (test_train, test_multiprocess)."""

import json
import os
import pathlib
import sys

from moda_jax.train import checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
# Long enough that a kill lands mid-run; checkpoints every 4 steps, evaluation every 6.
RUN_FLAGS = ("--config=configs/micro.py", "--config.total_steps=24")


def train_env(cache_dir) -> dict[str, str]:
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": "cpu",
      # One device per process; cheaper XLA:CPU optimisation keeps compile time down.
      "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
      # Runs of one config share compiled programs through the persistent cache.
      "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
      "PYTHONUNBUFFERED": "1",
  })
  return env


def train_command(workdir, *extra) -> list[str]:
  return [sys.executable, str(REPO / "train.py"), *RUN_FLAGS, f"--workdir={workdir}", *extra]


def read_metrics(workdir) -> dict[int, dict]:
  """metrics.jsonl as {step: record}; fails if a step appears twice or out of order."""
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines if line.strip()]
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)), f"one entry per step expected, got {steps}"
  return {r["step"]: r for r in records}


def finished_steps(workdir) -> list[int]:
  """Steps of the finished (committed) checkpoints in `workdir`."""
  ckdir = pathlib.Path(workdir, checkpoint.CHECKPOINT_DIR)
  if not ckdir.is_dir():
    return []
  return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
