"""`study report DIR`: the tables of DIR/report.md and its PNGs, from the runs' files alone.

A run directory needs only `metrics.jsonl` and `config.json` (what benchmarks/results/ keeps); its
`study.json` adds status, parameters and FLOPs (recomputed from the config when absent), DIR/study.json
the grid (entries, seeds, baseline; else the directories are the entries). A run counts once its last
metrics record reaches `total_steps`. Final validation loss = the `val_loss` (and `val_loss/<source>`)
of that record. Seeds give mean +- sample std; the difference to the baseline is taken per seed (same
seed: same initial data order) and its mean +- std over the paired seeds reported. Step time and
tokens/s are each run's median over its logged steps (compilation excluded by the trainer), then the
mean over seeds. The depth attention share (`--depth_mass`, runs with checkpoints) goes to
DIR/depth_mass.json, which later reports read back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from moda_jax.eval import study_plots
from moda_jax.train import metrics
from moda_jax.train.checkpoint import CONFIG_JSON

REPORT_MD = "report.md"
STUDY_JSON = "study.json"  # the grid manifest in a study directory, a run's record in a run directory
DEPTH_MASS_JSON = "depth_mass.json"


def read_json(path: str, default=None):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def read_metrics(run_dir: str) -> list[dict]:
  """A run's metrics.jsonl records by step ([] before its first log)."""
  return metrics.read_records(run_dir)


def final_validation(records: list[dict]) -> dict[str, float]:
  """{"val_loss": .., "val_loss/<source>": ..} of the last record holding a validation loss."""
  for r in reversed(records):
    if "val_loss" in r:
      return {k: v for k, v in r.items() if k == "val_loss" or k.startswith("val_loss/")}
  return {}


def model_cost(config) -> dict:
  """Parameters (all, and of the embedding) and training FLOPs per token of a run config."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from moda_jax.model import flops  # pylint: disable=g-import-not-at-top
  from moda_jax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from moda_jax.model.transformer import Transformer  # pylint: disable=g-import-not-at-top

  model = config["model"]
  model_cfg = ModelConfig.from_dict(model.to_dict() if hasattr(model, "to_dict") else dict(model))
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: Transformer(model_cfg).init(jax.random.PRNGKey(0), tokens))["params"])
  return {"params": int(sum(x.size for x in jax.tree.leaves(shapes))),
          "embedding_params": int(sum(x.size for x in jax.tree.leaves(shapes.get("embed", {})))),
          "train_flops_per_token": flops.train_flops_per_sequence(model_cfg, config["seq_len"])
                                   / config["seq_len"]}


@dataclasses.dataclass
class Run:
  entry: str
  seed: int
  directory: str
  config: dict
  record: dict               # study.json (may be {})
  metrics: list[dict]

  @property
  def total_steps(self) -> int:
    return int(self.config.get("total_steps", 0))

  @property
  def last_step(self) -> int:
    return self.metrics[-1]["step"] if self.metrics else 0

  @property
  def finished(self) -> bool:
    return bool(self.metrics) and self.last_step >= self.total_steps and bool(self.final)

  @property
  def final(self) -> dict[str, float]:
    return final_validation(self.metrics)

  @property
  def tokens_per_step(self) -> int:
    return int(self.config["batch_size"]) * int(self.config["seq_len"])

  def median(self, key: str) -> float:
    values = [r[key] for r in self.metrics if key in r and math.isfinite(r[key])]
    return float(np.median(values)) if values else float("nan")

  def cost(self) -> dict:
    if "params" not in self.record:
      try:
        self.record.update(model_cost(self.config))
      except (ValueError, TypeError, KeyError):  # a config of an older model: no count
        self.record.update(params=float("nan"), train_flops_per_token=float("nan"))
    return self.record


@dataclasses.dataclass
class Study:
  directory: str
  entries: list[str]
  baseline: str | None
  runs: dict[str, dict[int, Run]]

  def finished(self, entry: str) -> dict[int, Run]:
    return {s: r for s, r in sorted(self.runs.get(entry, {}).items()) if r.finished}

  def sources(self) -> list[str]:
    names = []
    for entry in self.entries:
      for run in self.finished(entry).values():
        names += [k.split("/", 1)[1] for k in run.final if "/" in k and k.split("/", 1)[1] not in names]
    return names


def load_study(directory: str, baseline: str | None = None) -> Study:
  """Every run under DIR/<entry>/seed<k>/ with a metrics.jsonl, in the grid's entry order."""
  if not os.path.isdir(directory):
    raise ValueError(f"study directory {directory!r} does not exist.")
  manifest = read_json(os.path.join(directory, STUDY_JSON), {})
  found = sorted(e for e in os.listdir(directory) if os.path.isdir(os.path.join(directory, e)))
  entries = [e for e in manifest.get("entries", {})] + [e for e in found if e not in manifest.get("entries", {})]
  runs: dict[str, dict[int, Run]] = {}
  for entry in entries:
    entry_dir = os.path.join(directory, entry)
    if not os.path.isdir(entry_dir):
      continue
    for name in sorted(os.listdir(entry_dir)):
      run_dir = os.path.join(entry_dir, name)
      if not (name.startswith("seed") and name[4:].isdigit()
              and os.path.exists(os.path.join(run_dir, "metrics.jsonl"))):
        continue
      runs.setdefault(entry, {})[int(name[4:])] = Run(
          entry, int(name[4:]), run_dir, read_json(os.path.join(run_dir, CONFIG_JSON), {}),
          read_json(os.path.join(run_dir, STUDY_JSON), {}), read_metrics(run_dir))
  entries = [e for e in entries if e in runs]
  if not entries:
    raise ValueError(f"{directory!r} holds no runs (expected <entry>/seed<k>/metrics.jsonl).")
  baseline = baseline or manifest.get("baseline")
  if baseline is not None and baseline not in entries:
    raise ValueError(f"baseline={baseline!r} has no runs in {directory!r}; entries: {entries}.")
  return Study(directory, entries, baseline, runs)


def mean_std(values) -> tuple[float, float, int]:
  values = [v for v in values if v is not None and math.isfinite(v)]
  n = len(values)
  if not n:
    return float("nan"), float("nan"), 0
  return float(np.mean(values)), float(np.std(values, ddof=1)) if n > 1 else float("nan"), n


def paired_difference(study: Study, entry: str, key: str) -> tuple[float, float, int]:
  """Mean +- std over the seeds both runs finished of final[key](entry) - final[key](baseline)."""
  if study.baseline is None:
    return float("nan"), float("nan"), 0
  a, b = study.finished(entry), study.finished(study.baseline)
  return mean_std([a[s].final.get(key, math.nan) - b[s].final.get(key, math.nan) for s in a if s in b])


def _pm(m: float, s: float, n: int, digits: int = 4, sign: bool = False) -> str:
  if not n:
    return "–"
  head = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
  return head if n < 2 else f"{head} ± {s:.{digits}f}"


def entry_summary(study: Study, entry: str) -> dict:
  runs = list(study.finished(entry).values())
  every = list(study.runs[entry].values())
  cost = every[0].cost()
  # Runs that shared the devices (study run --jobs > 1) are slower per step; time only the least shared ones.
  jobs = min((r.record.get("jobs", 1) for r in runs), default=1)
  timed = [r for r in runs if r.record.get("jobs", 1) == jobs]
  return {
      "entry": entry, "seeds": [r.seed for r in runs], "runs": len(every),
      "params": cost.get("params", math.nan), "flops_per_token": cost.get("train_flops_per_token", math.nan),
      "tokens": every[0].total_steps * every[0].tokens_per_step,
      "val_loss": mean_std([r.final.get("val_loss") for r in runs]),
      "delta": paired_difference(study, entry, "val_loss"),
      "step_time_s": mean_std([r.median("step_time_s") for r in timed])[0],
      "tokens_per_s": mean_std([r.median("tokens_per_s") for r in timed])[0],
      "timed_jobs": jobs,
  }


def _overrides(study: Study, entry: str) -> str:
  manifest = read_json(os.path.join(study.directory, STUDY_JSON), {})
  overrides = manifest.get("entries", {}).get(entry)
  if overrides is None:
    return ""
  return ", ".join(f"{k.removeprefix('model.')}={v}" for k, v in overrides.items()) or "(base)"


def main_table(study: Study) -> list[str]:
  base = entry_summary(study, study.baseline) if study.baseline else None
  lines = [f"| entry | overrides | params (M) | train MFLOP/token | tokens (M) | seeds done | val loss | "
           f"Δ vs {study.baseline or '–'} (paired) | step time (ms) | tokens/s | step time vs baseline |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for entry in study.entries:
    s = entry_summary(study, entry)
    # A step-time ratio between runs that shared the devices differently would measure the sharing.
    comparable = base and base["timed_jobs"] == s["timed_jobs"]
    ratio = f"{s['step_time_s'] / base['step_time_s']:.2f}×" if comparable else "–"
    shared = f" ({s['timed_jobs']} at a time)" if s["timed_jobs"] > 1 else ""
    lines.append(
        f"| {entry}{' (baseline)' if entry == study.baseline else ''} | {_overrides(study, entry)} | "
        f"{s['params'] / 1e6:.4g} | {s['flops_per_token'] / 1e6:.4g} | {s['tokens'] / 1e6:.4g} | "
        f"{len(s['seeds'])}/{s['runs']} | {_pm(*s['val_loss'])} | "
        f"{'–' if entry == study.baseline else _pm(*s['delta'], sign=True)} | {s['step_time_s'] * 1e3:.1f}{shared} | "
        f"{s['tokens_per_s']:,.0f} | {ratio} |")
  return lines


def source_tables(study: Study) -> list[str]:
  sources = study.sources()
  if not sources:
    return []
  head = "| entry | " + " | ".join(sources) + " |"
  rule = "|---|" + "---|" * len(sources)
  loss, delta = [head, rule], [head, rule]
  for entry in study.entries:
    runs = study.finished(entry).values()
    loss.append(f"| {entry} | " + " | ".join(
        _pm(*mean_std([r.final.get(f"val_loss/{s}") for r in runs])) for s in sources) + " |")
    if entry != study.baseline and study.baseline:
      delta.append(f"| {entry} | " + " | ".join(
          _pm(*paired_difference(study, entry, f"val_loss/{s}"), sign=True) for s in sources) + " |")
  out = ["", "Final validation loss per source (mean ± std over seeds):", "", *loss]
  if len(delta) > 2:
    out += ["", f"Difference to {study.baseline} per source (paired by seed, mean ± std):", "", *delta]
  return out


def runs_table(study: Study) -> list[str]:
  lines = ["| entry | seed | status | steps | val loss | wall (s) | runs at a time |", "|---|---|---|---|---|---|---|"]
  for entry in study.entries:
    for seed, run in sorted(study.runs[entry].items()):
      status = run.record.get("status", "done" if run.finished else "incomplete")
      if run.record.get("reused_from"):  # the same config's run, trained for another study
        status += f" (reused: {run.record['reused_from']})"
      loss = run.final.get("val_loss")
      lines.append(f"| {entry} | {seed} | {status} | {run.last_step}/{run.total_steps} | "
                   f"{'–' if loss is None else f'{loss:.4f}'} | {run.record.get('wall_s', math.nan):.0f} | "
                   f"{run.record.get('jobs', '–')} |")
  return lines


def depth_table(depth: dict) -> list[str]:
  entries = list(depth)
  layers = max(len(d["share_N"]) for d in depth.values())
  lines = ["| layer | " + " | ".join(f"{e} (seeds {len(depth[e]['seeds'])})" for e in entries) + " |",
           "|---|" + "---|" * len(entries)]
  for n in range(layers):
    cells = []
    for e in entries:
      d = depth[e]
      cells.append("–" if n >= len(d["share_N"]) else _pm(d["share_N"][n], d["std_N"][n], len(d["seeds"]), 3))
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  return lines


RUN_FILES = ("metrics.jsonl", CONFIG_JSON, STUDY_JSON, "data_stats.json", "train.log")


def pack(directory: str, path: str) -> list[str]:
  """A .tar.gz of what the report is rebuilt from (the finished runs' small files, the grid manifest,
  the depth mass) and the report itself: no checkpoints, no unfinished runs. Returns the members."""
  import tarfile  # pylint: disable=g-import-not-at-top

  study = load_study(directory)
  members = [n for n in (STUDY_JSON, DEPTH_MASS_JSON, REPORT_MD) if os.path.exists(os.path.join(directory, n))]
  members += sorted(n for n in os.listdir(directory) if n.endswith(".png"))
  for entry in study.entries:
    for run in study.finished(entry).values():
      rel = os.path.relpath(run.directory, directory)
      members += [os.path.join(rel, n) for n in RUN_FILES if os.path.exists(os.path.join(run.directory, n))]
  with tarfile.open(path, "w:gz") as tar:
    for member in members:
      tar.add(os.path.join(directory, member), arcname=member)
  return members


def write_report(directory: str, baseline: str | None = None, depth_mass: bool = False,
                 depth_mass_tokens: int = 512) -> str:
  """Writes DIR/report.md and DIR/loss_curves.png (+ per-source and depth PNGs); returns the .md path."""
  study = load_study(directory, baseline)
  from moda_jax.eval import study_depth  # pylint: disable=g-import-not-at-top
  depth_path = os.path.join(directory, DEPTH_MASS_JSON)
  if depth_mass:
    measured = study_depth.measure(study, depth_mass_tokens, read_json(depth_path))
    with open(depth_path, "w") as f:
      json.dump(measured, f, indent=2)
  depth = study_depth.summarize(read_json(depth_path, {}))
  pngs = study_plots.plot_study(study, depth, directory)
  lines = [f"# Study report: {os.path.basename(os.path.abspath(directory))}", ""]
  grid = read_json(os.path.join(directory, STUDY_JSON), {}).get("grid")
  if grid:
    lines += [f"Grid `{grid}`; rebuild with `python -m moda_jax.study report {directory}`.", ""]
  lines += ["Final validation loss: mean ± sample std over the finished seeds; Δ: per-seed difference to the "
            "baseline, mean ± std over the seeds both finished. Step time and tokens/s: median over logged "
            "steps, mean over seeds.", "", *main_table(study), *source_tables(study),
            "", "## Runs", "", *runs_table(study)]
  if depth:
    lines += ["", "## Attention mass on depth slots per layer",
              "", "Mean over heads, query positions and validation sources; ± std over seeds "
              f"({next(iter(depth.values()))['tokens']} tokens per source).", "", *depth_table(depth)]
  lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in pngs]
  path = os.path.join(directory, REPORT_MD)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path
