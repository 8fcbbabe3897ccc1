"""The study tool: grid files, the runner (skip / resume / budgets), the report's statistics and files."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from moda_jax.eval import evaluate
from moda_jax.eval import study
from moda_jax.eval import study_depth
from moda_jax.eval import study_identity
from moda_jax.eval import study_report

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("alpha", "beta")


def _write_grid(path, body):
  path.write_text("from configs import micro\n\n\ndef get_grid():\n" + body)
  return str(path)


def test_grid_file_errors_name_the_problem(tmp_path):
  ok = "  c = micro.get_config()\n  return {'base': c, 'entries': {'a': {}, 'b': {'model.num_layers': 3}}, " \
       "'seeds': [0, 1], 'baseline': 'a'}\n"
  grid = study.load_grid(_write_grid(tmp_path / "ok.py", ok))
  assert grid.config("b", 1).model.num_layers == 3 and grid.config("b", 1).seed == 1
  assert grid.config("a", 0).model.num_layers == micro_layers()
  cases = {"'model.nope': 1": "not a field", "'seed': 3": "may not override 'seed'",
           "'model.num_layers': 'x'": "sets model.num_layers='x'"}
  for override, message in cases.items():
    bad = ok.replace("'model.num_layers': 3", override)
    with pytest.raises(ValueError, match=message):
      study.load_grid(_write_grid(tmp_path / "bad.py", bad))
  with pytest.raises(ValueError, match="baseline='z'"):
    study.load_grid(_write_grid(tmp_path / "bad.py", ok.replace("'baseline': 'a'", "'baseline': 'z'")))


def micro_layers():
  from configs import micro  # pylint: disable=g-import-not-at-top
  return micro.get_config().model.num_layers


def test_config_differences_ignore_how_a_run_runs():
  from configs import micro  # pylint: disable=g-import-not-at-top
  c = micro.get_config()
  stored = json.loads(json.dumps(c.to_dict()))
  stored["progress_bar"], stored["checkpoint_every"], stored["data"]["num_workers"] = True, 1, 3
  stored["removed_field"] = 1  # a field a newer code base no longer has
  assert study_identity.config_differences(stored, c) == []
  stored["learning_rate"], stored["model"]["num_layers"] = 1.0, 9
  assert study_identity.config_differences(stored, c) == ["learning_rate", "model.num_layers"]


def _fake_run(directory, entry, seed, finals, steps=(5, 10), total=10, step_time=0.1, jobs=1):
  run_dir = directory / entry / f"seed{seed}"
  run_dir.mkdir(parents=True)
  (run_dir / "config.json").write_text(json.dumps({"total_steps": total, "batch_size": 2, "seq_len": 4,
                                                   "model": {"depth_kv": "none"}}))
  (run_dir / "study.json").write_text(json.dumps({"status": "done", "params": 1000,
                                                  "train_flops_per_token": 5e6, "wall_s": 3.0,
                                                  "jobs": jobs}))
  lines = []
  for step in steps:
    scale = 1.0 + (steps[-1] - step) / 10
    record = {"step": step, "loss": 2 * scale, "step_time_s": step_time, "tokens_per_s": 8 / step_time,
              "val_loss": finals["all"] * scale}
    record.update({f"val_loss/{s}": finals[s] * scale for s in SOURCES})
    lines.append(json.dumps(record))
  (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_reuse_copies_in_only_a_finished_run_of_an_equal_config(tmp_path):
  grid_path = _write_grid(tmp_path / "g.py", "  c = micro.get_config()\n  return {'base': c, 'entries': "
                          "{'a': {}}, 'seeds': [0, 1], 'baseline': 'a'}\n")
  grid = study.load_grid(grid_path)
  other = tmp_path / "other"
  finals = {"all": 2.0, **{s: 2.0 for s in SOURCES}}
  # Sorted before the match: a run of another learning rate, and an unfinished one of the same config.
  for name, seed, change, status in (("a_lr", 0, {"learning_rate": 9.0}, "done"), ("b", 0, {}, "done"),
                                     ("a_unfinished", 1, {}, "interrupted")):
    _fake_run(other, name, seed, finals)
    config = {**json.loads(json.dumps(grid.config("a", seed).to_dict())), **change}
    (other / name / f"seed{seed}" / "config.json").write_text(json.dumps(config))
    (other / name / f"seed{seed}" / "study.json").write_text(json.dumps({"status": status, "wall_s": 3.0}))
  assert study_identity.find_reusable(grid, "a", 0, [str(other)]) == str(other / "b" / "seed0")
  assert study_identity.find_reusable(grid, "a", 1, [str(other)]) is None
  out = tmp_path / "out"
  # Seed 1 has no reusable run: it would train, so this call runs seed 0 only.
  assert study.main(["run", grid_path, f"--out={out}", f"--reuse={other}", "--max_runs=1", "--only=a",
                     "--max_minutes=0.001"]) == 0
  record = json.loads((out / "a" / "seed0" / "study.json").read_text())
  assert record["reused_from"] == str(other / "b" / "seed0") and record["entry"] == "a"
  assert (out / "a" / "seed0" / "metrics.jsonl").read_text() == (other / "b" / "seed0" / "metrics.jsonl").read_text()
  assert not (out / "a" / "seed1").exists()
  study_report.write_report(str(out))
  assert f"done (reused: {other / 'b' / 'seed0'})" in (out / "report.md").read_text()
  assert study.main(["run", grid_path, f"--out={out}", f"--reuse={tmp_path / 'nope'}"]) == 2


def test_report_statistics_match_numpy(tmp_path):
  rng = np.random.default_rng(0)
  seeds = [0, 1, 2]
  finals = {e: {s: {k: 3 + rng.normal() * 0.1 for k in ("all",) + SOURCES} for s in seeds} for e in ("b", "x")}
  for entry in finals:
    for seed in seeds:
      _fake_run(tmp_path, entry, seed, finals[entry][seed], step_time=0.1 if entry == "b" else 0.15)
  _fake_run(tmp_path, "x", 3, finals["x"][0], steps=(5,))  # unfinished: left out of every statistic
  (tmp_path / "study.json").write_text(json.dumps({"entries": {"x": {"model.depth_kv": "attn"}, "b": {}},
                                                   "seeds": seeds + [3], "baseline": "b"}))
  loaded = study_report.load_study(str(tmp_path))
  assert loaded.entries == ["x", "b"] and sorted(loaded.finished("x")) == seeds
  x = np.array([finals["x"][s]["all"] for s in seeds])
  b = np.array([finals["b"][s]["all"] for s in seeds])
  summary = study_report.entry_summary(loaded, "x")
  np.testing.assert_allclose(summary["val_loss"][:2], [x.mean(), x.std(ddof=1)], rtol=1e-12)
  np.testing.assert_allclose(summary["delta"][:2], [(x - b).mean(), (x - b).std(ddof=1)], rtol=1e-12)
  assert summary["delta"][2] == 3 and summary["tokens"] == 80 and summary["step_time_s"] == pytest.approx(0.15)
  beta = study_report.paired_difference(loaded, "x", "val_loss/beta")
  want = np.array([finals["x"][s]["beta"] - finals["b"][s]["beta"] for s in seeds])
  np.testing.assert_allclose(beta[:2], [want.mean(), want.std(ddof=1)], rtol=1e-12)
  path = study_report.write_report(str(tmp_path))
  text = pathlib.Path(path).read_text()
  assert f"{x.mean():.4f} ± {x.std(ddof=1):.4f}" in text and f"{(x - b).mean():+.4f}" in text
  assert "1.50×" in text and "| alpha | beta |" in text and "| x | 3 | done | 5/10 |" in text
  for png in ("loss_curves.png", "source_differences.png"):
    assert (tmp_path / png).stat().st_size > 10_000 and f"]({png})" in text


def test_report_times_only_runs_alone_and_compares_like_with_like(tmp_path):
  finals = {k: 3.0 for k in ("all",) + SOURCES}
  # b: seed 0 shared the device with another run (slower per step), seed 1 ran alone.
  _fake_run(tmp_path, "b", 0, finals, step_time=0.4, jobs=2)
  _fake_run(tmp_path, "b", 1, finals, step_time=0.1)
  _fake_run(tmp_path, "x", 0, finals, step_time=0.3, jobs=2)  # x never ran alone
  (tmp_path / "study.json").write_text(json.dumps({"entries": {"b": {}, "x": {}}, "seeds": [0, 1],
                                                   "baseline": "b"}))
  loaded = study_report.load_study(str(tmp_path))
  assert study_report.entry_summary(loaded, "b")["step_time_s"] == pytest.approx(0.1)
  x_row = next(line for line in study_report.main_table(loaded) if line.startswith("| x "))
  assert "300.0 (2 at a time)" in x_row and x_row.endswith("| – |")  # no ratio against a run alone


def _corpus(path, n, seed):
  rng = np.random.default_rng(seed)
  words = ["the", "kernel", "module", "returns", "a", "value", "of", "python", "function", "list"]
  path.write_text("".join(" ".join(rng.choice(words, rng.integers(20, 90))) + "\n\f\n" for _ in range(n)))
  return path


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _study(*args, env):
  return subprocess.run([sys.executable, "-m", "moda_jax.study", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_grid_runs_skips_resumes_exactly_and_reports(tmp_path):
  """Two entries on files with two validation sources: run, rerun (skipped), an interrupted run
  relaunched from its mid-run checkpoint ends where the uninterrupted one did; report and depth mass."""
  train = _corpus(tmp_path / "t.train.txt", 60, 0)
  vals = [_corpus(tmp_path / f"{s}.val.txt", 4, i + 1) for i, s in enumerate(SOURCES)]
  grid = _write_grid(tmp_path / "grid.py", f"""  c = micro.get_config()
  c.data.source, c.data.path, c.data.text_separator = "files", {str(train)!r}, "formfeed"
  c.data.val_path = {",".join(map(str, vals))!r}
  c.keep_checkpoints = 3
  return {{"base": c, "entries": {{"none": {{"model.depth_kv": "none"}}, "attn_ffn": {{}}}},
          "seeds": [0], "baseline": "none"}}
""")
  out, env = tmp_path / "out", _env()
  first = _study("run", grid, f"--out={out}", "--max_runs=1", env=env)
  assert first.returncode == 0, first.stdout + first.stderr
  assert "1/2 runs done" in first.stdout and "--max_runs=1" in first.stdout
  second = _study("run", grid, f"--out={out}", env=env)
  assert second.returncode == 0 and "skip none/seed0: done" in second.stdout and "2/2 runs done" in second.stdout
  run_dir = out / "attn_ffn" / "seed0"
  done = study_report.read_metrics(str(run_dir))
  assert set(done[-1]) >= {"val_loss", "val_loss/alpha", "val_loss/beta"}
  # Interrupted at step 6: the checkpoint of step 12 and its log lines gone, the status not "done".
  last = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  subprocess.run(["rm", "-rf", str(run_dir / "checkpoints" / str(last))], check=True)
  record = json.loads((run_dir / "study.json").read_text())
  (run_dir / "study.json").write_text(json.dumps({**record, "status": "interrupted"}))
  third = _study("run", grid, f"--out={out}", env=env)
  assert third.returncode == 0 and f"start attn_ffn/seed0 (resuming from step {last - 4})" in third.stdout
  resumed = study_report.read_metrics(str(run_dir))
  assert [r["step"] for r in resumed] == [r["step"] for r in done]  # one record per step
  for key in ("val_loss", "val_loss/alpha", "val_loss/beta"):
    assert resumed[-1][key] == pytest.approx(done[-1][key], abs=1e-6)
  datasets = evaluate.evaluate(str(run_dir), builtin_examples=0)["datasets"]
  for name in ("validation",) + tuple(f"validation/{s}" for s in SOURCES):  # evaluate = the trainer
    assert datasets[name]["loss"] == pytest.approx(resumed[-1][name.replace("validation", "val_loss")], abs=1e-4)
  report = _study("report", str(out), "--depth_mass", "--depth_mass_tokens=24", env=env)
  assert report.returncode == 0, report.stderr
  stored = json.loads((out / "depth_mass.json").read_text())
  assert list(stored) == ["attn_ffn"] and list(stored["attn_ffn"]["per_seed"]) == ["0"]
  depth = study_depth.summarize(stored)
  assert list(depth["attn_ffn"]["per_source"]) == list(SOURCES) and depth["attn_ffn"]["tokens"] == 24
  share = np.array(depth["attn_ffn"]["share_N"])
  assert share.shape == (2,) and share[0] == 0 and 0 < share[1] < 1  # layer 0 reads no slot
  text = (out / "report.md").read_text()
  assert "| none (baseline) |" in text and "Attention mass on depth slots" in text
  assert (out / "depth_share.png").exists() and (out / "loss_curves.png").exists()


@pytest.mark.parametrize("grid_file", sorted(p.name for p in (REPO / "configs" / "studies").glob("*.py")
                                             if p.name != "__init__.py"))
def test_every_committed_grid_builds_valid_model_configs(grid_file, monkeypatch):
  """Each entry of each grid in configs/studies/ is a real run config whose model validates."""
  from moda_jax import ModelConfig  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  grid = study.load_grid(str(REPO / "configs" / "studies" / grid_file))
  for entry in grid.entries:
    config = grid.config(entry, grid.seeds[0])
    ModelConfig.from_dict(config.model.to_dict())


def test_expected_wall_prefers_the_entry_and_runs_at_the_same_concurrency():
  walls = {"a": [(1, 100.0), (2, 180.0)], "b": [(2, 400.0), (1, 280.0)], "c": [(3, 500.0)]}
  assert study.expected_wall_s(walls, "a", jobs=1) == 100.0    # its own lone run, not the shared one
  assert study.expected_wall_s(walls, "a", jobs=2) == 180.0
  assert study.expected_wall_s(walls, "c", jobs=1) == 500.0    # no lone run of c: its own shared one
  assert study.expected_wall_s(walls, "new", jobs=1) == 280.0  # an unseen entry: the longest lone run
  assert study.expected_wall_s(walls, "new", jobs=4) == 500.0  # no run at 4: the longest of any
  assert study.expected_wall_s({}, "new", jobs=1) == 0.0
