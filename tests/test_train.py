"""End to end through `python train.py` (subprocesses): logs, checkpoints, exact resume after
kill -9, SIGTERM save, NaN stop, and `load_checkpoint` reproducing the logged validation loss.

All runs share one config, so after the first run the others hit the persistent compilation cache.
"""

import json
import pathlib
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from moda_jax.train import checkpoint
from moda_jax.data import pipeline
from moda_jax.train import sharding
from moda_jax.train import step as ts
from train_runs import REPO, finished_steps, read_metrics, train_command, train_env


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp("full")
  proc = subprocess.run(train_command(workdir), env=train_env(cache_dir), capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (workdir / "stdout.txt").write_text(proc.stdout)
  return workdir


def test_run_writes_logs_checkpoints_and_config(full_run):
  startup = re.findall(r"^startup: inputs and data ([0-9.]+) s, state ([0-9.]+) s, first step \(compiling\) "
                       r"([0-9.]+) s$", pathlib.Path(full_run, "stdout.txt").read_text(), re.M)
  assert len(startup) == 1 and float(startup[0][2]) > 0, startup
  records = read_metrics(full_run)
  assert sorted(records) == list(range(2, 25, 2))
  for r in records.values():
    assert {"loss", "perplexity", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s"} <= set(r)
  assert [s for s, r in records.items() if "val_loss" in r] == [6, 12, 18, 24]
  assert records[24]["loss"] < records[2]["loss"] - 0.5  # it learns (ln 257 = 5.55 at the start)
  assert list(pathlib.Path(full_run, "tensorboard").glob("events.out.tfevents.*"))
  assert finished_steps(full_run) == [16, 20, 24]  # keep_checkpoints=3
  saved = json.loads(pathlib.Path(full_run, "config.json").read_text())
  assert saved["total_steps"] == 24 and saved["model"]["num_layers"] == 2
  stats = json.loads(pathlib.Path(full_run, "data_stats.json").read_text())
  assert 3.0 < stats["unigram_entropy_nats"] < 3.6


def test_load_checkpoint_reproduces_the_logged_val_loss(full_run):
  config, model, params = checkpoint.load_checkpoint(str(full_run))
  assert config.total_steps == 24 and model.config.num_layers == 2
  pipes = pipeline.make_pipelines(config)
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  sums = [ts.eval_step(params, sharding.global_batch(b, mesh), model=model) for b in pipes.val_batches]
  val_loss = sum(float(s["ce_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)
  np.testing.assert_allclose(val_loss, read_metrics(full_run)[24]["val_loss"], rtol=1e-5)
  with pytest.raises(ValueError, match="step=3"):
    checkpoint.load_checkpoint(str(full_run), step=3)


def _start_and_wait_for_checkpoint(workdir, cache_dir, step):
  proc = subprocess.Popen(train_command(workdir), env=train_env(cache_dir), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while step not in finished_steps(workdir):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise AssertionError(f"run ended before checkpoint {step}: {proc.communicate()[1][-3000:]}")
    time.sleep(0.01)
  return proc


def test_kill9_then_rerun_resumes_with_identical_losses(full_run, cache_dir, tmp_path):
  proc = _start_and_wait_for_checkpoint(tmp_path, cache_dir, 4)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  resumed_from = max(finished_steps(tmp_path))
  assert 4 <= resumed_from < 24, "the kill must land mid-run"
  rerun = subprocess.run(train_command(tmp_path), env=train_env(cache_dir), capture_output=True,
                         text=True, timeout=600, cwd=REPO)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from the checkpoint at step {resumed_from}" in rerun.stdout + rerun.stderr
  want, got = read_metrics(full_run), read_metrics(tmp_path)
  assert sorted(got) == sorted(want)
  for step in want:  # bit-identical: same compiled program, same data order, same state
    for key in ("loss", "grad_norm", "learning_rate") + (("val_loss",) if "val_loss" in want[step] else ()):
      assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(cache_dir, tmp_path):
  proc = _start_and_wait_for_checkpoint(tmp_path, cache_dir, 4)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: saved the checkpoint at step" in out + err
  last = max(finished_steps(tmp_path))
  assert 4 < last < 24 or (last == 24 and "at step 24" in out + err)
  assert max(read_metrics(tmp_path)) <= last


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(cache_dir, tmp_path):
  # Step 1 runs at learning rate 0 (warmup), then a 1e30 peak blows the parameters up.
  proc = subprocess.run(train_command(tmp_path, "--config.learning_rate=1e30",
                                      "--config.checkpoint_every=1"),
                        env=train_env(cache_dir), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode != 0
  assert "non-finite training at step" in proc.stderr
  good = finished_steps(tmp_path)
  assert good and f"last good checkpoint (step {max(good)})" in proc.stderr
  _, _, params = checkpoint.load_checkpoint(str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_checkpoint_every_zero_trains_without_saving(cache_dir, tmp_path):
  proc = subprocess.run(train_command(tmp_path, "--config.checkpoint_every=0",
                                      "--config.total_steps=3", "--config.log_every=1"),
                        env=train_env(cache_dir), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(read_metrics(tmp_path)) == [1, 2, 3]
  assert not finished_steps(tmp_path)
