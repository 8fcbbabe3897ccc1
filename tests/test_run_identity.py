"""A workdir remembers its model: another model stops at once with one line, `--restart` starts over,
other run settings resume (the resume line itself is checked in test_interrupts)."""

import json
import pathlib
import subprocess

import pytest

from configs import micro
from moda_jax.train import run_identity
from train_runs import REPO, finished_steps, read_metrics, train_command, train_env


def _pair(**new_fields):
  old = micro.get_config().to_dict()
  new = micro.get_config()
  for path, value in new_fields.items():
    *parents, leaf = path.split("__")
    node = new
    for p in parents:
      node = node[p]
    node[leaf] = value
  return old, new


def test_model_fields_differ_execution_fields_and_run_settings_do_not():
  old, new = _pair(model__num_layers=3, model__depth_kv="attn", model__remat="full",
                   model__attention_impl="reference", total_steps=99, learning_rate=1e-4)
  assert run_identity.identity_differences(old, new) == [
      "model.num_layers 2 -> 3", "model.depth_kv 'attn_ffn' -> 'attn'"]
  changes = run_identity.setting_changes(old, new)
  assert "total_steps 12 -> 99" in changes and "learning_rate 0.003 -> 0.0001" in changes
  assert "model.remat 'none' -> 'full'" in changes
  assert not [c for c in changes if c.startswith(("model.num_layers", "model.depth_kv"))]


def test_turning_gradient_clipping_off_changes_the_optimizer_state_so_it_cannot_resume():
  old, new = _pair(grad_clip_norm=0.0)
  assert run_identity.identity_differences(old, new) == ["gradient clipping (grad_clip_norm > 0) 'on' -> 'off'"]
  old, new = _pair(grad_clip_norm=0.5)
  assert not run_identity.identity_differences(old, new)
  assert run_identity.setting_changes(old, new) == ["grad_clip_norm 1.0 -> 0.5"]


def test_a_model_field_missing_from_an_older_checkpoint_compares_as_its_default():
  old, new = _pair()
  del old["model"]["norm_eps"]  # as if the field was added after the checkpoint was saved
  assert not run_identity.identity_differences(old, new)
  old["model"]["norm_eps"] = 1e-3
  assert run_identity.identity_differences(old, new) == ["model.norm_eps 0.001 -> 1e-06"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / "jax_cache_front_door"


def test_another_model_stops_with_one_line_and_restart_starts_over(tmp_path, cache_dir):
  env = train_env(cache_dir)
  run = lambda *extra: subprocess.run(train_command(tmp_path, "--config.total_steps=4", *extra), env=env,
                                      capture_output=True, text=True, timeout=600, cwd=REPO)
  first = run()
  assert first.returncode == 0, first.stderr[-3000:]
  assert finished_steps(tmp_path) == [4]

  other = run("--config.model.num_layers=3", "--config.model.depth_kv=attn")
  lines = other.stderr.strip().splitlines()
  assert other.returncode == 2 and len(lines) == 1, other.stderr[-3000:]
  assert lines[0] == (f"error: --workdir={tmp_path} holds a run of another model (checkpoint at step 4; "
                      "model.num_layers 2 -> 3, model.depth_kv 'attn_ffn' -> 'attn'): pass a new --workdir, "
                      "or --restart to delete that run and start over.")
  assert finished_steps(tmp_path) == [4]  # untouched

  restarted = run("--config.model.num_layers=3", "--config.model.depth_kv=attn", "--config.total_steps=3",
                  "--restart")
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  out = restarted.stdout + restarted.stderr
  assert f"--restart: deleted the previous run in {tmp_path} (checkpoints, config.json, metrics.jsonl" in out
  assert "resumed" not in out
  assert finished_steps(tmp_path) == [3]
  assert sorted(read_metrics(tmp_path)) == [2, 3]  # the old run's step 4 is gone
  saved = json.loads(pathlib.Path(tmp_path, "config.json").read_text())
  assert saved["model"]["num_layers"] == 3 and saved["model"]["depth_kv"] == "attn"
