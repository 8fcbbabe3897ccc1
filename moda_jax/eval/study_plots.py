"""The study report's figures: loss curves (mean and min-max band over seeds per entry), the paired
differences to the baseline per validation source, and the depth attention share per layer.

Figures are built with `matplotlib.figure.Figure` (no pyplot state), so they save the same from a CLI
and display in a notebook.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure


def _series(runs, key: str, smooth: int = 1):
  """(tokens in M, mean, min, max) over runs of `key` at the steps every run logged it."""
  per_run = [{r["step"]: r[key] for r in run.metrics if key in r} for run in runs]
  steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
  if not steps:
    return None
  values = np.array([[p[s] for s in steps] for p in per_run], np.float64)
  if smooth > 1 and values.shape[1] >= smooth:  # trailing mean: the log's single-batch losses are noisy
    kernel = np.ones(smooth) / smooth
    values = np.stack([np.convolve(v, kernel, "valid") for v in values])
    steps = steps[smooth - 1:]
  tokens = np.array(steps) * runs[0].tokens_per_step / 1e6
  return tokens, values.mean(0), values.min(0), values.max(0)


def loss_curves(study, *, smooth: int = 5) -> Figure:
  """Training loss (trailing mean of `smooth` logs) and validation loss against tokens seen."""
  fig = Figure(figsize=(11, 4), layout="constrained")
  axes = fig.subplots(1, 2)
  for color, entry in zip(_colors(len(study.entries)), study.entries):
    runs = list(study.finished(entry).values()) or list(study.runs[entry].values())
    for ax, key, k in ((axes[0], "loss", smooth), (axes[1], "val_loss", 1)):
      series = _series(runs, key, k)
      if series is None:
        continue
      tokens, mean, low, high = series
      ax.plot(tokens, mean, color=color, label=f"{entry} (n={len(runs)})", marker="." if key != "loss" else None)
      ax.fill_between(tokens, low, high, color=color, alpha=0.2, linewidth=0)
  axes[0].set_title(f"training loss (trailing mean of {smooth} logs; band: min-max over seeds)")
  axes[1].set_title("validation loss (all sources; band: min-max over seeds)")
  for ax in axes:
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
  _zoom_to_second_half(axes[1], study)
  axes[1].legend(fontsize=8)
  return fig


def _zoom_to_second_half(ax, study) -> None:
  """Limits y to the validation losses of the second half of training, where the entries differ."""
  late = [r["val_loss"] for e in study.entries for run in study.runs[e].values() for r in run.metrics
          if "val_loss" in r and r["step"] >= run.total_steps / 2]
  if late:
    low, high = min(late), max(late)
    pad = 0.1 * (high - low) or 0.05
    ax.set_ylim(low - pad, high + pad)


def source_differences(study) -> Figure | None:
  """Bars: per validation source (and overall), each entry's paired difference to the baseline."""
  from moda_jax.eval import study_report  # pylint: disable=g-import-not-at-top

  others = [e for e in study.entries if e != study.baseline]
  if not study.baseline or not others:
    return None
  keys = ["val_loss"] + [f"val_loss/{s}" for s in study.sources()]
  fig = Figure(figsize=(max(6, 1.3 * len(keys) * max(1, len(others)) / 2), 3.8), layout="constrained")
  ax = fig.subplots()
  width = 0.8 / len(others)
  colors = dict(zip(study.entries, _colors(len(study.entries))))  # as in the loss curves
  for i, entry in enumerate(others):
    color = colors[entry]
    stats = [study_report.paired_difference(study, entry, k) for k in keys]
    ax.bar(np.arange(len(keys)) + (i - (len(others) - 1) / 2) * width, [s[0] for s in stats], width,
           yerr=[0 if s[2] < 2 else s[1] for s in stats], color=color, capsize=3, label=entry)
  ax.axhline(0, color="black", linewidth=0.8)
  ax.set_xticks(np.arange(len(keys)), ["all"] + study.sources())
  ax.set_ylabel(f"final val loss − {study.baseline}")
  ax.set_title("paired difference to the baseline (mean; whiskers: std over seeds)")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  return fig


def depth_share(depth: dict) -> Figure:
  """Mean attention mass on depth slots per layer (± std over seeds) of each measured entry."""
  fig = Figure(figsize=(8, 3.6), layout="constrained")
  ax = fig.subplots()
  for color, (entry, d) in zip(_colors(len(depth) + 1)[1:], depth.items()):
    share, std = np.asarray(d["share_N"]), np.nan_to_num(np.asarray(d["std_N"], np.float64))
    layers = np.arange(len(share))
    ax.plot(layers, share, marker="o", color=color, label=f"{entry} (seeds {len(d['seeds'])})")
    ax.fill_between(layers, share - std, share + std, color=color, alpha=0.2, linewidth=0)
  ax.set_xlabel("layer (attention sublayer of block n)")
  ax.set_ylabel("attention mass on depth slots")
  ax.set_title("share of attention on depth slots (mean over heads, queries and sources)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def _colors(n: int):
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps["tab10"]
  return [cmap(i % 10) for i in range(n)]


def plot_study(study, depth: dict | None, directory: str) -> list[str]:
  """Saves the figures next to report.md; returns their file names."""
  figures = {"loss_curves.png": loss_curves(study), "source_differences.png": source_differences(study),
             "depth_share.png": depth_share(depth) if depth else None}
  saved = []
  for name, fig in figures.items():
    if fig is not None:
      fig.savefig(os.path.join(directory, name), dpi=110)
      saved.append(name)
  return saved
