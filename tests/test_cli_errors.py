"""User errors as one line with exit status 2, bugs as tracebacks (`moda_jax.cli_errors`), and the run
settings checked before any work (`run_settings`, through `trainer.train_and_evaluate`)."""

import os
import subprocess
import sys

import pytest

from configs import micro
from moda_jax import cli_errors
from moda_jax.train import trainer
from train_runs import REPO, train_env

# cli_errors loaded from its file: the runner scripts start in a fraction of a second (no jax import).
_RUNNER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cli_errors", {str(REPO / "moda_jax" / "cli_errors.py")!r})
cli_errors = importlib.util.module_from_spec(spec); spec.loader.exec_module(cli_errors)
from absl import flags
flags.DEFINE_integer("n", 1, "a number")
def main(argv):
  kind = argv[1] if len(argv) > 1 else ""
  if kind == "user":
    raise cli_errors.UserError("--n=3: expected\\n an even number.")
  if kind == "checked":
    with cli_errors.checking_inputs():
      open("/nonexistent/file.txt")
  if kind == "bug":
    raise ValueError("a ValueError outside the checking phase is a bug")
  print("ran with n =", flags.FLAGS.n)
cli_errors.run(main, positional=True)
"""


def _run(args, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=REPO, **kwargs)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == cli_errors.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def test_checking_inputs_turns_input_errors_into_user_errors_and_keeps_the_rest():
  for error in (ValueError("bad\n value"), NotImplementedError("no such backend"), FileNotFoundError(2, "gone", "x.txt")):
    with pytest.raises(cli_errors.UserError) as caught:
      with cli_errors.checking_inputs():
        raise error
    assert "\n" not in str(caught.value) and caught.value.__cause__ is error
  assert "x.txt" in str(caught.value)
  for error in (TypeError("a bug"), KeyError("a bug"), FloatingPointError("nan")):
    with pytest.raises(type(error)):
      with cli_errors.checking_inputs():
        raise error


def test_runner_exit_codes_for_user_errors_flag_errors_and_bugs():
  script = [sys.executable, "-c", _RUNNER]
  assert _run(script + ["--n=4"]).stdout.strip() == "ran with n = 4"
  _assert_one_line_error(_run(script + ["user"]), "error: --n=3: expected an even number.")
  _assert_one_line_error(_run(script + ["checked"]), "No such file or directory", "/nonexistent/file.txt")
  _assert_one_line_error(_run(script + ["--n=four"]), "--n=four", "--help")
  _assert_one_line_error(_run(script + ["--m=1"]), "m")
  bug = _run(script + ["bug"])
  assert bug.returncode == 1 and "Traceback" in bug.stderr and "is a bug" in bug.stderr


def _config(**changes):
  config = micro.get_config()
  for path, value in changes.items():
    *parents, leaf = path.split("__")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize("changes, fragment", [
    ({"batch_size": -4}, "config.batch_size=-4: expected a positive int"),
    ({"total_steps": 0}, "config.total_steps=0"),
    ({"eval_every": -1}, "config.eval_every=-1: expected an int >= 0"),
    ({"checkpoint_every": -2}, "config.checkpoint_every=-2"),
    ({"batch_size": 12}, "config.batch_size=12: expected a multiple of grad_accum_steps=1"),
    ({"grad_accum_steps": 3}, "config.batch_size=8: expected a multiple of grad_accum_steps=3"),
    ({"seq_len": 64}, "config.seq_len=64: expected <= config.model.max_seq_len=32"),
    ({"warmup_steps": 12}, "warmup_steps=12"),
    ({"mesh__data": 3}, "mesh (data=3"),
    ({"mesh__data": 1, "mesh__fsdp": 0}, "mesh.fsdp=0"),
    ({"model__num_heads": 3}, "ModelConfig.num_heads=3"),
    ({"model__depth_kv": "attn_fn"}, "ModelConfig.depth_kv='attn_fn'"),
    ({"model__vocab_size": 100}, "config.model.vocab_size=100: expected >= the tokenizer's 257 ids"),
    ({"data__tokenizer": "bpe"}, "data.tokenizer='bpe'"),
])
def test_run_settings_are_user_errors_before_any_work(tmp_path, changes, fragment):
  workdir = tmp_path / "run"
  with pytest.raises(cli_errors.UserError, match=None) as caught:
    trainer.train_and_evaluate(_config(**changes), str(workdir))
  assert fragment in str(caught.value)
  assert not workdir.exists()  # checked before the workdir is even created


def test_workdir_and_data_paths_are_user_errors(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  with pytest.raises(cli_errors.UserError, match="is a file: expected a directory"):
    trainer.train_and_evaluate(_config(), str(a_file))
  with pytest.raises(cli_errors.UserError, match="cannot be created"):
    trainer.train_and_evaluate(_config(), str(a_file / "run"))
  with pytest.raises(cli_errors.UserError, match="data.path entry .*nothing.jsonl' matches no file"):
    trainer.train_and_evaluate(_config(data__source="files", data__path=str(tmp_path / "nothing.jsonl")),
                               str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
  # A backend that cannot run here says so while the model is traced, before anything is compiled.
  with pytest.raises(cli_errors.UserError, match="implementation='pallas_triton' runs on"):
    trainer.train_and_evaluate(_config(model__attention_impl="pallas_triton"), str(tmp_path / "run"))


def test_each_cli_prints_one_line_and_exits_2(tmp_path):
  env = train_env(tmp_path / "cache")
  empty = tmp_path / "empty"
  empty.mkdir()
  train = [sys.executable, "train.py", "--config=configs/micro.py", f"--workdir={tmp_path / 'run'}"]
  _assert_one_line_error(_run(train + ["--config.batch_size=-4"], env=env), "config.batch_size=-4")
  _assert_one_line_error(_run(train + ["--config.model.layers=8"], env=env),
                         "--config.model.layers: no such config field")
  _assert_one_line_error(_run([sys.executable, "-m", "moda_jax.evaluate", f"--workdir={empty}"], env=env),
                         f"--workdir='{empty}' has no checkpoints/")
  _assert_one_line_error(_run([sys.executable, "-m", "moda_jax.generate", f"--workdir={empty}"], env=env),
                         "--prompt is empty")
  _assert_one_line_error(_run([sys.executable, "-m", "moda_jax.eval.plot", str(empty)], env=env),
                         "has no metrics.jsonl")
  assert not os.path.exists(tmp_path / "run")
