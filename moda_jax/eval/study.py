"""Ablation grids: run every (entry, seed) of a grid file, resumably, and report them.

  python -m moda_jax.study run GRID.py --out=DIR [--only=NAME,...] [--jobs=N] [--max_minutes=M] [--max_runs=N]
                                              [--reuse=STUDY_DIR,...]
  python -m moda_jax.study report DIR [--depth_mass]
  python -m moda_jax.study pack DIR --out=FILE.tar.gz   # what the report needs, to commit elsewhere

A grid file (see configs/studies/) defines `get_grid()` returning a dict:
  base      the run config (a ConfigDict) every entry starts from;
  entries   {name: {dotted config field: value}}, in table order;
  seeds     the seeds every entry runs with (`config.seed`: parameters and data order, so one seed
            gives every entry the same tokens in the same order);
  baseline  the entry the report takes differences to (paired by seed).

Each run trains in its own subprocess (`python train.py`'s trainer) in DIR/<entry>/seed<k>, next to its
`study.json` (status, parameter count, FLOPs, wall time). A run whose study.json says "done" is skipped; an
interrupted one resumes from its checkpoint (the trainer resumes exactly). A finished run's config must equal
the grid's (fields of how it runs, not what it computes, excepted), so a changed grid never mixes results.
`--max_minutes` starts no run that its predecessors' wall time says cannot finish in the budget, and at the
budget asks the running ones to stop (SIGTERM: checkpoint, exit); rerunning continues. `--reuse` copies in,
instead of training, a finished run of another study whose config equals the pending run's by the same
rule (e.g. the peers grid's baseline is the Table 6 grid's); its study.json names where it came from.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections

from moda_jax.eval import study_report
from moda_jax.eval.study_identity import check_same_config, find_reusable
from moda_jax.eval.study_report import STUDY_JSON, read_json

_PROCESS_START = time.time()  # a run's wall time includes its process' imports and data loading
_RESEND_SIGTERM_S = 10     # a child may not have installed the trainer's handler yet: ask again
_KILL_AFTER_S = 180        # a child that ignores SIGTERM this long is killed (resumes from its last checkpoint)


@dataclasses.dataclass(frozen=True)
class Grid:
  path: str
  base: ml_collections.ConfigDict
  entries: dict[str, dict]
  seeds: tuple[int, ...]
  baseline: str

  def config(self, entry: str, seed: int) -> ml_collections.ConfigDict:
    """The run config of `entry` at `seed`: the base with the entry's overrides."""
    config = copy.deepcopy(self.base)
    for key, value in self.entries[entry].items():
      *parents, field = key.split(".")
      node = config
      for p in parents:
        node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(node, ml_collections.ConfigDict) or field not in node:
        raise ValueError(f"grid {self.path}: entry {entry!r} overrides {key!r}, which is not a field of "
                         "the base config.")
      try:
        node[field] = value
      except TypeError as e:
        raise ValueError(f"grid {self.path}: entry {entry!r} sets {key}={value!r}: {e}") from e
    config.seed = seed
    return config

  def run_dir(self, out: str, entry: str, seed: int) -> str:
    return os.path.join(out, entry, f"seed{seed}")

  def manifest(self) -> dict:
    return {"grid": self.path, "entries": self.entries, "seeds": list(self.seeds), "baseline": self.baseline}


def load_grid(path: str) -> Grid:
  """Imports the grid file and checks its `get_grid()` dict."""
  if not os.path.isfile(path):
    raise ValueError(f"grid file {path!r} does not exist.")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())  # grid files import `configs.*` from the repository root
  spec = importlib.util.spec_from_file_location("_study_grid", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_grid"):
    raise ValueError(f"grid file {path!r} defines no get_grid().")
  grid = module.get_grid()
  missing = {"base", "entries", "seeds", "baseline"} - set(grid)
  if missing:
    raise ValueError(f"grid file {path!r}: get_grid() lacks {sorted(missing)}.")
  entries, seeds = dict(grid["entries"]), tuple(int(s) for s in grid["seeds"])
  if not entries or not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"grid file {path!r}: expected entries and distinct seeds, got {list(entries)} "
                     f"and {list(seeds)}.")
  if grid["baseline"] not in entries:
    raise ValueError(f"grid file {path!r}: baseline={grid['baseline']!r} is not one of {list(entries)}.")
  for name, overrides in entries.items():
    if not name.replace("_", "").replace("-", "").isalnum() or "seed" in overrides:
      raise ValueError(f"grid file {path!r}: entry {name!r} needs a name of letters, digits, '_', '-' "
                       "and may not override 'seed' (seeds come from the grid).")
  result = Grid(path, grid["base"], entries, seeds, grid["baseline"])
  for name in entries:
    result.config(name, seeds[0])  # every override names a real field
  return result


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)  # insertion order: the grid's entry order
  os.replace(path + ".tmp", path)  # a kill never leaves half a file


def _reuse(grid: Grid, entry: str, seed: int, source: str, run_dir: str) -> None:
  """Copies the finished run `source` in as (entry, seed), its record saying where it came from."""
  shutil.copytree(source, run_dir, dirs_exist_ok=True)
  record_path = os.path.join(run_dir, STUDY_JSON)
  record = read_json(record_path, {})
  record.update(entry=entry, seed=seed, overrides=grid.entries[entry], reused_from=source)
  _write_json(record_path, record)


def run_one(grid_path: str, out: str, entry: str, seed: int, progress_bar: bool, jobs: int = 1) -> int:
  """Trains one run in this process (the `_one` subcommand the runner starts); writes its study.json."""
  from moda_jax.train import trainer  # pylint: disable=g-import-not-at-top

  # The runner's SIGTERM asks the trainer to save and stop; until the trainer's handler is installed
  # (and after it is removed, while a checkpoint finishes) it must not kill this process.
  signal.signal(signal.SIGTERM, lambda *_: None)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # no absl command line here; Grain reads its flags' defaults
  grid = load_grid(grid_path)
  config = grid.config(entry, seed)
  config.progress_bar = progress_bar
  run_dir = grid.run_dir(out, entry, seed)
  record_path = os.path.join(run_dir, STUDY_JSON)
  record = read_json(record_path, {})
  record.update({"entry": entry, "seed": seed, "overrides": grid.entries[entry], "status": "running",
                 "jobs": jobs, **study_report.model_cost(config)})  # jobs: runs sharing the devices
  _write_json(record_path, record)
  try:
    trainer.train_and_evaluate(config, run_dir)
    final = study_report.read_metrics(run_dir)
    last_step = final[-1]["step"] if final else 0
    record["status"] = "done" if last_step >= config.total_steps else "interrupted"
    record["final_step"] = last_step
    code = 0
  except Exception as e:  # pylint: disable=broad-except
    record.update(status="failed", error=f"{type(e).__name__}: {e}")
    code = 1
  record["wall_s"] = record.get("wall_s", 0.0) + time.time() - _PROCESS_START
  _write_json(record_path, record)
  return code


def expected_wall_s(walls: dict, entry: str, jobs: int) -> float:
  """How long a run of `entry` may take: the longest finished run of that entry (else of any entry), among
  those that ran `jobs` at a time if there are such (runs that shared the accelerator took longer than
  one alone); 0 when none has finished. `walls`: entry -> [(runs at a time, wall seconds)]."""
  pool = walls.get(entry) or [w for ws in walls.values() for w in ws]
  same = [wall for j, wall in pool if j == jobs]
  return max(same or [wall for _, wall in pool], default=0.0)


class _Runner:
  """Keeps up to `jobs` runs going, each a subprocess, within the time and run budgets."""

  def __init__(self, grid: Grid, out: str, runs, args):
    self.grid, self.out, self.runs, self.args = grid, out, runs, args
    self.start = time.time()
    self.no_more = ""      # why no further run starts (budgets); the running ones go on
    self.stopping = ""     # why the running ones are asked to stop (deadline, signal)
    self.children = {}     # (entry, seed) -> [Popen, log file, first SIGTERM time, last SIGTERM time]
    self.started = self.failed = 0

  def _estimate_s(self, entry: str) -> float:
    walls = {}  # entry -> [(runs at a time, wall seconds)] of its finished runs
    for e in self.grid.entries:
      for s in self.grid.seeds:
        rec = read_json(os.path.join(self.grid.run_dir(self.out, e, s), STUDY_JSON), {})
        if rec.get("status") == "done" and rec.get("wall_s"):
          walls.setdefault(e, []).append((rec.get("jobs", 1), rec["wall_s"]))
    return expected_wall_s(walls, entry, self.args.jobs)

  def _may_start(self, entry: str) -> bool:
    a = self.args
    if self.no_more or self.stopping:
      return False
    if a.max_runs and self.started >= a.max_runs:
      self.no_more = f"--max_runs={a.max_runs} runs started"
    elif a.max_minutes and self._estimate_s(entry) > a.max_minutes * 60 - (time.time() - self.start):
      self.no_more = f"--max_minutes={a.max_minutes}: too little time left for another {entry} run"
    return not self.no_more

  def _launch(self, entry: str, seed: int) -> None:
    run_dir = self.grid.run_dir(self.out, entry, seed)
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "moda_jax.eval.study", "_one", self.grid.path, f"--out={self.out}",
           f"--entry={entry}", f"--seed={seed}", f"--jobs={self.args.jobs}"]
    if self.args.progress_bar:
      cmd.append("--progress_bar")
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(self.out), "jax_cache"))
    if self.args.jobs > 1:  # share one accelerator's memory between the concurrent runs
      env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / self.args.jobs:.3f}")
    log = open(os.path.join(run_dir, "train.log"), "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    self.children[(entry, seed)] = [proc, log, None, None]
    self.started += 1
    _print(f"[{self._clock()}] start {entry}/seed{seed}{_resume_note(run_dir)}")

  def _clock(self) -> str:
    return f"{(time.time() - self.start) / 60:5.1f} min"

  def _reap(self) -> None:
    for key, (proc, log, _, _) in list(self.children.items()):
      if proc.poll() is None:
        continue
      log.close()
      del self.children[key]
      run_dir = self.grid.run_dir(self.out, *key)
      rec = read_json(os.path.join(run_dir, STUDY_JSON), {})
      status = rec.get("status", f"exited {proc.returncode}")
      self.failed += status == "failed"
      detail = rec.get("error", "") if status == "failed" else _final_losses(run_dir)
      _print(f"[{self._clock()}] {status} {key[0]}/seed{key[1]} ({rec.get('wall_s', 0):.0f} s) {detail}")

  def _stop_children(self) -> None:
    """SIGTERM (the trainer saves a checkpoint at the next step and returns), again every few seconds
    until it is heard (a child still loading has not installed the trainer's handler), then SIGKILL."""
    now = time.time()
    for child in self.children.values():
      proc, _, first, last = child
      if first is not None and now - first > _KILL_AFTER_S:
        proc.kill()
      elif last is None or now - last >= _RESEND_SIGTERM_S:
        proc.send_signal(signal.SIGTERM)
        child[2], child[3] = first or now, now

  def loop(self, pending) -> None:
    last_progress = time.time()
    while pending or self.children:
      if self.args.max_minutes and time.time() - self.start > self.args.max_minutes * 60:
        self.stopping = self.stopping or f"--max_minutes={self.args.max_minutes} reached"
      if self.stopping:
        self._stop_children()
      while pending and len(self.children) < self.args.jobs and self._may_start(pending[0][0]):
        self._launch(*pending.pop(0))
      if self.no_more or self.stopping:
        pending = []
      self._reap()
      if self.children and time.time() - last_progress > self.args.progress_every:
        last_progress = time.time()
        steps = ", ".join(f"{e}/seed{s} step {_last_step(self.grid.run_dir(self.out, e, s))}"
                          for e, s in self.children)
        _print(f"[{self._clock()}] running: {steps}")
      time.sleep(0.5)


def _print(text: str) -> None:
  print(text, flush=True)


def _last_step(run_dir: str) -> int:
  records = study_report.read_metrics(run_dir)
  return records[-1]["step"] if records else 0


def _resume_note(run_dir: str) -> str:
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
  return f" (resuming from step {max(steps)})" if steps else ""


def _final_losses(run_dir: str) -> str:
  final = study_report.final_validation(study_report.read_metrics(run_dir))
  return " ".join(f"{k}={v:.4f}" for k, v in final.items())


def run_grid(grid_path: str, out: str, args) -> int:
  """`study run`: every pending (entry, seed) of the grid, in entry-major order; returns the exit code."""
  grid = load_grid(grid_path)
  only = [n for n in (args.only or "").split(",") if n]
  unknown = sorted(set(only) - set(grid.entries))
  if unknown:
    raise ValueError(f"--only={args.only!r} names {unknown}, not entries of {grid_path}: {list(grid.entries)}.")
  _write_json(os.path.join(out, STUDY_JSON), grid.manifest())
  # Seed-major: after each round of seeds, every entry has as many results as the others. Entry-major:
  # the seeds of an entry one after another, which reuse its compiled programs (the compilation cache).
  runs = [(e, s) for s in grid.seeds for e in grid.entries if not only or e in only]
  if args.order == "entry":
    runs.sort(key=lambda r: list(grid.entries).index(r[0]))
  reuse = [d for d in (args.reuse or "").split(",") if d]
  missing = [d for d in reuse if not os.path.isdir(d)]
  if missing:
    raise ValueError(f"--reuse={args.reuse!r}: {missing} are not directories (expected study directories).")
  pending = []
  for entry, seed in runs:
    run_dir = grid.run_dir(out, entry, seed)
    check_same_config(grid, run_dir, entry, seed)
    source = None if os.path.exists(run_dir) else find_reusable(grid, entry, seed, reuse)
    if source is not None:
      _reuse(grid, entry, seed, source, run_dir)
      _print(f"reuse {entry}/seed{seed}: {source} has its config")
    status = read_json(os.path.join(run_dir, STUDY_JSON), {}).get("status")
    if status == "done" or (status == "failed" and not args.retry_failed):
      _print(f"skip {entry}/seed{seed}: {status}")
    else:
      pending.append((entry, seed))
  _print(f"study {grid_path} -> {out}: {len(runs)} runs, {len(pending)} to train, jobs={args.jobs}")
  runner = _Runner(grid, out, runs, args)
  previous = {s: signal.signal(s, lambda signum, _: setattr(runner, "stopping", signal.Signals(signum).name))
              for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    runner.loop(pending)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  done = sum(read_json(os.path.join(grid.run_dir(out, e, s), STUDY_JSON), {}).get("status") == "done"
             for e, s in runs)
  reason = runner.stopping or runner.no_more
  note = f"; stopped: {reason} (rerun the same command to continue)" if reason and done < len(runs) else ""
  _print(f"study: {done}/{len(runs)} runs done, {runner.failed} failed in this call{note}")
  return 1 if runner.failed else 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m moda_jax.study", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="train every pending run of a grid")
  run.add_argument("grid")
  run.add_argument("--out", required=True, help="study directory (one subdirectory per entry and seed)")
  run.add_argument("--only", default="", help="comma-separated entries to run (default: all)")
  run.add_argument("--jobs", type=int, default=1, help="runs at a time (they share the devices)")
  run.add_argument("--max_minutes", type=float, default=0, help="time budget of this call (0: none)")
  run.add_argument("--max_runs", type=int, default=0, help="start at most this many runs (0: all)")
  run.add_argument("--retry_failed", action="store_true", help="train runs that failed before again")
  run.add_argument("--reuse", default="",
                   help="comma-separated study directories whose finished runs of an equal config are copied "
                        "in instead of trained")
  run.add_argument("--order", choices=("seed", "entry"), default="seed",
                   help="seed: every entry's seed 0, then seed 1, ...; entry: an entry's seeds together")
  run.add_argument("--progress_bar", action="store_true", help="trainer progress bars (in each train.log)")
  run.add_argument("--progress_every", type=float, default=60, help="seconds between progress lines")
  report = sub.add_parser("report", help="write DIR/report.md and the loss-curve PNGs")
  report.add_argument("dir")
  report.add_argument("--baseline", default="", help="entry to compare to (default: the grid's)")
  report.add_argument("--depth_mass", action="store_true",
                      help="also measure the depth attention share per layer of runs with checkpoints")
  report.add_argument("--depth_mass_tokens", type=int, default=512, help="tokens per validation source")
  pack = sub.add_parser("pack", help="a .tar.gz of the finished runs' small files and the report")
  pack.add_argument("dir")
  pack.add_argument("--out", required=True, help="the .tar.gz to write")
  one = sub.add_parser("_one", help=argparse.SUPPRESS)
  one.add_argument("grid")
  one.add_argument("--out", required=True)
  one.add_argument("--entry", required=True)
  one.add_argument("--seed", type=int, required=True)
  one.add_argument("--progress_bar", action="store_true")
  one.add_argument("--jobs", type=int, default=1)
  args = parser.parse_args(argv)
  try:
    if args.command == "run":
      if args.jobs < 1 or args.max_minutes < 0 or args.max_runs < 0:
        raise ValueError(f"--jobs={args.jobs}, --max_minutes={args.max_minutes}, --max_runs={args.max_runs}: "
                         "expected jobs >= 1 and budgets >= 0.")
      return run_grid(args.grid, args.out, args)
    if args.command == "_one":
      return run_one(args.grid, args.out, args.entry, args.seed, args.progress_bar, args.jobs)
    if args.command == "pack":
      _print(f"wrote {args.out}: {len(study_report.pack(args.dir, args.out))} files")
      return 0
    path = study_report.write_report(args.dir, baseline=args.baseline or None, depth_mass=args.depth_mass,
                                     depth_mass_tokens=args.depth_mass_tokens)
    _print(f"wrote {path}")
    return 0
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
