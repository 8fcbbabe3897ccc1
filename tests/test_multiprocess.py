"""Two processes on localhost through `jax.distributed.initialize` (train.py's --coordinator_address):
one global mesh over both processes' devices, per-host data, one shared checkpoint."""

import json
import pathlib
import subprocess

import portpicker

from train_runs import REPO, finished_steps, train_command, train_env


def test_two_process_run_on_localhost(tmp_path):
  port = portpicker.pick_unused_port()
  env = train_env(tmp_path / "cache")
  procs = [subprocess.Popen(
      train_command(tmp_path / "run", "--config.total_steps=8", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}"),
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  records = [json.loads(l) for l in pathlib.Path(tmp_path / "run", "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 6, 8]  # only process 0 writes
  assert records[-1]["loss"] < records[0]["loss"]
  assert "val_loss" in records[2]
  assert finished_steps(tmp_path / "run")[-1] == 8
  # Each process saw its own data shard: the Grain state of both hosts is in the checkpoint.
  data_dir = tmp_path / "run" / "checkpoints" / "8" / "data"
  assert len([p for p in data_dir.iterdir() if "process" in p.name]) == 2, list(data_dir.iterdir())
