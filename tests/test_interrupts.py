"""Ctrl-C (SIGINT) saves a checkpoint at the step the run reached and exits cleanly, like SIGTERM; the
rerun resumes (and says which run settings changed); a second Ctrl-C ends the process at once."""

import signal
import subprocess
import sys
import time

import pytest

from train_runs import REPO, finished_steps, read_metrics, train_command, train_env

_TWO_CTRL_C = """
import os, signal
from moda_jax.train import interrupts
stop = interrupts.StopRequest()
stop.install()
os.kill(os.getpid(), signal.SIGTERM)
assert stop.signal_name == "SIGTERM", stop.signal_name
os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
os.kill(os.getpid(), signal.SIGINT)   # the first Ctrl-C: still a stop request, no KeyboardInterrupt
assert stop.requested and stop.signal_name == "SIGTERM"
print("first Ctrl-C handled", flush=True)
os.kill(os.getpid(), signal.SIGINT)   # the second: the default action ends the process here
print("still alive", flush=True)
"""


def test_second_ctrl_c_ends_the_process_at_once():
  proc = subprocess.run([sys.executable, "-c", _TWO_CTRL_C], capture_output=True, text=True, timeout=600,
                        cwd=REPO, env=train_env(REPO / ".no_cache"))
  assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
  assert proc.stdout.splitlines() == ["first Ctrl-C handled"]
  assert "Ctrl-C again to exit at once without saving" in proc.stderr


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / "jax_cache_front_door"


def test_ctrl_c_saves_the_step_reached_and_the_rerun_resumes(tmp_path, cache_dir):
  env = train_env(cache_dir)
  # Long enough that the interrupt lands mid-run; the rerun then only goes two steps further.
  proc = subprocess.Popen(train_command(tmp_path, "--config.total_steps=400"), env=env, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while 4 not in finished_steps(tmp_path):
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise AssertionError(f"run ended before checkpoint 4: {proc.communicate()[1][-3000:]}")
    time.sleep(0.01)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  saved = max(finished_steps(tmp_path))
  assert f"SIGINT: saved the checkpoint at step {saved}; rerun the same command to resume." in out + err
  assert 4 < saved < 400, "the interrupt must land mid-run and save the step it reached"
  assert max(read_metrics(tmp_path)) <= saved

  end = saved + 2
  rerun = subprocess.run(train_command(tmp_path, f"--config.total_steps={end}"), env=env,
                         capture_output=True, text=True, timeout=600, cwd=REPO)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert (f"resumed from the checkpoint at step {saved} with changed run settings: total_steps 400 -> {end}"
          in rerun.stdout + rerun.stderr)
  assert max(read_metrics(tmp_path)) == end and max(finished_steps(tmp_path)) == end
